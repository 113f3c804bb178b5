"""The `/v1` management API through StubTreq: each endpoint's success and error paths."""

from __future__ import annotations

import re
from typing import Any

import pytest

from edge.store import Store
from tests.test_control_support import (  # noqa: F401
    MANAGED,
    Client,
    client_fixture,
    make_client_fixture,
    now_fixture,
    store_fixture,
)

# -- authentication and the error shape ------------------------------------------------------


def test_missing_bad_and_revoked_keys(client: Client) -> None:
    client.get("/v1/email-routes", key=None).error("auth_missing_header")
    assert client.get("/v1/email-routes", key=None).code == 401
    r = client.get("/v1/email-routes", key=None, headers={"Authorization": "Basic eDp5"})
    r.error("auth_invalid_format")
    assert client.get("/v1/email-routes", key="tpk_not-a-key").code == 403
    client.get("/v1/email-routes", key="tpk_not-a-key").error("auth_invalid_key")
    device_id, key = client.device()
    assert client.get("/v1/email-routes", key=key).code == 200
    assert client.post(f"/v1/devices/{device_id}/revoke").code == 200
    client.get("/v1/email-routes", key=key).error("auth_invalid_key")


def test_unknown_paths_and_methods(client: Client) -> None:
    client.get("/v1/nothing-here").error("not_found")
    r = client.call("PUT", "/v1/email-routes", {})
    r.error("method_not_allowed")
    assert r.code == 405


@pytest.mark.parametrize(
    ("raw", "ctype", "code", "status"),
    [
        (b"{not json", "application/json", "invalid_json", 400),
        (b'{"name": "a"}', "text/plain", "unsupported_media_type", 415),
        (b"[]", "application/json", "validation_failed", 400),
        (b'{"name": "alice", "colour": "red"}', "application/json", "validation_failed", 400),
        (b'{"name": 5}', "application/json", "validation_failed", 400),
        (b'{"name": "a b"}', "application/json", "validation_failed", 400),
        (b'{"name": "' + b"x" * 70_000 + b'"}', "application/json", "payload_too_large", 413),
    ],
)
def test_bad_bodies(client: Client, raw: bytes, ctype: str, code: str, status: int) -> None:
    r = client.call("POST", "/v1/managed-addresses", raw=raw, headers={"Content-Type": ctype})
    assert r.code == status
    body = r.error(code)
    assert "Traceback" not in body["error"]


def test_body_may_be_left_out_only_where_documented(client: Client) -> None:
    device_id, _key = client.device()
    route = client.post("/v1/email-routes", {"domain": "a.test", "type": "byod"}).json()
    r = client.call("PATCH", f"/v1/email-routes/{route['id']}")
    assert r.code == 415
    assert client.call("POST", f"/v1/devices/{device_id}/revoke").code == 200


def test_whole_floats_are_integers_but_strings_are_not(client: Client) -> None:
    route = client.post("/v1/email-routes", {"domain": "a.test", "type": "byod"}).json()
    hosts = {"authoritative_hosts": [{"host": "mx.old.test", "port": 2525.0}]}
    r = client.patch(f"/v1/email-routes/{route['id']}", hosts)
    assert r.code == 200 and r.json()["authoritative_hosts"][0]["port"] == 2525
    for port in ["2525", 2525.5, True]:
        bad = {"authoritative_hosts": [{"host": "mx.old.test", "port": port}]}
        client.patch(f"/v1/email-routes/{route['id']}", bad).error("validation_failed")


def test_unknown_field_is_named_in_the_error(client: Client) -> None:
    r = client.post("/v1/managed-addresses", {"name": "alice", "colour": "red"})
    assert "colour" in r.error("validation_failed")["error"]


def test_bad_path_ids_are_not_found(client: Client) -> None:
    client.delete("/v1/email-routes/bad%20id").error("route_not_found")
    client.delete("/v1/email-routes/..%2Fx").error("not_found")
    client.delete("/v1/mail/spam-rules/rule_nope").error("rule_not_found")


# -- managed addresses -----------------------------------------------------------------------


