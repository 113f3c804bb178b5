"""MTA-STS (RFC 8461): the record, the policy text, and the policy fetched and kept.

The fetch runs against a real HTTPS server on loopback with a certificate of a CA made
here, found through a local DNS server; the edge trusts that CA by configuration only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.config import ConfigError, load_config
from edge.delivery.mtasts import (
    MAX_POLICY_SIZE,
    MTASTS,
    Policy,
    PolicyError,
    PolicyFetcher,
    build_mta_sts,
    parse_policy,
    parse_txt,
)
from edge.dns.resolver import DNSResolver
from tests.dnsserver import HANG
from tests.outbound_peers import LocalCA, PolicyServer
from tests.outbound_peers import Policy as Served

ENFORCE = (
    "version: STSv1\r\nmode: enforce\r\nmx: mx1.a.test\r\nmx: *.mx.a.test\r\nmax_age: 86400\r\n"
)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=1"], "1"),
        (["v=STSv1; id=1", "v=STSv1; id=2"], None),  # two records: none (section 3.1)
        (["v=STSv1; id=not-alnum"], None),
        (["v=STSv1; id=" + "1" * 33], None),
        (["v=STSv1;"], None),
        (["v=STSv2; id=1"], None),
        (["id=1; v=STSv1"], None),
        ([], None),
    ],
)
def test_txt_record(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


def test_policy_text_and_patterns() -> None:
    policy = parse_policy(ENFORCE.replace("\r\n", "\n") + "future_field: x\n", "7")
    assert policy == Policy("enforce", ("mx1.a.test", "*.mx.a.test"), 86400, "7")
    assert policy.matches("mx1.a.test") and policy.matches("MX1.A.TEST.")
    assert policy.matches("b.mx.a.test")
    # A wildcard stands for exactly one label (section 4.1).
    assert not policy.matches("c.b.mx.a.test") and not policy.matches("mx.a.test")
    assert not policy.matches("mx2.a.test") and not policy.matches("evilmx1.a.test")
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mode == "none"
    assert parse_policy(ENFORCE.replace("86400", "9999999999")).max_age == 31_557_600


@pytest.mark.parametrize(
    "text",
    [
        ENFORCE.replace("STSv1", "STSv2"),
        ENFORCE.replace("version: STSv1\r\n", ""),
        ENFORCE.replace("enforce", "strict"),
        ENFORCE.replace("max_age: 86400", "max_age: soon"),
        ENFORCE.replace("max_age: 86400\r\n", ""),
        "version: STSv1\nmode: enforce\nmax_age: 60\n",  # no mx
        ENFORCE.replace("mx1.a.test", "*.*.a.test"),
        ENFORCE + "a line without a colon\n",
        ENFORCE + "mode: testing\n",
    ],
)
def test_bad_policy_text_is_refused(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA(tmp_path)


@pytest.fixture
def web(ca: LocalCA) -> Iterator[PolicyServer]:
    names = ("mta-sts.a.test", "mta-sts.b.test")
    server = PolicyServer(ca.server_context(*names)).start()
    yield server
    server.stop()


@pytest.fixture
def resolver(dns_server: Any) -> DNSResolver:
    for domain in ("a.test", "b.test"):
        dns_server.zone.set(f"mta-sts.{domain}", "A", ["127.0.0.1"])
        dns_server.zone.set(f"_mta-sts.{domain}", "TXT", ["v=STSv1; id=1"])
    return DNSResolver(["127.0.0.1"], port=dns_server.port, timeout=1.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_policy_is_fetched_once_per_id_and_kept_while_dns_fails(
    resolver: DNSResolver, web: PolicyServer, ca: LocalCA, dns_server: Any
) -> None:
    web.policies["mta-sts.a.test"] = Served(ENFORCE)
    clock = Clock()
    sts = MTASTS(resolver, PolicyFetcher(resolver, port=web.port, ca_file=str(ca.ca_file)), clock)

    first = sts.policy_for("a.test")
    assert first is not None and first.mode == "enforce" and first.id == "1"
    assert sts.policy_for("A.test.") == first
    assert web.requests == ["mta-sts.a.test/.well-known/mta-sts.txt"]  # one fetch for id 1

    # A new id: fetched again.
    web.policies["mta-sts.a.test"] = Served(ENFORCE.replace("enforce", "testing"))
    dns_server.zone.set("_mta-sts.a.test", "TXT", ["v=STSv1; id=2"])
    resolver.clear_cache()
    second = sts.policy_for("a.test")
    assert second is not None and (second.mode, second.id) == ("testing", "2")
    assert len(web.requests) == 2

    # The TXT lookup fails, or the record is gone: the cached policy holds, until max_age.
    dns_server.zone.set("_mta-sts.a.test", "TXT", [HANG])
    resolver.clear_cache()
    assert sts.policy_for("a.test") == second
    dns_server.zone.set("_mta-sts.a.test", "TXT", ["v=spf1 -all"])
    resolver.clear_cache()
    assert sts.policy_for("a.test") == second
    clock.now += 86401
    assert sts.policy_for("a.test") is None
    assert len(web.requests) == 2


def test_a_failed_fetch_keeps_the_cached_policy(
    resolver: DNSResolver, web: PolicyServer, ca: LocalCA, dns_server: Any
) -> None:
    web.policies["mta-sts.a.test"] = Served(ENFORCE)
    sts = MTASTS(resolver, PolicyFetcher(resolver, port=web.port, ca_file=str(ca.ca_file)))
    kept = sts.policy_for("a.test")
    assert kept is not None
    # A new id, but the policy server answers nonsense: the cached policy goes on.
    web.policies["mta-sts.a.test"] = Served("not a policy")
    dns_server.zone.set("_mta-sts.a.test", "TXT", ["v=STSv1; id=2"])
    resolver.clear_cache()
    assert sts.policy_for("a.test") == kept


@pytest.mark.parametrize(
    ("served", "why"),
    [
        (Served("", status=301, location="https://elsewhere.test/p.txt"), "301, not 200"),
        (Served(ENFORCE, content_type="text/html"), "text/html, not text/plain"),
        (Served("mx: x.a.test\n" * (MAX_POLICY_SIZE // 10)), "over 65536 octets"),
        (Served("nothing here", status=404), "404, not 200"),
    ],
    ids=["redirect", "content-type", "too-big", "not-found"],
)
def test_bad_answers_give_no_policy(
    resolver: DNSResolver, web: PolicyServer, ca: LocalCA, served: Served, why: str
) -> None:
    web.policies["mta-sts.b.test"] = served
    fetch = PolicyFetcher(resolver, port=web.port, ca_file=str(ca.ca_file))
    with pytest.raises(PolicyError, match=why):
        fetch("b.test")
    assert MTASTS(resolver, fetch).policy_for("b.test") is None
    assert not any("elsewhere" in r for r in web.requests)  # no redirect followed


def test_a_certificate_the_ca_did_not_sign_gives_no_policy(
    resolver: DNSResolver, ca: LocalCA
) -> None:
    impostor = PolicyServer(ca.server_context("mta-sts.a.test", self_signed=True)).start()
    try:
        impostor.policies["mta-sts.a.test"] = Served(ENFORCE)
        fetch = PolicyFetcher(resolver, port=impostor.port, ca_file=str(ca.ca_file))
        with pytest.raises(PolicyError, match="could not be fetched"):
            fetch("a.test")
        assert MTASTS(resolver, fetch).policy_for("a.test") is None
        assert impostor.requests == []  # the handshake failed: nothing was asked
    finally:
        impostor.stop()


def test_a_certificate_for_another_name_gives_no_policy(resolver: DNSResolver, ca: LocalCA) -> None:
    other = PolicyServer(ca.server_context("mta-sts.other.test")).start()
    try:
        other.policies["mta-sts.a.test"] = Served(ENFORCE)
        fetch = PolicyFetcher(resolver, port=other.port, ca_file=str(ca.ca_file))
        with pytest.raises(PolicyError, match="could not be fetched"):
            fetch("a.test")
    finally:
        other.stop()


def test_configuration_of_mta_sts_is_checked(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text("[edge]\nmta_sts_port = 70000\n")
    with pytest.raises(ConfigError, match="mta_sts_port"):
        load_config(config)
    config.write_text(f'[edge]\ntls_ca_file = "{tmp_path / "missing.pem"}"\n')
    with pytest.raises(ConfigError, match="tls_ca_file .* cannot be read"):
        load_config(config)
    config.write_text("[edge]\nmta_sts = false\n")
    loaded = load_config(config)
    assert build_mta_sts(loaded, DNSResolver(["127.0.0.1"])) is None
