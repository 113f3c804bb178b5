"""Parsing of the MAIL FROM / RCPT TO arguments: path, address and ESMTP parameters.

Pure functions over strings: they raise SMTPReplyError with the reply that fits (501, 553,
555) and never touch the network or the store. What they accept is what RFC 5321 (and RFC
6531 with SMTPUTF8) calls a path, and nothing else: the edge carries every path it accepts
on exactly as received (`edge.delivery.client` sends it verbatim), so a path that could not go
on is refused here, at MAIL or RCPT, never accepted and then stuck. A good path parsed is kept (the last 1024
of each kind): an MX sees the same senders and recipients over and over, and parsing one
takes about 8 µs.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from edge.smtp import replies
from edge.smtp.replies import SMTPReplyError

_PATH = re.compile(
    r"^(?P<kw>FROM|TO):\s?<(?P<path>[^<>]*)>(?P<params>.*)$", re.IGNORECASE | re.DOTALL
)
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_UTF8_NON_ASCII = "\u00a0-\u2027\u202a-\ud7ff\ue000-\U0010ffff"
"""RFC 6531's UTF8-non-ascii, less the C1 control characters (U+0080 to U+009F), the line
and paragraph separators (U+2028, U+2029: a line break to many readers of a header) and
the surrogates (never valid UTF-8)."""
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_ATOM_UTF8 = re.compile(rf"[{_ATEXT}{_UTF8_NON_ASCII}]+(?:\.[{_ATEXT}{_UTF8_NON_ASCII}]+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8_NON_ASCII}]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
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


def _label_ok(label: str) -> bool:
    """An LDH label, or a U-label (RFC 6531) whose A-label is one."""
    if label.isascii():
        return _LABEL.fullmatch(label) is not None
    try:
        ace = label.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return _LABEL.fullmatch(ace) is not None


def _domain_ok(domain: str, *, utf8: bool) -> bool:
    """RFC 5321 Domain, with U-labels when `utf8`. No final dot: `user@example.net.` is no
    Mailbox, and the hosts the path goes on to refuse it (aiosmtpd answers 553), so a
    message taken with one could never be delivered."""
    if len(domain.encode()) > 255 or (not utf8 and not domain.isascii()):
        return False
    return all(_label_ok(label) for label in domain.split("."))


def _address_literal_ok(literal: str) -> bool:
    """RFC 5321 section 4.1.3: an IPv4 or IPv6 address literal (no general ones)."""
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            if "%" in inner:  # a zone index is no part of the syntax
                return False
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def validate_address(address: str, *, smtputf8: bool) -> str:
    """Check a Mailbox (RFC 5321 section 4.1.2; RFC 6531 when `smtputf8`): `local@domain`,
    the local part a dot-string or a quoted string, the domain a name or an address
    literal. Return it unchanged: it is carried on exactly as received."""
    if "@" not in address or len(address.encode()) > 254:
        raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad address {address!r}")
    if not address.isascii() and not smtputf8:
        raise SMTPReplyError(replies.S553_NON_ASCII, f"non-ASCII address {address!r}")
    local, _, domain = address.rpartition("@")
    if not local or len(local.encode()) > 64 or not domain:
        raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad address {address!r}")
    dot_atom, quoted = (_DOT_ATOM_UTF8, _QUOTED_UTF8) if smtputf8 else (_DOT_ATOM, _QUOTED)
    if not (dot_atom.fullmatch(local) or quoted.fullmatch(local)):
        raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad local part {local!r}")
    if domain.startswith("["):
        if not (domain.endswith("]") and _address_literal_ok(domain)):
            raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad address literal {domain!r}")
    elif not _domain_ok(domain, utf8=smtputf8):
        raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad domain {domain!r}")
    return address


def _strip_route(path: str) -> str:
    """The Mailbox of a path with an obsolete source route (`@a,@b:user@d`, RFC 5321
    section 4.1.2 A-d-l), which is ignored. Anything else starting with "@" is no path:
    `<@example.net>` has no local part (a Mailbox needs one; RFC 5321 section 4.1.2)."""
    route, colon, mailbox = path.partition(":")
    hops = route.split(",")
    if not colon or not all(h[:1] == "@" and _domain_ok(h[1:], utf8=True) for h in hops):
        raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"bad path {path!r}")
    if not mailbox:
        raise SMTPReplyError(replies.S501_BAD_ADDRESS, f"no mailbox in {path!r}")
    return mailbox


def parse_path(arg: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """Split `FROM:<a@b> SIZE=10` into the raw path and its parameters."""
    match = _PATH.match(arg)
    if match is None or match.group("kw").upper() != keyword:
        raise SMTPReplyError(replies.S501_SYNTAX, f"bad {keyword} argument {arg!r}")
    path = match.group("path")
    if path.startswith("@"):
        path = _strip_route(path)
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
