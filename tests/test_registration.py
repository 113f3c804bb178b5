"""A device registering with its edge over real sockets: login/start, approval (CLI and API),
login/status, then `/v1` through the device's pass-through, scoped to its own account."""

from __future__ import annotations

import io
import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.web.pages import notFound
from twisted.web.server import Site

from connector import credentials
from connector.edgeclient import EdgeClient
from connector.registration import Registration
from edge.config import Config
from edge.dns.resolver import DNSResolver
from edge.runtime.cli import main as cli
from edge.runtime.storeopen import open_configured_store
from edge.store import Store
from tests.test_control_support import ADMIN, make_config
from webapi.compose import PrefixDispatch
from webapi.local.passthrough import device_root
from webapi.v1.app import ControlAPI
from webapi.v1.site import OpsEndpoints

TOKEN = "tplocal_test-token"


@dataclass
class Reply:
    code: int
    body: Any


def http(
    url: str,
    method: str = "GET",
    body: Any = None,
    *,
    token: str | None = None,
    host: str | None = None,
) -> Reply:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return Reply(response.status, json.loads(response.read()))
    except urllib.error.HTTPError as err:
        return Reply(err.code, json.loads(err.read()))


@dataclass
class Edge:
    url: str
    config: Config
    store: Store


@dataclass
class DeviceSide:
    url: str
    registration: Registration
    creds: credentials.Credentials
    data: Path

    def call(self, path: str, method: str = "GET", body: Any = None, **kw: Any) -> Reply:
        kw.setdefault("token", TOKEN)
        return http(f"{self.url}{path}", method, body, **kw)


