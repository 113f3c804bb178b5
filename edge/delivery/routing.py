"""Where each recipient of a queued message goes: a device, a route's old MX, or the MX.

`Router.target` is blocking (store and DNS lookups) and runs in a worker thread. The answer
is a `Target`: the addresses to try in order and how to talk to them. A recipient with no
target gets a permanent `NoRoute` (the message is bounced for it); a DNS failure is
temporary.

Every host name on the way (an MX host, a split domain's old MX, a device connector given
by name) is resolved here to its IPv4 and IPv6 addresses through the process's one
configured resolver (`edge.dns.resolver.DNSResolver`, with its cache and timeouts), and the delivery
client connects to those addresses: nothing on the delivery path ever asks the system
resolver. The Target keeps each address's host name beside it for logs and error texts.

Which recipients the edge takes is one rule for the MX (at RCPT) and the delivery queue:
`RecipientResolver`, the store's answer (`edge.store.resolve`) plus the edge's postmaster:
the role addresses (`postmaster@`, `abuse@`) of every domain the edge receives mail for and
the bare `postmaster` of RFC 5321 §4.1.1.3 reach a device even when no address or route
owner takes them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from edge.config import Config, ConfigError, parse_listen
from edge.delivery.mtasts import MTASTS, sts_hosts
from edge.dns.resolver import DNSResolver, DNSTemporaryError
from edge.runtime.nowlater import NowOrLater
from edge.smtp import replies
from edge.smtp.replies import Reply
from edge.store import RecipientTarget
from edge.store.cache import CachedLookups, NotCached
from edge.store.resolve import ROLE_LOCAL_PARTS

MAX_ADDRESSES = 10
"""The most addresses one target lists (over all its hosts, in order): each costs a connect
timeout when it does not answer."""

LOOPBACK = ("127.0.0.1", "::1")
"""The addresses of the name `localhost` (RFC 6761 §6.3: never asked of DNS)."""


class NoRoute(Exception):
    """No way to deliver to this recipient now; `named` is why (a `D` reply of
    `edge.smtp.replies`, filled in), `reply` the same on one line, as it is recorded.

    A 4xx reply is temporary (try again later), a 5xx permanent (bounce).
    """

    def __init__(self, named: Reply) -> None:
        super().__init__(named.status)
        self.named = named
        self.reply = named.status

    @property
    def temporary(self) -> bool:
        return 400 <= self.named.code < 500


@dataclass(frozen=True)
class Target:
    kind: str  # "device" | "upstream" | "mx"
    key: str  # recipients with the same key share a transaction
    hosts: tuple[tuple[str, int], ...]
    """The addresses to try, in order: IP addresses (or, for a router without a resolver,
    what the route names), each with its port."""
    username: str | None = None
    secret: str | None = field(default=None, repr=False)
    starttls: bool = False
    device_id: str | None = None
    tls_modes: tuple[str, ...] = ()
    """How the connection to each of `hosts` (in the same order) is secured: "starttls"
    (STARTTLS when the host offers it), "tls" (TLS from the first octet, as on port 465)
    or "none" (plain SMTP, no STARTTLS even if offered). A host without an entry takes
    "starttls" when `starttls` is set, else "none"."""
    names: tuple[str, ...] = ()
    """The host name each of `hosts` (in the same order) was resolved from; none (or "")
    for an address given as such."""
    tls_pin: str | None = None
    """For a device: the pin of its connector's TLS key (`edge.tls.spki_pin`). With one,
    every host must take STARTTLS and present that key before AUTH is sent."""
    tls_verify: str = ""
    """For an MX under an MTA-STS policy (`edge.delivery.mtasts`): "enforce" (STARTTLS and a
    certificate valid for the host's name, or no delivery) or "testing" (checked, a failure
    logged and noted, delivered anyway); "" for opportunistic STARTTLS, unchecked."""

    def tls_for(self, host: str, port: int) -> str:
        for (h, p), mode in zip(self.hosts, self.tls_modes, strict=False):
            if (h, p) == (host, port):
                return mode
        return "starttls" if self.starttls else "none"

    def name_of(self, host: str, port: int) -> str:
        """The host name `host` was resolved from, or "" if it was given as an address."""
        for (h, p), name in zip(self.hosts, self.names, strict=False):
            if (h, p) == (host, port):
                return name
        return ""

    def where(self, host: str, port: int) -> str:
        """`name[address]:port` (or `address:port`), for logs and error texts."""
        name = self.name_of(host, port)
        shown = f"[{host}]" if ":" in host else host
        return f"{name}[{host}]:{port}" if name and name != host else f"{shown}:{port}"


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def needs_dns(found: RecipientTarget) -> bool:
    """Whether the target of `found` names a host that must be resolved (not an address)."""
    if found.kind == "device":
        try:
            host, _port = parse_listen(found.connector_smtp_addr)
        except ConfigError:
            return False
        return not _is_address(host)
    return any(not _is_address(str(item.get("host", ""))) for item in found.upstream_hosts)


class HostAddresses:
    """Resolves host names through the configured resolver (A and AAAA, in that order)."""

    def __init__(self, resolver: DNSResolver | None) -> None:
        self.resolver = resolver

    def of(self, host: str) -> list[str]:
        """The addresses of `host` (itself if it is one); [] when it has none (NXDOMAIN or
        no A/AAAA records). Raises DNSTemporaryError when it cannot tell now."""
        host = host.strip().rstrip(".")
        if _is_address(host):
            return [host]
        if host.lower() == "localhost":
            return list(LOOPBACK)
        if self.resolver is None:
            raise DNSTemporaryError(f"no resolver to look up {host}")
        return self.resolver.host_addresses(host)

    def expand(
        self, hosts: list[tuple[str, int, str]]
    ) -> tuple[list[tuple[str, int, str, str]], DNSTemporaryError | None]:
        """Each (name, port, TLS mode) as its addresses, in order, at most MAX_ADDRESSES:
        (address, port, mode, name), and the DNS failure of a host that could not be
        resolved now (its addresses are missing), if any."""
        out: list[tuple[str, int, str, str]] = []
        failure: DNSTemporaryError | None = None
        for name, port, mode in hosts:
            try:
                addresses = self.of(name)
            except DNSTemporaryError as exc:
                failure = failure or exc
                continue
            shown = "" if _is_address(name) else name.lower().rstrip(".")
            for address in addresses:
                if (address, port) not in {(a, p) for a, p, _m, _n in out}:
                    out.append((address, port, mode, shown))
        return out[:MAX_ADDRESSES], failure


def _device_target(found: RecipientTarget, dns: HostAddresses) -> Target:
    try:
        host, port = parse_listen(found.connector_smtp_addr)
    except ConfigError as exc:
        raise NoRoute(replies.D451_NO_CONNECTOR_ADDRESS.format(device=found.device_id)) from exc
    base = Target(
        kind="device",
        key=f"device:{found.device_id}:{host}:{port}",
        hosts=((host, port),),
        username=found.connector_username,
        secret=found.connector_secret,
        device_id=found.device_id,
        # STARTTLS always: required and pinned with a pin, opportunistic without (a device
        # that registered before it had one, until it sends it).
        starttls=True,
        tls_pin=found.connector_tls_pin,
    )
    if _is_address(host):
        return base
    expanded, failure = dns.expand([(host, port, "starttls")])
    if not expanded:
        if failure is not None:
            raise failure
        raise NoRoute(replies.D451_CONNECTOR_NOT_FOUND.format(host=host, device=found.device_id))
    return replace_hosts(base, expanded)


def replace_hosts(base: Target, expanded: list[tuple[str, int, str, str]]) -> Target:
    """`base` with the resolved addresses (from `HostAddresses.expand`) as its hosts."""
    return Target(
        kind=base.kind,
        key=base.key,
        hosts=tuple((address, port) for address, port, _mode, _name in expanded),
        username=base.username,
        secret=base.secret,
        starttls=base.starttls,
        device_id=base.device_id,
        tls_modes=tuple(mode for _a, _p, mode, _n in expanded),
        names=tuple(name for _a, _p, _m, name in expanded),
        tls_pin=base.tls_pin,
        tls_verify=base.tls_verify,
    )


def _upstream_target(found: RecipientTarget, dns: HostAddresses) -> Target:
    hosts = [
        (str(item["host"]), int(item.get("port", 25)), str(item.get("tls_mode") or "starttls"))
        for item in found.upstream_hosts
    ]
    if not hosts:
        raise NoRoute(replies.D550_NO_SUCH_USER)
    expanded, failure = dns.expand(hosts)
    if not expanded:
        if failure is not None:
            raise failure
        names = ", ".join(name for name, _port, _mode in hosts)
        # The route's own hosts: a mistake of its configuration, which can be put right
        # while the message waits.
        raise NoRoute(replies.D451_OLD_MX_NO_ADDRESS.format(names=names))
    return replace_hosts(
        Target(
            kind="upstream",
            key=f"upstream:{found.route_id}",
            hosts=(),
            starttls=True,
        ),
        expanded,
    )


def routed_target(found: RecipientTarget, resolver: DNSResolver | None = None) -> Target:
    """The target of a recipient the store routes to a device or an upstream host; host
    names are resolved through `resolver` (blocking), addresses taken as they are."""
    dns = HostAddresses(resolver)
    if found.kind == "device":
        return _device_target(found, dns)
    return _upstream_target(found, dns)


@dataclass(frozen=True)
class Postmaster:
    """Where the edge's own role mail goes (`[edge] postmaster`, docs/configuration.md)."""

    address: str = ""
    """The operator's address: an address this edge delivers to a device."""
    own_domains: tuple[str, ...] = ()
    """The domains the edge itself answers for besides its routes: the managed domain and
    its own host name."""

    @classmethod
    def from_config(cls, config: Config) -> Postmaster:
        domains = (config.edge.managed_domain, config.fqdn)
        own = tuple(dict.fromkeys(d.lower().rstrip(".") for d in domains if d))
        return cls(config.edge.postmaster.strip(), own)


