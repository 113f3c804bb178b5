"""The checks inside the MX: a real SMTP listener, spool and store, DNS from a local server."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import pytest
from twisted.internet import defer, threads

from bench.discard_edge import DiscardingMXHandler
from edge.checks import authserv_id, build_pipeline, sealer_for
from edge.checks.arc import ARCSealer, dns_record, verify_chain
from edge.config import Config
from edge.delivery.client import SMTPDeliverer
from edge.delivery.routing import Target
from edge.dns.resolver import DNSResolver
from edge.inbound.policy import MXHandler
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from edge.spool.spool import Envelope, Spool
from edge.store import RecipientTarget, Store, open_store
from edge.store.cache import CachedLookups
from maildir.verdict import parse_verdict
from tests.dnsserver import HANG
from tests.fakes import DownstreamMX, start_peer
from tests.test_checks_dkim import rsa_key

HOST = "mx.tailpost.test"


@dataclass
class MX:
    port: int
    store: Store
    spool: Spool
    accepted: list[Envelope]
    zone: Any
    resolver: DNSResolver
    sealer: ARCSealer | None = None

    def smtp(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
        client.ehlo("client.sender.test")
        return client

    def spooled(self, index: int = -1) -> bytes:
        return self.spool.read(self.accepted[index].qid)


def message(sender: str, subject: str, extra: bytes = b"") -> bytes:
    return (
        extra
        + (
            f"From: Sender <{sender}>\r\nTo: bob@inbound.test\r\nSubject: {subject}\r\n"
            "Date: Fri, 20 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m@x.test>\r\n\r\nHello.\r\n"
        ).encode()
    )


def transact(client: smtplib.SMTP, sender: str, data: bytes) -> tuple[int, bytes]:
    code, resp = client.mail(sender)
    if code != 250:
        return code, resp
    code, resp = client.rcpt("bob@inbound.test")
    if code != 250:
        client.rset()
        return code, resp
    return client.data(data)


def start_mx(
    in_reactor: Any, dns_server: Any, tmp_path: Path, discard: bool = False, **checks: Any
) -> MX:
    reactor = in_reactor.reactor
    config = Config(data_dir=str(tmp_path), hostname=HOST)
    for key, value in checks.items():
        setattr(config.checks, key, value)
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    store.ensure_account()
    device = store.create_device("d", connector_smtp_addr="127.0.0.1:1")
    store.add_managed_address("bob", device.id, domain="inbound.test", namespace=None, vanity=True)
    spool = Spool(tmp_path / "spool")
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=1.0, reactor=reactor)
    # Store lookups through the cache, answered inline when cached, as the edge wires them.
    lookups = CachedLookups(store)
    pipeline = build_pipeline(
        config, resolver, reactor, lookups.list_spam_rules, lookups.cached_or_load
    )
    accepted: list[Envelope] = []

    def account_of(target: RecipientTarget) -> str | None:
        dev = lookups.get_device(target.device_id or "")
        return dev.account_id if dev else None

    handler_class = DiscardingMXHandler if discard else MXHandler

    def handler() -> MXHandler:
        return handler_class(
            lookups.resolve_recipient,
            spool,
            HOST,
            reactor,
            threads.deferToThread,
            accepted.append,
            checks=pipeline,
            account_of=account_of,
            authserv_id=authserv_id(config),
            lookup=lookups.cached_or_load,
        )

    factory = SMTPServerFactory(handler, Limits(), HOST, reactor)
    listener = in_reactor(reactor.listenTCP, 0, factory, interface="127.0.0.1")
    sealer = sealer_for(config)  # the deliverer's, as the edge wires it
    mx = MX(listener.getHost().port, store, spool, accepted, dns_server.zone, resolver, sealer)
    mx.listener = listener  # type: ignore[attr-defined]
    if sealer is not None:
        dns_server.zone.set(f"tailpost._domainkey.{HOST}", "TXT", [dns_record(sealer.private_pem)])
    return mx


@pytest.fixture(scope="module")
def signer() -> tuple[bytes, str]:
    return rsa_key()


@pytest.fixture
def mx(in_reactor: Any, dns_server: Any, tmp_path: Path, signer: tuple[bytes, str]) -> Iterator[MX]:
    z = dns_server.zone
    z.set("signed.test", "TXT", ["v=spf1 ip4:127.0.0.1 -all"])
    z.set("_dmarc.signed.test", "TXT", ["v=DMARC1; p=reject"])
    z.set("sel._domainkey.signed.test", "TXT", [signer[1]])
    z.set("strict.test", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    z.set("_dmarc.strict.test", "TXT", ["v=DMARC1; p=reject"])
    z.set("quar.test", "TXT", ["v=spf1 -all"])
    z.set("_dmarc.quar.test", "TXT", ["v=DMARC1; p=quarantine"])
    z.set("open.test", "TXT", ["v=spf1 ip4:127.0.0.1 -all"])
    mx = start_mx(in_reactor, dns_server, tmp_path)
    yield mx
    in_reactor(mx.listener.stopListening)  # type: ignore[attr-defined]
    mx.store.close()


def signed(data: bytes, pem: bytes) -> bytes:
    return (
        dkim.sign(data, b"sel", b"signed.test", pem, include_headers=[b"from", b"to", b"subject"])
        + data
    )


def forward(in_reactor: Any, mx: MX, data: bytes) -> bytes:
    """`data` as the edge's deliverer sends it to a device (here an aiosmtpd peer)."""
    peer = start_peer(DownstreamMX())
    deliverer = SMTPDeliverer(in_reactor.reactor, HOST, timeout=10, sealer=mx.sealer)
    target = Target("device", "device:d", (("127.0.0.1", peer.port),), device_id="d")
    try:
        outcomes = in_reactor(
            lambda: defer.ensureDeferred(
                deliverer.deliver(target, "alice@signed.test", ["bob@inbound.test"], data)
            )
        )
        in_reactor(deliverer.close)
    finally:
        peer.controller.stop()
    assert outcomes["bob@inbound.test"].delivered
    [seen] = peer.handler.seen
    return seen.data


