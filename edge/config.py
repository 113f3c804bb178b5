"""Configuration: one TOML file, read once at start, with embedded defaults.

Every key and its default is listed in docs/configuration.md. Paths left empty are
derived from `data_dir`. This module only reads and validates; it never opens sockets or
creates files.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edge.smtp.address import validate_address
from edge.smtp.replies import SMTPReplyError


class ConfigError(ValueError):
    """The configuration file is unreadable or holds a bad value."""


def parse_listen(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:25") into its parts; port 0 means any free port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen address {value!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@dataclass
class EdgeConfig:
    mx_listen: str = "127.0.0.1:2025"
    database_url: str = ""
    spool_dir: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 512
    idle_timeout: float = 300.0
    command_timeout: float = 60.0
    data_timeout: float = 600.0
    min_data_rate: int = 1024
    data_rate_window: float = 60.0
    max_connections: int = 1000
    max_connections_per_ip: int = 100
    max_connections_per_network: int = 200
    network_v4_prefix: int = 24
    network_v6_prefix: int = 64
    reserved_connections: int = 200
    reserved_per_network: int = 10
    max_errors: int = 20
    max_junk_commands: int = 100
    max_header_size: int = 1024 * 1024
    max_received_headers: int = 50
    mx_processes: int = 1
    retry_schedule: list[float] = field(
        default_factory=lambda: [60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0]
    )
    delivery_timeout: float = 60.0
    delivery_connections: int = 4
    queue_lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    mx_delivery_port: int = 25
    # MTA-STS (RFC 8461) on delivery to a domain's MX hosts, its policies fetched over HTTPS
    # on mta_sts_port; MX and policy certificates are checked against tls_ca_file (PEM), or
    # the system's CA roots when it is empty.
    mta_sts: bool = True
    mta_sts_port: int = 443
    tls_ca_file: str = ""
    mx_proxy_protocol: bool = False
    mx_proxy_trusted: list[str] = field(default_factory=lambda: ["127.0.0.1/32"])
    mx_proxy_timeout: float = 10.0
    control_listen: str = "127.0.0.1:8025"
    control_url: str = ""
    admin_key_file: str = ""
    # The key file that encrypts the secrets in the store (edge.store.keyring); empty:
    # <data_dir>/edge/store.key, made on first start. Every edge sharing a database needs it.
    store_key_file: str = ""
    managed_domain: str = ""
    postmaster: str = ""
    allow_vanity: bool = False
    edge_mx_target: str = ""
    spf_mechanism: str = ""
    registration_ttl: float = 3600.0
    probe_timeout: float = 10.0
    registration_limit_per_source: int = 5
    registration_limit_total: int = 100
    registration_limit_window: float = 3600.0
    claim_ttl: float = 86400.0
    claim_limit: int = 20
    # The edge's own re-check of verified domains on their way to active (edge.domains.routewatch):
    # every this many seconds (and at start), at most route_recheck_batch routes per pass.
    route_recheck_interval: float = 300.0
    route_recheck_batch: int = 50
    device_networks: list[str] = field(
        default_factory=lambda: ["100.64.0.0/10", "fd7a:115c:a1e0::/48", "127.0.0.0/8", "::1/128"]
    )
    control_max_body: int = 64 * 1024
    # The relay for the devices' outbound mail (edge.outbound); "" turns it off. AUTH without
    # TLS only from relay_plaintext_networks.
    relay_listen: str = "127.0.0.1:2526"
    relay_plaintext_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # The largest message the relay takes from a device: 25 MiB of attachments are about
    # 34 MiB once base64-encoded, so more than the MX takes from the internet.
    relay_max_message_size: int = 36 * 1024 * 1024


@dataclass
class DeviceConfig:
    connector_listen: str = "127.0.0.1:2525"
    imap_listen: str = "127.0.0.1:1143"
    # Concurrent IMAP sessions: past the per-address limit a connection gets `* BYE`, past
    # the per-user limit a login gets `NO [LIMIT]`; 0 means no limit.
    imap_max_sessions_per_user: int = 20
    imap_max_sessions_per_address: int = 50
    http_listen: str = "127.0.0.1:18080"
    maildir: str = ""
    addresses: list[str] = field(default_factory=list)
    connector_username: str = "edge"
    connector_password: str = ""
    edge_url: str = ""
    mailbox_mode: str = "inbox"
    rspamd_url: str = ""
    rspamd_password: str = ""
    # The connector's STARTTLS (its own certificate, pinned by the edge) and the peers that
    # may authenticate without it (loopback always); see docs/configuration.md.
    connector_tls: bool = True
    connector_tls_cert: str = ""
    connector_tls_key: str = ""
    plaintext_networks: list[str] = field(
        default_factory=lambda: ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]
    )
    # Sending: the submission listener for local clients (loopback only; "" for none) and
    # the edge's relay listener ("" = the host of edge_url, port 2526).
    submission_listen: str = "127.0.0.1:1587"
    # The largest message the submission listener and the local API's send take (it should
    # not exceed the edge's relay_max_message_size).
    max_send_size: int = 36 * 1024 * 1024
    edge_relay: str = ""
    relay_retry_initial: float = 5.0
    relay_retry_max: float = 300.0
    outbound_lifetime: float = 5 * 86400.0
    outcome_poll_interval: float = 5.0


@dataclass
class DNSConfig:
    nameservers: list[str] = field(default_factory=list)
    port: int = 53
    timeout: float = 5.0


@dataclass
class ChecksConfig:
    """The inbound checks (SPF, DKIM, DMARC, ARC, block rules, Rspamd, DNS blocklists)."""

    enabled: bool = True
    authserv_id: str = ""
    actions: dict[str, str] = field(default_factory=dict)
    rspamd_url: str = ""
    rspamd_timeout: float = 20.0
    dnsbl_zones: list[str] = field(default_factory=list)
    connect_timeout: float = 10.0
    mail_timeout: float = 25.0
    rcpt_timeout: float = 10.0
    data_timeout: float = 30.0
    arc_seal: bool = True
    arc_key: str = ""
    arc_selector: str = "tailpost"
    arc_domain: str = ""


@dataclass
class AuthConfig:
    """The delay on failed logins (`edge.auththrottle`) of every listener that checks a
    password: the connector's SMTP AUTH, IMAP."""

    failure_delay: float = 2.0
    failure_delay_max: float = 30.0
    failure_forget: float = 900.0
    failures_per_connection: int = 3
    tracked_keys: int = 10000


