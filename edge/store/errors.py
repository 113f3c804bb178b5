"""Errors the store raises for requests that cannot be carried out as asked.

``Conflict``: the name, address or id is already taken (HTTP 409). ``NotFound``: a referenced
record does not exist (HTTP 404). ``ServedHere``: a block rule would cover mail of a domain
or address the account or the edge itself serves (HTTP 409). Bad values raise the built-in ``ValueError`` (HTTP 400).
This module must never import the database layer.
"""

from __future__ import annotations


class Conflict(Exception):
    """The record would clash with an existing one (a taken address, domain or id)."""


class NotFound(Exception):
    """A record the request refers to does not exist."""


class ServedHere(Exception):
    """A block rule would cover a domain (or an own address) the account or the edge serves."""
