"""The edge's control-plane store: routes, addresses, devices and spam rules in SQL.

``open_store(url)`` opens (and migrates) a SQLite or PostgreSQL database and returns a
``Store``; records come back as frozen dataclasses. Nothing here talks to the network other
than the database, and nothing here may be imported by device-side code that has no database.
"""

from edge.store.errors import Conflict, NotFound
from edge.store.records import (
    Account,
    ByodAddress,
    Device,
    EmailRoute,
    ManagedAddress,
    RecipientTarget,
    SpamRule,
)
from edge.store.store import Store, open_store

__all__ = [
    "Account",
    "ByodAddress",
    "Conflict",
    "Device",
    "EmailRoute",
    "ManagedAddress",
    "NotFound",
    "RecipientTarget",
    "SpamRule",
    "Store",
    "open_store",
]