@dataclass
class DemoConfig:
    domain: str = "example.test"
    address: str = "demo@example.test"


@dataclass
class Config:
    data_dir: str = "./var"
    hostname: str = ""
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def fqdn(self) -> str:
        return self.hostname or socket.getfqdn() or "localhost"

    @property
    def store_url(self) -> str:
        return self.edge.database_url or f"sqlite:///{self.data_path / 'edge' / 'store.db'}"

    @property
    def store_key_path(self) -> Path:
        return (
            Path(self.edge.store_key_file)
            if self.edge.store_key_file
            else self.data_path / "edge" / "store.key"
        )

    @property
    def spool_path(self) -> Path:
        return (
            Path(self.edge.spool_dir) if self.edge.spool_dir else self.data_path / "edge" / "spool"
        )

    @property
    def maildir_path(self) -> Path:
        return (
            Path(self.device.maildir)
            if self.device.maildir
            else self.data_path / "device" / "Maildir"
        )


def _apply(target: Any, values: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown key {where}{key}")
        current = getattr(target, key)
        if isinstance(value, dict) and isinstance(current, dict):
            setattr(target, key, dict(value))  # a free-form table (checks.actions)
            continue
        if isinstance(value, dict):
            if not hasattr(current, "__dataclass_fields__"):
                raise ConfigError(f"{where}{key} is not a table")
            _apply(current, value, f"{where}{key}.")
            continue
        if hasattr(current, "__dataclass_fields__"):
            raise ConfigError(f"{where}{key} must be a table")
        expected = type(current)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is list and isinstance(value, list):
            value = [
                float(v) if isinstance(v, int) and key == "retry_schedule" else v for v in value
            ]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(
                f"{where}{key} must be {expected.__name__}, not {type(value).__name__}"
            )
        setattr(target, key, value)


def _is_address(value: str) -> bool:
    try:
        validate_address(value, smtputf8=True)
    except SMTPReplyError:
        return False
    return True


def config_to_json(config: Config) -> str:
    """The whole configuration as JSON, for a child process (`config_from_json`)."""
    return json.dumps(asdict(config))


def config_from_json(text: str) -> Config:
    """The configuration a parent process handed over with `config_to_json`."""
    config = Config()
    _apply(config, json.loads(text), "")
    return config


def _check_networks(key: str, networks: list[str], *, strict: bool = False) -> None:
    """Each of `networks` must be an IP network (with host bits only when not `strict`)."""
    for network in networks:
        try:
            if not isinstance(network, str):
                raise TypeError(network)
            ipaddress.ip_network(network, strict=strict)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}: {network!r} is not an IP network like 10.0.0.0/8") from exc


