"""A mail's HTML body made safe to hand to a program that reads mail (a script, an AI agent).

`sanitize` returns the HTML without anything active (scripts, event handlers, `javascript:`
and `data:` links, forms, frames, objects, embeds, `<meta>` refresh, `<base>`, styles),
without the text a person would not see (hidden by CSS, the `hidden` attribute,
`aria-hidden`, a colour matching the background, off-screen), with remote images blocked
unless asked for (their URL kept in `data-blocked-src`), `cid:` images pointed at the
attachment URLs given; the visible text; and `HTMLFinding`s, codes with counts and reasons, for
what was removed. Hidden text is the prompt-injection vector: it never reaches the output.

How, in three steps:
1. The input is bounded (`MAX_HTML_CHARS`, `MAX_TAGS`, `MAX_NESTING` by a crude count of
   open elements; the rest is cut and a finding says so) in one linear scan that also
   renames unknown tags to `x-u` and `<body>` to `x-body` (so their styles and handlers
   survive step 2 and are judged like any other element's).
2. `nh3` (html5ever, the parser browsers' rules describe) parses it and writes it back
   well-formed, keeping every attribute; only elements with raw or foreign content
   (script, iframes, svg, math, templates...) go, contents and all.
3. One `html.parser` walk over that well-formed text (linear there: the standard library's
   parser is quadratic on some malformed input, which step 2 never emits) decides what is
   hidden (`maildir.htmlstyle`), counts what is active or remote, checks link texts
   against their targets, and writes the output from an allow-list, which `nh3` cleans
   once more with a strict configuration as the last word on safety.

html5ever itself is quadratic in nesting depth and in runs of `&`, hence the bounds of
step 1. This module must never do I/O, never let a hidden element's text into its output,
and never raise on any input.
"""

from __future__ import annotations

import html as htmllib
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import unquote

import nh3

from maildir import htmlstyle
from maildir.htmllinks import MAX_LINK_TEXT, link_host, link_scheme, same_site, text_domain
from maildir.htmlstyle import ROOT_PAINT, Paint, StyleSheet

__all__ = [
    "MAX_HTML_CHARS",
    "HTMLFinding",
    "SafeHtml",
    "sanitize",
]

MAX_HTML_CHARS = 256 * 1024
MAX_TAGS = 20_000
MAX_NESTING = 256
MAX_DATA_IMAGE = 64 * 1024

# Elements html5ever may build; any other start or end tag is renamed to x-u in step 1.
_KNOWN = frozenset(
    "a abbr acronym address area article aside audio b bdi bdo big blink blockquote br "
    "button caption center cite code col colgroup data datalist dd del details dfn dialog "
    "dir div dl dt em embed fieldset figcaption figure font footer form h1 h2 h3 h4 h5 h6 "
    "header hgroup hr i image img input ins kbd label legend li link main map mark marquee "
    "menu meta meter nav nobr noscript ol optgroup option output p param picture pre "
    "progress q rp rt ruby s samp section select small source span strike strong sub "
    "summary sup table tbody td textarea tfoot th thead time tr track tt u ul var video wbr "
    "style base basefont bgsound keygen slot search html head".split()
)
# Removed with their content in step 2: raw text, foreign content, frames, plug-ins.
_DROPPED = frozenset(
    "script iframe frame frameset noembed noframes xmp plaintext template svg math title "
    "object applet".split()
)
_STEP2_TAGS = (_KNOWN - {"html", "head"}) | {"x-u", "x-body"}
_EMBEDDED = ("iframe", "frame", "frameset", "object", "applet", "embed", "svg", "math")
_FORM_TAGS = frozenset("form input button select textarea option optgroup datalist".split())
_VOID = frozenset(
    "area base basefont bgsound br col embed frame hr img input keygen link meta param "
    "source track wbr image".split()
)
# End tags optional in HTML: they never count towards the crude nesting depth of step 1.
_OPTIONAL_END = frozenset(
    "p li dt dd tr td th tbody thead tfoot colgroup option optgroup rb rt rp html head "
    "body caption".split()
)
_TAG = re.compile(r"<(/?)([A-Za-z][^\t\n\f\r />]*)")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_ALL_SCHEMES = frozenset(
    "http https mailto cid data javascript vbscript livescript file ftp tel sms".split()
)
_URL_ATTRS = ("href", "src", "action", "formaction", "background", "poster", "data", "lowsrc")

