"""IMAP authentication: a twisted.cred checker around the device's password callback, with
failed logins delayed by the device's `AuthThrottle`.

Each connection gets its own `ClientPortal`: it hands the client's address to the checker
with the credentials, runs the connection's logins one at a time (a client pipelining
LOGIN commands gains nothing), and after `AuthThrottle.per_connection` failures refuses
further logins on that connection without checking them. The checker asks the throttle to
run the password callback and answers after the throttle's delay (a Deferred), so a
failure's delay never blocks the reactor.

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
from twisted.python.failure import Failure
from zope.interface import implementer

from edge.auththrottle import AuthThrottle
from maildir import Maildir
from maildir.lineends import LineEndCache

from .mailbox import MaildirAccount

log = Logger()

SERVICE = "imap"
"""The service the throttle's log lines name."""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


@implementer(credentials.IUsernamePassword)
class ClientCredentials:
    """Username/password credentials and the address of the client that sent them."""

    def __init__(self, creds: Any, rhost: str) -> None:
        self.creds = creds
        self.rhost = rhost

    @property
    def username(self) -> Any:
        return self.creds.username

    @property
    def password(self) -> Any:
        return self.creds.password

    def checkPassword(self, password: Any) -> bool:
        return bool(self.creds.checkPassword(password))


@implementer(ICredentialsChecker)
class CallbackChecker:
    """Accepts username/password credentials for which `authenticate` returns True; with a
    throttle, through it (a failure answers after its delay)."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(
        self, authenticate: Callable[[str, str], bool], throttle: AuthThrottle | None = None
    ) -> None:
        self.authenticate = authenticate
        self.throttle = throttle

    def requestAvatarId(self, creds: Any) -> defer.Deferred[Any]:
        try:
            username = _text(creds.username)
            password = _text(creds.password)
        except UnicodeDecodeError:
            username, password = _readable(creds.username), None
        if self.throttle is None:
            ok: Any = self._check(username, password)
        else:
            rhost = getattr(creds, "rhost", "unknown")
            ok = self.throttle.attempt(
                SERVICE, rhost, username, lambda: self._check(username, password)
            )
        return defer.maybeDeferred(lambda: ok).addCallback(self._answer, username)

    def _check(self, username: str, password: str | None) -> bool:
        if not username or password is None:
            return False
        try:
            return self.authenticate(username, password) is True
        except Exception:
            log.failure("authentication callback failed")
            return False

    @staticmethod
    def _answer(ok: bool, username: str) -> str:
        if not ok:
            raise error.UnauthorizedLogin()
        return username


def _readable(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ClientPortal:
    """`portal` as one connection from `rhost` sees it (see the module's docstring)."""

    def __init__(self, portal: Portal, rhost: str, throttle: AuthThrottle | None) -> None:
        self.portal = portal
        self.rhost = rhost
        self.limit = throttle.per_connection if throttle is not None else 0
        self.failures = 0
        self.waiting = 0
        self._one_at_a_time = defer.DeferredLock()

    def login(self, creds: Any, mind: Any, *interfaces: Any) -> defer.Deferred[Any]:
        if self.limit and self.failures + self.waiting >= self.limit:
            return defer.fail(error.UnauthorizedLogin())
        if credentials.IUsernamePassword.providedBy(creds):
            creds = ClientCredentials(creds, self.rhost)
        self.waiting += 1
        d = self._one_at_a_time.run(self.portal.login, creds, mind, *interfaces)
        return d.addBoth(self._done)

    def _done(self, result: Any) -> Any:
        self.waiting -= 1
        if isinstance(result, Failure) and result.check(error.UnauthorizedLogin):
            self.failures += 1
        return result


@implementer(IRealm)
class MaildirRealm:
    """Every authenticated user gets the device's single Maildir."""

    def __init__(self, maildir: Maildir, line_ends: LineEndCache | None = None) -> None:
        self.maildir = maildir
        self.line_ends = line_ends

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        if IAccount not in interfaces:
            raise NotImplementedError("only IAccount avatars are available")
        user = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) else avatarId
        return IAccount, MaildirAccount(self.maildir, self.line_ends, str(user)), lambda: None


def make_portal(
    maildir: Maildir,
    authenticate: Callable[[str, str], bool],
    line_ends: LineEndCache | None = None,
    throttle: AuthThrottle | None = None,
) -> Portal:
    return Portal(MaildirRealm(maildir, line_ends), [CallbackChecker(authenticate, throttle)])
