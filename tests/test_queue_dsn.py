"""The delivery queue over time: long outages, expiry, and the DSNs it sends (RFC 3464).

A real spool and a real `Router` under a fake clock; a scripted deliverer plays the device,
the old MX of a split route, and the senders' MX hosts that receive the DSNs.
"""

from __future__ import annotations

import email
import re
from email import policy
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.task import Clock

from edge.delivery.outcomes import Outcome
from edge.delivery.queue import DeliveryQueue
from edge.delivery.routing import Router, Target
from edge.dns.resolver import DNSResolver
from edge.smtp import replies
from edge.spool.spool import Envelope
from edge.store import RecipientTarget
from tests.fakes import (
    Call,
    MXResolver,
    RecordingSpool,
    Script,
    ScriptedDeliverer,
    accepted,
    refused,
    run_sync,
)

SCHEDULE = [60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0]  # the configured default
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
STEP = 10.0
SENDER = "carol@sender.test"
A = "alice@example.com"
B = "bob@example.com"
BODY = (
    b"Received: from client.sender.test\r\n"
    b"From: Carol <carol@sender.test>\r\n"
    b"To: alice@example.com\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@sender.test>\r\n"
    b"\r\n"
    b"the body, which never goes back in a DSN\r\n"
)
DEVICE_HOST = "100.64.0.7:2525"
OLD_MX = [{"host": "mx1.old.test", "port": 25}, {"host": "mx2.old.test", "port": 2525}]


def device(address: str) -> RecipientTarget:
    return RecipientTarget(
        kind="device",
        address=address,
        device_id="dev1",
        connector_smtp_addr=DEVICE_HOST,
        connector_username="edge-dev1",
        connector_secret="secret",
        route_id="route1",
        upstream_hosts=[],
    )


def upstream(address: str) -> RecipientTarget:
    return RecipientTarget(
        kind="upstream",
        address=address,
        device_id=None,
        connector_smtp_addr="",
        connector_username=None,
        connector_secret=None,
        route_id="route1",
        upstream_hosts=[dict(h) for h in OLD_MX],
    )


