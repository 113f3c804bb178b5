"""The outbound paths end to end with real processes: an edge (`twistd tailpost-edge`) and a
linked device (`twistd tailpost-device`), remote MX hosts on loopback (aiosmtpd, and Postfix's
`smtp-sink` when installed), the remote domains and the sender's DKIM records in a local DNS
server, MTA-STS policies from a local HTTPS server (`tests.outbound_world`).

Mail sent through the local API, the submission listener (smtplib, swaks) and a reply arrives
signed twice (RSA and Ed25519, verified by dkimpy against the records in the test's DNS) and
the device's outbound events go submitted -> relayed -> delivered; MTA-STS enforce never
delivers to a host with a bad certificate; a 550 bounces with a DSN in the device's INBOX; the
edge's relay refuses a sender the device does not own.
"""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes import DownstreamMX
from tests.outbound_peers import Sink, postfix_mx, postfix_unavailable, smtp_sink, tool
from tests.outbound_world import (
    ALICE,
    HOSTS,
    World,
    make_world,
    message_ids,
    sts_policy,
    wait_until,
)

FAR = DownstreamMX(refuse={"nobody@far.test": "550 5.1.1 No such user here"})


@pytest.fixture(scope="module")
def world(in_reactor: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(
        tmp_path_factory.mktemp("outbound-paths"),
        in_reactor,
        sts_domains=("sts.test", "onlybad.test"),
    )
    try:
        w.remote("mx.far.test", HOSTS[0], handler=FAR)
        w.domain("far.test", [(10, "mx.far.test")])
        w.remote("bad.sts.test", HOSTS[1], tls="self")
        w.remote("good.sts.test", HOSTS[2])
        w.domain(
            "sts.test",
            [(10, "bad.sts.test"), (20, "good.sts.test")],
            sts_policy("enforce", "*.sts.test"),
        )
        w.domain("onlybad.test", [(10, "bad.sts.test")], sts_policy("enforce", "*.sts.test"))
        w.start_edge()
        w.start_device()
        yield w
    finally:
        w.stop()


def _delivered(world: World, item: str, recipient: str) -> None:
    wait_until(
        lambda: ("delivered", recipient) in world.statuses(item),
        lambda: f"{item} delivered to {recipient}: {world.statuses(item)}",
    )
    assert world.statuses(item) == [
        ("submitted", None),
        ("relayed", None),
        ("delivered", recipient),
    ]


def _arrived(mx: DownstreamMX, message_id: str) -> bytes:
    wait_until(lambda: message_id in message_ids(mx.seen), f"{message_id} at the remote MX")
    assert message_ids(mx.seen).count(message_id) == 1
    (seen,) = [s for s in mx.seen if message_ids([s]) == [message_id]]
    return seen.data


def _send(world: World, to: str, subject: str) -> dict[str, Any]:
    status, body = world.api(
        "POST", "/mail/send", {"to": [to], "subject": subject, "body_text": "Hello.\n"}
    )
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def test_local_api_send_arrives_signed_twice_and_is_delivered(world: World) -> None:
    sent = _send(world, "bob@far.test", "through the local API")
    data = _arrived(FAR, sent["message_id"])
    assert sorted(world.verify_dkim(data)) == [b"ed25519-sha256", b"rsa-sha256"]
    assert b"Subject: through the local API" in data
    _delivered(world, sent["proxy_message_id"], "bob@far.test")


def test_submission_with_smtplib_arrives_signed_twice(world: World) -> None:
    message = (
        f"From: Alice <{ALICE}>\r\nTo: bob@far.test\r\nSubject: by submission\r\n"
        "Message-ID: <submission-1@home.test>\r\n\r\nSent with smtplib.\r\n"
    ).encode()
    item = world.submit(message, ["bob@far.test"])
    data = _arrived(FAR, "<submission-1@home.test>")
    assert sorted(world.verify_dkim(data)) == [b"ed25519-sha256", b"rsa-sha256"]
    _delivered(world, item, "bob@far.test")


@pytest.mark.skipif(tool("swaks") is None, reason="swaks is not installed (make test installs it)")
def test_submission_with_swaks_arrives_signed_twice(world: World) -> None:
    host, _, port = world.listeners["submission"].rpartition(":")
    password = world.credentials()["imap"][ALICE]
    done = subprocess.run(
        [
            str(tool("swaks")),
            "--server",
            host,
            "--port",
            port,
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            ALICE,
            "--auth-password",
            password,
            "--from",
            ALICE,
            "--to",
            "bob@far.test",
            "--header",
            "Subject: by swaks",
            "--header",
            "Message-Id: <swaks-1@home.test>",
            "--body",
            "Sent with swaks.",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout.decode()[-2000:]
    data = _arrived(FAR, "<swaks-1@home.test>")
    assert sorted(world.verify_dkim(data)) == [b"ed25519-sha256", b"rsa-sha256"]
    (item,) = {
        e["proxy_message_id"]
        for e in world.outbound_events()
        if e["internet_message_id"] == "<swaks-1@home.test>"
    }
    _delivered(world, item, "bob@far.test")


def test_a_reply_to_a_message_in_the_inbox_arrives_signed_twice(world: World) -> None:
    host, _, port = world.edge_listeners["mx"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=20) as smtp:
        smtp.sendmail(
            "bob@far.test",
            [ALICE],
            b"From: Bob <bob@far.test>\r\nTo: alice@home.test\r\nSubject: question\r\n"
            b"Message-ID: <question-1@far.test>\r\n\r\nAre you there?\r\n",
        )

    def inbox_id() -> str | None:
        status, body = world.api("GET", "/mail/messages?mailbox=INBOX&limit=100")
        assert status == 200, body
        found = [m["id"] for m in body["messages"] if m["subject"] == "question"]
        return found[0] if found else None

    ref = wait_until(inbox_id, "the question in the INBOX")
    status, sent = world.api("POST", f"/mail/messages/{ref}/reply", {"body_text": "Yes.\n"})
    assert status == 200, sent
    data = _arrived(FAR, sent["message_id"])
    assert sorted(world.verify_dkim(data)) == [b"ed25519-sha256", b"rsa-sha256"]
    assert b"In-Reply-To: <question-1@far.test>" in data and b"Subject: Re: question" in data
    _delivered(world, sent["proxy_message_id"], "bob@far.test")


def test_postfix_smtp_sink_takes_the_signed_mail(world: World) -> None:
    binary = tool("smtp-sink")
    if binary is None:
        pytest.skip("Postfix's smtp-sink is not installed (make test installs postfix)")
    world.dns.zone.set("sink.test", "MX", [(10, "mx.sink.test")])
    world.dns.zone.set("mx.sink.test", "A", [HOSTS[3]])
    with smtp_sink(binary, HOSTS[3], world.mx_port) as sink:
        sent = _send(world, "carol@sink.test", "to postfix")

        def dumped(s: Sink = sink) -> list[bytes]:
            return [m for m in s.messages() if sent["message_id"].encode() in m]

        (dump,) = wait_until(dumped, "the message in smtp-sink's dump")
        _delivered(world, sent["proxy_message_id"], "carol@sink.test")
    assert sorted(world.verify_dkim(_crlf(dump))) == [b"ed25519-sha256", b"rsa-sha256"]


def test_postfix_smtpd_takes_the_signed_mail(world: World) -> None:
    reason = postfix_unavailable()
    if reason is not None:
        pytest.skip(reason)
    world.dns.zone.set("postfix.test", "MX", [(10, "mx.postfix.test")])
    world.dns.zone.set("mx.postfix.test", "A", [HOSTS[4]])
    with postfix_mx(HOSTS[4], world.mx_port) as postfix:
        sent = _send(world, "frank@postfix.test", "to postfix smtpd")

        def held() -> list[bytes]:
            return [m for m in postfix.messages() if sent["message_id"].encode() in m]

        (message,) = wait_until(held, "the message in Postfix's hold queue")
        _delivered(world, sent["proxy_message_id"], "frank@postfix.test")
    assert sorted(world.verify_dkim(message)) == [b"ed25519-sha256", b"rsa-sha256"]


def _crlf(dump: bytes) -> bytes:
    """The message in an smtp-sink dump (its X-Mail-Args/X-Rcpt-Args fields left out)."""
    lines = dump.replace(b"\r\n", b"\n").split(b"\n")
    kept = [line for line in lines if not line.startswith((b"X-Mail-Args:", b"X-Rcpt-Args:"))]
    return b"\r\n".join(kept)


def test_mta_sts_enforce_never_delivers_to_a_host_with_a_bad_certificate(world: World) -> None:
    bad, good = world.remotes[1].handler, world.remotes[2].handler
    sent = _send(world, "dave@sts.test", "to the good host")
    _arrived(good, sent["message_id"])
    _delivered(world, sent["proxy_message_id"], "dave@sts.test")

    stuck = _send(world, "erin@onlybad.test", "to the bad host only")
    item = stuck["proxy_message_id"]
    wait_until(
        lambda: ("deferred", "erin@onlybad.test") in world.statuses(item),
        lambda: f"deferred: {world.statuses(item)}",
    )
    deferred = next(
        e
        for e in world.outbound_events()
        if e["proxy_message_id"] == item and e["status"] == "deferred"
    )
    assert deferred["detail"].startswith("451 4.7.5 the TLS certificate of bad.sts.test")
    assert bad.seen == []  # never a message over the unverified certificate
    assert stuck["message_id"] not in message_ids(good.seen)


def test_a_550_bounces_with_a_dsn_in_the_inbox(world: World) -> None:
    sent = _send(world, "nobody@far.test", "to nobody")
    item = sent["proxy_message_id"]
    wait_until(
        lambda: ("bounced", "nobody@far.test") in world.statuses(item),
        lambda: f"bounced: {world.statuses(item)}",
    )
    (bounced,) = [
        e
        for e in world.outbound_events()
        if e["proxy_message_id"] == item and e["status"] == "bounced"
    ]
    assert bounced["detail"].startswith("550 5.1.1")

    def dsn() -> list[dict[str, Any]]:
        status, body = world.api("GET", "/mail/messages?mailbox=INBOX&limit=100")
        assert status == 200
        return [
            m for m in body["messages"] if m["subject"] == "Undelivered Mail Returned to Sender"
        ]

    (notice,) = wait_until(dsn, "the DSN in the INBOX")
    status, full = world.api("GET", f"/mail/messages/{notice['id']}?mailbox=INBOX")
    assert status == 200, full
    text = str(full)
    assert "nobody@far.test" in text and "550 5.1.1" in text
    assert sent["message_id"] not in message_ids(FAR.seen)


def test_the_relay_refuses_a_sender_the_device_does_not_own(world: World) -> None:
    with world.relay_client() as client:
        code, reply = client.mail("mallory@elsewhere.test")
        assert (code, reply[:5]) == (553, b"5.7.1")
        code, reply = client.mail("")
        assert (code, reply[:5]) == (553, b"5.7.1")
        assert client.mail(ALICE)[0] == 250  # its own address: taken
        client.rset()
    with smtplib.SMTP("127.0.0.1", world.relay_port, timeout=20) as client:
        client.ehlo("laptop.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("dev_laptop", "not the key")
