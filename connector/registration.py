"""The device side of joining an edge: start a registration, poll it, keep what approval gives.

`Registration.start()` asks the edge to register this device and keeps the registration id
and poll secret; a device that is linked already is refused (`AlreadyLinked`) unless its
edge no longer takes its key (revoked), since a fresh registration would throw the working
link away. `status()` polls the edge until an operator approves, then keeps the device
key (in `<data_dir>/device/edge-link.json`, mode 0600, next to `credentials.json`) and takes
the connector credentials the edge will present into the device's credentials, so the
running connector accepts them at once.

The pin of the connector's TLS key (`edge.tls.spki_pin`) goes with the registration, so the
edge pins it at approval. When the device starts with another key (a new certificate), its
pin goes to the edge with the device key (`PATCH /v1/devices/{id}/connector`, `sync_pin`;
retried by `PinSync` until the edge has it), so a new certificate never cuts the mail off for longer
than that takes. The link file remembers which pin the edge has. This module must never
return or log the device key or the poll secret: the key never leaves the device daemon.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from connector.credentials import Credentials
from connector.edgeclient import EdgeClient, EdgeReply
from edge.config import Config, ConfigError
from edge.runtime.service import TCPListener

__all__ = [
    "AlreadyLinked",
    "EdgeLink",
    "PinSync",
    "Registration",
    "RegistrationError",
    "build_registration",
]

log = Logger()

PIN_RETRY = 60.0
"""Seconds between attempts to give the edge a changed pin while it cannot be told."""


class RegistrationError(Exception):
    """The edge refused or did not understand a registration step."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"the edge answered {status}")
        self.status = status
        self.body = body


class AlreadyLinked(Exception):
    """This device is approved and its key still works: there is nothing to start."""


