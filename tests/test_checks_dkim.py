"""DKIM and ARC verification through tailpost's resolver against a local DNS server."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from edge.checks.arc import ARCSealer, dns_record, verify_chain
from edge.checks.dkim import verify_all
from edge.dns.resolver import DNSResolver
from tests.dnsserver import HANG

# RFC 8463 Appendix A: the Ed25519 key and the signed example message.
RFC8463_PUBLIC = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC8463_MESSAGE = "\r\n".join(
    [
        "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;",
        " d=football.example.com; i=@football.example.com;",
        " q=dns/txt; s=brisbane; t=1528637909; h=from : to :",
        " subject : date : message-id : from : subject : date;",
        " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
        " b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus",
        " Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==",
        "From: Joe SixPack <joe@football.example.com>",
        "To: Suzie Q <suzie@shopping.example.net>",
        "Subject: Is dinner ready?",
        "Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)",
        "Message-ID: <20030712040037.46341.5F8J@football.example.com>",
        "",
        "Hi.",
        "",
        "We lost the game.  Are you hungry yet?",
        "",
        "Joe.",
        "",
    ]
).encode()

MESSAGE = (
    b"From: Alice <alice@signed.test>\r\n"
    b"To: bob@inbound.test\r\n"
    b"Subject: signed\r\n"
    b"Date: Fri, 20 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@signed.test>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


def rsa_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return pem, dns_record(pem)


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    return rsa_key()


@pytest.fixture
def env(dns_server: Any, key: tuple[bytes, str]) -> Iterator[tuple[Any, DNSResolver]]:
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=1.0)
    dns_server.zone.set("sel._domainkey.signed.test", "TXT", [key[1]])
    dns_server.zone.set(
        "brisbane._domainkey.football.example.com",
        "TXT",
        [f"v=DKIM1; k=ed25519; p={RFC8463_PUBLIC}"],
    )
    yield dns_server.zone, resolver


def sign(message: bytes, pem: bytes, domain: bytes = b"signed.test") -> bytes:
    return (
        dkim.sign(message, b"sel", domain, pem, include_headers=[b"from", b"to", b"subject"])
        + message
    )


def test_rsa_2048_signature_passes(env: tuple[Any, DNSResolver], key: tuple[bytes, str]) -> None:
    _z, resolver = env
    [result] = verify_all(resolver, sign(MESSAGE, key[0]), from_count=1)
    assert (result.result, result.domain, result.selector) == ("pass", "signed.test", "sel")
    assert len(result.b) >= 8 and result.algorithm == "rsa-sha256"


def test_body_changed_after_signing_fails(
    env: tuple[Any, DNSResolver], key: tuple[bytes, str]
) -> None:
    _z, resolver = env
    tampered = sign(MESSAGE, key[0]).replace(b"Hello Bob.", b"Hello Bob!")
    [result] = verify_all(resolver, tampered, from_count=1)
    assert result.result == "fail"
    assert "body hash" in result.reason


def test_two_from_headers_fail(env: tuple[Any, DNSResolver], key: tuple[bytes, str]) -> None:
    _z, resolver = env
    signed = sign(MESSAGE, key[0])
    doubled = signed.replace(b"To:", b"From: mallory@evil.test\r\nTo:", 1)
    [result] = verify_all(resolver, doubled, from_count=2)
    assert result.result == "fail"
    # Also when only dkimpy sees it: the extra From is part of the signed header set.
    [again] = verify_all(resolver, doubled, from_count=1)
    assert again.result == "fail"


def test_ed25519_rfc8463_example_passes(env: tuple[Any, DNSResolver]) -> None:
    _z, resolver = env
    [result] = verify_all(resolver, RFC8463_MESSAGE, from_count=1)
    assert (result.result, result.domain, result.selector) == (
        "pass",
        "football.example.com",
        "brisbane",
    )
    assert result.algorithm == "ed25519-sha256"
    assert result.b == "/gCrinpcQOoI"


def test_every_signature_gets_a_result(
    env: tuple[Any, DNSResolver], key: tuple[bytes, str]
) -> None:
    _z, resolver = env
    other_pem, _ = rsa_key()  # its key is not published: that signature fails
    twice = dkim.sign(sign(MESSAGE, key[0]), b"sel", b"other.test", other_pem) + sign(
        MESSAGE, key[0]
    )
    results = verify_all(resolver, twice, from_count=1)
    assert [(r.domain, r.result) for r in results] == [
        ("other.test", "fail"),
        ("signed.test", "pass"),
    ]


def test_unsigned_message_has_no_results(env: tuple[Any, DNSResolver]) -> None:
    assert verify_all(env[1], MESSAGE, from_count=1) == []


def test_key_lookup_timeout_is_temperror(
    env: tuple[Any, DNSResolver], key: tuple[bytes, str]
) -> None:
    zone, resolver = env
    zone.set("sel._domainkey.signed.test", "TXT", [HANG])
    [result] = verify_all(resolver, sign(MESSAGE, key[0]), from_count=1)
    assert result.result == "temperror"


def test_arc_chain_sealed_by_one_hop_verifies(
    env: tuple[Any, DNSResolver], key: tuple[bytes, str]
) -> None:
    zone, resolver = env
    sealer_pem, record = rsa_key()
    zone.set("arc._domainkey.relay.test", "TXT", [record])
    sealer = ARCSealer(sealer_pem, "arc", "relay.test", "relay.test")
    ar = b"Authentication-Results: relay.test; spf=pass smtp.mailfrom=alice@signed.test\r\n"
    arc_set = sealer.seal(ar + MESSAGE)
    assert [h.split(b":", 1)[0] for h in arc_set] == [
        b"ARC-Seal",
        b"ARC-Message-Signature",
        b"ARC-Authentication-Results",
    ]
    sealed = b"".join(arc_set) + ar + MESSAGE
    result = verify_chain(resolver, sealed)
    assert (result.result, result.instances) == ("pass", 1), result.reason
    assert verify_chain(resolver, sealed.replace(b"Hello Bob.", b"Hello Eve.")).result == "fail"
    assert verify_chain(resolver, MESSAGE).result == "none"


def test_arc_seal_skips_a_message_without_from() -> None:
    pem, _ = rsa_key()
    sealer = ARCSealer(pem, "arc", "relay.test", "relay.test")
    ar = b"Authentication-Results: relay.test; spf=none\r\n"
    assert sealer.seal(ar + b"Subject: no from\r\n\r\nbody\r\n") == []


def test_dns_record_publishes_the_public_key() -> None:
    pem, record = rsa_key()
    assert record.startswith("v=DKIM1; k=rsa; p=")
    der = base64.b64decode(record.split("p=", 1)[1])
    public = serialization.load_der_public_key(der)
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
