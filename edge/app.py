"""Assembly of the edge: store, spool, delivery queue and the MX listener, as one service.

State is built here from the configuration and passed into each part; nothing is global.
What holds secrets or mail is made private here before anything is served: the data
directory and `edge/` 0700, the store (encrypted with its key, `edge.runtime.storeopen`), the
admin key and the TLS private key 0600, the spool 0700.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads

from edge.checks import sealer_for
from edge.config import Config
from edge.delivery.bouncematch import BounceMatching
from edge.delivery.client import DelivererService, SMTPDeliverer
from edge.delivery.eventlog import EventRecorder
from edge.delivery.mtasts import build_mta_sts
from edge.delivery.queue import DeliveryQueue
from edge.delivery.queueops import QueueControl
from edge.delivery.routing import Router, recipient_resolver, route_soon
from edge.dns.namehosts import use_configured_names
from edge.dns.resolver import DNSResolver
from edge.domains.routewatch import RouteWatch, build_route_watch
from edge.inbound.acceptor import AcceptorPool
from edge.inbound.listener import build_mx_factory
from edge.inbound.policy import MXHandler
from edge.outbound.relaylistener import build_relay_factory
from edge.runtime.adminkeys import admin_key_path
from edge.runtime.private import private_file
from edge.runtime.service import TCPListener
from edge.runtime.storeopen import open_configured_store
from edge.smtp.conncount import SharedCounts
from edge.spool.committer import mx_committer
from edge.spool.spool import Spool
from edge.store import Store
from edge.store.cache import CachedLookups
from edge.store.events import DeliveryEvents
from edge.tls import server_context
from webapi.v1.listener import Control, build_control


class QueueService(Service):
    def __init__(self, queue: DeliveryQueue) -> None:
        self.setName("delivery-queue")
        self.queue = queue
        self.loaded: defer.Deferred[None] = defer.succeed(None)

    def startService(self) -> None:
        super().startService()
        self.loaded = self.queue.start()

    def when_loaded(self) -> defer.Deferred[None]:
        """A Deferred that fires once the spool is recovered (after `startService`)."""
        d: defer.Deferred[None] = defer.Deferred()

        def fire(result: Any) -> Any:
            d.callback(None)
            return result

        self.loaded.addBoth(fire)
        return d

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
    routewatch: RouteWatch
    relay: TCPListener | None = None
    """The relay for the devices' outbound mail (None: `[edge] relay_listen` is empty)."""


def build_edge(
    config: Config,
    reactor: Any,
    tls_files: tuple[Path, Path] | None = None,
    handler_class: type[MXHandler] = MXHandler,
) -> Edge:
    """The edge process's parts. `handler_class` is the MX policy of one connection (in this
    process; acceptor processes always use `MXHandler`)."""
    store = open_configured_store(config)
    private_file(admin_key_path(config))  # made 0600; an older install's is narrowed
    spool = Spool(config.spool_path)
    hostname = config.fqdn
    resolver = DNSResolver(
        config.dns.nameservers or None, config.dns.port, config.dns.timeout, reactor=reactor
    )
    use_configured_names(reactor, resolver)
    lookups = CachedLookups(store)
    router = Router(
        recipient_resolver(lookups, config),
        resolver,
        config.edge.mx_delivery_port,
        build_mta_sts(config, resolver),
    )
    events = DeliveryEvents(store)
    recorder = EventRecorder(events, reactor)
    deliverer = SMTPDeliverer(
        reactor,
        hostname,
        config.edge.delivery_timeout,
        max_connections=config.edge.delivery_connections,
        sealer=sealer_for(config),
        ca_file=config.edge.tls_ca_file,
    )
    queue = DeliveryQueue(
        spool,
        router.target,
        BounceMatching(deliverer, events, recorder.add, threads.deferToThread, router.resolve),
        reactor,
        config.edge.retry_schedule,
        lifetime=config.edge.queue_lifetime,
        delay_warning=config.edge.delay_warning,
        hostname=hostname,
        on_event=recorder.add,
        route_soon=route_soon(router, lookups, threads.deferToThread),
    )
    if tls_files is None and config.edge.tls_cert:
        tls_files = (Path(config.edge.tls_cert), Path(config.edge.tls_key))
    if tls_files:
        private_file(tls_files[1])
    tls = server_context(*tls_files) if tls_files else None
    workers = config.edge.mx_processes
    # With acceptors, the connection limits hold over all the processes on the MX port.
    counts = SharedCounts.create(workers) if workers > 1 else None
    # The spool's one commit entry point for the MX and the relay, its durability chosen here,
    # once.
    committer = mx_committer(spool, reactor, while_syncing=queue.intake)
    factory = build_mx_factory(
        config,
        reactor,
        lookups,
        spool,
        resolver,
        queue.take,
        committer.commit,
        tls,
        counts=counts,
        handler_class=handler_class,
    )
    service = MultiService()
    service.setName("edge")
    recorder.setServiceParent(service)
    DelivererService(deliverer).setServiceParent(service)  # stops after the queue
    queue_service = QueueService(queue)
    queue_service.setServiceParent(service)
    mx = TCPListener("mx", config.edge.mx_listen, factory, reactor, reuse_port=workers > 1)
    mx.setServiceParent(service)
    if counts is not None:
        AcceptorPool(
            config,
            reactor,
            mx,
            spool,
            queue.take,
            workers - 1,
            tls_files,
            after=queue_service.when_loaded,
            counts=counts,
        ).setServiceParent(service)
    relay = None
    if config.edge.relay_listen:
        relay_factory = build_relay_factory(
            config,
            reactor,
            store,
            spool,
            queue.take,
            tls,
            lookups=lookups,
            commit=committer.commit,
        )
        relay = TCPListener("relay", config.edge.relay_listen, relay_factory, reactor)
        relay.setServiceParent(service)
    control = build_control(
        config,
        store,
        resolver,
        reactor,
        lambda: len(queue.envelopes),
        QueueControl(queue),
        recorder,
        own_listeners=lambda: [
            config.edge.mx_listen,
            config.edge.control_listen,
            mx.address,
            control.listener.address,
            *([config.edge.relay_listen, relay.address] if relay is not None else []),
        ],
    )
    control.listener.setServiceParent(service)
    routewatch = build_route_watch(config, store, resolver, reactor)
    routewatch.setServiceParent(service)
    return Edge(service, store, spool, queue, mx, resolver, control, routewatch, relay)
