"""The SMTP servers the MX benchmark measures, each started on 127.0.0.1 in a private directory.

Peers: an aiosmtpd discard sink, Postfix's `smtp-sink`, a private Postfix instance whose
smtpd accepts into its own queue (its own config and queue directories under the run's
temporary directory, messages put on hold so nothing is ever delivered), and the tailpost
edge, durable (`twistd tailpost-edge`) or discarding (`discard_edge.py`, the checks run
and the message is dropped), with a null DNS server so its
checks never query beyond this machine; and, to read the edge's figures against, the edge's
SMTP protocol layer alone behind a policy that accepts everything. Run as a script
(`null-dns`, `protocol-only`) it serves one of the last two and prints its port. The
outbound benchmark's servers (outbound_peers.py) are built of the same pieces.

Nothing here listens on anything but 127.0.0.1, touches the machine's own mail setup, or
leaves a process running: every server is stopped by the context that started it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TWISTD = str(Path(sys.executable).parent / "twistd")
BENCH_DOMAIN = "bench.test"
BENCH_RCPT = f"rcpt@{BENCH_DOMAIN}"
# What failed to start or run; raised by a server or a load generator, noted in the report.
FAILURES = (RuntimeError, OSError, TimeoutError, subprocess.TimeoutExpired)

Server = TypeVar("Server")


class PeerUnavailable(RuntimeError):
    """A peer cannot run here (missing tool or privileges); the reason says which."""


def tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_smtp(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    """Wait until a 220 greeting comes from 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no SMTP greeting on 127.0.0.1:{port} within {timeout:g} s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Peer:
    """A started server: its name, port, and the pid whose memory counts as its own."""

    def __init__(self, name: str, port: int, pid: int | None) -> None:
        self.name = name
        self.port = port
        self.pid = pid


@contextlib.contextmanager
def aiosmtpd_sink(workdir: Path) -> Iterator[Peer]:
    port = free_port()
    log = open(workdir / "aiosmtpd.log", "wb")  # noqa: SIM115
    cmd = [PYTHON, "-m", "aiosmtpd", "-n", "-c", "aiosmtpd.handlers.Sink"]
    proc = subprocess.Popen([*cmd, "-l", f"127.0.0.1:{port}"], stdout=log, stderr=log)
    try:
        wait_smtp(port, proc)
        yield Peer("aiosmtpd sink", port, proc.pid)
    finally:
        stop_process(proc)
        log.close()


