"""MTA-STS (RFC 8461): which MX hosts of a domain may take its mail, and whether TLS is a must.

`MTASTS.policy_for(domain)` answers a domain's policy, or None when it publishes none that
can be used. It looks up `_mta-sts.<domain>` TXT through the process's one resolver, and
fetches `https://mta-sts.<domain>/.well-known/mta-sts.txt` when the record's id is not the
one of the policy cached for the domain (or none is cached, or it has expired). A policy is
kept for its `max_age`; while it is fresh it is used when the TXT lookup fails or the record
is gone, and when fetching a new one fails (section 5.1: an attacker who blocks the lookup
or the fetch must not turn enforcement off). Blocking (DNS and HTTPS): it runs in the
router's worker thread, never the reactor's.

The fetch resolves the policy host through the same resolver, connects to its addresses in
turn with a short timeout, checks the server's certificate against the configured CA roots
(the system's by default) and the host name `mta-sts.<domain>`, takes only a 200 answer
(section 3.3: redirects are never followed) of type text/plain and of at most
`MAX_POLICY_SIZE` octets. The policy's text is parsed strictly (section 3.2): version
`STSv1`, mode `enforce`, `testing` or `none`, `max_age` in seconds, and at least one `mx`
pattern unless the mode is `none`; a pattern `*.example.com` stands for one label more.

`sts_hosts` applies a policy to a domain's MX hosts for the router; the helpers at the end
turn a target's `tls_verify` into the delivery client's certificate check
(`edge.tls.VerifyingClientTLS`) and its failures into outcomes (`D451_STS_*` replies).

It must never follow a redirect, accept a policy over a connection whose certificate did
not verify, read an unbounded answer, or ask the system resolver for anything.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.mail.smtp import TLSRequiredError

from edge.config import Config
from edge.delivery.clientsession import ClientSession, LocalFailure
from edge.dns.resolver import DNSResolver, DNSTemporaryError
from edge.smtp import replies
from edge.tls import VerifyingClientTLS

log = Logger()

MAX_POLICY_SIZE = 64 * 1024
"""The most octets of a policy read (section 3.2 asks senders to take 64 KiB at most)."""
MAX_AGE = 31_557_600
"""The longest `max_age` (a year, section 3.2); a longer one is kept for this long."""
FETCH_TIMEOUT = 10.0
"""Seconds for each step of a policy fetch (connect, handshake, each read)."""
MAX_CACHED = 10_000
"""The most domains whose policies are kept (the oldest go first)."""
MODES = ("enforce", "testing", "none")

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.IGNORECASE)


class PolicyError(Exception):
    """A TXT record or policy text that does not follow RFC 8461, or a fetch that failed."""


@dataclass(frozen=True)
class Policy:
    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str = ""
    """The id of the TXT record the policy was fetched under."""

    def matches(self, host: str) -> bool:
        """Whether the MX host name `host` is one of the policy's (section 4.1): equal to a
        pattern, or one label more than a `*.` pattern's rest."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, dot, rest = host.partition(".")
                if dot and label and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def parse_txt(records: list[str]) -> str | None:
    """The policy id of a domain's `_mta-sts` TXT records (section 3.1), or None when the
    domain has no usable record: none starting with `v=STSv1;`, more than one, or one
    whose id is not 1 to 32 letters and digits."""
    found = [r for r in records if re.match(r"v=STSv1[ \t]*(;|$)", r)]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for item in found[0].split(";"):
        key, eq, value = item.strip().partition("=")
        if not key:
            continue
        if not eq:
            return None
        fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def _pattern(value: str) -> str:
    pattern = value.strip().lower().rstrip(".")
    labels = pattern[2:].split(".") if pattern.startswith("*.") else pattern.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise PolicyError(f"mx pattern {value!r} is not a host name or *.host name")
    return pattern


