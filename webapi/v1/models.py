"""Request and response models of the edge's `/v1` management API (pydantic).

Requests refuse unknown fields and wrong types; the patterns and limits here are the API's
whole contract for shapes, and the OpenAPI document is generated from these same classes.
Responses are built by validating the store's `to_dict()` shapes through the response
models, so what the API answers always matches what it documents. This module must never
touch the store, the network or the clock.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel
from pydantic.json_schema import SkipJsonSchema

# -- field types -----------------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DOMAIN_PATTERN = rf"^{_LABEL}(?:\.{_LABEL})+\.?$"
HOST_PATTERN = rf"^{_LABEL}(?:\.{_LABEL})*\.?$"
ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
LOCAL_PART_PATTERN = rf"^[{ATEXT}]+(?:\.[{ATEXT}]+)*$"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
SMTP_ADDR_PATTERN = rf"^(?:\[[0-9A-Fa-f:.]{{2,45}}\]|{_LABEL}(?:\.{_LABEL})*):{_PORT}$"
# A local part of at most 64 octets; with the 254-octet cap the domain stays within 253.
ADDRESS_PATTERN = rf"^[{ATEXT}](?:[.{ATEXT}]{{0,62}}[{ATEXT}])?@{_LABEL}(?:\.{_LABEL})+$"


def _whole(value: object) -> object:
    """JSON Schema's integer includes 3.0: accept whole floats, nothing else extra."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Domain = Annotated[str, Field(min_length=3, max_length=253, pattern=DOMAIN_PATTERN)]
HostName = Annotated[str, Field(min_length=1, max_length=253, pattern=HOST_PATTERN)]
LocalPart = Annotated[str, Field(min_length=1, max_length=64, pattern=LOCAL_PART_PATTERN)]
# A managed name leaves room for ".<namespace>" within the 64 octets of a local part.
ManagedName = Annotated[str, Field(min_length=1, max_length=40, pattern=LOCAL_PART_PATTERN)]
Id = Annotated[str, Field(min_length=1, max_length=64, pattern=ID_PATTERN)]
SmtpAddr = Annotated[str, Field(max_length=300, pattern=SMTP_ADDR_PATTERN)]
# The connector's TLS key pin: base64 of the SHA-256 of its SubjectPublicKeyInfo (RFC 7469).
TLS_PIN_PATTERN = r"^[A-Za-z0-9+/]{43}=$"
TlsPin = Annotated[str, Field(min_length=44, max_length=44, pattern=TLS_PIN_PATTERN)]
Integer = Annotated[int, BeforeValidator(_whole)]
Port = Annotated[int, Field(ge=1, le=65535), BeforeValidator(_whole)]
RouteType = Literal["byod", "subdomain"]
DeliveryMode = Literal["split", "device"]
RouteStatus = Literal["pending_dns", "ready", "active", "disabled"]
TlsMode = Literal["starttls", "tls", "none"]
CheckStatus = Literal["ok", "pending", "error"]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    optional_body: ClassVar[bool] = False  # may the body be left out entirely?


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MxEntry(Request):
    priority: Integer = Field(ge=0, le=65535)
    host: HostName


class HostEntry(Request):
    host: HostName
    port: Port = 25
    tls_mode: TlsMode = "starttls"


# -- requests --------------------------------------------------------------------------------


class ManagedAddressCreate(Request):
    name: ManagedName
    device_id: Id | None = None
    vanity: bool = False


class ByodAddressCreate(Request):
    name: LocalPart
    domain: Domain
    device_id: Id | None = None


class RouteCreate(Request):
    domain: Domain
    type: RouteType
    connector_id: Id | None = None
    connector_smtp_addr: SmtpAddr | None = None
    delivery_mode: DeliveryMode = "split"
    edge_mx_target: Domain | None = None
    mail_from_domain: Domain | None = None


