"""The control listener's full resource tree: the `/v1` management API, the queue API behind
the admin key, and a Klein app with `/health` and `/metrics` that answers every other path.

`webapi.v1.listener` imports this module, and builds the tree, on the first request that needs more
than `GET /health` or `GET /metrics`: the web framework and the API models are loaded then, not when
the edge starts. This module must never log a key or run store queries on the reactor thread.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from edge.config import Config
from edge.delivery.eventlog import EventRecorder
from edge.delivery.queueops import QueueControl
from edge.dns.resolver import DNSResolver
from edge.runtime.adminkeys import hash_secret
from edge.store import Store
from edge.store.events import DeliveryEvents
from webapi.compose import PrefixDispatch
from webapi.errors import APIError, error_reply, failure_reply
from webapi.v1.app import ControlAPI
from webapi.v1.listener import OpsReplies
from webapi.v1.queue import QueueAPI

__all__ = ["AdminOnly", "OpsEndpoints", "build_root"]


class OpsEndpoints:
    """`/health` and `/metrics` as a Klein app (`OpsReplies` makes the replies); every other
    path gets the common error shape (404, or 405 for a known path)."""

    app = Klein()

    def __init__(
        self, store: Store, queue_size: Any = None, events: EventRecorder | None = None
    ) -> None:
        self.replies = OpsReplies(store, queue_size, events)

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return failure_reply(request, failure)

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> defer.Deferred[bytes]:
        return self.replies.health(request)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> defer.Deferred[bytes]:
        return self.replies.metrics(request)


class AdminOnly(Resource):
    """Lets a request through to `inner` only with an admin key (`Authorization: Bearer`)."""

    isLeaf = True

    def __init__(self, inner: IResource, keys: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.hashes = [hash_secret(k) for k in keys]

    def render(self, request: IRequest) -> bytes | int:  # type: ignore[override]
        header = request.getHeader(b"authorization") or b""
        scheme, _, presented = header.partition(b" ")
        digest = hash_secret(presented.strip())
        if scheme.lower() != b"bearer" or not any(
            hmac.compare_digest(digest, h) for h in self.hashes
        ):
            error = APIError(401, "admin_only", "this needs the admin key", "use_the_admin_key")
            return error_reply(request, error)
        inner: Resource = self.inner  # type: ignore[assignment]
        return inner.render(request)  # type: ignore[no-any-return]


def build_root(
    config: Config,
    store: Store,
    resolver: DNSResolver,
    keys: list[str],
    queue_size: Any = None,
    queue: QueueControl | None = None,
    events: EventRecorder | None = None,
    *,
    base_url: str = "",
    own_listeners: Callable[[], list[str]] | None = None,
) -> tuple[IResource, ControlAPI]:
    """The root resource of the control listener, and the `ControlAPI` under `/v1/`."""
    api = ControlAPI(store, resolver, config, keys, base_url=base_url, own_listeners=own_listeners)
    ops = OpsEndpoints(store, queue_size, events)
    routes: list[tuple[bytes, IResource]] = []
    if queue is not None:
        history = DeliveryEvents(store)
        routes.append((b"/v1/queue", AdminOnly(QueueAPI(queue, history).resource(), keys)))
    routes.append((b"/v1/", api.resource()))
    return PrefixDispatch(routes, ops.app.resource()), api
