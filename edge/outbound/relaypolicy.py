"""The relay's session policy: devices submit their outbound mail; the edge signs and queues it.

A device authenticates with AUTH (PLAIN, and whatever other mechanism the SMTP server
offers) as its device id, with its device key as the password: the key must be a live key
of an authorized device (`edge.store.access.AccessStore.authenticate`) whose id is the user
name. A failure goes through the server's shared `AuthThrottle`. Only a peer inside
`[edge] relay_plaintext_networks` may authenticate without TLS; every other peer is offered
AUTH only after STARTTLS (AUTH before it: 538 5.7.11, MAIL: 530 5.7.0). MAIL without AUTH
is 530 5.7.0.

At MAIL the sender must be an address the device's account owns
(`edge.store.outbound.OutboundStore.sender_account`, answered from the store's cache
`edge.store.cache.CachedLookups` when it is fresh, on the reactor thread, else loaded in a
worker thread), checked again for every transaction (a device revoked meanwhile is refused
as soon as the cache sees it: at once for a change made through this edge, within the
cache's time to live for one made through another edge sharing the database); the null
sender and everyone else's addresses are `553 5.7.1`. Any syntactically valid recipient is
taken, within the same recipient, size, line, header and loop limits as the MX.

At the end of data, in a worker thread: the message's From and Sender header fields
(`edge.outbound.authors`: exactly one From, at most one Sender, each read unambiguously or
the message is `550 5.6.0`) must name only addresses the same account owns, by the same
rule as the envelope sender (else `550 5.7.1`). The message (without the `X-Tailpost-*`
headers and `Authentication-Results` of the edge's authserv-id it may have brought) is
DKIM-signed for each domain of its From field (d= aligned with From, as DMARC wants), the
edge's `Received:` header naming only the device ("from device <id>", never its address)
goes on top; then the message is spooled as `kind = "outbound"`, and after the spool commit
the device is recorded as the message's sender, with its resend key, in one store write;
only then is `250 2.0.0 Queued as <QID>` sent and the message handed to the delivery queue
(a failed record is logged and the message, spooled, is answered 250 all the same). A
domain whose active DKIM key cannot be used is `451 4.7.5` (logged): mail is never sent
unsigned in its place. Signing and store work never run on the reactor thread (a cache hit
is not store work).

A device's resend of a message it relayed within `edge.outbound.resend.RESEND_WINDOW` (the
same Message-ID, envelope and content: a device that crashed after the 250, or lost the
connection before reading it) is answered with the first message's `250 2.0.0 Queued as
<QID>` and spools nothing (logged). The message's resend key is stored only after the spool
commit, so a resend is never taken for a message that did not reach the spool, and before
the 250, so a device that has the 250 has a resend the relay recognises.
"""

from __future__ import annotations

import email.utils
import hmac
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from edge.checks import HeaderFilter
from edge.outbound.authors import AuthorError, TooManyFrom, authors
from edge.outbound.dkimsign import DkimSignError
from edge.outbound.resend import RESEND_WINDOW, message_id, message_key
from edge.runtime.nowlater import then
from edge.smtp import replies
from edge.smtp.address import Path
from edge.smtp.proxy import is_trusted
from edge.smtp.replies import Reply, SMTPReplyError
from edge.smtp.session import Refusal, Session
from edge.smtp.trace import header_text
from edge.spool.spool import Envelope, Spool, SpoolWriter
from edge.store import Device
from edge.store.validate import split_address

