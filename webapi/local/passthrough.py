"""The device's `/v1/...` pass-through: local callers reach the edge's management API.

Served behind the local API's request guard (loopback Host, local token), each request is
forwarded to the configured edge with this device's key in place of the local token; the
edge's reply (status, JSON body, `Idempotent-Replayed`) comes back as it is, so the edge
alone scopes what the device may see. This module must never forward the local token, send
the device key to anything but the edge URL, or return the key.
"""

from __future__ import annotations

from collections.abc import Callable

from klein import Klein
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from connector.edgeclient import EdgeClient, EdgeReply, EdgeUnavailable
from connector.registration import Registration
from webapi.compose import PrefixDispatch
from webapi.errors import APIError, failure_reply, set_common_headers
from webapi.local.auth import RequestGuard
from webapi.local.registration import RegistrationAPI

__all__ = ["EdgePassthrough", "device_root"]

METHODS = ["GET", "POST", "PATCH", "PUT", "DELETE"]


class EdgePassthrough:
    app = Klein()
    app.url_map.merge_slashes = False

    def __init__(self, client: EdgeClient | None, device_key: Callable[[], str | None]) -> None:
        self.client = client
        self.device_key = device_key

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return failure_reply(request, failure)

    @app.route("/v1", methods=METHODS, branch=True)
    def forward(self, request: IRequest) -> defer.Deferred[bytes]:
        if self.client is None:
            raise APIError(
                409,
                "edge_not_configured",
                "this device has no edge URL configured",
                "set_device_edge_url",
            )
        if not self.device_key():
            raise APIError(
                409,
                "device_not_registered",
                "this device is not approved by its edge yet",
                "post_localapi_v0_login_start",
            )
        headers = {
            name.lower(): values[0]
            for name, values in request.requestHeaders.getAllRawHeaders()
            if values
        }
        body = request.content.read() if request.content is not None else b""
        if not request.uri.startswith(b"/v1"):
            raise APIError(400, "invalid_url", "send the request in origin form", "fix_the_url")
        d = self.client.forward(request.method, request.uri, headers, body)
        return d.addCallbacks(lambda reply: self._reply(request, reply), self._unavailable)

    @staticmethod
    def _reply(request: IRequest, reply: EdgeReply) -> bytes:
        request.setResponseCode(reply.code)
        set_common_headers(request)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        return reply.body

    @staticmethod
    def _unavailable(failure: Failure) -> Failure:
        if isinstance(failure.value, EdgeUnavailable):
            raise APIError(502, "edge_unavailable", "the edge did not answer", "retry_later")
        return failure


def device_root(
    local_api: IResource,
    registration: Registration,
    client: EdgeClient | None,
    token: str,
    max_body: int = 1 << 20,
) -> IResource:
    """The device's HTTP root: `/v1/...` (pass-through) and `/localapi/v0/login/...`
    (registration), each behind the local API's guard, and the local API for the rest."""
    secret = token.encode("utf-8")
    passthrough = EdgePassthrough(client, lambda: registration.device_key)
    return PrefixDispatch(
        [
            (b"/v1/", RequestGuard(passthrough.resource(), secret, max_body)),
            (
                b"/localapi/v0/login/",
                RequestGuard(RegistrationAPI(registration).resource(), secret, max_body),
            ),
        ],
        local_api,
    )
