"""BYOD onboarding endpoints (scan, fallback, ownership, prepare) over a local DNS zone, and
the SPF merge and DKIM keys behind them."""

from __future__ import annotations

from typing import Any

import dkim
import pytest

from edge.dns.resolver import DNSResolver
from edge.domains.scan import DomainInspector, merge_spf
from tests.dnsserver import HANG
from tests.test_control_support import (  # noqa: F401
    EDGE,
    Client,
    client_fixture,
    make_client_fixture,
    now_fixture,
    store_fixture,
)

DOMAIN = "byod.test"


def zone(dns: Any, spf: str | None = "v=spf1 include:_spf.oldmail.test ~all") -> None:
    dns.zone.set(DOMAIN, "MX", [(10, "mx1.oldmail.test"), (20, "mx2.oldmail.test")])
    if spf is not None:
        dns.zone.set(DOMAIN, "TXT", [spf, "google-site-verification=abc"])
    dns.zone.set(
        "_spf.oldmail.test", "TXT", ["v=spf1 ip4:192.0.2.0/24 include:_b.oldmail.test -all"]
    )
    dns.zone.set("_b.oldmail.test", "TXT", ["v=spf1 a mx -all"])
    dns.zone.set(EDGE, "A", ["198.51.100.7"])


def by_category(records: list[dict[str, Any]], category: str) -> list[dict[str, Any]]:
    return [r for r in records if r["category"] == category]


def test_scan_reports_mx_ownership_and_old_hosts(client: Client, dns_server: Any) -> None:
    zone(dns_server)
    _device, key = client.device()
    r = client.post("/v1/dns/scan", {"domain": DOMAIN}, key=key)
    assert r.code == 200, r.body
    scan = r.json()
    assert scan["existing_mx"] == [
        {"priority": 10, "host": "mx1.oldmail.test"},
        {"priority": 20, "host": "mx2.oldmail.test"},
    ]
    assert scan["fallback_hosts"] == ["mx1.oldmail.test", "mx2.oldmail.test"]
    assert [h["host"] for h in scan["authoritative_hosts"]] == scan["fallback_hosts"]
    assert all(h["reachable"] is False for h in scan["authoritative_hosts"])
    assert scan["dns_status"]["mx_to_edge"] == {"status": "pending", "value": f"10 {EDGE}"}
    assert scan["dns_status"]["txt_verify"]["status"] == "missing"
    record = scan["ownership_dns_record"]
    assert record["host"] == f"_tailpost.{DOMAIN}" and record["status"] == "pending"
    assert record["value"].startswith("tailpost-verification=")
    # The route exists now, and a second scan reuses it.
    again = client.post("/v1/dns/scan", {"domain": DOMAIN, "route_id": scan["route_id"]}, key=key)
    assert again.json()["route_id"] == scan["route_id"]
    assert again.json()["ownership_dns_record"]["value"] == record["value"]
    dns_server.zone.set(DOMAIN, "MX", [(5, EDGE), (10, "mx1.oldmail.test")])
    dns_server.zone.set(f"_tailpost.{DOMAIN}", "TXT", [record["value"]])
    client.api.ops.inspector.resolver.clear_cache()
    live = client.post("/v1/dns/scan", {"domain": DOMAIN}, key=key).json()
    assert live["dns_status"]["mx_to_edge"]["status"] == "ok"
    assert live["dns_status"]["txt_verify"]["status"] == "ok"
    assert live["fallback_hosts"] == ["mx1.oldmail.test"]


def test_scan_errors(client: Client, dns_server: Any) -> None:
    zone(dns_server)
    _a, a_key = client.device("a")
    _b, b_key = client.device("b")
    client.post("/v1/dns/scan", {"domain": "not_a_domain"}, key=a_key).error("validation_failed")
    a_scan = client.post("/v1/dns/scan", {"domain": DOMAIN}, key=a_key).json()
    # An unproven claim blocks nobody: b gets a claim (and a token) of its own.
    b_scan = client.post("/v1/dns/scan", {"domain": DOMAIN}, key=b_key).json()
    assert b_scan["route_id"] != a_scan["route_id"]
    assert b_scan["ownership_dns_record"]["value"] != a_scan["ownership_dns_record"]["value"]
    client.post("/v1/dns/scan", {"domain": DOMAIN, "route_id": "route_x"}, key=a_key).error(
        "route_mismatch"
    )
    dns_server.zone.set("slow.test", "MX", [HANG])
    r = client.post("/v1/dns/scan", {"domain": "slow.test"}, key=a_key)
    assert r.code == 503
    r.error("dns_unavailable")


