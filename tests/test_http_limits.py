"""The HTTP listeners under hostile requests: bodies refused before they are read, a second
Host header, JSON that is not JSON or nests without end, and a second login on a linked
device."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.dns.resolver import DNSResolver
from edge.runtime.adminkeys import admin_key_path, load_admin_keys
from edge.store import open_store
from edge.store.keyring import StoreKeys
from tests.test_control_support import ADMIN, make_config
from tests.test_localapi import MESSAGES, RICH
from tests.test_localapi_actions import Setup
from tests.test_registration import (  # noqa: F401
    DeviceSide,
    device_fixture,
    edge_fixture,
    http,
)
from webapi.v1.listener import Control, build_control


@pytest.fixture(name="control")
def control_fixture(tmp_path: Path, in_reactor: Any) -> Iterator[tuple[Control, str]]:
    config = make_config(control_listen="127.0.0.1:0")
    config.data_dir = str(tmp_path)
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}", keys=StoreKeys.generate())
    resolver = DNSResolver(["127.0.0.1"], 1, timeout=1.0, reactor=in_reactor.reactor)
    control = build_control(config, store, resolver, in_reactor.reactor)
    key = load_admin_keys(admin_key_path(config))[0]
    in_reactor(control.listener.startService)
    control.on_ready({"control": control.listener.address})
    yield control, key
    in_reactor(control.listener.stopService)
    store.close()


def exchange(address: str, head: bytes, body_chunks: tuple[bytes, ...] = ()) -> bytes:
    """Send `head` (and chunks while the server listens), then read until it closes."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server hung up on us, as it should
        received = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
    return received


def status_and_body(reply: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def test_a_huge_content_length_is_refused_before_the_body(control: tuple[Control, str]) -> None:
    listener, _key = control
    head = (
        b"POST /v1/managed-addresses HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 209715200\r\n\r\n"
    )
    # Nothing of the body is sent: the answer must come without it.
    status, body = status_and_body(exchange(listener.listener.address, head))
    assert status == 413
    assert body == {
        "error": "the request body is too large",
        "code": "payload_too_large",
        "statusCode": 413,
        "action": "send_less_data",
    }


def test_a_chunked_body_past_the_cap_is_cut_off(control: tuple[Control, str]) -> None:
    listener, key = control
    head = (
        b"POST /v1/managed-addresses HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"  # 16 KiB each; the cap is 64 KiB
    reply = exchange(listener.listener.address, head, (chunk,) * 64)
    status, body = status_and_body(reply)
    assert status == 413 and body["code"] == "payload_too_large"


def test_a_second_host_header_is_refused(control: tuple[Control, str]) -> None:
    listener, key = control
    head = (
        b"GET /v1/email-routes HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n\r\n"
    )
    status, body = status_and_body(exchange(listener.listener.address, head))
    assert status == 400 and body["code"] == "duplicate_host"


def test_small_bodies_still_work(control: tuple[Control, str]) -> None:
    listener, key = control
    payload = json.dumps({"domain": "ok.test", "type": "byod"}).encode()
    head = (
        b"POST /v1/email-routes HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
    )
    reply = exchange(listener.listener.address, head + payload)
    assert reply.startswith(b"HTTP/1.1 201 ") and b'"domain": "ok.test"' in reply


# -- JSON bodies on the device's loopback API ---------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000 + b"]" * 100_000, b'{"read": ' * 40 + b"true" + b"}" * 40, b"\xff\xfe{}"],
)
def test_local_api_json_that_is_not_fit_is_a_400(tmp_path: Path, raw: bytes) -> None:
    s = Setup(tmp_path)
    info = s.deliver(RICH)
    reply = s.client.post(f"{MESSAGES}/{info.id}/mark", raw)
    assert reply.code == 400, reply.body
    assert reply.json()["code"] == "invalid_json"


def test_local_api_wants_json_content_type(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    info = s.deliver(RICH)
    reply = s.client.request(
        "POST",
        f"{MESSAGES}/{info.id}/mark",
        data=b'{"read": true}',
        extra={"Content-Type": "text/plain"},
    )
    assert reply.code == 415 and reply.json()["code"] == "unsupported_media_type"
    assert s.maildir.folder("INBOX").get(info.id).flags == frozenset()


# -- a second login on a linked device ----------------------------------------------------------


def test_login_start_on_a_linked_device_keeps_the_link(edge: Any, device: DeviceSide) -> None:
    started = device.call("/localapi/v0/login/start", "POST").body
    listed = http(f"{edge.url}/v1/devices", token=ADMIN).body["devices"]
    device_id = next(d["id"] for d in listed if d["registration_code"] == started["code"])
    http(f"{edge.url}/v1/devices/{device_id}/approve", "POST", {}, token=ADMIN)
    assert device.call("/localapi/v0/login/status").body["status"] == "authorized"
    key = device.registration.device_key
    again = device.call("/localapi/v0/login/start", "POST")
    assert again.code == 409 and again.body["code"] == "device_already_linked", again.body
    assert device.registration.device_key == key
    assert device.call("/v1/email-routes").code == 200
    # Revoked at the edge, the device may register again.
    http(f"{edge.url}/v1/devices/{device_id}/revoke", "POST", {}, token=ADMIN)
    assert device.call("/localapi/v0/login/start", "POST").code == 201
