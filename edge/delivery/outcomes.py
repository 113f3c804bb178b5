"""What one delivery attempt did for each recipient: `Outcome`, made from a server's replies
(`accepted`) or from why the attempt failed (`failed`).

A recorded outcome's text is the remote server's own reply, or a named `D` reply of
`edge.smtp.replies` when the server said nothing (the network, TLS, a timeout, our side):
never an exception's text, which goes to the log only. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.logger import Logger
from twisted.mail.smtp import (
    AUTHDeclinedError,
    SMTPConnectError,
    SMTPDeliveryError,
    SMTPProtocolError,
    SMTPTimeoutError,
    TLSError,
    TLSRequiredError,
)

from edge.delivery.clientsession import LocalFailure, MailRefused, Needs8BitMIME, NeedsSMTPUTF8
from edge.smtp import replies

log = Logger()


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    code: int
    text: str
    host: str = ""
    connected: bool = True

    @property
    def final(self) -> bool:
        return self.code < 400 or self.code >= 500

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300


def _addr(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text.strip("<>")


def accepted(
    result: tuple[int, list[tuple[bytes, int, bytes]]], where: str, note: str = ""
) -> dict[str, Outcome]:
    _num_ok, addresses = result
    return {
        _addr(addr): Outcome(code, resp.decode("utf-8", "replace") + note, where)
        for addr, code, resp in addresses
    }


def failed(failure: Any, recipients: list[str], where: str) -> dict[str, Outcome]:
    err = failure.value
    if isinstance(err, (NeedsSMTPUTF8, Needs8BitMIME)):
        if isinstance(err, Needs8BitMIME):
            reply = replies.D554_NO_8BITMIME.format(where=where)
        else:
            reply = replies.D553_NO_SMTPUTF8.format(where=where)
        # Final, yet not this host's word on the message: another host may take it.
        return dict.fromkeys(recipients, Outcome(reply.code, reply.detail, where, False))
    addresses: Any = getattr(err, "addresses", None)
    code = getattr(err, "code", 0)
    # A refusal at MAIL FROM answers for the message; failing before it (connection,
    # greeting, TLS, AUTH, a 421) says nothing about the message.
    connected = isinstance(err, SMTPDeliveryError) and (
        bool(addresses) or isinstance(err, MailRefused)
    )
    if not isinstance(code, int) or not 400 <= code < 600 or not connected:
        # Failing before the recipients were even tried (connection, TLS, AUTH) says
        # nothing about the message: always worth another try, maybe at another host.
        code = 451
    said = _server_said(err)
    if said is not None:
        text = said  # the remote server's own reply
    else:
        # No reply of the server's: a named reply. Whatever else there is (an
        # exception's words, Twisted's) goes to the log, never into a report.
        log.warn("smtp: delivery to {where} failed: {error!r}", where=where, error=err)
        text = _local_reply(err).format(where=where, **getattr(err, "values", {})).detail
    outcome = Outcome(code, text, where, connected)
    outcomes = dict.fromkeys(recipients, outcome)
    if connected:
        # Recipients refused at RCPT keep their own reply; the others share the
        # transaction's final reply (a refusal at end of DATA).
        for addr, rcpt_code, rcpt_resp in addresses:
            if not 200 <= rcpt_code < 300:
                text = rcpt_resp.decode("utf-8", "replace")
                outcomes[_addr(addr)] = Outcome(rcpt_code, text, where)
    return outcomes


_SERVER_REPLIES = (SMTPDeliveryError, AUTHDeclinedError, SMTPConnectError, SMTPProtocolError)
"""The errors whose text, with a reply code, is the server's reply (a refusal, a greeting
that refuses, AUTH declined, a reply out of step)."""


def _server_said(err: BaseException) -> str | None:
    """The server's own reply that `err` carries, if it carries one."""
    code, resp = getattr(err, "code", -1), getattr(err, "resp", b"")
    if isinstance(err, LocalFailure) or not isinstance(err, _SERVER_REPLIES):
        return None
    if not isinstance(code, int) or not 400 <= code < 600:
        return None
    if not isinstance(resp, bytes) or not resp:
        return None
    return resp.decode("utf-8", "replace")


def _local_reply(err: BaseException) -> replies.Reply:
    """The named reply of a failure with no reply of the server's to show."""
    if isinstance(err, LocalFailure):
        return err.reply
    if isinstance(err, SMTPTimeoutError):
        return replies.D451_TIMED_OUT
    if isinstance(err, TLSRequiredError):
        return replies.D451_TLS_NOT_OFFERED
    if isinstance(err, TLSError | SSL.Error):
        return replies.D451_TLS_FAILED
    return replies.D451_NOT_DELIVERED
