"""The device's `POST /localapi/v0/login/start` and `GET /localapi/v0/login/status`.

A Klein app over `connector.registration.Registration`, served behind the local API's
request guard (loopback Host, local token). Start asks the edge to register this device and
returns the approval URL and code (409 `device_already_linked` while the device's link to
its edge works: starting again would throw it away); status polls until the operator
approves. This module must never return the device key or the poll secret.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from connector.edgeclient import EdgeUnavailable
from connector.registration import AlreadyLinked, Registration, RegistrationError
from webapi.errors import APIError, failure_reply, json_reply

__all__ = ["RegistrationAPI"]

PREFIX = "/localapi/v0/login"


def edge_error(failure: Failure) -> Failure:
    """Edge trouble as an API error: unreachable (502) or a refusal passed on."""
    error = failure.value
    if isinstance(error, AlreadyLinked):
        raise APIError(
            409,
            "device_already_linked",
            "this device is linked to its edge already; its account and key stay as they are",
            "revoke_the_device_on_the_edge_first",
        )
    if isinstance(error, EdgeUnavailable):
        raise APIError(502, "edge_unavailable", "the edge did not answer", "retry_later")
    if isinstance(error, RegistrationError):
        if error.status == 0:
            raise APIError(
                409,
                "edge_not_configured",
                "this device has no edge URL configured",
                "set_device_edge_url",
            )
        body = error.body if isinstance(error.body, dict) else {}
        if error.status == 404:
            raise APIError(
                409,
                "registration_lost",
                "the edge no longer knows this registration",
                "login_start",
            )
        raise APIError(
            502,
            "edge_refused",
            str(body.get("error") or f"the edge answered {error.status}"),
            str(body.get("action") or "retry_later"),
        )
    return failure


class RegistrationAPI:
    app = Klein()

    def __init__(self, registration: Registration) -> None:
        self.registration = registration

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    @app.handle_errors(Exception)
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return failure_reply(request, failure)

    @app.route(f"{PREFIX}/start", methods=["POST"])
    def start(self, request: IRequest) -> defer.Deferred[bytes]:
        d = self.registration.start().addErrback(edge_error)
        return d.addCallback(lambda body: json_reply(request, body, 201))

    @app.route(f"{PREFIX}/status", methods=["GET"])
    def status(self, request: IRequest) -> defer.Deferred[bytes]:
        d: defer.Deferred[Any] = self.registration.status().addErrback(edge_error)
        return d.addCallback(lambda body: json_reply(request, body))