@pytest.fixture(name="edge")
def edge_fixture(tmp_path: Path, in_reactor: Any, dns_server: Any) -> Iterator[Edge]:
    config = make_config()
    config.data_dir = str(tmp_path / "edge")
    store = open_configured_store(config)
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=2.0, reactor=in_reactor.reactor)
    api = ControlAPI(store, resolver, config, [ADMIN])
    root = PrefixDispatch([(b"/v1/", api.resource())], OpsEndpoints(store).app.resource())
    port = in_reactor(in_reactor.reactor.listenTCP, 0, Site(root), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    api.base_url = url
    yield Edge(url, config, store)
    in_reactor(port.stopListening)
    store.close()


def make_device(tmp_path: Path, in_reactor: Any, edge_url: str | None) -> tuple[DeviceSide, Any]:
    data = tmp_path / "device"
    creds = credentials.ensure(data / "credentials.json", ["me@byod.test"])
    holder: list[Registration] = []
    client = (
        EdgeClient(edge_url, lambda: holder[0].device_key, reactor=in_reactor.reactor)
        if edge_url
        else None
    )
    from twisted.internet.threads import deferToThread

    registration = Registration(
        data / "edge-link.json",
        creds,
        client,
        name="nas",
        hostname="nas.home.test",
        connector_addr=lambda: "127.0.0.1:2525",
        run_blocking=deferToThread,
    )
    holder.append(registration)
    root = device_root(notFound(), registration, client, TOKEN)
    port = in_reactor(in_reactor.reactor.listenTCP, 0, Site(root), interface="127.0.0.1")
    return DeviceSide(f"http://127.0.0.1:{port.getHost().port}", registration, creds, data), port


@pytest.fixture(name="device")
def device_fixture(tmp_path: Path, in_reactor: Any, edge: Edge) -> Iterator[DeviceSide]:
    device, port = make_device(tmp_path, in_reactor, edge.url)
    yield device
    in_reactor(port.stopListening)


def run_cli(edge: Edge, *args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli(["--data-dir", edge.config.data_dir, *args], out, err)
    return code, out.getvalue() + err.getvalue()


def test_register_approve_with_the_cli_and_use_v1(edge: Edge, device: DeviceSide) -> None:
    started = device.call("/localapi/v0/login/start", "POST")
    assert started.code == 201, started.body
    assert started.body["status"] == "pending" and started.body["auth_url"].startswith(edge.url)
    code = started.body["code"]
    assert "poll_token" not in json.dumps(started.body) and "tpr_" not in json.dumps(started.body)
    link_file = device.data / "edge-link.json"
    assert stat.S_IMODE(os.stat(link_file).st_mode) == 0o600
    assert device.call("/localapi/v0/login/status").body["status"] == "pending"
    pending = device.call("/v1/managed-addresses")
    assert pending.code == 409 and pending.body["code"] == "device_not_registered"

    status, listing = run_cli(edge, "devices", "list")
    assert status == 0 and code in listing and "pending" in listing
    status, text = run_cli(edge, "devices", "approve", code)
    assert status == 0 and "approved" in text
    old_password = device.creds.connector_password

    done = device.call("/localapi/v0/login/status")
    assert done.code == 200 and done.body["status"] == "authorized", done.body
    assert "device_key" not in done.body and "tpk_" not in json.dumps(done.body)
    kept = json.loads(link_file.read_text())
    assert (
        kept["device_key"].startswith("tpk_") and stat.S_IMODE(os.stat(link_file).st_mode) == 0o600
    )
    # The edge's connector credentials are now the ones the device's connector accepts.
    saved = json.loads((device.data / "credentials.json").read_text())
    assert device.creds.connector_password != old_password
    assert saved["connector"]["password"] == device.creds.connector_password
    stored = edge.store.get_device(done.body["device_id"])
    assert stored is not None and stored.connector_secret == device.creds.connector_password
    assert stored.connector_smtp_addr == "127.0.0.1:2525"

    made = device.call("/v1/managed-addresses", "POST", {"name": "alice"})
    assert made.code == 201, made.body
    assert made.body["address"].startswith("alice.nas-") and made.body["device_id"] == stored.id
    again = device.call("/v1/managed-addresses")
    assert [a["address"] for a in again.body["addresses"]] == [made.body["address"]]
    # An edge error comes back as the edge said it.
    taken = device.call("/v1/managed-addresses", "POST", {"name": "alice"})
    assert taken.code == 409 and taken.body["code"] == "address_taken"

    # Another account's data stays invisible through the pass-through.
    other = http(f"{edge.url}/v1/devices/register", "POST", {"name": "other"})
    http(f"{edge.url}/v1/devices/{other.body['device_id']}/approve", "POST", {}, token=ADMIN)
    http(
        f"{edge.url}/v1/mail/spam-rules",
        "POST",
        {"kind": "domain", "value": "theirs.test"},
        token=ADMIN,
    )
    assert device.call("/v1/mail/spam-rules").body == {"rules": []}
    seen = device.call("/v1/devices").body["devices"]
    assert [d["id"] for d in seen] == [stored.id]

    # Revoked on the edge: the device's key stops working.
    status, text = run_cli(edge, "devices", "revoke", stored.id)
    assert status == 0 and "revoked" in text
    refused = device.call("/v1/managed-addresses")
    assert refused.code == 403 and refused.body["code"] == "auth_invalid_key"


def test_local_guard_applies_to_login_and_v1(edge: Edge, device: DeviceSide) -> None:
    for path, method in [("/localapi/v0/login/start", "POST"), ("/v1/email-routes", "GET")]:
        assert device.call(path, method, token=None).code == 401
        assert device.call(path, method, token="wrong").code == 401
        rebinding = device.call(path, method, host="evil.example:80")
        assert rebinding.code == 403 and rebinding.body["code"] == "forbidden_host"


def test_device_without_edge_url_or_with_a_dead_edge(tmp_path: Path, in_reactor: Any) -> None:
    lonely, port = make_device(tmp_path / "a", in_reactor, None)
    try:
        r = lonely.call("/localapi/v0/login/start", "POST")
        assert r.code == 409 and r.body["code"] == "edge_not_configured"
        assert lonely.call("/v1/email-routes").body["code"] == "edge_not_configured"
    finally:
        in_reactor(port.stopListening)
    dead_port = in_reactor(in_reactor.reactor.listenTCP, 0, Site(notFound()), interface="127.0.0.1")
    dead_url = f"http://127.0.0.1:{dead_port.getHost().port}"
    in_reactor(dead_port.stopListening)
    cut_off, port = make_device(tmp_path / "b", in_reactor, dead_url)
    try:
        r = cut_off.call("/localapi/v0/login/start", "POST")
        assert r.code == 502 and r.body["code"] == "edge_unavailable"
    finally:
        in_reactor(port.stopListening)


def test_approval_through_the_api_and_edge_health(edge: Edge, device: DeviceSide) -> None:
    started = device.call("/localapi/v0/login/start", "POST").body
    devices = http(f"{edge.url}/v1/devices", token=ADMIN).body["devices"]
    device_id = next(d["id"] for d in devices if d["registration_code"] == started["code"])
    approved = http(f"{edge.url}/v1/devices/{device_id}/approve", "POST", {}, token=ADMIN)
    assert approved.code == 200 and approved.body["auth_status"] == "authorized"
    assert device.call("/localapi/v0/login/status").body["status"] == "authorized"
    health = http(f"{edge.url}/health")
    assert health.code == 200 and health.body["checks"]["database"]["status"] == "ok"
    with urllib.request.urlopen(f"{edge.url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'tailpost_devices{status="authorized"} 1' in metrics


def test_cli_errors(edge: Edge) -> None:
    status, text = run_cli(edge, "devices", "approve", "ZZZZ-ZZZZ")
    assert status == 1 and "not found" in text
    status, text = run_cli(edge, "devices", "revoke", "dev_nope")
    assert status == 1
    status, listing = run_cli(edge, "devices", "list", "--json")
    assert status == 0 and json.loads(listing) == {"devices": []}
