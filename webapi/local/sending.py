"""Sending from the loopback API: `POST /mail/send` and `POST /mail/messages/{id}/reply`.

A request's body is read, hashed and parsed in a worker thread (with attachments it may be
tens of megabytes), validated (`webapi.local.models`), turned into a message by the device's
core (`connector.outbound.compose`) and handed to the outbound queue; the reply
`{"status": "ok", "message_id": ...}` goes out only once the queue's `submit` fired, that
is once the message is on disk. An `Idempotency-Key` makes a retried request send once
(`webapi.idempotency`, keys kept in the device's own file). The sender must be one of the
device's addresses. This module must never do blocking work on the reactor thread, never
answer before the queue has the message, and never let a client send as an address the
device does not own.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from email.headerregistry import Address
from typing import IO, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from connector.outbound.compose import (
    MAX_ATTACHMENT_BYTES,
    Attachment,
    Composed,
    ComposeError,
    Draft,
    check_content_type,
    check_message_id,
    compose,
    parse_addresses,
    reply_plan,
)
from webapi.errors import APIError
from webapi.idempotency import Idempotency, KeyStore, body_digest
from webapi.jsonbody import parse_json, require_json, too_large
from webapi.local import models as m
from webapi.local.mail import LocalMail

__all__ = ["SEND_MAX_BODY", "Sending", "Submitter"]

SEND_MAX_BODY = 40 * 1024 * 1024
"""The largest body of a send or reply request: 25 MiB of attachments in base64 (about
33.4 MiB) and the text around them."""
SCOPE = "localapi"
SOURCE = "localapi"
_WHITESPACE = b" \t\r\n"
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


class Submitter(Protocol):
    """The device's outbound queue (`connector.outbound.queue.OutboundQueue`): `submit`
    fires with the queued item (`.id`, `.message_id`) once the message is on disk."""

    def submit(
        self,
        sender: str,
        recipients: list[str],
        data: bytes,
        *,
        source: str,
        subject: str = "",
        message_id: str = "",
    ) -> Deferred[Any]: ...


def _invalid(code: str, message: str, action: str = "fix_request_body") -> APIError:
    return APIError(400, code, message, action)


def _from_compose(error: ComposeError) -> APIError:
    if error.code == "attachments_too_large":
        return APIError(413, error.code, error.message, "send_smaller_attachments")
    return _invalid(error.code, error.message)


def _read(content: IO[bytes] | None, limit: int) -> tuple[bytes, str]:
    """The body's bytes and their digest (blocking: a worker thread's job)."""
    if content is None:
        return b"", body_digest(b"")
    if content.seek(0, 2) > limit:
        raise too_large()
    content.seek(0, 0)
    raw = content.read(limit + 1)
    return raw, body_digest(raw)


def _attachments(items: Sequence[m.AttachmentIn]) -> list[Attachment]:
    out: list[Attachment] = []
    total = 0
    for i, item in enumerate(items):
        try:
            check_content_type(item.content_type)
        except ComposeError as error:
            raise _invalid("invalid_attachment", f"attachments[{i}]: {error.message}") from None
        encoded = item.content_base64.encode("ascii", "replace").translate(None, _WHITESPACE)
        if (len(encoded) // 4) * 3 > MAX_ATTACHMENT_BYTES + 3:
            raise _from_compose(ComposeError("attachments_too_large", "over 25 MiB"))
        try:
            if len(encoded) % 4 or not _BASE64.fullmatch(encoded):
                raise ValueError("not base64")
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(
                "invalid_attachment", f"attachments[{i}]: content_base64 is not base64"
            ) from None
        total += len(data)
        if total > MAX_ATTACHMENT_BYTES:
            raise _from_compose(
                ComposeError("attachments_too_large", "the attachments exceed 25 MiB together")
            )
        out.append(Attachment(item.filename, item.content_type, data))
    return out


def _references(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    ids = value.split() if isinstance(value, str) else value
    return [check_message_id("references", i) for i in ids]


def _object(raw: bytes) -> dict[str, Any]:
    value = parse_json(raw)
    if not isinstance(value, dict):
        raise APIError(400, "invalid_json", "the body must be a JSON object", "send_a_json_object")
    return value


class Sending:
    """The send and reply operations of one device's API."""

    def __init__(
        self,
        queue: Submitter,
        keys: KeyStore,
        mail: LocalMail,
        *,
        addresses: Callable[[], Sequence[str]],
        default_address: Callable[[], str],
        now: Callable[[], float],
        run_blocking: Callable[..., Deferred[Any]],
        max_body: int = SEND_MAX_BODY,
        max_message: int = 36 * 1024 * 1024,
    ) -> None:
        """`max_message`: the largest message the device sends (`[device] max_send_size`,
        within what its edge's relay takes); a larger one is refused here, not queued."""
        self.queue = queue
        self.max_message = max_message
        self.idempotency = Idempotency(keys, run_blocking)
        self.mail = mail
        self._addresses = addresses
        self._default = default_address
        self._now = now
        self._run = run_blocking
        self.max_body = max_body

    # -- the two operations ------------------------------------------------------------------

    def send(self, request: IRequest) -> Deferred[bytes]:
        return self._handle(request, self._prepare_send)

    def reply(self, request: IRequest, mailbox: str, ref: str, kind: str) -> Deferred[bytes]:
        return self._handle(request, lambda raw: self._prepare_reply(raw, mailbox, ref, kind))

    def _handle(self, request: IRequest, prepare: Callable[[bytes], Composed]) -> Deferred[bytes]:
        require_json(request)
        Idempotency.key_of(request)  # a malformed key is refused before anything runs
        read: Deferred[tuple[bytes, str]] = self._run(_read, request.content, self.max_body)

        def run(body: tuple[bytes, str]) -> Deferred[bytes]:
            raw, digest = body

            def produce() -> Deferred[tuple[int, Any]]:
                built: Deferred[Composed] = self._run(prepare, raw)
                return built.addCallback(self._submit)

            return self.idempotency.handle_digest(request, SCOPE, digest, produce)

        return read.addCallback(run)

    def _submit(self, composed: Composed) -> Deferred[tuple[int, Any]]:
        if len(composed.data) > self.max_message:
            # Attachments grow by a third in base64: 25 MiB of them do not fit a 25 MiB limit.
            raise APIError(
                413,
                "message_too_large",
                f"the message is {len(composed.data)} octets once encoded, over the "
                f"{self.max_message} this device sends",
                "send_smaller_attachments",
            )
        d = self.queue.submit(
            composed.sender,
            composed.recipients,
            composed.data,
            source=SOURCE,
            subject=composed.subject,
            message_id=composed.message_id,
        )

        def answer(item: Any) -> tuple[int, Any]:
            message_id = getattr(item, "message_id", "") or composed.message_id
            body = {"status": "ok", "message_id": message_id}
            item_id = getattr(item, "id", "")
            if item_id:
                body["proxy_message_id"] = item_id
            return 200, body

        def refused(failure: Failure) -> Failure:
            failure.trap(ValueError)  # the queue's own checks of the envelope
            raise _invalid("invalid_message", f"the queue refused the message: {failure.value}")

        return d.addCallbacks(answer, refused)

    # -- building the message (worker thread) ------------------------------------------------

    def _sender(self, given: str | None, preferred: str = "") -> Address:
        own = {a.lower() for a in self._addresses()}
        if given is None:
            chosen = preferred or self._default()
            if chosen:
                return Address(addr_spec=chosen)
            if own:
                raise APIError(
                    422,
                    "from_required",
                    "this device has several addresses and no default; say which in from",
                    "pass_from",
                )
            raise APIError(
                422,
                "no_sender_address",
                "this device has no address to send from",
                "assign_an_address_to_the_device",
            )
        found = parse_addresses("from", given)
        if len(found) != 1:
            raise _invalid("invalid_address", "from: give exactly one address")
        if found[0].addr_spec.lower() not in own:
            raise APIError(
                403,
                "sender_not_owned",
                "this device does not own the from address",
                "use_an_address_from_status",
            )
        return found[0]

    def _prepare_send(self, raw: bytes) -> Composed:
        body = m.SendBody.model_validate(_object(raw))
        try:
            sender = self._sender(body.from_)
            to = parse_addresses("to", body.to)
            if not to:
                raise ComposeError("recipients_required", "to: at least one address is required")
            draft = Draft(
                sender=sender,
                to=to,
                cc=parse_addresses("cc", body.cc),
                bcc=parse_addresses("bcc", body.bcc),
                subject=body.subject,
                text=body.body_text,
                html=body.body_html,
                attachments=_attachments(body.attachments),
                in_reply_to=(
                    check_message_id("in_reply_to", body.in_reply_to) if body.in_reply_to else ""
                ),
                references=_references(body.references),
            )
            return compose(draft, now=self._now())
        except ComposeError as error:
            raise _from_compose(error) from None

    def _prepare_reply(self, raw: bytes, mailbox: str, ref: str, kind: str) -> Composed:
        body = m.ReplyBody.model_validate(_object(raw))
        original = self.mail.resolve(mailbox, ref, kind).data
        plan = reply_plan(original, list(self._addresses()), reply_all=body.reply_all)
        if not plan.to:
            raise APIError(
                422,
                "no_reply_recipient",
                "the message has no address to reply to",
                "use_mail_send",
            )
        try:
            draft = Draft(
                sender=self._sender(None, plan.own_address),
                to=plan.to,
                cc=plan.cc,
                subject=plan.subject,
                text=body.body_text,
                html=body.body_html,
                attachments=_attachments(body.attachments),
                in_reply_to=plan.in_reply_to,
                references=plan.references,
            )
            return compose(draft, now=self._now())
        except ComposeError as error:
            raise _from_compose(error) from None
