"""Fixtures for the `/v1` control API tests: a store, a resolver pointed at the local DNS
server, the app driven through `treq.testing.StubTreq`. This module holds no tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import defer

from edge.config import Config
from edge.dns.resolver import DNSResolver
from edge.store import Store, open_store
from edge.store.keyring import StoreKeys
from webapi.v1.app import ControlAPI

ADMIN = "admin-test-key"
ERROR_KEYS = {"error", "code", "statusCode", "action"}
EDGE = "mx.tailpost.test"
MANAGED = "mail.tailpost.test"


def run_now(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(fn, *args, **kwargs)


@dataclass
class Reply:
    code: int
    headers: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == ["application/json"], self.headers
        return json.loads(self.body)

    def error(self, code: str) -> dict[str, Any]:
        body = self.json()
        assert set(body) == ERROR_KEYS, body
        assert body["code"] == code, body
        assert body["statusCode"] == self.code
        return body  # type: ignore[no-any-return]


@dataclass
class FakeNow:
    """The injected clock of the API (store timestamps, expiry, idempotency TTL)."""

    value: datetime = field(default_factory=lambda: datetime(2026, 4, 3, 19, 12, 24, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += timedelta(seconds=seconds)


class Client:
    def __init__(self, api: ControlAPI) -> None:
        self.api = api
        self.stub: Any = StubTreq(api.resource())

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = ADMIN,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        if key is not None:
            sent.setdefault("Authorization", f"Bearer {key}")
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        replies: list[Reply] = []
        failures: list[Any] = []

        def collect(response: Any) -> defer.Deferred[None]:
            got = {
                k.decode().lower(): [v.decode() for v in vs]
                for k, vs in response.headers.getAllRawHeaders()
            }
            return response.content().addCallback(
                lambda content: replies.append(Reply(response.code, got, content))
            )

        d = self.stub.request(method, f"http://edge.test:8025{path}", headers=sent, data=data)
        d.addCallback(collect)
        d.addErrback(failures.append)
        self.stub.flush()
        assert not failures, failures
        assert len(replies) == 1
        return replies[0]

    def get(self, path: str, **kw: Any) -> Reply:
        return self.call("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.call("POST", path, {} if body is None and "raw" not in kw else body, **kw)

    def patch(self, path: str, body: Any, **kw: Any) -> Reply:
        return self.call("PATCH", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Reply:
        return self.call("DELETE", path, **kw)

    def device(self, name: str = "laptop", account: str | None = None) -> tuple[str, str]:
        """Register a device, approve it with the admin key and return (device id, key)."""
        reg = self.post("/v1/devices/register", {"name": name}, key=None)
        assert reg.code == 201, reg.body
        info = reg.json()
        body = {"account_id": account} if account else {}
        approved = self.post(f"/v1/devices/{info['device_id']}/approve", body)
        assert approved.code == 200, approved.body
        status = self.post(
            "/v1/devices/register/status",
            {"registration_id": info["registration_id"], "poll_token": info["poll_token"]},
            key=None,
        )
        assert status.code == 200 and status.json()["status"] == "authorized", status.body
        return info["device_id"], status.json()["device_key"]


def make_config(**edge: Any) -> Config:
    config = Config()
    config.hostname = EDGE
    config.edge.managed_domain = MANAGED
    config.edge.edge_mx_target = EDGE
    config.edge.mx_delivery_port = 1  # the probe of unreachable old MX hosts fails at once
    config.edge.probe_timeout = 2.0
    for key, value in edge.items():
        setattr(config.edge, key, value)
    return config


@pytest.fixture(name="store")
def store_fixture(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'store.db'}", keys=StoreKeys.generate())
    yield opened
    opened.close()


@pytest.fixture(name="now")
def now_fixture() -> FakeNow:
    return FakeNow()


@pytest.fixture(name="make_client")
def make_client_fixture(store: Store, dns_server: Any, now: FakeNow) -> Callable[..., Client]:
    def make(**edge: Any) -> Client:
        resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=2.0)
        api = ControlAPI(
            store,
            resolver,
            make_config(**edge),
            [ADMIN],
            now=now,
            run_blocking=run_now,
            run_dns=run_now,
            base_url="http://edge.test:8025",
        )
        return Client(api)

    return make


@pytest.fixture(name="client")
def client_fixture(make_client: Callable[..., Client]) -> Client:
    return make_client()