# What the output may hold.
_OUT_TAGS = frozenset(
    "a abbr address article aside b bdi bdo big blockquote br caption center cite code col "
    "colgroup dd del details dfn div dl dt em figcaption figure footer h1 h2 h3 h4 h5 h6 "
    "header hgroup hr i img ins kbd li main mark nav ol p pre q rp rt ruby s samp section "
    "small span strike strong sub summary sup table tbody td tfoot th thead time tr tt u "
    "ul var".split()
)
_OUT_ATTRS: dict[str, frozenset[str]] = {
    "*": frozenset({"title", "lang", "dir"}),
    "a": frozenset({"href"}),
    "img": frozenset({"src", "alt", "width", "height", "data-blocked-src"}),
    "td": frozenset({"colspan", "rowspan", "align", "valign"}),
    "th": frozenset({"colspan", "rowspan", "align", "valign", "scope"}),
    "table": frozenset({"align"}),
    "col": frozenset({"span"}),
    "colgroup": frozenset({"span"}),
    "ol": frozenset({"start", "reversed", "type"}),
    "p": frozenset({"align"}),
    "div": frozenset({"align"}),
}
_BLOCKS = frozenset(
    "address article aside blockquote br caption dd details div dl dt figcaption figure "
    "footer h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section summary table tr ul "
    "x-body".split()
)
_DATA_IMAGE = re.compile(r"data:image/(?:png|gif|jpeg|webp)[;,]", re.IGNORECASE)
_CAMOUFLAGED = "text colour matches the background"
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u034f\u00ad\u180e"))


@dataclass(frozen=True)
class HTMLFinding:
    """What the HTML had: a machine-readable code, how many, and a short reason."""

    code: str
    count: int
    reason: str


@dataclass(frozen=True)
class SafeHtml:
    html: str
    text: str  # the visible text, blocks on their own lines
    findings: tuple[HTMLFinding, ...]


# -- step 1: bounds and renaming ---------------------------------------------------------------


@dataclass
class _Prepared:
    html: str
    truncated: bool
    tags: Counter[str]


def _prepare(html: str) -> _Prepared:
    truncated = len(html) > MAX_HTML_CHARS
    html = html[:MAX_HTML_CHARS].replace("\x00", "\ufffd")
    pieces: list[str] = []
    tags: Counter[str] = Counter()
    depth = 0
    last = 0
    count = 0
    for match in _TAG.finditer(html):
        closing, name = match.group(1), match.group(2)
        lowered = name.translate(_ASCII_LOWER)
        count += 1
        if not closing:
            tags[lowered if lowered in _KNOWN or lowered in _DROPPED else "x-u"] += 1
            if lowered not in _VOID and lowered not in _OPTIONAL_END:
                depth += 1
        elif depth and lowered not in _VOID and lowered not in _OPTIONAL_END:
            depth -= 1
        if count > MAX_TAGS or depth > MAX_NESTING:
            truncated = True
            pieces.append(html[last : match.start()])
            return _Prepared("".join(pieces), truncated, tags)
        if lowered == "body":
            replacement = f"<{closing}x-body"
        elif lowered in _KNOWN or lowered in _DROPPED:
            continue
        else:
            replacement = f"<{closing}x-u"
        pieces.append(html[last : match.start()])
        pieces.append(replacement)
        last = match.end()
    pieces.append(html[last:])
    return _Prepared("".join(pieces), truncated, tags)


def _normalize(html: str) -> str:
    """Step 2: html5ever's reading of the HTML, written back well-formed."""
    return nh3.clean(
        html,
        tags=set(_STEP2_TAGS),
        clean_content_tags=set(_DROPPED),
        attributes={},
        generic_attribute_prefixes={""},
        url_schemes=set(_ALL_SCHEMES),
        strip_comments=True,
        link_rel=None,
    )


# -- step 3: the walk ------------------------------------------------------------------------


@dataclass(eq=False)
class _Open:
    tag: str
    emitted: bool
    paint: Paint
    hidden: str | None = None  # why the element (or an ancestor) is hidden
    hider: _Open | None = None  # the element that hides it (itself or an ancestor)
    counted: bool = False  # a hider whose hidden text has been counted
    link: int = -1  # index into _Walker.links for an open <a>


