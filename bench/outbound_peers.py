"""The servers of the outbound benchmark, each started on 127.0.0.1 in a private directory.

The recipients' MX is Postfix's `smtp-sink`, one per relaying server, counting what it
receives (`-c`). The relays: the tailpost edge (`twistd tailpost-edge` of this checkout) with
its relay listener, a device authorized in its store that owns the sender's domain, and that
domain's DKIM keys; and a private Postfix instance (its own config and queue directories)
whose smtpd relays for 127.0.0.0/8 to its `relayhost`, the sink. The edge finds the sink as
any MX, through DNS: a small DNS server, run as a script (`mx-dns`), answers the recipient
domain's MX and its host's A record with 127.0.0.1, and NODATA for every other name.

Nothing here listens on anything but 127.0.0.1 or touches the machine's own mail setup, and
every process started here is stopped by the context that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import smtp_peers

SENDER_DOMAIN = "sender.bench.test"
SENDER = f"bench@{SENDER_DOMAIN}"
RCPT_DOMAIN = "far.bench.test"
RCPT = f"rcpt@{RCPT_DOMAIN}"
MX_HOST = f"mx.{RCPT_DOMAIN}"
DEVICE_ID = "dev_bench"


class Relay:
    """A started relay: its name, port, the pid whose CPU time counts as its own (with its
    children's), the sink it delivers to, and the AUTH PLAIN credentials it wants (None: it
    relays for 127.0.0.0/8 without AUTH)."""

    def __init__(
        self,
        name: str,
        port: int,
        pid: int | None,
        sink: Sink,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.pid = pid
        self.sink = sink
        self.login = login


class Sink:
    """A running `smtp-sink -c`: its port, and the numbers of messages it has received and
    of sessions it has seen so far (read from the running counters it prints after each end
    of data, QUIT and session)."""

    _COUNTS = re.compile(rb"sess=(\d+) quit=\d+ mesg=(\d+)")

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self._received = 0
        self._sessions = 0
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        tail = b""
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            tail = (tail + chunk)[-256:]
            found = self._COUNTS.findall(tail)
            if found:
                with self._lock:
                    self._sessions = max(self._sessions, int(found[-1][0]))
                    self._received = max(self._received, int(found[-1][1]))

    @property
    def received(self) -> int:
        with self._lock:
            return self._received

    @property
    def sessions(self) -> int:
        """Sessions ended so far."""
        with self._lock:
            return self._sessions

    def wait_for(self, count: int, timeout: float) -> float:
        """Wait until `count` messages in all have come; the monotonic time they had."""
        deadline = time.monotonic() + timeout
        while self.received < count:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtp-sink exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sink has {self.received} of {count} messages")
            time.sleep(0.002)
        return time.monotonic()


@contextlib.contextmanager
def counting_sink(workdir: Path, name: str) -> Iterator[Sink]:
    with smtp_peers.smtp_sink(workdir, name, ("-c", "-h", MX_HOST), piped=True) as (proc, port):
        yield Sink(proc, port)


# As the queueing instance of the MX benchmark, but nothing held: every message goes to
# the sink, the recipients' MX stand-in (an address, so no DNS), by the delivery services.
POSTFIX_RELAY_MAIN = smtp_peers.POSTFIX_BASE_MAIN + "relayhost = [127.0.0.1]:SINK_PORT\n"

POSTFIX_RELAY_MASTER = (
    smtp_peers.POSTFIX_MASTER
    + """\
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
scache    unix - - n - 1 scache
"""
)


@contextlib.contextmanager
def postfix_relay(workdir: Path) -> Iterator[Relay]:
    """A private Postfix instance relaying everything from 127.0.0.0/8 to its own sink."""
    with counting_sink(workdir, "postfix-sink") as sink:
        main = POSTFIX_RELAY_MAIN.replace("SINK_PORT", str(sink.port))
        with smtp_peers.private_postfix(workdir, "postfix-relay", main, POSTFIX_RELAY_MASTER) as (
            port,
            pid,
        ):
            yield Relay("postfix relay", port, pid, sink)


EDGE_CONFIG = """\
hostname = "edge.bench.test"
[edge]
mx_listen = "127.0.0.1:0"
control_listen = "127.0.0.1:0"
relay_listen = "127.0.0.1:0"
relay_plaintext_networks = ["127.0.0.0/8"]
mx_delivery_port = {sink_port}
[dns]
nameservers = ["127.0.0.1"]
port = {dns_port}
"""


def _seed_edge(config_path: Path, data: Path) -> str:
    """The edge's store: a device that owns the sender's domain (a verified, active route),
    the domain's DKIM keys (RSA-2048 and Ed25519), and a key for the device, returned."""
    sys.path.insert(0, str(smtp_peers.REPO))
    from edge.config import load_config
    from edge.domains.scan import generate_dkim_keys
    from edge.runtime.storeopen import open_configured_store
    from edge.store.access import AccessStore

    store = open_configured_store(load_config(config_path, data_dir=str(data)))
    try:
        store.ensure_account()
        store.create_device("bench", device_id=DEVICE_ID, hostname="device.bench.test")
        store.create_route(
            SENDER_DOMAIN,
            type="byod",
            connector_id=DEVICE_ID,
            status="active",
            setup_stage="active",
        )
        store.add_byod_address(SENDER.partition("@")[0], SENDER_DOMAIN, DEVICE_ID)
        access = AccessStore(store)
        for key in generate_dkim_keys(time.strftime("%Y%m")):
            access.add_dkim_key(
                SENDER_DOMAIN, key.selector, key.algorithm, key.private_pem, key.public_b64
            )
        return access.issue_key(DEVICE_ID)
    finally:
        store.close()


