"""DKIM signing of outbound mail (edge.outbound.dkimsign): dkimpy, and the edge's own inbound
check over a local DNS zone, verify every signature, RSA and Ed25519, on awkward messages;
oversigning stops added headers; the key cache follows the store after its TTL; the
canonicalization matches dkimpy's."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.checks.dkim import verify_all
from edge.dns.resolver import DNSResolver
from edge.domains.scan import generate_dkim_keys
from edge.outbound.canon import crlf, relaxed_body, relaxed_field, split
from edge.outbound.dkimkeys import dkim_records
from edge.outbound.dkimsign import DkimSigner, DkimSignError
from edge.store import Store, open_store
from edge.store.access import AccessStore
from edge.store.keyring import StoreKeys

DOMAIN = "example.org"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(name="store")
def store_fixture(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'store.db'}", keys=StoreKeys.generate())
    yield opened
    opened.close()


@pytest.fixture(name="access")
def access_fixture(store: Store) -> AccessStore:
    access = AccessStore(store)
    for key in generate_dkim_keys("202612"):
        access.add_dkim_key(DOMAIN, key.selector, key.algorithm, key.private_pem, key.public_b64)
    return access


def dnsfunc_of(access: AccessStore) -> object:
    """dkimpy's key lookup answered from the keys in the store (what `dkim show` publishes)."""

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        host = name.decode("ascii").rstrip(".")
        selector, _, domain = host.partition("._domainkey.")
        for key in access.dkim_keys(domain):
            if key.selector == selector:
                return key.dns_value().encode("ascii")
        return None

    return txt


def verified(access: AccessStore, message: bytes) -> list[bool]:
    """The verdict of dkimpy on each DKIM-Signature of `message`, top to bottom."""
    count = len(re.findall(rb"(?im)^dkim-signature:", message.split(b"\n\n")[0]))
    checker = dkim.DKIM(message)
    out = []
    for i in range(count):
        try:
            out.append(bool(checker.verify(idx=i, dnsfunc=dnsfunc_of(access))))
        except dkim.ValidationError:  # a body hash mismatch is raised, not answered
            out.append(False)
    return out


MESSAGES = {
    "plain": b"From: Ann <ann@example.org>\r\nTo: bob@example.net\r\nSubject: hi\r\n"
    b"Date: Mon, 07 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\nhello\r\n",
    "folded": b"From: Ann\r\n <ann@example.org>\r\nTo: bob@example.net,\r\n\tcarl@example.net,"
    b"\r\n   dan@example.net\r\nSubject:   a  long\r\n\t subject   \r\nReferences: <a@x>\r\n"
    b" <b@x>\r\n\r\nbody\r\n",
    "duplicates": b"From: ann@example.org\r\nReceived: x\r\nReceived: y\r\nSubject: one\r\n"
    b"To: bob@example.net\r\nSubject: two\r\nCC: c@example.net\r\ncc: d@example.net\r\n\r\nb\r\n",
    "trailing blank lines": b"From: ann@example.org\r\nSubject: s\r\n\r\nline  \t\r\n\r\n\r\n\r\n",
    "8-bit UTF-8": "From: Änne <anne@example.org>\r\nTo: zoë@example.net\r\nSubject: grüße\r\n"
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Schöne Grüße, 你好 \t  ✓\r\n".encode(),
    "LF only": b"From: ann@example.org\nTo: bob@example.net,\n  carl@example.net\nSubject: lf\n\n"
    b"one\n\ntwo  \n\n\n",
    "no body": b"From: ann@example.org\r\nSubject: empty\r\n\r\n",
    "no separator": b"From: ann@example.org\r\nSubject: headers only\r\n",
    "body without final line end": b"From: ann@example.org\r\n\r\nlast line  ",
}


@pytest.mark.parametrize("name", list(MESSAGES))
def test_both_signatures_verify(access: AccessStore, name: str) -> None:
    message = MESSAGES[name]
    signer = DkimSigner(access)
    header = signer.sign(message, DOMAIN)
    assert header.endswith(b"\r\n") and b"\n" not in header.replace(b"\r\n", b"")
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    signatures = re.findall(rb"a=([a-z0-9-]+);", header)
    assert signatures == [b"rsa-sha256", b"ed25519-sha256"]
    # As it goes over SMTP: CRLF line ends, and a last line ended.
    sent = crlf(message) if message.endswith(b"\n") or not message else crlf(message) + b"\r\n"
    assert verified(access, header + sent) == [True, True]
    if sent == crlf(message):  # as given, too
        assert verified(access, header + message) == [True, True]