class Harness:
    def __init__(
        self,
        root: Path,
        targets: dict[str, RecipientTarget],
        scripts: dict[str, Script] | None = None,
        *,
        lifetime: float = 5 * DAY,
        delay_warning: float = 4 * HOUR,
        resolver: Any = None,
        start_at: float = 0.0,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(start_at)
        self.spool = RecordingSpool(root)
        self.targets = targets
        self.resolver = resolver if resolver is not None else MXResolver()
        self.router = Router(self.targets.get, cast(DNSResolver, self.resolver))
        self.routed: list[tuple[str, str]] = []
        self.deliverer = ScriptedDeliverer(self.clock, accepted, dict(scripts or {}))
        self.events: list[tuple[str, str, str, str]] = []
        self.queue = DeliveryQueue(
            self.spool,
            self.route,
            self.deliverer,
            self.clock,
            SCHEDULE,
            lifetime=lifetime,
            delay_warning=delay_warning,
            hostname="edge.test",
            run_blocking=run_sync,
            on_event=lambda *event: self.events.append(event),
        )

    def route(self, rcpt: str, kind: str) -> Target:
        self.routed.append((rcpt, kind))
        return self.router.target(rcpt, kind)

    def accept(
        self,
        recipients: list[str],
        data: bytes = BODY,
        sender: str = SENDER,
        extra: dict[str, Any] | None = None,
    ) -> Envelope:
        """What the MX does: spool the message, then hand it to the queue."""
        writer = self.spool.writer()
        writer.write(data)
        env = Envelope(
            writer.qid, sender, recipients, self.clock.seconds(), extra=dict(extra or {})
        )
        self.spool.commit(writer, env)
        self.queue.enqueue(env)
        return env

    def run_until(self, t: float, step: float = STEP) -> None:
        """Let time pass in small steps, so every timer fires close to its time."""
        self.clock.advance(0)
        while self.clock.seconds() < t:
            self.clock.advance(min(step, t - self.clock.seconds()))

    def events_of(self, qid: str) -> list[tuple[str, str]]:
        return [(rcpt, event) for q, rcpt, event, _d in self.events if q == qid]


def parse_dsn(data: bytes) -> tuple[EmailMessage, Message, list[Message], str]:
    """The report, its per-message block, its per-recipient blocks and the returned headers."""
    msg = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    payload = parts[1].get_payload()
    assert isinstance(payload, list) and len(payload) >= 2
    blocks = [b for b in payload if isinstance(b, Message)]
    assert len(blocks) == len(payload)
    headers = parts[2].get_payload(decode=True)
    assert isinstance(headers, bytes)
    return msg, blocks[0], blocks[1:], headers.decode()


def dsn_of(h: Harness, qid: str) -> list[tuple[Envelope, bytes]]:
    """The DSNs committed about message `qid` (its queue id is in the per-message block)."""
    out = []
    for env, data in h.spool.dsns():
        _msg, per_message, _blocks, _headers = parse_dsn(data)
        if per_message["X-Tailpost-Queue-ID"] == qid:
            out.append((env, data))
    return out


def test_device_offline_for_two_days_gets_everything_once_in_arrival_order(
    tmp_path: Path,
) -> None:
    back_at = 2 * DAY
    stored: list[bytes] = []

    def device_script(call: Call) -> dict[str, Outcome]:
        if call.at < back_at:
            return refused(call)
        stored.append(call.data.split(b"\r\n", 1)[1])  # without the queue id header
        return accepted(call)

    h = Harness(tmp_path, {A: device(A), B: device(B)}, {"device": device_script})
    arrivals = [0.0, 10 * MINUTE, HOUR, 5 * HOUR, 20 * HOUR, 47 * HOUR]
    sent: list[tuple[Envelope, bytes]] = []
    for i, t in enumerate(arrivals):
        h.run_until(t)
        data = BODY.replace(b"Subject: hello", b"Subject: message %d" % i)
        sent.append((h.accept([A, B] if i % 2 else [A], data), data))
    h.run_until(back_at - STEP)
    assert stored == []
    assert len(h.spool.queued_ids()) >= len(sent)

    h.run_until(back_at + SCHEDULE[-1] + MINUTE)  # one full retry interval later

    assert h.spool.queued_ids() == []
    assert sorted(stored) == sorted(data for _env, data in sent)  # each exactly once
    for env, _data in sent:
        assert h.spool.finished(env.qid) == set()  # forgotten: everything delivered
        assert all(event != "bounced" for _r, event in h.events_of(env.qid))
        assert [e for e in h.events_of(env.qid) if e[1] == "delivered"] == [
            (r, "delivered") for r in env.recipients
        ]
    # Mail older than the delay warning was reported delayed, once; none failed.
    delayed = {env.qid for env, _data in sent if env.received_at <= back_at - 4 * HOUR}
    assert len(h.spool.dsns()) == len(delayed)
    assert {qid for qid in delayed if len(dsn_of(h, qid)) == 1} == delayed
    for _env, data in h.spool.dsns():
        assert parse_dsn(data)[0]["Subject"].startswith("Delayed Mail")


@pytest.mark.parametrize(
    "back_at",
    [
        pytest.param(2 * DAY, id="oldest-retries-first"),
        pytest.param(
            2 * DAY + 10 * MINUTE,
            id="younger-retries-first",
        ),
    ],
)
def test_device_back_after_two_days_receives_in_arrival_order(
    tmp_path: Path, back_at: float
) -> None:
    stored: list[bytes] = []

    def device_script(call: Call) -> dict[str, Outcome]:
        if call.at < back_at:
            return refused(call)
        stored.append(call.data.split(b"\r\n", 1)[1])
        return accepted(call)

    h = Harness(tmp_path, {A: device(A)}, {"device": device_script})
    # Retry timers end up an hour apart, each message at its own phase: the one received
    # at 0:10 retries at xx:18, the others at xx:08.
    arrivals = [0.0, 10 * MINUTE, HOUR, 5 * HOUR, 20 * HOUR, 47 * HOUR]
    sent: list[bytes] = []
    for i, t in enumerate(arrivals):
        h.run_until(t)
        sent.append(BODY.replace(b"Subject: hello", b"Subject: message %d" % i))
        h.accept([A], sent[-1])

    h.run_until(back_at + SCHEDULE[-1] + MINUTE)

    assert sorted(stored) == sorted(sent)
    assert stored == sent


def test_message_deferred_past_its_lifetime_bounces_with_a_dsn(tmp_path: Path) -> None:
    lifetime = DAY
    h = Harness(
        tmp_path,
        {A: device(A), B: device(B)},
        {"device": refused},
        lifetime=lifetime,
        delay_warning=2 * DAY,  # no "delayed" report before the expiry here
    )
    env = h.accept([A, B])
    h.run_until(lifetime - STEP)
    assert h.spool.dsns() == []
    assert h.spool.queued_ids() == [env.qid]
    attempts = len(h.deliverer.to("device"))
    assert attempts > 20

    h.run_until(lifetime + STEP)

    # Expired: both recipients finished, the message gone, no more attempts.
    assert h.spool.queued_ids() == []
    assert env.qid not in h.queue.envelopes
    assert ("alice@example.com", "expired") in h.events_of(env.qid)
    assert ("bob@example.com", "expired") in h.events_of(env.qid)
    [(dsn_env, dsn)] = h.spool.dsns()
    assert (dsn_env.sender, dsn_env.recipients, dsn_env.kind) == ("", [SENDER], "dsn")

    msg, per_message, blocks, headers = parse_dsn(dsn)
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@edge.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert per_message["Reporting-MTA"] == "dns; edge.test"
    assert per_message["Arrival-Date"]
    assert [b["Final-Recipient"] for b in blocks] == [f"rfc822; {A}", f"rfc822; {B}"]
    for block in blocks:
        assert block["Action"] == "failed"
        assert re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", block["Status"]), block["Status"]
        assert block["Status"] == "5.4.1"  # the temporary 4.4.1 that ran out of time
        # The device's address on the private network is never shown to a sender.
        assert block["Diagnostic-Code"] == f"smtp; {replies.D451_DEVICE_UNREACHABLE.status}"
        assert block["Remote-MTA"] is None
        assert "100.64.0.7" not in dsn.decode("utf-8", "replace")
    # The original header section comes back, its body does not.
    assert "Subject: hello" in headers
    assert "Message-ID: <m1@sender.test>" in headers
    assert "never goes back" not in headers
    assert "never goes back" not in dsn.decode("utf-8", "replace")
    assert b"\n" not in dsn.replace(b"\r\n", b"")  # CRLF line ends only

    # The DSN itself went out to the sender's MX, and nothing more happens afterwards.
    [out] = h.deliverer.to("mx")
    assert out.sender == "" and out.recipients == [SENDER] and out.data == dsn
    h.run_until(lifetime + 10 * HOUR)
    assert len(h.deliverer.to("device")) == attempts + 1
    assert len(h.spool.dsns()) == 1


def test_a_passing_fault_of_ours_reaches_no_report_as_exception_text(tmp_path: Path) -> None:
    """A fault of the edge's own (here the disk) met on every attempt until the message
    expires: the sender's reports name the failure, never the exception's text."""

    def disk_full(call: Call) -> dict[str, Outcome]:
        raise OSError(28, "No space left on device", "/srv/tailpost/spool/seg-000042")

    h = Harness(tmp_path, {A: device(A)}, {"device": disk_full}, lifetime=DAY, delay_warning=HOUR)
    env = h.accept([A])
    h.run_until(DAY + STEP)

    dsns = [dsn for _env, dsn in dsn_of(h, env.qid)]
    assert len(dsns) == 2  # "delayed", then "failed"
    for dsn in dsns:
        text = dsn.decode("utf-8", "replace")
        for leak in ("Errno", "/srv/", "OSError", "No space left"):
            assert leak not in text, (leak, text)
        _msg, _per_message, [block], _headers = parse_dsn(dsn)
        assert str(block["Diagnostic-Code"]).strip().startswith("smtp; 451 4.4.1 ")


def test_expiry_comes_at_the_lifetime_even_between_scheduled_retries(tmp_path: Path) -> None:
    lifetime = 2 * HOUR + 17 * MINUTE  # not on a retry of the schedule
    h = Harness(tmp_path, {A: device(A)}, {"device": refused}, lifetime=lifetime)
    env = h.accept([A])
    h.run_until(lifetime - STEP)
    assert h.spool.queued_ids() == [env.qid]
    h.run_until(lifetime + STEP)
    assert h.spool.queued_ids() == []
    assert h.deliverer.to("device")[-1].at == pytest.approx(lifetime, abs=STEP)
    assert len(dsn_of(h, env.qid)) == 1


def test_delayed_dsn_is_sent_once_after_the_delay_warning(tmp_path: Path) -> None:
    h = Harness(tmp_path, {A: device(A)}, {"device": refused})
    env = h.accept([A])
    h.run_until(4 * HOUR - STEP)
    assert h.spool.dsns() == []

    h.run_until(5 * HOUR)

    [(dsn_env, dsn)] = h.spool.dsns()
    assert (dsn_env.sender, dsn_env.recipients, dsn_env.kind) == ("", [SENDER], "dsn")
    msg, per_message, [block], headers = parse_dsn(dsn)
    assert msg["Subject"].startswith("Delayed Mail")
    assert per_message["X-Tailpost-Queue-ID"] == env.qid
    assert block["Final-Recipient"] == f"rfc822; {A}"
    assert block["Action"] == "delayed"
    assert re.fullmatch(r"4\.\d{1,3}\.\d{1,3}", block["Status"]), block["Status"]
    assert block["Will-Retry-Until"]
    assert "Subject: hello" in headers
    assert h.spool.queued_ids()[0] == env.qid  # still being retried
    assert h.spool.entry(env.qid).warned

    h.run_until(2 * DAY)
    assert len(h.spool.dsns()) == 1

    # Not again after a restart either: the warning is remembered in the spool.
    now = h.clock.seconds()
    h.queue.stop()
    again = Harness(tmp_path, {A: device(A)}, {"device": refused}, start_at=now)
    again.queue.start()
    again.run_until(now + DAY)
    assert again.spool.dsns() == []
    assert len(again.deliverer.to("device")) > 10
    assert again.spool.queued_ids() == [env.qid]


def test_permanent_refusal_by_the_old_mx_bounces_at_once(tmp_path: Path) -> None:
    def old_mx(call: Call) -> dict[str, Outcome]:
        return dict.fromkeys(
            call.recipients,
            Outcome(550, "5.1.1 <bob@example.com>: no such user", "mx1.old.test:25"),
        )

    h = Harness(tmp_path, {A: device(A), B: upstream(B)}, {"upstream": old_mx})
    env = h.accept([A, B])
    h.clock.advance(0)

    [to_old] = h.deliverer.to("upstream")
    assert to_old.target == Target(
        kind="upstream",
        key="upstream:route1",
        hosts=(("192.0.2.25", 25), ("192.0.2.25", 2525)),  # resolved by the router
        starttls=True,
        tls_modes=("starttls", "starttls"),  # what the route says, or STARTTLS
        names=("mx1.old.test", "mx2.old.test"),
    )
    assert to_old.recipients == [B]
    assert to_old.data == BODY  # only the device gets the queue id header
    [to_device] = h.deliverer.to("device")
    assert to_device.data == b"X-Tailpost-Queue-ID: " + env.qid.encode() + b"\r\n" + BODY

    assert h.spool.queued_ids() == []
    assert (B, "bounced") in h.events_of(env.qid)
    assert (A, "delivered") in h.events_of(env.qid)
    [(dsn_env, dsn)] = dsn_of(h, env.qid)
    assert dsn_env.recipients == [SENDER]
    _msg, _per_message, [block], _headers = parse_dsn(dsn)
    assert block["Final-Recipient"] == f"rfc822; {B}"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx1.old.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.com>: no such user"
    h.run_until(DAY)
    assert len(h.deliverer.to("upstream")) == 1


@pytest.mark.parametrize(
    ("sender", "extra"),
    [("", {}), (SENDER, {"spam": True})],
    ids=["null-sender", "spam"],
)
@pytest.mark.parametrize("failure", ["permanent", "expired", "delayed"])
def test_no_dsn_to_the_null_sender_nor_for_spam(
    tmp_path: Path, sender: str, extra: dict[str, Any], failure: str
) -> None:
    def device_script(call: Call) -> dict[str, Outcome]:
        if failure == "permanent":
            return dict.fromkeys(call.recipients, Outcome(550, "5.1.1 no such user"))
        return refused(call)

    h = Harness(tmp_path, {A: device(A)}, {"device": device_script}, lifetime=DAY)
    env = h.accept([A], sender=sender, extra=extra)
    h.run_until(DAY + HOUR if failure != "delayed" else 5 * HOUR)

    assert h.spool.dsns() == []
    assert h.deliverer.to("mx") == []
    if failure == "delayed":
        assert h.spool.queued_ids() == [env.qid]
    else:
        assert h.spool.queued_ids() == []
        final = "bounced" if failure == "permanent" else "expired"
        assert (A, final) in h.events_of(env.qid)


def test_a_dsn_that_cannot_be_delivered_is_not_reported_again(tmp_path: Path) -> None:
    def sender_mx(call: Call) -> dict[str, Outcome]:
        return dict.fromkeys(call.recipients, Outcome(550, "5.1.1 unknown sender"))

    def device_script(call: Call) -> dict[str, Outcome]:
        return dict.fromkeys(call.recipients, Outcome(550, "5.1.1 no such user"))

    h = Harness(tmp_path, {A: device(A)}, {"device": device_script, "mx": sender_mx})
    h.accept([A])
    h.run_until(HOUR)

    assert len(h.spool.dsns()) == 1  # the bounce of the DSN makes no DSN of its own
    assert len(h.deliverer.to("mx")) == 1
    assert h.spool.queued_ids() == []


def test_dns_failure_for_a_dsn_is_retried_not_bounced(tmp_path: Path) -> None:
    resolver = MXResolver()
    resolver.failing = True
    h = Harness(
        tmp_path,
        {A: device(A)},
        {"device": lambda c: dict.fromkeys(c.recipients, Outcome(550, "5.1.1 no"))},
        resolver=resolver,
    )
    h.accept([A])
    h.clock.advance(0)
    [(dsn_env, _dsn)] = h.spool.dsns()
    assert h.spool.queued_ids() == [dsn_env.qid]
    assert (SENDER, "deferred") in h.events_of(dsn_env.qid)
    assert h.deliverer.to("mx") == []

    resolver.failing = False
    h.run_until(SCHEDULE[0] + STEP)

    [out] = h.deliverer.to("mx")
    assert out.target.hosts == (("192.0.2.25", 25),)
    assert out.target.names == ("mx.sender.test",)
    assert h.spool.queued_ids() == []


def test_dsn_goes_to_the_senders_mx_found_by_the_router(tmp_path: Path, dns_server: Any) -> None:
    dns_server.zone.set("sender.test", "MX", [(20, "backup.sender.test"), (10, "mx.sender.test")])
    dns_server.zone.set("mx.sender.test", "A", ["192.0.2.10"])
    dns_server.zone.set("backup.sender.test", "A", ["192.0.2.20"])
    resolver = DNSResolver(["127.0.0.1"], port=dns_server.port, timeout=3)
    h = Harness(
        tmp_path,
        {A: device(A)},
        {"device": lambda c: dict.fromkeys(c.recipients, Outcome(550, "5.1.1 no such user"))},
        resolver=resolver,
    )
    env = h.accept([A])
    h.clock.advance(0)

    assert (A, "inbound") in h.routed
    assert (SENDER, "dsn") in h.routed
    [out] = h.deliverer.to("mx")
    assert out.target == Target(
        kind="mx",
        key="mx:sender.test",
        hosts=(("192.0.2.10", 25), ("192.0.2.20", 25)),
        starttls=True,
        tls_modes=("starttls", "starttls"),
        names=("mx.sender.test", "backup.sender.test"),
    )
    assert out.sender == ""
    assert out.recipients == [SENDER]
    assert not out.data.startswith(b"X-Tailpost-Queue-ID")
    assert parse_dsn(out.data)[1]["X-Tailpost-Queue-ID"] == env.qid
    assert h.spool.queued_ids() == []