def test_managed_addresses(client: Client) -> None:
    device_id, key = client.device("Home Server")
    r = client.post("/v1/managed-addresses", {"name": "Alice"}, key=key)
    assert r.code == 201, r.body
    made = r.json()
    assert made["name"] == "alice" and made["device_id"] == device_id
    namespace = f"home-server-{device_id[-6:].lower()}"
    assert made["address"] == f"alice.{namespace}@{MANAGED}"
    assert client.get("/v1/managed-addresses", key=key).json()["addresses"] == [made]
    client.post("/v1/managed-addresses", {"name": "alice"}, key=key).error("address_taken")
    client.post("/v1/managed-addresses", {"name": "bob", "vanity": True}, key=key).error(
        "vanity_not_allowed"
    )
    client.post("/v1/managed-addresses", {"name": "bob"}).error("device_id_required")
    client.post("/v1/managed-addresses", {"name": "bob", "device_id": "dev_x"}).error(
        "device_not_found"
    )
    for bad in ["a..b", ".a", "a@b", "", "x" * 41, "ünï"]:
        client.post("/v1/managed-addresses", {"name": bad}, key=key).error("validation_failed")
    assert client.delete(f"/v1/managed-addresses/{made['id']}", key=key).json() == {
        "status": "deleted"
    }
    client.delete(f"/v1/managed-addresses/{made['id']}", key=key).error("address_not_found")


def test_vanity_only_where_allowed(make_client: Any) -> None:
    client = make_client(allow_vanity=True)
    _device_id, key = client.device()
    r = client.post("/v1/managed-addresses", {"name": "boss", "vanity": True}, key=key)
    assert r.code == 201 and r.json()["address"] == f"boss@{MANAGED}"


def test_managed_addresses_need_a_managed_domain(make_client: Any) -> None:
    client = make_client(managed_domain="")
    _device_id, key = client.device()
    client.post("/v1/managed-addresses", {"name": "a"}, key=key).error(
        "managed_domain_not_configured"
    )


def test_pending_device_gets_no_address(client: Client) -> None:
    # A registration makes no device until it is approved: there is nothing to give to.
    reg = client.post("/v1/devices/register", {"name": "later"}, key=None).json()
    r = client.post("/v1/managed-addresses", {"name": "a", "device_id": reg["device_id"]})
    r.error("device_not_found")


# -- routes ----------------------------------------------------------------------------------


def test_email_routes(client: Client) -> None:
    device_id, key = client.device()
    body = {"domain": "Example.COM", "type": "byod", "connector_id": device_id}
    r = client.post("/v1/email-routes", body, key=key)
    assert r.code == 201, r.body
    route = r.json()
    assert route["domain"] == "example.com" and route["delivery_mode"] == "split"
    assert route["status"] == "pending_dns" and route["ownership_verified"] is False
    client.post("/v1/email-routes", body, key=key).error("domain_taken")
    change = {
        "delivery_mode": "device",
        "authoritative_hosts": [{"host": "mx.old.test", "port": 2525}],
    }
    r = client.patch(f"/v1/email-routes/{route['id']}", change, key=key)
    assert r.code == 200, r.body
    patched = r.json()
    assert patched["delivery_mode"] == "device" and patched["status"] == "pending_dns"
    assert patched["authoritative_hosts"] == [
        {"host": "mx.old.test", "port": 2525, "tls_mode": "starttls"}
    ]
    client.patch(f"/v1/email-routes/{route['id']}", {"status": "gone"}, key=key).error(
        "validation_failed"
    )
    client.patch(f"/v1/email-routes/{route['id']}", {"status": None}, key=key).error(
        "validation_failed"
    )
    client.patch("/v1/email-routes/route_nope", {"status": "active"}, key=key).error(
        "route_not_found"
    )
    assert [x["id"] for x in client.get("/v1/email-routes", key=key).json()["routes"]] == [
        route["id"]
    ]
    assert client.delete(f"/v1/email-routes/{route['id']}", key=key).code == 200
    assert client.get("/v1/email-routes", key=key).json() == {"routes": []}


def test_subdomain_routes_stay_under_the_managed_domain(client: Client) -> None:
    r = client.post("/v1/email-routes", {"domain": "team.example.org", "type": "subdomain"})
    r.error("not_a_managed_subdomain")
    r = client.post("/v1/email-routes", {"domain": f"team.{MANAGED}", "type": "subdomain"})
    assert r.code == 201


# -- spam rules ------------------------------------------------------------------------------


