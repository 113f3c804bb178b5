"""The edge's control listener: the `/v1` management API, `/health` and `/metrics`.

`build_control` makes the listener from the configuration: the admin key file (created on
first start with one random key, mode 0600; one key per line, `#` comments allowed), the
`ControlAPI` over the edge's store and resolver, and the two operational endpoints. The
listener belongs on the tailnet or an admin network, never on the public internet. This
module must never log a key or run store queries on the reactor thread.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klein import Klein
from sqlalchemy import text
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from edge.config import Config, ConfigError
from edge.dns import DNSResolver
from edge.eventlog import EventRecorder
from edge.queueops import QueueControl
from edge.service import TCPListener
from edge.store import Store
from edge.store.events import DeliveryEvents
from edge.store.models import DELIVERY_EVENTS
from webapi.compose import PrefixDispatch
from webapi.control import ControlAPI
from webapi.errors import APIError, error_reply, failure_reply, json_reply, set_common_headers
from webapi.queue_api import QueueAPI

__all__ = ["Control", "OpsEndpoints", "admin_key_path", "build_control", "load_admin_keys"]


def admin_key_path(config: Config) -> Path:
    return (
        Path(config.edge.admin_key_file)
        if config.edge.admin_key_file
        else config.data_path / "edge" / "admin.key"
    )


def load_admin_keys(path: Path) -> list[str]:
    """The admin keys in ``path``; a missing file is created with one new key (mode 0600)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = "tpa_" + secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"# admin keys of the control API, one per line\n{key}\n")
            fh.flush()
            os.fsync(fh.fileno())
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the admin key file {path}: {exc.strerror}") from exc
    keys = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not keys:
        raise ConfigError(f"the admin key file {path} holds no key")
    if any(len(k) < 16 for k in keys):
        raise ConfigError(f"every key in {path} must be at least 16 characters")
    return keys


class OpsEndpoints:
    """`/health` (the store answers) and `/metrics` (Prometheus text format)."""

    app = Klein()

    def __init__(self, store: Store, queue_size: Any = None, events: Any = None) -> None:
        self.store = store
        self.queue_size = queue_size or (lambda: 0)
        self.events = events

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return failure_reply(request, failure)

    def _check(self) -> dict[str, Any]:
        started = time.monotonic()
        with self.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok", "latency_ms": round((time.monotonic() - started) * 1000, 1)}

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> defer.Deferred[bytes]:
        def failed(_failure: Failure) -> bytes:
            body = {"status": "error", "checks": {"database": {"status": "error"}}}
            return json_reply(request, body, 503)

        def ok(db: dict[str, Any]) -> bytes:
            return json_reply(request, {"status": "ok", "checks": {"database": db}})

        d: defer.Deferred[bytes] = deferToThread(self._check).addCallback(ok)
        return d.addErrback(failed)

    def _counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for device in self.store.list_devices():
            counts[device.auth_status] = counts.get(device.auth_status, 0) + 1
        counts["routes"] = len(self.store.list_routes())
        return counts

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> defer.Deferred[bytes]:
        def render(counts: dict[str, int]) -> bytes:
            lines = [
                "# HELP tailpost_queue_messages Messages waiting in the delivery queue.",
                "# TYPE tailpost_queue_messages gauge",
                f"tailpost_queue_messages {int(self.queue_size())}",
                "# HELP tailpost_routes Email routes in the store.",
                "# TYPE tailpost_routes gauge",
                f"tailpost_routes {counts.pop('routes')}",
                "# HELP tailpost_devices Devices by authorization status.",
                "# TYPE tailpost_devices gauge",
            ]
            for status in ("pending", "authorized", "revoked"):
                lines.append(f'tailpost_devices{{status="{status}"}} {counts.get(status, 0)}')
            if self.events is not None:
                lines += [
                    "# HELP tailpost_delivery_events_total Recipient events since start.",
                    "# TYPE tailpost_delivery_events_total counter",
                ]
                for event in DELIVERY_EVENTS:
                    total = self.events.counts.get(event, 0)
                    lines.append(f'tailpost_delivery_events_total{{event="{event}"}} {total}')
            request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
            set_common_headers(request)
            return ("\n".join(lines) + "\n").encode("utf-8")

        return deferToThread(self._counts).addCallback(render)


@dataclass
class Control:
    listener: TCPListener
    api: ControlAPI

    def on_ready(self, addresses: dict[str, str]) -> None:
        """Once listening: approval links use the real address (port 0 allowed)."""
        if "control" in addresses:
            self.api.base_url = f"http://{addresses['control']}"


class AdminOnly(Resource):
    """Lets a request through to `inner` only with an admin key (`Authorization: Bearer`)."""

    isLeaf = True

    def __init__(self, inner: IResource, keys: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.hashes = [hashlib.sha256(k.encode()).digest() for k in keys]

    def render(self, request: IRequest) -> bytes | int:  # type: ignore[override]
        header = request.getHeader(b"authorization") or b""
        scheme, _, presented = header.partition(b" ")
        digest = hashlib.sha256(presented.strip()).digest()
        if scheme.lower() != b"bearer" or not any(
            hmac.compare_digest(digest, h) for h in self.hashes
        ):
            error = APIError(401, "admin_only", "this needs the admin key", "use_the_admin_key")
            return error_reply(request, error)
        inner: Resource = self.inner  # type: ignore[assignment]
        return inner.render(request)  # type: ignore[no-any-return]


def build_control(
    config: Config,
    store: Store,
    resolver: DNSResolver,
    reactor: Any,
    queue_size: Any = None,
    queue: QueueControl | None = None,
    events: EventRecorder | None = None,
) -> Control:
    keys = load_admin_keys(admin_key_path(config))
    api = ControlAPI(store, resolver, config, keys)
    ops = OpsEndpoints(store, queue_size, events)
    routes: list[tuple[bytes, IResource]] = []
    if queue is not None:
        history = DeliveryEvents(store)
        routes.append((b"/v1/queue", AdminOnly(QueueAPI(queue, history).resource(), keys)))
    routes.append((b"/v1/", api.resource()))
    root = PrefixDispatch(routes, ops.app.resource())
    listener = TCPListener("control", config.edge.control_listen, Site(root), reactor)
    return Control(listener, api)