class RoutePatch(Request):
    connector_id: Id | None = None
    connector_smtp_addr: SmtpAddr | None = None
    # Optional, but never null (the schema says so; an explicit null is refused).
    status: RouteStatus | SkipJsonSchema[None] = None
    delivery_mode: DeliveryMode | SkipJsonSchema[None] = None
    mail_from_domain: Domain | None = None
    edge_mx_target: Domain | None = None
    authoritative_hosts: list[HostEntry] | None = Field(default=None, max_length=20)


class DnsScanRequest(Request):
    domain: Domain
    edge_mx_target: Domain | None = None
    route_id: Id | None = None


class DnsFallbackRequest(Request):
    domain: Domain
    route_id: Id | None = None
    edge_mx_target: Domain | None = None
    previous_mx: list[MxEntry] | None = Field(default=None, max_length=20)


class VerifyOwnershipRequest(Request):
    domain: Domain
    route_id: Id | None = None


class PrepareRequest(Request):
    domain: Domain
    route_id: Id | None = None
    edge_mx_target: Domain | None = None
    mail_from_domain: Domain | None = None
    existing_mx: list[MxEntry] | None = Field(default=None, max_length=20)
    connector_id: Id | None = None
    delivery_mode: DeliveryMode = "split"


class _RuleFields(Request):
    action: Literal["reject", "quarantine", "tag"] = "reject"
    note: str = Field(default="", max_length=1000)
    source_message_ids: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=100
    )


class SenderRuleCreate(_RuleFields):
    kind: Literal["sender"]
    value: str = Field(min_length=3, max_length=254, pattern=ADDRESS_PATTERN)


class DomainRuleCreate(_RuleFields):
    kind: Literal["domain"]
    value: Domain


class SpamRuleCreate(
    RootModel[Annotated[SenderRuleCreate | DomainRuleCreate, Field(discriminator="kind")]]
):
    """A sender rule (value: an address) or a domain rule (value: a domain)."""

    model_config = ConfigDict(frozen=True)


