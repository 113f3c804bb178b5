"""DKIM's relaxed canonicalization (RFC 6376 §3.4.2 and §3.4.4), on bytes, in one place.

A message is taken as the bytes that will go over SMTP: every line end becomes CRLF first
(a message handed over with bare LFs is sent with CRLFs, so that is the form to sign), and
nothing is decoded, so 8-bit content is hashed exactly as it travels. ``split`` cuts a
message into its header fields and its body; ``relaxed_field`` and ``relaxed_body`` give
their canonical forms. Pure functions: this module must never do I/O, hold state, or
decode a message to ``str``.
"""

from __future__ import annotations

import re

__all__ = ["crlf", "relaxed_body", "relaxed_field", "split"]

_BARE_LF = re.compile(rb"(?<!\r)\n")


def crlf(data: bytes) -> bytes:
    """`data` with every bare LF turned into CRLF (a CR alone is left as it is)."""
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return _BARE_LF.sub(b"\r\n", data)


def _squeeze(data: bytes) -> bytes:
    """Each run of WSP (spaces and tabs) in `data` made one space. Done with `bytes.replace`
    (each pass halves every run of spaces), which is several times faster than a regular
    expression on text whose spaces are mostly single already."""
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def split(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The header fields of a CRLF message, top to bottom, as (lower-case name, value with
    its folding CRLFs), and the body (what follows the first empty line; b"" without one).
    A line of the header section that is neither a field nor its continuation is skipped:
    it cannot be signed and cannot be confused with a field that is."""
    if data.startswith(b"\r\n"):
        return [], data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        head, body = data, b""
    else:
        head, body = data[:end], data[end + 4 :]
    fields: list[tuple[bytes, bytes]] = []
    name: bytes | None = None
    value = b""
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if name is not None:
                value += b"\r\n" + line
            continue
        if name is not None:
            fields.append((name, value))
        colon = line.find(b":")
        if colon < 0:
            name = None
            continue
        name, value = line[:colon].rstrip(b" \t").lower(), line[colon + 1 :]
    if name is not None:
        fields.append((name, value))
    return fields, body


def relaxed_field(name: bytes, value: bytes) -> bytes:
    """One header field in relaxed form, CRLF-terminated: name in lower case, the value
    unfolded, each run of WSP one space, none at either end (RFC 6376 §3.4.2)."""
    unfolded = _squeeze(value.replace(b"\r\n", b"")).strip(b" ")
    return name.strip(b" \t").lower() + b":" + unfolded + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """A CRLF body in relaxed form (RFC 6376 §3.4.4): each run of WSP one space, none at the
    end of a line, no empty lines at the end, and a non-empty body ending in CRLF. A last
    line without its CRLF is taken as SMTP sends it, with one."""
    body = _squeeze(body).replace(b" \r\n", b"\r\n")
    if body.endswith(b" "):  # a last line without its CRLF is signed as SMTP sends it
        body = body[:-1]
    core = body.rstrip(b"\r\n")
    tail = body[len(core) :]
    # The tail is CRs and CRLFs only (every LF follows a CR): keep it up to its last lone CR.
    if tail.endswith(b"\r"):
        core = body
    else:
        lone = tail.rfind(b"\r\r")
        if lone >= 0:
            core += tail[: lone + 1]
    return core + b"\r\n" if core else b""
