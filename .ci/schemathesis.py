"""CI: schemathesis against the live `/v1` API of a real `tailpost-edge` process.

The edge's DNS comes from the tests' local DNS server (no internet): unknown names are
NXDOMAIN, so every DNS-backed endpoint answers instead of timing out. Exits with
schemathesis's status. Extra arguments are passed on to `schemathesis run`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import reactor as _reactor  # noqa: E402
from twisted.internet.threads import blockingCallFromThread  # noqa: E402

from tests.dnsserver import LocalDNSServer  # noqa: E402
from tests.processes import Process  # noqa: E402


def main(argv: list[str]) -> int:
    reactor: Any = _reactor
    thread = threading.Thread(
        target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
    )
    thread.start()
    dns = blockingCallFromThread(reactor, LocalDNSServer, reactor)
    with tempfile.TemporaryDirectory(prefix="tailpost-schemathesis-") as tmp:
        edge = Process(
            "tailpost-edge",
            Path(tmp),
            f"""hostname = "mx.tailpost.test"
[edge]
mx_listen = "127.0.0.1:0"
control_listen = "127.0.0.1:0"
managed_domain = "mail.tailpost.test"
probe_timeout = 1.0
[dns]
nameservers = ["127.0.0.1"]
port = {dns.port}
timeout = 2.0
""",
        )
        listeners = edge.start()
        try:
            key = next(
                line.strip()
                for line in (Path(tmp) / "edge" / "admin.key").read_text().splitlines()
                if line.strip() and not line.startswith("#")
            )
            command = [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"http://{listeners['control']}/v1/openapi.json",
                "--header",
                f"Authorization: Bearer {key}",
                "--checks",
                "all",
                "--max-examples",
                "25",
                "--workers",
                "1",
                "--no-color",
                *argv,
            ]
            return subprocess.run(command, check=False, cwd=tmp).returncode
        finally:
            edge.stop()
            reactor.callFromThread(reactor.stop)
            thread.join(10)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
