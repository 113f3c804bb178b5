"""The author addresses of an outbound message: its From field's and its Sender field's.

The relay lets a device send only as its account's addresses, and the From field is what
DMARC aligns with and what the recipient sees, so it is read strictly: from the header
section only (as bytes, the same fields the DKIM signer sees, ``edge.outbound.canon``),
exactly one From field, at most one Sender field; each value decoded as UTF-8 and parsed
with the standard library's RFC 5322 address parser (``email.headerregistry``); a value
the parser had to guess about (any defect but a non-ASCII local part, which SMTPUTF8 mail
may have) is refused rather than read one way here and another way by a mail reader. A
From must hold at least one address, a Sender exactly one; every address needs a local part
and a domain. ``AuthorError`` says what is wrong.

Pure functions: this module must never do I/O or decide who owns an address.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import errors
from email.headerregistry import AddressHeader, HeaderRegistry

from edge.outbound.canon import crlf, split

__all__ = ["AuthorError", "Authors", "TooManyFrom", "authors"]

_REGISTRY = HeaderRegistry()
_TOLERATED = (errors.NonASCIILocalPartDefect,)
"""Defects that do not make an address ambiguous (SMTPUTF8 local parts)."""


class AuthorError(ValueError):
    """The From or Sender field is missing, repeated or not a clear list of addresses."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} header: {reason}")
        self.field = field


class TooManyFrom(AuthorError):
    """More than one From field."""


@dataclass(frozen=True)
class Authors:
    """The addresses (addr-specs, as written) of a message's From field, and of its Sender
    field when it has one."""

    from_: tuple[str, ...]
    sender: str | None


def _head(data: bytes) -> bytes:
    """The header section of `data` (without the empty line that ends it)."""
    end = data.find(b"\r\n\r\n")
    if end < 0 and data.count(b"\n") != data.count(b"\r\n"):
        data = crlf(data)
        end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def _addresses(field: str, raw: bytes) -> list[str]:
    """The addr-specs of one address-list field value (folded, as bytes)."""
    try:
        text = raw.replace(b"\r\n", b"").decode("utf-8")
    except UnicodeDecodeError:
        raise AuthorError(field, "not UTF-8") from None
    try:
        header = _REGISTRY(field.lower(), text)
    except Exception as exc:  # the stdlib parser has raised more than ValueError on bad input
        raise AuthorError(field, f"cannot be parsed ({type(exc).__name__})") from None
    assert isinstance(header, AddressHeader)
    defects = [d for d in header.defects if not isinstance(d, _TOLERATED)]
    if defects:
        raise AuthorError(field, f"cannot be parsed unambiguously ({defects[0]})")
    found: list[str] = []
    for address in header.addresses:
        if not address.username or not address.domain:
            raise AuthorError(field, f"{address.addr_spec!r} is not a full address")
        found.append(address.addr_spec)
    if not found:
        raise AuthorError(field, "no address")
    return found


def authors(data: bytes) -> Authors:
    """The From (and Sender) addresses of the message `data`; AuthorError when there is not
    exactly one From field, more than one Sender field, or either is not a clear list of
    full addresses (a Sender of exactly one)."""
    fields, _ = split(_head(data))
    froms = [value for name, value in fields if name == b"from"]
    senders = [value for name, value in fields if name == b"sender"]
    if not froms:
        raise AuthorError("From", "missing")
    if len(froms) > 1:
        raise TooManyFrom("From", f"{len(froms)} fields")
    if len(senders) > 1:
        raise AuthorError("Sender", f"{len(senders)} fields")
    sender: str | None = None
    if senders:
        found = _addresses("Sender", senders[0])
        if len(found) != 1:
            raise AuthorError("Sender", f"{len(found)} addresses")
        sender = found[0]
    return Authors(tuple(_addresses("From", froms[0])), sender)
