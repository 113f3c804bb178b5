"""The device's loopback HTTP API (`/localapi/v0/...`): reading the local Maildir.

A Klein app whose state lives on a `LocalAPI` instance. Every request passes the
`RequestGuard` (loopback Host, token) before a route runs; every parameter is validated
before the Maildir is touched; every error leaves through `webapi.errors`. Maildir access
and message parsing are blocking and run through `run_blocking` (a thread by default), never
on the reactor thread. This module must never build a path itself or serve an attachment
with a type a browser would execute.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, urlencode

from klein import Klein
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.routing import BaseConverter

from maildir import (
    Folder,
    InvalidName,
    Maildir,
    MessageInfo,
    MessageNotFound,
    validate_folder_name,
    validate_message_id,
)
from maildir.message import AttachmentInfo, get_attachment, parse_detail, read_header, summarize
from webapi.auth import RequestGuard
from webapi.errors import APIError, bad_parameter, failure_reply, json_reply, set_common_headers
from webapi.risk import assess_attachment, assess_message

__all__ = ["LocalAPI", "RunBlocking"]

RunBlocking = Callable[..., "Deferred[Any]"]
Q = TypeVar("Q", bound=BaseModel)

PREFIX = "/localapi/v0/mail"
MAX_LIMIT = 100
SEEN = "\\Seen"
QUEUE_ID_HEADER = "X-Tailpost-Queue-ID"
_QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_INTERNET_MSGID = re.compile(r"<[!-;=?-~]{1,994}>")
_INDEX = re.compile(r"[0-9]{1,4}")
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_ACTIVE_TYPES = frozenset(
    {
        "text/html",
        "application/xhtml+xml",
        "image/svg+xml",
        "application/javascript",
        "application/x-javascript",
        "application/ecmascript",
        "text/javascript",
        "text/ecmascript",
        "text/xml",
        "application/xml",
        "text/xsl",
        "application/x-shockwave-flash",
        "text/cache-manifest",
        "application/wasm",
    }
)


# -- query parameters ------------------------------------------------------------------------


def _query_int(value: object) -> object:
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,9}", value):
            raise ValueError("must be a non-negative integer")
        return int(value)
    return value


def _query_bool(value: object) -> object:
    if isinstance(value, str):
        lowered = value.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise ValueError("must be true, false, 1 or 0")
    return value


def _mailbox(value: str) -> str:
    return validate_folder_name(value)  # InvalidName is a ValueError


QueryInt = Annotated[int, BeforeValidator(_query_int)]
QueryBool = Annotated[bool, BeforeValidator(_query_bool)]
Mailbox = Annotated[str, AfterValidator(_mailbox)]


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ListQuery(_Query):
    mailbox: Mailbox = "INBOX"
    limit: QueryInt = Field(default=20, ge=1)  # values above MAX_LIMIT are capped
    offset: QueryInt = Field(default=0, ge=0)
    search: str = Field(default="", max_length=256)
    unread_only: QueryBool = False


class MessageQuery(_Query):
    mailbox: Mailbox = "INBOX"


class AttachmentQuery(MessageQuery):
    download: QueryBool = False


def parse_query(request: IRequest, model: type[Q]) -> Q:
    """Validate the query string against `model` (strict UTF-8, no repeats, no extras)."""
    values: dict[str, str] = {}
    for key, items in (request.args or {}).items():
        try:
            name = key.decode("utf-8")
            decoded = [item.decode("utf-8") for item in items]
        except UnicodeDecodeError:
            raise bad_parameter("query parameters must be UTF-8") from None
        if len(decoded) != 1:
            raise bad_parameter(f"query parameter given more than once: {name}")
        values[name] = decoded[0]
    return model.model_validate(values)


def _invalid_id() -> APIError:
    return APIError(400, "invalid_message_id", "the message id is not valid", "verify_message_id")


def check_message_ref(ref: str) -> str:
    """Classify a message reference: "id" (Maildir id), "queue" or "msgid"; 400 otherwise."""
    if _INTERNET_MSGID.fullmatch(ref):
        return "msgid"
    try:
        validate_message_id(ref)
        return "id"
    except InvalidName:
        pass
    if _QUEUE_ID.fullmatch(ref) and ".." not in ref:
        return "queue"
    raise _invalid_id()


# -- attachment replies ----------------------------------------------------------------------


def served_content_type(content_type: str) -> bytes:
    """The Content-Type to serve an attachment with; active or odd types become octet-stream."""
    ctype = content_type.strip().lower()
    active = ctype in _ACTIVE_TYPES or any(w in ctype for w in ("html", "xml", "script"))
    if not _MIME_TYPE.fullmatch(ctype) or active or ctype.startswith("multipart/"):
        return b"application/octet-stream"
    return ctype.encode("ascii")


def content_disposition(disposition: str, filename: str) -> bytes:
    """An RFC 6266 Content-Disposition: ASCII fallback plus `filename*` when needed."""
    fallback = "".join(
        ch if 0x20 <= ord(ch) < 0x7F and ch not in '"\\%' else "_" for ch in filename
    )
    value = f'{disposition}; filename="{fallback}"'
    if fallback != filename:
        value += "; filename*=UTF-8''" + quote(filename, safe="!#$&+-.^_`|~")
    return value.encode("ascii")


# -- the app ---------------------------------------------------------------------------------


class _RefConverter(BaseConverter):
    """A message reference: anything non-empty, slashes included, so the id validator (not
    the router) decides, and "/", "//" and ".." in an id get a 400 rather than a redirect."""

    regex = ".+?"
    part_isolating = False


class LocalAPI:
    """The `/localapi/v0` Klein app over one Maildir."""

    app = Klein()
    app.url_map.merge_slashes = False
    app.url_map.converters["ref"] = _RefConverter

    def __init__(
        self,
        maildir: Maildir,
        token: str,
        *,
        base_url: str = "http://127.0.0.1:18080",
        max_body: int = 1 << 20,
        run_blocking: RunBlocking = deferToThread,
    ) -> None:
        if not token:
            raise ValueError("the local API needs a non-empty token")
        self._maildir = maildir
        self._token = token.encode("utf-8")
        self.base_url = base_url.rstrip("/")
        self._max_body = max_body
        self._run = run_blocking

    def resource(self) -> IResource:
        """The resource to serve: the app behind the request guard."""
        inner: IResource = self.app.resource()
        return RequestGuard(inner, self._token, self._max_body)

    @app.handle_errors(Exception)  # the single place errors become replies
    def _errors(self, request: IRequest, failure: Failure) -> bytes:
        return failure_reply(request, failure)

    # -- routes ------------------------------------------------------------------------------

    @app.route(f"{PREFIX}/messages", methods=["GET"])
    def list_messages(self, request: IRequest) -> Deferred[bytes]:
        query = parse_query(request, ListQuery)
        d = self._run(self._list, query)
        d.addCallback(lambda body: json_reply(request, body))
        return d

    @app.route(f"{PREFIX}/messages/<ref:ref>", methods=["GET"])
    def get_message(self, request: IRequest, ref: str) -> Deferred[bytes]:
        query = parse_query(request, MessageQuery)
        kind = check_message_ref(ref)
        d = self._run(self._detail, query.mailbox, ref, kind)
        d.addCallback(lambda body: json_reply(request, body))
        return d

    @app.route(f"{PREFIX}/messages/<ref:ref>/attachments/<index>", methods=["GET"])
    def get_attachment(self, request: IRequest, ref: str, index: str) -> Deferred[bytes]:
        query = parse_query(request, AttachmentQuery)
        kind = check_message_ref(ref)
        if not _INDEX.fullmatch(index):
            raise APIError(404, "attachment_not_found", "no such attachment", "check_attachments")
        d = self._run(self._attachment, query.mailbox, ref, kind, int(index))
        d.addCallback(lambda result: self._send_attachment(request, query, *result))
        return d

    # -- blocking work (runs in a thread) ----------------------------------------------------

    def _list(self, query: ListQuery) -> dict[str, Any]:
        folder = self._maildir.folder(query.mailbox)
        infos = folder.messages()
        if query.unread_only:
            infos = [info for info in infos if SEEN not in info.flags]
        infos.sort(key=lambda info: (info.internaldate, info.uid), reverse=True)
        limit = min(query.limit, MAX_LIMIT)
        window = slice(query.offset, query.offset + limit)
        if query.search:
            needle = query.search.casefold()
            matched = []
            for info in infos:
                item = self._list_item(folder, info)
                fields = (item["subject"], item["from"], item["preview"]) if item else ()
                if any(needle in str(field).casefold() for field in fields):
                    matched.append(item)
            total, page = len(matched), matched[window]
        else:
            total = len(infos)
            page = [self._list_item(folder, info) for info in infos[window]]
        messages = [item for item in page if item is not None]
        return {"mailbox": folder.name, "total": total, "messages": messages}

    def _list_item(self, folder: Folder, info: MessageInfo) -> dict[str, Any] | None:
        try:
            data = folder.read(info.id)
        except MessageNotFound:  # removed since it was listed
            return None
        summary = summarize(data)
        return {
            "id": info.id,
            "proxy_message_id": summary.queue_id,
            "mailbox": folder.name,
            "subject": summary.subject,
            "from": summary.from_,
            "to": summary.to,
            "date": summary.date,
            "size_bytes": info.size,
            "flags": sorted(info.flags),
            "preview": summary.preview,
        }

    def _resolve(self, folder: Folder, ref: str, kind: str) -> tuple[MessageInfo, bytes]:
        if kind == "id":
            try:
                info = folder.get(ref)
                return info, folder.read(info.id)
            except MessageNotFound:
                if not _QUEUE_ID.fullmatch(ref):
                    raise
                kind = "queue"
        header = "Message-ID" if kind == "msgid" else QUEUE_ID_HEADER
        for info in reversed(folder.messages()):
            try:
                data = folder.read(info.id)
            except MessageNotFound:
                continue
            if read_header(data, header) == ref:
                return info, data
        raise MessageNotFound(ref)

    def _detail(self, mailbox: str, ref: str, kind: str) -> dict[str, Any]:
        folder = self._maildir.folder(mailbox)
        info, data = self._resolve(folder, ref, kind)
        detail = parse_detail(data)
        summary = detail.summary
        return {
            "id": info.id,
            "proxy_message_id": summary.queue_id,
            "mailbox": folder.name,
            "subject": summary.subject,
            "from": summary.from_,
            "to": summary.to,
            "cc": summary.cc,
            "date": summary.date,
            "message_id": summary.message_id,
            "in_reply_to": detail.in_reply_to,
            "references": detail.references,
            "headers": detail.headers,
            "body_text": detail.body_text,
            "body_html": detail.body_html,
            "attachments": [self._attachment_item(folder, info, a) for a in detail.attachments],
            "risk": assess_message(detail),
            "flags": sorted(info.flags),
            "size_bytes": info.size,
        }

    def _attachment_item(
        self, folder: Folder, info: MessageInfo, attachment: AttachmentInfo
    ) -> dict[str, Any]:
        url = (
            f"{self.base_url}{PREFIX}/messages/{quote(info.id, safe='')}"
            f"/attachments/{attachment.index}"
        )
        params = {"mailbox": folder.name} if folder.name != "INBOX" else {}
        open_query = urlencode(params)
        download_query = urlencode({**params, "download": "1"})
        return {
            "index": attachment.index,
            "filename": attachment.filename,
            "content_type": attachment.content_type,
            "size_bytes": attachment.size_bytes,
            "open_url": f"{url}?{open_query}" if open_query else url,
            "download_url": f"{url}?{download_query}",
            "risk": assess_attachment(attachment),
        }

    def _attachment(
        self, mailbox: str, ref: str, kind: str, index: int
    ) -> tuple[AttachmentInfo, bytes]:
        folder = self._maildir.folder(mailbox)
        _info, data = self._resolve(folder, ref, kind)
        return get_attachment(data, index)

    # -- reactor thread ----------------------------------------------------------------------

    @staticmethod
    def _send_attachment(
        request: IRequest, query: AttachmentQuery, info: AttachmentInfo, content: bytes
    ) -> bytes:
        disposition = "attachment" if query.download else "inline"
        request.setResponseCode(200)
        set_common_headers(request)
        request.setHeader(b"Content-Type", served_content_type(info.content_type))
        request.setHeader(b"Content-Disposition", content_disposition(disposition, info.filename))
        request.setHeader(b"Content-Security-Policy", b"default-src 'none'; sandbox")
        return content