def test_the_edges_own_check_passes_them_over_dns(access: AccessStore, dns_server: Any) -> None:
    """Published in a DNS zone (the RSA record as two strings), the inbound DKIM check of the
    edge, through its resolver, passes both signatures."""
    for record in dkim_records(DOMAIN, access.dkim_keys(DOMAIN)):
        dns_server.zone.set(record.host, "TXT", [record.value])
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=2.0)
    message = MESSAGES["8-bit UTF-8"]
    signed = DkimSigner(access).sign(message, DOMAIN) + message
    results = verify_all(resolver, signed, from_count=1)
    assert [(r.result, r.domain, r.algorithm) for r in results] == [
        ("pass", DOMAIN, "rsa-sha256"),
        ("pass", DOMAIN, "ed25519-sha256"),
    ]


def test_signatures_break_when_the_body_changes(access: AccessStore) -> None:
    message = MESSAGES["plain"]
    header = DkimSigner(access).sign(message, DOMAIN)
    assert verified(access, header + message.replace(b"hello", b"hellO")) == [False, False]


@pytest.mark.parametrize(
    "added",
    [
        b"From: mallory@evil.test\r\n",
        b"Subject: urgent\r\n",
        b"Cc: mallory@evil.test\r\n",
        b"Reply-To: mallory@evil.test\r\n",
        b"Message-ID: <2@example.org>\r\n",
    ],
)
def test_oversigning_stops_added_headers(access: AccessStore, added: bytes) -> None:
    message = MESSAGES["plain"]
    header = DkimSigner(access).sign(message, DOMAIN)
    assert verified(access, header + added + message) == [False, False]
    assert verified(access, header + message + b"") == [True, True]


def test_unsigned_headers_may_be_added(access: AccessStore) -> None:
    message = MESSAGES["plain"]
    header = DkimSigner(access).sign(message, DOMAIN)
    assert verified(access, b"Received: from a by b\r\n" + header + message) == [True, True]


def test_signed_header_list(access: AccessStore) -> None:
    header = DkimSigner(access).sign(MESSAGES["duplicates"], DOMAIN)
    h = re.search(rb"h=([^;]*);", header)
    assert h is not None
    names = re.sub(rb"\s", b"", h.group(1)).split(b":")
    assert names.count(b"subject") == 3 and names.count(b"cc") == 3
    assert names.count(b"from") == 2 and names.count(b"to") == 2
    assert names.count(b"date") == 1 and names.count(b"reply-to") == 1  # absent, protected
    assert b"received" not in names and b"message-id" not in names  # absent, not protected


def test_no_key_gives_nothing(access: AccessStore) -> None:
    signer = DkimSigner(access)
    assert signer.sign(MESSAGES["plain"], "unsigned.example") == b""


def test_domain_is_normalized(access: AccessStore) -> None:
    header = DkimSigner(access).sign(MESSAGES["plain"], "Example.ORG.")
    assert header.count(b"d=example.org;") == 2
    with pytest.raises(ValueError):
        DkimSigner(access).sign(MESSAGES["plain"], "not a domain")


def test_one_algorithm_only(store: Store) -> None:
    access = AccessStore(store)
    ed = next(k for k in generate_dkim_keys("1") if k.algorithm == "ed25519")
    access.add_dkim_key("ed.example", ed.selector, ed.algorithm, ed.private_pem, ed.public_b64)
    message = MESSAGES["plain"]
    header = DkimSigner(access).sign(message, "ed.example")
    assert header.count(b"DKIM-Signature:") == 1 and b"a=ed25519-sha256;" in header
    assert verified(access, header + message) == [True]


def test_new_keys_take_effect_after_the_ttl(store: Store) -> None:
    access = AccessStore(store)
    clock = Clock()
    signer = DkimSigner(access, ttl=30.0, clock=clock)
    message = MESSAGES["plain"]
    assert signer.sign(message, "later.example") == b""
    for key in generate_dkim_keys("2"):
        access.add_dkim_key(
            "later.example", key.selector, key.algorithm, key.private_pem, key.public_b64
        )
    assert signer.sign(message, "later.example") == b""  # the absence is cached
    clock.t += 31
    header = signer.sign(message, "later.example")
    assert verified(access, header + message) == [True, True]
    signer.forget()
    assert verified(access, signer.sign(message, "later.example") + message) == [True, True]


