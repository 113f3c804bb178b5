"""The device's outbound queue: durable submission, the Sent copy, events, restart and order.

The queue runs on a real Maildir and a real queue directory; disk work runs synchronously
here (`run_now`) or in the reactor's thread pool, and time is a `Clock`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, threads
from twisted.internet.task import Clock

from connector.outbound.events import OutboundEventLog, OutboundEvents
from connector.outbound.message import ItemIds, complete
from connector.outbound.outbox import ITEM_ID
from connector.outbound.queue import OutboundItem, OutboundQueue
from maildir import Maildir, MessageInfo

ALICE = "alice@example.test"
BOB = "bob@example.net"
CAROL = "carol@example.org"


def run_now(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(fn, *args, **kwargs)


def message(subject: str, sender: str = ALICE, extra: str = "") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: {BOB}\r\nSubject: {subject}\r\n{extra}\r\n"
        f"Hello, {subject}.\r\n"
    ).encode()


def result(d: defer.Deferred[Any]) -> Any:
    """The value of a Deferred that has fired (its failure raised)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    value = out[0]
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


class Device:
    """A queue over a Maildir and an event log under `root`, as the device lays them out."""

    def __init__(self, root: Path, clock: Clock | None = None, **kwargs: Any) -> None:
        self.root = root
        self.clock = clock or Clock()
        self.clock.advance(1_765_000_000)
        self.maildir = Maildir(root / "mail", hostname="device.test")
        self.log = OutboundEventLog(root / "device" / "outbound-events.jsonl", self.clock.seconds)
        self.events = OutboundEvents(self.log, kwargs.pop("run_blocking", run_now))
        self.stored: list[MessageInfo] = []
        self.queue = OutboundQueue(
            root / "device" / "outbound",
            self.maildir,
            self.events,
            clock=self.clock,
            run_blocking=kwargs.pop("run_blocking_queue", run_now),
            hostname="device.test",
            on_stored=self.stored.append,
            **kwargs,
        )

    def queue_files(self) -> list[str]:
        return sorted(p.name for p in (self.root / "device" / "outbound" / "queue").iterdir())


