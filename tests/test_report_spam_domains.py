"""A spam report never blocks what the account or the edge serves, and blocks a domain only
when the edge authenticated it.

The rule: the edge's `/v1/mail/spam-rules` refuses (409 `served_domain`) a domain rule for,
above or (for the edge's own names) below a served domain, and a sender rule for one of the
account's own addresses, whoever asks. The example: the device's report-spam picks the
domain from the edge's Authentication-Results (DMARC pass, or aligned DKIM or SPF pass),
blocks only the address when the From domain is unauthenticated or served here, says which,
and falls back to the address when the edge refuses the domain.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from edge.store import Store
from tests.test_control_support import (  # noqa: F401
    ADMIN,
    EDGE,
    MANAGED,
    Client,
    client_fixture,
    make_client_fixture,
    now_fixture,
    store_fixture,
)
from tests.test_localapi import MESSAGES, plain
from tests.test_localapi_actions import Setup

RULES = "/v1/mail/spam-rules"


def _account_of(store: Store, device_id: str) -> str:
    device = store.get_device(device_id)
    assert device is not None
    return device.account_id


# -- the rule, at the edge -----------------------------------------------------------------------


def test_edge_refuses_rules_for_what_it_serves(client: Client, store: Store) -> None:
    device_id, key = client.device()
    account = _account_of(store, device_id)
    store.create_route("mail.own.example", type="byod", connector_id=device_id, account_id=account)
    store.create_route("ours.example", type="byod", connector_id=device_id, account_id=account)
    store.ensure_account("acct_other", "other")
    other_id, _other_key = client.device("other", account="acct_other")
    store.create_route(
        "theirs.example",
        type="byod",
        connector_id=other_id,
        account_id="acct_other",
        status="active",
        verified_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    store.create_route(
        "claimed.example", type="byod", connector_id=other_id, account_id="acct_other"
    )
    # The account's own routes, even while only claims: refused to its devices.
    for value in ("mail.own.example", "own.example", "OURS.example."):
        # (a route; above it, so covering it; normalised first)
        reply = client.post(RULES, {"kind": "domain", "value": value}, key=key)
        assert reply.code == 409, (value, reply.body)
        assert reply.error("served_domain")["action"] == "block_the_sender_address"
    # What the edge serves: refused to everyone, the admin key included.
    for value in (
        "theirs.example",  # another account's verified route
        MANAGED,
        "ns-1.mail.tailpost.test",  # below the managed domain: the edge's
        "tailpost.test",  # above the edge's names
        EDGE,
    ):
        for principal in (key, ADMIN):
            reply = client.post(RULES, {"kind": "domain", "value": value}, key=principal)
            assert reply.code == 409, (value, reply.body)
            reply.error("served_domain")
    assert client.get(RULES, key=key).json() == {"rules": []}
    for value in ("claimed.example", "spam.example", "sub.theirs-not.example"):
        reply = client.post(RULES, {"kind": "domain", "value": value}, key=key)
        assert reply.code == 201, (value, reply.body)


def test_edge_refuses_blocking_an_own_address(client: Client, store: Store) -> None:
    device_id, key = client.device()
    account = _account_of(store, device_id)
    store.create_route(
        "ours.example",
        type="byod",
        connector_id=device_id,
        account_id=account,
        status="active",
        verified_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    store.add_byod_address("me", "ours.example", device_id)
    reply = client.post(RULES, {"kind": "sender", "value": "Me@Ours.example"}, key=key)
    assert reply.code == 409
    reply.error("served_domain")
    # Another address at the served domain may be blocked (the address only).
    ok = client.post(RULES, {"kind": "sender", "value": "forger@ours.example"}, key=key)
    assert ok.code == 201 and ok.json()["value"] == "forger@ours.example"


# -- the choice, on the device -------------------------------------------------------------------


def edge_headers(results: str, verdict: str = "action=accept; spf=pass; dkim=pass") -> str:
    """The edge's Authentication-Results right above its verdict, as the edge writes them."""
    return (
        f"Authentication-Results: mx.tailpost.test; {results}\r\nX-Tailpost-Verdict: {verdict}\r\n"
    )


def spam(sender: str, headers: str = "") -> bytes:
    return headers.encode() + plain(
        "cheap pills", sender=sender, extra="X-Tailpost-Queue-ID: q7\r\n"
    )


def report(s: Setup, data: bytes, block_domain: bool = True) -> dict[str, Any]:
    info = s.deliver(data)
    reply = s.client.post(f"{MESSAGES}/{info.id}/report-spam", {"block_domain": block_domain})
    assert reply.code == 200
    body: dict[str, Any] = reply.json()
    return body


