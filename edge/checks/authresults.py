"""The edge's one Authentication-Results header (RFC 8601), built with `authres`.

spf (with smtp.mailfrom or smtp.helo), dkim (one result per signature, with header.d,
header.s and header.b), dmarc (with header.from and policy.dmarc) and arc, under the
edge's authserv-id. Nothing here does I/O.
"""

from __future__ import annotations

import functools

import authres
import authres.arc
import authres.dkim_b
import authres.dmarc
from authres.core import AuthenticationResultProperty

from edge.checks.base import Transaction

HEADER = "Authentication-Results"


@functools.lru_cache(maxsize=4096)
def _spf(result: str, identity: str, value: str) -> str:
    kwargs = {"smtp_mailfrom": value} if identity == "mailfrom" else {"smtp_helo": value}
    return str(authres.SPFAuthenticationResult(result=result, **kwargs))


@functools.lru_cache(maxsize=4096)
def _dkim(result: str, domain: str, selector: str, b: str, reason: str) -> str:
    res = authres.DKIMAuthenticationResult(
        result=result,
        reason=reason or None,
        header_d=domain or None,
        header_s=selector or None,
    )
    if b:
        res.properties.append(AuthenticationResultProperty("header", "b", b[:12]))
    return str(res)


@functools.lru_cache(maxsize=4096)
def _dmarc(result: str, header_from: str, policy: str | None) -> str:
    res = authres.dmarc.DMARCAuthenticationResult(
        result=result, header_from=header_from or None, policy=policy
    )
    return str(res)


@functools.lru_cache(maxsize=64)
def _arc(result: str) -> str:
    return str(authres.arc.ARCAuthenticationResult(result=result))


def build(authserv_id: str, tx: Transaction) -> str:
    """The header field (name, value, no line end), folded at the results.

    Each result is written by authres, once for each distinct set of its values (kept in a
    bounded cache); the field is "name: authserv-id; result; result ..." as authres joins it.
    """
    results: list[str] = []
    spf = tx.spf
    if spf is not None:
        value = spf.sender if spf.identity == "mailfrom" else spf.domain
        results.append(_spf(spf.result, spf.identity, value))
    if tx.dkim:
        for r in tx.dkim:
            reason = r.reason if r.result != "pass" else ""
            results.append(_dkim(r.result, r.domain, r.selector, r.b, _short(reason)))
    elif spf is not None or tx.dmarc is not None:
        results.append(_dkim("none", "", "", "", ""))
    if tx.dmarc is not None:
        d = tx.dmarc
        if d.result in ("pass", "fail"):
            policy: str | None = d.policy if d.result == "fail" else d.published_policy
        else:
            policy = None
        results.append(_dmarc(d.result, d.from_domain, policy))
    if tx.arc is not None:
        results.append(_arc(tx.arc.result))
    value = "".join(f"; {r}" for r in results) if results else "; none"
    return _fold(f"{HEADER}: {authserv_id.lower()}{value}")


def _short(reason: str) -> str:
    reason = reason.replace('"', "'").replace(";", ",")
    return reason[:80]


def _fold(header: str) -> str:
    """Put each result on its own continuation line (the value stays the same after unfolding)."""
    return header.replace("; ", ";\r\n\t")


def header_bytes(authserv_id: str, tx: Transaction) -> bytes:
    return build(authserv_id, tx).encode("utf-8", "replace") + b"\r\n"
