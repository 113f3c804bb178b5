"""Normalisation and validation of values before they are written to the control plane.

Domains and local parts are stored lower-case, host:port pairs are checked for shape, and
enumerated fields are checked against their allowed values; bad input raises ``ValueError``
with a message fit for an API error. ``split_address`` is the one forgiving function: it is
used on untrusted SMTP input and returns None instead of raising. This module must never
touch the database or do DNS lookups.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LOCAL = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_MAX_DOMAIN = 253
_MAX_LOCAL = 64
TLS_MODES = ("starttls", "tls", "none")
DEVICE_AUTH_STATUSES = ("pending", "authorized", "revoked")
DEVICE_FIELDS = frozenset(
    {
        "name",
        "hostname",
        "auth_status",
        "connector_smtp_addr",
        "connector_username",
        "connector_secret",
        "key_hash",
        "last_seen_at",
    }
)


def required_text(field: str, value: object, limit: int = 255) -> str:
    """``value`` stripped, if it is a non-empty string of at most ``limit`` characters."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a non-empty string")
    value = value.strip()
    if len(value) > limit or "\x00" in value:
        raise ValueError(f"{field} is longer than {limit} characters or has a NUL")
    return value


def optional_text(field: str, value: object, limit: int = 255) -> str | None:
    """A string of at most ``limit`` characters, or None."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise ValueError(f"{field} must be null or a string of at most {limit} characters")
    return value


def normalize_domain(domain: str) -> str:
    """Lower-case ``domain``, drop one trailing dot, and check it is a host name."""
    if not isinstance(domain, str):
        raise ValueError("domain must be a string")
    value = domain.strip().lower()
    if value.endswith("."):
        value = value[:-1]
    try:
        value = value.encode("idna").decode("ascii") if not value.isascii() else value
    except UnicodeError as exc:
        raise ValueError(f"invalid domain: {domain!r}") from exc
    labels = value.split(".")
    if len(value) > _MAX_DOMAIN or len(labels) < 2 or not all(_LABEL.match(x) for x in labels):
        raise ValueError(f"invalid domain: {domain!r}")
    return value


def normalize_local_part(name: str) -> str:
    """Lower-case a mailbox local part and check it is a plain dot-atom."""
    if not isinstance(name, str):
        raise ValueError("name must be a string")
    value = name.strip().lower()
    if not value or len(value) > _MAX_LOCAL or not _LOCAL.match(value):
        raise ValueError(f"invalid mailbox name: {name!r}")
    return value


def split_address(address: object) -> tuple[str, str] | None:
    """``(local, domain)`` lower-cased, or None when ``address`` is not a plain address.

    Never raises: this runs on whatever a client sent in RCPT TO.
    """
    if not isinstance(address, str):
        return None
    value = address.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    local, sep, domain = value.rpartition("@")
    if not sep or not local or not domain or "@" in local:
        return None
    if len(local) > _MAX_LOCAL or any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in value):
        return None
    domain = domain.lower()
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not domain or len(domain) > _MAX_DOMAIN or ".." in domain or domain.startswith("."):
        return None
    return local.lower(), domain


def check_smtp_addr(value: str, *, allow_empty: bool = True) -> str:
    """Check a ``host:port`` pair (``[v6]:port`` for IPv6 literals); returns it stripped."""
    if not isinstance(value, str):
        raise ValueError("SMTP address must be a string")
    value = value.strip()
    if not value:
        if allow_empty:
            return ""
        raise ValueError("SMTP address is required")
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or ":" in host and not value.startswith("["):
        raise ValueError(f"SMTP address must be host:port, got {value!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port in SMTP address {value!r}")
    return value


def check_choice(field: str, value: object, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else ValueError naming the field."""
    options = tuple(allowed)
    if value not in options:
        raise ValueError(f"{field} must be one of {', '.join(options)}; got {value!r}")
    assert isinstance(value, str)
    return value


def check_hosts(value: object) -> list[dict[str, Any]]:
    """Normalise authoritative hosts: a list of ``{host, port, tls_mode}`` in priority order.

    Plain host-name strings are accepted and get port 25 and ``starttls``.
    """
    if not isinstance(value, list):
        raise ValueError("authoritative_hosts must be a list")
    hosts: list[dict[str, Any]] = []
    for item in value:
        entry = {"host": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("host"), str):
            raise ValueError(f"invalid authoritative host: {item!r}")
        host = entry["host"].strip().lower().rstrip(".")
        port = entry.get("port", 25)
        tls_mode = entry.get("tls_mode", "starttls")
        if not host:
            raise ValueError(f"invalid authoritative host: {item!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"invalid port for authoritative host {host!r}: {port!r}")
        check_choice("tls_mode", tls_mode, TLS_MODES)
        hosts.append({"host": host, "port": port, "tls_mode": tls_mode})
    return hosts


def check_json_list(field: str, value: object) -> list[Any]:
    """A JSON-able list (a copy), else ValueError."""
    if not isinstance(value, list):
        raise ValueError(f"{field} must be a list")
    return list(value)


def managed_address(
    name: str, domain: str, namespace: str | None, vanity: bool
) -> tuple[str, str, str]:
    """``(local, domain, address)``: ``name.namespace@domain``, or ``name@domain`` when
    ``vanity`` is set or there is no namespace."""
    local = normalize_local_part(name)
    domain = normalize_domain(domain)
    if vanity or not namespace:
        return local, domain, f"{local}@{domain}"
    if not isinstance(namespace, str):
        raise ValueError("namespace must be a string")
    full = normalize_local_part(f"{local}.{namespace.strip().lower()}")
    return local, domain, f"{full}@{domain}"


def check_device_update(fields: Mapping[str, object]) -> dict[str, Any]:
    """Checked values for the device fields in ``fields``; unknown fields raise ValueError."""
    unknown = set(fields) - DEVICE_FIELDS
    if unknown:
        raise ValueError(f"cannot update device field(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "name":
            values[key] = required_text("name", value)
        elif key == "hostname":
            values[key] = optional_text("hostname", value) or ""
        elif key == "auth_status":
            values[key] = check_choice("auth_status", value, DEVICE_AUTH_STATUSES)
        elif key == "connector_smtp_addr":
            values[key] = check_smtp_addr(optional_text(key, value, 300) or "")
        elif key == "last_seen_at":
            if value is not None and not (isinstance(value, datetime) and value.tzinfo):
                raise ValueError("last_seen_at must be a timezone-aware datetime or null")
            values[key] = value
        else:
            values[key] = optional_text(key, value)
    return values
