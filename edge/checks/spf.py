"""SPF (RFC 7208) on the envelope sender, or on the HELO name for the null sender.

The evaluation is pyspf's, with its RFC limits (10 DNS-querying terms, 2 void lookups);
its DNS goes through tailpost's resolver. pyspf only offers a module-level DNS function,
so this module installs one dispatcher into it, once, at import; the dispatcher uses the
resolver bound to the current thread for the duration of one evaluation
(`_bound_resolver`), so concurrent evaluations never see each other's resolver and nothing
is patched per call. The client IP is the session's peer address, which is the real client
also behind the PROXY protocol. An evaluation runs in the calling (reactor) thread when the
resolver's cache answers every lookup it makes (`DNSResolver.run_cached`), else in the
resolver's worker pool; it never waits on the network in the reactor thread. A result
computed from cached answers is kept per (client IP, envelope sender, HELO name) until the
first of those answers expires, `KEEP_SECONDS` at most (`ResultMemo`); a temperror is
never kept.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import spf

from edge.checks.base import BaseCheck, Finding, Found, SPFResult, Transaction
from edge.dns.resolver import DNSResolver, DNSTemporaryError, ResultMemo
from edge.runtime.nowlater import then

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
KEEP_SECONDS = 30.0

_local = threading.local()


def _lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    """pyspf's DNSLookup contract: [((name, type), value), ...] or TempError."""
    resolver: DNSResolver | None = getattr(_local, "resolver", None)
    if resolver is None:
        raise spf.TempError("DNS lookup outside an SPF evaluation bound to a resolver")
    try:
        answer = resolver.lookup(name, qtype)
    except DNSTemporaryError as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    out: list[Any] = []
    for record in answer.records:
        if qtype in ("TXT", "SPF"):
            out.append(((name, qtype), [record.encode("utf-8", "surrogateescape")]))
        elif qtype == "MX":
            pref, _, host = record.partition(" ")
            out.append(((name, qtype), (int(pref), host)))
        else:
            out.append(((name, qtype), record))
    return out


spf.DNSLookup = _lookup  # the one place pyspf is pointed at tailpost's resolver


@contextmanager
def _bound_resolver(resolver: DNSResolver) -> Iterator[None]:
    previous = getattr(_local, "resolver", None)
    _local.resolver = resolver
    try:
        yield
    finally:
        _local.resolver = previous


def evaluate(
    resolver: DNSResolver, client_ip: str, sender: str, helo: str, *, querytime: float = 20.0
) -> SPFResult:
    """Blocking SPF evaluation (in a worker thread, or under `DNSResolver.run_cached`)."""
    identity = "mailfrom" if sender else "helo"
    domain = sender.rpartition("@")[2] if sender else helo
    checked = sender or f"postmaster@{helo}"
    if not domain or "." not in domain.strip("."):
        return SPFResult("none", domain, identity, checked, "no domain to check")
    with _bound_resolver(resolver):
        try:
            query = spf.query(i=client_ip, s=checked, h=helo or "unknown", querytime=querytime)
            result, _code, explanation = query.check()
        except ValueError as exc:  # e.g. an IP pyspf cannot parse
            return SPFResult("permerror", domain, identity, checked, str(exc))
    if result not in RESULTS:
        result = "permerror"
    return SPFResult(result, domain.lower(), identity, checked, str(explanation))


def _keep(result: SPFResult) -> bool:
    return result.result != "temperror"


class SPFCheck(BaseCheck):
    name = "spf"

    def __init__(self, resolver: DNSResolver, querytime: float = 20.0) -> None:
        self.resolver = resolver
        self.querytime = querytime
        self.results = ResultMemo(resolver, max_age=KEEP_SECONDS, keep=_keep)

    def mail(self, tx: Transaction) -> Found:
        ip, sender, helo = tx.client_ip, tx.mail_from, tx.helo
        result = self.results.run(
            (ip, sender, helo), evaluate, self.resolver, ip, sender, helo, querytime=self.querytime
        )
        return then(result, _found, tx)


def _found(result: SPFResult, tx: Transaction) -> list[Finding]:
    tx.spf = result
    return [Finding("spf", result.result, f"{result.identity} {result.domain}: {result.reason}")]
