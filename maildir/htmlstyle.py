"""The little CSS that decides whether a mail's HTML shows a piece of text to a person.

`maildir.htmlsafe` asks, element by element, whether the element's own style (its `style`
attribute, the simple rules of the message's `<style>` elements, and the presentational
attributes `color`, `bgcolor` and `hidden`) hides it: `display:none`, `visibility:hidden`,
opacity 0, a zero or one-pixel font, a zero-size box that clips its overflow, clipping,
off-screen positioning or indentation, `mso-hide:all`, and a text colour equal or close to
the background colour in effect. It also finds `url(...)` references to remote resources.

This is not a CSS engine: selectors other than a plain tag, `.class` or `#id` (the last
compound of a descendant selector, so `.a .b` applies to every `.b`) are ignored, `@media`
and other at-rule blocks are skipped, and the cascade is "the element's inline style over
its rules". It errs towards calling text hidden. Every input is bounded (characters looked
at, rules kept) and scanned with `str` methods, never a backtracking regular expression.
This module must never do I/O and never raise on any input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "MAX_STYLE_CHARS",
    "Paint",
    "StyleSheet",
    "camouflaged",
    "declarations",
    "hiding",
    "parse_color",
    "remote_urls",
]

MAX_STYLE_CHARS = 4096  # of one style attribute
MAX_SHEET_CHARS = 128 * 1024  # of all <style> elements together
MAX_RULES = 2000
WHITE = (255, 255, 255)
_NEAR = 32  # the largest per-channel difference still "the same colour" to a reader

_RELEVANT = frozenset(
    "display visibility opacity font-size color background background-color background-image "
    "position left top right text-indent width height max-width max-height overflow "
    "clip clip-path mso-hide transform line-height".split()
)
_NAMED = {
    "white": WHITE,
    "black": (0, 0, 0),
    "snow": (255, 250, 250),
    "ivory": (255, 255, 240),
    "ghostwhite": (248, 248, 255),
    "whitesmoke": (245, 245, 245),
    "floralwhite": (255, 250, 240),
    "mintcream": (245, 255, 250),
    "azure": (240, 255, 255),
    "aliceblue": (240, 248, 255),
    "seashell": (255, 245, 238),
    "linen": (250, 240, 230),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
    "silver": (192, 192, 192),
    "lightgray": (211, 211, 211),
    "lightgrey": (211, 211, 211),
    "gainsboro": (220, 220, 220),
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "navy": (0, 0, 128),
    "maroon": (128, 0, 0),
    "purple": (128, 0, 128),
    "teal": (0, 128, 128),
    "orange": (255, 165, 0),
}
TRANSPARENT = "transparent"


def _strip_comments(css: str) -> str:
    out: list[str] = []
    pos = 0
    while True:
        start = css.find("/*", pos)
        if start < 0:
            out.append(css[pos:])
            return "".join(out)
        out.append(css[pos:start])
        end = css.find("*/", start + 2)
        if end < 0:
            return "".join(out)
        pos = end + 2


def declarations(style: str) -> dict[str, str]:
    """`name: value` pairs of a declaration list, lower-cased, `!important` dropped; only
    the properties that bear on visibility are kept."""
    found: dict[str, str] = {}
    for item in _strip_comments(style[:MAX_STYLE_CHARS]).split(";"):
        name, colon, value = item.partition(":")
        name = name.strip().lower()
        if not colon or name not in _RELEVANT:
            continue
        value = value.strip().lower().replace("!important", "").strip()
        found[name] = value
    return found


def parse_color(value: str) -> tuple[int, int, int] | str | None:
    """An RGB triple, TRANSPARENT, or None when the value is not a colour understood here."""
    value = value.strip().lower()
    if value in ("transparent", "rgba(0,0,0,0)"):
        return TRANSPARENT
    if value in _NAMED:
        return _NAMED[value]
    if value.startswith("#"):
        digits = value[1:]
        if not all(c in "0123456789abcdef" for c in digits):
            return None
        if len(digits) in (3, 4):
            if len(digits) == 4 and digits[3] == "0":
                return TRANSPARENT
            r, g, b = (int(c * 2, 16) for c in digits[:3])
            return (r, g, b)
        if len(digits) in (6, 8):
            if len(digits) == 8 and digits[6:] == "00":
                return TRANSPARENT
            return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))
        return None
    if value.startswith(("rgb(", "rgba(")) and value.endswith(")"):
        inner = value[value.index("(") + 1 : -1].replace("/", ",").replace(" ", ",")
        parts = [p for p in inner.split(",") if p]
        if len(parts) not in (3, 4):
            return None
        try:
            channels = [_channel(p) for p in parts[:3]]
            if len(parts) == 4 and _number(parts[3]) <= 0.0:
                return TRANSPARENT
        except ValueError:
            return None
        return (channels[0], channels[1], channels[2])
    return None


def _channel(text: str) -> int:
    if text.endswith("%"):
        return max(0, min(255, round(float(text[:-1]) * 2.55)))
    return max(0, min(255, round(float(text))))


def _number(text: str) -> float:
    text = text.strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100
    return float(text)


def _length_px(value: str) -> float | None:
    """A CSS length in pixels (em and rem as 16px, % as None); None when not a length."""
    value = value.strip()
    for unit, factor in (("px", 1.0), ("pt", 4 / 3), ("rem", 16.0), ("em", 16.0)):
        if value.endswith(unit):
            try:
                return float(value[: -len(unit)]) * factor
            except ValueError:
                return None
    try:
        return float(value)  # unitless: only 0 is valid CSS, browsers in quirks take px
    except ValueError:
        return None


def _first_color(background: str) -> tuple[int, int, int] | str | None:
    for token in background.replace(",", " ").split():
        color = parse_color(token)
        if color is not None:
            return color
    return None


@dataclass(frozen=True)
class Paint:
    """The colours in effect: text colour and background (None: unknown, e.g. an image)."""

    color: tuple[int, int, int] | None
    background: tuple[int, int, int] | None


ROOT_PAINT = Paint(color=(0, 0, 0), background=WHITE)


def paint(parent: Paint, decls: Mapping[str, str], attrs: Mapping[str, str]) -> Paint:
    """The colours of an element from its declarations and `color`/`bgcolor` attributes."""
    color = parent.color
    background = parent.background
    bg_image = decls.get("background-image", "")
    background_decl = decls.get("background", "")
    if "url(" in bg_image or "url(" in background_decl or attrs.get("background"):
        background = None  # text over an image: its colour tells nothing
    for raw in (attrs.get("bgcolor", ""), background_decl, decls.get("background-color", "")):
        found = _first_color(raw) if raw else None
        if isinstance(found, tuple):
            background = found
    for raw in (attrs.get("color", ""), decls.get("color", "")):
        found = parse_color(raw) if raw else None
        if isinstance(found, tuple):
            color = found
    return Paint(color=color, background=background)


def hiding(decls: Mapping[str, str]) -> str | None:
    """Why an element with these declarations is hidden from a reader, if it is."""
    display = decls.get("display", "")
    if display.split(" ")[0] == "none":
        return "display:none"
    if decls.get("visibility", "") in ("hidden", "collapse"):
        return "visibility:hidden"
    if decls.get("mso-hide", "") == "all":
        return "mso-hide:all"
    try:
        if "opacity" in decls and _number(decls["opacity"]) <= 0.05:
            return "opacity 0"
    except ValueError:
        pass
    size = _length_px(decls.get("font-size", "x"))
    if size is not None and size <= 1.0:
        return "zero font size"
    if parse_color(decls.get("color", "")) == TRANSPARENT:
        return "transparent text"
    if decls.get("overflow", "") in ("hidden", "clip"):
        for name in ("width", "height", "max-width", "max-height"):
            length = _length_px(decls.get(name, "x"))
            if length is not None and length <= 1.0:
                return "zero-size box"
    clip = decls.get("clip", "") + decls.get("clip-path", "")
    if "rect(0" in clip.replace(" ", "") or "inset(50%" in clip or "inset(100%" in clip:
        return "clipped"
    if decls.get("position", "") in ("absolute", "fixed"):
        for name in ("left", "top", "right"):
            length = _length_px(decls.get(name, "x"))
            if length is not None and length <= -500:
                return "off-screen position"
    indent = _length_px(decls.get("text-indent", "x"))
    if indent is not None and indent <= -500:
        return "off-screen text indent"
    transform = decls.get("transform", "").replace(" ", "")
    if "scale(0)" in transform or "scale(0," in transform:
        return "scaled to zero"
    return None


def camouflaged(painted: Paint) -> bool:
    """Whether text in these colours is the colour of its background (checked where the
    text is: a container's own colours say nothing of children that set theirs)."""
    if painted.color is None or painted.background is None:
        return False
    pairs = zip(painted.color, painted.background, strict=True)
    return max(abs(a - b) for a, b in pairs) <= _NEAR


def remote_urls(css: str) -> int:
    """How many `url(...)` references in `css` point at http(s) or protocol-relative URLs."""
    count = 0
    pos = 0
    lowered = css.lower()
    while True:
        start = lowered.find("url(", pos)
        if start < 0:
            return count
        target = lowered[start + 4 : start + 4 + 16].strip().lstrip("'\"").lstrip()
        if target.startswith(("http:", "https:", "//")):
            count += 1
        pos = start + 4


def _compound_key(selector: str) -> tuple[str, str] | None:
    """("tag"|"class"|"id", name) for a selector whose last compound is simple enough."""
    last = selector.replace(">", " ").replace("+", " ").replace("~", " ").split()
    if not last:
        return None
    compound = last[-1]
    if any(c in compound for c in ":[*()"):
        return None  # pseudo-classes, attribute selectors and the like: not followed
    if "#" in compound:
        name = compound.split("#", 1)[1].split(".", 1)[0]
        return ("id", name) if name else None
    if "." in compound:
        name = compound.split(".")[-1]
        return ("class", name) if name else None
    return ("tag", compound.lower())


class StyleSheet:
    """The declarations of a message's `<style>` rules, by tag, class and id."""

    def __init__(self) -> None:
        self._rules: dict[tuple[str, str], dict[str, str]] = {}
        self._chars = 0

    def add(self, css: str) -> None:
        room = MAX_SHEET_CHARS - self._chars
        if room <= 0:
            return
        css = _strip_comments(css[:room])
        self._chars += len(css)
        depth = 0
        pos = prelude_start = 0
        open_at = close_at = -2  # -2: not looked for yet, -1: none left
        while pos < len(css) and len(self._rules) < MAX_RULES:
            # each brace is found once: a search starts where the last one stopped
            if open_at == -2 or 0 <= open_at < pos:
                open_at = css.find("{", pos)
            if close_at == -2 or 0 <= close_at < pos:
                close_at = css.find("}", pos)
            if open_at < 0:
                return
            if 0 <= close_at < open_at:  # leaving a block
                depth = max(0, depth - 1)
                pos = prelude_start = close_at + 1
                continue
            prelude = css[prelude_start:open_at].strip()
            if depth == 0 and not prelude.startswith("@"):
                if close_at < 0:
                    return
                self._rule(prelude, css[open_at + 1 : close_at])
                pos = prelude_start = close_at + 1
            else:  # an at-rule block (@media...) or something inside one: skipped
                depth += 1
                pos = prelude_start = open_at + 1

    def _rule(self, prelude: str, body: str) -> None:
        decls = declarations(body)
        if not decls:
            return
        for selector in prelude.split(","):
            key = _compound_key(selector.strip())
            if key is not None and len(self._rules) < MAX_RULES:
                self._rules.setdefault(key, {}).update(decls)

    def for_element(self, tag: str, attrs: Mapping[str, str]) -> dict[str, str]:
        """The rule declarations that apply to an element (tag, then classes, then id)."""
        if not self._rules:
            return {}
        found: dict[str, str] = {}
        found.update(self._rules.get(("tag", tag), {}))
        for name in attrs.get("class", "").split()[:32]:
            found.update(self._rules.get(("class", name), {}))
        ident = attrs.get("id", "")
        if ident:
            found.update(self._rules.get(("id", ident), {}))
        return found
