"""The relay listener's factory: the SMTP server with the relay's session policy.

Built by the edge process (`edge.app.build_edge`) from the parts passed in: the store and its
cache, the spool and its committer, the delivery queue's intake, the edge's TLS context, the
signer and the process's `AuthThrottle`. Same limits as the MX
(`edge.inbound.listener.smtp_limits`) but for the message size (`relay_max_message_size`: a
device's attachments are base64-encoded). Nothing here listens or starts anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads

from edge.auththrottle import AuthThrottle
from edge.checks import authserv_id
from edge.config import Config
from edge.inbound.listener import smtp_limits
from edge.outbound.dkimsign import DkimSigner
from edge.outbound.relaypolicy import (
    RECEIVED_HEADERS_ADDED,
    RelayContext,
    RelayHandler,
    Signer,
    parse_networks,
)
from edge.smtp.factory import SMTPServerFactory
from edge.spool.spool import Envelope, Spool, SpoolWriter
from edge.store import Store
from edge.store.access import AccessStore
from edge.store.cache import CachedLookups
from edge.store.outbound import OutboundStore

__all__ = ["AUTH_SERVICE", "build_relay_factory"]

AUTH_SERVICE = "relay"
"""The service named in the log line of a failed AUTH (`edge.auththrottle`)."""


def build_relay_factory(
    config: Config,
    reactor: Any,
    store: Store,
    spool: Spool,
    accepted: Callable[[Envelope], None],
    tls: Any = None,
    *,
    signer: Signer | None = None,
    throttle: AuthThrottle | None = None,
    lookups: CachedLookups | None = None,
    commit: Callable[[SpoolWriter, Envelope], defer.Deferred[None]] | None = None,
) -> SMTPServerFactory:
    """The protocol factory of the relay listener. `accepted` takes each committed message
    (the delivery queue's intake); `signer` signs with the domains' keys in `store` unless
    given; `throttle` is the process's delay on failed logins (one of the relay's own, from
    `[auth]`, unless given); `lookups` is the process's store cache (one of the relay's own
    unless given), which answers who owns a sender address; `commit` is the spool's commit
    entry point (`edge.spool.committer.Committer.commit`, whose batches the MX's messages
    share; without it, each message is committed alone in a worker thread)."""
    outbound, access = OutboundStore(store), AccessStore(store)
    if lookups is None:
        lookups = CachedLookups(store)
    if throttle is None:
        a = config.auth
        throttle = AuthThrottle(
            reactor,
            base_delay=a.failure_delay,
            max_delay=a.failure_delay_max,
            forget_after=a.failure_forget,
            per_connection=a.failures_per_connection,
            max_keys=a.tracked_keys,
        )

    def commit_alone(writer: SpoolWriter, envelope: Envelope) -> defer.Deferred[None]:
        return threads.deferToThread(spool.commit, writer, envelope)

    relay = RelayContext(
        authenticate=access.authenticate,
        sender_account=lookups.sender_account,
        record=outbound.record,
        signer=signer if signer is not None else DkimSigner(access),
        spool=spool,
        commit=commit if commit is not None else commit_alone,
        accepted=accepted,
        hostname=config.fqdn,
        authserv_id=authserv_id(config),
        clock=reactor,
        run_blocking=threads.deferToThread,
        plaintext_networks=parse_networks(config.edge.relay_plaintext_networks),
        relayed_before=outbound.relayed_before,
        run_cached=lookups.cached_or_load,
    )
    limits = smtp_limits(config)
    limits.own_received = RECEIVED_HEADERS_ADDED
    limits.max_message_size = config.edge.relay_max_message_size
    return SMTPServerFactory(
        lambda: RelayHandler(relay),
        limits,
        config.fqdn,
        reactor,
        tls,
        auth_throttle=throttle,
        auth_service=AUTH_SERVICE,
    )
