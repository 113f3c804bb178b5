"""The From and Sender fields of outbound mail as the relay reads them
(`edge.outbound.authors`): exactly one From, at most one Sender, and nothing the parser had to
guess about."""

from __future__ import annotations

import pytest

from edge.outbound.authors import AuthorError, Authors, TooManyFrom, authors

BODY = b"\r\nFrom: body@evil.test\r\n"


def _message(*fields: bytes) -> bytes:
    return b"".join(f + b"\r\n" for f in fields) + b"Subject: s\r\n" + BODY


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ((b"From: Alice <alice@home.test>",), Authors(("alice@home.test",), None)),
        ((b"fROM :alice@home.test (the laptop)",), Authors(("alice@home.test",), None)),
        (
            (b"From: Alice <alice@home.test>,\r\n\tBob <bob@work.test>", b"Sender: a@home.test"),
            Authors(("alice@home.test", "bob@work.test"), "a@home.test"),
        ),
        # A display name that looks like an address is not the address.
        ((b'From: "carol@other.test" <alice@home.test>',), Authors(("alice@home.test",), None)),
        ((b"From: =?utf-8?q?carol=40other.test?= <a@home.test>",), Authors(("a@home.test",), None)),
        # The quoted local part stays quoted: its domain is evil.test.
        ((b'From: "alice@home.test"@evil.test',), Authors(('"alice@home.test"@evil.test',), None)),
        ("From: Jos\u00e9 <jos\u00e9@home.test>".encode(), Authors(("jos\u00e9@home.test",), None)),
    ],
)
def test_the_author_addresses(fields: tuple[bytes, ...] | bytes, expected: Authors) -> None:
    if isinstance(fields, bytes):
        fields = (fields,)
    assert authors(_message(*fields)) == expected


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ((), "From"),  # no From at all (the one in the body does not count)
        ((b"From:",), "From"),
        ((b"From: undisclosed-recipients:;",), "From"),
        ((b"From: alice",), "From"),
        ((b"From: alice@home.test, bob",), "From"),
        ((b"From: alice@home.test <carol@other.test>",), "From"),
        ((b"From: alice@home.test carol@other.test",), "From"),
        ((b"From: alice@home.test;carol@other.test",), "From"),
        ((b"From: Alice <alice@home.test",), "From"),
        ((b"From: <@other.test:alice@home.test>",), "From"),
        ((b"From: =?utf-8?q?alice?=@home.test",), "From"),
        ((b"From: a@home.test\x00@other.test",), "From"),
        ((b"From: Ren\xe9 <rene@home.test>",), "From"),  # not UTF-8
        ((b"From: a@home.test", b"Sender: a@home.test, b@home.test"), "Sender"),
        ((b"From: a@home.test", b"Sender: a@home.test", b"Sender: b@home.test"), "Sender"),
        ((b"From: a@home.test", b"Sender: nobody"), "Sender"),
    ],
)
def test_a_missing_or_unclear_author_field_is_an_error(
    fields: tuple[bytes, ...], field: str
) -> None:
    with pytest.raises(AuthorError) as caught:
        authors(_message(*fields))
    assert caught.value.field == field and not isinstance(caught.value, TooManyFrom)


def test_two_from_fields_are_an_error_of_their_own() -> None:
    for second in (b"From: alice@home.test", b"from : carol@other.test"):
        with pytest.raises(TooManyFrom):
            authors(_message(b"From: alice@home.test", b"To: x@far.test", second))


def test_only_the_header_section_is_read() -> None:
    assert authors(b"From: a@home.test\r\n\r\n") == Authors(("a@home.test",), None)
    assert authors(b"From: a@home.test\r\n") == Authors(("a@home.test",), None)
    assert authors(b"From: a@home.test\n\nFrom: b@evil.test\n").from_ == ("a@home.test",)
    with pytest.raises(AuthorError):
        authors(b"\r\nFrom: a@home.test\r\n")  # an empty header section
