"""How the edge learns the pin of a device connector's TLS key: at registration, pinned at
approval, replaced by the device itself (`PATCH /v1/devices/{id}/connector`) when its key changes.
Over real sockets: the edge's `/v1` and the device's registration client."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.threads import deferToThread

from connector import credentials
from connector.edgeclient import EdgeClient
from connector.registration import Registration, RegistrationError
from tests.test_control_support import ADMIN
from tests.test_registration import Edge, edge_fixture, http

__all__ = ["edge_fixture"]  # the `edge` fixture

PIN = base64.b64encode(hashlib.sha256(b"first key").digest()).decode()
NEW_PIN = base64.b64encode(hashlib.sha256(b"second key").digest()).decode()


def registration(tmp_path: Path, in_reactor: Any, edge: Edge, pin: str | None) -> Registration:
    data = tmp_path / "device"
    creds = credentials.ensure(data / "credentials.json", ["me@byod.test"])
    holder: list[Registration] = []
    client = EdgeClient(edge.url, lambda: holder[0].device_key, reactor=in_reactor.reactor)
    made = Registration(
        data / "edge-link.json",
        creds,
        client,
        name="nas",
        hostname="nas.home.test",
        connector_addr=lambda: "127.0.0.1:2525",
        run_blocking=deferToThread,
        tls_pin=pin,
    )
    holder.append(made)
    return made


def approved(in_reactor: Any, edge: Edge, reg: Registration) -> str:
    started = in_reactor(reg.start)
    assert started["status"] == "pending"
    listed = http(f"{edge.url}/v1/devices", token=ADMIN).body["devices"]
    [pending] = [d for d in listed if d["registration_code"] == started["code"]]
    assert pending["connector_tls_pin"] == reg.tls_pin  # the operator sees what gets pinned
    device_id = str(pending["id"])
    done = http(f"{edge.url}/v1/devices/{device_id}/approve", "POST", {}, token=ADMIN)
    assert done.code == 200, done.body
    assert in_reactor(reg.status)["status"] == "authorized"
    return device_id


def test_the_pin_sent_at_registration_is_pinned_at_approval(
    tmp_path: Path, in_reactor: Any, edge: Edge
) -> None:
    reg = registration(tmp_path, in_reactor, edge, PIN)
    device_id = approved(in_reactor, edge, reg)
    device = edge.store.get_device(device_id)
    assert device is not None and device.connector_tls_pin == PIN
    # ... and reaches the delivery path with the device's addresses.
    edge.store.update_device(device_id, connector_smtp_addr="100.64.0.7:2525")
    address = edge.store.add_managed_address("alice", device_id, domain="m.test", namespace=None)
    found = edge.store.resolve_recipient(address.address)
    assert found is not None and found.connector_tls_pin == PIN
    assert (
        json.loads((tmp_path / "device" / "edge-link.json").read_text())["connector_tls_pin"] == PIN
    )
    assert not reg.pin_outdated


def test_a_new_key_on_the_device_reaches_the_edge_with_the_device_key(
    tmp_path: Path, in_reactor: Any, edge: Edge
) -> None:
    reg = registration(tmp_path, in_reactor, edge, PIN)
    device_id = approved(in_reactor, edge, reg)
    reg.tls_pin = NEW_PIN  # the device started with a new certificate
    assert reg.pin_outdated
    assert in_reactor(reg.sync_pin) is True
    device = edge.store.get_device(device_id)
    assert device is not None and device.connector_tls_pin == NEW_PIN
    kept = json.loads((tmp_path / "device" / "edge-link.json").read_text())
    assert kept["connector_tls_pin"] == NEW_PIN and not reg.pin_outdated


def test_a_device_without_a_pin_at_registration_sends_it_later(
    tmp_path: Path, in_reactor: Any, edge: Edge
) -> None:
    reg = registration(tmp_path, in_reactor, edge, None)
    device_id = approved(in_reactor, edge, reg)
    device = edge.store.get_device(device_id)
    assert device is not None and device.connector_tls_pin is None
    reg.tls_pin = PIN
    assert in_reactor(reg.sync_pin) is True
    device = edge.store.get_device(device_id)
    assert device is not None and device.connector_tls_pin == PIN


def test_only_the_device_itself_or_the_admin_changes_its_pin(
    tmp_path: Path, in_reactor: Any, edge: Edge
) -> None:
    mine = registration(tmp_path / "a", in_reactor, edge, PIN)
    mine_id = approved(in_reactor, edge, mine)
    theirs = registration(tmp_path / "b", in_reactor, edge, PIN)
    theirs_id = approved(in_reactor, edge, theirs)
    key = mine.device_key
    assert key is not None

    other = http(
        f"{edge.url}/v1/devices/{theirs_id}/connector",
        "PATCH",
        {"connector_tls_pin": NEW_PIN},
        token=key,
    )
    assert other.code == 404 and other.body["code"] == "device_not_found"
    anonymous = http(
        f"{edge.url}/v1/devices/{mine_id}/connector", "PATCH", {"connector_tls_pin": NEW_PIN}
    )
    assert anonymous.code == 401
    for bad in ("", "not a pin", PIN[:-1], PIN + "A", PIN.replace("=", "A"), 7, None):
        refused = http(
            f"{edge.url}/v1/devices/{mine_id}/connector",
            "PATCH",
            {"connector_tls_pin": bad},
            token=key,
        )
        assert refused.code == 400 and refused.body["code"] == "validation_failed", bad
    extra = http(
        f"{edge.url}/v1/devices/{mine_id}/connector",
        "PATCH",
        {"connector_tls_pin": NEW_PIN, "connector_smtp_addr": "10.0.0.1:25"},
        token=key,
    )
    assert extra.code == 400
    stored = edge.store.get_device(theirs_id)
    assert stored is not None and stored.connector_tls_pin == PIN
    stored = edge.store.get_device(mine_id)
    assert stored is not None and stored.connector_tls_pin == PIN

    by_admin = http(
        f"{edge.url}/v1/devices/{theirs_id}/connector",
        "PATCH",
        {"connector_tls_pin": NEW_PIN},
        token=ADMIN,
    )
    assert by_admin.code == 200 and by_admin.body["connector_tls_pin"] == NEW_PIN
    missing = http(
        f"{edge.url}/v1/devices/dev_nobody/connector",
        "PATCH",
        {"connector_tls_pin": NEW_PIN},
        token=ADMIN,
    )
    assert missing.code == 404


@pytest.mark.parametrize("pin", ["", "abc", PIN[:-1] + "!", PIN * 2])
def test_a_registration_with_a_malformed_pin_is_refused(edge: Edge, pin: str) -> None:
    reply = http(
        f"{edge.url}/v1/devices/register",
        "POST",
        {"name": "nas", "connector_tls_pin": pin},
    )
    assert reply.code == 400 and reply.body["code"] == "validation_failed"


def test_a_device_whose_edge_refuses_the_pin_keeps_trying(
    tmp_path: Path, in_reactor: Any, edge: Edge
) -> None:
    reg = registration(tmp_path, in_reactor, edge, PIN)
    device_id = approved(in_reactor, edge, reg)
    edge.store.update_device(device_id, auth_status="revoked")
    reg.tls_pin = NEW_PIN
    with pytest.raises(RegistrationError) as refused:
        in_reactor(reg.sync_pin)
    assert refused.value.status == 403
    assert reg.pin_outdated  # not marked as sent: tried again on the next start or round
