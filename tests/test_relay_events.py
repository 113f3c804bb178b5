"""`GET /v1/outbound/events`: the delivery events of relayed mail (a device sees only its own
relayed mail, the admin key every device's)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from edge.store import Store
from edge.store.events import DeliveryEvents
from edge.store.outbound import OutboundStore
from tests.test_control_support import (  # noqa: F401
    Client,
    client_fixture,
    make_client_fixture,
    now_fixture,
    store_fixture,
)

AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


# -- GET /v1/outbound/events ----------------------------------------------------------------------


def _relayed(store: Store, qid: str, device_id: str, account_id: str) -> None:
    OutboundStore(store).record(qid, device_id, account_id, f"me@{qid.lower()}.test", AT)


def test_a_device_sees_the_events_of_its_own_relayed_mail_only(
    client: Client, store: Store
) -> None:
    mine, my_key = client.device("laptop")
    theirs, their_key = client.device("desktop")
    account = {d.id: d.account_id for d in store.list_devices()}
    _relayed(store, "AAAA0000000001", mine, account[mine])
    _relayed(store, "BBBB0000000002", theirs, account[theirs])
    t = AT.timestamp()
    DeliveryEvents(store).record(
        [
            ("AAAA0000000001", "x@far.test", "accepted", "", t),
            ("BBBB0000000002", "y@far.test", "accepted", "", t),
            ("CCCC0000000003", "me@home.test", "accepted", "", t),  # inbound: nobody's
            ("AAAA0000000001", "x@far.test", "delivered", "250 2.0.0 ok", t + 1),
            ("BBBB0000000002", "y@far.test", "bounced", "550 5.1.1 no", t + 1),
        ]
    )

    r = client.get("/v1/outbound/events", key=my_key)
    assert r.code == 200, r.body
    body = r.json()
    assert [(e["queue_id"], e["event"]) for e in body["events"]] == [
        ("AAAA0000000001", "accepted"),
        ("AAAA0000000001", "delivered"),
    ]
    first, last = body["events"]
    assert first["id"] < last["id"] and body["next_after"] == last["id"]
    assert last == {
        "id": last["id"],
        "queue_id": "AAAA0000000001",
        "recipient": "x@far.test",
        "event": "delivered",
        "detail": "250 2.0.0 ok",
        "created_at": "2026-12-07T12:00:01.000000Z",
    }
    # Paging: after the last one seen there is nothing; `limit` cuts.
    after = client.get(f"/v1/outbound/events?after={last['id']}", key=my_key).json()
    assert after == {"events": [], "next_after": last["id"]}
    one = client.get("/v1/outbound/events?limit=1", key=my_key).json()
    assert [e["id"] for e in one["events"]] == [first["id"]] and one["next_after"] == first["id"]

    theirs_seen = client.get("/v1/outbound/events", key=their_key).json()["events"]
    assert {e["queue_id"] for e in theirs_seen} == {"BBBB0000000002"}
    # The admin key: every device's relayed mail, and still no inbound mail.
    every = client.get("/v1/outbound/events").json()["events"]
    assert [e["queue_id"] for e in every] == [
        "AAAA0000000001",
        "BBBB0000000002",
        "AAAA0000000001",
        "BBBB0000000002",
    ]


@pytest.mark.parametrize(
    "query",
    [
        "after=-1",
        "after=x",
        "limit=0",
        "limit=501",
        "limit=1.5",
        "limit=1&limit=2",
        "colour=red",
        "after=99999999999999999999999",
    ],
)
def test_bad_queries_are_refused_with_the_error_shape(client: Client, query: str) -> None:
    r = client.get(f"/v1/outbound/events?{query}")
    assert r.code == 400
    assert "Traceback" not in r.error("validation_failed")["error"]


def test_the_events_need_a_live_key(client: Client) -> None:
    device_id, key = client.device()
    client.get("/v1/outbound/events", key=None).error("auth_missing_header")
    assert client.post(f"/v1/devices/{device_id}/revoke").code == 200
    client.get("/v1/outbound/events", key=key).error("auth_invalid_key")


def test_the_openapi_document_describes_the_query(client: Client) -> None:
    doc = client.get("/v1/openapi.json", key=None).json()
    op = doc["paths"]["/v1/outbound/events"]["get"]
    params = {p["name"]: p for p in op["parameters"]}
    assert set(params) == {"after", "limit"}
    assert params["limit"]["in"] == "query"
    assert params["limit"]["schema"]["maximum"] == 500
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/OutboundEventList"
    )


def test_a_bad_query_without_a_key_is_401_first(client: Client) -> None:
    r = client.get("/v1/outbound/events?limit=0", key=None)
    assert r.code == 401
    r.error("auth_missing_header")
