"""Parsing of the MAIL FROM / RCPT TO arguments: path, address and ESMTP parameters.

Pure functions over strings: they raise SMTPReplyError with the reply that fits (501, 553,
555) and never touch the network or the store. A good path parsed is kept (the last 1024
of each kind): an MX sees the same senders and recipients over and over, and parsing one
takes about 8 µs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from edge.smtp import replies
from edge.smtp.replies import SMTPReplyError

_PATH = re.compile(
    r"^(?P<kw>FROM|TO):\s?<(?P<path>[^<>]*)>(?P<params>.*)$", re.IGNORECASE | re.DOTALL
)
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
_ADDR_LITERAL = re.compile(r"^\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]$")
_PARAM = re.compile(r"^(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?$")


@dataclass(frozen=True)
class Path:
    """A parsed reverse- or forward-path; `address` is "" for the null sender."""

    address: str
    params: Mapping[str, str | None] = field(default_factory=dict)
    """Read-only once parsed: parsed paths are shared."""

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


def _check_utf8_label(label: str) -> bool:
    try:
        label.encode("idna")
    except UnicodeError:
        return False
    return True


def validate_address(address: str, *, smtputf8: bool) -> str:
    """Check `local@domain` (RFC 5321 §4.1.2, RFC 6531 when `smtputf8`); return it unchanged."""
    if len(address) > 254 or "@" not in address:
        raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad address {address!r}")
    if not address.isascii() and not smtputf8:
        raise SMTPReplyError(replies.S553_NON_ASCII, f"non-ASCII address {address!r}")
    local, _, domain = address.rpartition("@")
    if not local or len(local.encode()) > 64 or not domain:
        raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad address {address!r}")
    ascii_local = local.isascii()
    if ascii_local and not (_DOT_ATOM.match(local) or _QUOTED.match(local)):
        raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad local part {local!r}")
    if not ascii_local and any(c in local for c in ' "<>()[]\\,;:@\x00\r\n'):
        raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad local part {local!r}")
    if _ADDR_LITERAL.match(domain):
        return address
    if domain.isascii():
        if not _DOMAIN.match(domain):
            raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad domain {domain!r}")
    elif not all(_check_utf8_label(part) for part in domain.split(".")):
        raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad domain {domain!r}")
    return address


def parse_path(arg: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """Split `FROM:<a@b> SIZE=10` into the raw path and its parameters."""
    match = _PATH.match(arg)
    if match is None or match.group("kw").upper() != keyword:
        raise SMTPReplyError(replies.S501_SYNTAX, f"bad {keyword} argument {arg!r}")
    path = match.group("path")
    if path.startswith("@"):
        # An obsolete source route (@a,@b:user@d): only the mailbox counts.
        path = path.partition(":")[2]
    params: dict[str, str | None] = {}
    for token in match.group("params").split():
        pm = _PARAM.match(token)
        if pm is None:
            raise SMTPReplyError(replies.S501_SYNTAX, f"bad parameter {token!r}")
        params[pm.group("key").upper()] = pm.group("value")
    return path, params


@functools.lru_cache(maxsize=1024)
def parse_mail_from(arg: str, *, max_size: int) -> Path:
    path, params = parse_path(arg, "FROM")
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit():
                raise SMTPReplyError(replies.S501_SYNTAX, "bad SIZE")
            if int(value) > max_size:
                raise SMTPReplyError(replies.S552_TOO_BIG, f"declared SIZE {value}")
        elif key == "BODY":
            if (value or "").upper() not in ("7BIT", "8BITMIME"):
                raise SMTPReplyError(replies.S501_SYNTAX, f"bad BODY {value!r}")
        elif key == "SMTPUTF8":
            if value is not None:
                raise SMTPReplyError(replies.S501_SYNTAX, "SMTPUTF8 takes no value")
        else:
            raise SMTPReplyError(replies.S555_PARAM, f"unsupported MAIL parameter {key}")
    if path == "":
        return Path("", MappingProxyType(params))
    return Path(validate_address(path, smtputf8="SMTPUTF8" in params), MappingProxyType(params))


@functools.lru_cache(maxsize=1024)
def parse_rcpt_to(arg: str, *, smtputf8: bool) -> Path:
    path, params = parse_path(arg, "TO")
    if params:
        raise SMTPReplyError(replies.S555_PARAM, f"unsupported RCPT parameters {sorted(params)}")
    if path.lower() == "postmaster":
        return Path("postmaster", _NO_PARAMS)
    return Path(validate_address(path, smtputf8=smtputf8), _NO_PARAMS)


_NO_PARAMS: Mapping[str, str | None] = MappingProxyType({})
