"""Delivery of a device's outbound mail to the internet, against real peers on loopback.

The edge's delivery queue, router and SMTP client as the edge builds them, with MTA-STS
from configuration (`[edge] mta_sts_port`, `tls_ca_file`: a CA made here); a local DNS
server serves the MX, A and `_mta-sts` TXT records, an HTTPS server the policies, and
aiosmtpd servers on 127.0.0.x are the remote MX hosts. Outbound mail is put into the queue
directly (`DeliveryQueue.submit`, kind "outbound"), as the relay listener does. The sender's
address belongs to a device whose connector (a real one, into a Maildir) takes the reports.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, threads

from connector.receiver import ConnectorHandler
from edge.config import Config
from edge.delivery.bouncematch import BounceMatching
from edge.delivery.client import SMTPDeliverer
from edge.delivery.eventlog import EventRecorder
from edge.delivery.mtasts import build_mta_sts
from edge.delivery.queue import DeliveryQueue
from edge.delivery.routing import Router, route_soon
from edge.dns.resolver import DNSResolver
from edge.inbound.policy import MXHandler
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from edge.spool.spool import Envelope, Spool
from edge.store import Store, open_store
from edge.store.cache import CachedLookups
from edge.store.events import DeliveryEvents
from edge.store.keyring import StoreKeys
from maildir import Maildir
from tests.fakes import DownstreamMX
from tests.outbound_peers import (
    LocalCA,
    PolicyServer,
    RemoteMX,
    free_port,
    smtp_sink,
    start_mx,
    tool,
)
from tests.outbound_peers import Policy as Served

USER, PASSWORD = "edge-laptop", "laptop secret"
ALICE = "alice@home.test"
HOSTS = [f"127.0.0.{n}" for n in range(2, 9)]
BODY = (
    b"From: Alice <alice@home.test>\r\nTo: bob@remote.test\r\nSubject: outbound\r\n"
    b"Message-ID: <out1@home.test>\r\n\r\nhello from the device\r\n"
)


def policy(mode: str, *mx: str) -> Served:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return Served("\r\n".join(lines) + "\r\n")


@dataclass
class World:
    reactor: Any
    in_reactor: Any
    zone: Any
    ca: LocalCA
    web: PolicyServer
    port: int
    queue: DeliveryQueue
    recorder: EventRecorder
    maildir: Maildir
    mx_port: int
    events: list[tuple[str, str, str, str]] = field(default_factory=list)
    remotes: list[RemoteMX] = field(default_factory=list)

    def remote(self, name: str, address: str, tls: str = "ca", **kwargs: Any) -> RemoteMX:
        """An MX host `name` at `address`: STARTTLS with a certificate of the CA for its
        name ("ca"), a self-signed one ("self"), one of the CA for another name ("other"),
        or no STARTTLS ("none")."""
        context = None
        if tls != "none":
            names = ("elsewhere.test",) if tls == "other" else (name,)
            context = self.ca.server_context(*names, self_signed=tls == "self")
        self.zone.set(name, "A", [address])
        started = start_mx(address, self.port, context, **kwargs)
        self.remotes.append(started)
        return started

    def domain(self, domain: str, mx: list[tuple[int, str]], sts: Served | None = None) -> None:
        self.zone.set(domain, "MX", mx)
        if sts is not None:
            self.zone.set(f"_mta-sts.{domain}", "TXT", ["v=STSv1; id=20261207"])
            self.zone.set(f"mta-sts.{domain}", "A", ["127.0.0.1"])
            self.web.policies[f"mta-sts.{domain}"] = sts

    def send(self, rcpts: list[str], data: bytes = BODY, sender: str = ALICE) -> Envelope:
        def submit() -> defer.Deferred[Envelope]:
            return defer.ensureDeferred(self.queue.submit(sender, rcpts, data, "outbound"))

        env: Envelope = self.in_reactor(submit)
        return env

    def outcome(self, qid: str, rcpt: str, *kinds: str) -> tuple[str, str]:
        """The first event of `kinds` for (qid, rcpt), waited for."""
        found: list[tuple[str, str]] = []

        def seen() -> bool:
            found[:] = [(e, d) for q, r, e, d in list(self.events) if (q, r) == (qid, rcpt)]
            found[:] = [(e, d) for e, d in found if e in kinds]
            return bool(found)

        wait_for(seen, lambda: f"events so far: {self.events}")
        return found[0]

    def inbox(self) -> list[bytes]:
        new = self.maildir.root / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def wait_for(
    predicate: Callable[[], bool], said: Callable[[], str] = str, timeout: float = 30.0
) -> None:
    """Polls `predicate`; the timeout only bounds a test that fails."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"the awaited outcome never came; {said()}")
        time.sleep(0.02)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'control.db'}", keys=StoreKeys.generate())
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def world(in_reactor: Any, tmp_path: Path, store: Store, dns_server: Any) -> Iterator[World]:
    reactor = in_reactor.reactor
    ca = LocalCA(tmp_path)
    web_names = [f"mta-sts.{d}" for d in ("sts.test", "testing.test", "policy.test")]
    web = PolicyServer(ca.server_context(*web_names)).start()
    port = free_port(HOSTS)
    maildir = Maildir(tmp_path / "laptop-mail", hostname="laptop.test")
    connector = SMTPServerFactory(
        lambda: ConnectorHandler(maildir, USER, PASSWORD, threads.deferToThread, lambda i: None),
        Limits(),
        "laptop.test",
        reactor,
    )
    connector_port = in_reactor(reactor.listenTCP, 0, connector, interface="127.0.0.1")
    laptop = store.create_device(
        "laptop",
        connector_smtp_addr=f"127.0.0.1:{connector_port.getHost().port}",
        connector_username=USER,
        connector_secret=PASSWORD,
    )
    store.create_route("home.test", type="byod", connector_id=laptop.id, status="active")
    store.add_byod_address("alice", "home.test", laptop.id)

    config = Config()
    config.edge.mx_delivery_port = port
    config.edge.mta_sts_port = web.port
    config.edge.tls_ca_file = str(ca.ca_file)
    resolver = DNSResolver(["127.0.0.1"], port=dns_server.port, timeout=1.0)
    lookups = CachedLookups(store)
    router = Router(
        lookups.resolve_recipient,
        resolver,
        config.edge.mx_delivery_port,
        build_mta_sts(config, resolver),
    )
    deliverer = SMTPDeliverer(reactor, "edge.test", timeout=10, ca_file=config.edge.tls_ca_file)
    events = DeliveryEvents(store)
    recorder = EventRecorder(events, reactor)
    seen: list[tuple[str, str, str, str]] = []

    def on_event(qid: str, rcpt: str, event: str, detail: str) -> None:
        seen.append((qid, rcpt, event, detail))
        recorder.add(qid, rcpt, event, detail)

    spool = Spool(tmp_path / "spool")
    queue = DeliveryQueue(
        spool,
        router.target,
        BounceMatching(deliverer, events, on_event, threads.deferToThread, router.resolve),
        reactor,
        [0.5, 1.0],
        hostname="edge.test",
        on_event=on_event,
        route_soon=route_soon(router, lookups, threads.deferToThread),
    )

    def handler() -> MXHandler:
        return MXHandler(
            store.resolve_recipient, spool, "edge.test", reactor, threads.deferToThread, queue.take
        )

    mx = SMTPServerFactory(handler, Limits(own_received=1), "edge.test", reactor)
    mx_port = in_reactor(reactor.listenTCP, 0, mx, interface="127.0.0.1")
    built = World(
        reactor,
        in_reactor,
        dns_server.zone,
        ca,
        web,
        port,
        queue,
        recorder,
        maildir,
        mx_port.getHost().port,
        seen,
    )
    try:
        yield built
    finally:
        in_reactor(queue.stop)
        in_reactor(deliverer.close)
        in_reactor(
            lambda: defer.gatherResults([p.stopListening() for p in (mx_port, connector_port)])
        )
        for remote in built.remotes:
            remote.controller.stop()
        web.stop()