class _Walker(HTMLParser):
    def __init__(self, sheet: StyleSheet, remote_images: bool, cid_urls: Mapping[str, str]) -> None:
        super().__init__(convert_charrefs=True)
        self.sheet = sheet
        self.remote_images = remote_images
        self.cid_urls = cid_urls
        self.out: list[str] = []
        self.text: list[str] = []
        self.stack: list[_Open] = []
        self.counts: Counter[str] = Counter()
        self.hiding: Counter[str] = Counter()
        self.hidden_chars = 0
        self.links: list[list[str]] = []  # [href host, text...] per link
        self.open_links: list[int] = []
        self.mismatches: list[tuple[str, str]] = []
        self._skip = 0  # inside <style>

    # The parent's state, or the root's.
    def _top(self) -> _Open:
        return self.stack[-1] if self.stack else _Open("", False, ROOT_PAINT)

    def handle_starttag(self, tag: str, attr_list: list[tuple[str, str | None]]) -> None:
        attrs = {name: value or "" for name, value in attr_list}
        parent = self._top()
        self._count_active(tag, attrs)
        rules = self.sheet.for_element(tag, attrs)
        inline = htmlstyle.declarations(attrs.get("style", ""))
        decls = {**rules, **inline}
        painted = htmlstyle.paint(parent.paint, decls, attrs)
        self.counts["remote_content"] += htmlstyle.remote_urls(attrs.get("style", ""))
        entry = _Open(tag, False, painted, parent.hidden, parent.hider)
        if entry.hidden is None:
            entry.hidden = self._hidden(tag, attrs, decls)
            entry.hider = entry if entry.hidden is not None else None
        hidden = entry.hidden
        if tag == "style":
            self._skip += 1
        emitted = False
        if hidden is None and tag not in _FORM_TAGS:
            if tag == "img":
                emitted = self._image(attrs, decls)
            elif tag in _OUT_TAGS:
                emitted = self._emit(tag, attrs)
            if tag in _BLOCKS:
                self.text.append("\n")
        elif tag == "img":
            self._image_counts(attrs, hidden=True)
        if tag in _VOID:
            return
        entry.emitted = emitted
        if tag == "a" and hidden is None:
            entry.link = len(self.links)
            self.open_links.append(entry.link)
            self.links.append([link_host(attrs.get("href", ""))])
        self.stack.append(entry)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)  # html5ever writes no self-closing HTML tags

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        # The input is well-formed, so the top matches; tolerate anything else anyway.
        for depth in range(len(self.stack) - 1, -1, -1):
            if self.stack[depth].tag == tag:
                break
        else:
            return
        while len(self.stack) > depth:
            self._close(self.stack.pop())

    def _close(self, entry: _Open) -> None:
        if entry.tag == "style":
            self._skip = max(0, self._skip - 1)
        if entry.emitted:
            self.out.append(f"</{entry.tag}>")
        if entry.tag in _BLOCKS and entry.hidden is None:
            self.text.append("\n")
        if entry.link >= 0:
            if self.open_links and self.open_links[-1] == entry.link:
                self.open_links.pop()
            self._check_link(self.links[entry.link])

    def handle_data(self, data: str) -> None:
        if self._skip:  # the rules were read before the walk: only url()s are counted
            self.counts["remote_content"] += htmlstyle.remote_urls(data)
            return
        top = self._top()
        hider, why = top.hider, top.hidden
        if why is None and data.strip() and htmlstyle.camouflaged(top.paint):
            hider, why = top, _CAMOUFLAGED
        if why is not None:
            chars = len("".join(data.translate(_ZERO_WIDTH).split()))
            if chars:
                self.hidden_chars += chars
                if hider is not None and not hider.counted:
                    hider.counted = True  # one count per hidden element
                    self.hiding[why] += 1
            return
        self.out.append(htmllib.escape(data, quote=False))
        self.text.append(data)
        if self.open_links:
            parts = self.links[self.open_links[-1]]
            if len(parts) < 64 and sum(len(p) for p in parts) < MAX_LINK_TEXT:
                parts.append(data)

    # -- judging ------------------------------------------------------------------------------

    def _hidden(self, tag: str, attrs: Mapping[str, str], decls: Mapping[str, str]) -> str | None:
        if "hidden" in attrs:
            return "hidden attribute"
        if attrs.get("aria-hidden", "").strip().lower() == "true":
            return "aria-hidden"
        if tag == "input" and attrs.get("type", "").lower() == "hidden":
            return "hidden input"
        return htmlstyle.hiding(decls)

    def _count_active(self, tag: str, attrs: Mapping[str, str]) -> None:
        handlers = sum(1 for name in attrs if name.startswith("on"))
        self.counts["event_handler"] += handlers
        for name in _URL_ATTRS:
            value = attrs.get(name)
            if value is None:
                continue
            scheme = link_scheme(value)
            if scheme in ("javascript", "vbscript", "livescript"):
                self.counts["javascript_url"] += 1
            elif scheme == "data" and not (tag == "img" and name == "src"):
                self.counts["data_url"] += 1
            elif scheme in ("http", "https", "//") and name != "href" and tag != "img":
                if name != "action" and name != "formaction":
                    self.counts["remote_content"] += 1
        if tag == "meta" and attrs.get("http-equiv", "").strip().lower() == "refresh":
            self.counts["meta_refresh"] += 1
        elif tag == "base":
            self.counts["base_url"] += 1
        elif tag == "link" and link_scheme(attrs.get("href", "")) in ("http", "https", "//"):
            self.counts["remote_content"] += 1
        elif tag in ("embed",):
            self.counts["embedded_content"] += 1
        elif tag == "form":
            self.counts["form"] += 1

    def _check_link(self, parts: list[str]) -> None:
        host, text = parts[0], "".join(parts[1:])
        shown = text_domain(text)
        if host and shown and not same_site(host, shown):
            self.counts["mismatched_link"] += 1
            if len(self.mismatches) < 3:
                self.mismatches.append((shown, host))

    # -- writing ------------------------------------------------------------------------------

    def _emit(self, tag: str, attrs: Mapping[str, str], extra: str = "") -> bool:
        allowed = _OUT_ATTRS.get(tag, frozenset()) | _OUT_ATTRS["*"]
        kept = []
        for name, value in attrs.items():
            if name not in allowed:
                continue
            if name == "href" and link_scheme(value) not in ("http", "https", "mailto"):
                continue
            kept.append(f' {name}="{htmllib.escape(value, quote=True)}"')
        self.out.append(f"<{tag}{''.join(kept)}{extra}>")
        return tag not in _VOID

    def _image_counts(self, attrs: Mapping[str, str], hidden: bool) -> str:
        """Counts one image; "remote", "pixel" (a remote tracking pixel) or its scheme."""
        scheme = link_scheme(attrs.get("src", ""))
        if scheme not in ("http", "https", "//"):
            return scheme
        self.counts["remote_content"] += 1
        tiny = any(_pixels(attrs.get(name, "")) for name in ("width", "height"))
        if hidden or tiny:
            self.counts["tracking_pixel"] += 1
            return "pixel"
        return "remote"

    def _image(self, attrs: Mapping[str, str], decls: Mapping[str, str]) -> bool:
        tiny = any(_pixels(decls.get(name, "")) for name in ("width", "height"))
        kind = self._image_counts(attrs, hidden=tiny)
        src = attrs.get("src", "").strip()
        kept = {k: v for k, v in attrs.items() if k != "src"}
        if kind == "pixel":
            return False  # never shown, even when remote images are asked for
        if kind == "remote":
            if self.remote_images:
                kept["src"] = src
            else:
                kept["data-blocked-src"] = src
        elif kind == "cid":
            ref = unquote(src[4:]).strip().strip("<>")
            kept["src"] = self.cid_urls.get(ref, src)
        elif kind == "data" and _DATA_IMAGE.match(src) and len(src) <= MAX_DATA_IMAGE:
            kept["src"] = src
        self._emit("img", kept)
        return False

    def result(self) -> tuple[str, str]:
        while self.stack:
            self._close(self.stack.pop())
        return "".join(self.out), "".join(self.text)