@contextlib.contextmanager
def tailpost_relay(workdir: Path, dns_port: int, extra: str = "") -> Iterator[Relay]:
    """The edge of this checkout, its relay listener taking the device's mail and its queue
    delivering it to its own sink through the MX record."""
    with counting_sink(workdir, "edge-sink") as sink:
        data = workdir / "edge"
        data.mkdir(parents=True, exist_ok=True)
        config = data / "edge.toml"
        config.write_text(EDGE_CONFIG.format(sink_port=sink.port, dns_port=dns_port) + extra)
        key = _seed_edge(config, data)
        with smtp_peers.run_twistd("tailpost-edge", config, data, data / "edge.log") as (proc, _):
            listeners = json.loads((data / "run" / "listening.json").read_text())["listeners"]
            port = int(listeners["relay"].rpartition(":")[2])
            smtp_peers.wait_smtp(port, proc)
            yield Relay("tailpost edge relay", port, proc.pid, sink, (DEVICE_ID, key))


@contextlib.contextmanager
def mx_dns(workdir: Path) -> Iterator[int]:
    """The DNS server of the recipient domain (own process): its port."""
    with smtp_peers.script_server(__file__, "mx-dns", workdir / "dns.log", "the DNS server") as (
        _,
        port,
    ):
        yield port


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) of a process, of its children that ended, and of its
    living direct children: a process tree's total that stays right as children come and go."""
    tick = os.sysconf("SC_CLK_TCK")

    def own(entry: str) -> tuple[int, int]:
        """(parent pid, utime + stime + cutime + cstime in ticks)."""
        with open(f"/proc/{entry}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[1]), sum(int(f) for f in fields[11:15])

    total = own(str(pid))[1]
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry != str(pid):
            try:
                parent, ticks = own(entry)
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                total += ticks
    return total / tick


def _serve_mx_dns() -> None:
    """MX of the recipient domain: its MX host; A of the MX host: 127.0.0.1; every other
    name and type: NODATA with an SOA (RFC 2308), as in `smtp_peers`' null DNS."""
    from twisted.names import dns

    ttl = 300
    smtp_peers.serve_dns(
        {
            (RCPT_DOMAIN.encode(), dns.MX): dns.Record_MX(10, MX_HOST.encode(), ttl=ttl),
            (MX_HOST.encode(), dns.A): dns.Record_A("127.0.0.1", ttl=ttl),
        },
        ttl,
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["mx-dns"]:
        _serve_mx_dns()
    else:
        sys.exit("usage: outbound_peers.py mx-dns")