@pytest.mark.parametrize(
    ("tls", "code"),
    [("self", "4.7.5"), ("other", "4.7.5"), ("none", "4.7.4")],
    ids=["self-signed", "certificate-for-another-name", "no-starttls"],
)
def test_enforce_never_delivers_without_verified_tls(world: World, tls: str, code: str) -> None:
    mx = world.remote("mx1.sts.test", HOSTS[0], tls=tls)
    world.domain("sts.test", [(10, "mx1.sts.test")], policy("enforce", "*.sts.test"))

    env = world.send(["bob@sts.test"])

    event, detail = world.outcome(env.qid, "bob@sts.test", "deferred", "delivered", "bounced")
    assert event == "deferred", detail
    assert detail.startswith(f"451 {code} "), detail
    assert "MTA-STS" in detail and "mx1.sts.test" in detail
    assert mx.handler.seen == []  # not in plain text, not over unverified TLS
    assert env.qid in world.queue.envelopes  # kept, to be tried again


def test_enforce_delivers_over_verified_tls_to_the_next_host(world: World) -> None:
    bad = world.remote("mx1.sts.test", HOSTS[0], tls="self")
    mx = world.remote("mx2.sts.test", HOSTS[1], tls="ca")
    world.domain(
        "sts.test", [(10, "mx1.sts.test"), (20, "mx2.sts.test")], policy("enforce", "*.sts.test")
    )

    env = world.send(["bob@sts.test"])

    event, detail = world.outcome(env.qid, "bob@sts.test", "deferred", "delivered", "bounced")
    assert event == "delivered", detail
    assert bad.handler.seen == []
    [seen] = mx.handler.seen
    assert seen.tls and seen.recipients == ["bob@sts.test"] and seen.data == BODY


