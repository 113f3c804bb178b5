"""The device's secrets: local API token, connector credentials and IMAP passwords.

Generated on first start and kept in one JSON file with mode 0600 in the data directory.
`ensure` reports which secrets it created so the caller can print them once; nothing here
ever logs a secret.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path


def _new_secret(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(18)


@dataclass
class Credentials:
    path: Path
    local_api_token: str = ""
    connector_username: str = "edge"
    connector_password: str = ""
    imap: dict[str, str] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)

    def check_imap(self, username: str, password: str) -> bool:
        expected = self.imap.get(username.strip().lower())
        if expected is None:
            hmac.compare_digest(password.encode(), b"x" * 24)  # same work either way
            return False
        return hmac.compare_digest(password.encode(), expected.encode())

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        body = {
            "local_api_token": self.local_api_token,
            "connector": {"username": self.connector_username, "password": self.connector_password},
            "imap": self.imap,
        }
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a stale temporary file keeps its mode through O_CREAT
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def ensure(
    path: Path,
    addresses: list[str],
    connector_username: str = "edge",
    connector_password: str = "",
) -> Credentials:
    """Load the credentials file, creating whatever secret is missing (recorded in .created)."""
    creds = Credentials(path=path)
    if path.exists():
        raw = json.loads(path.read_text())
        creds.local_api_token = raw.get("local_api_token", "")
        connector = raw.get("connector", {})
        creds.connector_username = connector.get("username", connector_username)
        creds.connector_password = connector.get("password", "")
        creds.imap = {k.lower(): v for k, v in raw.get("imap", {}).items()}
    if connector_password:
        creds.connector_username = connector_username
        creds.connector_password = connector_password
    if not creds.local_api_token:
        creds.local_api_token = _new_secret("tplocal_")
        creds.created.append("local_api_token")
    if not creds.connector_password:
        creds.connector_password = _new_secret()
        creds.created.append("connector")
    for address in addresses:
        if address.lower() not in creds.imap:
            creds.imap[address.lower()] = _new_secret()
            creds.created.append(f"imap:{address.lower()}")
    if creds.created or not path.exists():
        creds.save()
    os.chmod(path, 0o600)
    return creds
