"""The error shape of the HTTP APIs and the one place that turns exceptions into replies.

Every error a client sees is `{"error", "code", "statusCode", "action"}` as JSON. This module
must never put a traceback, a file path or an exception's text from unexpected errors into a
reply: those go to the log, and the client gets a generic 500.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from maildir import FolderNotFound, InvalidName, MessageNotFound
from maildir.message import AttachmentNotFound
from webapi.replies import internal_error_reply, json_reply, set_common_headers

__all__ = [
    "APIError",
    "error_reply",
    "failure_reply",
    "json_reply",
    "set_common_headers",
]

log = Logger(namespace="tailpost.webapi")


class APIError(Exception):
    """An error meant for the client: status, machine code, human text and next action."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        action: str,
        headers: dict[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.action = action
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": self.message,
            "code": self.code,
            "statusCode": self.status,
            "action": self.action,
        }


def bad_parameter(message: str) -> APIError:
    return APIError(400, "invalid_parameter", message, "fix_request_parameters")


def error_reply(request: IRequest, error: APIError) -> bytes:
    """The JSON reply for `error`."""
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return json_reply(request, error.body(), error.status)


def _validation_error(exc: ValidationError) -> APIError:
    fields = sorted({".".join(str(p) for p in e["loc"]) or "query" for e in exc.errors()})
    return bad_parameter(f"invalid query parameter: {', '.join(fields)}")


def _classify(exc: BaseException) -> APIError | None:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return _validation_error(exc)
    if isinstance(exc, FolderNotFound):
        return APIError(404, "mailbox_not_found", "no such mailbox", "list_mailboxes")
    if isinstance(exc, MessageNotFound):
        return APIError(404, "message_not_found", "no such message", "verify_message_id")
    if isinstance(exc, AttachmentNotFound):
        return APIError(404, "attachment_not_found", "no such attachment", "check_attachments")
    if isinstance(exc, InvalidName):
        return APIError(400, "invalid_name", "invalid mailbox or message id", "verify_message_id")
    if isinstance(exc, NotFound):
        return APIError(404, "not_found", "no such endpoint", "check_the_url")
    if isinstance(exc, MethodNotAllowed):
        allowed = ", ".join(exc.valid_methods or [])
        return APIError(
            405,
            "method_not_allowed",
            "method not allowed for this endpoint",
            "use_an_allowed_method",
            {b"Allow": allowed.encode("ascii")},
        )
    if isinstance(exc, HTTPException):  # other routing outcomes (e.g. redirects): no such URL
        if exc.code and 400 <= exc.code < 500:
            return APIError(
                exc.code, "bad_request", "the request could not be handled", "fix_request"
            )
        return APIError(404, "not_found", "no such endpoint", "check_the_url")
    return None


def failure_reply(request: IRequest, failure: Failure) -> bytes:
    """Map any failure to an error reply; unexpected ones are logged and answered with 500."""
    error = _classify(failure.value) if failure.value is not None else None
    if error is None:
        log.failure(
            "unhandled error in {method} {path}",
            failure,
            method=request.method,
            path=request.path,
        )
        return internal_error_reply(request)
    return error_reply(request, error)