@contextlib.contextmanager
def smtp_sink(
    workdir: Path, name: str, options: tuple[str, ...] = (), piped: bool = False
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Postfix's `smtp-sink` with `options` on a free port of 127.0.0.1, logging to
    `workdir/<name>.log` (its standard output piped instead when `piped`, for the caller to
    read), once it greets: the process and its port."""
    binary = tool("smtp-sink")
    if binary is None:
        raise PeerUnavailable("smtp-sink (Debian package postfix) is not installed")
    port = free_port()
    cmd = [binary, *options]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]  # smtp-sink refuses to keep root privileges
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115
    stdout: Any = subprocess.PIPE if piped else log
    proc = subprocess.Popen([*cmd, f"127.0.0.1:{port}", "1024"], stdout=stdout, stderr=log)
    try:
        wait_smtp(port, proc)
        yield proc, port
    finally:
        stop_process(proc)
        log.close()


@contextlib.contextmanager
def postfix_smtp_sink(workdir: Path) -> Iterator[Peer]:
    with smtp_sink(workdir, "smtp-sink") as (proc, port):
        yield Peer("postfix smtp-sink", port, proc.pid)


# The main.cf of a private Postfix instance, with what each use adds: the queue below, the
# outbound benchmark's relay (outbound_peers.py).
POSTFIX_BASE_MAIN = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
daemon_directory = {daemons}
command_directory = {commands}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
mydestination =
relay_domains =
local_recipient_maps =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
message_size_limit = 26214400
biff = no
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
"""

POSTFIX_MAIN = (
    POSTFIX_BASE_MAIN
    + """\
# Every accepted message goes to the hold queue: stored and fsynced, never delivered.
smtpd_data_restrictions = check_client_access static:HOLD
"""
)

POSTFIX_MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
rewrite   unix - - n - - trivial-rewrite
proxymap  unix - - n - - proxymap
anvil     unix - - n - 1 anvil
qmgr      unix n - n 300 1 qmgr
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
postlog   unix-dgram n - n - 1 postlogd
"""


def _postfix(binary: str, confdir: Path, action: str) -> None:
    result = subprocess.run(
        [binary, "-c", str(confdir), action], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(f"postfix {action} failed: {result.stdout}{result.stderr}")


@contextlib.contextmanager
def postfix_queue(workdir: Path) -> Iterator[Peer]:
    """A private Postfix instance: its smtpd on a high port, accepting into its own queue."""
    with private_postfix(workdir, "postfix", POSTFIX_MAIN, POSTFIX_MASTER) as port_pid:
        yield Peer("postfix smtpd -> queue", *port_pid)


@contextlib.contextmanager
def private_postfix(
    workdir: Path, name: str, main_cf: str, master_cf: str
) -> Iterator[tuple[int, int | None]]:
    """A private Postfix instance in `workdir/name` (its own config and queue directories),
    from `main_cf` (formatted with root, daemons, commands) and `master_cf` (formatted with
    port, the smtpd's): its smtpd's port and its master's pid, once it greets."""
    binary = tool("postfix")
    if binary is None:
        raise PeerUnavailable("postfix is not installed")
    if os.geteuid() != 0:
        raise PeerUnavailable("a private Postfix instance needs root to start its master")
    daemons = Path("/usr/lib/postfix/sbin")
    if not (daemons / "smtpd").exists():
        raise PeerUnavailable(f"no Postfix daemons in {daemons}")
    root = workdir / name
    confdir = root / "conf"
    for d in (confdir, root / "queue", root / "data"):
        d.mkdir(parents=True, exist_ok=True)
    shutil.chown(root / "data", user="postfix")
    for d in (workdir, root):
        d.chmod(0o755)  # the postfix user must reach its queue directory
    port = free_port()
    commands = str(Path(binary).parent)
    (confdir / "main.cf").write_text(main_cf.format(root=root, daemons=daemons, commands=commands))
    (confdir / "master.cf").write_text(master_cf.format(port=port))
    _postfix(binary, confdir, "start")
    try:
        wait_smtp(port, None)
        pid_file = root / "queue" / "pid" / "master.pid"
        pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        yield port, pid
    finally:
        try:
            _postfix(binary, confdir, "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            _postfix(binary, confdir, "abort")


@contextlib.contextmanager
def script_server(
    script: str, command: str, log_path: Path, what: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`python <script> <command>`, a server that prints its port on its first line once it
    listens (its `what` names it in the error when it does not): the process and the port."""
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [PYTHON, str(Path(script).resolve()), command], stdout=subprocess.PIPE, stderr=log, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"{what} did not start")
        yield proc, int(line)
    finally:
        stop_process(proc)
        log.close()


@contextlib.contextmanager
def null_dns(workdir: Path) -> Iterator[int]:
    """A DNS server on 127.0.0.1 that has no records for any name (own process)."""
    with script_server(__file__, "null-dns", workdir / "dns.log", "the null DNS server") as (
        _,
        port,
    ):
        yield port


EDGE_CONFIG = """\
hostname = "mx.bench.test"
[edge]
mx_listen = "127.0.0.1:0"
control_listen = "127.0.0.1:0"
{relay}mx_processes = {processes}
max_connections = 5000
max_connections_per_ip = 5000
max_connections_per_network = 5000
retry_schedule = [86400]
[dns]
nameservers = ["127.0.0.1"]
port = {dns_port}
"""


_SEED = """
import sys
from pathlib import Path
from edge.store import open_store

data_dir, domain = Path(sys.argv[1]), sys.argv[2]
(data_dir / "edge").mkdir(parents=True, exist_ok=True)
store = open_store(f"sqlite:///{data_dir / 'edge' / 'store.db'}")
store.ensure_account()
store.create_device("bench", device_id="dev_bench", hostname="device.bench.test")
store.create_route(
    domain,
    type="byod",
    connector_id="dev_bench",
    delivery_mode="split",
    status="active",
    setup_stage="active",
)
store.add_byod_address("rcpt", domain, "dev_bench")
dispose = getattr(store, "close", None) or getattr(store, "dispose", None)
if dispose is not None:
    dispose()
"""


def _seed_store(data_dir: Path, repo: Path = REPO) -> None:
    """The route of the benchmark's recipient: a device that has not connected yet, so mail
    to it is accepted and waits in the spool (no delivery runs during the measurement).
    Seeded by the code of the checkout that runs the edge, so its schema is that one's."""
    subprocess.run(
        [PYTHON, "-c", _SEED, str(data_dir), BENCH_DOMAIN],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        check=True,
    )


@contextlib.contextmanager
def tailpost_edge(
    workdir: Path,
    mode: str,
    dns_port: int,
    extra: str = "",
    processes: int = 1,
    repo: Path = REPO,
    label: str = "",
) -> Iterator[Peer]:
    """The edge of the checkout at `repo` (this one by default; with `label`, another one,
    say a `git worktree` of an earlier commit, run on this checkout's virtualenv and named
    `tailpost edge (<mode>) <label>`). Its store is seeded by this checkout's code. The mode
    is "durable" (`twistd tailpost-edge`) or "discard" (`discard_edge.py`: the checks run,
    then the message is dropped; this checkout only, one process)."""
    if mode not in ("durable", "discard"):
        raise ValueError(f"unknown edge mode {mode!r}")
    if mode == "discard" and (repo != REPO or processes != 1):
        raise ValueError("the discarding edge runs this checkout's code in one process")
    data = workdir / (f"edge-{mode}-{label}" if label else f"edge-{mode}")
    data.mkdir(parents=True, exist_ok=True)
    _seed_store(data, repo)
    config = data / "edge.toml"
    # The relay listener on a free port too, where the checkout has one (an older baseline
    # checkout does not know the key).
    has_relay = "relay_listen" in (repo / "edge" / "config.py").read_text()
    relay = 'relay_listen = "127.0.0.1:0"\n' if has_relay else ""
    config.write_text(
        EDGE_CONFIG.format(dns_port=dns_port, processes=processes, relay=relay) + extra
    )
    command = [PYTHON, str(Path(__file__).resolve().parent / "discard_edge.py")]
    launch = command if mode == "discard" else None
    with run_twistd("tailpost-edge", config, data, data / "edge.log", repo, launch) as (
        proc,
        port,
    ):
        yield Peer(f"tailpost edge ({mode}) {label}".rstrip(), port, proc.pid)


@contextlib.contextmanager
def run_twistd(
    plugin: str,
    config: Path,
    data: Path,
    log_path: Path,
    repo: Path = REPO,
    launch: list[str] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`twistd -n <plugin>` of the checkout at `repo` on `config` and `data` (or `launch`,
    a command taking the same `--config` and `--data-dir`), once its MX answers: the
    process and the MX port (from the listeners it writes to run/)."""
    log = open(log_path, "wb")  # noqa: SIM115
    env = dict(os.environ, PYTHONPATH=str(repo))
    cmd = launch or [TWISTD, "-n", "--pidfile=", plugin]
    cmd = [*cmd, "--config", str(config)]
    proc = subprocess.Popen(
        [*cmd, "--data-dir", str(data)], cwd=data, stdout=log, stderr=log, env=env
    )
    try:
        listening = data / "run" / "listening.json"
        deadline = time.monotonic() + 60
        port = 0
        while not port:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{plugin} did not start; see {log_path}")
            try:
                info = json.loads(listening.read_text())
                if info.get("pid") == proc.pid:
                    port = int(info["listeners"]["mx"].rpartition(":")[2])
            except (FileNotFoundError, ValueError, KeyError):
                time.sleep(0.1)
        wait_smtp(port, proc)
        yield proc, port
    finally:
        stop_process(proc)
        log.close()


@contextlib.contextmanager
def workspace(keep: bool, prefix: str) -> Iterator[Path]:
    """A temporary directory for a run's servers, removed afterwards unless `keep`."""
    if keep:
        yield Path(tempfile.mkdtemp(prefix=prefix))
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def start_servers(
    running: contextlib.ExitStack,
    starts: Iterable[tuple[str, Callable[[], AbstractContextManager[Server]]]],
    only: set[str],
    skipped: dict[str, str],
) -> tuple[list[Server], int]:
    """Start, in `running`, each server whose name has one of `only` in it (all when
    empty); one that cannot run here or fails to start is noted in `skipped` and printed:
    the started ones and how many failed."""
    started: list[Server] = []
    failed = 0
    for name, start in starts:
        if only and not any(o in name for o in only):
            continue
        try:
            started.append(running.enter_context(start()))
        except PeerUnavailable as exc:
            skipped[name] = str(exc)
            print(f"  {name}: skipped ({exc})", flush=True)
        except FAILURES as exc:
            failed += 1
            skipped[name] = f"FAILED to start: {exc}"
            print(f"  {name}: FAILED to start ({exc}); see the logs with --keep")
    return started, failed


def run_measurement(measure: Callable[[], None], skipped: dict[str, str]) -> int:
    """Run `measure`; a failure is noted in `skipped` and printed: how many failed (0 or 1)."""
    try:
        measure()
    except FAILURES as exc:
        skipped["(the run)"] = f"FAILED: {exc}"
        print(f"  FAILED ({exc}); see the logs with --keep", flush=True)
        return 1
    return 0


def parse_sessions(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """The concurrencies of --sessions ("1,10,50"); a usage error when they are not integers."""
    try:
        return [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        parser.error("--sessions must be comma-separated integers, e.g. 1,10,50")


def read_edge_extra(parser: argparse.ArgumentParser, path: Path | None) -> str:
    """The TOML fragment of --edge-extra, to append to the edge's configuration ("" without
    one); a usage error when it cannot be read."""
    try:
        return "\n" + path.read_text() if path else ""
    except OSError as exc:
        parser.error(f"--edge-extra: cannot read {path}: {exc.strerror}")


def stop_on_signals() -> None:
    """Make SIGTERM and SIGHUP (a helper stopped, a CI timeout) unwind like an error, so
    that every server a benchmark started is stopped by its context manager instead of
    being left running."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)


@contextlib.contextmanager
def tailpost_protocol_only(workdir: Path) -> Iterator[Peer]:
    """The edge's SMTP server alone, with a policy that accepts everything and keeps nothing:
    the ceiling of the protocol layer, to read the edge's own figures against."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = workdir / "protocol-only.log"
    what = "the protocol-only server"
    with script_server(__file__, "protocol-only", log, what, env) as (proc, port):
        wait_smtp(port, proc)
        yield Peer("tailpost SMTP layer only", port, proc.pid)


def _serve_protocol_only() -> None:
    from discard_edge import DiscardSink
    from twisted.internet import reactor as default_reactor

    from edge.smtp.factory import SMTPServerFactory
    from edge.smtp.server import Limits

    class AcceptAll:
        auth_offered = False
        auth_required = False

        def connect(self, session: Any) -> None:
            return None

        def authenticate(self, session: Any, username: str, password: str) -> bool:
            return False

        def mail_from(self, session: Any, sender: Any) -> None:
            return None

        def rcpt_to(self, session: Any, recipient: Any) -> None:
            return None

        def data(self, session: Any) -> DiscardSink:
            return DiscardSink()

    reactor: Any = default_reactor
    limits = Limits(max_connections=5000, max_connections_per_ip=5000)
    factory = SMTPServerFactory(AcceptAll, limits, "mx.bench.test", reactor)
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(listening.getHost().port, flush=True)
    reactor.run()


def serve_dns(records: dict[tuple[bytes, int], Any], ttl: int = 300) -> None:
    """A DNS server on 127.0.0.1 (TCP and UDP, one free port, printed once it listens) that
    answers `records`, keyed by (lower-case name, type), and every other name and type with
    NODATA and an SOA (minimum `ttl`), as a real authoritative server answers, so resolvers
    may cache the negative answer (RFC 2308)."""
    from twisted.internet import defer, reactor
    from twisted.names import dns, server
    from twisted.names.common import ResolverBase

    class Zone(ResolverBase):
        def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Any:  # noqa: A002
            found = records.get((name.lower().rstrip(b"."), type))
            if found is not None:
                return defer.succeed(
                    ([dns.RRHeader(name, type, cls, ttl, found, auth=True)], [], [])
                )
            soa = dns.Record_SOA(
                mname=b"ns.bench.test", rname=b"hostmaster.bench.test", minimum=ttl, ttl=ttl
            )
            authority = [dns.RRHeader(b"bench.test", dns.SOA, cls, ttl, soa, auth=True)]
            return defer.succeed(([], authority, []))

    factory = server.DNSServerFactory(authorities=[Zone()])
    tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    port = getattr(tcp.getHost(), "port")  # noqa: B009
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(port, flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    if sys.argv[1:] == ["null-dns"]:
        serve_dns({})  # every name exists with no records
    elif sys.argv[1:] == ["protocol-only"]:
        sys.path.insert(0, str(REPO))
        _serve_protocol_only()
    else:
        sys.exit("usage: smtp_peers.py null-dns | protocol-only")
