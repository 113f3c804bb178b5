"""The verdict header the edge puts on every message it hands on: `X-Tailpost-Verdict`.

One line of `name=value` pairs separated by "; " (folded between pairs), values limited to
letters, digits and `_ . @ + -` and spaces:

    X-Tailpost-Verdict: action=junk; reason=dmarc.quarantine; spf=pass; dkim=fail;
        dmarc=fail; dmarc-policy=quarantine; arc=none; spam=Yes; score=7.4;
        spam-action=add header; symbols=PHISHING BAYES_SPAM

`action` is what the edge decided (accept, tag or junk: rejected mail never gets here).
The device reads it with `maildir.verdict.parse_verdict`, and trusts it only because the
edge removes every incoming `X-Tailpost-*` header and the connector only accepts mail from
its authenticated edge. Nothing here does I/O.
"""

from __future__ import annotations

import functools
import re

from edge.checks.actions import Decision
from edge.checks.base import Transaction

VERDICT_HEADER = "X-Tailpost-Verdict"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+ \-]")
MAX_SYMBOLS = 40


@functools.lru_cache(maxsize=1024)
def _clean(value: str) -> str:
    return _UNSAFE.sub("_", value).strip()[:200]


def dkim_summary(tx: Transaction) -> str:
    """pass if any signature passed, else the first signature's result, none unsigned."""
    if not tx.dkim:
        return "none"
    if any(r.result == "pass" for r in tx.dkim):
        return "pass"
    return tx.dkim[0].result


def fields(tx: Transaction, decision: Decision) -> list[tuple[str, str]]:
    out = [("action", decision.action)]
    if decision.finding is not None:
        out.append(("reason", decision.finding.key))
    out += [
        ("spf", tx.spf.result if tx.spf else "none"),
        ("dkim", dkim_summary(tx)),
        ("dmarc", tx.dmarc.result if tx.dmarc else "none"),
    ]
    if tx.dmarc is not None and tx.dmarc.result in ("pass", "fail"):
        policy = tx.dmarc.policy if tx.dmarc.result == "fail" else tx.dmarc.published_policy
        out.append(("dmarc-policy", policy))
    out.append(("arc", tx.arc.result if tx.arc else "none"))
    spam = tx.spam
    if spam is not None:
        out.append(("spam", spam.verdict))
        if spam.score is not None:
            out.append(("score", f"{spam.score:g}"))
        if spam.action:
            out.append(("spam-action", spam.action))
        if spam.symbols:
            out.append(("symbols", " ".join(spam.symbols[:MAX_SYMBOLS])))
    return [(name, _clean(value)) for name, value in out]


def header_bytes(tx: Transaction, decision: Decision) -> bytes:
    pairs = [f"{name}={value}" for name, value in fields(tx, decision)]
    return (f"{VERDICT_HEADER}: " + ";\r\n\t".join(pairs)).encode("ascii", "replace") + b"\r\n"