def test_spam_rules_create_reactivate_delete(client: Client) -> None:
    _device_id, key = client.device()
    body = {"kind": "sender", "value": "Spammer@Example.net", "source_message_ids": ["m1"]}
    r = client.post("/v1/mail/spam-rules", body, key=key)
    assert r.code == 201, r.body
    rule = r.json()
    assert rule["value"] == "spammer@example.net" and rule["action"] == "reject"
    assert client.delete(f"/v1/mail/spam-rules/{rule['id']}", key=key).code == 200
    assert client.get("/v1/mail/spam-rules", key=key).json() == {"rules": []}
    again = client.post(
        "/v1/mail/spam-rules", {**body, "source_message_ids": ["m2"], "note": "again"}, key=key
    )
    assert again.code == 200  # reactivated, not new
    assert again.json()["id"] == rule["id"] and again.json()["active"] is True
    assert again.json()["source_message_ids"] == ["m1", "m2"]
    client.post("/v1/mail/spam-rules", {"kind": "domain", "value": "not a domain"}, key=key).error(
        "validation_failed"
    )
    client.post("/v1/mail/spam-rules", {"kind": "ip", "value": "1.2.3.4"}, key=key).error(
        "validation_failed"
    )
    client.delete("/v1/mail/spam-rules/rule_x", key=key).error("rule_not_found")


# -- idempotency -----------------------------------------------------------------------------


def test_idempotency_key_replays_and_refuses_reuse(client: Client, now: Any) -> None:
    _device_id, key = client.device()
    headers = {"Idempotency-Key": "create-alice-1"}
    first = client.post("/v1/managed-addresses", {"name": "alice"}, key=key, headers=headers)
    second = client.post("/v1/managed-addresses", {"name": "alice"}, key=key, headers=headers)
    assert first.code == second.code == 201
    assert first.json() == second.json()
    assert second.headers["idempotent-replayed"] == ["true"]
    assert len(client.get("/v1/managed-addresses", key=key).json()["addresses"]) == 1
    other = client.post("/v1/managed-addresses", {"name": "bob"}, key=key, headers=headers)
    other.error("idempotency_key_reuse")
    assert other.code == 409
    # Keys are per caller: the admin's same key is a different key.
    admin = client.post(
        "/v1/mail/spam-rules", {"kind": "domain", "value": "x.test"}, headers=headers
    )
    assert admin.code == 201
    now.advance(24 * 3600 + 1)  # forgotten after 24 hours
    later = client.post("/v1/managed-addresses", {"name": "bob"}, key=key, headers=headers)
    assert later.code == 201 and "idempotent-replayed" not in later.headers


def test_idempotency_replays_errors_too(client: Client) -> None:
    headers = {"Idempotency-Key": "k1"}
    a = client.post("/v1/managed-addresses", {"name": "a", "device_id": "dev_x"}, headers=headers)
    b = client.post("/v1/managed-addresses", {"name": "a", "device_id": "dev_x"}, headers=headers)
    assert a.code == b.code == 404 and a.json() == b.json()
    bad = client.post("/v1/managed-addresses", {"name": "a"}, headers={"Idempotency-Key": "é"})
    assert bad.code == 400


# -- devices ---------------------------------------------------------------------------------


