"""The relay's session policy with the peer's address as given: AUTH in the clear only from
`[edge] relay_plaintext_networks`, STARTTLS first from anywhere else (with a real client
too), and its trace header."""

from __future__ import annotations

import base64
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from edge.config import Config, ConfigError, load_config
from edge.outbound.dkimsign import DkimSigner
from edge.outbound.relaylistener import build_relay_factory
from edge.outbound.relaypolicy import (
    RelayContext,
    RelayHandler,
    parse_networks,
    relay_received,
)
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.proxy import is_trusted
from edge.smtp.server import Limits
from edge.spool.spool import Spool, SpoolWriter
from edge.store import Store, open_store
from edge.store.access import AccessStore
from edge.store.keyring import StoreKeys
from edge.store.outbound import OutboundStore
from edge.tls import ensure_self_signed, server_context

LOOPBACK = parse_networks(Config().edge.relay_plaintext_networks)


@pytest.fixture(name="store")
def store_fixture(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'store.db'}", keys=StoreKeys.generate())
    yield opened
    opened.close()


def _device(store: Store) -> tuple[str, str]:
    device = store.create_device("laptop")
    return device.id, AccessStore(store).issue_key(device.id)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("100.64.0.7", False),  # the tailnet only when the operator says so
        ("203.0.113.9", False),
        ("2001:db8::9", False),
        ("localhost", False),  # a name is not an address
        ("", False),
    ],
)
def test_the_default_plaintext_networks_are_loopback_only(host: str, allowed: bool) -> None:
    assert is_trusted(host, LOOPBACK) is allowed
    assert is_trusted("100.64.0.7", parse_networks(["100.64.0.0/10"]))
    assert not is_trusted("127.0.0.1", ())  # the configured list is the whole rule


def _session(
    store: Store,
    peer: IPv4Address | IPv6Address,
    tmp_path: Path,
    commit: Any = None,
    accepted: Any = None,
    clock: Clock | None = None,
) -> Any:
    def run(fn: Any, *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(fn, *args)

    outbound = OutboundStore(store)
    relay = RelayContext(
        authenticate=AccessStore(store).authenticate,
        sender_account=outbound.sender_account,
        record=outbound.record,
        signer=DkimSigner(AccessStore(store)),
        spool=Spool(tmp_path / "spool"),
        commit=commit or (lambda w, e: defer.succeed(None)),
        accepted=accepted or (lambda e: None),
        hostname="edge.test",
        authserv_id="edge.test",
        clock=clock or Clock(),
        run_blocking=run,
        plaintext_networks=LOOPBACK,
        relayed_before=outbound.relayed_before,
    )
    factory = SMTPServerFactory(lambda: RelayHandler(relay), Limits(), "edge.test", Clock())
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "10.0.0.2", 25))
    proto.makeConnection(transport)
    transport.clear()
    return proto, transport


def _say(session: Any, line: str) -> str:
    proto, transport = session
    transport.clear()
    proto.dataReceived(line.encode() + b"\r\n")
    return str(transport.value().decode())


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.mark.parametrize(
    "peer",
    [
        IPv4Address("TCP", "203.0.113.9", 40000),
        IPv6Address("TCP", "2001:db8::9", 40000),
        IPv4Address("TCP", "100.64.0.7", 40000),
    ],
)
def test_a_peer_outside_the_plaintext_networks_cannot_auth_in_the_clear(
    store: Store, peer: IPv4Address | IPv6Address, tmp_path: Path
) -> None:
    device_id, key = _device(store)
    session = _session(store, peer, tmp_path)
    ehlo = _say(session, "EHLO laptop.test")
    assert ehlo.startswith("250") and "AUTH" not in ehlo  # RFC 4954 §4: not before STARTTLS
    assert _say(session, f"AUTH PLAIN {_plain(device_id, key)}").startswith("538 5.7.11 ")
    assert _say(session, "MAIL FROM:<a@home.test>") == (
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    )


