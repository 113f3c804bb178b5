"""From findings to actions, and from actions to SMTP replies: the checks' one funnel.

Configuration maps each finding (`spf.fail`, `dmarc.reject`, `rspamd.add_header`, ...) to
an action: accept, tag, junk (deliver into the Junk folder), reject (5xx) or tempfail (4xx).
The defaults follow the sender domain's DMARC policy: `dmarc.reject` rejects,
`dmarc.quarantine` goes to Junk, and an SPF or DKIM failure alone only shows in the headers.
Of several findings the strongest action wins (reject, tempfail, junk, tag, accept). The
client gets a generic text with the enhanced code that fits; the finding's reason goes to
the log. This module never does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edge.checks.base import Finding
from edge.config import ConfigError
from edge.smtp import replies
from edge.smtp.replies import Reply

ACTIONS = ("accept", "tag", "junk", "reject", "tempfail")
_STRENGTH = {"accept": 0, "tag": 1, "junk": 2, "tempfail": 3, "reject": 4}

# Every finding a check can make, with its default action.
DEFAULT_ACTIONS: dict[str, str] = {
    **{f"spf.{r}": "accept" for r in ("pass", "fail", "softfail", "neutral", "none")},
    "spf.temperror": "accept",
    "spf.permerror": "accept",
    "dkim.pass": "accept",
    "dkim.fail": "accept",
    "dkim.none": "accept",
    "dkim.temperror": "accept",
    "dkim.permerror": "accept",
    "dmarc.pass": "accept",
    "dmarc.none": "accept",
    "dmarc.fail": "accept",  # failed, but the domain's policy is p=none (or pct spared it)
    "dmarc.quarantine": "junk",
    "dmarc.reject": "reject",
    "dmarc.temperror": "accept",
    "dmarc.permerror": "accept",
    "arc.pass": "accept",
    "arc.fail": "accept",
    "arc.none": "accept",
    "message.multiple_from": "reject",
    "rules.reject": "reject",
    "rules.quarantine": "junk",
    "rules.tag": "tag",
    "rspamd.no_action": "accept",
    "rspamd.greylist": "accept",
    "rspamd.add_header": "tag",
    "rspamd.rewrite_subject": "tag",
    "rspamd.soft_reject": "tempfail",
    "rspamd.reject": "reject",
    "rspamd.temperror": "accept",
    "dnsbl.listed": "reject",
    "dnsbl.temperror": "accept",
}

# Reply of a reject per check; the replies live in the one table of edge.smtp.replies.
REJECT_REPLIES: dict[str, Reply] = {
    "spf": replies.S550_SPF_FAIL,
    "dkim": replies.S550_DKIM_FAIL,
    "dmarc": replies.S550_DMARC_REJECT,
    "arc": replies.S550_ARC_FAIL,
    "message": replies.S550_TWO_FROM,
    "rules": replies.S550_SENDER_BLOCKED,
    "rspamd": replies.S550_SPAM,
    "dnsbl": replies.S554_DNSBL,
}
REJECT_DEFAULT = replies.S550_POLICY
TEMPFAIL_REPLY = replies.S451_POLICY_TEMP
TEMPFAIL_DNS_REPLY = replies.S451_DNS_TEMP
TIMEOUT_REPLY = replies.S451_CHECK_TIMEOUT


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML's `dmarc.quarantine = "junk"` (a nested table) and `"dmarc.quarantine"` alike."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def normalize_key(key: str) -> str:
    return key.strip().lower().replace(" ", "_").replace("-", "_")


@dataclass(frozen=True)
class Decision:
    """The action for a set of findings, and the finding that decided it."""

    action: str
    finding: Finding | None = None

    @property
    def reply(self) -> Reply | None:
        """The SMTP refusal of this decision, or None when the mail goes on."""
        if self.action == "reject":
            check = self.finding.check if self.finding else ""
            return REJECT_REPLIES.get(check, REJECT_DEFAULT)
        if self.action == "tempfail":
            if self.finding is not None and self.finding.result == "temperror":
                return TEMPFAIL_DNS_REPLY
            return TEMPFAIL_REPLY
        return None

    @property
    def reason(self) -> str:
        if self.finding is None:
            return ""
        detail = f": {self.finding.reason}" if self.finding.reason else ""
        return f"{self.finding.key} -> {self.action}{detail}"


class ActionPolicy:
    """The configured action of every finding (defaults from DEFAULT_ACTIONS)."""

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        self.actions = dict(DEFAULT_ACTIONS)
        for raw_key, action in _flatten(overrides or {}).items():
            key = normalize_key(raw_key)
            if key not in DEFAULT_ACTIONS:
                known = ", ".join(sorted(DEFAULT_ACTIONS))
                raise ConfigError(f"checks.actions: unknown finding {raw_key!r} (known: {known})")
            if not isinstance(action, str) or action not in ACTIONS:
                raise ConfigError(
                    f"checks.actions.{raw_key} must be one of {', '.join(ACTIONS)}, not {action!r}"
                )
            self.actions[key] = action
        self._of: dict[tuple[str, str], str] = {}  # (check, result) -> action, as looked up

    def action_for(self, finding: Finding) -> str:
        pair = (finding.check, finding.result)
        action = self._of.get(pair)
        if action is None:
            action = self.actions.get(normalize_key(finding.key), "accept")
            if len(self._of) < 4096:
                self._of[pair] = action
        return action

    def decide(self, findings: Iterable[Finding]) -> Decision:
        """The strongest action among the findings; the first finding of it decides."""
        best = Decision("accept")
        for finding in findings:
            action = self.action_for(finding)
            if _STRENGTH[action] > _STRENGTH[best.action]:
                best = Decision(action, finding)
        return best


def all_replies() -> list[Reply]:
    return [
        *REJECT_REPLIES.values(),
        REJECT_DEFAULT,
        TEMPFAIL_REPLY,
        TEMPFAIL_DNS_REPLY,
        TIMEOUT_REPLY,
    ]
