"""`twistd tailpost`: the edge and one device in a single process, on embedded defaults.

The edge still hands every message to the device's connector over a loopback SMTP hop,
the same code path as two hosts: STARTTLS to the connector's own certificate, whose pin the
local device gets at bootstrap as an approval would give it (plaintext AUTH would be allowed
on loopback, but the real path is the one exercised). On first start it makes the data directory, a self-signed
certificate, the device's secrets and the demo domain with one address, and prints the
secrets once. The demo domain gets DKIM keys (RSA-2048 and Ed25519) on first start too;
`tailpost dkim show <domain>` prints the records to publish.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from twisted.application.service import IService, MultiService, Service

from connector.app import DeviceParts, build_device
from edge.app import Edge, build_edge
from edge.config import Config, load_config
from edge.outbound.dkimkeys import ensure_dkim_keys
from edge.runtime.private import private_dir
from edge.runtime.reactordispatch import direct_dispatch
from edge.runtime.service import ReadyReport, freeze_start_up
from edge.store import Store
from edge.store.access import AccessStore
from edge.tap import Options as EdgeOptions
from edge.tls import ensure_self_signed

LOCAL_DEVICE_ID = "dev_local"


class Options(EdgeOptions):
    pass


def link_local_device(store: Store, device: DeviceParts) -> None:
    """Give the local device a key of its own for the edge, as an approval would.

    The device then reaches the in-process edge's `/v1` exactly as a remote device does
    (report-spam rules, the pass-through), with a key that sees only its own account.
    """
    registration = device.registration
    if registration is None:
        return
    access = AccessStore(store)
    link = registration.link
    row = store.get_device(LOCAL_DEVICE_ID)
    assert row is not None
    if link.device_key and access.authenticate(link.device_key) is not None:
        if link.connector_tls_pin != (row.connector_tls_pin or ""):
            link.connector_tls_pin = row.connector_tls_pin or ""  # pinned here, at bootstrap
            link.save(registration.path)
        return
    link.device_key = access.issue_key(LOCAL_DEVICE_ID)
    link.status = "authorized"
    link.device_id = LOCAL_DEVICE_ID
    link.account_id = row.account_id
    link.connector_tls_pin = row.connector_tls_pin or ""
    link.save(registration.path)


def bootstrap_demo(store: Store, config: Config, device: DeviceParts) -> None:
    """Make sure the local device, the demo address and the demo domain's DKIM keys exist in
    the edge's store."""
    store.ensure_account()
    creds = device.creds
    if store.get_device(LOCAL_DEVICE_ID) is None:
        store.create_device(
            "local",
            device_id=LOCAL_DEVICE_ID,
            hostname=config.fqdn,
            connector_username=creds.connector_username,
            connector_secret=creds.connector_password,
        )
    else:
        store.update_device(
            LOCAL_DEVICE_ID,
            connector_username=creds.connector_username,
            connector_secret=creds.connector_password,
        )
    # The connector's key, pinned as at an approval (and again after a new certificate).
    store.set_connector_tls_pin(LOCAL_DEVICE_ID, device.tls_pin)
    domain = config.demo.domain.lower()
    route = store.get_route_by_domain(domain)
    if route is None:
        # The operator's own domain on the operator's own edge: vouched for, so active now,
        # without the ownership proof a device's domain needs.
        store.create_route(
            domain,
            type="byod",
            connector_id=LOCAL_DEVICE_ID,
            delivery_mode="split",
            status="active",
            setup_stage="active",
            verified_at=datetime.now(UTC),
        )
    elif not route.verified or route.status != "active":
        store.override_route(
            route.id, "operator", datetime.now(UTC), "the all-in-one's demo domain", status="active"
        )
    # Outbound mail of the demo domain is DKIM-signed: RSA-2048 and Ed25519 keys, made once.
    ensure_dkim_keys(AccessStore(store), domain)
    name, _, addr_domain = config.demo.address.lower().partition("@")
    known = {a.address for a in store.list_byod_addresses()}
    if config.demo.address.lower() not in known:
        store.add_byod_address(name, addr_domain, LOCAL_DEVICE_ID)
    link_local_device(store, device)


def point_device_at_relay(device: DeviceParts, addresses: dict[str, str]) -> None:
    """Once listening: the device relays its outbound mail to this process's own edge, at the
    relay listener's real address (the report's "relay"; port 0 allowed), at once."""
    relay = addresses.get("relay")
    if device.sending is None or not relay:
        return
    device.sending.relay.point_at(relay)
    device.sending.queue.wake()


class LinkDevice(Service):
    """Started after the device listens: points the store's device row at the real port."""

    def __init__(self, store: Store, device: DeviceParts) -> None:
        self.setName("link-device")
        self.store = store
        self.device = device

    def startService(self) -> None:
        super().startService()
        addr = self.device.connector.address
        self.store.update_device(LOCAL_DEVICE_ID, connector_smtp_addr=addr)


