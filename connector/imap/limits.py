"""Concurrent IMAP sessions per client address and per user.

A connection takes a place for its address when it is made (refused past
`per_address`: the server says `* BYE` and closes it); a login takes a place for its user
(refused past `per_user`: `NO [LIMIT]`, RFC 5530). The server gives both back when the
connection ends, however it ends. A limit of 0 means none. This module only counts: it
must never touch a connection.
"""

from __future__ import annotations

from collections import Counter

DEFAULT_PER_USER = 20
DEFAULT_PER_ADDRESS = 50


class SessionLimits:
    """Counts of open sessions by client address and by user (lower-cased)."""

    def __init__(
        self, per_user: int = DEFAULT_PER_USER, per_address: int = DEFAULT_PER_ADDRESS
    ) -> None:
        self.per_user = per_user
        self.per_address = per_address
        self.addresses: Counter[str] = Counter()
        self.users: Counter[str] = Counter()

    def open_address(self, address: str) -> bool:
        """Take a place for a connection from `address`; False if it is full."""
        if self.per_address and self.addresses[address] >= self.per_address:
            return False
        self.addresses[address] += 1
        return True

    def close_address(self, address: str) -> None:
        _release(self.addresses, address)

    def open_user(self, user: str) -> bool:
        """Take a place for a session of `user`; False if it is full."""
        key = user.lower()
        if self.per_user and self.users[key] >= self.per_user:
            return False
        self.users[key] += 1
        return True

    def close_user(self, user: str) -> None:
        _release(self.users, user.lower())


def _release(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]
