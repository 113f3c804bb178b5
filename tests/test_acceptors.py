"""Acceptor processes (`edge.mx_processes`): more MX listeners on one port, one spool.

With two processes, the kernel spreads connections over both, every message lands exactly
once, an acceptor that dies is started again, and messages an acceptor accepted survive a
SIGKILL of the whole edge. The hand-over itself is checked on the spool: a batch that cannot
be handed over is undone, and a segment goes only once it is sealed.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.python.failure import Failure

from edge.config import Config, config_from_json, config_to_json
from edge.spool.spool import Envelope, Spool
from tests.processes import Process, allinone_config, host_port, spool_queue, wait_for
from tests.test_interop import (
    SMTP_SOURCE,
    SWAKS,
    edge_queue_id,
    needs_smtp_source,
    needs_swaks,
    with_subject,
)


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"edge.inbound.acceptor" in cmdline:
            found.append(int(entry))
    return found


def tcp_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


@pytest.fixture
def two_processes(tmp_path: Path) -> Iterator[tuple[Process, str, int]]:
    proc = Process(
        "tailpost", tmp_path, allinone_config(hostname="mx.interop.test", mx_processes=2)
    )
    try:
        host, port = host_port(proc.start()["mx"])
        assert proc.proc is not None
        main_pid = proc.proc.pid
        assert wait_for(lambda: "acceptor 1 is listening" in proc.log() or None, timeout=30)
        assert len(children(main_pid)) == 1
        yield proc, host, port
    finally:
        proc.stop()


def send(host: str, port: int, subject: str) -> None:
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.sendmail(
            "someone@sender.test",
            ["demo@example.test"],
            f"From: someone@sender.test\r\nSubject: {subject}\r\n\r\nhello\r\n",
        )


def test_connections_are_spread_over_both_processes(
    two_processes: tuple[Process, str, int],
) -> None:
    proc, host, port = two_processes
    assert proc.proc is not None
    main_pid = proc.proc.pid
    [child] = children(main_pid)
    before = {main_pid: tcp_sockets(main_pid), child: tcp_sockets(child)}
    held = []
    try:
        for _ in range(24):
            conn = socket.create_connection((host, port), timeout=10)
            assert conn.recv(512).startswith(b"220 ")
            held.append(conn)
        after = {pid: tcp_sockets(pid) for pid in before}
    finally:
        for conn in held:
            conn.close()
    gained = {pid: after[pid] - before[pid] for pid in before}
    assert sum(gained.values()) >= 24
    assert gained[main_pid] > 0 and gained[child] > 0, gained


def greetings(host: str, port: int, count: int) -> list[bytes]:
    """Open `count` connections one after another, each kept open: their first replies."""
    held, codes = [], []
    try:
        for _ in range(count):
            conn = socket.create_connection((host, port), timeout=10)
            held.append(conn)
            codes.append(conn.recv(512)[:3])
    finally:
        for conn in held:
            conn.close()
    return codes


def test_the_connection_limit_per_address_holds_over_both_processes(tmp_path: Path) -> None:
    config = allinone_config(hostname="mx.interop.test", mx_processes=2)
    config = config.replace("[edge]\n", "[edge]\nmax_connections_per_ip = 3\n", 1)
    proc = Process("tailpost", tmp_path, config)
    try:
        host, port = host_port(proc.start()["mx"])
        assert wait_for(lambda: "acceptor 1 is listening" in proc.log() or None, timeout=30)
        # Twelve connections, spread by the kernel over the two processes: three in all
        # are let in, wherever they land (counted per process, it would be up to six).
        codes = greetings(host, port, 12)
        assert codes.count(b"220") == 3 and codes.count(b"421") == 9, codes
        # Closed, in whichever process: the next three are let in again.
        assert wait_for(lambda: greetings(host, port, 3) == [b"220"] * 3 or None, timeout=20)
    finally:
        proc.stop()


@needs_smtp_source
def test_every_message_lands_once_and_survives_a_kill_of_the_edge(
    two_processes: tuple[Process, str, int],
) -> None:
    proc, host, port = two_processes
    assert SMTP_SOURCE is not None
    subject = "two processes"
    result = subprocess.run(
        [SMTP_SOURCE, "-d", "-s", "20", "-m", "400", "-l", "2048"]
        + ["-f", "source@sender.test", "-t", "demo@example.test", "-M", "client.sender.test"]
        + ["-S", subject, f"{host}:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr + result.stdout
    # Everything was answered 250; kill the edge at once, whatever is still queued.
    proc.kill()
    proc.start()
    assert wait_for(lambda: len(with_subject(proc, subject)) >= 400 or None, timeout=90)
    messages = with_subject(proc, subject)
    assert len(messages) == 400
    assert len({edge_queue_id(raw) for raw in messages}) == 400


def test_an_acceptor_that_dies_is_started_again(two_processes: tuple[Process, str, int]) -> None:
    proc, host, port = two_processes
    assert proc.proc is not None
    main_pid = proc.proc.pid
    [child] = children(main_pid)
    for n in range(20):  # one connection each: the kernel spreads them over both processes
        send(host, port, f"before the kill {n}")
    for n in range(20):
        assert wait_for(lambda n=n: with_subject(proc, f"before the kill {n}") or None, timeout=30)
    queue = spool_queue(proc)
    before = set(queue.glob("*.seg"))
    assert len(before) == 2  # one segment each, appended to still
    os.kill(child, signal.SIGKILL)
    replaced = wait_for(lambda: [c for c in children(main_pid) if c != child] or None, timeout=40)
    assert replaced
    for n in range(6):
        send(host, port, f"after restart {n}")
    for n in range(6):
        assert wait_for(lambda n=n: with_subject(proc, f"after restart {n}") or None, timeout=30)
    assert "acceptor 1 exited" in proc.log()
    # The dead acceptor's segment is sealed and, its messages delivered, deleted; the edge
    # process's own stays, since it goes on appending to it.
    assert wait_for(lambda: len(before & set(queue.glob("*.seg"))) == 1 or None, timeout=30)


def test_a_batch_that_cannot_be_handed_over_is_undone(tmp_path: Path) -> None:
    def refuse(batch: str, entries: Any) -> None:
        raise BrokenPipeError("the edge process is gone")

    spool = Spool(tmp_path, on_commit=refuse, index=False)
    writer = spool.writer()
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    envelope = Envelope(writer.qid, "a@b.test", ["c@d.test"], 0.0)
    with pytest.raises(BrokenPipeError):
        spool.commit(writer, envelope)
    assert list((tmp_path / "queue").iterdir()) == []
    assert Spool(tmp_path).load() == []


def test_a_handed_over_batch_is_delivered_from_the_edges_index(tmp_path: Path) -> None:
    handed: list[tuple[str, list[Any]]] = []
    acceptor = Spool(tmp_path, on_commit=lambda b, e: handed.append((b, e)), index=False)
    edge = Spool(tmp_path)
    writer = acceptor.writer()
    writer.write(b"Subject: y\r\n\r\nbody\r\n")
    envelope = Envelope(writer.qid, "a@b.test", ["c@d.test", "e@d.test"], 0.0)
    acceptor.commit(writer, envelope)
    assert acceptor.queued_ids() == []  # the acceptor keeps no index of its own
    [(batch, entries)] = handed
    records = [e.to_record() for e in entries]
    from edge.spool.spool import SpoolEntry

    edge.adopt(batch, [SpoolEntry.from_record(r) for r in records])
    assert edge.read(envelope.qid) == b"Subject: y\r\n\r\nbody\r\n"
    edge.mark_finished(envelope.qid, {"c@d.test": "delivered", "e@d.test": "delivered"})
    edge.remove(envelope.qid)
    assert (tmp_path / "queue" / f"{batch}.seg").exists()  # until the acceptor seals it
    edge.seal(batch)
    assert not (tmp_path / "queue" / f"{batch}.seg").exists()


def test_the_configuration_reaches_an_acceptor_whole() -> None:
    config = Config()
    config.edge.mx_processes = 3
    config.edge.retry_schedule = [5.0, 10.0]
    config.checks.actions = {"spf.fail": "reject"}
    assert config_from_json(config_to_json(config)) == config


def test_batches_taken_in_during_recovery_stay_indexed(tmp_path: Path) -> None:
    from edge.spool.spool import SpoolEntry

    old = Spool(tmp_path)
    writer = old.writer()
    writer.write(b"Subject: before\r\n\r\nx\r\n")
    before = Envelope(writer.qid, "a@b.test", ["c@d.test"], 1.0)
    old.commit(writer, before)
    edge = Spool(tmp_path)
    # An acceptor's batch arrives while the edge still recovers (its file not yet scanned).
    late = Envelope("0FFFFFFFFFFFFF00000000", "a@b.test", ["e@d.test"], 2.0)
    edge.adopt("B0FFFFFFFFFFFFF00000000", [SpoolEntry(late, "B0FFFFFFFFFFFFF00000000", 0, 0)])
    recovered = edge.load()
    assert [e.qid for e in recovered] == [before.qid]
    assert sorted(edge.queued_ids()) == sorted([before.qid, late.qid])


@needs_swaks
def test_starttls_works_with_two_processes(two_processes: tuple[Process, str, int]) -> None:
    proc, host, port = two_processes
    assert SWAKS is not None
    for n in range(8):  # connections spread over both processes (by the kernel's hash)
        result = subprocess.run(
            [SWAKS, "--server", host, "--port", str(port), "--from", "tls@sender.test"]
            + ["--to", "demo@example.test", "-tls", "--header", f"Subject: tls {n}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0 and "TLS started" in result.stdout, result.stdout
    for n in range(8):
        [raw] = wait_for(lambda n=n: with_subject(proc, f"tls {n}") or None, timeout=30)
        assert b"with ESMTPS" in raw


def test_the_edge_deletes_an_acceptors_segment_only_once_it_is_sealed(tmp_path: Path) -> None:
    """The acceptor says on the pipe when it seals a segment; the edge seals the segments of
    an acceptor that exited. Until then a segment stays, though all its messages are done."""
    from twisted.internet.error import ProcessTerminated
    from twisted.internet.task import Clock

    from edge.inbound.acceptor import (
        NOTIFY_FD,
        AcceptorPool,
        _AcceptorProtocol,
        hand_over,
        hand_over_seal,
    )
    from edge.spool.segments import BLOCK

    read_end, write_end = os.pipe()
    acceptor = Spool(
        tmp_path,
        on_commit=hand_over(write_end),
        on_seal=hand_over_seal(write_end),
        index=False,
        segment_size=2 * BLOCK,  # two batches of one message each
    )
    edge = Spool(tmp_path)
    enqueued: list[Envelope] = []
    pool = AcceptorPool(Config(), Clock(), None, edge, enqueued.append, 1)
    proto = _AcceptorProtocol(pool, 1)

    def accept(subject: str) -> Envelope:
        writer = acceptor.writer()
        writer.write(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
        envelope = Envelope(writer.qid, "a@b.test", ["c@d.test"], 0.0)
        acceptor.commit(writer, envelope)
        proto.childDataReceived(NOTIFY_FD, os.read(read_end, 1 << 16))
        return envelope

    def finish(envelope: Envelope) -> None:
        edge.mark_finished(envelope.qid, {"c@d.test": "delivered"})
        edge.remove(envelope.qid)

    def segment(envelope: Envelope) -> Path:
        return tmp_path / "queue" / f"{edge.entry(envelope.qid).batch}.seg"

    try:
        first = accept("first")
        first_segment = segment(first)
        finish(first)
        assert first_segment.exists()  # the acceptor appends to it still
        second = accept("second")
        assert segment(second) == first_segment
        third = accept("third")  # into the next segment: the acceptor seals the first
        third_segment = segment(third)
        assert third_segment != first_segment
        assert first_segment.exists()  # the second message is not finished
        finish(second)
        assert not first_segment.exists()
        finish(third)
        assert third_segment.exists()
        assert [e.qid for e in enqueued] == [first.qid, second.qid, third.qid]

        pool.ended(proto, Failure(ProcessTerminated(signal=9)))  # it appends no more
        assert not third_segment.exists()
        assert Spool(tmp_path).load() == []
    finally:
        os.close(read_end)
        os.close(write_end)
