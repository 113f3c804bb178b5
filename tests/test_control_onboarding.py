"""The whole BYOD onboarding of a domain with real processes: a device registers with its
edge and is approved by the operator's CLI; through the device's `/v1` pass-through a domain
with an existing MX and SPF record (in a local DNS zone) is scanned, its old MX kept,
prepared and verified; a BYOD address is added; then mail to that address reaches the device
and mail to another address on the domain reaches the old MX (an aiosmtpd server)."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.processes import REPO, Process, free_port, host_port, wait_for

DOMAIN = "byod.test"
EDGE = "mx.tailpost.test"


class OldMX:
    """The domain's previous provider: keeps every message it is given."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 kept by the old provider"


@pytest.fixture(name="old_mx")
def old_mx_fixture() -> Iterator[tuple[OldMX, int]]:
    handler = OldMX()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield handler, int(controller.port)
    finally:
        controller.stop()


class Local:
    """The device's loopback HTTP API, with its local token."""

    def __init__(self, address: str, token: str) -> None:
        self.base = f"http://{address}"
        self.token = token

    def call(self, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


def send(mx: str, rcpt: str, subject: str) -> None:
    message = EmailMessage()
    message["From"] = "jane@sender.test"
    message["To"] = rcpt
    message["Subject"] = subject
    message.set_content(f"{subject}\n")
    host, port = host_port(mx)
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.send_message(message)


def test_byod_onboarding_end_to_end(
    tmp_path: Path, dns_server: Any, old_mx: tuple[OldMX, int]
) -> None:
    old, old_port = old_mx
    zone = dns_server.zone
    zone.ttl = 0  # the edge sees each record as soon as the test publishes it
    zone.set(DOMAIN, "MX", [(10, "localhost")])
    zone.set(DOMAIN, "TXT", ["v=spf1 include:_spf.oldmail.test ~all"])
    zone.set("_spf.oldmail.test", "TXT", ["v=spf1 ip4:192.0.2.0/24 -all"])
    zone.set("localhost", "A", ["127.0.0.1"])
    zone.set(EDGE, "A", ["127.0.0.1"])
    dns = f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_server.port}\ntimeout = 3.0\n'

    edge = Process(
        "tailpost-edge",
        tmp_path / "edge",
        f"""hostname = "{EDGE}"
[edge]
mx_listen = "127.0.0.1:0"
control_listen = "127.0.0.1:0"
relay_listen = "127.0.0.1:0"
managed_domain = "mail.tailpost.test"
edge_mx_target = "{EDGE}"
mx_delivery_port = {old_port}
retry_schedule = [0.5]
{dns}""",
    )
    edge_ports = edge.start()
    device = None
    try:
        device = Process(
            "tailpost-device",
            tmp_path / "device",
            f"""hostname = "nas.home.test"
[device]
connector_listen = "127.0.0.1:0"
imap_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
edge_url = "http://{edge_ports["control"]}"
{dns}""",
        )
        device_ports = device.start()
        creds = json.loads((device.data_dir / "device" / "credentials.json").read_text())
        local = Local(device_ports["http"], creds["local_api_token"])

        # The device asks to join; the operator approves it with the CLI on the edge.
        status, started = local.call("/localapi/v0/login/start", "POST")
        assert status == 201, started
        approve = subprocess.run(
            [sys.executable, "-m", "edge.runtime.cli", "--config", str(edge.config_path),
             "--data-dir", str(edge.data_dir), "devices", "approve", started["code"]],
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert approve.returncode == 0, approve.stderr
        status, joined = local.call("/localapi/v0/login/status")
        assert status == 200 and joined["status"] == "authorized", joined

        # Onboarding through the device's /v1 pass-through.
        status, scan = local.call("/v1/dns/scan", "POST", {"domain": DOMAIN})
        assert status == 200, scan
        assert scan["existing_mx"] == [{"priority": 10, "host": "localhost"}]
        assert scan["authoritative_hosts"] == [
            {"host": "localhost", "port": old_port, "tls_mode": "none", "reachable": True}
        ]
        status, route = local.call("/v1/dns/fallback", "POST", {"domain": DOMAIN})
        assert status == 200 and route["fallback_hosts"] == ["localhost"], route
        status, prep = local.call("/v1/custom-domains/prepare", "POST", {"domain": DOMAIN})
        assert status == 200, prep
        records = {r["category"]: r for r in prep["required_dns_records"]}
        spf = records["spf"]["value"]
        assert spf == f"v=spf1 include:_spf.oldmail.test a:{EDGE} ~all"  # merged, not replaced
        status, early = local.call(
            "/v1/byod-addresses", "POST", {"name": "alice", "domain": DOMAIN}
        )
        assert status == 409 and early["action"] == "verify_ownership"
        ownership = records["ownership"]
        zone.set(ownership["host"], "TXT", [ownership["value"]])
        status, verified = local.call(
            "/v1/custom-domains/verify-ownership", "POST", {"domain": DOMAIN}
        )
        assert status == 200 and verified["status"] == "ok", verified
        status, address = local.call(
            "/v1/byod-addresses", "POST", {"name": "alice", "domain": DOMAIN}
        )
        assert status == 201 and address["address"] == f"alice@{DOMAIN}", address
        # Ownership alone does not make the route take mail: it is still pending_dns.
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            send(edge_ports["mx"], f"alice@{DOMAIN}", "too early")

        # Every record published: the edge's next check moves the route to active.
        published: dict[tuple[str, str], list[Any]] = {}
        for record in prep["required_dns_records"]:
            value = (
                (record["priority"], record["value"]) if record["type"] == "MX" else record["value"]
            )
            published.setdefault((record["host"], record["type"]), []).append(value)
        for (host, rdtype), values in published.items():
            zone.set(host, rdtype, values)
        status, verified = local.call(
            "/v1/custom-domains/verify-ownership", "POST", {"domain": DOMAIN}
        )
        assert status == 200, verified
        status, routes = local.call("/v1/email-routes")
        assert [r["status"] for r in routes["routes"]] == ["active"], routes

        # Mail to the assigned address reaches the device.
        send(edge_ports["mx"], f"alice@{DOMAIN}", "for the device")

        def arrived() -> list[Any]:
            _status, body = local.call("/localapi/v0/mail/messages")
            return [m for m in body.get("messages", []) if m["subject"] == "for the device"]

        wait_for(arrived, timeout=30)
        assert old.received == []

        # Mail to any other address on the domain goes on to the old MX.
        send(edge_ports["mx"], f"bob@{DOMAIN}", "for the old provider")
        wait_for(lambda: old.received, timeout=30)
        mail_from, rcpts, content = old.received[0]
        assert rcpts == [f"bob@{DOMAIN}"] and b"for the old provider" in content
        assert not [m for m in local.call("/localapi/v0/mail/messages")[1]["messages"]
                    if m["subject"] == "for the old provider"]  # fmt: skip
    finally:
        if device is not None:
            device.stop()
        edge.stop()
