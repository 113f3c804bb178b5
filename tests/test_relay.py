"""The relay end to end: an edge built by `edge.app.build_edge`, a device sending with real
SMTP clients (smtplib, swaks) on loopback, the delivery queue handing the mail to the
recipient's MX (an aiosmtpd server found through the local DNS server), and the outcome in
`GET /v1/outbound/events`. The edge's own MX still relays nothing."""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dkim
import pytest

from connector.allinone import build_allinone
from edge.app import Edge, build_edge
from edge.config import Config
from edge.domains.scan import generate_dkim_keys
from edge.runtime.adminkeys import admin_key_path, load_admin_keys
from edge.store.access import AccessStore
from edge.store.outbound import OutboundStore
from edge.tls import ensure_self_signed
from tests.fakes import DownstreamMX, Peer, start_peer

EDGE = "edge.relay.test"
AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
SWAKS = shutil.which("swaks")


@dataclass
class Device:
    id: str
    key: str


@dataclass
class Site:
    edge: Edge
    far_mx: Peer
    laptop: Device
    stranger: Device
    revoked: Device
    admin_key: str

    @property
    def relay_port(self) -> int:
        assert self.edge.relay is not None
        return self.edge.relay.port

    def url(self, path: str) -> str:
        return f"http://{self.edge.control.listener.address}{path}"


def _wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("not done in time")
        time.sleep(0.05)


def _device(access: AccessStore, name: str, account: str, domain: str) -> Device:
    store = access.store
    store.ensure_account(account, account)
    device = store.create_device(name, account_id=account)
    store.create_route(
        domain,
        type="byod",
        connector_id=device.id,
        status="active",
        verified_at=AT,
        account_id=account,
    )
    return Device(device.id, access.issue_key(device.id))