def _pixels(value: str) -> bool:
    """Whether a width or height is at most one pixel."""
    value = value.strip().lower().removesuffix("px").strip()
    try:
        return float(value) <= 1.0
    except ValueError:
        return False


def _style_text(normalized: str) -> StyleSheet:
    """The rules of every <style> element, read before the walk so that a rule later in
    the document applies to elements before it, as in a browser."""
    sheet = StyleSheet()
    pos = 0
    lowered = normalized.lower()
    while True:
        start = lowered.find("<style", pos)
        if start < 0:
            return sheet
        body = lowered.find(">", start)
        end = lowered.find("</style", body)
        if body < 0 or end < 0:
            return sheet
        sheet.add(normalized[body + 1 : end])
        pos = end + 7


def _final(html: str) -> str:
    """The strict last pass: only the output allow-list survives, whatever step 3 did."""
    attributes = {tag: set(names) for tag, names in _OUT_ATTRS.items()}

    def keep(tag: str, name: str, value: str) -> str | None:
        if name == "src" and value.lower().startswith("data:"):
            return value if _DATA_IMAGE.match(value) else None
        if name == "href" and link_scheme(value) not in ("http", "https", "mailto"):
            return None
        return value

    return nh3.clean(
        html,
        tags=set(_OUT_TAGS | {"img"}),
        clean_content_tags={"script", "style"},
        attributes=attributes,
        attribute_filter=keep,
        url_schemes={"http", "https", "mailto", "cid", "data"},
        strip_comments=True,
        link_rel="noopener noreferrer nofollow",
    )


