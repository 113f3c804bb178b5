"""The edge's inbound checks: SPF, DKIM, DMARC, ARC, block rules, Rspamd and DNS blocklists.

`build_pipeline` makes the configured `CheckPipeline`; the MX policy (`edge.mx`) runs it at
each SMTP stage. Checks report findings, configuration decides actions, and one funnel
turns them into replies. Nothing in this package builds a DNS resolver or blocks the
reactor thread.
"""

from edge.checks.actions import ActionPolicy, Decision
from edge.checks.base import Finding, Recipient, Transaction
from edge.checks.build import authserv_id, build_pipeline
from edge.checks.headers import HeaderFilter
from edge.checks.pipeline import CheckPipeline, DataOutcome, StageTimeouts
from edge.checks.verdict import VERDICT_HEADER

__all__ = [
    "VERDICT_HEADER",
    "ActionPolicy",
    "CheckPipeline",
    "DataOutcome",
    "Decision",
    "Finding",
    "HeaderFilter",
    "Recipient",
    "StageTimeouts",
    "Transaction",
    "authserv_id",
    "build_pipeline",
]