@pytest.mark.parametrize(
    ("tls", "note"),
    [
        ("self", "(MTA-STS testing: certificate not trusted"),
        ("none", "(MTA-STS testing: no STARTTLS)"),
    ],
    ids=["self-signed", "no-starttls"],
)
def test_testing_mode_delivers_and_notes_the_failure(world: World, tls: str, note: str) -> None:
    mx = world.remote("mx1.testing.test", HOSTS[0], tls=tls)
    world.domain("testing.test", [(10, "mx1.testing.test")], policy("testing", "*.testing.test"))

    env = world.send(["bob@testing.test"])

    event, detail = world.outcome(env.qid, "bob@testing.test", "deferred", "delivered")
    assert event == "delivered", detail
    assert note in detail
    [seen] = mx.handler.seen
    assert seen.tls == (tls != "none")


def test_enforce_leaves_out_mx_hosts_the_policy_does_not_name(world: World) -> None:
    rogue = world.remote("rogue.example.test", HOSTS[1], tls="ca")
    named = world.remote("mx.policy.test", HOSTS[2], tls="ca")
    world.domain(
        "policy.test",
        [(5, "rogue.example.test"), (10, "mx.policy.test")],
        policy("enforce", "mx.policy.test"),
    )

    env = world.send(["bob@policy.test"])

    event, detail = world.outcome(env.qid, "bob@policy.test", "deferred", "delivered")
    assert event == "delivered", detail
    assert rogue.handler.seen == [] and len(named.handler.seen) == 1


def test_mx_preference_order_and_fallback(world: World) -> None:
    low = world.remote("mx10.pref.test", HOSTS[3], tls="none")
    high = world.remote("mx20.pref.test", HOSTS[4], tls="none")
    # Listed highest first: the preference decides, not the order of the answer.
    world.domain("pref.test", [(20, "mx20.pref.test"), (10, "mx10.pref.test")])
    # The preferred host of this domain does not answer: the next one takes the mail.
    world.zone.set("down.fallback.test", "A", [HOSTS[5]])  # nothing listens there
    world.domain("fallback.test", [(10, "down.fallback.test"), (20, "mx20.pref.test")])

    first = world.send(["bob@pref.test"])
    assert world.outcome(first.qid, "bob@pref.test", "delivered", "deferred")[0] == "delivered"
    assert [s.recipients for s in low.handler.seen] == [["bob@pref.test"]]
    assert high.handler.seen == []

    second = world.send(["carol@fallback.test"])
    assert world.outcome(second.qid, "carol@fallback.test", "delivered", "deferred")[0] == (
        "delivered"
    )
    assert [s.recipients for s in high.handler.seen] == [["carol@fallback.test"]]


def _dsns_in_inbox(world: World, count: int) -> list[bytes]:
    wait_for(lambda: len(world.inbox()) >= count)
    return world.inbox()


def test_null_mx_bounces_at_once_and_the_report_reaches_the_device(world: World) -> None:
    world.domain("nomail.test", [(0, ".")])

    env = world.send(["bob@nomail.test"])

    event, detail = world.outcome(env.qid, "bob@nomail.test", "bounced", "deferred")
    assert (event, detail[:10]) == ("bounced", "556 5.1.10")
    [report] = _dsns_in_inbox(world, 1)
    assert report.startswith(b"Return-Path: <>\r\nDelivered-To: alice@home.test\r\n")
    assert b"Final-Recipient: rfc822; bob@nomail.test" in report
    assert b"Status: 5.1.10" in report


