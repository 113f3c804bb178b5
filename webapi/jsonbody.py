"""The one reader of JSON request bodies for every Klein app in `webapi`.

`json_body` takes a request whose body the listener has already capped (`webapi.httplimits`
refuses an oversized body before reading it), checks the cap again for requests served
without that listener (tests, other sites), insists on `Content-Type: application/json`
(415), and parses the body: bad UTF-8, bad JSON, a body nested deeper than `MAX_DEPTH` and
anything else the parser refuses are a 400 with the API's error body, never a 500. This
module must never read a body it has not size-checked, and never put the body's text into
an error.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

from webapi.errors import APIError

__all__ = ["MAX_DEPTH", "json_body", "parse_json", "require_json", "too_large"]

MAX_DEPTH = 32


def too_large() -> APIError:
    return APIError(413, "payload_too_large", "the request body is too large", "send_less_data")


def _invalid(why: str) -> APIError:
    return APIError(400, "invalid_json", f"the request body {why}", "send_a_json_object")


def _depth(value: Any) -> int:
    """How deeply containers nest in `value` (iteratively: no recursion to exhaust)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def require_json(request: IRequest) -> None:
    """415 unless the request says its body is `application/json`."""
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != b"application/json":
        raise APIError(
            415,
            "unsupported_media_type",
            "send the body as application/json",
            "set_content_type_json",
        )


def parse_json(raw: bytes) -> Any:
    """The JSON value of a body's bytes (blocking work for a large body: run it in a
    worker thread); 400 for anything that is not JSON within `MAX_DEPTH`."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _invalid("is not UTF-8") from None
    except RecursionError:
        raise _invalid(f"nests deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        raise _invalid("is not valid JSON") from None
    if _depth(value) > MAX_DEPTH:
        raise _invalid(f"nests deeper than {MAX_DEPTH} levels")
    return value


def json_body(request: IRequest, max_body: int, *, optional: bool = False) -> tuple[Any, bytes]:
    """The parsed body and its bytes; an empty body is `{}` when `optional`."""
    content = request.content
    raw = b""
    if content is not None:
        if content.seek(0, 2) > max_body:
            raise too_large()
        content.seek(0, 0)
        raw = content.read(max_body + 1)
    if not raw.strip() and optional:
        return {}, b"{}"
    require_json(request)
    return parse_json(raw), raw