__all__ = [
    "IPNetwork",
    "RelayContext",
    "RelayHandler",
    "Signer",
    "parse_networks",
    "relay_received",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

log = Logger()

RECEIVED_HEADERS_ADDED = 1
"""How many Received headers the relay adds (`relay_received`): loop detection counts it."""


class Signer(Protocol):
    """Makes the DKIM-Signature field(s) of a message for a domain (`edge.outbound.dkimsign`):
    CRLF-terminated, to put on top of it; b"" when the domain has no active key. Blocking."""

    def sign(self, data: bytes, domain: str) -> bytes: ...


def parse_networks(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    """The networks of `[edge] relay_plaintext_networks`; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def relay_received(
    device_id: str, hostname: str, protocol: str, qid: str, tls: str | None, now: float
) -> bytes:
    """The relay's trace header (RFC 5321 §4.4): the device by its id only, never its
    address or EHLO name; the protocol of RFC 3848 and the TLS details."""
    lines = [
        f"Received: from device {header_text(device_id)}",
        f"\tby {header_text(hostname)} (tailpost) with {protocol} id {header_text(qid)}",
    ]
    if tls:
        lines.append(f"\t(using {header_text(tls)})")
    lines[-1] += f"; {email.utils.formatdate(int(now), localtime=True)}"
    return "\r\n".join(lines).encode("utf-8", "replace") + b"\r\n"


@dataclass
class RelayContext:
    """What every relay session shares: the store lookups, the signer, the spool."""

    authenticate: Callable[[str], Device | None]
    """A device key's authorized device, or None (blocking)."""
    sender_account: Callable[[str, str], str | None]
    """The device's account if it owns the address, else None (blocking)."""
    record: Callable[[str, str, str, str, datetime, str | None], None]
    """Remember (queue id, device id, account id, sender, when, resend key or None) of a
    spooled message (blocking)."""
    signer: Signer
    spool: Spool
    commit: Callable[[SpoolWriter, Envelope], defer.Deferred[None]]
    accepted: Callable[[Envelope], None]
    hostname: str
    authserv_id: str
    clock: Any
    run_blocking: Callable[..., defer.Deferred[Any]]
    plaintext_networks: Sequence[IPNetwork] = ()
    relayed_before: Callable[[str, str, datetime], str | None] | None = None
    """The queue id of a message of the device with this resend key relayed since the
    time, or None (blocking); None: resends are not recognised."""
    run_cached: Callable[..., defer.Deferred[Any]] | None = None
    """Runs a `sender_account` that may answer from a cache: at once when it can, else where
    it may block (`CachedLookups.cached_or_load`); None: through `run_blocking`."""


class RelaySink:
    """The MessageSink of one relay transaction: filter, then check the author fields, sign,
    spool and record."""

    def __init__(
        self, relay: RelayContext, writer: SpoolWriter, envelope: Envelope, received: bytes
    ) -> None:
        self.relay = relay
        self.writer = writer
        self.envelope = envelope
        self.received = received
        self.filter = HeaderFilter(relay.authserv_id)
        self.key: str | None = None
        """The message's resend key, stored once it is spooled."""
        self.message_id = ""

    def write(self, chunk: bytes) -> None:
        for line in self.filter.feed(chunk):
            self.writer.write(line)

    def abort(self) -> None:
        self.writer.abort()

    def finish(self) -> defer.Deferred[Reply]:
        for line in self.filter.finish():
            self.writer.write(line)
        d = self.relay.run_blocking(self._prepare)
        return d.addCallback(self._spool_unless_resent)

    def _spool_unless_resent(self, first: str | None) -> defer.Deferred[Reply] | Reply:
        if first is not None:
            self.writer.abort()
            env = self.envelope
            log.info(
                "relay {qid}: device {device} sent message {mid} again (queued as {first}"
                " before); not spooled again",
                qid=env.qid,
                device=env.extra["device_id"],
                mid=self.message_id,
                first=first,
            )
            return replies.S250_QUEUED.with_text(f"Queued as {first}")
        d = self.relay.commit(self.writer, self.envelope)
        return d.addCallback(self._record).addCallback(self._committed)

    def _record(self, _: object) -> defer.Deferred[None]:
        """After the commit: record the device and the resend key in one write (a failure is
        logged; the mail is spooled and is answered 250 all the same)."""
        env = self.envelope
        at = datetime.fromtimestamp(env.received_at, UTC)
        d: defer.Deferred[None] = self.relay.run_blocking(
            self.relay.record,
            env.qid,
            env.extra["device_id"],
            env.extra["account_id"],
            env.sender,
            at,
            self.key,
        )

        def failed(failure: Any) -> None:
            log.failure("relay {qid}: sender and resend key not recorded", failure, qid=env.qid)

        return d.addErrback(failed)

    def _resent(self, data: bytes) -> str | None:
        """The queue id this device's same message had within the window, or None (then
        `key` is the message's resend key, if it has one)."""
        relay, env = self.relay, self.envelope
        if relay.relayed_before is None:
            return None
        key = message_key(data, env.sender, env.recipients)
        if key is None:
            return None
        since = datetime.fromtimestamp(relay.clock.seconds() - RESEND_WINDOW, UTC)
        first = relay.relayed_before(env.extra["device_id"], key, since)
        if first is None:
            self.key = key
        else:
            self.message_id = message_id(data) or ""
        return first

    def _prepare(self) -> str | None:
        """In a worker thread: the first queue id of a resend, or (not a resend) check the
        author fields, sign for the From domains, put the edge's headers on top, and None."""
        relay, env = self.relay, self.envelope
        data = self.writer.data()
        first = self._resent(data)
        if first is not None:
            return first
        domains = self._from_domains(data)
        try:
            signature = b"".join(relay.signer.sign(data, domain) for domain in domains)
        except DkimSignError as exc:
            log.error(
                "relay {qid}: not relayed, DKIM key unusable: {reason}", qid=env.qid, reason=exc
            )
            raise SMTPReplyError(replies.S451_DKIM_KEY_UNUSABLE, str(exc)) from None
        self.writer.put_on_top(signature + self.received)
        return None

    def _from_domains(self, data: bytes) -> list[str]:
        """The domains of the From addresses, in order, once each, after checking that the
        envelope's account owns every From and Sender address (blocking)."""
        env = self.envelope
        device, account = env.extra["device_id"], env.extra["account_id"]
        try:
            found = authors(data)
        except TooManyFrom as exc:
            raise SMTPReplyError(replies.S550_TWO_FROM, f"device {device}: {exc}") from None
        except AuthorError as exc:
            reply = replies.S550_FROM_INVALID
            if exc.field == "Sender":
                reply = replies.S550_SENDER_FIELD_INVALID
            raise SMTPReplyError(reply, f"device {device}: {exc}") from None
        checks = [("From", a, replies.S550_FROM_NOT_OWNED) for a in found.from_]
        if found.sender is not None:
            checks.append(("Sender", found.sender, replies.S550_SENDER_FIELD_NOT_OWNED))
        domains: dict[str, None] = {}
        for field, address, refusal in checks:
            parts = split_address(address)
            if parts is None or self.relay.sender_account(device, address) != account:
                why = f"device {device} may not put {address} in the {field} header"
                raise SMTPReplyError(refusal, why)
            if field == "From":
                domains[parts[1]] = None
        return list(domains)

    def _committed(self, _: object) -> Reply:
        env = self.envelope
        self.relay.accepted(env)
        log.info(
            "relay {qid}: device {device} from <{sender}> to {n} recipient(s)",
            qid=env.qid,
            device=env.extra["device_id"],
            sender=env.sender,
            n=len(env.recipients),
        )
        return replies.S250_QUEUED.with_text(f"Queued as {env.qid}")


class RelayHandler:
    """Policy of one connection from a device."""

    auth_offered = True
    auth_required = True

    def __init__(self, relay: RelayContext) -> None:
        self.relay = relay
        self.device: Device | None = None
        self.account: str | None = None
        """The account that owns the current transaction's sender."""

    def connect(self, session: Session) -> None:
        session.auth_needs_tls = not is_trusted(session.peer_host, self.relay.plaintext_networks)

    def authenticate(self, session: Session, username: str, password: str) -> defer.Deferred[bool]:
        """True (now or later) when `password` is the live key of the authorized device
        whose id is `username`."""
        self.device = None
        d = self.relay.run_blocking(self.relay.authenticate, password)
        return d.addCallback(self._authenticated, username)

    def _authenticated(self, device: Device | None, username: str) -> bool:
        if device is None or not hmac.compare_digest(device.id.encode(), username.encode()):
            return False
        self.device = device
        return True

    def _device(self, session: Session) -> Device:
        device = self.device
        if device is None or session.authenticated_as != device.id:
            raise SMTPReplyError(replies.S530_AUTH_REQUIRED, "no device authenticated")
        return device

    def mail_from(self, session: Session, sender: Path) -> Refusal:
        """None once the device's account is found to own the sender (later: a Deferred);
        553 5.7.1 otherwise."""
        device = self._device(session)
        self.account = None
        if not sender.address:
            raise SMTPReplyError(
                replies.S553_SENDER_NOT_OWNED, f"device {device.id}: the null sender"
            )
        relay = self.relay
        run = relay.run_cached or relay.run_blocking
        found: defer.Deferred[str | None] = run(relay.sender_account, device.id, sender.address)
        return then(found, self._owned, device, sender)

    def _owned(self, account: str | None, device: Device, sender: Path) -> Reply | None:
        if account is None:
            why = f"device {device.id} may not send as {sender.address}"
            raise SMTPReplyError(replies.S553_SENDER_NOT_OWNED, why)
        self.account = account
        return None

    def rcpt_to(self, session: Session, recipient: Path) -> None:
        self._device(session)

    def data(self, session: Session) -> RelaySink:
        device = self._device(session)
        assert session.sender is not None and self.account is not None
        relay = self.relay
        now = relay.clock.seconds()
        writer = relay.spool.writer()
        protocol = ("ESMTP" if session.esmtp else "SMTP") + ("SA" if session.tls else "A")
        received = relay_received(device.id, relay.hostname, protocol, writer.qid, session.tls, now)
        envelope = Envelope(
            qid=writer.qid,
            sender=session.sender.address,
            recipients=list(dict.fromkeys(r.address for r in session.recipients)),
            received_at=now,
            client_ip=session.peer_host,
            helo=session.helo or "",
            kind="outbound",
            extra={"device_id": device.id, "account_id": self.account},
            smtputf8="SMTPUTF8" in session.sender.params,
        )
        return RelaySink(relay, writer, envelope, received)