@pytest.fixture(scope="module")
def site(in_reactor: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    from tests.dnsserver import LocalDNSServer

    tmp = tmp_path_factory.mktemp("relay")
    dns = in_reactor(LocalDNSServer, in_reactor.reactor)
    far_mx = start_peer(DownstreamMX())
    dns.zone.set("far.test", "MX", [(10, "mx.far.test")])
    dns.zone.set("mx.far.test", "A", ["127.0.0.1"])
    tls_files = (tmp / "cert.pem", tmp / "key.pem")
    ensure_self_signed(*tls_files, EDGE)
    config = Config(data_dir=str(tmp / "data"), hostname=EDGE)
    e = config.edge
    e.mx_listen = e.control_listen = e.relay_listen = "127.0.0.1:0"
    e.mx_delivery_port = far_mx.port
    e.max_recipients = 3
    e.retry_schedule = [1.0]
    config.checks.enabled = False
    config.dns.nameservers, config.dns.port, config.dns.timeout = ["127.0.0.1"], dns.port, 2.0
    config.auth.failure_delay, config.auth.failure_delay_max = 0.01, 0.02
    edge = in_reactor(build_edge, config, in_reactor.reactor, tls_files)
    access = AccessStore(edge.store)
    laptop = _device(access, "laptop", "acct_home", "home.test")
    edge.store.add_byod_address("alice", "home.test", laptop.id)
    for key in generate_dkim_keys("202612"):
        access.add_dkim_key(
            "home.test", key.selector, key.algorithm, key.private_pem, key.public_b64
        )
    for domain in ("work.test", "broken.test"):  # more domains of the laptop's account
        edge.store.create_route(
            domain,
            type="byod",
            connector_id=laptop.id,
            status="active",
            verified_at=AT,
            account_id="acct_home",
        )
    for key in generate_dkim_keys("202612w"):
        access.add_dkim_key(
            "work.test", key.selector, key.algorithm, key.private_pem, key.public_b64
        )
    broken = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    access.add_dkim_key("broken.test", "broken", "rsa", broken, "AAAA")
    stranger = _device(access, "stranger", "acct_other", "other.test")
    edge.store.add_byod_address("carol", "other.test", stranger.id)
    revoked = _device(access, "old", "acct_home2", "old.test")
    access.revoke_device(revoked.id)
    in_reactor(edge.service.startService)
    admin = load_admin_keys(admin_key_path(config))[0]
    try:
        yield Site(edge, far_mx, laptop, stranger, revoked, admin)
    finally:
        in_reactor(edge.service.stopService)
        far_mx.controller.stop()
        in_reactor(dns.stop)


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the edge's self-signed certificate
    return context


def _client(site: Site, device: Device | None = None, *, tls: bool = True) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", site.relay_port, timeout=20)
    client.ehlo("laptop.tailnet.test")
    if tls:
        client.starttls(context=_unverified())
        client.ehlo("laptop.tailnet.test")
    if device is not None:
        client.login(device.id, device.key)
    return client


def _verdicts(access: AccessStore, message: bytes) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of `message`, keys from the store."""

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        return _txt(access, name)

    head = message.split(b"\r\n\r\n", 1)[0]
    count = len(re.findall(rb"(?im)^dkim-signature:", head))
    checker = dkim.DKIM(message)
    return [bool(checker.verify(idx=i, dnsfunc=txt)) for i in range(count)]


def _txt(access: AccessStore, name: bytes) -> bytes | None:
    """The DKIM key record at `name`, from the store."""
    selector, _, domain = name.decode().rstrip(".").partition("._domainkey.")
    for key in access.dkim_keys(domain):
        if key.selector == selector:
            return key.dns_value().encode()
    return None


def _get(site: Site, path: str, key: str) -> Any:
    request = urllib.request.Request(site.url(path), headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read())


MESSAGE = (
    b"From: Alice <alice@home.test>\r\nTo: bob@far.test\r\nSubject: from the laptop\r\n"
    b"Date: Mon, 07 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@home.test>\r\n"
    b"X-Tailpost-Verdict: ham; forged by the sender\r\n\r\nHello from the device.\r\n"
)


def test_a_device_relays_signed_mail_that_reaches_the_recipients_mx(site: Site) -> None:
    with _client(site, site.laptop) as client:
        assert client.mail("alice@home.test")[0] == 250
        assert client.rcpt("bob@far.test")[0] == 250
        code, text = client.data(MESSAGE)
    assert code == 250, text
    found = re.fullmatch(rb"2\.0\.0 Queued as ([0-9A-F]+)", text)
    assert found is not None, text
    qid = found.group(1).decode()
    # Who relayed it is on record at once (the 250 came after the spool commit).
    assert OutboundStore(site.edge.store).relayed_by(qid) == site.laptop.id

    _wait_for(lambda: any(b"from the laptop" in s.data for s in site.far_mx.handler.seen))
    [seen] = [s for s in site.far_mx.handler.seen if b"from the laptop" in s.data]
    assert (seen.sender, seen.recipients) == ("alice@home.test", ["bob@far.test"])
    head = seen.data.split(b"\r\n\r\n", 1)[0]
    # Signed for the sender's domain, with both keys; dkimpy verifies each signature.
    assert head.count(b"DKIM-Signature:") == 2 and b"d=home.test;" in head
    assert _verdicts(AccessStore(site.edge.store), seen.data) == [True, True]
    # The edge's trace names the device, not its address; the forged verdict is gone.
    received = re.search(rb"(?m)^Received: from device (\S+)\r\n\tby (\S+) .* id (\S+)", head)
    assert received is not None, head
    assert received.groups() == (site.laptop.id.encode(), EDGE.encode(), qid.encode())
    assert b"127.0.0.1" not in head and b"laptop.tailnet.test" not in head
    assert b"X-Tailpost" not in seen.data and seen.data.endswith(b"Hello from the device.\r\n")

    # The outcome, for the device that sent it and for the operator, but no one else.
    def delivered(key: str) -> list[tuple[str, str]]:
        events = _get(site, "/v1/outbound/events", key)["events"]
        return [(e["event"], e["recipient"]) for e in events if e["queue_id"] == qid]

    _wait_for(lambda: ("delivered", "bob@far.test") in delivered(site.laptop.key))
    assert delivered(site.laptop.key) == [
        ("accepted", "bob@far.test"),
        ("delivered", "bob@far.test"),
    ]
    assert delivered(site.admin_key) == delivered(site.laptop.key)
    assert delivered(site.stranger.key) == []


def test_only_the_devices_own_key_under_its_own_id_authenticates(site: Site) -> None:
    wrong = [
        (site.laptop.id, "tpk_not-the-key"),
        (site.laptop.id, site.stranger.key),  # a live key, of another device
        (site.stranger.id, site.laptop.key),
        (site.revoked.id, site.revoked.key),  # revoked: its key is dead
        ("", site.laptop.key),
    ]
    for username, password in wrong:
        with _client(site) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
                client.login(username, password)
            assert caught.value.smtp_code == 535
            assert client.mail("alice@home.test")[:1] == (530,)
    with _client(site, site.laptop, tls=False) as client:  # loopback: allowed in the clear
        assert client.mail("alice@home.test")[0] == 250


def test_mail_before_auth_is_refused(site: Site) -> None:
    with _client(site) as client:
        code, text = client.mail("alice@home.test")
        assert (code, text) == (530, b"5.7.0 Authentication required")


@pytest.mark.parametrize(
    "sender",
    [
        "carol@other.test",  # another account's address
        "anyone@other.test",  # another account's domain
        "alice@home.test.other.test",  # look-alikes of the device's own domain
        "alice@home-test.test",
        "alice@sub.home.test",
        "alice@old.test",  # the domain of a revoked device's account
        "",  # the null sender
    ],
)
def test_a_sender_the_account_does_not_own_is_553(site: Site, sender: str) -> None:
    with _client(site, site.laptop) as client:
        code, text = client.mail(sender)
        assert code == 553 and text.startswith(b"5.7.1 "), (code, text)
        assert client.rcpt("bob@far.test")[0] == 503  # no transaction was started


def test_a_change_of_who_owns_a_sender_holds_for_the_next_mail_of_a_session(site: Site) -> None:
    """The relay answers who owns a sender from the store's cache: a change made through this
    edge (a route disabled, the device revoked) holds at once, in a session already open."""
    access = AccessStore(site.edge.store)
    tablet = _device(access, "tablet", "acct_tablet", "tablet.test")
    (route,) = site.edge.store.list_routes("acct_tablet")
    with _client(site, tablet) as client:
        for _ in range(2):  # the second answered from the cache
            assert client.mail("me@tablet.test")[0] == 250
            assert client.rset()[0] == 250
        site.edge.store.update_route(route.id, status="disabled")
        assert client.mail("me@tablet.test")[0] == 553
        site.edge.store.update_route(route.id, status="active")
        assert client.mail("me@tablet.test")[0] == 250
        assert client.rset()[0] == 250
        access.revoke_device(tablet.id)
        code, text = client.mail("me@tablet.test")
        assert code == 553 and text.startswith(b"5.7.1 "), (code, text)


def _head(*fields: bytes, subject: bytes = b"a header test") -> bytes:
    return b"".join(f + b"\r\n" for f in fields) + b"Subject: " + subject + b"\r\n\r\nHi.\r\n"


@pytest.mark.parametrize(
    ("fields", "reply"),
    [
        # Another account's address, or its domain, though the envelope sender is owned.
        ((b"From: carol@other.test",), b"550 5.7.1 From header address not owned"),
        ((b"From: Carol <anyone@other.test>",), b"550 5.7.1 From header address not owned"),
        ((b'From: "alice@home.test" <carol@other.test>',), b"550 5.7.1 From header address"),
        ((b"From: alice@sub.home.test",), b"550 5.7.1 From header address not owned"),
        # Every address of the From field counts.
        ((b"From: alice@home.test, carol@other.test",), b"550 5.7.1 From header address"),
        (
            (b"From: alice@home.test", b"Sender: carol@other.test"),
            b"550 5.7.1 Sender header address not owned",
        ),
        ((), b"550 5.6.0 Message needs one From header"),  # no From
        ((b"From: alice@home.test <carol@other.test>",), b"550 5.6.0 Message needs one From"),
        ((b"From: alice@home.test", b"To: bob@far.test", b"From: alice@home.test"), b"550 5.6.0"),
        ((b"From: alice@home.test", b"Sender: a@home.test, b@home.test"), b"550 5.6.0 "),
    ],
)
def test_from_and_sender_fields_the_account_does_not_own_are_refused(
    site: Site, fields: tuple[bytes, ...], reply: bytes
) -> None:
    with _client(site, site.laptop) as client:
        assert client.mail("alice@home.test")[0] == 250
        assert client.rcpt("bob@far.test")[0] == 250
        code, text = client.data(_head(*fields))
        assert (f"{code} ".encode() + text).startswith(reply), (code, text)
        # Refused in the transaction only: the same session relays its own mail.
        own = _head(b"From: a@home.test")
        assert client.sendmail("alice@home.test", ["bob@far.test"], own) == {}
        assert client.noop()[0] == 250


def test_the_signature_is_for_the_from_domain_not_the_envelopes(site: Site) -> None:
    subject = b"signed for the author"
    message = _head(b"From: Bob <bob@work.test>", b"To: dora@far.test", subject=subject)
    with _client(site, site.laptop) as client:
        assert client.sendmail("alice@home.test", ["dora@far.test"], message) == {}
    _wait_for(lambda: any(subject in s.data for s in site.far_mx.handler.seen))
    [seen] = [s for s in site.far_mx.handler.seen if subject in s.data]
    assert seen.sender == "alice@home.test"
    head = seen.data.split(b"\r\n\r\n", 1)[0]
    assert re.findall(rb"\bd=([^;]+);", head) == [b"work.test", b"work.test"]
    assert _verdicts(AccessStore(site.edge.store), seen.data) == [True, True]
    # What dkimpy reports as the signing domain is the From domain: aligned for DMARC.
    checker = dkim.DKIM(seen.data)
    access = AccessStore(site.edge.store)
    assert checker.verify(dnsfunc=lambda name, timeout=5: _txt(access, name))
    assert checker.domain == b"work.test"


def test_an_unusable_dkim_key_is_a_temporary_failure(site: Site) -> None:
    with _client(site, site.laptop) as client:
        assert client.mail("alice@home.test")[0] == 250
        assert client.rcpt("bob@far.test")[0] == 250
        code, text = client.data(_head(b"From: erin@broken.test"))
        assert (code, text[:6]) == (451, b"4.7.5 "), (code, text)


def test_the_accounts_domain_and_the_mx_limits_apply(site: Site) -> None:
    with _client(site, site.laptop) as client:
        features = client.esmtp_features
        assert {"size", "8bitmime", "smtputf8", "pipelining"} <= set(features)
        assert client.mail("anyone@HOME.test")[0] == 250  # any address on its domain
        for n in range(3):
            assert client.rcpt(f"r{n}@far.test")[0] == 250
        assert client.rcpt("r3@far.test")[:1] == (452,)  # the edge's max_recipients
        client.rset()
        big = int(features["size"]) + 1
        code, text = client.mail("alice@home.test", [f"SIZE={big}"])
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.mail("alice@home.test", ["SMTPUTF8"])[0] == 250
        assert client.rcpt("bad address")[0] == 501


def test_the_edges_mx_still_relays_nothing(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.edge.mx.port, timeout=20) as client:
        client.ehlo("outside.test")
        assert "auth" not in client.esmtp_features
        assert client.mail("alice@home.test")[0] == 250
        code, text = client.rcpt("bob@far.test")
        assert (code, text[:5]) == (550, b"5.1.1")


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
def test_swaks_relays_with_starttls_and_auth(site: Site) -> None:
    assert SWAKS is not None
    result = subprocess.run(
        [SWAKS, "--server", "127.0.0.1", "--port", str(site.relay_port), "-tls"]
        + ["--auth", "PLAIN", "--auth-user", site.laptop.id, "--auth-password", site.laptop.key]
        + ["--from", "alice@home.test", "--to", "dora@far.test", "--h-Subject", "from swaks"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"<~  250 2\.0\.0 Queued as [0-9A-F]+", result.stdout), result.stdout
    _wait_for(lambda: any(b"from swaks" in s.data for s in site.far_mx.handler.seen))


def test_the_all_in_one_reports_and_shows_the_relay(in_reactor: Any, tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path / "data"), hostname=EDGE)
    for name in ("mx_listen", "control_listen", "relay_listen"):
        setattr(config.edge, name, "127.0.0.1:0")
    for name in ("connector_listen", "imap_listen", "http_listen"):
        setattr(config.device, name, "127.0.0.1:0")
    _top, edge, _device, report = in_reactor(build_allinone, config, in_reactor.reactor)
    assert edge.relay is not None and "relay" in [str(x.name) for x in report.listeners]
    edge.store.close()
    off = Config(data_dir=str(tmp_path / "off"), hostname=EDGE)
    off.edge.relay_listen = ""
    off.edge.mx_listen = off.edge.control_listen = "127.0.0.1:0"
    without = in_reactor(build_edge, off, in_reactor.reactor)
    assert without.relay is None
    without.store.close()