class RecipientResolver:
    """Who takes mail for a recipient: the store's answer, then the postmaster rule.

    A role address (`postmaster@`, `abuse@`) of a routed domain whose route owner cannot
    take it (see `edge.store.resolve`), or of one of the edge's own domains, goes where the
    operator's address goes. The bare `postmaster` (RFC 5321 §4.1.1.3) goes there too, or,
    with no operator address configured, where `postmaster@` of the managed domain or of
    the edge's host name goes. The operator's address must reach a device (an upstream
    host would be asked for an address of another domain). Anything else is None: 550,
    unless `awaiting` says the recipient is refused only until its domain's verified route
    becomes active (`edge.store.resolve.awaiting_route`): then the refusal is temporary.

    Made only of the store lookups passed in, so `CachedLookups.peek` can run it.
    """

    def __init__(
        self,
        resolve: Callable[[str], RecipientTarget | None],
        routed_domain: Callable[[str], bool] | None = None,
        postmaster: Postmaster | None = None,
        awaiting: Callable[[str], bool] | None = None,
    ) -> None:
        self.resolve = resolve
        self.routed_domain = routed_domain
        self.postmaster = postmaster or Postmaster()
        self._awaiting = awaiting

    def awaiting(self, address: str) -> bool:
        """Whether `address`, which nobody takes now (`self(address)` is None), is refused
        only until its domain's route becomes active; False without the lookup. Never a
        reason to accept: only to make the refusal temporary."""
        if self._awaiting is None or "@" not in address:
            return False
        return self._awaiting(address)

    def __call__(self, address: str) -> RecipientTarget | None:
        local, at, domain = address.rpartition("@")
        if not at:
            return self._bare(address) if address.lower() == "postmaster" else None
        found = self.resolve(address)
        if found is not None or local.lower() not in ROLE_LOCAL_PARTS:
            return found
        domain = domain.lower().rstrip(".")
        own = domain in self.postmaster.own_domains
        if own or (self.routed_domain is not None and self.routed_domain(domain)):
            return self._operator(address)
        return None

    def _operator(self, address: str) -> RecipientTarget | None:
        operator = self.postmaster.address
        if not operator:
            return None
        found = self.resolve(operator)
        if found is None or found.kind != "device":
            return None
        return RecipientTarget(
            kind="device",
            address=address,
            device_id=found.device_id,
            connector_smtp_addr=found.connector_smtp_addr,
            connector_username=found.connector_username,
            connector_secret=found.connector_secret,
            route_id=found.route_id,
            upstream_hosts=[],
            connector_tls_pin=found.connector_tls_pin,
        )

    def _bare(self, address: str) -> RecipientTarget | None:
        found = self._operator(address)
        if found is not None:
            return found
        for domain in self.postmaster.own_domains:
            found = self.resolve(f"postmaster@{domain}")
            if found is not None and found.kind == "device":
                return found
        return None