def test_fallback_keeps_previous_mx(client: Client, dns_server: Any) -> None:
    zone(dns_server)
    _device, key = client.device()
    r = client.post("/v1/dns/fallback", {"domain": DOMAIN}, key=key)
    assert r.code == 200, r.body
    route = r.json()
    assert route["previous_mx"] == [
        {"priority": 10, "host": "mx1.oldmail.test"},
        {"priority": 20, "host": "mx2.oldmail.test"},
    ]
    assert route["fallback_hosts"] == ["mx1.oldmail.test", "mx2.oldmail.test"]
    assert route["setup_stage"] == "ready_for_dns" and route["status"] == "pending_dns"
    given = {"domain": DOMAIN, "previous_mx": [{"priority": 1, "host": "Legacy.Example.net."}]}
    r = client.post("/v1/dns/fallback", given, key=key)
    assert r.json()["fallback_hosts"] == ["legacy.example.net"]
    assert r.json()["authoritative_hosts"] == [
        {"host": "legacy.example.net", "port": 1, "tls_mode": "starttls"}
    ]


def test_verify_ownership(client: Client, dns_server: Any) -> None:
    zone(dns_server)
    _device, key = client.device()
    client.post("/v1/custom-domains/verify-ownership", {"domain": DOMAIN}, key=key).error(
        "domain_not_scanned"
    )
    scan = client.post("/v1/dns/scan", {"domain": DOMAIN}, key=key).json()
    r = client.post("/v1/custom-domains/verify-ownership", {"domain": DOMAIN}, key=key)
    assert r.code == 200 and r.json()["status"] == "pending"
    assert r.json()["ownership_dns_record"]["status"] == "pending"
    dns_server.zone.set(f"_tailpost.{DOMAIN}", "TXT", ["tailpost-verification=wrong"])
    r = client.post("/v1/custom-domains/verify-ownership", {"domain": DOMAIN}, key=key)
    assert r.json()["status"] == "pending"
    client.api.ops.inspector.resolver.clear_cache()
    value = scan["ownership_dns_record"]["value"]
    dns_server.zone.set(f"_tailpost.{DOMAIN}", "TXT", ["other", value])
    r = client.post("/v1/custom-domains/verify-ownership", {"domain": DOMAIN}, key=key)
    assert r.json()["status"] == "ok"
    assert r.json()["ownership_dns_record"]["status"] == "ok"
    routes = client.get("/v1/email-routes", key=key).json()["routes"]
    assert routes[0]["ownership_verified"] is True


def test_prepare_lists_records_and_moves_stages(client: Client, dns_server: Any) -> None:
    zone(dns_server)
    device_id, key = client.device()
    r = client.post("/v1/custom-domains/prepare", {"domain": DOMAIN}, key=key)
    assert r.code == 200, r.body
    prep = r.json()
    records = prep["required_dns_records"]
    assert [r["category"] for r in records] == [
        "mx_to_edge", "spf", "dkim", "dkim", "dmarc", "ownership"
    ]  # fmt: skip
    assert all(r["status"] == "pending" for r in records)
    mx = by_category(records, "mx_to_edge")[0]
    assert (mx["host"], mx["value"], mx["priority"]) == (DOMAIN, EDGE, 10)
    spf = by_category(records, "spf")[0]
    assert spf["value"] == f"v=spf1 include:_spf.oldmail.test a:{EDGE} ~all"
    assert spf["replaces"] == "v=spf1 include:_spf.oldmail.test ~all"
    assert spf["lookups"] == 5  # include, nested include, a, mx, and ours
    route = prep["route"]
    assert route["connector_id"] == device_id and route["previous_mx"]  # old MX kept
    assert route["status"] == "pending_dns"
    algorithms = [k["algorithm"] for k in prep["dkim_keys"]]
    assert algorithms == ["rsa", "ed25519"]

    # Publishing everything but the MX: ready. Then the MX: active.
    for record in records:
        if record["type"] == "TXT":
            dns_server.zone.set(record["host"], "TXT", [record["value"]])
    dns_server.zone.set(f"_dmarc.{DOMAIN}", "TXT", ["v=DMARC1; p=none; adkim=r; aspf=r"])
    client.api.ops.inspector.resolver.clear_cache()
    again = client.post("/v1/custom-domains/prepare", {"domain": DOMAIN}, key=key).json()
    assert again["dkim_keys"] == prep["dkim_keys"]  # keys are made once
    assert again["route"]["status"] == "ready" and again["route"]["setup_stage"] == "awaiting_mx"
    statuses = {r["category"]: r["status"] for r in again["required_dns_records"]}
    assert statuses == {"mx_to_edge": "pending", "spf": "ok", "dkim": "ok", "ownership": "ok"}
    dns_server.zone.set(DOMAIN, "MX", [(10, EDGE)])
    client.api.ops.inspector.resolver.clear_cache()
    final = client.post("/v1/custom-domains/prepare", {"domain": DOMAIN}, key=key).json()
    assert final["route"]["status"] == "active" and final["route"]["setup_stage"] == "active"
    assert final["route"]["previous_mx"] == route["previous_mx"]  # never overwritten