def test_signed_aligned_message_is_accepted_with_results(
    in_reactor: Any, mx: MX, signer: tuple[bytes, str]
) -> None:
    with mx.smtp() as client:
        code, _ = transact(
            client, "alice@signed.test", signed(message("alice@signed.test", "ok"), signer[0])
        )
    assert code == 250
    data = mx.spooled()
    head = data.split(b"\r\n\r\n", 1)[0]
    # No ARC set in the spool: the edge seals what it forwards, when it forwards it.
    assert head.startswith(b"Authentication-Results: ")
    assert b"\r\nARC-" not in head
    ar = [
        h
        for h in head.replace(b"\r\n\t", b" ").split(b"\r\n")
        if h.startswith(b"Authentication-Results:")
    ]
    assert len(ar) == 1
    text = ar[0].decode()
    assert text.startswith(f"Authentication-Results: {HOST};")
    assert "spf=pass smtp.mailfrom=alice@signed.test" in text
    assert "dkim=pass header.d=signed.test header.s=sel header.b=" in text
    assert "dmarc=pass header.from=signed.test policy.dmarc=reject" in text
    assert "arc=none" in text
    verdict = parse_verdict(data)
    assert verdict is not None and verdict.action == "accept"
    assert verdict.authentication() == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    assert mx.accepted[-1].extra["verdict"] == "accept"
    assert b"Received: from client.sender.test ([127.0.0.1])" in head
    # The copy the deliverer forwards carries the edge's ARC set, which verifies against
    # the edge's published key.
    delivered = forward(in_reactor, mx, data)
    assert delivered.startswith(b"ARC-Seal: i=1; cv=none;")
    assert delivered.endswith(data)
    chain = verify_chain(mx.resolver, delivered)
    assert (chain.result, chain.instances) == ("pass", 1), chain.reason


def test_p_reject_domain_failing_dmarc_is_refused(mx: MX) -> None:
    with mx.smtp() as client:
        code, resp = transact(client, "mallory@strict.test", message("ceo@strict.test", "spoof"))
    assert (code, resp[:5]) == (550, b"5.7.1")
    assert mx.accepted == []


def test_quarantine_goes_to_junk(mx: MX) -> None:
    with mx.smtp() as client:
        code, _ = transact(client, "news@quar.test", message("news@quar.test", "quarantined"))
    assert code == 250
    verdict = parse_verdict(mx.spooled())
    assert verdict is not None
    assert (verdict.action, verdict.reason, verdict.dmarc, verdict.spf) == (
        "junk",
        "dmarc.quarantine",
        "fail",
        "fail",
    )


def test_forged_headers_are_removed(mx: MX) -> None:
    forged = (
        f"Authentication-Results: {HOST}; dkim=pass header.d=bank.test\r\n"
        "Authentication-Results: elsewhere.test; spf=pass\r\n"
        "X-Tailpost-Verdict: action=accept; spam=No\r\n"
        "X-Tailpost-Queue-ID: FAKE\r\n"
    ).encode()
    with mx.smtp() as client:
        code, _ = transact(client, "a@open.test", message("a@open.test", "forged", forged))
    assert code == 250
    data = mx.spooled()
    assert data.count(f"Authentication-Results: {HOST}".encode()) == 1
    assert b"header.d=bank.test" not in data
    assert b"Authentication-Results: elsewhere.test; spf=pass" in data
    assert data.count(b"X-Tailpost-Verdict:") == 1 and b"FAKE" not in data


