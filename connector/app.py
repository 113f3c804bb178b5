"""Assembly of the device: Maildir, connector SMTP listener, IMAP server and local HTTP API.

State is built from the configuration and the credentials file and passed into each part;
nothing is global. The HTTP API only ever listens on a loopback address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import threads
from twisted.web.server import Site

from connector import credentials
from connector.imap import make_imap_factory
from connector.receiver import ConnectorHandler
from edge.config import Config, ConfigError, parse_listen
from edge.service import TCPListener
from edge.smtp.server import Limits, SMTPServerFactory
from maildir import Maildir, MessageInfo
from webapi.localapi import LocalAPI


@dataclass
class Device:
    service: MultiService
    maildir: Maildir
    creds: credentials.Credentials
    connector: TCPListener
    imap: TCPListener
    http: TCPListener
    api: LocalAPI

    def on_ready(self, addresses: dict[str, str]) -> None:
        """Once listening: the API's links use the real HTTP address (port 0 allowed)."""
        self.api.base_url = f"http://{addresses['http']}"


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
    creds = credentials.ensure(
        config.data_path / "device" / "credentials.json",
        [*d.addresses, *extra_addresses],
        d.connector_username,
        d.connector_password,
    )
    maildir = Maildir(config.maildir_path, hostname=config.fqdn)
    hostname = config.fqdn

    def delivered(info: MessageInfo) -> None:
        return None

    def connector_handler() -> ConnectorHandler:
        return ConnectorHandler(
            maildir,
            creds.connector_username,
            creds.connector_password,
            threads.deferToThread,
            delivered,
        )

    limits = Limits(
        max_message_size=config.edge.max_message_size + 64 * 1024,
        max_recipients=config.edge.max_recipients,
    )
    smtp_factory = SMTPServerFactory(connector_handler, limits, hostname, reactor)
    service = MultiService()
    service.setName("device")
    connector = TCPListener("connector", d.connector_listen, smtp_factory, reactor)
    imap = TCPListener(
        "imap",
        d.imap_listen,
        make_imap_factory(maildir, creds.check_imap, hostname=hostname),
        reactor,
    )
    host, port = parse_listen(d.http_listen)
    api = LocalAPI(maildir, creds.local_api_token, base_url=f"http://{host}:{port}")
    http = TCPListener("http", d.http_listen, Site(api.resource()), reactor)
    for listener in (connector, imap, http):
        listener.setServiceParent(service)
    return Device(service, maildir, creds, connector, imap, http, api)
