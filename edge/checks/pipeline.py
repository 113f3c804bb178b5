"""The check pipeline: runs the checks at each SMTP stage and funnels findings to replies.

Each stage (connect, mail, rcpt, data) runs every check's method for it, in order (DMARC
after SPF and DKIM, whose evidence it reads), under the stage's timeout on the injected
clock; a stage that runs out of time is a tempfail (451 4.4.5). The findings of a stage go
through the configured `ActionPolicy`; a reject or tempfail becomes an `SMTPReplyError`
with a generic text for the client and the reason for the log, which the SMTP server's one
funnel turns into the reply. After DATA, an accepted message gets the headers to put on
top of it: the edge's Authentication-Results and the verdict header (the edge's ARC set is
added when the message is forwarded: `edge.delivery.client`). This module never blocks the
reactor: the From header is read inline (the header section is bounded), and checks run
CPU work on cached data inline and anything that may wait on the network, the disk or a big
body in a worker pool. Each stage is one method (`connect`, `mail`, `rcpt`, `data`) that
answers `NowOrLater` (`edge.runtime.nowlater`): when every check of the stage answers at
once, so does the stage, with no coroutine or Deferred made.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from edge.checks import authresults, verdict
from edge.checks.actions import TIMEOUT_REPLY, ActionPolicy, Decision
from edge.checks.base import Check, Finding, Found, Recipient, Transaction
from edge.checks.headers import from_addresses
from edge.runtime.nowlater import NowOrLater, now, then
from edge.smtp.replies import SMTPReplyError

log = Logger()

STAGES = ("connect", "mail", "rcpt", "data")
Stage = NowOrLater[list[Finding]]


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

    # Each stage answers at once when every check does (a check's findings are a list, not
    # an awaitable): it returns the stage's value (None, or the `DataOutcome`) or raises
    # SMTPReplyError, with no coroutine or Deferred made; when a check has to wait it
    # returns a Deferred of the same, which fails with SMTPReplyError when the checks refuse
    # or time out (an error that is already there when the stage returns is raised).

    def _run(self, stage: str, run: Callable[[Check], Found]) -> Stage:
        found: list[Finding] = []
        for index, check in enumerate(self.checks):
            result = run(check)
            if isinstance(result, list):
                found.extend(result)
            else:
                return self._wait(stage, run, found, result, index + 1)
        return found

    def _wait(
        self,
        stage: str,
        run: Callable[[Check], Found],
        found: list[Finding],
        pending: Awaitable[list[Finding]],
        rest: int,
    ) -> Stage:
        """The rest of a stage from the first check that has to wait, under the timeout."""

        async def all_checks() -> list[Finding]:
            found.extend(await pending)
            for check in self.checks[rest:]:
                result = run(check)
                if not isinstance(result, list):
                    result = await result
                found.extend(result)
            return found

        d = defer.ensureDeferred(all_checks())
        if not d.called:
            d.addTimeout(getattr(self.timeouts, stage), self.clock)
        d.addErrback(_timed_out, stage)
        return now(d)

    def _enforce(self, stage: str, tx: Transaction, findings: list[Finding]) -> Decision:
        decision = self.policy.decide(findings)
        reply = decision.reply
        if reply is not None:
            raise SMTPReplyError(reply, f"{stage} from {tx.client_ip}: {decision.reason}")
        return decision

    def connect(self, tx: Transaction) -> NowOrLater[None]:
        return then(self._run("connect", lambda c: c.connect(tx)), self._connected, tx)

    def _connected(self, findings: list[Finding], tx: Transaction) -> None:
        self._enforce("connect", tx, findings)
        tx.connect_findings = findings

    def mail(self, tx: Transaction, helo: str, sender: str) -> NowOrLater[None]:
        tx.reset()
        tx.helo = helo
        tx.mail_from = sender
        return then(self._run("mail", lambda c: c.mail(tx)), self._mailed, tx)

    def _mailed(self, findings: list[Finding], tx: Transaction) -> None:
        self._enforce("mail", tx, findings)
        tx.findings.extend(findings)

    def rcpt(self, tx: Transaction, recipient: Recipient) -> NowOrLater[None]:
        return then(
            self._run("rcpt", lambda c: c.rcpt(tx, recipient)), self._recipient, tx, recipient
        )

    def _recipient(self, findings: list[Finding], tx: Transaction, recipient: Recipient) -> None:
        self._enforce("rcpt", tx, findings)
        tx.recipients.append(recipient)

    def data(self, tx: Transaction, message: bytes) -> NowOrLater[DataOutcome]:
        """Judge the whole message; SMTPReplyError (raised, or the Deferred's) refuses it."""
        tx.from_count, tx.header_from = from_addresses(message)
        return then(self._run("data", lambda c: c.data(tx, message)), self._judged, tx)

    def _judged(self, findings: list[Finding], tx: Transaction) -> DataOutcome:
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


def _timed_out(failure: Failure, stage: str) -> Failure:
    if failure.check(defer.TimeoutError):
        raise SMTPReplyError(TIMEOUT_REPLY, f"{stage} checks timed out") from failure.value
    return failure
