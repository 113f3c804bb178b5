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


class Process:
    """One twistd process with its own data directory; ports come from listening.json."""

    def __init__(self, plugin: str, data_dir: Path, config: str) -> None:
        self.plugin = plugin
        self.data_dir = data_dir
        self.config_path = data_dir / f"{plugin}.toml"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"{plugin}.log"

    @property
    def listening_file(self) -> Path:
        return self.data_dir / "run" / "listening.json"

    def start(self, timeout: float = 30.0) -> dict[str, str]:
        self.listening_file.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
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
