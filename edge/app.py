"""Assembly of the edge: store, spool, delivery queue and the MX listener, as one service.

State is built here from the configuration and passed into each part; nothing is global.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import threads

from edge.checks import authserv_id, build_pipeline
from edge.config import Config
from edge.control import Control, build_control
from edge.delivery import DeliveryQueue
from edge.dns import DNSResolver
from edge.eventlog import EventRecorder
from edge.mx import MXHandler
from edge.queueops import QueueControl
from edge.routing import Router
from edge.service import TCPListener
from edge.smtp.proxy import ProxyProtocolFactory, trusted_networks
from edge.smtp.server import Limits, SMTPServerFactory
from edge.smtpclient import DelivererService, SMTPDeliverer
from edge.spool import Spool
from edge.store import RecipientTarget, Store, open_store
from edge.store.cache import CachedLookups
from edge.store.events import DeliveryEvents
from edge.store.migrate import migrate_in_child
from edge.tls import server_context


def smtp_limits(config: Config) -> Limits:
    e = config.edge
    return Limits(
        max_message_size=e.max_message_size,
        max_recipients=e.max_recipients,
        max_line_length=e.max_line_length,
        idle_timeout=e.idle_timeout,
        data_timeout=e.data_timeout,
        max_connections=e.max_connections,
        max_connections_per_ip=e.max_connections_per_ip,
        max_errors=e.max_errors,
        max_header_size=e.max_header_size,
        max_received_headers=e.max_received_headers,
    )


class QueueService(Service):
    def __init__(self, queue: DeliveryQueue) -> None:
        self.setName("delivery-queue")
        self.queue = queue

    def startService(self) -> None:
        super().startService()
        self.queue.start()

    def stopService(self) -> Any:
        super().stopService()
        self.queue.stop()
        return None


@dataclass
class Edge:
    service: MultiService
    store: Store
    spool: Spool
    queue: DeliveryQueue
    mx: TCPListener
    resolver: DNSResolver
    control: Control


def build_edge(config: Config, reactor: Any, tls_files: tuple[Path, Path] | None = None) -> Edge:
    migrate_in_child(config.store_url)
    store = open_store(config.store_url, migrate=False)
    spool = Spool(config.spool_path)
    hostname = config.fqdn
    resolver = DNSResolver(
        config.dns.nameservers or None, config.dns.port, config.dns.timeout, reactor=reactor
    )
    lookups = CachedLookups(store)
    router = Router(lookups.resolve_recipient, resolver, config.edge.mx_delivery_port)
    recorder = EventRecorder(DeliveryEvents(store), reactor)
    deliverer = SMTPDeliverer(
        reactor,
        hostname,
        config.edge.delivery_timeout,
        max_connections=config.edge.delivery_connections,
    )
    queue = DeliveryQueue(
        spool,
        router.target,
        deliverer,
        reactor,
        config.edge.retry_schedule,
        lifetime=config.edge.queue_lifetime,
        delay_warning=config.edge.delay_warning,
        hostname=hostname,
        on_event=recorder.add,
    )
    if tls_files is None and config.edge.tls_cert:
        tls_files = (Path(config.edge.tls_cert), Path(config.edge.tls_key))
    tls = server_context(*tls_files) if tls_files else None
    checks = build_pipeline(
        config, resolver, reactor, lookups.list_spam_rules, threads.deferToThread
    )

    def account_of(target: RecipientTarget) -> str | None:
        device = lookups.get_device(target.device_id) if target.device_id else None
        return device.account_id if device is not None else None

    def handler() -> MXHandler:
        return MXHandler(
            lookups.resolve_recipient,
            spool,
            hostname,
            reactor,
            threads.deferToThread,
            queue.enqueue,
            discard=config.edge.accept_mode == "discard",
            checks=checks,
            account_of=account_of,
            authserv_id=authserv_id(config),
        )

    factory = SMTPServerFactory(handler, smtp_limits(config), hostname, reactor, tls)
    service = MultiService()
    service.setName("edge")
    recorder.setServiceParent(service)
    DelivererService(deliverer).setServiceParent(service)  # stops after the queue
    QueueService(queue).setServiceParent(service)
    mx_factory: Any = factory
    if config.edge.mx_proxy_protocol:
        trusted = trusted_networks(config.edge.mx_proxy_trusted)
        mx_factory = ProxyProtocolFactory(factory, trusted, reactor, config.edge.mx_proxy_timeout)
    mx = TCPListener("mx", config.edge.mx_listen, mx_factory, reactor)
    mx.setServiceParent(service)
    control = build_control(
        config,
        store,
        resolver,
        reactor,
        lambda: len(queue.envelopes),
        QueueControl(queue),
        recorder,
    )
    control.listener.setServiceParent(service)
    return Edge(service, store, spool, queue, mx, resolver, control)
