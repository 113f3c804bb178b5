"""`twistd tailpost-edge`: options and service construction for the edge process."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from edge.app import build_edge
from edge.config import load_config
from edge.runtime.reactordispatch import direct_dispatch
from edge.runtime.service import ReadyReport, freeze_start_up


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration file."],
        ["data-dir", "d", None, "Data directory (overrides data_dir; default ./var)."],
    ]


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config = load_config(options["config"], data_dir=options["data-dir"])
    edge = build_edge(config, reactor)
    top: Any = MultiService()
    edge.service.setServiceParent(top)
    relay = [edge.relay] if edge.relay is not None else []
    report = ReadyReport(config.data_path / "run", [edge.mx, edge.control.listener, *relay])
    report.ready.append(edge.control.on_ready)
    report.setServiceParent(top)
    direct_dispatch(reactor)
    freeze_start_up()
    return top  # type: ignore[no-any-return]
