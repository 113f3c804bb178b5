"""The account's sender and domain block rules (`/v1/mail/spam-rules`), applied to mail.

The rules are read from the store at every MAIL FROM, so a rule added through the API
holds from the next transaction on. Rules belong to an account, and a transaction's
account is known per recipient, so the envelope sender is matched at MAIL FROM and applied
at RCPT TO to each recipient whose account has a matching rule (a `reject` rule refuses
that recipient with 550 5.7.1); after DATA the From header is matched against the rules of
the transaction's accounts. A `domain` rule covers the domain and its subdomains. The rules
are read through `run_blocking`, which in the edge is `CachedLookups.cached_or_load`: the
cached rules are used at once, in the reactor thread; a miss reads the store in a worker
thread, never in the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from edge.checks.base import BaseCheck, Finding, Found, Recipient, SpamResult, Transaction
from edge.checks.headers import domain_of
from edge.runtime.nowlater import then
from edge.store.records import SpamRule

_SYMBOLS = {"sender": "TAILPOST_BLOCKED_SENDER", "domain": "TAILPOST_BLOCKED_DOMAIN"}


def matches(rule: SpamRule, address: str) -> bool:
    address = address.strip().lower()
    if not address or "@" not in address:
        return False
    if rule.kind == "sender":
        return address == rule.value
    domain = domain_of(address)
    return domain == rule.value or domain.endswith("." + rule.value)


def _loaded(rules: list[SpamRule], tx: Transaction) -> list[Finding]:
    tx.state["rules"] = rules
    tx.state["rules.sender"] = [r for r in rules if matches(r, tx.mail_from)]
    return []


class SpamRulesCheck(BaseCheck):
    name = "rules"

    def __init__(
        self,
        list_rules: Callable[[], list[SpamRule]],
        run_blocking: Callable[..., defer.Deferred[Any]],
    ) -> None:
        self.list_rules = list_rules
        self.run_blocking = run_blocking

    def mail(self, tx: Transaction) -> Found:
        rules: defer.Deferred[list[SpamRule]] = self.run_blocking(self.list_rules)
        return then(rules, _loaded, tx)

    def rcpt(self, tx: Transaction, recipient: Recipient) -> list[Finding]:
        hits = [r for r in tx.state.get("rules.sender", []) if r.account_id == recipient.account_id]
        return self._found(tx, hits, f"envelope sender {tx.mail_from}")

    def data(self, tx: Transaction, message: bytes) -> list[Finding]:
        accounts = tx.account_ids
        hits = [
            r
            for r in tx.state.get("rules", [])
            if r.account_id in accounts and any(matches(r, a) for a in tx.header_from)
        ]
        findings = self._found(tx, hits, f"From {', '.join(tx.header_from)}")
        # Sender rules that held at RCPT (quarantine or tag) apply to the message too.
        for rule in tx.state.get("rules.sender", []):
            if rule.account_id in accounts and rule.action != "reject":
                findings += self._found(tx, [rule], f"envelope sender {tx.mail_from}")
        return findings

    def _found(self, tx: Transaction, hits: list[SpamRule], what: str) -> list[Finding]:
        findings = []
        for rule in hits:
            if rule.id not in tx.rules:
                tx.rules.append(rule.id)
            symbol = _SYMBOLS.get(rule.kind, "TAILPOST_BLOCKED")
            if tx.spam is None or tx.spam.source == "rules":
                spam = tx.spam or SpamResult("Yes", action=rule.action, source="rules")
                if symbol not in spam.symbols:
                    spam.symbols.append(symbol)
                tx.spam = spam
            findings.append(
                Finding(
                    "rules",
                    rule.action,
                    f"{what} matches {rule.kind} rule {rule.id} ({rule.value})",
                )
            )
        return findings