def _drop_retired(raw: dict[str, Any]) -> None:
    """Takes out keys that are no longer settings but that an older file may still hold with
    the only value they can have now: `edge.accept_mode = "durable"` (every 250 is sent
    once the message is on disk, always). Any other value is refused."""
    edge = raw.get("edge")
    if isinstance(edge, dict) and "accept_mode" in edge:
        mode = edge.pop("accept_mode")
        if mode != "durable":
            raise ConfigError(
                f"edge.accept_mode = {mode!r} is no longer supported: the edge answers 250 only"
                ' once the message is on disk; remove the key (or set it to "durable")'
            )


def load_config(path: str | Path | None = None, *, data_dir: str | None = None) -> Config:
    """Read `path` (or nothing: the embedded defaults) and apply a `--data-dir` override."""
    config = Config()
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        _drop_retired(raw)
        _apply(config, raw, "")
    if data_dir is not None:
        config.data_dir = data_dir
    for listen in (
        config.edge.mx_listen,
        config.edge.control_listen,
        config.device.connector_listen,
        config.device.imap_listen,
        config.device.http_listen,
        *[a for a in (config.device.submission_listen, config.device.edge_relay) if a],
    ):
        parse_listen(listen)
    if config.edge.relay_listen:
        parse_listen(config.edge.relay_listen)
    d = config.device
    if (
        not 0 < d.relay_retry_initial <= d.relay_retry_max
        or min(d.outcome_poll_interval, d.outbound_lifetime) <= 0
    ):
        raise ConfigError(
            "device.relay_retry_initial, relay_retry_max, outcome_poll_interval and "
            "outbound_lifetime must be positive, and relay_retry_initial at most relay_retry_max"
        )
    if config.edge.max_message_size <= 0 or config.edge.max_recipients <= 0:
        raise ConfigError("edge.max_message_size and edge.max_recipients must be positive")
    if config.edge.relay_max_message_size <= 0 or config.device.max_send_size <= 0:
        raise ConfigError("edge.relay_max_message_size and device.max_send_size must be positive")
    if config.device.mailbox_mode not in ("inbox", "per_address"):
        raise ConfigError('device.mailbox_mode must be "inbox" or "per_address"')
    _check_networks("edge.mx_proxy_trusted", config.edge.mx_proxy_trusted, strict=True)
    _check_networks("edge.device_networks", config.edge.device_networks)
    _check_networks("edge.relay_plaintext_networks", config.edge.relay_plaintext_networks)
    _check_networks("device.plaintext_networks", config.device.plaintext_networks)
    if bool(config.device.connector_tls_cert) != bool(config.device.connector_tls_key):
        raise ConfigError("device.connector_tls_cert and device.connector_tls_key go together")
    for name in (
        "registration_limit_per_source",
        "registration_limit_total",
        "registration_limit_window",
        "claim_ttl",
        "claim_limit",
        "control_max_body",
    ):
        if getattr(config.edge, name) <= 0:
            raise ConfigError(f"edge.{name} must be positive")
    if not 10.0 <= config.edge.route_recheck_interval <= 86400.0:  # also refuses nan
        raise ConfigError("edge.route_recheck_interval must be between 10 and 86400 seconds")
    if not 1 <= config.edge.route_recheck_batch <= 10_000:
        raise ConfigError("edge.route_recheck_batch must be between 1 and 10000")
    if config.edge.mx_proxy_timeout <= 0:
        raise ConfigError("edge.mx_proxy_timeout must be positive")
    if not 1 <= config.edge.mx_processes <= 64:
        raise ConfigError("edge.mx_processes must be between 1 and 64")
    if config.edge.delivery_connections <= 0:
        raise ConfigError("edge.delivery_connections must be positive")
    if config.edge.max_received_headers < 1:
        raise ConfigError("edge.max_received_headers must be at least 1")
    if config.edge.postmaster and not _is_address(config.edge.postmaster):
        raise ConfigError(
            f"edge.postmaster must be an address like ops@example.org, not "
            f"{config.edge.postmaster!r}"
        )
    if not 1 <= config.edge.mta_sts_port <= 65535:
        raise ConfigError("edge.mta_sts_port must be a port number, 1 to 65535")
    if config.edge.tls_ca_file and not os.access(config.edge.tls_ca_file, os.R_OK):
        raise ConfigError(f"edge.tls_ca_file {config.edge.tls_ca_file!r} cannot be read")
    if not config.edge.retry_schedule:
        raise ConfigError("edge.retry_schedule must not be empty")
    _check_listener_limits(config)
    return config


