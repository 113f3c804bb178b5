"""Assembly of the device: Maildir, connector SMTP listener, IMAP server, local HTTP API, and
the sending parts (`connector.outbound.build`: queue, relay to the edge, submission listener).

State is built from the configuration and the credentials file and passed into each part;
nothing is global. The HTTP API only ever listens on a loopback address. The connector
offers STARTTLS with the device's own certificate (`[device] connector_tls_cert`, or one
made self-signed on first start in `<data_dir>/device/tls/`, key mode 0600), whose key's pin
the edge learns at registration; without TLS it refuses to start on an address outside
loopback and `[device] plaintext_networks` (`connector.hoppolicy`). The data directory,
`device/` and the Maildir are made 0700 and the credentials and edge link 0600 before
anything is read or served (an older install's looser modes are narrowed, with a log line).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import threads

from connector import credentials
from connector.collector import for_process
from connector.events import EventLog, InboundEvents
from connector.hoppolicy import listen_refusal, parse_networks
from connector.idempotency import DeviceKeys
from connector.imap import IMAPFactory, make_imap_factory
from connector.mailservice import LinkState, MailService
from connector.outbound.build import Outbound, build_outbound
from connector.receiver import ConnectorHandler
from connector.registration import PinSync, Registration, build_registration
from edge.auththrottle import AuthThrottle
from edge.config import Config, ConfigError, parse_listen
from edge.runtime.private import private_dir, private_file
from edge.runtime.service import TCPListener
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.server import Limits
from edge.tls import ensure_self_signed, pin_of_file, server_context
from maildir import Maildir, MessageInfo
from webapi.httplimits import bounded_site
from webapi.local.app import SEND_MAX_BODY, LocalAPI
from webapi.local.device import DeviceInfo
from webapi.local.passthrough import device_root
from webapi.local.spam import EdgeJSON, RspamdTrainer


@dataclass
class DeviceParts:
    service: MultiService
    maildir: Maildir
    creds: credentials.Credentials
    connector: TCPListener
    imap: TCPListener
    http: TCPListener
    api: LocalAPI
    events: InboundEvents
    mail: MailService
    link: LinkState
    registration: Registration | None = None
    tls_pin: str | None = None
    """The pin of the connector's certificate (`edge.tls.spki_pin`); None without TLS."""
    sending: Outbound | None = None
    """All the sending parts: the queue and its events, the relay to the edge, the outcome
    poller, the submission listener."""

    def on_ready(self, addresses: dict[str, str]) -> None:
        """Once listening: the API's links use the real HTTP address (port 0 allowed)."""
        self.api.base_url = f"http://{addresses['http']}"
        self.api.device.imap_addr = addresses.get("imap", self.api.device.imap_addr)
        self.api.device.submission_addr = addresses.get(
            "submission", self.api.device.submission_addr
        )


def _require_loopback(listen: str, what: str) -> None:
    host, _ = parse_listen(listen)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"{what} must listen on a loopback address, not {host}")


def connector_tls(config: Config) -> tuple[Any, str | None]:
    """The connector's TLS server context and its certificate's pin (None, None without
    TLS): the configured certificate, or the device's own, made self-signed on first start."""
    d = config.device
    if not d.connector_tls:
        return None, None
    if d.connector_tls_cert:
        cert, key = Path(d.connector_tls_cert), Path(d.connector_tls_key)
    else:
        tls_dir = config.data_path / "device" / "tls"
        cert, key = tls_dir / "connector-cert.pem", tls_dir / "connector-key.pem"
        ensure_self_signed(cert, key, config.fqdn)
    try:
        return server_context(cert, key), pin_of_file(cert)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the connector's TLS certificate {cert} is unusable: {exc}") from exc