def test_a_loopback_peer_may_auth_in_the_clear(store: Store, tmp_path: Path) -> None:
    device_id, key = _device(store)
    session = _session(store, IPv4Address("TCP", "127.0.0.1", 40000), tmp_path)
    assert "AUTH PLAIN" in _say(session, "EHLO laptop.test")
    assert _say(session, "MAIL FROM:<a@home.test>").startswith("530 5.7.0 Authentication")
    assert _say(session, f"AUTH PLAIN {_plain(device_id, key)}").startswith("235 ")
    # Authenticated, but the sender is no address of its account.
    assert _say(session, "MAIL FROM:<a@home.test>").startswith("553 5.7.1 ")


def test_the_250_waits_for_the_spool_commit_and_a_failed_commit_is_4xx(
    store: Store, tmp_path: Path
) -> None:
    device_id, key = _device(store)
    device = store.get_device(device_id)
    assert device is not None
    store.create_route("home.test", type="byod", connector_id=device_id, status="active")
    commits: list[defer.Deferred[None]] = []
    accepted: list[Any] = []

    def commit(writer: Any, envelope: Any) -> defer.Deferred[None]:
        commits.append(defer.Deferred())
        return commits[-1]

    loopback = IPv4Address("TCP", "127.0.0.1", 40000)
    session = _session(store, loopback, tmp_path, commit, accepted.append)
    _say(session, "EHLO laptop.test")
    assert _say(session, f"AUTH PLAIN {_plain(device_id, key)}").startswith("235 ")
    for outcome in ("fail", "succeed"):
        assert _say(session, "MAIL FROM:<alice@home.test>").startswith("250 ")
        assert _say(session, "RCPT TO:<bob@far.test>").startswith("250 ")
        assert _say(session, "DATA").startswith("354 ")
        message = "From: alice@home.test\r\nSubject: hi\r\n\r\nhello\r\n."
        assert _say(session, message) == ""  # waits for the disk
        if outcome == "fail":
            session[1].clear()
            commits[-1].errback(OSError("disk full"))
            assert session[1].value().startswith(b"451 4.3.0 ") and not accepted
            continue
        session[1].clear()
        commits[-1].callback(None)
        [envelope] = accepted
        assert session[1].value() == f"250 2.0.0 Queued as {envelope.qid}\r\n".encode()
        assert envelope.kind == "outbound" and envelope.sender == "alice@home.test"
        assert envelope.extra == {"device_id": device_id, "account_id": device.account_id}
        assert OutboundStore(store).relayed_by(envelope.qid) == device_id


