"""The edge's control listener: the `/v1` management API, `/health` and `/metrics`.

`build_control` makes the listener from the configuration: the admin key file (created on
first start with one random key, mode 0600; one key per line, `#` comments allowed) and a
root resource that answers `GET /health` and `GET /metrics` itself. Every other request goes
to the full tree of `webapi.v1.site` (the `ControlAPI` over the edge's store and resolver,
the queue API and the operational endpoints as a Klein app), which is imported, in a thread,
and built on the first request that needs it: an edge that is only monitored never holds the
web framework and the API models in memory. The listener belongs on the tailnet or an admin
network, never on the public internet. This module must never log a key or run store queries
on the reactor thread.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from edge.config import Config
from edge.delivery.eventlog import EventRecorder
from edge.delivery.queueops import QueueControl
from edge.dns.resolver import DNSResolver
from edge.runtime.adminkeys import admin_key_path, load_admin_keys
from edge.runtime.service import TCPListener
from edge.store import Store
from edge.store.models import DELIVERY_EVENTS
from webapi.replies import internal_error_reply, json_reply, set_common_headers

if TYPE_CHECKING:
    from twisted.web.server import Site

    from webapi.v1.app import ControlAPI

__all__ = [
    "Control",
    "ControlRoot",
    "LazyResource",
    "LazySite",
    "OpsReplies",
    "build_control",
]

log = Logger(namespace="tailpost.control")

NOT_DONE_YET = 1  # twisted.web.server.NOT_DONE_YET, without loading that module at start


class OpsReplies:
    """The replies of `/health` (the store answers) and `/metrics` (Prometheus text format)."""

    def __init__(self, store: Store, queue_size: Any = None, events: Any = None) -> None:
        self.store = store
        self.queue_size = queue_size or (lambda: 0)
        self.events = events

    def _check(self) -> dict[str, Any]:
        started = time.monotonic()
        with self.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok", "latency_ms": round((time.monotonic() - started) * 1000, 1)}

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


class LazyResource(Resource):
    """Renders the resource that `build` makes on the first request: `prepare` (the imports
    `build` needs) runs in a thread first, then `build` on the reactor thread.

    Requests that arrive in the meantime wait for it. If either step fails, the waiting
    requests get the generic 500 reply and the next request tries again.
    """

    isLeaf = True

    def __init__(
        self,
        prepare: Callable[[], object],
        build: Callable[[], IResource],
        run_blocking: Callable[..., defer.Deferred[Any]] = deferToThread,
    ) -> None:
        super().__init__()
        self._prepare = prepare
        self._build = build
        self._run = run_blocking
        self.built: IResource | None = None
        self._waiting: list[tuple[Any, list[Failure]]] = []

    def render(self, request: IRequest) -> bytes | int:  # type: ignore[override]
        if self.built is not None:
            inner: Resource = self.built  # type: ignore[assignment]
            return inner.render(request)  # type: ignore[no-any-return]
        lost: list[Failure] = []
        request.notifyFinish().addErrback(lost.append)  # type: ignore[attr-defined]
        self._waiting.append((request, lost))
        if len(self._waiting) == 1:
            d = self._run(self._prepare)
            d.addCallback(lambda _: self._build())
            d.addBoth(self._ready)
        return NOT_DONE_YET

    def _ready(self, result: IResource | Failure) -> None:
        if isinstance(result, Failure):
            log.failure("the control API could not be built", result)
        else:
            self.built = result
        waiting, self._waiting = self._waiting, []
        for request, lost in waiting:
            if lost:  # the client went away while it waited
                continue
            if self.built is None:
                request.write(internal_error_reply(request))
                request.finish()
            else:
                request.render(self.built)  # a twisted.web.server.Request


class ControlRoot(Resource):
    """Answers `GET /health` and `GET /metrics`; hands every other request to `rest`."""

    isLeaf = True

    def __init__(self, ops: OpsReplies, rest: IResource) -> None:
        super().__init__()
        self.ops = ops
        self.rest = rest

    def render(self, request: IRequest) -> bytes | int:  # type: ignore[override]
        if request.method == b"GET" and request.path in (b"/health", b"/metrics"):
            lost: list[Failure] = []
            request.notifyFinish().addErrback(lost.append)  # type: ignore[attr-defined]
            d = (
                self.ops.health(request)
                if request.path == b"/health"
                else self.ops.metrics(request)
            )
            d.addErrback(self._failed, request)
            d.addCallback(self._send, request, lost)
            return NOT_DONE_YET
        rest: Resource = self.rest  # type: ignore[assignment]
        return rest.render(request)  # type: ignore[no-any-return]

    @staticmethod
    def _failed(failure: Failure, request: IRequest) -> bytes:
        log.failure(
            "unhandled error in {method} {path}", failure, method=request.method, path=request.path
        )
        return internal_error_reply(request)

    @staticmethod
    def _send(body: bytes, request: IRequest, lost: list[Failure]) -> None:
        if not lost:  # else the client went away before the reply was ready
            request.write(body)
            request.finish()


class LazySite(Factory):
    """The `Site` over `root`, made (and `twisted.web.server` loaded) at the first connection;
    its requests are refused before their body is read past `max_body` (webapi.httplimits)."""

    def __init__(self, root: IResource, reactor: Any, max_body: int = 64 * 1024) -> None:
        self.root = root
        self.reactor = reactor
        self.max_body = max_body
        self.site: Site | None = None

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if self.site is None:
            from webapi.httplimits import bounded_site

            self.site = bounded_site(self.root, self.max_body, reactor=self.reactor)
            self.site.doStart()
        return self.site.buildProtocol(addr)

    def startFactory(self) -> None:
        if self.site is not None:  # listening again after a stop
            self.site.doStart()

    def stopFactory(self) -> None:
        if self.site is not None:
            self.site.doStop()


@dataclass
class Control:
    """The control listener; `api` is the `ControlAPI` once a request has built it."""

    listener: TCPListener
    root: ControlRoot
    api: ControlAPI | None = None
    base_url: str = ""

    def on_ready(self, addresses: dict[str, str]) -> None:
        """Once listening: approval links use the real address (port 0 allowed)."""
        if "control" in addresses:
            self.base_url = f"http://{addresses['control']}"
            if self.api is not None:
                self.api.base_url = self.base_url


def build_control(
    config: Config,
    store: Store,
    resolver: DNSResolver,
    reactor: Any,
    queue_size: Any = None,
    queue: QueueControl | None = None,
    events: EventRecorder | None = None,
    own_listeners: Callable[[], list[str]] | None = None,
) -> Control:
    """The control listener; `own_listeners` names the edge's listening addresses (no
    device may point its connector at them)."""
    keys = load_admin_keys(admin_key_path(config))

    def prepare() -> object:
        return importlib.import_module("webapi.v1.site")

    def build() -> IResource:
        from webapi.v1.site import build_root

        root, control.api = build_root(
            config,
            store,
            resolver,
            keys,
            queue_size,
            queue,
            events,
            base_url=control.base_url,
            own_listeners=own_listeners,
        )
        return root

    root = ControlRoot(OpsReplies(store, queue_size, events), LazyResource(prepare, build))
    site = LazySite(root, reactor, config.edge.control_max_body)
    listener = TCPListener("control", config.edge.control_listen, site, reactor)
    control = Control(listener, root)
    return control