def parse_policy(text: str, policy_id: str = "") -> Policy:
    """The policy of `text` (section 3.2); PolicyError says what is wrong with it."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"policy line {line[:60]!r} is not 'key: value'")
        fields.setdefault(key.strip().lower(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("policy version is not STSv1")
    modes = fields.get("mode", [])
    if len(modes) != 1 or modes[0] not in MODES:
        raise PolicyError(f"policy mode must be one of {', '.join(MODES)}")
    ages = fields.get("max_age", [])
    if len(ages) != 1 or not ages[0].isdigit() or len(ages[0]) > 10:
        raise PolicyError("policy max_age must be a number of seconds")
    mx = tuple(_pattern(v) for v in fields.get("mx", []))
    if not mx and modes[0] != "none":
        raise PolicyError("policy names no mx host")
    return Policy(modes[0], mx, min(int(ages[0]), MAX_AGE), policy_id)


class _Connection(http.client.HTTPSConnection):
    """HTTPS to one address already resolved, with SNI and the name check for `host`."""

    def __init__(
        self, host: str, address: str, port: int, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address
        self.tls = context

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        try:
            self.sock = self.tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class PolicyFetcher:
    """Fetches a domain's policy text over HTTPS (blocking; see the module's docstring)."""

    def __init__(
        self,
        resolver: DNSResolver,
        *,
        port: int = 443,
        ca_file: str = "",
        timeout: float = FETCH_TIMEOUT,
    ) -> None:
        self.resolver = resolver
        self.port = port
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=ca_file or None)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2

    def __call__(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        try:
            addresses = self.resolver.host_addresses(host)
        except DNSTemporaryError as exc:
            raise PolicyError(f"{host}: DNS lookup failed: {exc}") from exc
        if not addresses:
            raise PolicyError(f"{host} has no address")
        failure: Exception | None = None
        for address in addresses:
            try:
                return self._get(host, address)
            except PolicyError:
                raise  # the server answered: its answer stands
            except (OSError, http.client.HTTPException) as exc:
                failure = exc
        raise PolicyError(f"https://{host}/ could not be fetched: {failure}")

    def _get(self, host: str, address: str) -> str:
        conn = _Connection(host, address, self.port, self.context, self.timeout)
        try:
            conn.request("GET", "/.well-known/mta-sts.txt", headers={"Accept": "text/plain"})
            response = conn.getresponse()
            if response.status != 200:
                raise PolicyError(f"https://{host}/ answered {response.status}, not 200")
            kind = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if kind != "text/plain":
                raise PolicyError(f"https://{host}/ answered {kind or 'no type'}, not text/plain")
            body = response.read(MAX_POLICY_SIZE + 1)
            if len(body) > MAX_POLICY_SIZE:
                raise PolicyError(f"https://{host}/ policy is over {MAX_POLICY_SIZE} octets")
            try:
                return body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PolicyError(f"https://{host}/ policy is not UTF-8 text") from exc
        finally:
            conn.close()


class MTASTS:
    """The policies of the domains mail goes to, kept for their max_age (thread-safe)."""

    def __init__(
        self,
        resolver: DNSResolver,
        fetch: Callable[[str], str],
        clock: Callable[[], float] = time.time,
        max_cached: int = MAX_CACHED,
    ) -> None:
        self.resolver = resolver
        self.fetch = fetch
        self.clock = clock
        self.max_cached = max_cached
        self._cache: OrderedDict[str, tuple[float, Policy]] = OrderedDict()
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}

    def cached(self, domain: str) -> Policy | None:
        """The domain's policy while it is fresh, without any lookup."""
        with self._lock:
            hit = self._cache.get(domain)
        if hit is None or hit[0] <= self.clock():
            return None
        return hit[1]

    def policy_for(self, domain: str) -> Policy | None:
        """The domain's policy now (blocking), or None: it has none, or none could be had
        and none is cached (mail then goes as to a domain without MTA-STS)."""
        domain = domain.lower().rstrip(".")
        try:
            policy_id = parse_txt(self.resolver.txt(f"_mta-sts.{domain}"))
        except DNSTemporaryError as exc:
            log.info(
                "mta-sts: TXT of {domain} failed ({e}); cached policy used", domain=domain, e=exc
            )
            return self.cached(domain)
        cached = self.cached(domain)
        if policy_id is None or (cached is not None and cached.id == policy_id):
            return cached
        with self._lock:
            fetching = self._fetching.setdefault(domain, threading.Lock())
        with fetching:  # one fetch per domain at a time; the others take its answer
            cached = self.cached(domain)
            if cached is not None and cached.id == policy_id:
                return cached
            try:
                policy = parse_policy(self.fetch(domain), policy_id)
            except PolicyError as exc:
                log.warn("mta-sts: no new policy for {domain}: {e}", domain=domain, e=exc)
                return cached
            except Exception:  # a defect here must not stop the mail: it goes as before
                log.failure("mta-sts: fetching the policy of {domain} failed", domain=domain)
                return cached
            finally:
                with self._lock:
                    self._fetching.pop(domain, None)
            self._keep(domain, policy)
            log.info(
                "mta-sts: {domain} policy {id}: mode {mode}, mx {mx}, max_age {age}",
                domain=domain,
                id=policy_id,
                mode=policy.mode,
                mx=", ".join(policy.mx),
                age=policy.max_age,
            )
            return policy

    def _keep(self, domain: str, policy: Policy) -> None:
        with self._lock:
            self._cache.pop(domain, None)
            self._cache[domain] = (self.clock() + policy.max_age, policy)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)


