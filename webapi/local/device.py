"""What the loopback API says about the device: status, mail client settings, autoconfig XML.

`DeviceInfo` is filled in by the device's assembly (addresses, listeners, paths); the
functions here only shape it into replies. This module must never read files or sockets,
and never include a secret other than the IMAP password of the address a client asked for.
"""

from __future__ import annotations

import platform
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from webapi.errors import APIError

__all__ = ["DeviceInfo", "autoconfig_xml", "client_config", "pick_address", "status_body"]

VERSION = "0.1.0"


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


@dataclass
class DeviceInfo:
    """The device facts the API reports; listener addresses are updated once listening."""

    hostname: str
    device_id: str = ""
    addresses: list[str] = field(default_factory=list)
    default_address: str = ""  # the sender when a send names none ("": the only address)
    imap_addr: str = ""
    submission_addr: str = ""  # "" when this device has no submission listener
    submission_starttls: bool = False  # the submission listener offers STARTTLS
    maildir_root: str = ""
    edge_url: str = ""
    imap_password: Callable[[str], str | None] = lambda _address: None


def status_body(
    info: DeviceInfo,
    *,
    mail_status: str,
    link_status: str,
    last_seen: str | None,
    api_base: str,
) -> dict[str, Any]:
    return {
        "device": {
            "hostname": info.hostname,
            "device_id": info.device_id,
            "version": VERSION,
            "os": platform.system().lower(),
        },
        "connector": {"status": link_status, "last_seen": last_seen, "edge_url": info.edge_url},
        "mail": {
            "status": mail_status,
            "imap_addr": info.imap_addr,
            "smtp_submission_addr": info.submission_addr,
            "maildir_root": info.maildir_root,
        },
        "addresses": list(info.addresses),
        "local_api_base": api_base,
        "status_url": f"{api_base}/localapi/v0/status",
    }


def pick_address(info: DeviceInfo, wanted: str | None) -> str:
    """The assigned address a client config is for; 404/400 with a clear action otherwise."""
    assigned = [a.lower() for a in info.addresses]
    if wanted is not None:
        if wanted.lower() not in assigned:
            raise APIError(
                404,
                "address_not_assigned",
                "that address is not assigned to this device",
                "use_an_address_from_status",
            )
        return wanted.lower()
    if not assigned:
        raise APIError(
            409, "no_addresses", "no address is assigned to this device", "assign_an_address"
        )
    if len(assigned) > 1:
        raise APIError(
            400,
            "address_required",
            "this device has several addresses; pass address",
            "add_address_query_parameter",
        )
    return assigned[0]


def client_config(info: DeviceInfo, address: str, api_base: str) -> dict[str, Any]:
    imap_host, imap_port = _split(info.imap_addr)
    smtp: dict[str, Any] | None = None
    if info.submission_addr:
        smtp_host, smtp_port = _split(info.submission_addr)
        smtp = {
            "host": smtp_host,
            "port": smtp_port,
            "security": "starttls" if info.submission_starttls else "none",
            "auth_method": "password",
            "auth_mechanisms": ["PLAIN", "LOGIN"],
            "username": address,
            "password": info.imap_password(address) or "",
        }
    return {
        "status": "ok",
        "account_name": address,
        "imap": {
            "host": imap_host,
            "port": imap_port,
            "security": "none",
            "auth_method": "password",
            "username": address,
            "password": info.imap_password(address) or "",
        },
        "smtp": smtp,
        "identity": {"email": address, "display_name": ""},
        "addresses": list(info.addresses),
        "autoconfig_url": f"{api_base}/localapi/v0/mail/autoconfig.xml",
    }


def _server(
    parent: ET.Element, tag: str, kind: str, address: str, socket_type: str = "plain"
) -> None:
    host, port = _split(address)
    server = ET.SubElement(parent, tag, type=kind)
    ET.SubElement(server, "hostname").text = host
    ET.SubElement(server, "port").text = str(port)
    ET.SubElement(server, "socketType").text = socket_type
    ET.SubElement(server, "authentication").text = "password-cleartext"
    ET.SubElement(server, "username").text = "%EMAILADDRESS%"


def autoconfig_xml(info: DeviceInfo, address: str | None) -> bytes:
    """The mail-client autoconfig document (clientConfig 1.1) for the device's servers."""
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=info.hostname or "localhost")
    domains = sorted({a.rpartition("@")[2] for a in info.addresses if "@" in a})
    if address is not None and "@" in address:
        domains = [address.rpartition("@")[2]]
    for domain in domains:
        ET.SubElement(provider, "domain").text = domain
    ET.SubElement(provider, "displayName").text = f"tailpost on {info.hostname}"
    ET.SubElement(provider, "displayShortName").text = "tailpost"
    _server(provider, "incomingServer", "imap", info.imap_addr)
    if info.submission_addr:
        socket_type = "STARTTLS" if info.submission_starttls else "plain"
        _server(provider, "outgoingServer", "smtp", info.submission_addr, socket_type)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return body
