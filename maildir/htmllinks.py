"""What a link says of itself: the scheme and host of its URL, and the domain its text names.

Used by `maildir.htmlsafe` to judge links (an active scheme, a remote image) and to find a
link whose text names another site than its target. Pure functions on strings: this module
must never do I/O and never raise on any input.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["MAX_LINK_TEXT", "link_host", "link_scheme", "same_site", "text_domain"]

MAX_LINK_TEXT = 300
"""Link texts longer than this are not read for a domain."""
_DOMAIN_TEXT = re.compile(
    r"(?:[a-z][a-z0-9+.-]{0,15}://)?((?:[\w-]{1,63}\.){1,10}[^\W\d_]{2,63})\.?"
    r"(?::[0-9]{1,5})?(?:[/?#]\S{0,250})?",
    re.IGNORECASE,
)
_FILE_ENDINGS = frozenset(
    "html htm php asp aspx jsp pdf doc docx xls xlsx ppt pptx txt csv jpg jpeg png gif zip "
    "exe msg eml ics vcf".split()
)


def link_scheme(url: str) -> str:
    """The scheme of a URL as a browser reads it, lower case: `//` for a scheme-relative URL,
    empty for none."""
    compact = "".join(url.split()).lower()  # browsers ignore whitespace inside schemes
    head, colon, _rest = compact.partition(":")
    if compact.startswith("//"):
        return "//"
    return head if colon and head.isascii() and head.isalnum() else ""


def link_host(url: str) -> str:
    """The host a URL points at, in IDNA form and without `www.`; empty if none."""
    try:
        host = urlsplit(url.strip()).hostname or ""
    except ValueError:
        return ""
    return _idna(host)


def _idna(host: str) -> str:
    host = host.strip(".").lower()
    try:
        host = host.encode("idna").decode("ascii")
    except (UnicodeError, ValueError):
        pass
    return host[4:] if host.startswith("www.") else host


def text_domain(text: str) -> str:
    """The domain a link's text names (`example.com`, `https://www.example.com/x`), as
    `link_host` gives it; empty when the text names none (a file name is not a domain)."""
    text = text.strip()
    if not text or len(text) > MAX_LINK_TEXT or "@" in text:
        return ""
    match = _DOMAIN_TEXT.fullmatch(text)
    if match is None:
        return ""
    domain = match.group(1)
    has_scheme = "://" in text[: match.start(1)]
    if not has_scheme and not domain.lower().startswith("www."):
        if domain.rsplit(".", 1)[-1].lower() in _FILE_ENDINGS:
            return ""
    return _idna(domain)


def same_site(a: str, b: str) -> bool:
    """Whether two hosts are one site: the same, or one a subdomain of the other."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)