def test_550_bounces_at_once_and_the_report_goes_to_the_device_not_the_internet(
    world: World,
) -> None:
    refusing = DownstreamMX(refuse={"bob@remote.test": "550 5.1.1 <bob@remote.test>: no such user"})
    mx = world.remote("mx.remote.test", HOSTS[0], tls="none", handler=refusing)
    # The sender's own domain has an MX on the internet too: the report must not go there.
    world.remote("mx.home.test", HOSTS[1], tls="none")
    world.domain("remote.test", [(10, "mx.remote.test")])
    world.domain("home.test", [(10, "mx.home.test")])

    env = world.send(["bob@remote.test", "carol@remote.test"])

    event, detail = world.outcome(env.qid, "bob@remote.test", "bounced", "deferred")
    assert (event, detail) == ("bounced", "550 5.1.1 <bob@remote.test>: no such user")
    assert world.outcome(env.qid, "carol@remote.test", "delivered", "bounced")[0] == "delivered"
    [seen] = mx.handler.seen
    assert seen.recipients == ["carol@remote.test"]
    [report] = _dsns_in_inbox(world, 1)
    assert b"Delivered-To: alice@home.test" in report
    assert b"Final-Recipient: rfc822; bob@remote.test" in report
    assert b"Status: 5.1.1" in report and b"carol@remote.test" not in report
    assert world.remotes[1].handler.seen == []  # the sender's internet MX never saw it


@pytest.mark.parametrize(
    ("rcpt", "data"),
    [
        ("jürgen@legacy.test", BODY),
        ("bob@legacy.test", BODY.replace(b"Subject: outbound", "Subject: Grüße".encode())),
    ],
    ids=["utf8-address", "utf8-header"],
)
def test_utf8_to_a_receiver_without_smtputf8_bounces_with_5_6_7(
    world: World, rcpt: str, data: bytes
) -> None:
    mx = world.remote("mx.legacy.test", HOSTS[0], tls="none", enable_SMTPUTF8=False)
    world.domain("legacy.test", [(10, "mx.legacy.test")])

    env = world.send([rcpt], data)

    event, detail = world.outcome(env.qid, rcpt, "bounced", "deferred")
    assert event == "bounced" and detail.startswith("553 5.6.7 "), detail
    assert mx.handler.seen == []
    [report] = _dsns_in_inbox(world, 1)
    assert b"Status: 5.6.7" in report


def test_utf8_address_goes_where_smtputf8_is_offered(world: World) -> None:
    mx = world.remote("mx.intl.test", HOSTS[0], tls="none", enable_SMTPUTF8=True)
    world.domain("intl.test", [(10, "mx.intl.test")])

    env = world.send(["jürgen@intl.test"])

    assert world.outcome(env.qid, "jürgen@intl.test", "delivered", "bounced")[0] == "delivered"
    assert [s.recipients for s in mx.handler.seen] == [["jürgen@intl.test"]]


REPORT = """\
From: MAILER-DAEMON@mx.remote.test (Mail Delivery System)
To: alice@home.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="B1"

--B1
Content-Type: text/plain

Your message to bob@remote.test could not be delivered.

--B1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.remote.test
Original-Envelope-Id: {envid}
Arrival-Date: Mon, 7 Dec 2026 12:00:00 +0000

Final-Recipient: rfc822; bob@internal.remote.test
Original-Recipient: rfc822;bob@remote.test
Action: failed
Status: 5.2.2
Diagnostic-Code: smtp; 552 5.2.2 mailbox full

--B1
Content-Type: text/rfc822-headers

Subject: outbound

--B1--
"""


def _to_the_mx(world: World, sender: str, data: str) -> None:
    with smtplib.SMTP("127.0.0.1", world.mx_port, timeout=10) as client:
        client.ehlo("mx.remote.test")
        client.mail(sender)
        assert client.rcpt(ALICE)[0] == 250
        code, text = client.data(data.replace("\n", "\r\n").encode())
        assert code == 250, text