def test_submit_is_on_disk_with_its_sent_copy_and_event_when_it_fires(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    item = result(dev.queue.submit(ALICE, [BOB, CAROL], message("one"), source="submission"))
    assert isinstance(item, OutboundItem)
    assert ITEM_ID.fullmatch(item.id) and item.status == "submitted"
    assert item.recipients == [BOB, CAROL] and item.subject == "one"

    # The message and its envelope, in one file in queue/.
    assert dev.queue_files() == [f"{item.id}.msg"]
    raw = (tmp_path / "device" / "outbound" / "queue" / f"{item.id}.msg").read_bytes()
    head, _, data = raw.partition(b"\n")
    envelope = json.loads(head)
    assert envelope["sender"] == ALICE and envelope["recipients"] == [BOB, CAROL]
    assert envelope["source"] == "submission"
    assert data.endswith(b"Hello, one.\r\n")
    # The MSA's additions (RFC 6409 §8): a Date and the Message-ID the item reports.
    assert data.startswith(b"Date: ")
    assert f"Message-ID: {item.message_id}\r\n".encode() in data
    assert item.message_id == f"<{item.id.lower()}@device.test>"

    # The Sent copy: the same message, \Seen, and IMAP is told of it.
    sent = dev.maildir.folder("Sent").messages()
    assert len(sent) == 1 and sent[0].flags == frozenset({"\\Seen"})
    assert dev.maildir.folder("Sent").read(sent[0].id) == data
    assert [i.id for i in dev.stored] == [sent[0].id]

    # The event.
    (event,) = dev.log.recent(10)
    assert event.status == "submitted" and event.proxy_message_id == item.id
    assert event.internet_message_id == item.message_id and event.subject == "one"
    assert event.to_dict()["direction"] == "outbound"
    assert "recipient" not in event.to_dict()


def test_the_message_id_it_carries_is_kept(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    data = message("two", extra="Message-ID: <own@example.test>\r\nDate: Mon, 7 Dec 2026\r\n")
    item = result(dev.queue.submit(ALICE, [BOB], data, source="api"))
    assert item.message_id == "<own@example.test>"
    stored = dev.maildir.folder("Sent").read(dev.maildir.folder("Sent").messages()[0].id)
    assert stored == data  # nothing added


def test_bare_line_feeds_become_crlf(tmp_path: Path) -> None:
    data, _mid = complete(b"Subject: x\nMessage-ID: <a@b>\nDate: now\n\nline\nend", "<x@y>", "d")
    assert data == b"Subject: x\r\nMessage-ID: <a@b>\r\nDate: now\r\n\r\nline\r\nend\r\n"


@pytest.mark.parametrize(
    ("sender", "recipients", "data"),
    [
        ("", [BOB], b"Subject: x\r\n\r\nx\r\n"),
        ("a b@example.test", [BOB], b"Subject: x\r\n\r\nx\r\n"),
        (ALICE, [], b"Subject: x\r\n\r\nx\r\n"),
        (ALICE, ["<bob@example.net>"], b"Subject: x\r\n\r\nx\r\n"),
        (ALICE, ["bob@example.net\r\nRCPT TO:<x@y>"], b"Subject: x\r\n\r\nx\r\n"),
        (ALICE, [BOB], b"  \r\n"),
    ],
)
def test_bad_submissions_are_refused_and_nothing_is_stored(
    tmp_path: Path, sender: str, recipients: list[str], data: bytes
) -> None:
    dev = Device(tmp_path)
    with pytest.raises(ValueError):
        result(dev.queue.submit(sender, recipients, data, source="api"))
    assert dev.queue_files() == []
    assert dev.maildir.folder("Sent").messages() == []
    assert dev.log.recent(10) == []


def test_too_many_recipients_are_refused(tmp_path: Path) -> None:
    dev = Device(tmp_path, max_recipients=2)
    with pytest.raises(ValueError, match="more than 2"):
        result(dev.queue.submit(ALICE, [BOB, CAROL, "d@x.test"], message("x"), source="api"))


def test_a_failed_queue_write_leaves_no_sent_copy(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    tmp = tmp_path / "device" / "outbound" / "tmp"
    tmp.rmdir()
    tmp.write_bytes(b"")  # not a directory: the queue file cannot be written
    with pytest.raises(OSError):
        result(dev.queue.submit(ALICE, [BOB], message("x"), source="api"))
    assert dev.maildir.folder("Sent").messages() == []
    assert dev.log.recent(10) == []
    assert dev.queue_files() == [] and dev.queue.queued == []


def test_ids_increase_even_when_the_clock_goes_back(tmp_path: Path) -> None:
    t = [1000.0]
    ids = ItemIds(lambda: t[0])
    made = [ids.new() for _ in range(5)]
    t[0] = 10.0
    made += [ids.new() for _ in range(3)]
    assert made == sorted(made) and len(set(made)) == len(made)
    again = ItemIds(lambda: 5.0, last=made[-1])
    assert again.new() > made[-1]


def test_a_restart_reloads_everything_not_relayed_in_submission_order(tmp_path: Path) -> None:
    dev = Device(tmp_path)
    items = [
        result(dev.queue.submit(ALICE, [BOB], message(f"m{i}"), source="api")) for i in range(5)
    ]
    assert dev.queue.queued == [i.id for i in items]
    # A file a crash left half-written in tmp/ is not a message.
    (tmp_path / "device" / "outbound" / "tmp" / "out_leftover.msg").write_bytes(b"{")

    again = Device(tmp_path, clock=Clock())
    assert again.queue.queued == [i.id for i in items]
    assert list((tmp_path / "device" / "outbound" / "tmp").iterdir()) == []
    # New ids go after the reloaded ones, even with a clock that starts earlier.
    later = result(again.queue.submit(ALICE, [BOB], message("m5"), source="api"))
    assert later.id > items[-1].id
    assert again.queue.queued[-1] == later.id


def test_per_address_mode_files_the_sent_copy_under_the_senders_folder(tmp_path: Path) -> None:
    dev = Device(tmp_path, per_address=True)
    result(dev.queue.submit(ALICE, [BOB], message("x"), source="submission"))
    folder = "alice@example_test.Sent"
    assert folder in dev.maildir.list_folders()
    (sent,) = dev.maildir.folder(folder).messages()
    assert sent.flags == frozenset({"\\Seen"})
    assert dev.maildir.folder("Sent").messages() == []


def test_submit_through_the_thread_pool(tmp_path: Path, in_reactor: Any) -> None:
    """As the device runs it: disk work in the reactor's thread pool; when the Deferred
    fires, the file and the Sent copy are there."""

    def build() -> Device:
        return Device(
            tmp_path,
            clock=Clock(),
            run_blocking=threads.deferToThread,
            run_blocking_queue=threads.deferToThread,
        )

    dev = in_reactor(build)
    item = in_reactor(dev.queue.submit, ALICE, [BOB], message("pool"), source="submission")
    assert dev.queue_files() == [f"{item.id}.msg"]
    assert len(dev.maildir.folder("Sent").messages()) == 1
    assert [e.status for e in dev.log.recent(5)] == ["submitted"]
