"""The OpenAPI description of the device's `/localapi/v0` API, on the shared generator.

Response models here describe what `webapi.local.app` answers; request and query models come
from `webapi.local.models`, so the document and the validation are the same classes. Query
parameters are added to the generated document from the query models. This module must
never do I/O or describe an endpoint the local API does not serve.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from webapi.local import models as q
from webapi.openapi import Operation, Registry

__all__ = ["LOCAL_OPERATIONS", "local_document"]

_ID = "{id}"


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(_Out):
    error: str
    code: str
    statusCode: int  # noqa: N815 (the wire name)
    action: str


class MessageItem(_Out):
    id: str
    proxy_message_id: str
    mailbox: str
    subject: str
    from_: str = Field(alias="from")
    to: list[str]
    date: str
    size_bytes: int
    flags: list[str]
    preview: str


class MessageList(_Out):
    mailbox: str
    total: int
    messages: list[MessageItem]


class AttachmentItem(_Out):
    index: int
    filename: str
    content_type: str
    size_bytes: int
    open_url: str
    download_url: str
    risk: dict[str, Any]


class RiskFlag(_Out):
    code: str = Field(
        description="machine-readable: script, event_handler, javascript_url, data_url, "
        "embedded_content, form, meta_refresh, base_url, remote_content, tracking_pixel, "
        "hidden_text, mismatched_link, html_truncated, authentication_failed, spam, junk, "
        "attachment"
    )
    level: Literal["low", "medium", "high"]
    count: int
    reason: str


class Risk(_Out):
    level: Literal["low", "medium", "high"]
    summary: str
    method: str
    authentication: dict[str, str]
    spam: dict[str, Any] | None = None
    reasons: list[str]
    flags: list[RiskFlag] = Field(
        default=[], description="each finding as a code, its level, a count and the reason"
    )


class MessageDetailBody(_Out):
    id: str
    proxy_message_id: str
    mailbox: str
    subject: str
    from_: str = Field(alias="from")
    to: list[str]
    cc: list[str]
    date: str
    message_id: str
    in_reply_to: str
    references: list[str]
    headers: str
    body_text: str = Field(
        description="the text part; without one, the visible text of the HTML part"
    )
    body_html: str = Field(
        description="sanitized unless html=raw: no scripts, handlers, forms, frames, styles "
        "or hidden text; remote images blocked unless remote_images=true"
    )
    attachments: list[AttachmentItem]
    risk: Risk
    flags: list[str]
    size_bytes: int


class Marked(_Out):
    status: Literal["ok"]
    id: str
    mailbox: str
    flags: list[str]


class Done(_Out):
    status: str
    message: str


class Blocked(_Out):
    """What the block rule of a spam report covers, and why that: `dmarc_pass`,
    `dkim_aligned` or `spf_aligned` (the From domain, authenticated by the edge),
    `sender_address` (the address was asked for), `from_unauthenticated` or `served_domain`
    (the address only: the domain may be forged, or is served here)."""

    kind: Literal["sender", "domain"]
    value: str
    basis: Literal[
        "dmarc_pass",
        "dkim_aligned",
        "spf_aligned",
        "sender_address",
        "from_unauthenticated",
        "served_domain",
    ]


class Reported(_Out):
    status: Literal["ok", "partial"]
    id: str
    mailbox: str
    rule: dict[str, Any] | None = None
    blocked: Blocked | None = None
    trained: bool | None
    warnings: list[str]


class Event(_Out):
    event_id: int
    direction: Literal["inbound"]
    mailbox_id: str
    mailbox: str
    proxy_message_id: str
    internet_message_id: str
    subject: str
    recipients: list[str]
    received_at: str
    status: str
    message_url: str
    reply_url: str
    delete_url: str
    mark_url: str


class EventList(_Out):
    events: list[Event]


class OutboundEventBody(_Out):
    event_id: int
    direction: Literal["outbound"]
    proxy_message_id: str = Field(description="the outbound queue's id of the message")
    internet_message_id: str
    subject: str
    recipients: list[str]
    status: Literal["submitted", "relayed", "delivered", "deferred", "bounced"]
    created_at: str
    recipient: str | None = Field(default=None, description="the recipient this step is for")
    queue_id: str | None = Field(default=None, description="the edge's queue id")
    detail: str | None = None


class OutboundEventListBody(_Out):
    events: list[OutboundEventBody]


class Sent(_Out):
    status: Literal["ok"]
    message_id: str = Field(description="the Message-ID header of the queued message")
    proxy_message_id: str | None = Field(
        default=None, description="the outbound queue's id (as in the outbound events)"
    )


class Status(_Out):
    device: dict[str, str]
    connector: dict[str, str | None]
    mail: dict[str, str]
    addresses: list[str]
    local_api_base: str


class ClientConfig(_Out):
    status: Literal["ok"]
    account_name: str
    imap: dict[str, Any]
    smtp: dict[str, Any] | None
    identity: dict[str, str]
    addresses: list[str]
    autoconfig_url: str


class RuleList(_Out):
    rules: list[dict[str, Any]]


M = "/localapi/v0/mail"
MSG = f"{M}/messages/{_ID}"
_ERR = (400, 401, 403, 404)
_SEND_ERR = (400, 401, 403, 409, 413, 415, 422)
LOCAL_OPERATIONS: tuple[tuple[Operation, type[BaseModel] | None], ...] = (
    (Operation("GET", "/localapi/v0/status", "Device, edge link and mail service", Status), None),
    (Operation("POST", f"{M}/enable", "Start the mail services", Done, errors=(401, 403)), None),
    (Operation("POST", f"{M}/disable", "Stop the mail services", Done, errors=(401, 403)), None),
    (
        Operation("GET", f"{M}/client-config", "IMAP/SMTP settings", ClientConfig, errors=_ERR),
        q.ClientConfigQuery,
    ),
    (
        Operation("GET", f"{M}/autoconfig.xml", "Mail client autoconfig XML", None, errors=_ERR),
        q.ClientConfigQuery,
    ),
    (Operation("GET", f"{M}/messages", "List messages", MessageList, errors=_ERR), q.ListQuery),
    (Operation("GET", MSG, "Read a message", MessageDetailBody, errors=_ERR), q.DetailQuery),
    (Operation("DELETE", MSG, "Move to Trash (from Trash: remove)", Done), q.MessageQuery),
    (
        Operation(
            "GET",
            f"{MSG}/attachments/{{index}}",
            "Download an attachment (decoded bytes)",
            None,
            errors=_ERR,
        ),
        q.AttachmentQuery,
    ),
    (Operation("POST", f"{MSG}/mark", "Mark read or unread", Marked, q.MarkBody), q.MessageQuery),
    (
        Operation("POST", f"{MSG}/report-spam", "Junk, block the sender, train", Reported),
        q.SpamQuery,
    ),
    (Operation("POST", f"{MSG}/report-ham", "Back to INBOX, train", Reported), q.MessageQuery),
    (Operation("GET", f"{M}/spam-rules", "Block rules at the edge", RuleList), None),
    (Operation("DELETE", f"{M}/spam-rules/{_ID}", "Delete a block rule at the edge", Done), None),
    (
        Operation("POST", f"{M}/send", "Send a message", Sent, q.SendBody, errors=_SEND_ERR),
        q.Empty,
    ),
    (
        Operation(
            "POST",
            f"{MSG}/reply",
            "Reply to a message",
            Sent,
            q.ReplyBody,
            errors=_SEND_ERR + (404,),
        ),
        q.MessageQuery,
    ),
    (Operation("GET", f"{M}/recent", "Recent inbound events", EventList), q.RecentQuery),
    (
        Operation("GET", f"{M}/outbound/recent", "Recent outbound events", OutboundEventListBody),
        q.RecentQuery,
    ),
    (
        Operation("GET", f"{M}/outbound/stream", "Outbound events as server-sent events", None),
        q.StreamQuery,
    ),
    (
        Operation("GET", f"{M}/stream", "Inbound events as server-sent events", None),
        q.StreamQuery,
    ),
    (Operation("GET", "/localapi/v0/openapi.json", "This document", None, errors=(401, 403)), None),
)


_PATH_SCHEMAS: dict[str, dict[str, Any]] = {
    "id": {
        "type": "string",
        "minLength": 1,
        "maxLength": 998,
        "description": "Maildir id (mailbox_id); a queue id or a <Message-ID> also resolve",
    },
    "index": {"type": "string", "pattern": "^[0-9]{1,4}$"},
}


_IDEMPOTENCY_KEY: dict[str, Any] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "a retry with the same key and body gets the first reply and sends "
    "nothing; the same key with another body is refused (409)",
    "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    params = []
    schema = model.model_json_schema()
    for name, prop in schema.get("properties", {}).items():
        prop = {k: v for k, v in prop.items() if k != "title"}
        params.append({"name": name, "in": "query", "required": False, "schema": prop})
    return params


def local_document(servers: list[str] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `/localapi/v0`."""
    registry = Registry("tailpost device local API", "0", ErrorBody)
    registry.add(*(op for op, _query in LOCAL_OPERATIONS))
    doc = registry.document(servers)
    for op, query in LOCAL_OPERATIONS:
        if query is None:
            continue
        item = doc["paths"][op.path][op.method.lower()]
        item["parameters"] = [*item.get("parameters", []), *_query_parameters(query)]
    for path, item in doc["paths"].items():
        for operation in item.values():
            for param in operation.get("parameters", []):
                if param["in"] == "path" and path.startswith(f"{M}/messages/"):
                    param["schema"] = _PATH_SCHEMAS[param["name"]]
    for path in (f"{M}/stream", f"{M}/outbound/stream"):
        stream = doc["paths"][path]["get"]["responses"]["200"]
        stream["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    for path in (f"{M}/send", f"{MSG}/reply"):
        item = doc["paths"][path]["post"]
        item["parameters"] = [*item.get("parameters", []), _IDEMPOTENCY_KEY]
    return doc
