"""The edge's `/v1` management API: a Klein app whose state lives on a `ControlAPI` instance.

Every request is authenticated (the admin key, or a device key that sees only its own
account), its JSON body is capped in size and validated by the pydantic models of
`webapi.v1.models` (unknown fields refused), POST and PATCH honour `Idempotency-Key`, and the
work runs in a thread (`run_blocking`, or the resolver's pool for DNS work), never on the
reactor thread. Errors leave only through `webapi.errors`. The OpenAPI document at
`/v1/openapi.json` is generated from the same models. This module must never compare keys
in a way that leaks timing, store a plain key, or show a client a stack trace.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from klein import Klein
from pydantic import BaseModel, ValidationError
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from edge.config import Config
from edge.dns.resolver import DNSResolver
from edge.domains.scan import DomainInspector
from edge.runtime.adminkeys import hash_secret
from edge.store import Store
from edge.store.access import AccessStore, RegistrationLimits
from edge.store.idempotency import IdempotencyStore
from webapi.errors import APIError, failure_reply, json_reply
from webapi.idempotency import Idempotency
from webapi.jsonbody import json_body
from webapi.openapi import Registry
from webapi.v1 import models as m
from webapi.v1.devices import DeviceOps
from webapi.v1.domains import DomainOps
from webapi.v1.netpolicy import ConnectorPolicy, parse_networks
from webapi.v1.openapi import OPERATIONS, with_query_parameters
from webapi.v1.ops import ControlOps, Principal, Settings
from webapi.v1.outbound import OutboundOps

__all__ = ["OPERATIONS", "ControlAPI"]

M = TypeVar("M", bound=BaseModel)
Run = Callable[..., "defer.Deferred[Any]"]
_BEARER = re.compile(rb"[Bb]earer[ \t]+(\S{1,256})[ \t]*")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _source(request: IRequest) -> str:
    """The address a request came from (the peer of its connection)."""
    peer = request.getClientAddress()
    return str(getattr(peer, "host", "") or "")


def _path_id(value: str, what: str) -> str:
    if not _ID.fullmatch(value):
        raise APIError(404, f"{what}_not_found", f"no {what} {value!r}", f"verify_{what}_id")
    return value


class ControlAPI:
    """The `/v1` Klein app over one store and one resolver."""

    app = Klein()
    app.url_map.merge_slashes = False

    def __init__(
        self,
        store: Store,
        resolver: DNSResolver,
        config: Config,
        admin_keys: list[str],
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        run_blocking: Run = deferToThread,
        run_dns: Run | None = None,
        base_url: str = "",
        max_body: int | None = None,
        own_listeners: Callable[[], list[str]] | None = None,
    ) -> None:
        if not admin_keys or not all(admin_keys):
            raise ValueError("the control API needs at least one non-empty admin key")
        e = config.edge
        self._admin = [hash_secret(k) for k in admin_keys]
        self.base_url = base_url or f"http://{e.control_listen}"
        settings = Settings(
            managed_domain=e.managed_domain.lower().rstrip("."),
            allow_vanity=e.allow_vanity,
            edge_mx_target=(e.edge_mx_target or config.fqdn).lower().rstrip("."),
            spf_mechanism=e.spf_mechanism,
            registration_ttl=e.registration_ttl,
            control_url=lambda: (e.control_url or self.base_url).rstrip("/"),
            claim_ttl=e.claim_ttl,
            claim_limit=e.claim_limit,
            edge_names=(config.fqdn.lower().rstrip("."),),
            registration_limits=RegistrationLimits(
                e.registration_limit_per_source,
                e.registration_limit_total,
                e.registration_limit_window,
            ),
        )
        policy = ConnectorPolicy(
            parse_networks(e.device_networks),
            own_listeners or self._own_listeners,
            resolver.addresses,
        )
        self._config = config
        inspector = DomainInspector(
            resolver,
            helo_name=config.fqdn,
            probe_port=e.mx_delivery_port,
            probe_timeout=e.probe_timeout,
        )
        self.access = AccessStore(store, now)
        self.ops = ControlOps(store, self.access, inspector, settings, now, policy)
        self.domains = DomainOps(self.ops)
        self.devices = DeviceOps(self.ops)
        self.outbound = OutboundOps(store)
        self._run = run_blocking
        self._run_dns = run_dns or resolver.run_async
        self.idempotency = Idempotency(IdempotencyStore(store, now), run_blocking)
        self._max_body = max_body if max_body is not None else e.control_max_body
        self.registry = Registry("tailpost management API", "1", m.ErrorOut)
        self.registry.add(*OPERATIONS)

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    def _own_listeners(self) -> list[str]:
        """The edge's listeners as configured, and the control listener's real address."""
        e = self._config.edge
        real = self.base_url.partition("://")[2].rstrip("/")
        return [e.mx_listen, e.control_listen, *([real] if real else [])]

    @app.handle_errors(Exception)  # the single place errors become replies
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return failure_reply(request, failure)

    # -- plumbing ----------------------------------------------------------------------------

    def _principal(self, request: IRequest) -> defer.Deferred[Principal]:
        header = request.getHeader(b"authorization")
        if header is None:
            raise APIError(
                401,
                "auth_missing_header",
                "this API needs a key",
                "add_authorization_bearer_header",
            )
        match = _BEARER.fullmatch(header)
        if match is None:
            raise APIError(
                401,
                "auth_invalid_format",
                "use Authorization: Bearer <key>",
                "use_bearer_token_format",
            )
        presented = hash_secret(match.group(1))
        if any(hmac.compare_digest(presented, k) for k in self._admin):
            return defer.succeed(Principal("admin"))
        d = self._run(self.access.authenticate, match.group(1).decode("ascii", "replace"))

        def found(device: Any) -> Principal:
            if device is None:
                raise APIError(
                    403, "auth_invalid_key", "the key is not valid or was revoked", "verify_api_key"
                )
            return Principal("device", device.account_id, device.id)

        return d.addCallback(found)

    def _query(self, request: IRequest, model: type[M]) -> M:
        """The query parameters of `request` validated by `model` (each given once)."""
        args: dict[str, str] = {}
        for key, values in (request.args or {}).items():
            name = key.decode("utf-8", "replace")
            if len(values) != 1:
                raise APIError(
                    400,
                    "validation_failed",
                    f"query parameter {name[:64]!r} given more than once",
                    "fix_query_parameters",
                )
            args[name] = values[0].decode("utf-8", "replace")
        try:
            return model.model_validate(args)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc'])[:64] or 'query'}: {e['msg']}"
                for e in exc.errors()[:10]
            )
            raise APIError(
                400, "validation_failed", f"invalid query: {problems}", "fix_query_parameters"
            ) from None

    def _body(self, request: IRequest, model: type[M]) -> tuple[M, bytes]:
        _value, raw = json_body(
            request, self._max_body, optional=getattr(model, "optional_body", False)
        )
        try:
            return model.model_validate_json(raw), raw
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                raise APIError(
                    400, "invalid_json", "the body is not valid JSON", "fix_request_body"
                ) from None
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                for e in exc.errors()[:10]
            )
            raise APIError(
                400, "validation_failed", f"invalid request: {problems}", "fix_request_body"
            ) from None

    def _read(self, request: IRequest, fn: Callable[..., Any], *args: Any) -> defer.Deferred[bytes]:
        d = self._principal(request)
        d.addCallback(lambda p: self._run(fn, p, *args))
        return d.addCallback(lambda body: json_reply(request, body))

    def _write(
        self,
        request: IRequest,
        model: type[M],
        fn: Callable[..., Any],
        *args: Any,
        status: int = 200,
        admin: bool = False,
        dns: bool = False,
    ) -> defer.Deferred[bytes]:
        run = self._run_dns if dns else self._run

        def authorized(p: Principal) -> defer.Deferred[bytes]:
            if admin and p.kind != "admin":
                raise APIError(
                    403, "admin_only", "only the admin key may do this", "use_the_admin_key"
                )
            body, raw = self._body(request, model)

            def produce() -> defer.Deferred[tuple[int, Any]]:
                call = (lambda: fn(*args, body)) if admin else (lambda: fn(p, *args, body))
                d = run(call)
                return d.addCallback(lambda out: out if isinstance(out, tuple) else (status, out))

            return self.idempotency.handle(request, p.scope, raw, produce)

        return self._principal(request).addCallback(authorized)

    def _public(
        self, request: IRequest, model: type[M], fn: Callable[..., Any], status: int
    ) -> defer.Deferred[bytes]:
        body, _raw = self._body(request, model)
        return self._run(fn, body, _source(request)).addCallback(
            lambda out: json_reply(request, out, status)
        )

    # -- routes ------------------------------------------------------------------------------

    @app.route("/v1/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        doc = self.registry.document([self.ops.settings.control_url()])
        return json_reply(request, with_query_parameters(doc))

    @app.route("/v1/managed-addresses", methods=["GET"])
    def list_managed(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._read(request, self.ops.list_managed)

    @app.route("/v1/managed-addresses", methods=["POST"])
    def create_managed(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._write(request, m.ManagedAddressCreate, self.ops.create_managed, status=201)

    @app.route("/v1/managed-addresses/<ident>", methods=["DELETE"])
    def delete_managed(self, request: IRequest, ident: str) -> defer.Deferred[bytes]:
        return self._read(request, self.ops.delete_managed, _path_id(ident, "address"))

    @app.route("/v1/byod-addresses", methods=["GET"])
    def list_byod(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._read(request, self.ops.list_byod)

    @app.route("/v1/byod-addresses", methods=["POST"])
    def create_byod(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._write(request, m.ByodAddressCreate, self.ops.create_byod, status=201)

    @app.route("/v1/byod-addresses/<ident>", methods=["DELETE"])
    def delete_byod(self, request: IRequest, ident: str) -> defer.Deferred[bytes]:
        return self._read(request, self.ops.delete_byod, _path_id(ident, "address"))

    @app.route("/v1/email-routes", methods=["GET"])
    def list_routes(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._read(request, self.ops.list_routes)

    @app.route("/v1/email-routes", methods=["POST"])
    def create_route(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._write(request, m.RouteCreate, self.ops.create_route, status=201)

    @app.route("/v1/email-routes/<ident>", methods=["PATCH"])
    def patch_route(self, request: IRequest, ident: str) -> defer.Deferred[bytes]:
        return self._write(request, m.RoutePatch, self.ops.patch_route, _path_id(ident, "route"))

    @app.route("/v1/email-routes/<ident>", methods=["DELETE"])
    def delete_route(self, request: IRequest, ident: str) -> defer.Deferred[bytes]:
        return self._read(request, self.ops.delete_route, _path_id(ident, "route"))

    @app.route("/v1/dns/scan", methods=["POST"])
    def dns_scan(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._write(request, m.DnsScanRequest, self.domains.scan, dns=True)

    @app.route("/v1/dns/fallback", methods=["POST"])
    def dns_fallback(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._write(request, m.DnsFallbackRequest, self.domains.fallback, dns=True)

    @app.route("/v1/custom-domains/verify-ownership", methods=["POST"])
    def verify_ownership(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._write(
            request, m.VerifyOwnershipRequest, self.domains.verify_ownership, dns=True
        )

    @app.route("/v1/custom-domains/prepare", methods=["POST"])
    def prepare(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._write(request, m.PrepareRequest, self.domains.prepare, dns=True)

    @app.route("/v1/custom-domains/<domain>/dkim", methods=["GET"])
    def dkim_records(self, request: IRequest, domain: str) -> defer.Deferred[bytes]:
        return self._read(request, self.domains.dkim, domain)

    @app.route("/v1/mail/spam-rules", methods=["GET"])
    def list_rules(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._read(request, self.ops.list_rules)

    @app.route("/v1/mail/spam-rules", methods=["POST"])
    def create_rule(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._write(request, m.SpamRuleCreate, self.ops.create_rule, status=201)

    @app.route("/v1/mail/spam-rules/<ident>", methods=["DELETE"])
    def delete_rule(self, request: IRequest, ident: str) -> defer.Deferred[bytes]:
        return self._read(request, self.ops.delete_rule, _path_id(ident, "rule"))

    @app.route("/v1/devices", methods=["GET"])
    def list_devices(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._read(request, self.devices.list_devices)

    @app.route("/v1/devices/register", methods=["POST"])
    def register(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._public(request, m.RegisterRequest, self.devices.register, 201)

    @app.route("/v1/devices/register/status", methods=["POST"])
    def registration_status(self, request: IRequest) -> defer.Deferred[bytes]:
        return self._public(
            request, m.RegistrationStatusRequest, self.devices.registration_status, 200
        )

    @app.route("/v1/devices/<ident>/connector", methods=["PATCH"])
    def patch_device(self, request: IRequest, ident: str) -> defer.Deferred[bytes]:
        return self._write(
            request, m.DevicePatch, self.devices.patch_device, _path_id(ident, "device")
        )

    @app.route("/v1/devices/<ident>/approve", methods=["POST"])
    def approve(self, request: IRequest, ident: str) -> defer.Deferred[bytes]:
        return self._write(
            request, m.ApproveRequest, self.devices.approve, _path_id(ident, "device"), admin=True
        )

    @app.route("/v1/devices/<ident>/revoke", methods=["POST"])
    def revoke(self, request: IRequest, ident: str) -> defer.Deferred[bytes]:
        return self._write(
            request,
            m.EmptyRequest,
            lambda device_id, _body: self.devices.revoke(device_id),
            _path_id(ident, "device"),
            admin=True,
        )

    @app.route("/v1/outbound/events", methods=["GET"])
    def outbound_events(self, request: IRequest) -> defer.Deferred[bytes]:
        def run(p: Principal) -> defer.Deferred[Any]:
            return self._run(self.outbound.events, p, self._query(request, m.OutboundEventsQuery))

        d = self._principal(request).addCallback(run)
        return d.addCallback(lambda body: json_reply(request, body))