def _check_listener_limits(config: Config) -> None:
    e, a = config.edge, config.auth
    for name in ("idle_timeout", "command_timeout", "data_timeout", "data_rate_window"):
        if getattr(e, name) <= 0:
            raise ConfigError(f"edge.{name} must be positive")
    if e.min_data_rate < 0:
        raise ConfigError("edge.min_data_rate must be 0 (no minimum) or positive")
    for name in ("max_connections", "max_connections_per_ip", "max_connections_per_network"):
        if getattr(e, name) < 1:
            raise ConfigError(f"edge.{name} must be at least 1")
    if not 0 <= e.reserved_connections < e.max_connections:
        raise ConfigError("edge.reserved_connections must be at least 0 and below max_connections")
    if e.reserved_per_network < 0:
        raise ConfigError("edge.reserved_per_network must not be negative")
    if not 8 <= e.network_v4_prefix <= 32 or not 16 <= e.network_v6_prefix <= 128:
        raise ConfigError(
            "edge.network_v4_prefix must be 8 to 32 and edge.network_v6_prefix 16 to 128"
        )
    for name in ("imap_max_sessions_per_user", "imap_max_sessions_per_address"):
        if getattr(config.device, name) < 0:
            raise ConfigError(f"device.{name} must be 0 (no limit) or positive")
    if not 0 < a.failure_delay <= a.failure_delay_max:
        raise ConfigError("auth.failure_delay must be positive and at most auth.failure_delay_max")
    if a.failure_forget <= a.failure_delay_max:
        raise ConfigError("auth.failure_forget must be longer than auth.failure_delay_max")
    if a.failures_per_connection < 0 or a.tracked_keys < 2:
        raise ConfigError(
            "auth.failures_per_connection must not be negative, auth.tracked_keys at least 2"
        )