@pytest.mark.parametrize("lines", [10, 40_000])  # about 1 KB, and past the in-memory limit
def test_a_message_is_judged_and_spooled_whole_at_any_size(mx: MX, lines: int) -> None:
    body = b"".join(
        b"line %07d of the message body, the same length each time\r\n" % i for i in range(lines)
    )
    data = message("a@open.test", "sizes") + body
    with mx.smtp() as client:
        code, _ = transact(client, "a@open.test", data)
    assert code == 250
    spooled = mx.spooled()
    assert spooled.endswith(data) and spooled.count(b"Authentication-Results:") == 1
    assert list(mx.spool.tmp.iterdir()) == []


def test_block_rule_added_through_the_store_holds_for_the_next_connection(mx: MX) -> None:
    with mx.smtp() as client:
        assert transact(client, "spammer@open.test", message("spammer@open.test", "one"))[0] == 250
    mx.store.add_spam_rule("sender", "spammer@open.test", note="seen")
    with mx.smtp() as client:
        code, resp = transact(client, "spammer@open.test", message("spammer@open.test", "two"))
    assert (code, resp[:5]) == (550, b"5.7.1")
    assert len(mx.accepted) == 1


def test_domain_rule_applies_to_the_from_header(mx: MX) -> None:
    mx.store.add_spam_rule("domain", "evil.test")
    with mx.smtp() as client:
        code, resp = transact(client, "a@open.test", message("boss@mail.evil.test", "from header"))
    assert (code, resp[:5]) == (550, b"5.7.1")
    mx.store.add_spam_rule("domain", "junky.test", action="quarantine")
    with mx.smtp() as client:
        code, _ = transact(client, "a@open.test", message("x@junky.test", "junk rule"))
    assert code == 250
    verdict = parse_verdict(mx.spooled())
    assert verdict is not None and verdict.junk and "TAILPOST_BLOCKED_DOMAIN" in verdict.symbols


def test_two_from_headers_are_refused(mx: MX) -> None:
    data = message("a@open.test", "two froms", b"From: other@open.test\r\n")
    with mx.smtp() as client:
        code, resp = transact(client, "a@open.test", data)
    assert (code, resp[:5]) == (550, b"5.6.0")


def test_dns_timeout_is_recorded_and_mail_is_kept(mx: MX) -> None:
    mx.zone.set("slow.test", "TXT", [HANG])
    mx.zone.set("_dmarc.slow.test", "TXT", [HANG])
    with mx.smtp() as client:
        code, _ = transact(client, "a@slow.test", message("a@slow.test", "slow dns"))
    assert code == 250
    verdict = parse_verdict(mx.spooled())
    assert verdict is not None and (verdict.spf, verdict.dmarc) == ("temperror", "temperror")


def test_dnsbl_listed_client_is_refused_at_connect(
    in_reactor: Any, dns_server: Any, tmp_path: Path
) -> None:
    dns_server.zone.set("1.0.0.127.bl.test", "A", ["127.0.0.2"])
    mx = start_mx(in_reactor, dns_server, tmp_path, dnsbl_zones=["bl.test", "clean.test"])
    try:
        with pytest.raises(smtplib.SMTPConnectError) as info:
            smtplib.SMTP("127.0.0.1", mx.port, timeout=10)
        assert info.value.smtp_code == 554
        error: Any = info.value.smtp_error
        assert error.startswith(b"5.7.1")
        dns_server.zone.remove("1.0.0.127.bl.test")
        mx.resolver.clear_cache()
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as client:
            assert client.noop()[0] == 250
    finally:
        in_reactor(mx.listener.stopListening)  # type: ignore[attr-defined]
        mx.store.close()


def test_the_benchmarks_discarding_edge_runs_the_checks_and_keeps_nothing(
    in_reactor: Any, dns_server: Any, tmp_path: Path
) -> None:
    mx = start_mx(in_reactor, dns_server, tmp_path, discard=True)
    try:
        mx.store.add_spam_rule("domain", "evil.test")
        with mx.smtp() as client:
            code, resp = transact(client, "a@open.test", message("boss@evil.test", "refused"))
            assert (code, resp[:5]) == (550, b"5.7.1")  # the data-stage rule still ran
            code, resp = transact(client, "a@open.test", message("a@open.test", "fine"))
            assert (code, resp) == (250, b"2.0.0 Discarded")
        assert mx.accepted == [] and mx.spool.queued_ids() == []
        assert list((tmp_path / "spool" / "queue").iterdir()) == []
    finally:
        in_reactor(mx.listener.stopListening)  # type: ignore[attr-defined]
