"""IMAP authentication: a twisted.cred checker around the device's password callback.

The checker never logs or echoes a password, and any exception in the callback is a
failed login, not a server error shown to the client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail.imap4 import IAccount
from zope.interface import implementer

from maildir import Maildir
from maildir.lineends import LineEndCache

from .mailbox import MaildirAccount

log = Logger()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


@implementer(ICredentialsChecker)
class CallbackChecker:
    """Accepts username/password credentials for which `authenticate` returns True."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, authenticate: Callable[[str, str], bool]) -> None:
        self.authenticate = authenticate

    def requestAvatarId(self, creds: Any) -> defer.Deferred[Any]:
        try:
            username = _text(creds.username)
            password = _text(creds.password)
            ok = bool(username) and self.authenticate(username, password) is True
        except UnicodeDecodeError:
            ok = False
        except Exception:
            log.failure("authentication callback failed")
            ok = False
        if ok:
            return defer.succeed(username)
        return defer.fail(error.UnauthorizedLogin())


@implementer(IRealm)
class MaildirRealm:
    """Every authenticated user gets the device's single Maildir."""

    def __init__(self, maildir: Maildir, line_ends: LineEndCache | None = None) -> None:
        self.maildir = maildir
        self.line_ends = line_ends

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        if IAccount not in interfaces:
            raise NotImplementedError("only IAccount avatars are available")
        return IAccount, MaildirAccount(self.maildir, self.line_ends), lambda: None


def make_portal(
    maildir: Maildir,
    authenticate: Callable[[str, str], bool],
    line_ends: LineEndCache | None = None,
) -> Portal:
    return Portal(MaildirRealm(maildir, line_ends), [CallbackChecker(authenticate)])
