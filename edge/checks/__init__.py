"""The edge's inbound checks: SPF, DKIM, DMARC, ARC, block rules, Rspamd and DNS blocklists.

`build_pipeline` makes the configured `CheckPipeline`; the MX policy (`edge.inbound.policy`) runs it
at each SMTP stage. Checks report findings, configuration decides actions, and one funnel turns them
into replies. `sealer_for` makes the ARC sealer the deliverer uses on what it forwards. Nothing in
this package builds a DNS resolver or blocks the reactor thread: CPU work on cached data runs
inline, anything that may wait runs in a worker pool.
"""

from edge.checks.actions import ActionPolicy, Decision
from edge.checks.base import Finding, Recipient, Transaction
from edge.checks.build import authserv_id, build_pipeline, sealer_for
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
    "sealer_for",
]
