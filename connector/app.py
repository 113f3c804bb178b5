"""Assembly of the device: Maildir, connector SMTP listener, IMAP server and local HTTP API.

State is built from the configuration and the credentials file and passed into each part;
nothing is global. The HTTP API only ever listens on a loopback address. The data directory,
`device/` and the Maildir are made 0700 and the credentials and edge link 0600 before
anything is read or served (an older install's looser modes are narrowed, with a log line).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import threads

from connector import credentials
from connector.events import EventLog, InboundEvents
from connector.imap import IMAPFactory, make_imap_factory
from connector.mailservice import LinkState, MailService
from connector.receiver import ConnectorHandler
from connector.registration import Registration, build_registration
from edge.config import Config, ConfigError, parse_listen
from edge.private import private_dir, private_file
from edge.service import TCPListener
from edge.smtp.server import Limits, SMTPServerFactory
from maildir import Maildir, MessageInfo
from webapi.device_api import DeviceInfo
from webapi.httplimits import bounded_site
from webapi.localapi import MAX_BODY as LOCAL_MAX_BODY
from webapi.localapi import LocalAPI
from webapi.passthrough import device_root
from webapi.spam_api import EdgeJSON, RspamdTrainer


@dataclass
class Device:
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

    def on_ready(self, addresses: dict[str, str]) -> None:
        """Once listening: the API's links use the real HTTP address (port 0 allowed)."""
        self.api.base_url = f"http://{addresses['http']}"
        self.api.device.imap_addr = addresses.get("imap", self.api.device.imap_addr)


def _require_loopback(listen: str, what: str) -> None:
    host, _ = parse_listen(listen)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"{what} must listen on a loopback address, not {host}")


def build_device(config: Config, reactor: Any, extra_addresses: tuple[str, ...] = ()) -> Device:
    d = config.device
    _require_loopback(d.http_listen, "device.http_listen")
    _require_loopback(d.imap_listen, "device.imap_listen")
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
    imap_factory = make_imap_factory(maildir, creds.check_imap, hostname=hostname)
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
        )

    limits = Limits(
        max_message_size=config.edge.max_message_size + 64 * 1024,
        max_recipients=config.edge.max_recipients,
        # The edge refuses what would exceed this with its own Received header (see
        # `edge.smtp.data.is_loop`): with the same limit, the connector never refuses it.
        max_received_headers=config.edge.max_received_headers,
    )
    smtp_factory = SMTPServerFactory(connector_handler, limits, hostname, reactor)
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
    )
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
    )
    registration, edge_client = build_registration(config, creds, connector)
    api.edge = EdgeJSON(edge_client) if edge_client is not None else None
    root = device_root(api.resource(), registration, edge_client, creds.local_api_token)
    http = TCPListener("http", d.http_listen, bounded_site(root, LOCAL_MAX_BODY), reactor)
    mail.setServiceParent(service)  # starts the connector and IMAP listeners while enabled
    http.setServiceParent(service)
    return Device(
        service, maildir, creds, connector, imap, http, api, events, mail, link, registration
    )
