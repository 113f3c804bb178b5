"""The delivery client sends every path verbatim, with SMTPUTF8 and BODY=8BITMIME where the
message needs them; a peer without SMTPUTF8 gets no message that needs it (553 5.6.7,
final), and a refusal at MAIL FROM is the host's word on the message. Against aiosmtpd on
loopback; the MX's parser decides what a path is (`edge.smtp.address`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from edge.delivery.client import SMTPDeliverer
from edge.delivery.outcomes import Outcome
from edge.smtp.address import parse_mail_from, parse_rcpt_to
from edge.smtp.replies import SMTPReplyError
from tests.fakes import DownstreamMX, Peer, mx_target, start_peer

ASCII_BODY = b"Subject: plain\r\n\r\nplain\r\n"


@dataclass
class Recorder(DownstreamMX):
    """Also keeps each transaction's MAIL parameters; refuses MAIL as told."""

    mail_reply: str = ""
    options: list[list[str]] = field(default_factory=list)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        self.options.append(list(mail_options))
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"


def start(handler: Recorder, *, smtputf8: bool = True) -> Peer:
    return start_peer(handler, enable_SMTPUTF8=smtputf8)


@pytest.fixture
def peer() -> Iterator[Peer]:
    started = start(Recorder())
    yield started
    started.controller.stop()


def deliver(
    in_reactor: Any,
    port: int,
    sender: str,
    rcpts: list[str],
    data: bytes,
    smtputf8: bool = False,
    kind: str = "mx",
) -> dict[str, Outcome]:
    deliverer = SMTPDeliverer(in_reactor.reactor, "edge.test", timeout=10)

    def run() -> defer.Deferred[dict[str, Outcome]]:
        target = replace(mx_target(port), kind=kind)
        return defer.ensureDeferred(
            deliverer.deliver(target, sender, rcpts, data, smtputf8=smtputf8)
        )

    try:
        result: dict[str, Outcome] = in_reactor(run)
    finally:
        in_reactor(deliverer.close)
    return result


@pytest.mark.parametrize(
    ("sender", "rcpt"),
    [
        ("foo@[1.2.3.5]", "bar@[IPv6:2001:db8::1]"),
        ('"john doe"@example.net', '"a\\"b c"@example.com'),
        ('""@example.net', "x@example.com"),
        ("", "postmaster@example.com"),
        ("Mixed.Case@Example.NET", "UPPER@EXAMPLE.COM"),
    ],
)
def test_paths_the_mx_accepts_go_out_verbatim(
    in_reactor: Any, peer: Peer, sender: str, rcpt: str
) -> None:
    # Both are paths the MX takes, written back exactly as received.
    parsed = parse_mail_from(f"FROM:<{sender}>", max_size=1000).address
    assert parsed == sender
    assert parse_rcpt_to(f"TO:<{rcpt}>", smtputf8=False).address == rcpt

    outcomes = deliver(in_reactor, peer.port, sender, [rcpt], ASCII_BODY)

    assert outcomes[rcpt].delivered, outcomes
    [seen] = peer.handler.seen
    assert seen.sender == (sender or "<>") and seen.recipients == [rcpt]
    assert seen.data == ASCII_BODY
    assert peer.handler.options == [[]]  # nothing asked for that the message does not need


def test_utf8_paths_go_with_smtputf8(in_reactor: Any, peer: Peer) -> None:
    sender, rcpt = "jörg@bücher.example", "ünïcode@例え.テスト"
    data = "Subject: grüße\r\n\r\nHallo Jörg\r\n".encode()

    outcomes = deliver(in_reactor, peer.port, sender, [rcpt], data, smtputf8=True)

    assert outcomes[rcpt].delivered, outcomes
    [seen] = peer.handler.seen
    assert (seen.sender, seen.recipients, seen.data) == (sender, [rcpt], data)
    assert sorted(peer.handler.options[0]) == ["BODY=8BITMIME", "SMTPUTF8"]


def test_utf8_header_fields_of_a_smtputf8_message_need_it(in_reactor: Any) -> None:
    data = "Subject: grüße\r\n\r\nbody\r\n".encode()
    without = start(Recorder(), smtputf8=False)
    try:
        outcomes = deliver(in_reactor, without.port, "a@b.test", ["c@d.test"], data, True)
        # A legacy 8-bit message (not sent with SMTPUTF8) goes on as it came, to an old MX;
        # to an MX (outbound mail) its UTF-8 header section needs SMTPUTF8 all the same.
        legacy = deliver(
            in_reactor, without.port, "a@b.test", ["c@d.test"], data, False, "upstream"
        )
        outbound = deliver(in_reactor, without.port, "a@b.test", ["c@d.test"], data, False)
    finally:
        without.controller.stop()
    assert outcomes["c@d.test"].code == 553 and outcomes["c@d.test"].final
    assert outcomes["c@d.test"].text.startswith("5.6.7 ")
    assert legacy["c@d.test"].delivered
    assert outbound["c@d.test"].code == 553 and outbound["c@d.test"].text.startswith("5.6.7 ")
    assert [s.data for s in without.handler.seen] == [data]
    assert without.handler.options == [["BODY=8BITMIME"]]  # only the legacy one was sent


