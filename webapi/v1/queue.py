"""The edge's queue operations over HTTP, served on the control listener.

Routes: `GET /v1/queue` (filters: state, device, domain, min_age), `GET /v1/queue/{id}`,
`GET /v1/queue/events` (delivery history from the store: queue_id, recipient, event, limit),
`POST /v1/queue/{id}/retry|hold|release|bounce`, `DELETE /v1/queue/{id}`. Admin-only: the
control listener checks the admin key before anything here runs. Errors use the common error shape;
nothing here ever answers with a stack trace.
"""

from __future__ import annotations

import re
from typing import Any

from klein import Klein
from pydantic import BaseModel, ConfigDict, Field
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from edge.delivery.queueops import STATES, Filters, QueueControl, QueueError
from edge.store.events import DeliveryEvents
from edge.store.models import DELIVERY_EVENTS
from webapi.errors import APIError, bad_parameter, failure_reply, json_reply

_QID = re.compile(r"^[0-9A-F]{14,40}$")


class QueueQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: str | None = Field(default=None, pattern="^(" + "|".join(STATES) + ")$")
    device: str | None = Field(default=None, max_length=64)
    domain: str | None = Field(default=None, max_length=253)
    min_age: float | None = Field(default=None, ge=0)


def _query(request: IRequest) -> QueueQuery:
    return QueueQuery.model_validate(_args(request))


def _args(request: IRequest) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for key, values in (request.args or {}).items():
        name = key.decode("utf-8", "replace")
        if len(values) != 1:
            raise bad_parameter(f"query parameter {name} given more than once")
        args[name] = values[0].decode("utf-8", "replace")
    return args


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queue_id: str | None = Field(default=None, pattern="^[0-9A-F]{14,40}$")
    recipient: str | None = Field(default=None, max_length=320)
    event: str | None = Field(default=None, pattern="^(" + "|".join(DELIVERY_EVENTS) + ")$")
    limit: int = Field(default=100, ge=1, le=1000)


def _events_query(request: IRequest) -> EventsQuery:
    return EventsQuery.model_validate(_args(request))


def _qid(value: str) -> str:
    if not _QID.fullmatch(value):
        raise APIError(400, "invalid_queue_id", "invalid queue id", "list_the_queue")
    return value


class QueueAPI:
    app = Klein()

    def __init__(self, control: QueueControl, history: DeliveryEvents | None = None) -> None:
        self.control = control
        self.history = history

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        if failure.check(QueueError):
            err: QueueError = failure.value  # type: ignore[assignment]
            action = {404: "list_the_queue", 409: "retry_later"}.get(err.status, "fix_request")
            failure = Failure(APIError(err.status, err.code, str(err), action))
        return failure_reply(request, failure)

    @app.route("/v1/queue", methods=["GET"])
    def list_queue(self, request: IRequest) -> bytes:
        q = _query(request)
        items = self.control.list(Filters(q.state, q.device, q.domain, q.min_age))
        return json_reply(request, {"messages": items, "total": len(items)})

    @app.route("/v1/queue/events", methods=["GET"])
    async def events(self, request: IRequest) -> bytes:
        q = _events_query(request)
        if self.history is None:
            raise APIError(404, "not_found", "no event history here", "check_the_url")
        found = await deferToThread(
            self.history.query,
            queue_id=q.queue_id,
            recipient=q.recipient,
            event=q.event,
            limit=q.limit,
        )
        return json_reply(request, {"events": [e.to_dict() for e in found]})

    @app.route("/v1/queue/<qid>", methods=["GET"])
    def show(self, request: IRequest, qid: str) -> bytes:
        return json_reply(request, self.control.describe(_qid(qid)))

    @app.route("/v1/queue/<qid>", methods=["DELETE"])
    async def delete(self, request: IRequest, qid: str) -> bytes:
        return json_reply(request, await self.control.delete(_qid(qid)))

    @app.route("/v1/queue/<qid>/retry", methods=["POST"])
    def retry(self, request: IRequest, qid: str) -> bytes:
        return json_reply(request, self.control.retry_now(_qid(qid)))

    @app.route("/v1/queue/<qid>/hold", methods=["POST"])
    async def hold(self, request: IRequest, qid: str) -> bytes:
        return json_reply(request, await self.control.hold(_qid(qid)))

    @app.route("/v1/queue/<qid>/release", methods=["POST"])
    async def release(self, request: IRequest, qid: str) -> bytes:
        return json_reply(request, await self.control.release(_qid(qid)))

    @app.route("/v1/queue/<qid>/bounce", methods=["POST"])
    async def bounce(self, request: IRequest, qid: str) -> bytes:
        return json_reply(request, await self.control.bounce(_qid(qid)))