def _tidy_text(text: str) -> str:
    lines = [" ".join(line.split()) for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


_REASONS = {
    "script": "{n} script element(s), removed",
    "event_handler": "{n} event handler attribute(s) (onload, onclick...), removed",
    "javascript_url": "{n} javascript: URL(s), removed",
    "data_url": "{n} data: URL(s) outside images, removed",
    "embedded_content": "{n} frame, object, embed, svg or math element(s), removed",
    "form": "{n} form(s), removed",
    "meta_refresh": "a <meta> refresh (redirect), removed",
    "base_url": "a <base> URL, removed",
    "remote_content": "{n} remote image(s) or resource(s); remote images are blocked",
    "tracking_pixel": "{n} tracking pixel(s) (remote images of 1x1 or hidden), removed",
}


def _findings(walker: _Walker, prepared: _Prepared) -> tuple[HTMLFinding, ...]:
    counts = walker.counts
    counts["script"] += prepared.tags["script"]
    counts["embedded_content"] += sum(prepared.tags[t] for t in _EMBEDDED if t != "embed")
    found: list[HTMLFinding] = []
    for code, template in _REASONS.items():
        if counts[code]:
            found.append(HTMLFinding(code, counts[code], template.format(n=counts[code])))
    if walker.hidden_chars:
        elements = max(1, sum(walker.hiding.values()))
        how = ", ".join(sorted(walker.hiding)) or "hidden"
        found.append(
            HTMLFinding(
                "hidden_text",
                elements,
                f"{elements} hidden element(s) with {walker.hidden_chars} characters of text "
                f"({how}); removed from body_html and body_text",
            )
        )
    if counts["mismatched_link"]:
        shown, host = walker.mismatches[0]
        found.append(
            HTMLFinding(
                "mismatched_link",
                counts["mismatched_link"],
                f"{counts['mismatched_link']} link(s) whose text names another site than "
                f"they lead to (text {shown}, link to {host})",
            )
        )
    if prepared.truncated:
        found.append(
            HTMLFinding(
                "html_truncated",
                1,
                "the HTML is too large or too deeply nested to be checked whole; only its "
                "checked beginning is shown (html=raw gives all of it)",
            )
        )
    return tuple(found)


def sanitize(
    html: str, *, remote_images: bool = False, cid_urls: Mapping[str, str] | None = None
) -> SafeHtml:
    """The safe HTML, visible text and findings of an HTML body (see the module's doc).

    `cid_urls` maps a Content-ID (without angle brackets) to the URL to show instead of a
    `cid:` reference to it."""
    if not html.strip():
        return SafeHtml("", "", ())
    prepared = _prepare(html)
    normalized = _normalize(prepared.html)
    walker = _Walker(_style_text(normalized), remote_images, cid_urls or {})
    try:
        walker.feed(normalized)
        walker.close()
    except Exception:  # html.parser on html5ever's output: not expected; drop everything
        walker.out = []
        walker.text = []
    body, text = walker.result()
    return SafeHtml(_final(body), _tidy_text(text), _findings(walker, prepared))
