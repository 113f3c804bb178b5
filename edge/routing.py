"""Where each recipient of a queued message goes: a device, a route's old MX, or the MX.

`Router.target` is blocking (store and DNS lookups) and runs in a worker thread. The answer
is a `Target`: the hosts to try in order and how to talk to them. A recipient with no target
gets a permanent `NoRoute` (the message is bounced for it); a DNS failure is temporary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from edge.config import ConfigError, parse_listen
from edge.dns import DNSResolver
from edge.store import RecipientTarget
from edge.store.cache import CachedLookups, NotCached


class NoRoute(Exception):
    """No way to deliver to this recipient now; `reply` is the SMTP-style reason.

    A reply starting with 4 is temporary (try again later), with 5 permanent (bounce).
    """

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply

    @property
    def temporary(self) -> bool:
        return self.reply.startswith("4")


@dataclass(frozen=True)
class Target:
    kind: str  # "device" | "upstream" | "mx"
    key: str  # recipients with the same key share a transaction
    hosts: tuple[tuple[str, int], ...]
    username: str | None = None
    secret: str | None = field(default=None, repr=False)
    starttls: bool = False
    device_id: str | None = None
    tls_modes: tuple[str, ...] = ()
    """How the connection to each of `hosts` (in the same order) is secured: "starttls"
    (STARTTLS when the host offers it), "tls" (TLS from the first octet, as on port 465)
    or "none" (plain SMTP, no STARTTLS even if offered). A host without an entry takes
    "starttls" when `starttls` is set, else "none"."""

    def tls_for(self, host: str, port: int) -> str:
        for (h, p), mode in zip(self.hosts, self.tls_modes, strict=False):
            if (h, p) == (host, port):
                return mode
        return "starttls" if self.starttls else "none"


def _device_target(found: RecipientTarget) -> Target:
    try:
        host, port = parse_listen(found.connector_smtp_addr)
    except ConfigError as exc:
        raise NoRoute(f"451 4.4.0 device {found.device_id} has no connector address") from exc
    return Target(
        kind="device",
        key=f"device:{found.device_id}:{host}:{port}",
        hosts=((host, port),),
        username=found.connector_username,
        secret=found.connector_secret,
        device_id=found.device_id,
    )


def _upstream_target(found: RecipientTarget) -> Target:
    hosts, modes = [], []
    for item in found.upstream_hosts:
        hosts.append((str(item["host"]), int(item.get("port", 25))))
        modes.append(str(item.get("tls_mode") or "starttls"))
    if not hosts:
        raise NoRoute("550 5.1.1 no such user here")
    return Target(
        kind="upstream",
        key=f"upstream:{found.route_id}",
        hosts=tuple(hosts),
        starttls=True,
        tls_modes=tuple(modes),
    )


def routed_target(found: RecipientTarget) -> Target:
    """The target of a recipient the store routes to a device or an upstream host (no DNS)."""
    return _device_target(found) if found.kind == "device" else _upstream_target(found)


class Router:
    def __init__(
        self,
        resolve: Callable[[str], RecipientTarget | None],
        resolver: DNSResolver | None,
        mx_port: int = 25,
    ) -> None:
        self.resolve = resolve
        self.resolver = resolver
        self.mx_port = mx_port

    def target(self, recipient: str, kind: str) -> Target:
        """The target of `recipient` for a message of `kind` ("inbound", "outbound", "dsn")."""
        found = self.resolve(recipient)
        if found is not None and found.kind in ("device", "upstream"):
            return routed_target(found)
        if kind == "inbound" or self.resolver is None:
            raise NoRoute("550 5.1.1 no route to this address")
        return self._mx_target(recipient)

    def _mx_target(self, recipient: str) -> Target:
        assert self.resolver is not None
        domain = recipient.rpartition("@")[2].lower().rstrip(".")
        if not domain:
            raise NoRoute("550 5.1.3 bad recipient address")
        records = self.resolver.mx(domain)
        if any(host in ("", ".") for _pref, host in records):
            raise NoRoute(f"556 5.1.10 {domain} accepts no mail (null MX)")
        hosts = [host for _pref, host in records]
        if not hosts:
            if not self.resolver.addresses(domain):
                raise NoRoute(f"550 5.1.2 {domain} has no MX and no address")
            hosts = [domain]
        return Target(
            kind="mx",
            key=f"mx:{domain}",
            hosts=tuple((h, self.mx_port) for h in hosts),
            starttls=True,
        )


def route_soon(
    router: Router,
    lookups: CachedLookups,
    run_blocking: Callable[..., defer.Deferred[Any]],
) -> Callable[[str, str], Target | defer.Deferred[Target]]:
    """`router.target`, now or later: answered at once from the store cache for a device or
    upstream recipient (no DNS involved; a NoRoute is raised here), and as a Deferred of a
    worker thread's answer otherwise."""

    def soon(recipient: str, kind: str) -> Target | defer.Deferred[Target]:
        try:
            found = lookups.peek(lookups.resolve_recipient, recipient)
        except NotCached:
            return run_blocking(router.target, recipient, kind)
        if found is not None and found.kind in ("device", "upstream"):
            return routed_target(found)
        return run_blocking(router.target, recipient, kind)

    return soon