def test_an_ascii_smtputf8_message_goes_with_it_where_offered_and_without_elsewhere(
    in_reactor: Any, peer: Peer
) -> None:
    assert deliver(in_reactor, peer.port, "a@b.test", ["c@d.test"], ASCII_BODY, True)[
        "c@d.test"
    ].delivered
    without = start(Recorder(), smtputf8=False)
    try:
        plain = deliver(in_reactor, without.port, "a@b.test", ["c@d.test"], ASCII_BODY, True)
    finally:
        without.controller.stop()
    assert plain["c@d.test"].delivered  # nothing in it needs SMTPUTF8
    assert peer.handler.options == [["SMTPUTF8"]]
    assert without.handler.options == [[]]


def test_utf8_paths_to_a_peer_without_smtputf8_fail_permanently(in_reactor: Any) -> None:
    without = start(Recorder(), smtputf8=False)
    try:
        outcomes = deliver(in_reactor, without.port, "ü@bücher.example", ["c@d.test"], b"x\r\n")
    finally:
        without.controller.stop()
    outcome = outcomes["c@d.test"]
    assert (outcome.code, outcome.final, outcome.delivered) == (553, True, False)
    assert outcome.text.startswith("5.6.7 ") and "SMTPUTF8" in outcome.text
    assert without.handler.options == [] and without.handler.seen == []  # no MAIL at all


def test_8bit_data_goes_with_body_8bitmime(in_reactor: Any, peer: Peer) -> None:
    data = b"Subject: latin\r\n\r\ncaf\xe9\r\n"
    assert deliver(in_reactor, peer.port, "a@b.test", ["c@d.test"], data)["c@d.test"].delivered
    assert peer.handler.options == [["BODY=8BITMIME"]]
    assert peer.handler.seen[0].data == data


@pytest.mark.parametrize(
    ("reply", "code", "final"),
    [("550 5.1.8 sender refused", 550, True), ("452 4.3.1 no room now", 452, False)],
)
def test_a_refusal_at_mail_from_is_the_hosts_word(
    in_reactor: Any, reply: str, code: int, final: bool
) -> None:
    refusing = start(Recorder(mail_reply=reply))
    second = start(Recorder())
    try:
        deliverer = SMTPDeliverer(in_reactor.reactor, "edge.test", timeout=10)
        target = mx_target(refusing.port, second.port)

        def run() -> defer.Deferred[dict[str, Outcome]]:
            return defer.ensureDeferred(
                deliverer.deliver(target, "a@b.test", ["c@d.test"], b"x\r\n")
            )

        outcome = in_reactor(run)["c@d.test"]
        in_reactor(deliverer.close)
    finally:
        refusing.controller.stop()
        second.controller.stop()
    assert (outcome.code, outcome.final, outcome.connected) == (code, final, True)
    assert reply[4:] in outcome.text
    assert second.handler.seen == []  # the host answered for the message: its word stands


def test_a_path_no_command_can_carry_raises(in_reactor: Any, peer: Peer) -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        deliver(in_reactor, peer.port, "a@b.test", ["c@d.test>\r\nDATA"], b"x\r\n")
    assert peer.handler.options == []


# Pieces of paths from a broad alphabet: atext, specials, quoting and escapes, address
# literals, dots in every place, U-labels and characters IDNA maps, controls, spaces.
PIECES = [
    *"aZ0.-_!#%'*+/=?^`{|}~\"\\@[]:,() \t<>",
    "..",
    'x"y',
    '\\"',
    "IPv6:",
    "::1",
    "1.2.3.4",
    "xn--",
    "é",
    "ß",
    "日本",
    "Ａ",
    "İ",
    "ǅ",
    "\U0001f600",
    "\ufeff",
    "\u00a0",
    "\u202e",
    "\u0085",
    "\u2028",
    "\x7f",
    "\x00",
    "\x1f",
]
part = st.lists(st.sampled_from(PIECES), min_size=1, max_size=10).map("".join)
candidate = st.one_of(
    st.builds(lambda local, dom: f"{local}@{dom}", part, part),
    st.builds(lambda local, dom: f'"{local}"@{dom}', part, part),
    st.builds(lambda local, dom: f"{local}@[{dom}]", part, part),
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
@given(path=candidate)
def test_every_path_the_mx_accepts_reaches_a_peer_as_the_same_address(
    in_reactor: Any, peer: Peer, path: str
) -> None:
    """Whatever the MX takes at MAIL or RCPT (with SMTPUTF8), the delivery client sends and
    a real peer receives as the same address: never accepted and then refused."""
    try:
        sender = parse_mail_from(f"FROM:<{path}> SMTPUTF8", max_size=1000).address
        rcpt = parse_rcpt_to(f"TO:<{path}>", smtputf8=True).address
    except SMTPReplyError:
        assume(False)
        return
    peer.handler.seen.clear()

    outcomes = deliver(in_reactor, peer.port, sender, [rcpt], ASCII_BODY, smtputf8=True)

    assert outcomes[rcpt].delivered, (path, outcomes)
    [seen] = peer.handler.seen
    assert (mailbox(seen.sender), [mailbox(r) for r in seen.recipients]) == (
        mailbox(path),
        [mailbox(path)],
    )


def mailbox(address: str) -> tuple[str, str]:
    """The address as (local part, domain) with any quoting undone: aiosmtpd drops quotes
    that are not needed (`"a"@b` arrives as `a@b`, the same mailbox)."""
    local, _, domain = address.rpartition("@")
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local, domain