def sts_hosts(sts: MTASTS | None, domain: str, hosts: list[str]) -> tuple[list[str], str]:
    """The MX hosts of `domain` (in order) that mail may go to under its policy, and how
    their certificates are checked (`edge.delivery.routing.Target.tls_verify`). In
    `enforce` mode a host the policy does not name is left out (none left: the caller
    defers the mail); in `testing` mode it is kept, and logged."""
    policy = sts.policy_for(domain) if sts is not None else None
    if policy is None or policy.mode == "none":
        return hosts, ""
    allowed = [h for h in hosts if policy.matches(h)]
    if len(allowed) < len(hosts):
        log.warn(
            "mta-sts: {domain} ({mode}): MX host(s) {hosts} not in its policy{left}",
            domain=domain,
            mode=policy.mode,
            hosts=", ".join(h for h in hosts if h not in allowed),
            left=", not tried" if policy.mode == "enforce" else "; tried all the same",
        )
    return (allowed if policy.mode == "enforce" else hosts), policy.mode


# -- what a policy asks of the delivery client's TLS -------------------------------------------


def checked_tls(checked: str, ca_file: str) -> VerifyingClientTLS | None:
    """The certificate check of a pool key's `mode:name` (None for "": unchecked)."""
    if not checked:
        return None
    mode, _, name = checked.partition(":")
    return VerifyingClientTLS(name, ca_file, strict=mode == "enforce")


def sts_failure(exc: Exception, checked: VerifyingClientTLS, where: str) -> Exception:
    """Why a connection that MTA-STS `enforce` requires TLS of failed, as a named reply (what
    the certificate check found goes to the log only)."""
    if checked.problem:
        reply = replies.D451_STS_CERTIFICATE
    elif isinstance(exc, TLSRequiredError):
        reply = replies.D451_STS_NO_STARTTLS
    else:
        return exc
    log.warn(
        "smtp: {where}: {text} ({problem}); not delivered",
        where=where,
        text=reply.text.format(where=where),
        problem=checked.problem or "no STARTTLS",
    )
    return LocalFailure(reply, checked.problem)


def tls_noted(session: ClientSession, where: str) -> None:
    """Log what MTA-STS `testing` found wrong with a new connection's TLS (`tls_note`)."""
    note = tls_note(session)
    if note:
        log.warn("smtp: {where}:{note}; delivering all the same", where=where, note=note)


def tls_note(session: ClientSession) -> str:
    """What goes after the reply of a delivery under MTA-STS `testing` whose TLS would have
    failed `enforce` ("" when it would not, or the session is not checked)."""
    checked = session.checked
    if checked is None or checked.strict:
        return ""
    if not ISSLTransport.providedBy(session.transport):
        return " (MTA-STS testing: no STARTTLS)"
    if checked.problem:
        return f" (MTA-STS testing: {checked.problem})"
    return ""


def build_mta_sts(config: Config, resolver: DNSResolver) -> MTASTS | None:
    """The edge's MTA-STS policies (`[edge] mta_sts`, `mta_sts_port`, `tls_ca_file`)."""
    if not config.edge.mta_sts:
        return None
    fetch = PolicyFetcher(resolver, port=config.edge.mta_sts_port, ca_file=config.edge.tls_ca_file)
    return MTASTS(resolver, fetch)
