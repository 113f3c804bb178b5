"""IMAP server over the device's Maildir (for mail clients on the device's network).

`make_imap_factory` is the only entry point other packages use. This package must never
let a client name reach the filesystem unvalidated; the maildir package enforces that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.protocol import Factory, ServerFactory
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials

from connector.collector import WHOLE, CollectorPause
from edge.auththrottle import AuthThrottle
from maildir import Maildir
from maildir.lineends import LineEndCache

from .auth import ClientPortal, make_portal
from .fieldcache import FieldCache
from .limits import DEFAULT_PER_ADDRESS, DEFAULT_PER_USER, SessionLimits
from .server import DEFAULT_MAX_MESSAGE, IMAPServer

__all__ = ["make_imap_factory", "IMAPServer", "IMAPFactory", "SessionLimits"]


class IMAPFactory(ServerFactory):
    """Builds one IMAPServer per connection, all sharing the Maildir and the portal."""

    protocol = IMAPServer

    def __init__(
        self,
        maildir: Maildir,
        authenticate: Callable[[str, str], bool],
        hostname: str,
        max_message_size: int,
        throttle: AuthThrottle | None = None,
        limits: SessionLimits | None = None,
        pause: CollectorPause = WHOLE,
    ) -> None:
        self.maildir = maildir
        self.pause = pause
        """Held by a command over a whole folder (`connector.collector`)."""
        self.limits = limits if limits is not None else SessionLimits()
        self.line_ends = LineEndCache()
        """Served sizes of messages, shared by the sessions (see `maildir.lineends`)."""
        self.portal = make_portal(maildir, authenticate, self.line_ends, throttle)
        self.throttle = throttle
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.sessions: set[IMAPServer] = set()
        self.field_cache = FieldCache()

    def buildProtocol(self, addr: Any) -> IMAPServer:
        p = IMAPServer(chal={b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials})
        p.factory = self
        host = str(getattr(addr, "host", "unknown"))
        p.portal = ClientPortal(self.portal, host, self.throttle)
        p.peer_host = host
        p.limits = self.limits
        p.max_message_size = self.max_message_size
        p.IDENT = b"tailpost IMAP4rev1 ready on " + self.hostname.encode("ascii", "replace")
        self.sessions.add(p)
        return p

    def notify_changed(self, folders: Iterable[str]) -> None:
        """Tell sessions idling in one of `folders` what changed now, not at the next poll."""
        names = set(folders)
        for session in list(self.sessions):
            session.folder_changed(names)


def make_imap_factory(
    maildir: Maildir,
    authenticate: Callable[[str, str], bool],
    *,
    hostname: str = "localhost",
    max_message_size: int = DEFAULT_MAX_MESSAGE,
    throttle: AuthThrottle | None = None,
    max_sessions_per_user: int = DEFAULT_PER_USER,
    max_sessions_per_address: int = DEFAULT_PER_ADDRESS,
    pause: CollectorPause = WHOLE,
) -> Factory:
    """A factory for IMAP connections to `maildir`, with logins checked by `authenticate`
    (failures delayed by `throttle`) and concurrent sessions limited per user and per
    client address (0: no limit). `pause` is the process's collector pause
    (`connector.collector.for_process`)."""
    limits = SessionLimits(max_sessions_per_user, max_sessions_per_address)
    return IMAPFactory(maildir, authenticate, hostname, max_message_size, throttle, limits, pause)
