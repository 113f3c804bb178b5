"""The device's loopback HTTP API (`/localapi/v0/...`): its mail, its status, its events.

A Klein app whose state lives on a `LocalAPI` instance; routes are thin: they validate
(`webapi.local.models`), run the Maildir work in a thread (`webapi.local.mail`), and shape the
reply. Sending and replying are `webapi.local.sending`'s; the inbound and outbound event logs
are served by the same code (`webapi.local.events`). Every request passes the `RequestGuard`
(loopback Host, token, body size) before a route runs; every error leaves through
`webapi.errors`. Changes made here are announced through
`on_change` so IMAP clients in IDLE hear of them at once. This module must never build a
path itself, run Maildir work on the reactor thread, or serve an attachment with a type a
browser would execute.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.routing import BaseConverter

from connector.collector import WHOLE, CollectorPause
from connector.events import InboundEvents, iso_time
from connector.mailservice import LinkState, MailService
from maildir import Maildir, MessageNotFound
from maildir.message import AttachmentInfo, from_address, read_header
from webapi.errors import APIError, failure_reply, json_reply, set_common_headers
from webapi.idempotency import KeyStore
from webapi.local import models as m
from webapi.local.auth import RequestGuard
from webapi.local.device import DeviceInfo, autoconfig_xml, client_config, pick_address, status_body
from webapi.local.downloads import content_disposition, served_content_type
from webapi.local.events import (
    EventSource,
    EventStream,
    event_item,
    last_event_id,
    outbound_item,
    recent_items,
)
from webapi.local.mail import INBOX, JUNK, Links, LocalMail, Resolved, SummaryCache
from webapi.local.openapi import local_document
from webapi.local.sending import SEND_MAX_BODY, Sending, Submitter
from webapi.local.spam import RULES_PATH, EdgeRequester, RspamdTrainer, edge_call, rule_body
from webapi.local.spamblock import BlockChoice, SenderBlocker

__all__ = [
    "MAX_BODY",
    "SEND_MAX_BODY",
    "LocalAPI",
    "RunBlocking",
    "content_disposition",
    "served_content_type",
]

RunBlocking = Callable[..., "Deferred[Any]"]

API = "/localapi/v0"
PREFIX = f"{API}/mail"
MAX_BODY = 1 << 20  # the largest request body of a route but send and reply (SEND_MAX_BODY)


class _RefConverter(BaseConverter):
    """A message reference: anything non-empty, slashes included, so the id validator (not
    the router) decides, and "/", "//" and ".." in an id get a 400 rather than a redirect."""

    regex = ".+?"
    part_isolating = False


_ACTIONS = frozenset({"mark", "report-spam", "report-ham", "reply"})


def _message_ref(ref: str) -> str:
    """Classify `ref`; ".../mark" and the like reached with GET or DELETE get a 405."""
    head, _, action = ref.rpartition("/")
    if head and action in _ACTIONS:
        raise APIError(
            405,
            "method_not_allowed",
            "method not allowed for this endpoint",
            "use_an_allowed_method",
            {b"Allow": b"POST"},
        )
    return m.check_message_ref(ref)


def _sends(path: bytes) -> int | None:
    """The larger body cap of the send and reply paths (attachments); None elsewhere."""
    if path == f"{PREFIX}/send".encode() or (
        path.startswith(f"{PREFIX}/messages/".encode()) and path.endswith(b"/reply")
    ):
        return SEND_MAX_BODY
    return None


def _code(reply: Any) -> str:
    return str(reply.get("code", "")) if isinstance(reply, dict) else ""


def _message(reply: Any) -> str:
    return str(reply.get("error", ""))[:300] if isinstance(reply, dict) else ""


def _index(index: str) -> int:
    if not re.fullmatch(r"[0-9]{1,4}", index):
        raise APIError(404, "attachment_not_found", "no such attachment", "check_attachments")
    return int(index)


class LocalAPI:
    """The `/localapi/v0` Klein app over one device's Maildir, events and services."""

    app = Klein()
    app.url_map.merge_slashes = False
    app.url_map.converters["ref"] = _RefConverter

    def __init__(
        self,
        maildir: Maildir,
        token: str,
        *,
        base_url: str = "http://127.0.0.1:18080",
        max_body: int = MAX_BODY,
        run_blocking: RunBlocking = deferToThread,
        events: InboundEvents | None = None,
        mail_service: MailService | None = None,
        link: LinkState | None = None,
        device: DeviceInfo | None = None,
        edge: EdgeRequester | None = None,
        trainer: RspamdTrainer | None = None,
        clock: IReactorTime | None = None,
        on_change: Callable[[Sequence[str]], None] | None = None,
        cache: SummaryCache | None = None,
        pause: CollectorPause = WHOLE,
        outbound_queue: Submitter | None = None,
        send_keys: KeyStore | None = None,
        outbound_events: EventSource | None = None,
        max_message_size: int = 36 * 1024 * 1024,
    ) -> None:
        """`pause` is the process's collector pause (`connector.collector.for_process`)."""
        if not token:
            raise ValueError("the local API needs a non-empty token")
        if clock is None:
            from twisted.internet import reactor

            clock = reactor  # type: ignore[assignment]
        assert clock is not None
        self._token = token.encode("utf-8")
        self._max_body = max_body
        self._run = run_blocking
        self.links = Links(base_url)
        self.mail = LocalMail(maildir, self.links, cache, pause)
        self.events = events
        self.mail_service = mail_service
        self.link = link if link is not None else LinkState(clock.seconds)
        self.device = device if device is not None else DeviceInfo("localhost")
        self.edge = edge
        self.trainer = trainer
        self.blocker = SenderBlocker(lambda: self.device.addresses)
        self.clock = clock
        self._on_change = on_change
        self._openapi: dict[str, Any] | None = None
        self.outbound_events = outbound_events
        self.sending: Sending | None = None
        if outbound_queue is not None:
            if send_keys is None:
                raise ValueError("sending needs a store for Idempotency-Key")
            self.sending = Sending(
                outbound_queue,
                send_keys,
                self.mail,
                addresses=lambda: self.device.addresses,
                default_address=self._default_address,
                now=clock.seconds,
                run_blocking=run_blocking,
                max_message=max_message_size,
            )

    def _default_address(self) -> str:
        """The sender when a request names none: the configured default, else the only one."""
        if self.device.default_address:
            return self.device.default_address
        return self.device.addresses[0] if len(self.device.addresses) == 1 else ""

    @property
    def base_url(self) -> str:
        return self.links.base

    @base_url.setter
    def base_url(self, value: str) -> None:
        self.links.base = value.rstrip("/")

    def resource(self) -> IResource:
        """The resource to serve: the app behind the request guard."""
        inner: IResource = self.app.resource()
        return RequestGuard(inner, self._token, self._max_body, _sends)

    @app.handle_errors(Exception)  # the single place errors become replies
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return failure_reply(request, failure)

    def _changed(self, *folders: str) -> None:
        if self._on_change is not None:
            self._on_change(folders)

    # -- device and service ------------------------------------------------------------------

    @app.route(f"{API}/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        m.parse_query(request, m.Empty)
        last = self.link.last_seen
        mail_status = self.mail_service.status if self.mail_service else "enabled"
        body = status_body(
            self.device,
            mail_status=mail_status,
            link_status=self.link.status,
            last_seen=iso_time(last) if last is not None else None,
            api_base=self.links.base,
        )
        return json_reply(request, body)

    def _service(self) -> MailService:
        if self.mail_service is None:
            raise APIError(501, "not_supported", "mail services cannot be switched here", "none")
        return self.mail_service

    @app.route(f"{PREFIX}/enable", methods=["POST"])
    async def enable(self, request: IRequest) -> bytes:
        m.parse_query(request, m.Empty)
        changed = await self._service().enable()
        text = "Managed mail services enabled." if changed else "Mail services were enabled."
        return json_reply(request, {"status": "ok", "message": text, "mail": "enabled"})

    @app.route(f"{PREFIX}/disable", methods=["POST"])
    async def disable(self, request: IRequest) -> bytes:
        m.parse_query(request, m.Empty)
        changed = await self._service().disable()
        text = "Managed mail services disabled." if changed else "Mail services were disabled."
        return json_reply(request, {"status": "ok", "message": text, "mail": "disabled"})

    def _require_enabled(self) -> None:
        if self.mail_service is not None and not self.mail_service.enabled:
            raise APIError(409, "mail_disabled", "local mail is disabled", "post_mail_enable")

    @app.route(f"{PREFIX}/client-config", methods=["GET"])
    def client_config(self, request: IRequest) -> bytes:
        query = m.parse_query(request, m.ClientConfigQuery)
        self._require_enabled()
        address = pick_address(self.device, query.address or query.emailaddress)
        return json_reply(request, client_config(self.device, address, self.links.base))

    @app.route(f"{PREFIX}/autoconfig.xml", methods=["GET"])
    def autoconfig(self, request: IRequest) -> bytes:
        query = m.parse_query(request, m.ClientConfigQuery)
        self._require_enabled()
        wanted = query.address or query.emailaddress
        if wanted is not None:
            pick_address(self.device, wanted)
        request.setResponseCode(200)
        set_common_headers(request)
        request.setHeader(b"Content-Type", b"application/xml; charset=utf-8")
        return autoconfig_xml(self.device, wanted)

    # -- reading -----------------------------------------------------------------------------

    @app.route(f"{PREFIX}/messages", methods=["GET"])
    async def list_messages(self, request: IRequest) -> bytes:
        query = m.parse_query(request, m.ListQuery)
        return json_reply(request, await self._run(self.mail.list, query))

    @app.route(f"{PREFIX}/messages/<ref:ref>", methods=["GET"])
    async def get_message(self, request: IRequest, ref: str) -> bytes:
        query = m.parse_query(request, m.DetailQuery)
        kind = _message_ref(ref)
        body = await self._run(
            self.mail.detail, query.mailbox, ref, kind, query.html, query.remote_images
        )
        return json_reply(request, body)

    @app.route(f"{PREFIX}/messages/<ref:ref>/attachments/<index>", methods=["GET"])
    async def get_attachment(self, request: IRequest, ref: str, index: str) -> bytes:
        query = m.parse_query(request, m.AttachmentQuery)
        kind = m.check_message_ref(ref)
        number = _index(index)
        info, content = await self._run(self.mail.attachment, query.mailbox, ref, kind, number)
        return self._send_attachment(request, query.download, info, content)

    @staticmethod
    def _send_attachment(
        request: IRequest, download: bool, info: AttachmentInfo, content: bytes
    ) -> bytes:
        request.setResponseCode(200)
        set_common_headers(request)
        request.setHeader(b"Content-Type", served_content_type(info.content_type))
        disposition = "attachment" if download else "inline"
        request.setHeader(b"Content-Disposition", content_disposition(disposition, info.filename))
        request.setHeader(b"Content-Security-Policy", b"default-src 'none'; sandbox")
        return content

    # -- changes -----------------------------------------------------------------------------

    @app.route(f"{PREFIX}/messages/<ref:ref>", methods=["DELETE"])
    async def delete_message(self, request: IRequest, ref: str) -> bytes:
        query = m.parse_query(request, m.MessageQuery)
        kind = _message_ref(ref)
        body = await self._run(self.mail.delete, query.mailbox, ref, kind)
        self._changed(query.mailbox, *([body["mailbox"]] if "mailbox" in body else []))
        return json_reply(request, body)

    @app.route(f"{PREFIX}/messages/<ref:ref>/mark", methods=["POST"])
    async def mark_message(self, request: IRequest, ref: str) -> bytes:
        query = m.parse_query(request, m.MessageQuery)
        kind = m.check_message_ref(ref)
        mark = m.parse_body(request, m.MarkBody)
        body = await self._run(self.mail.mark, query.mailbox, ref, kind, mark.read)
        self._changed(query.mailbox)
        return json_reply(request, body)

    def _move(self, mailboxes: Sequence[str], ref: str, kind: str, dest: str) -> Resolved:
        """Find the message in the first of `mailboxes` that has it and move it to `dest`."""
        for i, mailbox in enumerate(mailboxes):
            try:
                found = self.mail.resolve(mailbox, ref, kind)
            except MessageNotFound:
                if i == len(mailboxes) - 1:
                    raise
                continue
            info = self.mail.move(found, dest)
            return Resolved(self.mail.maildir.folder(dest), info, found.data)
        raise MessageNotFound(ref)  # pragma: no cover

    @app.route(f"{PREFIX}/messages/<ref:ref>/report-spam", methods=["POST"])
    async def report_spam(self, request: IRequest, ref: str) -> bytes:
        query = m.parse_query(request, m.SpamQuery)
        kind = m.check_message_ref(ref)
        body = m.parse_body(request, m.SpamBody, optional=True)
        block_domain = body.block_domain or bool(query.block_domain)
        moved: Resolved = await self._run(self._move, [query.mailbox], ref, kind, JUNK)
        self._changed(query.mailbox, JUNK)
        warnings: list[str] = []
        rule, blocked = await self._block_sender(moved, block_domain, warnings)
        trained = await self._train("spam", moved.data, warnings)
        return json_reply(
            request,
            self._report(moved, warnings, rule=rule, blocked=blocked, trained=trained),
        )

    @app.route(f"{PREFIX}/messages/<ref:ref>/report-ham", methods=["POST"])
    async def report_ham(self, request: IRequest, ref: str) -> bytes:
        query = m.parse_query(request, m.MessageQuery)
        kind = m.check_message_ref(ref)
        m.parse_body(request, m.Empty, optional=True)
        where = [query.mailbox] if "mailbox" in query.model_fields_set else [JUNK, INBOX]
        moved: Resolved = await self._run(self._move, where, ref, kind, INBOX)
        self._changed(*where)
        warnings: list[str] = []
        trained = await self._train("ham", moved.data, warnings)
        return json_reply(request, self._report(moved, warnings, trained=trained))

    @staticmethod
    def _report(moved: Resolved, warnings: list[str], **extra: Any) -> dict[str, Any]:
        return {
            "status": "partial" if warnings else "ok",
            "id": moved.info.id,
            "mailbox": moved.info.folder,
            **extra,
            "warnings": warnings,
        }

    async def _block_sender(
        self, moved: Resolved, block_domain: bool, warnings: list[str]
    ) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
        """Ask the edge for the block rule `webapi.local.spamblock` chooses: the rule the edge
        made and what it blocks, or (None, None) with the reason among `warnings`."""
        sender = from_address(moved.data)
        if not sender:
            warnings.append("the message has no From address; no block rule was made")
            return None, None
        choice = self.blocker.choose(sender, block_domain, moved.data)
        if choice.reason:
            warnings.append(choice.reason)
        if not choice.kind:
            return None, None
        source = read_header(moved.data, "X-Tailpost-Queue-ID") or moved.info.id
        status, reply = await self._ask_for_rule(choice, source, warnings)
        if status == 409 and choice.kind == "domain" and _code(reply) == "served_domain":
            # The edge serves that domain (another of the account's routes, its managed
            # domain): the address alone, then.
            warnings.append(f"the edge refused to block {choice.value}: {_message(reply)}")
            choice = BlockChoice("sender", sender, "served_domain")
            status, reply = await self._ask_for_rule(choice, source, warnings)
        if status not in (200, 201):
            if status:
                detail = f": {_message(reply)}" if _message(reply) else ""
                warnings.append(f"the edge refused the block rule (HTTP {status}){detail}")
            return None, None
        self.link.touch()
        return (reply if isinstance(reply, dict) else None), choice.to_dict()

    async def _ask_for_rule(
        self, choice: BlockChoice, source: str, warnings: list[str]
    ) -> tuple[int, Any]:
        """POST the rule to the edge: (status, reply), or (0, None) with a warning."""
        body = rule_body(choice.kind, choice.value, source)
        try:
            return await edge_call(self.edge, "POST", RULES_PATH, body)
        except APIError as error:
            warnings.append(f"no block rule was made: {error.message}")
            return 0, None

    async def _train(self, kind: str, data: bytes, warnings: list[str]) -> bool | None:
        if self.trainer is None:
            return None
        learned = await self.trainer.learn(kind, data)
        if not learned:
            warnings.append(f"Rspamd could not be trained with this {kind}")
        return learned

    # -- spam rules (at the edge) ------------------------------------------------------------

    @app.route(f"{PREFIX}/spam-rules", methods=["GET"])
    async def list_spam_rules(self, request: IRequest) -> bytes:
        m.parse_query(request, m.Empty)
        status, body = await edge_call(self.edge, "GET", RULES_PATH)
        self.link.touch()
        return json_reply(request, body, status)

    @app.route(f"{PREFIX}/spam-rules/<ref:rule_id>", methods=["DELETE"])
    async def delete_spam_rule(self, request: IRequest, rule_id: str) -> bytes:
        m.parse_query(request, m.Empty)
        path = f"{RULES_PATH}/{m.check_rule_id(rule_id)}"
        status, body = await edge_call(self.edge, "DELETE", path)
        self.link.touch()
        return json_reply(request, body, status)

    @app.route(f"{API}/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        m.parse_query(request, m.Empty)
        if self._openapi is None:
            self._openapi = local_document()
        return json_reply(request, {**self._openapi, "servers": [{"url": self.links.base}]})

    # -- events ------------------------------------------------------------------------------

    def _events(self) -> InboundEvents:
        if self.events is None:
            raise APIError(501, "not_supported", "this API has no event log", "none")
        return self.events

    @app.route(f"{PREFIX}/recent", methods=["GET"])
    def recent(self, request: IRequest) -> bytes:
        query = m.parse_query(request, m.RecentQuery)
        limit = min(query.limit, m.MAX_RECENT)
        items = recent_items(self._events(), limit, query.after, self._inbound_item)
        return json_reply(request, {"events": items})

    def _inbound_item(self, event: Any) -> dict[str, Any]:
        return event_item(event, self.links)

    @app.route(f"{PREFIX}/stream", methods=["GET"])
    def stream(self, request: IRequest) -> IResource:
        query = m.parse_query(request, m.StreamQuery)
        resume = last_event_id(request, query.last_event_id)
        return EventStream(self._events(), self._inbound_item, self.clock, resume)

    def _outbound(self) -> EventSource:
        if self.outbound_events is None:
            raise APIError(501, "not_supported", "this API has no outbound event log", "none")
        return self.outbound_events

    @app.route(f"{PREFIX}/outbound/recent", methods=["GET"])
    def outbound_recent(self, request: IRequest) -> bytes:
        query = m.parse_query(request, m.RecentQuery)
        limit = min(query.limit, m.MAX_RECENT)
        items = recent_items(self._outbound(), limit, query.after, outbound_item)
        return json_reply(request, {"events": items})

    @app.route(f"{PREFIX}/outbound/stream", methods=["GET"])
    def outbound_stream(self, request: IRequest) -> IResource:
        query = m.parse_query(request, m.StreamQuery)
        resume = last_event_id(request, query.last_event_id)
        return EventStream(self._outbound(), outbound_item, self.clock, resume)

    # -- sending -----------------------------------------------------------------------------

    def _sending(self) -> Sending:
        if self.sending is None:
            raise APIError(501, "not_supported", "this API cannot send mail", "none")
        self._require_enabled()
        return self.sending

    @app.route(f"{PREFIX}/send", methods=["POST"])
    def send(self, request: IRequest) -> Deferred[bytes]:
        m.parse_query(request, m.Empty)
        return self._sending().send(request)

    @app.route(f"{PREFIX}/messages/<ref:ref>/reply", methods=["POST"])
    def reply(self, request: IRequest, ref: str) -> Deferred[bytes]:
        query = m.parse_query(request, m.MessageQuery)
        kind = m.check_message_ref(ref)
        return self._sending().reply(request, query.mailbox, ref, kind)
