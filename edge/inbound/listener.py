"""The MX listener's factory: the SMTP server, its session policy, the checks and the spool.

Built the same way in the edge process and in each acceptor process (`edge.inbound.acceptor`), from
the parts passed in. Nothing here listens or starts anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import threads

from edge.checks import authserv_id, build_pipeline
from edge.config import Config
from edge.delivery.routing import recipient_resolver
from edge.dns.resolver import DNSResolver
from edge.inbound.policy import RECEIVED_HEADERS_ADDED, Commit, MXHandler
from edge.smtp.conncount import LocalCounts
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.proxy import ProxyProtocolFactory, trusted_networks
from edge.smtp.server import Limits
from edge.spool.spool import Envelope, Spool
from edge.store import RecipientTarget
from edge.store.cache import CachedLookups


def smtp_limits(config: Config) -> Limits:
    e = config.edge
    return Limits(
        max_message_size=e.max_message_size,
        max_recipients=e.max_recipients,
        max_line_length=e.max_line_length,
        idle_timeout=e.idle_timeout,
        command_timeout=e.command_timeout,
        data_timeout=e.data_timeout,
        min_data_rate=e.min_data_rate,
        data_rate_window=e.data_rate_window,
        max_connections=e.max_connections,
        max_connections_per_ip=e.max_connections_per_ip,
        max_connections_per_network=e.max_connections_per_network,
        network_v4_prefix=e.network_v4_prefix,
        network_v6_prefix=e.network_v6_prefix,
        reserved_connections=e.reserved_connections,
        reserved_per_network=e.reserved_per_network,
        max_errors=e.max_errors,
        max_junk_commands=e.max_junk_commands,
        max_header_size=e.max_header_size,
        max_received_headers=e.max_received_headers,
        own_received=RECEIVED_HEADERS_ADDED,
    )


def build_mx_factory(
    config: Config,
    reactor: Any,
    lookups: CachedLookups,
    spool: Spool,
    resolver: DNSResolver,
    accepted: Callable[[Envelope], None],
    commit: Commit,
    tls: Any = None,
    counts: LocalCounts | None = None,
    handler_class: type[MXHandler] = MXHandler,
) -> Any:
    """The protocol factory of the MX listener (behind the PROXY protocol when configured).
    `commit` makes a message durable (the spool's committer, `edge.spool.committer`, built
    with the spool); `accepted` takes each committed message; `counts` are the connections
    the limits count (shared with the other processes on the MX port, if any);
    `handler_class` is the policy of one connection."""
    hostname = config.fqdn
    checks = build_pipeline(
        config, resolver, reactor, lookups.list_spam_rules, lookups.cached_or_load
    )

    def account_of(target: RecipientTarget) -> str | None:
        device = lookups.get_device(target.device_id) if target.device_id else None
        return device.account_id if device is not None else None

    # Made once and shared by every session's handler (a bound method is a new object each
    # time it is looked up).
    resolve, lookup = recipient_resolver(lookups, config), lookups.cached_or_load
    awaiting = resolve.awaiting
    authserv = authserv_id(config)

    def handler() -> MXHandler:
        return handler_class(
            resolve,
            spool,
            hostname,
            reactor,
            threads.deferToThread,
            accepted,
            checks=checks,
            account_of=account_of,
            authserv_id=authserv,
            lookup=lookup,
            commit=commit,
            awaiting=awaiting,
        )

    factory: Any = SMTPServerFactory(handler, smtp_limits(config), hostname, reactor, tls, counts)
    if config.edge.mx_proxy_protocol:
        trusted = trusted_networks(config.edge.mx_proxy_trusted)
        factory = ProxyProtocolFactory(factory, trusted, reactor, config.edge.mx_proxy_timeout)
    return factory
