"""The SMTP server's AUTH command (RFC 4954): PLAIN, and LOGIN where the policy offers it.

A session's policy (`SessionHandler`) offers AUTH with `auth_offered` and names its
mechanisms in `auth_mechanisms` (PLAIN alone when it names none: the edge's delivery client
picks LOGIN over PLAIN when both are offered, so a listener offers LOGIN only where mail
clients need it). PLAIN takes its response with the command or after a `334`; LOGIN asks
for the user name and then the password (`334 VXNlcm5hbWU6`, `334 UGFzc3dvcmQ6`), or takes
the user name with the command. A `*` cancels the exchange (501). The policy's
`authenticate` decides, through the factory's shared `AuthThrottle` when there is one, so a
failure is answered only after its delay; after the throttle's `per_connection` failures the
session is closed with 421 4.7.0.

This module never logs or echoes a password, and answers only with replies of
`edge.smtp.replies`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge.runtime.nowlater import then
from edge.smtp import replies
from edge.smtp.replies import Reply

if TYPE_CHECKING:
    from edge.smtp.server import SMTPServer

__all__ = ["AuthExchange", "mechanisms_of"]

MECHANISMS = ("PLAIN", "LOGIN")


def mechanisms_of(handler: Any) -> tuple[str, ...]:
    """The mechanisms a policy offers, in the order it names them (PLAIN by default)."""
    named = getattr(handler, "auth_mechanisms", ("PLAIN",))
    return tuple(m.upper() for m in named if m.upper() in MECHANISMS)


def _decode(encoded: bytes | str) -> str:
    """A base64 response as text; ValueError if it is not base64 of UTF-8."""
    try:
        return base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("not base64 of UTF-8") from exc


class AuthExchange:
    """The AUTH exchange of one session: at most one under way (`pending`)."""

    def __init__(self, server: SMTPServer) -> None:
        self.server = server
        self.pending: Callable[[str], Any] | None = None
        """What the next line answers (a continuation), while an exchange is under way."""
        self.failures = 0

    def advertised(self) -> str | None:
        """The EHLO keyword line (`AUTH PLAIN LOGIN`), or None when AUTH is not offered now."""
        server, session = self.server, self.server.session
        assert session is not None
        if not server.handler.auth_offered or session.authenticated_as is not None:
            return None
        if session.tls is None and session.auth_needs_tls:
            return None
        mechanisms = mechanisms_of(server.handler)
        return "AUTH " + " ".join(mechanisms) if mechanisms else None

    def start(self, arg: str) -> Any:
        """The AUTH command with its argument."""
        server, session = self.server, self.server.session
        assert session is not None
        if not server.handler.auth_offered or session.helo is None:
            return replies.S503_BAD_SEQUENCE
        if session.authenticated_as is not None or session.sender is not None:
            return replies.S503_BAD_SEQUENCE
        if session.tls is None and session.auth_needs_tls:
            return replies.S538_ENCRYPTION_REQUIRED
        mech, _, initial = arg.partition(" ")
        mech, initial = mech.upper(), initial.strip()
        if mech not in mechanisms_of(server.handler):
            return replies.S504_AUTH_MECH
        if mech == "PLAIN":
            if not initial:
                self.pending = self._plain
                return replies.S334_AUTH_CONTINUE
            return self._plain(initial)
        if initial:
            return self._login_user(initial)
        self.pending = self._login_user
        return replies.S334_LOGIN_USERNAME

    def continue_(self, line: bytes) -> Any:
        """The client's line while an exchange is under way."""
        step, self.pending = self.pending, None
        assert step is not None
        if line.strip() == b"*":
            return replies.S501_SYNTAX.with_text("Authentication cancelled")
        return step(line.decode("ascii", "replace").strip())

    def _plain(self, encoded: str) -> Any:
        try:
            _authzid, username, password = _decode(encoded).split("\x00")
        except ValueError:
            return replies.S501_SYNTAX.with_text("Malformed AUTH PLAIN response")
        return self._check(username, password)

    def _login_user(self, encoded: str) -> Any:
        try:
            username = _decode(encoded)
        except ValueError:
            return replies.S501_SYNTAX.with_text("Malformed AUTH LOGIN response")
        self.pending = lambda answer: self._login_password(username, answer)
        return replies.S334_LOGIN_PASSWORD

    def _login_password(self, username: str, encoded: str) -> Any:
        try:
            password = _decode(encoded)
        except ValueError:
            return replies.S501_SYNTAX.with_text("Malformed AUTH LOGIN response")
        return self._check(username, password)

    def _check(self, username: str, password: str) -> Any:
        server = self.server
        session, throttle = server.session, server.factory.auth_throttle
        assert session is not None
        authenticate = server.handler.authenticate
        ok: Any
        if throttle is None:
            ok = server._call(authenticate, session, username, password)
        else:
            ok = throttle.attempt(
                server.factory.auth_service,
                session.peer_host,
                username,
                lambda: server._call(authenticate, session, username, password),
            )
        return then(ok, self._answered, username)

    def _answered(self, ok: Any, username: str) -> Reply | None:
        server = self.server
        assert server.session is not None
        if not ok:
            self.failures += 1
            throttle = server.factory.auth_throttle
            limit = throttle.per_connection if throttle is not None else 0
            if limit and self.failures >= limit and not server._closed:
                server._send(replies.S535_AUTH_FAILED)
                server._send(replies.S421_AUTH_FAILURES)
                server._close()
                return None
            return replies.S535_AUTH_FAILED
        server.session.authenticated_as = username
        return replies.S235_AUTH_OK