@dataclass
class EdgeLink:
    """What this device knows of its edge account (the JSON file's fields)."""

    status: str = "not_started"
    registration_id: str = ""
    poll_token: str = ""
    code: str = ""
    approval_url: str = ""
    expires_at: str = ""
    device_id: str = ""
    account_id: str = ""
    namespace: str = ""
    managed_domain: str = ""
    edge_mx_target: str = ""
    device_key: str = ""
    connector_tls_pin: str = ""
    """The pin of the connector's TLS key the edge was given (at registration or since)."""

    @classmethod
    def load(cls, path: Path) -> EdgeLink:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        known = {k: str(v) for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a stale temporary file keeps its mode through O_CREAT
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        os.chmod(path, 0o600)

    def public(self) -> dict[str, Any]:
        """The fields a local caller may see (no key, no poll secret)."""
        body: dict[str, Any] = {"status": self.status}
        for name in ("device_id", "account_id", "namespace", "managed_domain", "edge_mx_target"):
            if getattr(self, name):
                body[name] = getattr(self, name)
        if self.status == "pending":
            body.update(auth_url=self.approval_url, code=self.code, expires_at=self.expires_at)
        return body


class Registration:
    def __init__(
        self,
        path: Path,
        creds: Credentials,
        client: EdgeClient | None,
        *,
        name: str,
        hostname: str,
        connector_addr: Callable[[], str],
        run_blocking: Callable[..., defer.Deferred[Any]],
        tls_pin: str | None = None,
    ) -> None:
        """`tls_pin`: the pin of the connector's TLS key (None: the connector has no TLS)."""
        self.tls_pin = tls_pin
        self.path = path
        self.creds = creds
        self.client = client
        self.name = name
        self.hostname = hostname
        self.connector_addr = connector_addr
        self.run = run_blocking
        self.link = EdgeLink.load(path)

    @property
    def device_key(self) -> str | None:
        """The device's key for the edge, once approved (for the pass-through only)."""
        return self.link.device_key or None

    def _client(self) -> EdgeClient:
        if self.client is None:
            raise RegistrationError(0, None)
        return self.client

    @staticmethod
    def _json(reply: EdgeReply) -> Any:
        try:
            body = reply.json()
        except ValueError:
            body = None
        if not 200 <= reply.code < 300 or not isinstance(body, dict):
            raise RegistrationError(reply.code, body)
        return body

    async def _linked(self) -> bool:
        """Whether the kept device key still works at the edge (401/403: it was revoked)."""
        if self.link.status != "authorized" or not self.link.device_key:
            return False
        reply = await self._client().request(b"GET", b"/v1/devices")
        return reply.code not in (401, 403)

    async def _start(self) -> dict[str, Any]:
        if await self._linked():
            raise AlreadyLinked(self.link.device_id)
        reply = await self._client().register(
            self.name, self.hostname, self.connector_addr(), self.tls_pin
        )
        body = self._json(reply)
        link = EdgeLink(
            status="pending",
            registration_id=str(body["registration_id"]),
            poll_token=str(body["poll_token"]),
            code=str(body["code"]),
            approval_url=str(body["approval_url"]),
            expires_at=str(body.get("expires_at") or ""),
            device_id=str(body["device_id"]),
            connector_tls_pin=self.tls_pin or "",
        )
        await self.run(link.save, self.path)
        self.link = link
        return link.public()

    def start(self) -> defer.Deferred[dict[str, Any]]:
        """A fresh registration; what was kept of an earlier pending, expired or revoked one
        is replaced. Fails with AlreadyLinked while the device's link works."""
        return defer.ensureDeferred(self._start())

    async def _status(self) -> dict[str, Any]:
        link = self.link
        if link.status != "pending":
            return link.public()
        reply = await self._client().registration_status(link.registration_id, link.poll_token)
        body = self._json(reply)
        status = str(body.get("status", ""))
        if status == "authorized":
            connector = body.get("connector") or {}
            updated = EdgeLink(
                status="authorized",
                device_id=str(body["device_id"]),
                account_id=str(body.get("account_id") or ""),
                namespace=str(body.get("namespace") or ""),
                managed_domain=str(body.get("managed_domain") or ""),
                edge_mx_target=str(body.get("edge_mx_target") or ""),
                device_key=str(body["device_key"]),
                connector_tls_pin=link.connector_tls_pin,
            )
            await self.run(self._keep, updated, connector)
            self.link = updated
        elif status in ("expired", "revoked"):
            self.link = EdgeLink(status=status, device_id=link.device_id)
            await self.run(self.link.save, self.path)
        return self.link.public()

    def _keep(self, link: EdgeLink, connector: dict[str, Any]) -> None:
        link.save(self.path)
        username, password = connector.get("username"), connector.get("password")
        if isinstance(username, str) and isinstance(password, str) and username and password:
            self.creds.connector_username = username
            self.creds.connector_password = password
            self.creds.save()

    def status(self) -> defer.Deferred[dict[str, Any]]:
        """Where the registration stands; while pending, this asks the edge once."""
        return defer.ensureDeferred(self._status())

    @property
    def pin_outdated(self) -> bool:
        """Whether the edge holds another pin than the connector's (or none) for this
        approved device."""
        link = self.link
        linked = link.status == "authorized" and bool(link.device_key and link.device_id)
        return linked and bool(self.tls_pin) and link.connector_tls_pin != self.tls_pin

    async def _sync_pin(self) -> bool:
        if not self.pin_outdated:
            return True
        link = self.link
        reply = await self._client().request(
            b"PATCH",
            f"/v1/devices/{link.device_id}/connector".encode("ascii"),
            headers={b"Content-Type": b"application/json"},
            body=json.dumps({"connector_tls_pin": self.tls_pin}).encode("ascii"),
        )
        self._json(reply)  # raises RegistrationError on a refusal
        link.connector_tls_pin = self.tls_pin or ""
        await self.run(link.save, self.path)
        log.info("registration: the edge now pins the connector's new TLS key")
        return True

    def sync_pin(self) -> defer.Deferred[bool]:
        """Give the edge the connector's pin if it holds another; True once it has it.
        Fails with EdgeUnavailable or RegistrationError when the edge did not take it."""
        return defer.ensureDeferred(self._sync_pin())


class PinSync(Service):
    """On start, and every `PIN_RETRY` seconds until it succeeds: `Registration.sync_pin`."""

    def __init__(self, registration: Registration, clock: IReactorTime) -> None:
        self.setName("pin-sync")
        self.registration = registration
        self.clock = clock
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if not self.registration.pin_outdated:
            return
        self._loop = task.LoopingCall(self._attempt)
        self._loop.clock = self.clock
        self._loop.start(PIN_RETRY, now=True)

    async def _try(self) -> None:
        try:
            await self.registration.sync_pin()
        except Exception as exc:  # the edge is away or refused: logged, tried again later
            log.warn(
                "registration: the edge does not have the connector's new TLS pin yet "
                "({error}); mail waits on the edge until it does",
                error=exc,
            )
            return
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _attempt(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._try())

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


def build_registration(
    config: Config,
    creds: Credentials,
    connector: TCPListener,
    http: Any = None,
    *,
    tls_pin: str | None = None,
) -> tuple[Registration, EdgeClient | None]:
    """The device's registration and edge client, from `[device] edge_url` (none if empty)."""
    holder: list[Registration] = []
    client = None
    if config.device.edge_url:
        try:
            client = EdgeClient(
                config.device.edge_url,
                lambda: holder[0].device_key if holder else None,
                http=http,
            )
        except ValueError as exc:
            raise ConfigError(f"device.edge_url: {exc}") from None

    def connector_addr() -> str:
        if connector.host in ("0.0.0.0", "::", ""):
            return f"{config.fqdn}:{connector.port}"
        return connector.address

    registration = Registration(
        config.data_path / "device" / "edge-link.json",
        creds,
        client,
        name=config.fqdn.split(".")[0] or "device",
        hostname=config.fqdn,
        connector_addr=connector_addr,
        run_blocking=deferToThread,
        tls_pin=tls_pin,
    )
    holder.append(registration)
    return registration, client