def test_a_report_naming_the_envelope_id_is_matched_back_to_a_bounce(world: World) -> None:
    world.remote("mx.remote.test", HOSTS[0], tls="none")
    world.domain("remote.test", [(10, "mx.remote.test")])
    env = world.send(["bob@remote.test"])
    assert world.outcome(env.qid, "bob@remote.test", "delivered", "deferred")[0] == "delivered"
    world.in_reactor(world.recorder.flush)  # the delivered event is in the store

    # Reports that are not about it change nothing: another envelope id, not from <>.
    _to_the_mx(world, "", REPORT.format(envid="0000000000000000000000"))
    _to_the_mx(world, "mailer@remote.test", REPORT.format(envid=env.qid))
    wait_for(lambda: len(world.inbox()) == 2)
    # Nor does one naming mail the edge delivered to a device (those reports, say): it
    # never went over the internet.
    inbound = next(q for q, r, e, _d in world.events if (r, e) == (ALICE, "delivered"))
    world.in_reactor(world.recorder.flush)
    _to_the_mx(world, "", REPORT.format(envid=inbound).replace("bob@remote.test", ALICE))
    wait_for(lambda: len(world.inbox()) == 3)
    # The remote MX's report, from the null sender, under the queue id as envelope id.
    _to_the_mx(world, "", REPORT.format(envid=env.qid))

    event, detail = world.outcome(env.qid, "bob@remote.test", "bounced")
    assert detail == "5.2.2 smtp; 552 5.2.2 mailbox full"
    wait_for(lambda: len(world.inbox()) == 4)  # the reports reach the device all the same
    bounces = [e for e in world.events if e[2] == "bounced"]
    assert bounces == [(env.qid, "bob@remote.test", "bounced", detail)]


SMTP_SINK = tool("smtp-sink")
needs_smtp_sink = pytest.mark.skipif(
    SMTP_SINK is None, reason="smtp-sink (Debian package postfix) is not installed"
)


@needs_smtp_sink
def test_dsn_parameters_go_to_postfix_which_offers_dsn(world: World) -> None:
    assert SMTP_SINK is not None
    world.zone.set("mx.sink.test", "A", [HOSTS[6]])
    world.domain("sink.test", [(10, "mx.sink.test")])
    with smtp_sink(SMTP_SINK, HOSTS[6], world.port) as sink:
        env = world.send(["bob@sink.test"])
        assert world.outcome(env.qid, "bob@sink.test", "delivered", "deferred")[0] == "delivered"
        wait_for(lambda: len(sink.messages()) == 1)
        [dump] = sink.messages()
    head = dump.split(b"\n\n", 1)[0].decode().replace("\r\n", "\n")
    assert f"X-Mail-Args: <{ALICE}> RET=HDRS ENVID={env.qid}\n" in head, head
    assert (
        "X-Rcpt-Args: <bob@sink.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@sink.test\n" in head
    ), head


@needs_smtp_sink
def test_8bit_data_to_postfix_without_8bitmime_bounces_with_5_6_3(world: World) -> None:
    assert SMTP_SINK is not None
    world.zone.set("mx.sink.test", "A", [HOSTS[6]])
    world.domain("sink.test", [(10, "mx.sink.test")])
    data = BODY.replace(b"hello from the device", "Grüße vom Gerät".encode())
    with smtp_sink(SMTP_SINK, HOSTS[6], world.port, "-8") as sink:  # -8: no 8BITMIME
        env = world.send(["bob@sink.test"], data)
        event, detail = world.outcome(env.qid, "bob@sink.test", "bounced", "deferred")
        assert sink.messages() == []
    assert event == "bounced" and detail.startswith("554 5.6.3 "), detail
    [report] = _dsns_in_inbox(world, 1)
    assert b"Status: 5.6.3" in report


@needs_smtp_sink
def test_a_hard_refusal_by_postfix_bounces_at_once(world: World) -> None:
    assert SMTP_SINK is not None
    world.zone.set("mx.sink.test", "A", [HOSTS[6]])
    world.domain("sink.test", [(10, "mx.sink.test")])
    refuse = ["-f", "RCPT", "-B", "550 5.1.1 Recipient address rejected"]
    with smtp_sink(SMTP_SINK, HOSTS[6], world.port, *refuse):
        env = world.send(["bob@sink.test"])
        event, detail = world.outcome(env.qid, "bob@sink.test", "bounced", "deferred")
    assert (event, detail) == ("bounced", "550 5.1.1 Recipient address rejected")
    assert len(_dsns_in_inbox(world, 1)) == 1