def build_device(
    config: Config, reactor: Any, extra_addresses: tuple[str, ...] = (), *, with_mx: bool = False
) -> DeviceParts:
    """The device's services. `with_mx`: the edge's MX runs in this process too (the
    all-in-one), which decides the collector pause of its IMAP server and local API
    (`connector.collector.for_process`)."""
    d = config.device
    pause = for_process(with_mx)
    _require_loopback(d.http_listen, "device.http_listen")
    _require_loopback(d.imap_listen, "device.imap_listen")
    plaintext = parse_networks(d.plaintext_networks)
    refusal = listen_refusal(d.connector_listen, plaintext, d.connector_tls)
    if refusal is not None:
        raise ConfigError(refusal)
    tls_context, tls_pin = connector_tls(config)
    if d.rspamd_url and not d.rspamd_url.startswith(("http://", "https://")):
        raise ConfigError("device.rspamd_url must start with http:// or https://")
    private_dir(config.data_path)
    device_dir = private_dir(config.data_path / "device")
    private_file(device_dir / "credentials.json")
    private_file(device_dir / "edge-link.json")
    private_dir(config.maildir_path)
    creds = credentials.ensure(
        device_dir / "credentials.json",
        [*d.addresses, *extra_addresses],
        d.connector_username,
        d.connector_password,
    )
    maildir = Maildir(config.maildir_path, hostname=config.fqdn)
    hostname = config.fqdn

    events = InboundEvents(
        EventLog(config.data_path / "device" / "events.jsonl", reactor.seconds),
        maildir,
        threads.deferToThread,
    )
    link = LinkState(reactor.seconds)
    # One throttle for every listener that checks a password: failures from an address (or
    # for a user) on one slow down all of them.
    a = config.auth
    throttle = AuthThrottle(
        reactor,
        base_delay=a.failure_delay,
        max_delay=a.failure_delay_max,
        forget_after=a.failure_forget,
        per_connection=a.failures_per_connection,
        max_keys=a.tracked_keys,
    )
    imap_factory = make_imap_factory(
        maildir,
        creds.check_imap,
        hostname=hostname,
        throttle=throttle,
        max_sessions_per_user=d.imap_max_sessions_per_user,
        max_sessions_per_address=d.imap_max_sessions_per_address,
        pause=pause,
    )
    notify_imap = imap_factory.notify_changed if isinstance(imap_factory, IMAPFactory) else None

    def delivered(info: MessageInfo) -> None:
        link.touch()
        events.delivered(info)
        if notify_imap is not None:
            notify_imap([info.folder])

    def connector_handler() -> ConnectorHandler:
        return ConnectorHandler(
            maildir,
            creds.connector_username,
            creds.connector_password,
            threads.deferToThread,
            delivered,
            per_address=config.device.mailbox_mode == "per_address",
            plaintext_networks=plaintext,
        )

    limits = Limits(
        max_message_size=config.edge.max_message_size + 64 * 1024,
        max_recipients=config.edge.max_recipients,
        # The edge refuses what would exceed this with its own Received header (see
        # `edge.smtp.data.is_loop`): with the same limit, the connector never refuses it.
        max_received_headers=config.edge.max_received_headers,
    )
    smtp_factory = SMTPServerFactory(
        connector_handler, limits, hostname, reactor, tls_context, auth_throttle=throttle
    )
    service = MultiService()
    service.setName("device")
    connector = TCPListener("connector", d.connector_listen, smtp_factory, reactor)
    imap = TCPListener("imap", d.imap_listen, imap_factory, reactor)
    mail = MailService(
        config.data_path / "device" / "mail-state.json", [connector, imap], threads.deferToThread
    )
    host, port = parse_listen(d.http_listen)
    device_info = DeviceInfo(
        hostname,
        addresses=sorted(creds.imap),
        imap_addr=imap.address,
        maildir_root=str(maildir.root),
        edge_url=d.edge_url,
        imap_password=creds.imap.get,
        default_address=next(iter([*d.addresses, *extra_addresses]), "").lower(),
    )
    registration, edge_client = build_registration(config, creds, connector, tls_pin=tls_pin)

    def stored(info: MessageInfo) -> None:
        if notify_imap is not None:
            notify_imap([info.folder])

    sending = build_outbound(
        config,
        reactor,
        maildir,
        registration,
        edge_client,
        check_password=creds.check_imap,
        throttle=throttle,
        tls_context=tls_context,
        plaintext_networks=plaintext,
        on_stored=stored,
    )
    if sending.submission is not None:
        mail.listeners.append(sending.submission)  # listens while mail is enabled
        device_info.submission_addr = sending.submission.address
        device_info.submission_starttls = tls_context is not None
    api = LocalAPI(
        maildir,
        creds.local_api_token,
        base_url=f"http://{host}:{port}",
        events=events,
        mail_service=mail,
        link=link,
        device=device_info,
        trainer=RspamdTrainer(d.rspamd_url, d.rspamd_password) if d.rspamd_url else None,
        clock=reactor,
        on_change=notify_imap,
        pause=pause,
        outbound_queue=sending.queue,
        send_keys=DeviceKeys(device_dir / "idempotency.sqlite3", reactor.seconds),
        outbound_events=sending.events,
        max_message_size=config.device.max_send_size,
    )
    api.edge = EdgeJSON(edge_client) if edge_client is not None else None
    root = device_root(api.resource(), registration, edge_client, creds.local_api_token)
    http = TCPListener("http", d.http_listen, bounded_site(root, SEND_MAX_BODY), reactor)
    mail.setServiceParent(service)  # starts the connector and IMAP listeners while enabled
    sending.queue.setServiceParent(service)
    if sending.poller is not None:
        sending.poller.setServiceParent(service)
    http.setServiceParent(service)
    if edge_client is not None:
        PinSync(registration, reactor).setServiceParent(service)  # a new certificate's pin
    return DeviceParts(
        service,
        maildir,
        creds,
        connector,
        imap,
        http,
        api,
        events,
        mail,
        link,
        registration,
        tls_pin,
        sending,
    )