@pytest.mark.parametrize(
    ("results", "sender", "domain", "basis"),
    [
        ("dmarc=pass header.from=bad.example", "x@bad.example", "bad.example", "dmarc_pass"),
        (
            "spf=none smtp.helo=h.test; dkim=pass header.d=bad.example header.s=s; dmarc=none",
            "x@news.bad.example",
            "news.bad.example",
            "dkim_aligned",
        ),
        (
            "spf=pass smtp.mailfrom=bounce@mail.bad.example; dkim=none; dmarc=none",
            "x@bad.example",
            "bad.example",
            "spf_aligned",
        ),
    ],
)
def test_device_blocks_the_authenticated_domain(
    tmp_path: Path, results: str, sender: str, domain: str, basis: str
) -> None:
    s = Setup(tmp_path)
    body = report(s, spam(f"Spammer <{sender}>", edge_headers(results)))
    assert body["blocked"] == {"kind": "domain", "value": domain, "basis": basis}
    assert s.edge.calls[0][2]["kind"] == "domain" and s.edge.calls[0][2]["value"] == domain
    assert body["status"] == "ok" and body["warnings"] == []


@pytest.mark.parametrize(
    "headers",
    [
        "",  # no verdict at all
        edge_headers(
            "spf=pass smtp.mailfrom=x@esp.example; dkim=pass header.d=esp.example; "
            "dmarc=fail header.from=bank.example"
        ),
        # The sender's own Authentication-Results, not right above the edge's verdict.
        "X-Tailpost-Verdict: action=accept\r\nAuthentication-Results: mx.tailpost.test; "
        "dmarc=pass header.from=bank.example\r\n",
        # dmarc=pass for another domain than the From domain.
        edge_headers("dmarc=pass header.from=esp.example"),
        edge_headers("this is ; not = parsable ((("),
    ],
)
def test_device_blocks_only_the_address_of_an_unauthenticated_domain(
    tmp_path: Path, headers: str
) -> None:
    s = Setup(tmp_path)
    body = report(s, spam("Bank <alerts@bank.example>", headers))
    assert body["blocked"] == {
        "kind": "sender",
        "value": "alerts@bank.example",
        "basis": "from_unauthenticated",
    }
    assert [c[2]["kind"] for c in s.edge.calls] == ["sender"]
    assert body["status"] == "partial"
    assert "bank.example was not authenticated" in body["warnings"][0]


def test_device_never_blocks_its_own_domain_or_address(tmp_path: Path) -> None:
    s = Setup(tmp_path)  # the device's address is alice@example.com
    dmarc_ok = edge_headers("dmarc=pass header.from=example.com")
    body = report(s, spam("Forger <boss@example.com>", dmarc_ok))
    assert body["blocked"] == {
        "kind": "sender",
        "value": "boss@example.com",
        "basis": "served_domain",
    }
    assert [c[2] for c in s.edge.calls][0]["kind"] == "sender"
    assert "example.com is a domain this device serves" in body["warnings"][0]
    s.edge.calls.clear()
    body = report(s, spam("Me <Alice@Example.com>", dmarc_ok))
    assert body["rule"] is None and body["blocked"] is None
    assert "own address" in body["warnings"][0]
    body = report(s, spam("Me <alice@example.com>"), block_domain=False)
    assert body["rule"] is None and s.edge.calls == []


class RealEdge:
    """The device's edge requester over the real `/v1` API (tests.test_control_support)."""

    def __init__(self, client: Client, key: str) -> None:
        self.client = client
        self.key = key
        self.calls: list[tuple[str, str, Any]] = []

    def request(self, method: str, path: str, json: Any = None) -> defer.Deferred[tuple[int, Any]]:
        self.calls.append((method, path, json))
        reply = self.client.call(method, path, json, key=self.key)
        return defer.succeed((reply.code, reply.json()))


def test_device_falls_back_to_the_address_when_the_edge_serves_the_domain(
    tmp_path: Path, client: Client, store: Store
) -> None:
    device_id, key = client.device()
    store.create_route(
        "second.example",
        type="byod",
        connector_id=device_id,
        account_id=_account_of(store, device_id),
    )
    edge = RealEdge(client, key)
    s = Setup(tmp_path, edge=edge)  # the device does not know second.example: the edge does
    body = report(
        s, spam("x@second.example", edge_headers("dmarc=pass header.from=second.example"))
    )
    assert [(c[2]["kind"], c[2]["value"]) for c in edge.calls] == [
        ("domain", "second.example"),
        ("sender", "x@second.example"),
    ]
    assert body["blocked"] == {
        "kind": "sender",
        "value": "x@second.example",
        "basis": "served_domain",
    }
    assert body["rule"]["kind"] == "sender" and body["rule"]["value"] == "x@second.example"
    assert "the edge refused to block second.example" in body["warnings"][0]
    rules = client.get(RULES, key=key).json()["rules"]
    assert [(r["kind"], r["value"]) for r in rules] == [("sender", "x@second.example")]
