"""Helpers that run tailpost's real processes (`twistd -n ...`) for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).parent / "twistd"


def allinone_config(
    *,
    hostname: str = "mx.tailpost.test",
    retry: float = 0.5,
    dns_port: int | None = None,
    dns_timeout: float = 5.0,
    mx_processes: int = 1,
) -> str:
    """An all-in-one configuration with every port 0; DNS from `dns_port` on 127.0.0.1, or
    (None) the session's empty local DNS server, added by `Process`."""
    config = f"""
hostname = "{hostname}"
[edge]
mx_listen = "127.0.0.1:0"
control_listen = "127.0.0.1:0"
relay_listen = "127.0.0.1:0"
retry_schedule = [{retry}]
mx_processes = {mx_processes}
[device]
connector_listen = "127.0.0.1:0"
imap_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
submission_listen = "127.0.0.1:0"
"""
    if dns_port is not None:
        config += (
            f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_port}\ntimeout = {dns_timeout}\n'
        )
    return config


_local_dns: list[int] = []


def local_dns_port() -> int:
    """The port of a DNS server on 127.0.0.1 shared by the test session (empty zone).

    Processes started by tests ask it instead of the machine's resolver, so no test ever
    sends a DNS query off this machine. Tests that need records start their own server.
    """
    if not _local_dns:
        from tests.conftest import ReactorRunner, _start_reactor
        from tests.dnsserver import LocalDNSServer

        _start_reactor()
        run = ReactorRunner()
        server = run(LocalDNSServer, run.reactor)
        _local_dns.append(server.port)
    return _local_dns[0]


class Process:
    """One twistd process with its own data directory; ports come from listening.json.

    Unless the configuration has a `[dns]` table, the process is pointed at the session's
    local DNS server.
    """

    def __init__(
        self, plugin: str, data_dir: Path, config: str, *, installed: bool = False
    ) -> None:
        self.installed = installed  # run the installed package, not the source tree
        self.plugin = plugin
        self.data_dir = data_dir
        self.config_path = data_dir / f"{plugin}.toml"
        data_dir.mkdir(parents=True, exist_ok=True)
        if "[dns]" not in config:
            config += f'\n[dns]\nnameservers = ["127.0.0.1"]\nport = {local_dns_port()}\n'
        self.config_path.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"{plugin}.log"

    @property
    def listening_file(self) -> Path:
        return self.data_dir / "run" / "listening.json"

    def start(self, timeout: float = 30.0) -> dict[str, str]:
        self.listening_file.unlink(missing_ok=True)
        env = dict(os.environ) if self.installed else dict(os.environ, PYTHONPATH=str(REPO))
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(TWISTD),
                "-n",
                "--pidfile=",
                self.plugin,
                "--config",
                str(self.config_path),
                "--data-dir",
                str(self.data_dir),
            ],
            cwd=self.data_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.plugin} exited: {self.log_path.read_text()[-3000:]}")
            try:
                info = json.loads(self.listening_file.read_text())
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
                continue
            if info.get("pid") == self.proc.pid:
                return dict(info["listeners"])
            time.sleep(0.05)
        raise TimeoutError(f"{self.plugin} did not start: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or power cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def edge_and_device(
    base: Path, *, address: str = "me@home.test", retry: float = 0.3
) -> tuple[Process, Process]:
    """An edge and a device as two processes; the edge's store routes `address` to it."""
    from edge.store import open_store
    from edge.store.keyring import load_or_create_keys

    connector_port = free_port()
    edge = Process(
        "tailpost-edge",
        base / "edge",
        f"""
hostname = "edge.tailpost.test"
[edge]
mx_listen = "127.0.0.1:0"
control_listen = "127.0.0.1:0"
relay_listen = "127.0.0.1:0"
retry_schedule = [{retry}]
""",
    )
    device = Process(
        "tailpost-device",
        base / "device",
        f"""
[device]
connector_listen = "127.0.0.1:{connector_port}"
imap_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
submission_listen = "127.0.0.1:0"
connector_username = "edge-1"
connector_password = "s3cret-connector"
""",
    )
    name, _, domain = address.partition("@")
    # As an operator's script would: with the key file the edge reads (made here, first).
    (base / "edge" / "edge").mkdir(mode=0o700, parents=True, exist_ok=True)
    keys, _made = load_or_create_keys(base / "edge" / "edge" / "store.key")
    store = open_store(f"sqlite:///{base / 'edge' / 'edge' / 'store.db'}", keys=keys)
    store.create_device(
        "home",
        device_id="dev_home",
        connector_smtp_addr=f"127.0.0.1:{connector_port}",
        connector_username="edge-1",
        connector_secret="s3cret-connector",
    )
    store.create_route(
        domain, type="byod", connector_id="dev_home", delivery_mode="split", status="active"
    )
    store.add_byod_address(name, domain, "dev_home")
    store.close()
    return edge, device


def spool_queue(edge: Process) -> Path:
    return edge.data_dir / "edge" / "spool" / "queue"


def maildir_new(device: Process) -> Path:
    return device.data_dir / "device" / "Maildir" / "new"
