"""The device's sending path end to end, in one process: a mail client submits to the device,
the device relays to a real edge (its relay listener, DKIM signing, its queue), the edge
delivers to the recipient's MX (a local downstream MX found through a local DNS server), and
the device learns the outcome from the edge's `GET /v1/outbound/events`.
"""

from __future__ import annotations

import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connector.app import DeviceParts, build_device
from edge.app import Edge, build_edge
from edge.config import Config
from edge.domains.scan import generate_dkim_keys
from edge.store.access import AccessStore
from edge.tls import ensure_self_signed
from tests.edgerelay import within
from tests.fakes import DownstreamMX, Peer, start_peer

EDGE = "edge.e2e.test"
ALICE = "alice@home.test"
STRAY = "stray@elsewhere.test"  # a login of the device, not an address of its edge account
AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@dataclass
class World:
    edge: Edge
    far_mx: Peer
    device: DeviceParts
    password: str

    @property
    def submission_port(self) -> int:
        assert self.device.sending is not None and self.device.sending.submission is not None
        return self.device.sending.submission.port


def _wait_for(check: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
def world(in_reactor: Any, tmp_path: Path) -> Iterator[World]:
    from tests.dnsserver import LocalDNSServer

    dns = in_reactor(LocalDNSServer, in_reactor.reactor)
    far_mx = start_peer(DownstreamMX())
    dns.zone.set("far.test", "MX", [(10, "mx.far.test")])
    dns.zone.set("mx.far.test", "A", ["127.0.0.1"])
    tls_files = (tmp_path / "cert.pem", tmp_path / "key.pem")
    ensure_self_signed(*tls_files, EDGE)
    config = Config(data_dir=str(tmp_path / "edge"), hostname=EDGE)
    e = config.edge
    e.mx_listen = e.control_listen = e.relay_listen = "127.0.0.1:0"
    e.mx_delivery_port = far_mx.port
    e.retry_schedule = [1.0]
    config.checks.enabled = False
    config.dns.nameservers, config.dns.port, config.dns.timeout = ["127.0.0.1"], dns.port, 2.0
    edge = in_reactor(build_edge, config, in_reactor.reactor, tls_files)
    access = AccessStore(edge.store)
    edge.store.ensure_account("acct_home", "acct_home")
    row = edge.store.create_device("laptop", account_id="acct_home")
    edge.store.create_route(
        "home.test",
        type="byod",
        connector_id=row.id,
        status="active",
        verified_at=AT,
        account_id="acct_home",
    )
    edge.store.add_byod_address("alice", "home.test", row.id)
    for key in generate_dkim_keys("202612"):
        access.add_dkim_key(
            "home.test", key.selector, key.algorithm, key.private_pem, key.public_b64
        )
    device_key = access.issue_key(row.id)
    in_reactor(edge.service.startService)

    dev_config = Config(data_dir=str(tmp_path / "device"), hostname="laptop.e2e.test")
    d = dev_config.device
    d.connector_listen = d.imap_listen = d.http_listen = d.submission_listen = "127.0.0.1:0"
    d.addresses = [ALICE, STRAY]
    d.edge_url = f"http://{edge.control.listener.address}"
    assert edge.relay is not None
    d.edge_relay = edge.relay.address
    d.outcome_poll_interval = 0.2
    device = in_reactor(build_device, dev_config, in_reactor.reactor)
    assert device.registration is not None
    link = device.registration.link  # as an approval leaves it
    link.status, link.device_id, link.device_key = "authorized", row.id, device_key
    in_reactor(device.service.startService)
    try:
        yield World(edge, far_mx, device, device.creds.imap[ALICE])
    finally:
        within(in_reactor, device.service.stopService)
        within(in_reactor, edge.service.stopService)
        far_mx.controller.stop()
        in_reactor(dns.stop)


def _tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_submitted_mail_reaches_the_recipients_mx_and_its_outcome_comes_back(
    world: World,
) -> None:
    message = (
        f"From: Alice <{ALICE}>\r\nTo: bob@far.test\r\nSubject: from the device\r\n\r\n"
        "Sent through the device's queue.\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", world.submission_port, timeout=20) as smtp:
        smtp.starttls(context=_tls())
        smtp.login(ALICE, world.password)
        code, reply = smtp.docmd("MAIL", f"FROM:<{ALICE}>")
        assert code == 250
        smtp.rcpt("bob@far.test")
        code, reply = smtp.data(message)
    assert code == 250 and reply.startswith(b"2.0.0 Queued as out_")
    item_id = reply.decode().rsplit(" ", 1)[1]

    _wait_for(
        lambda: any(b"from the device" in s.data for s in world.far_mx.handler.seen), "delivery"
    )
    (seen,) = [s for s in world.far_mx.handler.seen if b"from the device" in s.data]
    assert (seen.sender, seen.recipients) == (ALICE, ["bob@far.test"])
    assert b"DKIM-Signature:" in seen.data and b"Sent through the device's queue." in seen.data

    sending = world.device.sending
    assert sending is not None

    def statuses() -> list[tuple[str, str | None]]:
        events = sending.events.log.of_message(item_id)
        return [(e.status, e.recipient) for e in events]

    _wait_for(lambda: ("delivered", "bob@far.test") in statuses(), "the outcome")
    assert statuses() == [("submitted", None), ("relayed", None), ("delivered", "bob@far.test")]
    relayed = [e for e in sending.events.log.of_message(item_id) if e.status == "relayed"]
    assert relayed[0].queue_id and relayed[0].queue_id in seen.data.decode("utf-8", "replace")
    assert sending.queue.awaiting() == {}
    assert len(world.device.maildir.folder("Sent").messages()) == 1


def test_an_address_the_edge_does_not_own_bounces_on_the_device(world: World) -> None:
    """The device has a login for an address its edge account does not own: the edge's
    553 at MAIL comes back as a notice in the sender's INBOX, and nothing is retried."""
    sending = world.device.sending
    assert sending is not None
    message = f"From: <{STRAY}>\r\nTo: bob@far.test\r\nSubject: stray\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", world.submission_port, timeout=20) as smtp:
        smtp.starttls(context=_tls())
        smtp.login(STRAY, world.device.creds.imap[STRAY])
        smtp.sendmail(STRAY, ["bob@far.test"], message.encode())
    _wait_for(lambda: sending.queue.queued == [], "an answer from the edge")
    (notice,) = world.device.maildir.folder("INBOX").messages()
    text = world.device.maildir.folder("INBOX").read(notice.id)
    assert b"Undelivered Mail Returned to Sender" in text and b"553 5.7.1" in text
    assert f"To: <{STRAY}>".encode() in text
    assert not any(b"stray" in s.data for s in world.far_mx.handler.seen)
    (bounced,) = [e for e in sending.events.log.recent(10) if e.status == "bounced"]
    assert bounced.recipient == "bob@far.test" and (bounced.detail or "").startswith("553 ")
