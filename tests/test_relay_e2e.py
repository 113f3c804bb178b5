"""The relay in the all-in-one, a real `twistd tailpost` process: listening.json names it, and
the local device, authenticated with its own device key, relays mail that the edge delivers
(here to the demo address, which is the device's own) and reports as delivered."""

from __future__ import annotations

import json
import re
import smtplib
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.processes import Process, allinone_config, host_port, wait_for
from tests.test_e2e import find_by_subject, imap_login


@pytest.fixture(scope="module")
def allinone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, dict[str, str]]]:
    proc = Process("tailpost", tmp_path_factory.mktemp("aio-relay"), allinone_config())
    listeners = proc.start()
    yield proc, listeners
    proc.stop()


def _link(proc: Process) -> dict[str, Any]:
    return json.loads((proc.data_dir / "device" / "edge-link.json").read_text())  # type: ignore[no-any-return]


def test_the_local_device_relays_through_the_all_in_ones_relay(
    allinone: tuple[Process, dict[str, str]],
) -> None:
    proc, listeners = allinone
    assert "relay" in listeners
    link = _link(proc)
    host, port = host_port(listeners["relay"])
    message = (
        b"From: demo@example.test\r\nTo: demo@example.test\r\nSubject: relayed to myself\r\n"
        b"\r\nSent through the relay.\r\n"
    )
    with smtplib.SMTP(host, port, timeout=20) as client:
        client.ehlo("device.test")
        client.login(link["device_id"], link["device_key"])  # loopback: no STARTTLS needed
        assert client.mail("demo@example.test")[0] == 250
        assert client.rcpt("demo@example.test")[0] == 250
        code, text = client.data(message)
    assert code == 250, text
    found = re.fullmatch(rb"2\.0\.0 Queued as ([0-9A-F]+)", text)
    assert found is not None, text
    qid = found.group(1).decode()

    imap = imap_login(proc, listeners)
    assert wait_for(lambda: find_by_subject(imap, "relayed to myself") is not None)
    stored = find_by_subject(imap, "relayed to myself")
    assert stored is not None
    assert f"Received: from device {link['device_id']}".encode() in stored
    imap.logout()

    def events() -> list[str]:
        request = urllib.request.Request(
            f"http://{listeners['control']}/v1/outbound/events",
            headers={"Authorization": f"Bearer {link['device_key']}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
        return [e["event"] for e in body["events"] if e["queue_id"] == qid]

    assert wait_for(lambda: "delivered" in events())