def print_banner(
    out: TextIO, config: Config, device: DeviceParts, addresses: dict[str, str]
) -> None:
    demo = config.demo.address
    mx_host, _, mx_port = addresses["mx"].rpartition(":")
    imap_host, _, imap_port = addresses["imap"].rpartition(":")
    sub_host, _, sub_port = addresses.get("submission", "127.0.0.1:1587").rpartition(":")
    creds = device.creds
    out.write(
        f"""
tailpost all-in-one is running; data in {config.data_path}
  MX SMTP (edge, inbound)      {addresses["mx"]}
  relay SMTP (edge, outbound)  {addresses.get("relay", "off")}
  connector SMTP (device)      {addresses["connector"]}
  IMAP (device)                {addresses["imap"]}
  submission SMTP (device)     {addresses.get("submission", "off")}
  local HTTP API (device)      http://{addresses["http"]}

Send a test message to {demo}:
  swaks --server {mx_host} --port {mx_port} --from you@example.net --to {demo}
  python3 -c "import smtplib; smtplib.SMTP('{mx_host}', {mx_port}).sendmail('you@example.net', ['{demo}'], b'Subject: hello\\r\\n\\r\\nHello from tailpost.\\r\\n')"

Send from the device (submission; the password is the address's IMAP password):
  swaks --server {sub_host} --port {sub_port} --tls --auth PLAIN --auth-user {demo} --auth-password PASSWORD --from {demo} --to {demo}

Read it:
  IMAP  host {imap_host}  port {imap_port}  user {demo}  (password in {creds.path})
  curl -s -H "Authorization: Bearer $(python3 -c "import json; print(json.load(open('{creds.path}'))['local_api_token'])")" http://{addresses["http"]}/localapi/v0/mail/messages

DKIM records to publish for {config.demo.domain}:
  tailpost --data-dir {config.data_path} dkim show {config.demo.domain}
"""
    )
    fresh = [c for c in creds.created if c.startswith("imap:") or c == "local_api_token"]
    if fresh:
        out.write(
            "\nGenerated on this first start (shown once; kept with mode 0600 in the file above):\n"
        )
        for what in fresh:
            if what == "local_api_token":
                out.write(f"  local API token:       {creds.local_api_token}\n")
            else:
                address = what.partition(":")[2]
                out.write(f"  IMAP password of {address}: {creds.imap[address]}\n")
    out.write("\n")
    out.flush()


def build_allinone(
    config: Config, reactor: Any
) -> tuple[MultiService, Edge, DeviceParts, ReadyReport]:
    data = private_dir(config.data_path)  # secrets and mail below: the owner's alone
    if config.edge.tls_cert:
        tls_files = (Path(config.edge.tls_cert), Path(config.edge.tls_key))
    else:
        tls_dir = private_dir(data / "tls")
        tls_files = (tls_dir / "cert.pem", tls_dir / "key.pem")
        ensure_self_signed(*tls_files, config.fqdn)
    if not config.device.edge_url:
        # The device talks to the edge in this process; the real port is set once listening.
        config.device.edge_url = f"http://{config.edge.control_listen}"
    if not config.edge.postmaster:
        # The person running the all-in-one is its edge's operator: role mail is theirs.
        config.edge.postmaster = config.demo.address
    device = build_device(config, reactor, extra_addresses=(config.demo.address,), with_mx=True)
    if device.sending is not None:
        # Mail waits until the edge's relay listens (`point_device_at_relay`).
        device.sending.relay.point_at("")
    edge = build_edge(config, reactor, tls_files=tls_files)
    bootstrap_demo(edge.store, config, device)
    top = MultiService()
    device.service.setServiceParent(top)
    LinkDevice(edge.store, device).setServiceParent(top)
    edge.service.setServiceParent(top)
    submission = device.sending.submission if device.sending is not None else None
    report = ReadyReport(
        data / "run",
        [edge.mx, edge.control.listener, device.connector, device.imap, device.http]
        + ([submission] if submission is not None else [])
        + ([edge.relay] if edge.relay is not None else []),
    )
    report.ready.append(device.on_ready)
    report.ready.append(lambda addresses: point_device_at_relay(device, addresses))
    report.ready.append(edge.control.on_ready)

    def point_device_at_edge(addresses: dict[str, str]) -> None:
        client = device.registration.client if device.registration else None
        if client is not None:
            client.base_url = f"http://{addresses['control']}"

    report.ready.append(point_device_at_edge)
    report.setServiceParent(top)
    return top, edge, device, report


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config = load_config(options["config"], data_dir=options["data-dir"])
    top, _edge, device, report = build_allinone(config, reactor)
    out = sys.__stdout__
    if out is not None:
        report.ready.append(lambda addresses: print_banner(out, config, device, addresses))
    direct_dispatch(reactor)
    freeze_start_up()
    return top
