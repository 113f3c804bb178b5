"""The device operations of `/v1`: listing, registration and its polling, approval, revoke,
and a device's own changes (its connector TLS pin).

Blocking functions over `edge.store.access.AccessStore`, run in a thread by `webapi.v1.app`.
Registration needs no key, so it is limited per source address and in total (429 with
`Retry-After`) and makes nothing but a pending registration row; a registering device gets
a poll secret, and once an operator approves it (the device and its account are made then),
its poll returns its API key and connector credentials. The pin of the connector's TLS key a
device sends when it registers is pinned at approval; the device replaces it with its own
key (`PATCH /v1/devices/{id}/connector`) when its certificate changes. This module must
never return a key to anyone but the holder of the registration's poll secret, nor let a
device key approve or revoke, nor change another device's pin.
"""

from __future__ import annotations

from typing import Any

from edge.store import Conflict, Device, NotFound
from edge.store.access import PollRefused, RateLimited, RegistrationRecord
from webapi.errors import APIError
from webapi.v1 import models as m
from webapi.v1.ops import ControlOps, Principal, _err, _not_found, namespace_of

__all__ = ["DeviceOps"]


class DeviceOps:
    def __init__(self, ops: ControlOps) -> None:
        self.ops = ops
        self.store = ops.store
        self.access = ops.access
        self.settings = ops.settings

    # -- devices -----------------------------------------------------------------------------

    def device_out(self, device: Device, code: str | None = None) -> dict[str, Any]:
        body = device.to_dict()
        body.update(
            account_id=device.account_id,
            namespace=namespace_of(device.name, device.id),
            registration_code=code,
        )
        return m.DeviceOut.model_validate(body).model_dump(mode="json")

    def pending_out(self, reg: RegistrationRecord) -> dict[str, Any]:
        """A registration waiting for approval, shown as the device it will become."""
        body = {
            "id": reg.device_id,
            "account_id": "",
            "name": reg.name,
            "hostname": reg.hostname,
            "auth_status": "pending",
            "namespace": namespace_of(reg.name, reg.device_id),
            "connector_smtp_addr": reg.connector_smtp_addr,
            "connector_username": None,
            "connector_tls_pin": reg.connector_tls_pin,
            "registration_code": reg.code,
            "created_at": reg.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "last_seen_at": None,
        }
        return m.DeviceOut.model_validate(body).model_dump(mode="json")

    def list_devices(self, p: Principal) -> dict[str, Any]:
        devices = self.store.list_devices(self.ops._account(p))
        if p.kind != "admin":
            return {"devices": [self.device_out(d) for d in devices]}
        now = self.ops.now()
        waiting = [
            r for r in self.access.registrations() if r.approved_at is None and r.expires_at > now
        ]
        codes = {r.device_id: r.code for r in waiting}
        known = {d.id for d in devices}
        return {
            "devices": [self.device_out(d, codes.get(d.id)) for d in devices]
            + [self.pending_out(r) for r in waiting if r.device_id not in known]
        }

    def approve(self, ref: str, req: m.ApproveRequest) -> dict[str, Any]:
        try:
            return self.device_out(self.access.approve(ref, req.account_id))
        except NotFound:
            raise _not_found("device", ref) from None
        except Conflict as exc:
            raise _err(409, "registration_closed", str(exc), "register_again") from None

    def revoke(self, device_id: str) -> dict[str, Any]:
        try:
            return self.device_out(self.access.revoke_device(device_id))
        except NotFound:
            raise _not_found("device", device_id) from None

    def patch_device(self, p: Principal, device_id: str, req: m.DevicePatch) -> dict[str, Any]:
        """A device's new connector TLS pin. A device key changes only its own device; the
        admin key any device of the edge."""
        if p.kind != "admin" and p.device_id != device_id:
            raise _not_found("device", device_id)
        try:
            return self.device_out(
                self.store.set_connector_tls_pin(device_id, req.connector_tls_pin)
            )
        except NotFound:
            raise _not_found("device", device_id) from None

    def register(self, req: m.RegisterRequest, source: str = "") -> dict[str, Any]:
        stranger = Principal("device")
        self.ops.check_connector_addr(stranger, req.connector_smtp_addr, "registration")
        try:
            reg, poll = self.access.register(
                req.name,
                req.hostname,
                req.connector_smtp_addr,
                self.settings.registration_ttl,
                source,
                self.settings.registration_limits,
                req.connector_tls_pin,
            )
        except RateLimited as exc:
            wait = str(int(exc.retry_after + 0.999)).encode("ascii")
            raise APIError(
                429,
                "too_many_registrations",
                f"too many registrations {exc.scope}; try again later",
                "retry_after",
                {b"Retry-After": wait},
            ) from None
        except ValueError as exc:
            raise _err(400, "validation_failed", str(exc), "fix_request_body") from None
        body = {
            "status": "pending",
            "registration_id": reg.id,
            "device_id": reg.device_id,
            "code": reg.code,
            "poll_token": poll,
            "approval_url": f"{self.settings.control_url()}/v1/devices/{reg.device_id}/approve",
            "expires_at": reg.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return m.RegisterOut.model_validate(body).model_dump(mode="json")

    def registration_status(
        self, req: m.RegistrationStatusRequest, _source: str = ""
    ) -> dict[str, Any]:
        try:
            status, issued = self.access.poll(req.registration_id, req.poll_token)
        except NotFound:
            raise _not_found("registration", req.registration_id) from None
        except PollRefused:
            raise _err(
                403, "invalid_poll_token", "the poll token does not match", "login_start_again"
            ) from None
        reg = self.access.find_registration(req.registration_id)
        body: dict[str, Any] = {"status": status, "device_id": reg.device_id if reg else ""}
        if issued is not None:
            device = issued.device
            body.update(
                account_id=device.account_id,
                device_key=issued.key,
                namespace=namespace_of(device.name, device.id),
                managed_domain=self.settings.managed_domain,
                edge_mx_target=self.settings.edge_mx_target,
                connector={
                    "username": device.connector_username or "",
                    "password": device.connector_secret or "",
                },
            )
        return m.RegistrationStatusOut.model_validate(body).model_dump(
            mode="json", exclude_none=True
        )