def test_byod_address_needs_prepare_and_ownership(client: Client, dns_server: Any) -> None:
    zone(dns_server)
    _device, key = client.device()
    body = {"name": "alice", "domain": DOMAIN}
    r = client.post("/v1/byod-addresses", body, key=key)
    assert r.code == 409 and r.error("domain_not_prepared")["action"] == "prepare_domain"
    client.post("/v1/dns/scan", {"domain": DOMAIN}, key=key)
    client.post("/v1/byod-addresses", body, key=key).error("domain_not_prepared")
    prep = client.post("/v1/custom-domains/prepare", {"domain": DOMAIN}, key=key).json()
    r = client.post("/v1/byod-addresses", body, key=key)
    assert r.error("domain_ownership_unverified")["action"] == "verify_ownership"
    ownership = by_category(prep["required_dns_records"], "ownership")[0]
    dns_server.zone.set(ownership["host"], "TXT", [ownership["value"]])
    client.post("/v1/custom-domains/verify-ownership", {"domain": DOMAIN}, key=key)
    r = client.post("/v1/byod-addresses", {"name": "Alice", "domain": DOMAIN.upper()}, key=key)
    assert r.code == 201, r.body
    assert r.json()["address"] == f"alice@{DOMAIN}"
    client.post("/v1/byod-addresses", body, key=key).error("address_taken")
    listed = client.get("/v1/byod-addresses", key=key).json()["addresses"]
    assert [a["address"] for a in listed] == [f"alice@{DOMAIN}"]
    _other, other_key = client.device("other")
    assert client.get("/v1/byod-addresses", key=other_key).json() == {"addresses": []}
    client.delete(f"/v1/byod-addresses/{listed[0]['id']}", key=other_key).error("address_not_found")
    assert client.delete(f"/v1/byod-addresses/{listed[0]['id']}", key=key).code == 200


def test_dkim_keys_sign_and_verify(client: Client, dns_server: Any) -> None:
    zone(dns_server)
    prep = client.post("/v1/custom-domains/prepare", {"domain": DOMAIN}).json()
    published = {k["host"]: k["value"] for k in prep["dkim_keys"]}
    stored = client.api.access.dkim_keys(DOMAIN)
    message = b"From: a@byod.test\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"
    for key in stored:
        algorithm = b"rsa-sha256" if key.algorithm == "rsa" else b"ed25519-sha256"
        signature = dkim.sign(
            message,
            key.selector.encode(),
            DOMAIN.encode(),
            key.private_key.encode(),
            signature_algorithm=algorithm,
            include_headers=[b"from", b"to", b"subject"],
        )

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
            return published[name.decode().rstrip(".")].encode()

        assert dkim.verify(signature + message, dnsfunc=dnsfunc)
    rsa = next(k for k in stored if k.algorithm == "rsa")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    assert load_pem_private_key(rsa.private_key.encode(), None).key_size == 2048  # type: ignore[union-attr]


