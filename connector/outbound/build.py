"""The device's sending parts put together from its configuration (for `connector.app`).

`build_outbound` makes the outbound event log, the relay client of the edge (its address
from `[device] edge_relay`, or the host of `edge_url` on port 2526; the device id and key
from the registration link, read at each connection), the queue, the outcome poller (when
the device has an edge URL) and the submission listener (`[device] submission_listen`, which
must be a loopback address; "" for none). Nothing here starts or listens: the caller adds
the services to its tree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import threads

from connector.edgeclient import EdgeClient
from connector.hoppolicy import IPNetwork, plaintext_allowed
from connector.outbound.events import OutboundEventLog, OutboundEvents
from connector.outbound.poller import OutcomePoller
from connector.outbound.queue import OutboundQueue
from connector.outbound.relay import EdgeRelay, relay_address
from connector.outbound.submission import SubmissionHandler
from connector.registration import Registration
from edge.auththrottle import AuthThrottle
from edge.config import Config, ConfigError, parse_listen
from edge.inbound.listener import smtp_limits
from edge.runtime.service import TCPListener
from edge.smtp.factory import SMTPServerFactory
from maildir import Maildir, MessageInfo

__all__ = ["Outbound", "build_outbound"]


@dataclass
class Outbound:
    queue: OutboundQueue
    events: OutboundEvents
    relay: EdgeRelay
    poller: OutcomePoller | None
    submission: TCPListener | None


def _check_loopback(listen: str, what: str) -> None:
    host, _ = parse_listen(listen)
    if host != "localhost" and not plaintext_allowed(host, ()):
        raise ConfigError(f"{what} must listen on a loopback address, not {host}")


def build_outbound(
    config: Config,
    reactor: Any,
    maildir: Maildir,
    registration: Registration,
    edge_client: EdgeClient | None,
    *,
    check_password: Callable[[str, str], bool],
    throttle: AuthThrottle,
    tls_context: Any,
    plaintext_networks: Sequence[IPNetwork],
    on_stored: Callable[[MessageInfo], None],
) -> Outbound:
    d = config.device
    if d.submission_listen:
        _check_loopback(d.submission_listen, "device.submission_listen")
    device_dir: Path = config.data_path / "device"
    events = OutboundEvents(
        OutboundEventLog(device_dir / "outbound-events.jsonl", reactor.seconds),
        threads.deferToThread,
    )
    address = relay_address(d.edge_relay, d.edge_url)

    def credentials() -> tuple[str, str] | None:
        link = registration.link
        if link.status != "authorized" or not link.device_id or not link.device_key:
            return None
        return link.device_id, link.device_key

    relay = EdgeRelay(
        reactor,
        config.fqdn,
        lambda: address,
        credentials,
        plaintext_networks=plaintext_networks,
    )
    queue = OutboundQueue(
        device_dir / "outbound",
        maildir,
        events,
        clock=reactor,
        run_blocking=threads.deferToThread,
        hostname=config.fqdn,
        relay=relay,
        per_address=d.mailbox_mode == "per_address",
        on_stored=on_stored,
        retry_initial=d.relay_retry_initial,
        retry_max=d.relay_retry_max,
        max_recipients=config.edge.max_recipients,
        lifetime=d.outbound_lifetime,
    )
    poller = None
    if edge_client is not None:
        poller = OutcomePoller(
            queue,
            edge_client,
            device_dir / "outbound" / "edge-cursor.json",
            clock=reactor,
            run_blocking=threads.deferToThread,
            interval=d.outcome_poll_interval,
        )
    submission = None
    if d.submission_listen:
        # The MX's limits; this hop adds no Received field of its own.
        limits = dataclasses.replace(
            smtp_limits(config), own_received=0, max_message_size=config.device.max_send_size
        )
        factory = SMTPServerFactory(
            lambda: SubmissionHandler(check_password, queue),
            limits,
            config.fqdn,
            reactor,
            tls_context,
            auth_throttle=throttle,
            auth_service="submission",
        )
        submission = TCPListener("submission", d.submission_listen, factory, reactor)
    return Outbound(queue, events, relay, poller, submission)