def test_an_unusable_dkim_key_is_451_and_nothing_is_spooled(store: Store, tmp_path: Path) -> None:
    device_id, key = _device(store)
    store.create_route("home.test", type="byod", connector_id=device_id, status="active")
    AccessStore(store).add_dkim_key(
        "home.test",
        "broken",
        "rsa",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
        "AAAA",
    )
    commits: list[Any] = []
    accepted: list[Any] = []

    def commit(writer: Any, envelope: Any) -> defer.Deferred[None]:
        commits.append(envelope)
        return defer.succeed(None)

    session = _session(
        store, IPv4Address("TCP", "127.0.0.1", 40000), tmp_path, commit, accepted.append
    )
    _say(session, "EHLO laptop.test")
    assert _say(session, f"AUTH PLAIN {_plain(device_id, key)}").startswith("235 ")
    assert _say(session, "MAIL FROM:<alice@home.test>").startswith("250 ")
    assert _say(session, "RCPT TO:<bob@far.test>").startswith("250 ")
    assert _say(session, "DATA").startswith("354 ")
    spool_tmp = tmp_path / "spool" / "tmp"
    big = "x" * 998 + "\r\n"  # enough lines that the data goes to a file in the spool
    lines = [big] * (SpoolWriter.SPILL_SIZE // len(big) + 1)
    _say(session, "From: alice@home.test\r\nSubject: hi\r\n\r\n" + "".join(lines)[:-2])
    assert list(spool_tmp.iterdir())  # spilled: there is a file to remove
    assert _say(session, ".") == (
        "451 4.7.5 Cannot sign the message with the domain's DKIM key, try again later\r\n"
    )
    assert commits == [] and accepted == [] and list(spool_tmp.iterdir()) == []
    # The session goes on; a domain without keys is still relayed (unsigned, as before).
    store.create_route("work.test", type="byod", connector_id=device_id, status="active")
    assert _say(session, "MAIL FROM:<alice@home.test>").startswith("250 ")
    assert _say(session, "RCPT TO:<bob@far.test>").startswith("250 ")
    assert _say(session, "DATA").startswith("354 ")
    assert _say(session, "From: bob@work.test\r\n\r\nhi\r\n.").startswith("250 2.0.0 ")
    assert [e.sender for e in commits] == ["alice@home.test"] and len(accepted) == 1


def test_starttls_first_with_a_real_client(in_reactor: Any, store: Store, tmp_path: Path) -> None:
    """With no plaintext network, even loopback must use STARTTLS before AUTH."""
    device_id, key = _device(store)
    cert, tls_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed(cert, tls_key, "edge.test")
    config = Config(data_dir=str(tmp_path / "data"), hostname="edge.test")
    config.edge.relay_plaintext_networks = []
    factory = build_relay_factory(
        config,
        in_reactor.reactor,
        store,
        Spool(tmp_path / "spool"),
        lambda e: None,
        server_context(cert, tls_key),
    )
    port = in_reactor(in_reactor.reactor.listenTCP, 0, factory, interface="127.0.0.1")
    try:
        with smtplib.SMTP("127.0.0.1", port.getHost().port, timeout=20) as client:
            client.ehlo("laptop.test")
            assert "auth" not in client.esmtp_features
            code, text = client.docmd("AUTH", f"PLAIN {_plain(device_id, key)}")
            assert (code, text[:6]) == (538, b"5.7.11")
            assert client.mail("a@home.test")[:1] == (530,)
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            client.starttls(context=context)
            client.ehlo("laptop.test")
            assert "PLAIN" in client.esmtp_features["auth"]
            assert client.login(device_id, key)[0] == 235
            assert client.mail("a@home.test")[:1] == (553,)  # not its account's address
        mechanisms = client.esmtp_features["auth"].split()
        if "LOGIN" in mechanisms:  # where the SMTP server offers it, LOGIN works alike
            with smtplib.SMTP("127.0.0.1", port.getHost().port, timeout=20) as client:
                client.starttls(context=context)
                client.ehlo("laptop.test")
                client.user, client.password = device_id, key
                assert client.auth("LOGIN", client.auth_login)[0] == 235
    finally:
        in_reactor(port.stopListening)


def test_the_trace_header_names_the_device_and_no_address() -> None:
    header = relay_received("dev_1\r\nX-Evil: 1", "edge.test", "ESMTPSA", "0A1B", "TLSv1.3", 0)
    lines = header.split(b"\r\n")
    assert lines[0] == b"Received: from device dev_1??X-Evil: 1"
    assert lines[1] == b"\tby edge.test (tailpost) with ESMTPSA id 0A1B"
    assert lines[2].startswith(b"\t(using TLSv1.3); ") and lines[3] == b""


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[edge]\nrelay_listen = "nowhere"\n', "listen address"),
        ('[edge]\nrelay_plaintext_networks = ["10.0.0.0/33"]\n', "relay_plaintext_networks"),
        ("[edge]\nrelay_plaintext_networks = [7]\n", "relay_plaintext_networks"),
    ],
)
def test_bad_relay_settings_are_refused(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_config(path)
    path.write_text('[edge]\nrelay_listen = ""\n')
    assert load_config(path).edge.relay_listen == ""