def test_registration_approval_and_scoping(client: Client, store: Store) -> None:
    reg = client.post(
        "/v1/devices/register", {"name": "nas", "connector_smtp_addr": "100.64.0.7:2525"}, key=None
    )
    assert reg.code == 201, reg.body
    info = reg.json()
    assert info["status"] == "pending" and info["device_id"] in info["approval_url"]
    poll = {"registration_id": info["registration_id"], "poll_token": info["poll_token"]}
    assert client.post("/v1/devices/register/status", poll, key=None).json()["status"] == "pending"
    wrong = {**poll, "poll_token": "tpr_wrong"}
    client.post("/v1/devices/register/status", wrong, key=None).error("invalid_poll_token")
    unknown = {**poll, "registration_id": "reg_unknown"}
    client.post("/v1/devices/register/status", unknown, key=None).error("registration_not_found")
    listed = client.get("/v1/devices").json()["devices"]
    assert [d["registration_code"] for d in listed] == [info["code"]]

    a_id, a_key = client.device("alpha")
    client.post(f"/v1/devices/{info['device_id']}/approve", key=a_key).error("admin_only")
    r = client.post(f"/v1/devices/{info['code'].lower()}/approve".replace("-", ""))
    assert r.code == 200, r.body
    assert r.json()["auth_status"] == "authorized"
    status = client.post("/v1/devices/register/status", poll, key=None).json()
    assert status["status"] == "authorized" and status["device_key"].startswith("tpk_")
    assert status["connector"]["username"] == "edge" and len(status["connector"]["password"]) > 20
    device = store.get_device(info["device_id"])
    assert device is not None and device.connector_smtp_addr == "100.64.0.7:2525"
    assert device.key_hash is None  # keys live hashed in their own table
    b_key = status["device_key"]

    # Each device sees and changes only its own account's records.
    client.post("/v1/mail/spam-rules", {"kind": "domain", "value": "a.test"}, key=a_key)
    rule_b = client.post("/v1/mail/spam-rules", {"kind": "domain", "value": "b.test"}, key=b_key)
    assert [x["value"] for x in client.get("/v1/mail/spam-rules", key=a_key).json()["rules"]] == [
        "a.test"
    ]
    client.delete(f"/v1/mail/spam-rules/{rule_b.json()['id']}", key=a_key).error("rule_not_found")
    client.post(
        "/v1/managed-addresses", {"name": "x", "device_id": info["device_id"]}, key=a_key
    ).error("device_not_found")
    assert [d["id"] for d in client.get("/v1/devices", key=a_key).json()["devices"]] == [a_id]
    assert len(client.get("/v1/mail/spam-rules").json()["rules"]) == 2  # the admin sees all

    # A second poll issues a fresh key and retires the previous one.
    again = client.post("/v1/devices/register/status", poll, key=None).json()
    client.get("/v1/devices", key=b_key).error("auth_invalid_key")
    assert client.get("/v1/devices", key=again["device_key"]).code == 200


def test_joining_an_existing_account(client: Client) -> None:
    a_id, a_key = client.device("alpha")
    account = client.get("/v1/devices", key=a_key).json()["devices"][0]["account_id"]
    b_id, b_key = client.device("beta", account=account)
    seen = {d["id"] for d in client.get("/v1/devices", key=a_key).json()["devices"]}
    assert seen == {a_id, b_id}
    reg = client.post("/v1/devices/register", {"name": "gamma"}, key=None).json()
    r = client.post(f"/v1/devices/{reg['device_id']}/approve", {"account_id": "acct_nope"})
    r.error("device_not_found")


def test_expired_registration_cannot_be_approved(client: Client, now: Any) -> None:
    reg = client.post("/v1/devices/register", {"name": "slow"}, key=None).json()
    now.advance(3601)
    poll = {"registration_id": reg["registration_id"], "poll_token": reg["poll_token"]}
    assert client.post("/v1/devices/register/status", poll, key=None).json()["status"] == "expired"
    client.post(f"/v1/devices/{reg['code']}/approve").error("registration_closed")
    client.post("/v1/devices/dev_unknown/approve").error("device_not_found")
    client.post("/v1/devices/dev_unknown/revoke").error("device_not_found")


def test_register_validates(client: Client) -> None:
    client.post("/v1/devices/register", {"name": ""}, key=None).error("validation_failed")
    client.post("/v1/devices/register", {"name": "a\nb"}, key=None).error("validation_failed")
    bad_addr = {"name": "a", "connector_smtp_addr": "no-port"}
    client.post("/v1/devices/register", bad_addr, key=None).error("validation_failed")


# -- the OpenAPI document --------------------------------------------------------------------


def test_openapi_document_matches_the_routes(client: Client) -> None:
    doc = client.get("/v1/openapi.json", key=None).json()
    assert doc["openapi"] == "3.1.0"
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    served = set()
    for rule in client.api.app.url_map.iter_rules():
        path = re.sub(r"<(\w+)>", r"{\1}", rule.rule.replace("<ident>", "{id}"))
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                served.add((method, path))
    assert documented == served
    schemas = doc["components"]["schemas"]
    create = schemas["ManagedAddressCreate"]
    assert create["additionalProperties"] is False and create["required"] == ["name"]
    for item in doc["paths"].values():
        for op in item.values():
            for ref in _refs(op):
                assert ref.rsplit("/", 1)[1] in schemas, ref


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []
