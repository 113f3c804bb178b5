"""`twistd tailpost-device`: options and service construction for the device process."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService, MultiService

from connector.app import build_device
from edge.config import load_config
from edge.dns.namehosts import use_configured_names
from edge.dns.resolver import DNSResolver
from edge.runtime.reactordispatch import direct_dispatch
from edge.runtime.service import ReadyReport, freeze_start_up
from edge.tap import Options as EdgeOptions


class Options(EdgeOptions):
    pass


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config = load_config(options["config"], data_dir=options["data-dir"])
    resolver = DNSResolver(
        config.dns.nameservers or None, config.dns.port, config.dns.timeout, reactor=reactor
    )
    use_configured_names(reactor, resolver)  # the edge URL, Rspamd: the configured DNS
    device = build_device(config, reactor)
    top: Any = MultiService()
    device.service.setServiceParent(top)
    submission = device.sending.submission if device.sending is not None else None
    report = ReadyReport(
        config.data_path / "run",
        [device.connector, device.imap, device.http]
        + ([submission] if submission is not None else []),
    )
    report.ready.append(device.on_ready)

    def banner(addresses: dict[str, str]) -> None:
        out = sys.__stdout__
        if out is None:
            return
        out.write("tailpost device listening:\n")
        for name, address in addresses.items():
            out.write(f"  {name:10} {address}\n")
        out.write(f"credentials: {device.creds.path}\n")
        out.flush()

    report.ready.append(banner)
    report.setServiceParent(top)
    direct_dispatch(reactor)
    freeze_start_up()
    return top  # type: ignore[no-any-return]
