"""The `tailpost` operator command: works on the edge's store named by the configuration.

    tailpost [--config FILE] [--data-dir DIR] devices list [--json]
    tailpost devices approve CODE [--account ACCOUNT_ID]
    tailpost devices revoke DEVICE_ID
    tailpost queue list|show|retry|hold|release|delete|bounce ...   (see edge.delivery.queuecli)
    tailpost dkim show DOMAIN [--json]

Each command group is a function that adds its argparse subparser and sets a handler (`add_devices`
here, `add_queue` in edge.delivery.queuecli); `_groups` lists them. Handlers get the parsed
arguments, the loaded configuration and an output stream, and return the exit status. This module
must never print a key or secret, and never change anything a command was not asked to change.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from edge.config import Config, ConfigError, load_config
from edge.delivery.queuecli import add_queue
from edge.outbound.dkimkeys import dkim_records
from edge.runtime.storeopen import open_configured_store
from edge.store import Conflict, NotFound
from edge.store.access import AccessStore
from edge.store.validate import normalize_domain

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace, Config, TextIO], int]


def _devices_list(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    store = open_configured_store(config)
    try:
        access = AccessStore(store)
        now = access.now()
        waiting = [
            r for r in access.registrations() if r.approved_at is None and r.expires_at > now
        ]
        devices = store.list_devices()
    finally:
        store.close()
    codes = {r.device_id: r.code for r in waiting}
    known = {d.id for d in devices}
    rows = [
        {**d.to_dict(), "account_id": d.account_id, "registration_code": codes.get(d.id)}
        for d in devices
    ] + [
        {
            "id": r.device_id,
            "name": r.name,
            "hostname": r.hostname,
            "auth_status": "pending",
            "connector_smtp_addr": r.connector_smtp_addr,
            "account_id": "",
            "registration_code": r.code,
        }
        for r in waiting
        if r.device_id not in known
    ]
    if args.json:
        json.dump({"devices": rows}, out, indent=2)
        out.write("\n")
        return 0
    header = ("ID", "NAME", "STATUS", "CODE", "ACCOUNT", "CONNECTOR")
    table = [header] + [
        (
            r["id"],
            r["name"],
            r["auth_status"],
            r["registration_code"] or "-",
            r["account_id"] or "-",
            r["connector_smtp_addr"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        out.write("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")
    return 0


def _devices_approve(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    store = open_configured_store(config)
    try:
        device = AccessStore(store).approve(args.code, args.account)
    finally:
        store.close()
    out.write(f"approved {device.id} ({device.name}) in account {device.account_id}\n")
    return 0


def _devices_revoke(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    store = open_configured_store(config)
    try:
        device = AccessStore(store).revoke_device(args.device_id)
    finally:
        store.close()
    out.write(f"revoked {device.id} ({device.name}) and its keys\n")
    return 0


def add_devices(groups: Any) -> None:
    devices = groups.add_parser("devices", help="list, approve and revoke devices")
    commands = devices.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser(
        "list", help="every device, and the registrations waiting for approval with their codes"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_devices_list)
    approve = commands.add_parser("approve", help="approve a registering device")
    approve.add_argument("code", help="the approval code the device shows (or its device id)")
    approve.add_argument("--account", default=None, help="join this existing account")
    approve.set_defaults(handler=_devices_approve)
    revoke = commands.add_parser("revoke", help="revoke a device and every key it holds")
    revoke.add_argument("device_id")
    revoke.set_defaults(handler=_devices_revoke)


def _dkim_show(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    domain = normalize_domain(args.domain)  # ValueError: "invalid domain"
    store = open_configured_store(config)
    try:
        records = dkim_records(domain, AccessStore(store).dkim_keys(domain))
    finally:
        store.close()
    if not records:
        raise NotFound(f"no active DKIM key for {domain}")
    if args.json:
        json.dump({"records": [r.to_dict() for r in records]}, out, indent=2)
        out.write("\n")
        return 0
    for record in records:
        out.write(record.zone_line() + "\n")
    return 0


def add_dkim(groups: Any) -> None:
    dkim = groups.add_parser("dkim", help="the DKIM keys outbound mail is signed with")
    commands = dkim.add_subparsers(dest="command", required=True, metavar="COMMAND")
    show = commands.add_parser(
        "show", help="the DNS records to publish for a domain's active DKIM keys"
    )
    show.add_argument("domain")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_dkim_show)


def _groups() -> list[Callable[[Any], None]]:
    return [add_devices, add_queue, add_dkim]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailpost", description="Operate a tailpost edge.")
    parser.add_argument("-c", "--config", default=None, help="the TOML configuration file")
    parser.add_argument("-d", "--data-dir", default=None, help="overrides data_dir")
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    for add in _groups():
        add(groups)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, data_dir=args.data_dir)
        handler: Handler = args.handler
        return handler(args, config, out)
    except ConfigError as exc:
        err.write(f"tailpost: configuration: {exc}\n")
        return 2
    except NotFound as exc:
        err.write(f"tailpost: not found: {exc}\n")
        return 1
    except (Conflict, ValueError) as exc:
        err.write(f"tailpost: {exc}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
