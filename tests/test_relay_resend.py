"""The relay recognises a device's resend of a message it took (the device crashed after the
250, or lost the connection before reading it): the first queue id again, nothing spooled.
On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from edge.outbound.resend import RESEND_WINDOW, message_id, message_key
from edge.store import Store
from edge.store.outbound import OutboundStore
from tests.test_relay_policy import _device, _plain, _say, _session
from tests.test_store_support import database_fixture, store_fixture  # noqa: F401

MESSAGE = (
    "From: alice@home.test\r\nTo: bob@far.test\r\nSubject: once\r\n"
    "Message-ID: <m1@home.test>\r\n\r\nhello\r\n."
)
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)


class Relayed:
    """The relay's commit and intake: commits fail while `failing`."""

    def __init__(self) -> None:
        self.committed: list[Any] = []
        self.accepted: list[Any] = []
        self.failing = False

    def commit(self, writer: Any, envelope: Any) -> defer.Deferred[None]:
        if self.failing:
            return defer.fail(OSError("disk full"))
        self.committed.append(envelope)
        return defer.succeed(None)


def _send(session: Any, message: str = MESSAGE, rcpts: tuple[str, ...] = ("bob@far.test",)) -> str:
    assert _say(session, "MAIL FROM:<alice@home.test>").startswith("250 ")
    for rcpt in rcpts:
        assert _say(session, f"RCPT TO:<{rcpt}>").startswith("250 ")
    assert _say(session, "DATA").startswith("354 ")
    return _say(session, message)


def _world(store: Store, tmp_path: Path, clock: Clock) -> tuple[Any, Relayed]:
    device_id, key = _device(store)
    store.create_route("home.test", type="byod", connector_id=device_id, status="active")
    relayed = Relayed()
    session = _session(store, LOOPBACK, tmp_path, relayed.commit, relayed.accepted.append, clock)
    _say(session, "EHLO laptop.test")
    assert _say(session, f"AUTH PLAIN {_plain(device_id, key)}").startswith("235 ")
    return session, relayed


def test_the_same_message_twice_is_spooled_once_with_one_queue_id(
    store: Store, tmp_path: Path
) -> None:
    clock = Clock()
    clock.advance(1_800_000_000)
    session, relayed = _world(store, tmp_path, clock)
    first = _send(session)
    assert first.startswith("250 2.0.0 Queued as ")
    again = _send(session)
    assert again == first  # the device keeps the same queue id
    assert len(relayed.committed) == 1 and len(relayed.accepted) == 1
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    # Near the end of the window: still the same answer.
    clock.advance(RESEND_WINDOW - 60)
    assert _send(session) == first and len(relayed.committed) == 1

    # The same Message-ID to other recipients (the rest of a message after a 4xx), or
    # with other content, is another message.
    other = _send(session, rcpts=("carol@far.test",))
    changed = _send(session, MESSAGE.replace("hello", "hello again"))
    assert len({first, other, changed}) == 3 and len(relayed.committed) == 3

    # Past the window, the first message is not looked at any more.
    clock.advance(120)
    late = _send(session)
    assert late.startswith("250 2.0.0 Queued as ") and late != first
    assert len(relayed.committed) == 4


def test_a_message_whose_commit_failed_is_taken_when_sent_again(
    store: Store, tmp_path: Path
) -> None:
    session, relayed = _world(store, tmp_path, Clock())
    relayed.failing = True
    assert _send(session).startswith("451 4.3.0 ")
    relayed.failing = False
    taken = _send(session)
    assert taken.startswith("250 2.0.0 Queued as ") and len(relayed.committed) == 1
    assert _send(session) == taken and len(relayed.committed) == 1


def test_a_message_without_one_message_id_is_never_a_resend(store: Store, tmp_path: Path) -> None:
    session, relayed = _world(store, tmp_path, Clock())
    bare = "From: alice@home.test\r\nSubject: no id\r\n\r\nhello\r\n."
    two = "From: alice@home.test\r\nMessage-ID: <a@x>\r\nMessage-ID: <b@x>\r\n\r\nhello\r\n."
    answers = {_send(session, m) for m in (bare, bare, two, two)}
    assert len(answers) == 4 and len(relayed.committed) == 4


def test_the_key_and_its_lookup_in_the_store(store: Store) -> None:
    laptop, phone = store.create_device("laptop"), store.create_device("phone")
    outbound = OutboundStore(store)
    at = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    outbound.record("Q0", laptop.id, laptop.account_id, "a@home.test", at)
    assert outbound.relayed_before(laptop.id, "k" * 64, at) is None  # no key stored yet
    later = at + timedelta(hours=1)
    outbound.record("Q1", laptop.id, laptop.account_id, "a@home.test", at, "k" * 64)
    outbound.record("Q2", laptop.id, laptop.account_id, "a@home.test", later, "k" * 64)
    assert outbound.relayed_before(laptop.id, "k" * 64, at) == "Q1"  # the first
    assert outbound.relayed_before(laptop.id, "k" * 64, at + timedelta(minutes=1)) == "Q2"
    assert outbound.relayed_before(laptop.id, "k" * 64, at + timedelta(hours=2)) is None
    assert outbound.relayed_before(phone.id, "k" * 64, at) is None  # only the same device's
    assert outbound.relayed_before(laptop.id, "j" * 64, at) is None


def test_message_id_and_key() -> None:
    data = b"Subject: x\r\nMessage-Id:\r\n <a@b>\r\n\r\nMessage-ID: <body@x>\r\n"
    assert message_id(data) == "<a@b>"
    assert message_id(b"Subject: x\r\n\r\nMessage-ID: <body@x>\r\n") is None
    assert message_id(b"Message-ID:  \r\n\r\n") is None
    key = message_key(data, "a@home.test", ["b@far.test", "c@far.test"])
    assert key is not None and len(key) == 64
    assert key == message_key(data, "A@home.test", ["c@far.test", "b@far.test"])
    assert key != message_key(data, "a@home.test", ["b@far.test"])
    assert key != message_key(data + b"x", "a@home.test", ["b@far.test", "c@far.test"])
