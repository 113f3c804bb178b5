"""The MX's policy across the hop to the device: one loop rule, the role addresses.

End to end with the real processes (an edge and a device, as deployed): what the edge
accepts reaches the device's Maildir, what it refuses is refused at end of DATA (never
accepted and bounced later). The recipient rule itself (`RecipientResolver`) over a real
store, and the loop rule (`is_loop`) at the DataReader, are tested in process.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.delivery.routing import Postmaster, RecipientResolver, Router
from edge.smtp import replies
from edge.smtp.data import DataReader, Limits, is_loop
from edge.store import Store, open_store
from edge.store.keyring import StoreKeys
from tests.processes import Process, edge_and_device, host_port, maildir_new, wait_for

LIMIT = 50  # the default [edge] max_received_headers, which both processes use
HOP = (
    b"Received: from relay%d.example.net by relay%d.example.net; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, str]]:
    """An edge and its device; me@home.test is the device's; the operator's postmaster
    address is that same address."""
    edge, device = edge_and_device(tmp_path_factory.mktemp("policy"), address="me@home.test")
    text = edge.config_path.read_text()
    edge.config_path.write_text(text.replace("[edge]\n", '[edge]\npostmaster = "me@home.test"\n'))
    device.start()
    try:
        listeners = edge.start()
        try:
            yield device, listeners["mx"]
        finally:
            edge.stop()
    finally:
        device.stop()


def stored(device: Process) -> list[bytes]:
    new = maildir_new(device)
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def send(mx: str, rcpt: str, data: bytes, sender: str = "carol@sender.test") -> tuple[int, bytes]:
    host, port = host_port(mx)
    with smtplib.SMTP(host, port, timeout=20) as client:
        client.ehlo("client.sender.test")
        assert client.mail(sender)[0] == 250
        code, text = client.rcpt(rcpt)
        if code != 250:
            return code, text
        return client.data(data)


def with_hops(count: int, subject: str) -> bytes:
    hops = b"".join(HOP % (i, i) for i in range(count))
    return hops + f"Subject: {subject}\r\nFrom: carol@sender.test\r\n\r\nbody\r\n".encode()


def test_received_count_at_limit_minus_one_is_delivered_at_limit_refused_at_data(
    deployed: tuple[Process, str],
) -> None:
    device, mx = deployed
    for count in (LIMIT, LIMIT + 1):
        code, text = send(mx, "me@home.test", with_hops(count, f"hops {count}"))
        # Refused at the end of DATA by the edge itself: nothing accepted, nothing to bounce.
        assert (code, text[:5]) == (554, b"5.4.6"), (count, code, text)
    code, text = send(mx, "me@home.test", with_hops(LIMIT - 1, "hops 49"))
    assert code == 250, text

    # The edge added its own Received (LIMIT in all): the connector stores it.
    wait_for(lambda: any(b"Subject: hops 49" in m for m in stored(device)), timeout=30)
    [message] = [m for m in stored(device) if b"Subject: hops 49" in m]
    head = message.split(b"\r\n\r\n", 1)[0]
    assert head.lower().count(b"\r\nreceived:") == LIMIT
    assert all(b"Subject: hops 5" not in m for m in stored(device))


def test_role_addresses_of_a_routed_domain_reach_its_device(
    deployed: tuple[Process, str],
) -> None:
    device, mx = deployed
    for rcpt in ("postmaster@home.test", "Abuse@HOME.test", "Postmaster"):
        body = f"Subject: role {rcpt}\r\n\r\nhello\r\n".encode()
        code, text = send(mx, rcpt, body)
        assert code == 250, (rcpt, code, text)

    def roles() -> list[bytes]:
        return [m for m in stored(device) if b"Subject: role " in m]

    wait_for(lambda: len(roles()) == 3, timeout=30)
    tops = sorted(m.split(b"X-Tailpost-Queue-ID", 1)[0] for m in roles())
    assert tops == sorted(
        b"Return-Path: <carol@sender.test>\r\nDelivered-To: %s\r\n" % r
        for r in (b"postmaster@home.test", b"Abuse@HOME.test", b"postmaster")
    )


def test_other_addresses_stay_refused_at_rcpt(deployed: tuple[Process, str]) -> None:
    _device, mx = deployed
    for rcpt in ("nobody@home.test", "postmaster@unrouted.test", "abuse@unrouted.test"):
        code, text = send(mx, rcpt, b"Subject: x\r\n\r\nx\r\n")
        assert (code, text[:5]) == (550, b"5.1.1"), (rcpt, code, text)


# -- the loop rule at the data reader ---------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    def finish(self) -> replies.Reply:
        return replies.S250_OK

    def abort(self) -> None:
        self.data = b""


@pytest.mark.parametrize("line_by_line", [False, True], ids=["whole-section", "line-by-line"])
@pytest.mark.parametrize(
    ("own", "count", "loop"),
    [(1, 2, False), (1, 3, True), (0, 3, False), (0, 4, True)],
)
def test_a_hop_refuses_what_its_own_received_would_take_past_the_limit(
    own: int, count: int, loop: bool, line_by_line: bool
) -> None:
    limits = Limits(max_received_headers=3, own_received=own)
    assert is_loop(count, limits) is loop
    reader = DataReader(limits, Sink())
    head = b"".join(HOP % (i, i) for i in range(count))
    # A dot-stuffed header line makes the reader go line by line instead of taking the
    # whole header section at once; both must apply the same rule.
    extra = b"..dotted: x\r\n" if line_by_line else b""
    ended, _rest = reader.feed(head + extra + b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert ended
    assert reader.error == (replies.S554_LOOP if loop else None)


# -- the recipient rule over a real store -------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'control.db'}", keys=StoreKeys.generate())
    try:
        yield opened
    finally:
        opened.close()


def rule(store: Store, operator: str = "", own: tuple[str, ...] = ()) -> RecipientResolver:
    return RecipientResolver(
        store.resolve_recipient, store.routed_domain, Postmaster(operator, own)
    )


def test_role_addresses_go_to_the_domain_owner_whatever_the_delivery_mode(store: Store) -> None:
    owner = store.create_device("owner", connector_smtp_addr="100.64.0.7:2525")
    ops = store.create_device("ops", connector_smtp_addr="100.64.0.9:2525")
    store.create_route(
        "split.test",
        type="byod",
        connector_id=owner.id,
        status="active",
        authoritative_hosts=[{"host": "192.0.2.1", "port": 25, "tls_mode": "none"}],
    )
    store.create_route("ops.test", type="byod", connector_id=ops.id, status="active")
    store.add_byod_address("ops", "ops.test", ops.id)
    resolve = rule(store, "ops@ops.test", ("managed.test", "edge.test"))

    for role in ("postmaster@split.test", "ABUSE@Split.Test"):
        found = resolve(role)
        assert found is not None and found.kind == "device" and found.device_id == owner.id
    # Any other address of the split domain still goes to the old MX.
    other = resolve("bob@split.test")
    assert other is not None and other.kind == "upstream"
    # The managed domain, the edge's own name and the bare postmaster: the operator's.
    for role in ("postmaster@managed.test", "abuse@edge.test", "postmaster", "POSTMASTER"):
        found = resolve(role)
        assert found is not None and found.device_id == ops.id, role
        assert found.address == role
    # Nobody's domain, a non-role address, a bare address other than postmaster: no one.
    for nobody in ("postmaster@elsewhere.test", "hostmaster@managed.test", "abuse", "root"):
        assert resolve(nobody) is None, nobody


def test_role_address_without_owner_goes_to_the_operator_or_is_refused(store: Store) -> None:
    ops = store.create_device("ops", connector_smtp_addr="100.64.0.9:2525")
    store.create_route("ops.test", type="byod", connector_id=ops.id, status="active")
    store.add_byod_address("ops", "ops.test", ops.id)
    gone = store.create_device("gone", connector_smtp_addr="100.64.0.8:2525")
    store.create_route(
        "old.test",
        type="byod",
        connector_id=gone.id,
        status="active",
        authoritative_hosts=[{"host": "192.0.2.1", "port": 25, "tls_mode": "none"}],
    )
    store.create_route(
        "dm.test", type="byod", connector_id=gone.id, delivery_mode="device", status="active"
    )
    store.create_route("off.test", type="byod", connector_id=ops.id, status="disabled")
    store.update_device(gone.id, auth_status="revoked")
    # The owner's device is revoked: a split domain's role mail follows the split rule to
    # the old MX; a domain with no old MX sends it to the operator.
    found = rule(store, "ops@ops.test")("postmaster@old.test")
    assert found is not None and found.kind == "upstream"
    found = rule(store, "ops@ops.test")("abuse@dm.test")
    assert found is not None and found.device_id == ops.id
    assert rule(store, "")("abuse@dm.test") is None
    # A disabled route receives nothing, role addresses included.
    assert rule(store, "ops@ops.test")("postmaster@off.test") is None
    # With no operator address, the bare postmaster and the managed domain's role addresses
    # have nowhere to go: refused (550 5.1.1) rather than accepted and bounced.
    assert rule(store, "", ("managed.test",))("postmaster") is None
    assert rule(store, "", ("managed.test",))("postmaster@managed.test") is None
    # An operator address that reaches no device does not count.
    assert rule(store, "someone@elsewhere.test", ("managed.test",))("postmaster") is None


def test_router_finds_the_target_the_mx_accepted(store: Store) -> None:
    owner = store.create_device("owner", connector_smtp_addr="100.64.0.7:2525")
    store.create_route("home.test", type="byod", connector_id=owner.id, status="active")
    router = Router(rule(store, "", ("home.test",)), None)
    for rcpt in ("postmaster@home.test", "abuse@home.test", "postmaster"):
        target = router.target(rcpt, "inbound")
        assert target.kind == "device" and target.device_id == owner.id
        assert target.hosts == (("100.64.0.7", 2525),)