def test_unusable_key_is_an_error(store: Store) -> None:
    access = AccessStore(store)
    access.add_dkim_key("broken.example", "s1", "rsa", "not a key", "AAAA")
    with pytest.raises(DkimSignError, match="'s1' of broken.example cannot be loaded"):
        DkimSigner(access).sign(MESSAGES["plain"], "broken.example")
    access.add_dkim_key("short.example", "s1", "ed25519", "c2hvcnQ=", "AAAA")
    with pytest.raises(DkimSignError, match="cannot be loaded"):
        DkimSigner(access).sign(MESSAGES["plain"], "short.example")
    good = next(k for k in generate_dkim_keys("3") if k.algorithm == "ed25519")
    access.add_dkim_key("selector.example", "s 1", "ed25519", good.private_pem, good.public_b64)
    with pytest.raises(DkimSignError, match="the selector is not a DNS name"):
        DkimSigner(access).sign(MESSAGES["plain"], "selector.example")


def test_threads_share_one_signer(access: AccessStore) -> None:
    signer = DkimSigner(access, ttl=0.0)  # every call reads the store
    results: list[bytes] = []
    errors: list[BaseException] = []
    messages = [MESSAGES["plain"].replace(b"hello", b"hello %d" % i) for i in range(24)]

    def work(chunk: list[bytes]) -> None:
        try:
            for message in chunk:
                results.append(signer.sign(message, DOMAIN) + message)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(messages[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == len(messages)
    assert all(verified(access, signed) == [True, True] for signed in results)


# -- canonicalization against dkimpy's ----------------------------------------------------------

BODIES = [
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b"a\r\n",
    b"a  \t b \t\r\n\r\n",
    b" leading\r\n\tx\r\n \r\n",
    b"line\r\n  \r\n\r\n",
    "8-bit \xe9 ✓  \r\n".encode(),
    b"lone\rcr\r\n\r\n",
    b"ends with cr\r\r\n\r\n",
    b"a" + b" " * 1000 + b"\t" * 7 + b" b \t \r\n" + b"\t\r\n" * 3,
]


@pytest.mark.parametrize("body", BODIES)
def test_relaxed_body_matches_dkimpy(body: bytes) -> None:
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


@settings(max_examples=400, deadline=None)
@given(st.binary().map(lambda b: bytes(b" \t\r\nab\xe9"[x % 7] for x in b)))
def test_relaxed_body_matches_dkimpy_on_any_bytes(raw: bytes) -> None:
    body = crlf(raw)
    if not body.endswith(b"\r\n"):
        # A last line is signed as SMTP sends it, ended (dkimpy leaves such a line as it is).
        assert relaxed_body(body) == relaxed_body(body + b"\r\n")
        body += b"\r\n"
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


@settings(max_examples=200, deadline=None)
@given(st.binary().map(lambda b: bytes(b" \tab:"[x % 5] for x in b)))
def test_relaxed_field_matches_dkimpy_on_any_value(value: bytes) -> None:
    folded = value.replace(b"b", b"\r\n ")
    [(name, canonical)] = Relaxed.canonicalize_headers([[b"X-Any ", folded]])
    assert relaxed_field(b"X-Any ", folded) == name + b":" + canonical


def test_relaxed_fields_match_dkimpy() -> None:
    fields, body = split(crlf(b"Subject:  a \t b\n\t c  \nX-Odd :\tv\nTo:x\n  \n y\n\nbody line\n"))
    assert body == b"body line\r\n"
    assert [n for n, _ in fields] == [b"subject", b"x-odd", b"to"]
    ours = [relaxed_field(n, v) for n, v in fields]
    theirs = Relaxed.canonicalize_headers([[n, v] for n, v in fields])
    assert ours == [n + b":" + v for n, v in theirs]


def test_crlf() -> None:
    assert crlf(b"a\nb\r\nc\rd\n") == b"a\r\nb\r\nc\rd\r\n"
    same = b"a\r\nb\r\n"
    assert crlf(same) is same
