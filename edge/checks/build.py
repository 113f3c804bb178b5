"""Builds the edge's check pipeline from configuration, with an explicit registry of checks.

`REGISTRY` maps each check's name to the function that makes it; `DEFAULT_ORDER` is the
order they run in (DMARC after SPF and DKIM, the block rules and Rspamd last). Rspamd and
the DNS blocklists join only when configured. The one `DNSResolver` of the process is
passed in; nothing here builds a resolver. Building never opens a connection. The ARC
sealer (`sealer_for`) is not part of the pipeline: the deliverer seals what it forwards;
making it may read or create the sealing key (at start, before the reactor runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer

from edge.checks.actions import ActionPolicy
from edge.checks.arc import ARCCheck, ARCSealer, ensure_key
from edge.checks.base import Check
from edge.checks.dkim import DKIMCheck
from edge.checks.dmarc import DMARCCheck, OrgDomains
from edge.checks.dnsbl import DNSBLCheck
from edge.checks.pipeline import CheckPipeline, StageTimeouts
from edge.checks.rspamd import RspamdCheck
from edge.checks.rules import SpamRulesCheck
from edge.checks.spf import SPFCheck
from edge.config import Config, ConfigError
from edge.dns.resolver import DNSResolver
from edge.store.records import SpamRule


@dataclass
class Parts:
    """What the checks are built from."""

    config: Config
    resolver: DNSResolver
    reactor: Any
    list_rules: Callable[[], list[SpamRule]]
    # Runs `list_rules`: in the edge `CachedLookups.cached_or_load` (a cached answer at once).
    run_blocking: Callable[..., defer.Deferred[Any]]
    orgs: OrgDomains


REGISTRY: dict[str, Callable[[Parts], Check | None]] = {
    "dnsbl": lambda p: (
        DNSBLCheck(p.resolver, p.config.checks.dnsbl_zones) if p.config.checks.dnsbl_zones else None
    ),
    "spf": lambda p: SPFCheck(p.resolver, querytime=max(p.config.checks.mail_timeout - 5, 1.0)),
    "dkim": lambda p: DKIMCheck(p.resolver),
    "arc": lambda p: ARCCheck(p.resolver),
    "dmarc": lambda p: DMARCCheck(p.resolver, p.orgs),
    "rules": lambda p: SpamRulesCheck(p.list_rules, p.run_blocking),
    "rspamd": lambda p: (
        RspamdCheck(
            p.reactor, p.config.checks.rspamd_url, p.config.fqdn, p.config.checks.rspamd_timeout
        )
        if p.config.checks.rspamd_url
        else None
    ),
}
DEFAULT_ORDER = ("dnsbl", "spf", "dkim", "arc", "dmarc", "rules", "rspamd")


def authserv_id(config: Config) -> str:
    return (config.checks.authserv_id or config.fqdn).strip().lower()


def _validate(config: Config) -> None:
    c = config.checks
    for name in (
        "connect_timeout",
        "mail_timeout",
        "rcpt_timeout",
        "data_timeout",
        "rspamd_timeout",
    ):
        if getattr(c, name) <= 0:
            raise ConfigError(f"checks.{name} must be positive")
    if c.mail_timeout >= config.edge.idle_timeout or c.rcpt_timeout >= config.edge.idle_timeout:
        raise ConfigError(
            "checks.mail_timeout and checks.rcpt_timeout must be below edge.idle_timeout"
        )
    if c.rspamd_url and not c.rspamd_url.startswith(("http://", "https://")):
        raise ConfigError(f"checks.rspamd_url must be an http(s) URL, not {c.rspamd_url!r}")
    aid = authserv_id(config)
    if not aid or any(ch in aid for ch in ' ;()"\\') or not aid.isascii():
        raise ConfigError(f"checks.authserv_id {aid!r} is not a usable authserv-id")


def sealer_for(config: Config) -> ARCSealer | None:
    """The deliverer's ARC sealer: None with `checks.arc_seal = false` or the checks off."""
    c = config.checks
    if not c.enabled or not c.arc_seal:
        return None
    _validate(config)
    key_path = Path(c.arc_key) if c.arc_key else config.data_path / "edge" / "arc.key"
    try:
        pem = ensure_key(key_path)
    except OSError as exc:
        raise ConfigError(f"checks.arc_key {key_path}: {exc.strerror}") from exc
    return ARCSealer(pem, c.arc_selector, c.arc_domain or config.fqdn, authserv_id(config))


def build_pipeline(
    config: Config,
    resolver: DNSResolver,
    reactor: Any,
    list_rules: Callable[[], list[SpamRule]],
    run_blocking: Callable[..., defer.Deferred[Any]],
    *,
    orgs: OrgDomains | None = None,
) -> CheckPipeline | None:
    """The configured pipeline, or None with `checks.enabled = false`."""
    if not config.checks.enabled:
        return None
    _validate(config)
    policy = ActionPolicy(config.checks.actions)
    parts = Parts(config, resolver, reactor, list_rules, run_blocking, orgs or OrgDomains())
    checks = [c for c in (REGISTRY[name](parts) for name in DEFAULT_ORDER) if c is not None]
    c = config.checks
    return CheckPipeline(
        checks,
        policy,
        authserv_id(config),
        reactor,
        timeouts=StageTimeouts(c.connect_timeout, c.mail_timeout, c.rcpt_timeout, c.data_timeout),
    )
