"""Trace header fields made from what a peer sent: Received, Return-Path, Delivered-To.

The MX writes `Received:` (RFC 5321 §4.4) from the client's EHLO argument, its address, the
TLS details (`tls_description`) and the recipient; the final delivery (the connector) writes
`Return-Path:` and `Delivered-To:` from the envelope. `helo_ok` is the check of the EHLO/HELO
argument. Every value that came from a peer goes through `header_text`, so that whatever got
past the parsers, nothing here ever writes a CR, LF, NUL or other control character into a
header: no peer can end a field early or start one of its own. Nothing here does I/O.
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import re
import unicodedata
from typing import Any

_HELO_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")
"""A host name, leniently: letters, digits, hyphens and underscores in labels of 1 to 63
(real clients send underscores, leading or trailing hyphens and single-label names)."""
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
"""RFC 5321 §4.1.3 General-address-literal: Standardized-tag ":" 1*dcontent."""


def helo_ok(arg: str) -> bool:
    """Whether `arg` may stand as the EHLO/HELO argument (RFC 5321 §4.1.1.1).

    A domain (leniently, see `_HELO_NAME`) or an address literal (`[192.0.2.1]`,
    `[IPv6:2001:db8::1]`, a general literal), or a bare IP address as some clients send.
    Never anything with a space, a control character or an octet beyond ASCII.
    """
    if not 0 < len(arg) <= 255 or not arg.isascii() or not arg.isprintable() or " " in arg:
        return False
    if _HELO_NAME.fullmatch(arg):
        return True
    if arg.startswith("[") and arg.endswith("]"):
        inner = arg[1:-1]
        if inner[:5].lower() == "ipv6:":
            return _is_ip(inner[5:], 6)
        return _is_ip(inner, 4) or (
            _GENERAL_LITERAL.fullmatch(inner) is not None and inner[:5].lower() != "ipv6:"
        )
    return _is_ip(arg, 6)


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def header_text(value: str) -> str:
    """`value` fit to stand in a header field: every control character (CR, LF, NUL, tab,
    DEL, C1) and every line or paragraph separator becomes "?"."""
    if value.isascii() and value.isprintable():
        return value
    return "".join(
        "?" if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c == "\t" else c for c in value
    )


@functools.lru_cache(maxsize=4)
def _date(seconds: int) -> str:
    """The RFC 5322 date of a second (most messages share theirs with the one before)."""
    return email.utils.formatdate(seconds, localtime=True)


def received_header(
    *,
    helo: str | None,
    peer_host: str,
    hostname: str,
    protocol: str,
    qid: str,
    tls: str | None,
    recipient: str | None,
    now: float,
) -> bytes:
    """The trace header of RFC 5321 §4.4, with the protocol of RFC 3848 and the TLS details.

    `recipient` is named in a `for` clause (only when the message has exactly one)."""
    host = header_text(peer_host)
    literal = f"IPv6:{host}" if ":" in host else host
    lines = [
        f"Received: from {header_text(helo or 'unknown')} ([{literal}])",
        f"\tby {header_text(hostname)} (tailpost) with {protocol} id {header_text(qid)}",
    ]
    if tls:
        lines.append(f"\t(using {header_text(tls)})")
    if recipient is not None:
        lines.append(f"\tfor <{header_text(recipient)}>")
    lines[-1] += f"; {_date(int(now))}"
    return "\r\n".join(lines).encode("utf-8", "replace") + b"\r\n"


def return_path(sender: str) -> bytes:
    """`Return-Path: <sender>` (`<>` for the null sender), RFC 5321 §4.4."""
    return f"Return-Path: <{header_text(sender)}>\r\n".encode("utf-8", "replace")


def delivered_to(recipient: str) -> bytes:
    """`Delivered-To: recipient`: the address this copy was delivered for."""
    return f"Delivered-To: {header_text(recipient)}\r\n".encode("utf-8", "replace")


def tls_description(transport: Any) -> str | None:
    """The TLS details of a session for its `Received:` field: version and cipher."""
    handle: Any = getattr(transport, "getHandle", lambda: None)()
    try:
        version = handle.get_protocol_version_name()
        cipher = handle.get_cipher_name()
        bits = handle.get_cipher_bits()
    except Exception:
        return "TLS"
    return f"{version} with cipher {cipher} ({bits}/{bits} bits)"
