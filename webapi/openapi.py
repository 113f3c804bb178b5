"""An OpenAPI 3.1 document generated from the API's own pydantic models.

A `Registry` holds operations as (method, path, request model, response model, status);
each app registers its operations next to its routes, and `document()` turns them into one
OpenAPI document whose schemas are the models' JSON Schemas (draft 2020-12, as OpenAPI 3.1
uses). Every operation documents the common error body for its error statuses. This module
must never hold per-app state at module level or describe an endpoint no app serves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

__all__ = ["Operation", "Registry"]

_PARAM = re.compile(r"\{([a-z_]+)\}")
_ID_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}
_PARAM_SCHEMAS: dict[str, dict[str, Any]] = {
    "domain": {"type": "string", "minLength": 1, "maxLength": 253},
}
_ERROR_TEXT = {
    400: "The request is malformed or a field is invalid",
    401: "No valid key was presented",
    403: "The key may not do this",
    404: "No such record",
    405: "Method not allowed",
    409: "Conflicts with the current state (the `action` says what to do first)",
    413: "The request body is too large",
    415: "The request body is not JSON",
    422: "Well-formed but cannot be done as asked (the `code` says why)",
    429: "Too many requests; the `Retry-After` header says when to try again",
    503: "A dependency (DNS) is temporarily unavailable; retry later",
}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # OpenAPI form, e.g. /v1/email-routes/{id}
    summary: str
    response: type[BaseModel] | None
    request: type[BaseModel] | None = None
    status: int = 200
    public: bool = False  # no key needed
    errors: tuple[int, ...] = (400, 401, 403, 404, 409, 413, 415)
    tags: tuple[str, ...] = ()
    extra_statuses: tuple[int, ...] = ()


@dataclass
class Registry:
    title: str
    version: str
    error_model: type[BaseModel]
    operations: list[Operation] = field(default_factory=list)

    def add(self, *operations: Operation) -> None:
        for op in operations:
            key = (op.method.lower(), op.path)
            if any((o.method.lower(), o.path) == key for o in self.operations):
                raise ValueError(f"operation {op.method} {op.path} registered twice")
            self.operations.append(op)

    def _schemas(self) -> dict[str, Any]:
        """Request models in validation mode, responses in serialization mode."""
        pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [(self.error_model, "serialization")]
        for op in self.operations:
            if op.request is not None and (op.request, "validation") not in pairs:
                pairs.append((op.request, "validation"))
            if op.response is not None and (op.response, "serialization") not in pairs:
                pairs.append((op.response, "serialization"))
        _, schema = models_json_schema(pairs, ref_template="#/components/schemas/{model}")
        return dict(schema.get("$defs", {}))

    def document(self, servers: list[str] | None = None) -> dict[str, Any]:
        """The OpenAPI 3.1 document of every registered operation."""
        schemas = self._schemas()
        paths: dict[str, dict[str, Any]] = {}
        error_ref = {"$ref": f"#/components/schemas/{self.error_model.__name__}"}
        for op in self.operations:
            item: dict[str, Any] = {
                "operationId": _operation_id(op),
                "summary": op.summary,
                "responses": {},
            }
            if op.tags:
                item["tags"] = list(op.tags)
            params = [
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": dict(_PARAM_SCHEMAS.get(name, _ID_SCHEMA)),
                }
                for name in _PARAM.findall(op.path)
            ]
            if params:
                item["parameters"] = params
            if op.request is not None:
                item["requestBody"] = {
                    "required": not getattr(op.request, "optional_body", False),
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{op.request.__name__}"}
                        }
                    },
                }
            ok: dict[str, Any] = {"description": "Success"}
            if op.response is not None:
                ok["content"] = {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{op.response.__name__}"}
                    }
                }
            item["responses"][str(op.status)] = ok
            for status in op.extra_statuses:
                item["responses"][str(status)] = ok
            statuses = set(op.errors) | {405, 500}
            if op.public:
                statuses -= {401}
            else:
                item["security"] = [{"bearer": []}]
            for status in sorted(statuses):
                item["responses"][str(status)] = {
                    "description": _ERROR_TEXT.get(status, "Unexpected error"),
                    "content": {"application/json": {"schema": error_ref}},
                }
            paths.setdefault(op.path, {})[op.method.lower()] = item
        doc: dict[str, Any] = {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version},
            "paths": paths,
            "components": {
                "schemas": schemas,
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            },
        }
        if servers:
            doc["servers"] = [{"url": url} for url in servers]
        return doc


def _operation_id(op: Operation) -> str:
    words = re.split(r"[^A-Za-z0-9]+", f"{op.method} {op.path}")
    return "_".join(w.lower() for w in words if w)
