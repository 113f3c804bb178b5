"""The check interface: what a check sees of a transaction and what it may report.

A check is a small object with one method per SMTP stage (connect, mail, rcpt, data). Each
method returns the `Finding`s it made (a list when it has them at once, which lets the
pipeline answer without a coroutine or Deferred; else a Deferred or coroutine of them),
and may record its evidence (an SPF result, DKIM
results, a spam score) on the `Transaction` for the Authentication-Results and verdict
headers. What to do about a finding is not decided here: `edge.checks.actions` maps
findings to actions from configuration. A check must never build its own DNS resolver,
never block the reactor thread and never send an SMTP reply itself: CPU work on cached data
(DNS answers from the resolver's cache, store answers from `CachedLookups`) may run inline,
anything that may wait on the network or the disk, or hash a big body, runs in a worker
thread.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

INLINE_LIMIT = 256 * 1024
"""Messages up to this size are verified in the reactor thread when the DNS cache answers;
bigger ones always go to the worker pool, so hashing a big body never stalls the reactor."""


@dataclass(frozen=True)
class Finding:
    """What one check found: `spf.fail`, `dmarc.reject`, `rules.reject`, ...

    `reason` is for the log only; the client never sees it.
    """

    check: str
    result: str
    reason: str = ""

    @property
    def key(self) -> str:
        return f"{self.check}.{self.result}"


@dataclass(frozen=True)
class SPFResult:
    """Frozen: one result may stand for several transactions (`edge.checks.spf` keeps it)."""

    result: str
    domain: str
    identity: str  # "mailfrom" or "helo"
    sender: str
    reason: str = ""


@dataclass
class DKIMResult:
    result: str
    domain: str
    selector: str
    b: str  # the first characters of the signature (RFC 6008 header.b)
    algorithm: str = ""
    reason: str = ""


@dataclass
class DMARCResult:
    result: str  # pass, fail, none, temperror, permerror
    from_domain: str
    policy: str = "none"  # the policy applied: none, quarantine, reject
    published_policy: str = "none"
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""


@dataclass(frozen=True)
class ARCResult:
    result: str  # pass, fail, none
    instances: int = 0
    reason: str = ""


@dataclass
class SpamResult:
    """A spam verdict (Rspamd's, or a block rule's)."""

    verdict: str  # "Yes" or "No"
    score: float | None = None
    required: float | None = None
    action: str = ""
    symbols: list[str] = field(default_factory=list)
    source: str = ""  # "rspamd" or "rules"


@dataclass
class Recipient:
    address: str
    account_id: str | None = None


@dataclass
class Transaction:
    """One connection's facts, and the current message's evidence.

    `reset` is called at each MAIL FROM: connection facts (client IP, HELO, blocklist
    findings) stay, message evidence goes.
    """

    client_ip: str
    helo: str = ""
    mail_from: str = ""  # "" for the null sender <>
    recipients: list[Recipient] = field(default_factory=list)
    connect_findings: list[Finding] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    spf: SPFResult | None = None
    dkim: list[DKIMResult] = field(default_factory=list)
    dmarc: DMARCResult | None = None
    arc: ARCResult | None = None
    spam: SpamResult | None = None
    rules: list[str] = field(default_factory=list)  # ids of block rules that matched
    header_from: list[str] = field(default_factory=list)  # addresses of the From header(s)
    from_count: int = 0  # how many From header fields the message has
    state: dict[str, Any] = field(default_factory=dict)  # per-message scratch of the checks

    def reset(self) -> None:
        self.mail_from = ""
        self.recipients = []
        self.findings = []
        self.spf = None
        self.dkim = []
        self.dmarc = None
        self.arc = None
        self.spam = None
        self.rules = []
        self.header_from = []
        self.from_count = 0
        self.state = {}

    @property
    def mail_from_domain(self) -> str:
        return self.mail_from.rpartition("@")[2].lower() if self.mail_from else ""

    @property
    def account_ids(self) -> set[str]:
        return {r.account_id for r in self.recipients if r.account_id}


Found = list[Finding] | Awaitable[list[Finding]]


class Check(Protocol):
    """One check; every stage method returns findings (maybe later, as an awaitable)."""

    name: str

    def connect(self, tx: Transaction) -> Found: ...

    def mail(self, tx: Transaction) -> Found: ...

    def rcpt(self, tx: Transaction, recipient: Recipient) -> Found: ...

    def data(self, tx: Transaction, message: bytes) -> Found: ...


class BaseCheck:
    """Finds nothing at every stage; checks override the stages they care about."""

    name = "base"

    def connect(self, tx: Transaction) -> Found:
        return []

    def mail(self, tx: Transaction) -> Found:
        return []

    def rcpt(self, tx: Transaction, recipient: Recipient) -> Found:
        return []

    def data(self, tx: Transaction, message: bytes) -> Found:
        return []
