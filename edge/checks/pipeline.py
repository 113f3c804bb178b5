"""The check pipeline: runs the checks at each SMTP stage and funnels findings to replies.

Each stage (connect, mail, rcpt, data) runs every check's method for it, in order (DMARC
after SPF and DKIM, whose evidence it reads), under the stage's timeout on the injected
clock; a stage that runs out of time is a tempfail (451 4.4.5). The findings of a stage go
through the configured `ActionPolicy`; a reject or tempfail becomes an `SMTPReplyError`
with a generic text for the client and the reason for the log, which the SMTP server's one
funnel turns into the reply. After DATA, an accepted message gets the headers to put on
top of it: the edge's Authentication-Results and the verdict header (the edge's ARC set is
added when the message is forwarded: `edge.smtpclient`). This module never blocks the
reactor: the From header is read inline (the header section is bounded), and checks run
CPU work on cached data inline and anything that may wait on the network, the disk or a big
body in a worker pool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from edge.checks import authresults, verdict
from edge.checks.actions import TIMEOUT_REPLY, ActionPolicy, Decision
from edge.checks.base import Check, Finding, Recipient, Transaction
from edge.checks.headers import from_addresses
from edge.smtp.replies import SMTPReplyError

log = Logger()

STAGES = ("connect", "mail", "rcpt", "data")


@dataclass(frozen=True)
class StageTimeouts:
    connect: float = 10.0
    mail: float = 25.0
    rcpt: float = 10.0
    data: float = 30.0


@dataclass(frozen=True)
class DataOutcome:
    """An accepted message's decision and the header lines to put on top of it."""

    decision: Decision
    headers: bytes


class CheckPipeline:
    def __init__(
        self,
        checks: list[Check],
        policy: ActionPolicy,
        authserv_id: str,
        clock: IReactorTime,
        *,
        timeouts: StageTimeouts | None = None,
    ) -> None:
        self.checks = checks
        self.policy = policy
        self.authserv_id = authserv_id
        self.clock = clock
        self.timeouts = timeouts or StageTimeouts()

    def transaction(self, client_ip: str) -> Transaction:
        return Transaction(client_ip=client_ip)

    async def _stage(
        self, stage: str, run: Callable[[Check], Any], tx: Transaction
    ) -> list[Finding]:
        async def all_checks() -> list[Finding]:
            found: list[Finding] = []
            for check in self.checks:
                result = run(check)
                if isinstance(result, Awaitable):
                    result = await result
                found.extend(result)
            return found

        d = defer.ensureDeferred(all_checks())
        if not d.called:  # (all answered inline: nothing to time out)
            d.addTimeout(getattr(self.timeouts, stage), self.clock)
        try:
            findings: list[Finding] = await d
        except defer.TimeoutError as exc:
            raise SMTPReplyError(TIMEOUT_REPLY, f"{stage} checks timed out") from exc
        return findings

    def _enforce(self, stage: str, tx: Transaction, findings: list[Finding]) -> Decision:
        decision = self.policy.decide(findings)
        reply = decision.reply
        if reply is not None:
            raise SMTPReplyError(reply, f"{stage} from {tx.client_ip}: {decision.reason}")
        return decision

    async def connect(self, tx: Transaction) -> None:
        findings = await self._stage("connect", lambda c: c.connect(tx), tx)
        self._enforce("connect", tx, findings)
        tx.connect_findings = findings

    async def mail(self, tx: Transaction, helo: str, sender: str) -> None:
        tx.reset()
        tx.helo = helo
        tx.mail_from = sender
        findings = await self._stage("mail", lambda c: c.mail(tx), tx)
        self._enforce("mail", tx, findings)
        tx.findings.extend(findings)

    async def rcpt(self, tx: Transaction, recipient: Recipient) -> None:
        findings = await self._stage("rcpt", lambda c: c.rcpt(tx, recipient), tx)
        self._enforce("rcpt", tx, findings)
        tx.recipients.append(recipient)

    async def data(self, tx: Transaction, message: bytes) -> DataOutcome:
        """Judge the whole message; raise SMTPReplyError to refuse it."""
        tx.from_count, tx.header_from = from_addresses(message)
        findings = await self._stage("data", lambda c: c.data(tx, message), tx)
        everything = [*tx.connect_findings, *tx.findings, *findings]
        tx.findings = [*tx.findings, *findings]
        decision = self._enforce("data", tx, everything)
        ar = authresults.header_bytes(self.authserv_id, tx)
        headers = ar + verdict.header_bytes(tx, decision)
        if decision.action != "accept":
            log.info(
                "checks: message from {ip} {action}: {reason}",
                ip=tx.client_ip,
                action=decision.action,
                reason=decision.reason,
            )
        return DataOutcome(decision, headers)
