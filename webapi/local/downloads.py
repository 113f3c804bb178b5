"""Serving attachments to a browser-capable client: a safe Content-Type and Content-Disposition.

An attachment is served with its declared type only when that type cannot run in a browser;
HTML, SVG, XML, scripts and anything malformed become `application/octet-stream`. File names
(already sanitised by `maildir.message`) go into an RFC 6266 header with an ASCII fallback.
This module must never echo a header value it has not rebuilt from safe characters.
"""

from __future__ import annotations

import re
from urllib.parse import quote

__all__ = ["content_disposition", "served_content_type"]

_ACTIVE_TYPES = frozenset(
    "text/html application/xhtml+xml image/svg+xml application/javascript "
    "application/x-javascript application/ecmascript text/javascript text/ecmascript text/xml "
    "application/xml text/xsl application/x-shockwave-flash text/cache-manifest "
    "application/wasm".split()
)
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")


def served_content_type(content_type: str) -> bytes:
    """The Content-Type to serve an attachment with; active or odd types become octet-stream."""
    ctype = content_type.strip().lower()
    active = ctype in _ACTIVE_TYPES or any(w in ctype for w in ("html", "xml", "script"))
    if not _MIME_TYPE.fullmatch(ctype) or active or ctype.startswith("multipart/"):
        return b"application/octet-stream"
    return ctype.encode("ascii")


def content_disposition(disposition: str, filename: str) -> bytes:
    """An RFC 6266 Content-Disposition: ASCII fallback plus `filename*` when needed."""
    fallback = "".join(
        ch if 0x20 <= ord(ch) < 0x7F and ch not in '"\\%' else "_" for ch in filename
    )
    value = f'{disposition}; filename="{fallback}"'
    if fallback != filename:
        value += "; filename*=UTF-8''" + quote(filename, safe="!#$&+-.^_`|~")
    return value.encode("ascii")
