"""Crash safety with real processes and SIGKILL: acknowledged mail arrives exactly once.

(a) killed while messages are being written to the spool, before some of them were
acknowledged; (b) killed after 250 but before delivery; (c) killed after the connector's 250
but before the edge recorded it. In every case each acknowledged message ends up in the
Maildir exactly once, and an unacknowledged one at most once.
"""

from __future__ import annotations

import email
import shutil
import signal
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from edge.spool.scan import recoverable
from tests.processes import Process, edge_and_device, host_port, maildir_new, spool_queue, wait_for


def message(n: int) -> bytes:
    return (
        f"From: sender@outside.test\r\nTo: me@home.test\r\nSubject: crash {n}\r\n"
        f"Message-ID: <crash-{n}@outside.test>\r\n\r\nbody {n}\r\n"
    ).encode()


def stored_ids(device: Process) -> Counter[str]:
    counts: Counter[str] = Counter()
    new = maildir_new(device)
    cur = new.parent / "cur"
    for folder in (new, cur):
        for path in folder.iterdir():
            msg = email.message_from_bytes(path.read_bytes())
            counts[str(msg["Message-ID"])] += 1
    return counts


def send_many(mx: str, numbers: range, acked: list[int], stop: threading.Event) -> None:
    host, port = host_port(mx)
    try:
        with smtplib.SMTP(host, port, timeout=10) as smtp:
            for n in numbers:
                if stop.is_set():
                    return
                smtp.sendmail("sender@outside.test", ["me@home.test"], message(n))
                acked.append(n)
    except (OSError, smtplib.SMTPException):
        return  # the edge died under us: what was not acknowledged is not ours to keep


def senders_of(
    mx: str, acked: list[int], stop: threading.Event, each: int = 60
) -> list[threading.Thread]:
    """Four clients of `each` messages (numbered apart), not started."""
    return [
        threading.Thread(target=send_many, args=(mx, range(i * each, (i + 1) * each), acked, stop))
        for i in range(4)
    ]


def settle(edge: Process, device: Process) -> None:
    """Until the edge's spool holds no message with an unfinished recipient."""
    wait_for(lambda: not recoverable(spool_queue(edge).parent), timeout=30)


def check_exactly_once(device: Process, acked: list[int], tried: int) -> None:
    counts = stored_ids(device)
    for n in acked:
        assert counts[f"<crash-{n}@outside.test>"] == 1, f"message {n}: {counts}"
    assert all(c == 1 for c in counts.values()), counts
    assert len(counts) <= tried


def interrupted_while_accepting(
    tmp_path: Path,
    interrupt: Callable[[Process], None],
    each: int = 60,
    ready: Callable[[Process], bool] = lambda edge: True,
) -> None:
    """`interrupt(edge)` in the middle of a stream of commits (once 40 are answered and
    `ready(edge)`), with the device down; then the device and the edge start, and every
    message answered 250 arrives once."""
    edge, device = edge_and_device(tmp_path)
    listeners = edge.start()
    acked: list[int] = []
    stop = threading.Event()
    senders = senders_of(listeners["mx"], acked, stop, each)
    try:
        for t in senders:
            t.start()
        wait_for(lambda: len(acked) >= 40 and ready(edge), timeout=60, interval=0.005)
        interrupt(edge)
        stop.set()
        for t in senders:
            t.join(15)
        assert len(acked) >= 40
        device.start()
        edge.start()
        settle(edge, device)
        check_exactly_once(device, list(acked), 4 * each)
    finally:
        stop.set()
        edge.stop()
        device.stop()


def test_kill_while_accepting_and_before_delivery(tmp_path: Path) -> None:
    """(a) and (b): SIGKILL in the middle of a stream of commits, with the device down."""
    interrupted_while_accepting(tmp_path, Process.kill)


def test_stop_while_accepting_ends_by_itself_and_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM in the middle of a stream of commits: the edge waits for the batches with
    its sync process, closes its spool and exits on its own."""

    def stop_cleanly(edge: Process) -> None:
        proc = edge.proc
        assert proc is not None
        proc.terminate()
        # Ended by itself: twistd ends a clean stop with the signal that asked for it.
        assert proc.wait(20) == -signal.SIGTERM
        edge.proc = None
        assert "Main loop terminated." in edge.log()
        assert "closed with a batch unanswered" not in edge.log()
        # The segment made ahead is gone: every segment left holds answered mail.
        segments = {p.stem for p in spool_queue(edge).glob("*.seg")}
        assert segments == {e.batch for e in recoverable(spool_queue(edge).parent)}

    def made_ahead(edge: Process) -> bool:  # the next segment exists: the stop must remove it
        return len(list(spool_queue(edge).glob("*.seg"))) >= 2

    interrupted_while_accepting(tmp_path, stop_cleanly, each=2000, ready=made_ahead)


def test_kill_while_delivering(tmp_path: Path) -> None:
    """(c), by chance: SIGKILL as soon as deliveries to the device are under way."""
    edge, device = edge_and_device(tmp_path)
    device.start()
    listeners = edge.start()
    acked: list[int] = []
    stop = threading.Event()
    try:
        send_many(listeners["mx"], range(80), acked, stop)
        wait_for(lambda: any(maildir_new(device).iterdir()), timeout=30, interval=0.002)
        edge.kill()
        edge.start()
        settle(edge, device)
        check_exactly_once(device, acked, 80)
        assert len(acked) == 80
    finally:
        edge.stop()
        device.stop()


def test_redelivery_after_lost_record_is_stored_once(tmp_path: Path) -> None:
    """(c), for certain: the edge comes back with a spool that never recorded a delivery."""
    edge, device = edge_and_device(tmp_path)
    listeners = edge.start()
    acked: list[int] = []
    try:
        send_many(listeners["mx"], range(5), acked, threading.Event())
        edge.kill()  # before any delivery: the device is down
        snapshot = tmp_path / "spool-before-delivery"
        shutil.copytree(spool_queue(edge), snapshot)
        device.start()
        edge.start()
        settle(edge, device)
        assert sum(stored_ids(device).values()) == 5
        # The connector said 250 for all five; now the edge loses that record (as if it was
        # killed right after those 250s) and delivers all of them again.
        edge.kill()
        shutil.rmtree(spool_queue(edge))
        shutil.copytree(snapshot, spool_queue(edge))
        edge.start()
        settle(edge, device)
        time.sleep(0.5)
        check_exactly_once(device, acked, 5)
        assert len(acked) == 5
    finally:
        edge.stop()
        device.stop()
