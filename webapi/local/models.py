"""Request models of the loopback API: query strings, JSON bodies and message references.

Every parameter a client sends is checked here, against a pydantic model that refuses
unknown fields, before anything touches the Maildir or the edge. This module must never do
I/O; it only validates and classifies.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from twisted.web.iweb import IRequest

from maildir import InvalidName, address_folder, validate_folder_name, validate_message_id
from webapi.errors import APIError, bad_parameter
from webapi.jsonbody import json_body

__all__ = [
    "AttachmentIn",
    "AttachmentQuery",
    "ClientConfigQuery",
    "DetailQuery",
    "Empty",
    "ListQuery",
    "MarkBody",
    "MessageQuery",
    "RecentQuery",
    "ReplyBody",
    "SendBody",
    "SpamBody",
    "SpamQuery",
    "StreamQuery",
    "check_message_ref",
    "check_rule_id",
    "parse_body",
    "parse_query",
]

Q = TypeVar("Q", bound=BaseModel)

MAX_LIMIT = 100
MAX_RECENT = 500
QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_INTERNET_MSGID = re.compile(r"<[!-;=?-~]{1,994}>")
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ADDRESS = re.compile(r"[^@\s<>()\[\]\\,;:\"]{1,64}@[A-Za-z0-9.-]{1,253}")


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
    if "@" in value:  # address-mailbox mode: an assigned address names its own folder
        return address_folder(value)  # InvalidName is a ValueError
    return validate_folder_name(value)


def _address(value: str) -> str:
    if not _ADDRESS.fullmatch(value):
        raise ValueError("must be an email address")
    return value.lower()


QueryInt = Annotated[int, BeforeValidator(_query_int)]
QueryBool = Annotated[bool, BeforeValidator(_query_bool)]
Mailbox = Annotated[str, AfterValidator(_mailbox)]
Address = Annotated[str, AfterValidator(_address)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Empty(_Model):
    """No parameters at all: anything given is refused."""


class ListQuery(_Model):
    mailbox: Mailbox = "INBOX"
    limit: QueryInt = Field(default=20, ge=1)  # values above MAX_LIMIT are capped
    offset: QueryInt = Field(default=0, ge=0)
    search: str = Field(default="", max_length=256)
    unread_only: QueryBool = False


class MessageQuery(_Model):
    mailbox: Mailbox = "INBOX"


class DetailQuery(MessageQuery):
    html: Literal["sanitized", "raw"] = Field(
        default="sanitized",
        description="body_html as sanitized (the default: nothing active, no hidden text, "
        "remote images blocked) or raw (as received, unchecked)",
    )
    remote_images: QueryBool = Field(
        default=False,
        description="keep remote images in the sanitized body_html (tracking pixels stay "
        "removed); otherwise their URL is moved to data-blocked-src",
    )


class AttachmentQuery(MessageQuery):
    download: QueryBool = False


class SpamQuery(MessageQuery):
    block_domain: QueryBool | None = None


class RecentQuery(_Model):
    limit: QueryInt = Field(default=20, ge=1)  # capped at MAX_RECENT
    after: QueryInt | None = Field(
        default=None,
        ge=0,
        description="only events with a larger event_id, oldest first (without it: the "
        "newest events, newest first)",
    )


class StreamQuery(_Model):
    last_event_id: QueryInt | None = None


class ClientConfigQuery(_Model):
    address: Address | None = None
    emailaddress: Address | None = None  # the parameter mail clients send for autoconfig


class MarkBody(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    read: bool


class SpamBody(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    block_domain: bool = False


class AttachmentIn(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field(
        default="application/octet-stream", max_length=255, description="type/subtype"
    )
    content_base64: str = Field(description="the content, base64 (RFC 4648)")


Recipients = Annotated[
    Annotated[str, Field(max_length=20_000)]
    | Annotated[list[Annotated[str, Field(min_length=1, max_length=1000)]], Field(max_length=100)],
    Field(
        description="one address (`a@example.net` or `Name <a@example.net>`), several "
        "separated by commas, or a list of them",
    ),
]


class _Compose(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    body_text: str | None = Field(default=None, description="give this, body_html or both")
    body_html: str | None = None
    attachments: list[AttachmentIn] = Field(
        default=[], max_length=100, description="at most 25 MiB together, decoded"
    )


class SendBody(_Compose):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)
    from_: str | None = Field(
        default=None,
        alias="from",
        max_length=1000,
        description="one of the device's addresses; without it, the device's default",
    )
    to: Annotated[
        Annotated[str, Field(min_length=3, max_length=20_000)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=1000)]],
            Field(min_length=1, max_length=100),
        ],
        Field(description="at least one address; the forms as for cc"),
    ]
    cc: Recipients = []
    bcc: Recipients = Field(default=[], description="in the envelope only, never a header")
    subject: str = Field(default="", max_length=998)
    in_reply_to: str | None = Field(default=None, max_length=998, description="<id@domain>")
    references: (
        Annotated[str, Field(max_length=20_000)]
        | Annotated[list[Annotated[str, Field(max_length=998)]], Field(max_length=100)]
        | None
    ) = Field(default=None, description="Message-IDs, a list or space-separated")


class ReplyBody(_Compose):
    reply_all: bool = Field(
        default=False, description="also the original To and Cc (less the device's own)"
    )


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


def parse_body(
    request: IRequest, model: type[Q], *, optional: bool = False, max_body: int = 1 << 20
) -> Q:
    """Validate a JSON object body against `model`; an empty body is `{}` when `optional`."""
    value, _raw = json_body(request, max_body, optional=optional)
    if not isinstance(value, dict):
        raise APIError(400, "invalid_json", "the body must be a JSON object", "send_a_json_object")
    return model.model_validate(value)


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
    if QUEUE_ID.fullmatch(ref) and ".." not in ref:
        return "queue"
    raise _invalid_id()


def check_rule_id(rule_id: str) -> str:
    if not _RULE_ID.fullmatch(rule_id):
        raise APIError(400, "invalid_rule_id", "the rule id is not valid", "list_spam_rules")
    return rule_id
