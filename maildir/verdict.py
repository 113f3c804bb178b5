"""The edge's verdict on a stored message, read from its `X-Tailpost-Verdict` header.

The edge writes one such header on every message it hands on (see the edge's checks);
its value is `name=value` pairs separated by ";":

    X-Tailpost-Verdict: action=junk; reason=dmarc.quarantine; spf=pass; dkim=fail;
        dmarc=fail; dmarc-policy=quarantine; arc=none; spam=Yes; score=7.4;
        spam-action=add header; symbols=PHISHING BAYES_SPAM

It can be trusted because the edge removes every incoming `X-Tailpost-*` header and the
connector only accepts mail from its authenticated edge; only the topmost header is read.
This module parses only; it must never change a message or decide where it is filed
beyond reporting the edge's action, and it does no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

VERDICT_HEADER = "X-Tailpost-Verdict"
ACTIONS = ("accept", "tag", "junk")
_FIELD = re.compile(rb"^x-tailpost-verdict:", re.I)
_RESULT = re.compile(r"^[a-z]+$")
_MAX_HEADER_SECTION = 1024 * 1024


@dataclass(frozen=True)
class Verdict:
    """What the edge decided and saw. Unknown or missing values read as "none"/empty."""

    action: str = "accept"
    reason: str = ""
    spf: str = "none"
    dkim: str = "none"
    dmarc: str = "none"
    dmarc_policy: str = ""
    arc: str = "none"
    spam: str = ""  # "Yes", "No", or "" when no spam scan ran
    score: float | None = None
    spam_action: str = ""
    symbols: list[str] = field(default_factory=list)

    @property
    def junk(self) -> bool:
        return self.action == "junk"

    def authentication(self) -> dict[str, str]:
        """The `risk.authentication` shape of the local API: spf, dkim and dmarc results."""
        return {"spf": self.spf, "dkim": self.dkim, "dmarc": self.dmarc}

    def spam_summary(self) -> dict[str, Any] | None:
        """The `risk.spam` shape: verdict, score (as text), action and symbols; None unscanned."""
        if not self.spam:
            return None
        return {
            "verdict": self.spam,
            "score": "" if self.score is None else f"{self.score:g}",
            "action": self.spam_action,
            "symbols": list(self.symbols),
        }


def _topmost(source: bytes) -> str | None:
    """The unfolded value of the first verdict header in the header section, or None."""
    head = source[:_MAX_HEADER_SECTION]
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    if end >= 0:
        head = head[: end + 1]
    value: list[bytes] | None = None
    for line in head.splitlines():
        if value is not None:
            if line[:1] in (b" ", b"\t"):
                value.append(line)
                continue
            break
        if _FIELD.match(line):
            value = [line.split(b":", 1)[1]]
    if value is None:
        return None
    return b" ".join(v.strip() for v in value).decode("ascii", "replace")


def _result(value: str | None) -> str:
    value = (value or "").strip().lower()
    return value if _RESULT.match(value) else "none"


def parse_value(value: str) -> Verdict:
    """A verdict header value as a Verdict (lenient: bad fields are ignored)."""
    pairs: dict[str, str] = {}
    for part in value.split(";"):
        name, sep, val = part.partition("=")
        if sep:
            pairs.setdefault(name.strip().lower(), val.strip())
    action = pairs.get("action", "accept").lower()
    try:
        score: float | None = float(pairs["score"]) if "score" in pairs else None
    except ValueError:
        score = None
    spam = pairs.get("spam", "")
    return Verdict(
        action=action if action in ACTIONS else "accept",
        reason=pairs.get("reason", ""),
        spf=_result(pairs.get("spf")),
        dkim=_result(pairs.get("dkim")),
        dmarc=_result(pairs.get("dmarc")),
        dmarc_policy=pairs.get("dmarc-policy", "").lower(),
        arc=_result(pairs.get("arc")),
        spam=spam if spam in ("Yes", "No") else "",
        score=score,
        spam_action=pairs.get("spam-action", ""),
        symbols=pairs.get("symbols", "").split(),
    )


def parse_verdict(source: bytes | str | Message) -> Verdict | None:
    """The edge's verdict on a message, or None when it carries no verdict header.

    `source` is the raw message (or just its header section) as bytes or str, or a parsed
    `email.message.Message`; only the topmost `X-Tailpost-Verdict` header counts.
    """
    if isinstance(source, Message):
        raw = source.get(VERDICT_HEADER)
        if raw is None:
            return None
        return parse_value(" ".join(str(raw).split()))
    data = source.encode("utf-8", "replace") if isinstance(source, str) else source
    value = _topmost(data)
    return None if value is None else parse_value(value)