def recipient_resolver(lookups: CachedLookups, config: Config) -> RecipientResolver:
    """The one recipient rule of an edge (its MX and its delivery queue), over its cache."""
    return RecipientResolver(
        lookups.resolve_recipient,
        lookups.routed_domain,
        Postmaster.from_config(config),
        lookups.awaiting_route,
    )


class Router:
    def __init__(
        self,
        resolve: Callable[[str], RecipientTarget | None],
        resolver: DNSResolver | None,
        mx_port: int = 25,
        sts: MTASTS | None = None,
    ) -> None:
        """`resolve` is the recipient rule (a `RecipientResolver`, or the store's own);
        `resolver` the process's DNS resolver (None: no DNS; addresses only); `sts` the
        MTA-STS policies MX delivery follows (None: opportunistic STARTTLS only)."""
        self.resolve = resolve
        self.resolver = resolver
        self.mx_port = mx_port
        self.sts = sts
        self.dns = HostAddresses(resolver)

    def target(self, recipient: str, kind: str) -> Target:
        """The target of `recipient` for a message of `kind` ("inbound", "outbound", "dsn")."""
        found = self.resolve(recipient)
        if found is not None and found.kind in ("device", "upstream"):
            return routed_target(found, self.resolver)
        if kind == "inbound" or self.resolver is None:
            raise NoRoute(replies.D550_NO_ROUTE)
        return self._mx_target(recipient)

    def _mx_target(self, recipient: str) -> Target:
        """RFC 5321 §5.1: the MX hosts by preference, each resolved to its addresses; with
        no MX, the domain itself (its A/AAAA: the implicit MX); a null MX refuses. Under an
        MTA-STS policy in `enforce` mode only the hosts it names, their certificates
        checked (none named: a temporary failure); in `testing` mode all, checked."""
        assert self.resolver is not None
        domain = recipient.rpartition("@")[2].lower().rstrip(".")
        if not domain:
            raise NoRoute(replies.D550_BAD_ADDRESS)
        records = self.resolver.mx(domain)
        if any(host in ("", ".") for _pref, host in records):
            raise NoRoute(replies.D556_NULL_MX.format(domain=domain))
        hosts = [host for _pref, host in records]
        implicit = not hosts
        if implicit:
            hosts = [domain]
        hosts, verify = sts_hosts(self.sts, domain, hosts)
        if not hosts:
            raise NoRoute(replies.D451_STS_NO_MX.format(domain=domain))
        expanded, failure = self.dns.expand([(h, self.mx_port, "starttls") for h in hosts])
        if not expanded:
            if failure is not None:
                raise failure
            if implicit:
                raise NoRoute(replies.D550_NO_MX_NO_ADDRESS.format(domain=domain))
            # Every MX host is unknown or has no address: unusable MX records (§5.1).
            raise NoRoute(replies.D550_NO_MX_ADDRESS.format(domain=domain))
        base = Target(kind="mx", key=f"mx:{domain}", hosts=(), starttls=True, tls_verify=verify)
        return replace_hosts(base, expanded)


def route_soon(
    router: Router,
    lookups: CachedLookups,
    run_blocking: Callable[..., defer.Deferred[Any]],
) -> Callable[[str, str], NowOrLater[Target]]:
    """`router.target`, now or later: answered at once from the store cache for a device or
    upstream recipient whose hosts are addresses (no DNS involved; a NoRoute is raised
    here), and as a Deferred of a worker thread's answer otherwise (DNS, or a store miss)."""

    def soon(recipient: str, kind: str) -> NowOrLater[Target]:
        try:
            found = lookups.peek(router.resolve, recipient)
        except NotCached:
            return run_blocking(router.target, recipient, kind)
        if found is not None and found.kind in ("device", "upstream") and not needs_dns(found):
            return routed_target(found)
        return run_blocking(router.target, recipient, kind)

    return soon
