"""`tailpost queue` against a running all-in-one edge whose device is unreachable."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.processes import REPO, Process, allinone_config, host_port, wait_for


def tailpost(proc: Process, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edge.runtime.cli",
            "--config",
            str(proc.config_path),
            "--data-dir",
            str(proc.data_dir),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_queue_commands_against_a_running_edge(tmp_path: Path) -> None:
    proc = Process("tailpost", tmp_path / "aio", allinone_config(retry=3600))
    listeners = proc.start()
    try:
        # Take the device away so mail waits in the queue: disable its mail service.
        creds = json.loads((proc.data_dir / "device" / "credentials.json").read_text())
        req = urllib.request.Request(
            f"http://{listeners['http']}/localapi/v0/mail/disable",
            method="POST",
            data=b"{}",
            headers={
                "Authorization": f"Bearer {creds['local_api_token']}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        host, port = host_port(listeners["mx"])
        with smtplib.SMTP(host, port) as smtp:
            smtp.sendmail("a@outside.test", ["demo@example.test"], b"Subject: waits\r\n\r\nx\r\n")

        def listed() -> list[dict[str, object]]:
            out = tailpost(proc, "queue", "list", "--json")
            assert out.returncode == 0, out.stdout + out.stderr
            messages: list[dict[str, object]] = json.loads(out.stdout)["messages"]
            return [m for m in messages if m["attempts"]]

        [item] = wait_for(listed)
        qid = str(item["id"])
        assert item["state"] == "deferred" and item["pending"] == ["demo@example.test"]

        table = tailpost(proc, "queue", "list")
        assert table.returncode == 0 and qid in table.stdout and "1 message(s)" in table.stdout
        shown = tailpost(proc, "queue", "show", qid)
        assert shown.returncode == 0 and "deferred" in shown.stdout
        assert tailpost(proc, "queue", "hold", qid).returncode == 0
        held = tailpost(proc, "queue", "list", "--state", "held", "--json")
        assert [m["id"] for m in json.loads(held.stdout)["messages"]] == [qid]
        refused = tailpost(proc, "queue", "retry", qid)
        assert refused.returncode == 1 and "held" in refused.stdout
        assert tailpost(proc, "queue", "release", qid).returncode == 0
        unknown = tailpost(proc, "queue", "show", "0660C790C37DDB44B36CE2")
        assert unknown.returncode == 1
        assert tailpost(proc, "queue", "delete", qid).returncode == 0
        assert json.loads(tailpost(proc, "queue", "list", "--json").stdout)["messages"] == []
    finally:
        proc.stop()
    down = tailpost(proc, "queue", "list")
    assert down.returncode == 3
