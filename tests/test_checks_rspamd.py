"""The Rspamd check against a real rspamd on 127.0.0.1, with a private minimal config.

The config loads no stock modules (nothing reaches out to the internet) and one test rule
that scores messages whose Subject contains SPAMTEST. Skipped when rspamd is not installed
(`scripts/install-test-deps` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from edge.checks.actions import ActionPolicy
from edge.checks.base import Recipient, Transaction
from edge.checks.rspamd import RspamdCheck, parse_reply

RSPAMD = shutil.which("rspamd")

RULES = """
rspamd_config.TAILPOST_TEST_SPAM = {
  callback = function(task)
    local subject = task:get_header('Subject')
    return subject ~= nil and subject:find('SPAMTEST', 1, true) ~= nil
  end,
  score = 10.0,
  description = 'test rule',
}
"""

CONFIG = """
options {{
  pidfile = "{dir}/rspamd.pid";
  dns {{ nameserver = ["127.0.0.1:1"]; }}
}}
lua = "{dir}/rules.lua";
actions {{ reject = 15; add_header = 6; greylist = 4; }}
logging {{ type = "file"; filename = "{dir}/rspamd.log"; level = "error"; }}
worker "normal" {{ bind_socket = "127.0.0.1:{port}"; count = 1; }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(url: str) -> bool:
    req = urllib.request.Request(url + "/checkv2", data=b"Subject: x\r\n\r\nx\r\n", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def rspamd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if RSPAMD is None:
        pytest.skip("rspamd is not installed (scripts/install-test-deps installs it)")
    workdir: Path = tmp_path_factory.mktemp("rspamd")
    port = free_port()
    (workdir / "rules.lua").write_text(RULES)
    (workdir / "rspamd.conf").write_text(CONFIG.format(dir=workdir, port=port))
    cmd = [RSPAMD, "-f", "-c", str(workdir / "rspamd.conf")]
    cmd += ["--var=DBDIR=" + str(workdir), "--var=RUNDIR=" + str(workdir)]
    if os.geteuid() == 0:
        cmd.append("-i")  # the test runs as root: let the worker run as root too
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (
                    (workdir / "rspamd.log").read_text()
                    if (workdir / "rspamd.log").exists()
                    else ""
                )
                pytest.fail(f"rspamd did not start: {log[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def scan(in_reactor: Any, url: str, subject: str) -> tuple[Transaction, list[Any]]:
    check = RspamdCheck(in_reactor.reactor, url, "mx.tailpost.test", timeout=5.0)
    tx = Transaction("192.0.2.1", helo="client.test", mail_from="a@sender.test")
    tx.recipients = [Recipient("bob@inbound.test")]
    data = f"From: a@sender.test\r\nTo: bob@inbound.test\r\nSubject: {subject}\r\n\r\nHello\r\n"
    findings = in_reactor(lambda: defer.ensureDeferred(check.data(tx, data.encode())))
    return tx, findings


def test_spam_is_scored_and_mapped(in_reactor: Any, rspamd_url: str) -> None:
    tx, findings = scan(in_reactor, rspamd_url, "SPAMTEST offer")
    assert [f.key for f in findings] == ["rspamd.add_header"]
    assert tx.spam is not None
    assert (tx.spam.verdict, tx.spam.score, tx.spam.action) == ("Yes", 10.0, "add header")
    assert "TAILPOST_TEST_SPAM" in tx.spam.symbols
    assert ActionPolicy().decide(findings).action == "tag"
    assert ActionPolicy({"rspamd.add_header": "junk"}).decide(findings).action == "junk"


def test_ham_is_no_action(in_reactor: Any, rspamd_url: str) -> None:
    tx, findings = scan(in_reactor, rspamd_url, "lunch")
    assert [f.key for f in findings] == ["rspamd.no_action"]
    assert tx.spam is not None and tx.spam.verdict == "No"
    assert ActionPolicy().decide(findings).action == "accept"


def test_unreachable_rspamd_is_temperror(in_reactor: Any) -> None:
    tx, findings = scan(in_reactor, f"http://127.0.0.1:{free_port()}", "SPAMTEST")
    assert [f.key for f in findings] == ["rspamd.temperror"]
    assert tx.spam is None
    assert ActionPolicy().decide(findings).action == "accept"


def test_parse_reply_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_reply(b'{"score": 1}')
    result = parse_reply(
        b'{"action": "reject", "score": 20, "symbols": {"A": {"score": 1}, "B": {"score": 5}}}'
    )
    assert (result.verdict, result.symbols) == ("Yes", ["B", "A"])