def test_dkim_records_endpoint(client: Client, dns_server: Any) -> None:
    zone(dns_server)
    _device, key = client.device("owner")
    _other, other_key = client.device("other")
    path = f"/v1/custom-domains/{DOMAIN}/dkim"
    client.get(path, key=key).error("domain_not_found")  # no route yet
    prep = client.post("/v1/custom-domains/prepare", {"domain": DOMAIN}, key=key).json()
    mine = client.get(path, key=key)
    assert mine.code == 200, mine.body
    body = mine.json()
    assert body["domain"] == DOMAIN and body["route_id"] == prep["route_id"]
    records = body["dkim_keys"]
    assert [r["algorithm"] for r in records] == ["rsa", "ed25519"]
    # The same keys prepare listed, as TXT records cut into 255-octet strings.
    assert [(r["host"], r["value"]) for r in records] == [
        (k["host"], k["value"]) for k in prep["dkim_keys"]
    ]
    for r in records:
        assert r["type"] == "TXT" and "".join(r["txt_strings"]) == r["value"]
        assert all(len(x) <= 255 for x in r["txt_strings"])
        assert r["zone_line"].startswith(f'{r["host"]}. IN TXT "v=DKIM1; k={r["algorithm"]}; p=')
    assert len(records[0]["txt_strings"]) == 2  # RSA-2048: one string is not enough
    assert "PRIVATE" not in mine.body.decode() and "private" not in mine.body.decode()
    # The admin sees it; another account, a bad key, a bad domain do not.
    assert client.get(path).json() == body
    assert client.get(f"/v1/custom-domains/{DOMAIN.upper()}./dkim").json() == body
    client.get(path, key=other_key).error("domain_not_found")
    client.get(path, key="not-a-key").error("auth_invalid_key")
    client.get(path, key=None).error("auth_missing_header")
    client.get("/v1/custom-domains/not_a_domain/dkim").error("domain_not_found")


# -- SPF merging -----------------------------------------------------------------------------


@pytest.fixture(name="inspector")
def inspector_fixture(dns_server: Any) -> DomainInspector:
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=2.0)
    return DomainInspector(resolver, helo_name=EDGE, probe_port=1, probe_timeout=1.0)


def test_merge_spf_keeps_terms_and_order() -> None:
    assert merge_spf(None, ["a:edge.test"]) == "v=spf1 a:edge.test ~all"
    assert merge_spf("v=spf1 mx -all", ["a:edge.test"]) == "v=spf1 mx a:edge.test -all"
    assert (
        merge_spf("v=spf1 ip4:192.0.2.1 redirect=_spf.x.test", ["a:e.test"])
        == "v=spf1 ip4:192.0.2.1 a:e.test redirect=_spf.x.test"
    )
    assert merge_spf("v=spf1 a:e.test -all", ["A:E.test"]) == "v=spf1 a:e.test -all"
    assert merge_spf("v=spf1 include:x.test", ["a:e.test"]) == "v=spf1 include:x.test a:e.test"


def _includes(dns: Any, count: int) -> str:
    for i in range(count):
        dns.zone.set(f"i{i}.spf.test", "TXT", [f"v=spf1 ip4:192.0.2.{i} -all"])
    return "v=spf1 " + " ".join(f"include:i{i}.spf.test" for i in range(count)) + " -all"


def test_spf_within_ten_lookups(inspector: DomainInspector, dns_server: Any) -> None:
    dns_server.zone.set(EDGE, "A", ["198.51.100.7"])
    dns_server.zone.set("nine.test", "TXT", [_includes(dns_server, 9)])
    plan = inspector.plan_spf("nine.test", EDGE)
    assert plan.status == "pending" and plan.lookups == 10
    assert plan.value.endswith(f"include:i8.spf.test a:{EDGE} -all")
    dns_server.zone.set("ten.test", "TXT", [_includes(dns_server, 10)])
    plan = inspector.plan_spf("ten.test", EDGE)
    assert plan.status == "pending" and plan.lookups == 10
    assert plan.value.endswith("include:i9.spf.test ip4:198.51.100.7 -all")  # no lookup needed
    dns_server.zone.set("eleven.test", "TXT", [_includes(dns_server, 11)])
    plan = inspector.plan_spf("eleven.test", EDGE)
    assert plan.status == "error" and "flatten" in plan.note
    assert plan.value == plan.existing  # never a record that drops or breaks anything


def test_spf_special_cases(inspector: DomainInspector, dns_server: Any) -> None:
    dns_server.zone.set("none.test", "TXT", ["unrelated"])
    assert inspector.plan_spf("none.test", EDGE).value == f"v=spf1 a:{EDGE} ~all"
    dns_server.zone.set("two.test", "TXT", ["v=spf1 mx -all", "v=spf1 a -all"])
    assert inspector.plan_spf("two.test", EDGE).status == "error"
    dns_server.zone.set("done.test", "TXT", [f"v=spf1 mx a:{EDGE} -all"])
    plan = inspector.plan_spf("done.test", EDGE)
    assert plan.status == "ok" and plan.value == f"v=spf1 mx a:{EDGE} -all"
    dns_server.zone.set("ip.test", "TXT", ["v=spf1 ip4:10.0.0.1 -all"])
    plan = inspector.plan_spf("ip.test", EDGE, "ip4:203.0.113.5")
    assert plan.value == "v=spf1 ip4:10.0.0.1 ip4:203.0.113.5 -all" and plan.lookups == 0
