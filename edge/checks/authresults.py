"""The edge's one Authentication-Results header (RFC 8601), built with `authres`.

spf (with smtp.mailfrom or smtp.helo), dkim (one result per signature, with header.d,
header.s and header.b), dmarc (with header.from and policy.dmarc) and arc, under the
edge's authserv-id. Nothing here does I/O.
"""

from __future__ import annotations

import authres
import authres.arc
import authres.dkim_b
import authres.dmarc
from authres.core import AuthenticationResultProperty

from edge.checks.base import Transaction

HEADER = "Authentication-Results"


def _dkim(
    result: str, domain: str, selector: str, b: str, reason: str
) -> authres.DKIMAuthenticationResult:
    res = authres.DKIMAuthenticationResult(
        result=result,
        reason=reason or None,
        header_d=domain or None,
        header_s=selector or None,
    )
    if b:
        res.properties.append(AuthenticationResultProperty("header", "b", b[:12]))
    return res


def build(authserv_id: str, tx: Transaction) -> str:
    """The header field (name, value, no line end), folded at the results."""
    results: list[object] = []
    if tx.spf is not None:
        spf = tx.spf
        kwargs = (
            {"smtp_mailfrom": spf.sender}
            if spf.identity == "mailfrom"
            else {"smtp_helo": spf.domain}
        )
        results.append(authres.SPFAuthenticationResult(result=spf.result, **kwargs))
    if tx.dkim:
        for r in tx.dkim:
            reason = r.reason if r.result != "pass" else ""
            results.append(_dkim(r.result, r.domain, r.selector, r.b, _short(reason)))
    elif tx.spf is not None or tx.dmarc is not None:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    if tx.dmarc is not None:
        d = tx.dmarc
        res = authres.dmarc.DMARCAuthenticationResult(
            result=d.result,
            header_from=d.from_domain or None,
            policy=(d.policy if d.result == "fail" else d.published_policy)
            if d.result in ("pass", "fail")
            else None,
        )
        results.append(res)
    if tx.arc is not None:
        results.append(authres.arc.ARCAuthenticationResult(result=tx.arc.result))
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    return _fold(str(header))


def _short(reason: str) -> str:
    reason = reason.replace('"', "'").replace(";", ",")
    return reason[:80]


def _fold(header: str) -> str:
    """Put each result on its own continuation line (the value stays the same after unfolding)."""
    return header.replace("; ", ";\r\n\t")


def header_bytes(authserv_id: str, tx: Transaction) -> bytes:
    return build(authserv_id, tx).encode("utf-8", "replace") + b"\r\n"
