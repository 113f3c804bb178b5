"""The operations of the `/v1` API for its OpenAPI document: method, path, models, status.

`webapi.v1.app` serves exactly these (a test checks its routes against this list). This
module must never hold behaviour: it only describes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from webapi.openapi import Operation
from webapi.v1 import models as m

__all__ = ["OPERATIONS", "QUERIES", "with_query_parameters"]

OPERATIONS = [
    Operation("GET", "/v1/openapi.json", "This document", None, public=True, errors=()),
    Operation("GET", "/v1/managed-addresses", "List managed addresses", m.ManagedAddressList),
    Operation(
        "POST",
        "/v1/managed-addresses",
        "Reserve a managed address",
        m.ManagedAddressOut,
        m.ManagedAddressCreate,
        201,
    ),
    Operation("DELETE", "/v1/managed-addresses/{id}", "Remove a managed address", m.Deleted),
    Operation("GET", "/v1/byod-addresses", "List BYOD addresses", m.ByodAddressList),
    Operation(
        "POST",
        "/v1/byod-addresses",
        "Attach an address on a prepared, verified domain",
        m.ByodAddressOut,
        m.ByodAddressCreate,
        201,
    ),
    Operation("DELETE", "/v1/byod-addresses/{id}", "Remove a BYOD address", m.Deleted),
    Operation("GET", "/v1/email-routes", "List routes", m.RouteList),
    Operation("POST", "/v1/email-routes", "Create a route", m.RouteOut, m.RouteCreate, 201),
    Operation("PATCH", "/v1/email-routes/{id}", "Change a route", m.RouteOut, m.RoutePatch),
    Operation(
        "DELETE", "/v1/email-routes/{id}", "Delete a route and its BYOD addresses", m.Deleted
    ),
    Operation(
        "POST",
        "/v1/dns/scan",
        "Inspect a domain's MX and ownership TXT",
        m.ScanOut,
        m.DnsScanRequest,
        errors=(400, 401, 403, 404, 409, 413, 415, 503),
    ),
    Operation(
        "POST",
        "/v1/dns/fallback",
        "Keep the previous MX on the route",
        m.RouteOut,
        m.DnsFallbackRequest,
        errors=(400, 401, 403, 404, 409, 413, 415, 503),
    ),
    Operation(
        "POST",
        "/v1/custom-domains/verify-ownership",
        "Check the ownership TXT",
        m.VerifyOut,
        m.VerifyOwnershipRequest,
        errors=(400, 401, 403, 404, 409, 413, 415, 503),
    ),
    Operation(
        "POST",
        "/v1/custom-domains/prepare",
        "Make DKIM keys and list every DNS record to publish",
        m.PrepareOut,
        m.PrepareRequest,
        errors=(400, 401, 403, 404, 409, 413, 415, 503),
    ),
    Operation(
        "GET",
        "/v1/custom-domains/{domain}/dkim",
        "The DNS records of the domain's active DKIM keys",
        m.DkimRecordsOut,
        errors=(401, 403, 404),
    ),
    Operation("GET", "/v1/mail/spam-rules", "List spam block rules", m.SpamRuleList),
    Operation(
        "POST",
        "/v1/mail/spam-rules",
        "Create or reactivate a rule",
        m.SpamRuleOut,
        m.SpamRuleCreate,
        201,
        extra_statuses=(200,),
    ),
    Operation("DELETE", "/v1/mail/spam-rules/{id}", "Deactivate a rule", m.Deleted),
    Operation("GET", "/v1/devices", "List devices", m.DeviceList),
    Operation(
        "POST",
        "/v1/devices/register",
        "A device asks to join (no key)",
        m.RegisterOut,
        m.RegisterRequest,
        201,
        public=True,
        errors=(400, 403, 409, 413, 415, 429),
    ),
    Operation(
        "POST",
        "/v1/devices/register/status",
        "A registering device polls (no key)",
        m.RegistrationStatusOut,
        m.RegistrationStatusRequest,
        public=True,
    ),
    Operation(
        "PATCH",
        "/v1/devices/{id}/connector",
        "A device sets its connector's TLS key pin (its own device key, or the admin key)",
        m.DeviceOut,
        m.DevicePatch,
    ),
    Operation(
        "POST",
        "/v1/devices/{id}/approve",
        "Approve a device (admin key)",
        m.DeviceOut,
        m.ApproveRequest,
    ),
    Operation(
        "POST", "/v1/devices/{id}/revoke", "Revoke a device and its keys (admin key)", m.DeviceOut
    ),
    Operation(
        "GET",
        "/v1/outbound/events",
        "Delivery events of relayed mail, oldest first (a device key: its own mail only)",
        m.OutboundEventList,
        errors=(400, 401, 403),
    ),
]

QUERIES: dict[tuple[str, str], type[BaseModel]] = {
    ("get", "/v1/outbound/events"): m.OutboundEventsQuery,
}
"""The query parameters of the operations that take some, by (method, path)."""


def with_query_parameters(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` (the registry's document) with each operation's query parameters (`QUERIES`)."""
    for (method, path), model in QUERIES.items():
        item = doc["paths"][path][method]
        schema = model.model_json_schema()
        item["parameters"] = [
            *item.get("parameters", []),
            *(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "schema": {k: v for k, v in prop.items() if k != "title"},
                }
                for name, prop in schema.get("properties", {}).items()
            ),
        ]
    return doc