class RegisterRequest(Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
    hostname: str = Field(default="", max_length=253, pattern=r"^[^\x00-\x1f\x7f]*$")
    connector_smtp_addr: SmtpAddr | Literal[""] = ""
    connector_tls_pin: TlsPin | None = None


class DevicePatch(Request):
    """What a device may change of itself: the pin of its connector's (new) TLS key."""

    connector_tls_pin: TlsPin


class RegistrationStatusRequest(Request):
    registration_id: Id
    poll_token: str = Field(min_length=1, max_length=128)


class ApproveRequest(Request):
    optional_body: ClassVar[bool] = True
    account_id: Id | None = None


class EmptyRequest(Request):
    """No fields: an empty body or `{}`."""

    optional_body: ClassVar[bool] = True


# -- responses -------------------------------------------------------------------------------


class ErrorOut(Response):
    error: str
    code: str
    statusCode: int  # noqa: N815 (the wire name)
    action: str


class Deleted(Response):
    status: Literal["deleted"]


class ManagedAddressOut(Response):
    id: str
    name: str
    address: str
    domain: str
    device_id: str
    connector_smtp_addr: str
    vanity: bool
    created_at: str | None


class ManagedAddressList(Response):
    addresses: list[ManagedAddressOut]


class ByodAddressOut(Response):
    id: str
    name: str
    address: str
    domain: str
    device_id: str
    connector_smtp_addr: str
    created_at: str | None


class ByodAddressList(Response):
    addresses: list[ByodAddressOut]


class MxOut(Response):
    priority: int
    host: str


class RouteHostOut(Response):
    host: str
    port: int
    tls_mode: TlsMode


class HostOut(RouteHostOut):
    reachable: bool


class RouteOut(Response):
    id: str
    domain: str
    type: RouteType
    status: RouteStatus
    setup_stage: str
    connector_id: str | None
    connector_smtp_addr: str
    delivery_mode: DeliveryMode
    mail_from_domain: str
    edge_mx_target: str
    previous_mx: list[MxOut]
    fallback_hosts: list[str]
    authoritative_hosts: list[RouteHostOut]
    ownership_verified: bool
    claim_expires_at: str | None
    last_checked_at: str | None = Field(
        description="When the edge last looked up the domain's DNS records (null: never)"
    )
    created_at: str | None
    updated_at: str | None


class RouteList(Response):
    routes: list[RouteOut]


class OwnershipRecord(Response):
    label: str
    host: str
    type: Literal["TXT"]
    value: str
    required: bool
    status: CheckStatus


class CheckOut(Response):
    status: CheckStatus | Literal["missing"]
    value: str


class DnsStatus(Response):
    txt_verify: CheckOut
    mx_to_edge: CheckOut
    last_checked_at: str | None


class ScanOut(Response):
    domain: str
    edge_mx_target: str
    route_id: str
    status: Literal["ok"]
    dns_status: DnsStatus
    ownership_dns_record: OwnershipRecord
    existing_mx: list[MxOut]
    fallback_hosts: list[str]
    authoritative_hosts: list[HostOut]


class VerifyOut(Response):
    status: Literal["ok", "pending"]
    domain: str
    route_id: str
    message: str
    ownership_dns_record: OwnershipRecord


class DnsRecordOut(Response):
    label: str
    host: str
    type: Literal["MX", "TXT"]
    value: str
    ttl: int
    category: Literal["mx_to_edge", "spf", "dkim", "dmarc", "ownership"]
    required: bool
    status: CheckStatus
    priority: int | None = None
    lookups: int | None = None
    replaces: str | None = None
    note: str | None = None


class DkimKeyOut(Response):
    selector: str
    algorithm: Literal["rsa", "ed25519"]
    host: str
    value: str


class DkimRecordOut(Response):
    selector: str
    algorithm: Literal["rsa", "ed25519"]
    host: str
    type: Literal["TXT"]
    value: str
    txt_strings: list[str] = Field(
        description="the value in character-strings of at most 255 octets"
    )
    zone_line: str


class DkimRecordsOut(Response):
    domain: str
    route_id: str
    dkim_keys: list[DkimRecordOut]


class PrepareOut(Response):
    status: Literal["ok"]
    domain: str
    route_id: str
    message: str
    route: RouteOut
    dkim_keys: list[DkimKeyOut]
    required_dns_records: list[DnsRecordOut]


class SpamRuleOut(Response):
    id: str
    kind: Literal["sender", "domain"]
    value: str
    action: Literal["reject", "quarantine", "tag"]
    note: str
    source_message_ids: list[str]
    active: bool
    created_at: str | None
    updated_at: str | None


class SpamRuleList(Response):
    rules: list[SpamRuleOut]


class DeviceOut(Response):
    id: str
    account_id: str
    name: str
    hostname: str
    auth_status: Literal["pending", "authorized", "revoked"]
    namespace: str
    connector_smtp_addr: str
    connector_username: str | None
    connector_tls_pin: str | None = None
    registration_code: str | None = None
    created_at: str | None
    last_seen_at: str | None


class DeviceList(Response):
    devices: list[DeviceOut]


class RegisterOut(Response):
    status: Literal["pending"]
    registration_id: str
    device_id: str
    code: str
    poll_token: str
    approval_url: str
    expires_at: str | None


class ConnectorCredentials(Response):
    username: str
    password: str


class RegistrationStatusOut(Response):
    status: Literal["pending", "authorized", "expired", "revoked"]
    device_id: str
    account_id: str | None = None
    device_key: str | None = None
    namespace: str | None = None
    managed_domain: str | None = None
    edge_mx_target: str | None = None
    connector: ConnectorCredentials | None = None


# -- outbound mail -----------------------------------------------------------------------------


class OutboundEventsQuery(Request):
    """The query of `GET /v1/outbound/events` (its values arrive as text)."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    after: int = Field(default=0, ge=0, le=2**63 - 1)
    limit: int = Field(default=100, ge=1, le=500)


class OutboundEventOut(Response):
    id: int
    queue_id: str
    recipient: str
    event: Literal["accepted", "delivered", "deferred", "bounced", "expired", "deleted"]
    detail: str
    created_at: str


class OutboundEventList(Response):
    events: list[OutboundEventOut]
    next_after: int
