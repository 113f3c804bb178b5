"""The MX as a stranger can abuse it: slow lines, slow DATA, and one network's connections.

Real sockets on 127.0.0.1 (any address of 127.0.0.0/8 is a client of its own, so several
addresses and networks connect from one host); the session timers run on an injected
`Clock` that the tests step after the server has read what was sent (`tests.wire.settle`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import threads
from twisted.internet.task import Clock

from edge.config import ConfigError, load_config
from edge.inbound.listener import smtp_limits
from edge.inbound.policy import MXHandler
from edge.smtp.conncount import LocalCounts, SharedCounts, network_of
from edge.smtp.factory import SMTPServerFactory
from edge.smtp.proxy import ProxyProtocolFactory, trusted_networks
from edge.smtp.server import Limits
from edge.spool.spool import Envelope, Spool
from tests.test_smtp_server import FakeHandler
from tests.test_starttls import target
from tests.wire import Client, settle


class MX:
    """The real MX policy and spool behind an SMTP listener on 127.0.0.1 whose session
    timers run on `clock`."""

    def __init__(self, in_reactor: Any, tmp: Path, limits: Limits, proxy: bool = False) -> None:
        self.in_reactor = in_reactor
        self.clock = Clock()
        self.spool_dir = tmp / "spool"
        self.spool = Spool(self.spool_dir)
        self.accepted: list[Envelope] = []
        reactor = in_reactor.reactor

        def handler() -> MXHandler:
            return MXHandler(
                target,
                self.spool,
                "mx.test",
                reactor,
                threads.deferToThread,
                self.accepted.append,
            )

        self.smtp = SMTPServerFactory(handler, limits, "mx.test", self.clock)
        factory: Any = self.smtp
        if proxy:
            factory = ProxyProtocolFactory(factory, trusted_networks(["127.0.0.1/32"]), reactor)
        self.port = in_reactor(reactor.listenTCP, 0, factory, interface="127.0.0.1")
        self.portno = self.port.getHost().port
        self.clients: list[Client] = []

    def connect(self, source: str = "127.0.0.1") -> Client:
        client = Client(self.portno, source)
        self.clients.append(client)
        return client

    def greeted(self, source: str = "127.0.0.1") -> Client:
        client = self.connect(source)
        assert client.reply().startswith("220 ")
        client.send(b"EHLO client.test\r\n")
        assert client.reply().startswith("250 ")
        return client

    def settle(self) -> None:
        settle(self.in_reactor, lambda: self.smtp.sessions, self.clients)

    def advance(self, seconds: float) -> None:
        self.settle()
        self.in_reactor(self.clock.advance, seconds)

    def spilled(self) -> list[Path]:
        return sorted(self.spool_dir.rglob("*.data"))

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.in_reactor(self.port.stopListening)


@pytest.fixture
def make_mx(in_reactor: Any, tmp_path: Path) -> Iterator[Any]:
    made: list[MX] = []

    def make(limits: Limits | None = None, proxy: bool = False) -> MX:
        mx = MX(in_reactor, tmp_path / str(len(made)), limits or Limits(), proxy)
        made.append(mx)
        return mx

    yield make
    for mx in made:
        mx.close()


def in_data(mx: MX) -> Client:
    client = mx.greeted()
    for command, code in (
        (b"MAIL FROM:<a@sender.test>\r\n", "250"),
        (b"RCPT TO:<user@example.test>\r\n", "250"),
        (b"DATA\r\n", "354"),
    ):
        client.send(command)
        assert client.reply()[:3] == code
    return client


# -- command lines ------------------------------------------------------------------------


def test_a_command_line_trickled_a_byte_at_a_time_is_cut_at_the_command_timeout(
    make_mx: Any,
) -> None:
    mx = make_mx(Limits(idle_timeout=300, command_timeout=60))
    client = mx.greeted()
    for byte in b"NOO":  # a byte every 20 s: each would have restarted an idle timer
        client.send(bytes([byte]))
        mx.advance(19.9)
    assert client.arrived() == b""  # 60 s from the first byte: not yet
    mx.advance(0.5)
    assert client.reply().startswith("421 4.4.2")
    assert client.is_closed()


def test_the_idle_timeout_runs_until_the_first_byte_and_a_timely_line_is_answered(
    make_mx: Any,
) -> None:
    mx = make_mx(Limits(idle_timeout=300, command_timeout=60))
    client = mx.greeted()
    mx.advance(250)  # idle between commands: the longer timeout
    client.send(b"NO")
    mx.advance(50)
    client.send(b"OP\r\n")
    assert client.reply().startswith("250 ")
    mx.advance(299)  # the next wait starts afresh once a command is answered
    assert client.arrived() == b""
    mx.advance(1)
    assert client.reply().startswith("421 4.4.2")


def test_an_endless_line_is_cut_at_the_command_timeout(make_mx: Any) -> None:
    mx = make_mx(Limits(command_timeout=60, max_line_length=512))
    client = mx.greeted()
    client.send(b"x" * 2000)
    assert client.reply().startswith("500 5.5.2")  # too long: refused, the rest discarded
    for _ in range(3):
        client.send(b"x" * 100)
        mx.advance(20)
    assert client.reply().startswith("421 4.4.2")
    assert client.is_closed()


# -- DATA -----------------------------------------------------------------------------------


def test_a_one_byte_per_second_trickle_in_data_is_cut_and_nothing_is_left(make_mx: Any) -> None:
    mx = make_mx()  # the defaults: at least 1 KiB/s over each 60 s
    client = in_data(mx)
    client.send(b"Subject: slow\r\n\r\n")
    for _ in range(59):
        client.send(b"x")
        mx.advance(1)
    assert client.arrived() == b""
    mx.advance(1)
    assert client.reply() == "421 4.4.2 Message data too slow, closing connection"
    assert client.is_closed()
    assert mx.accepted == [] and mx.spilled() == []


def test_data_that_slows_below_the_rate_after_spilling_is_cut_and_its_file_removed(
    make_mx: Any,
) -> None:
    mx = make_mx(Limits(min_data_rate=1024, data_rate_window=60))
    client = in_data(mx)
    line = b"y" * 998 + b"\r\n"
    client.send(b"Subject: big then slow\r\n\r\n" + line * 70)  # 70 KB in the first window
    mx.advance(60)
    assert client.arrived() == b""  # fast enough so far
    assert len(mx.spilled()) == 1  # beyond the spool writer's memory: on disk
    client.send(line * 10)  # 10 KB in the second window: under 60 KiB
    mx.advance(60)
    assert client.reply().startswith("421 4.4.2")
    assert client.is_closed()
    mx.settle()
    assert mx.accepted == [] and mx.spilled() == []
    assert Spool(mx.spool_dir).load() == []


def test_data_at_the_minimum_rate_is_accepted(make_mx: Any) -> None:
    mx = make_mx(Limits(min_data_rate=100, data_rate_window=10))
    client = in_data(mx)
    client.send(b"Subject: steady\r\n\r\n")
    for _ in range(6):  # 1,000 octets in each 10 s window, for a minute
        client.send(b"z" * 998 + b"\r\n")
        mx.advance(10)
    client.send(b".\r\n")
    assert client.reply().startswith("250 ")
    assert len(mx.accepted) == 1


# -- connections per address and per network -----------------------------------------------


def greeting(mx: MX, source: str) -> str:
    """The greeting a new client from `source` gets; a refused one is closed by the server,
    and released (its counts given back) before this returns."""
    client = mx.connect(source)
    reply = client.reply()
    if reply.startswith("421 "):
        assert client.is_closed()
        mx.in_reactor(lambda: None)
    return reply


def test_one_network_cannot_take_more_than_its_limit(make_mx: Any) -> None:
    mx = make_mx(
        Limits(
            max_connections=100,
            max_connections_per_ip=3,
            max_connections_per_network=5,
            reserved_connections=0,
        )
    )
    codes = [greeting(mx, "127.0.0.2") for _ in range(4)]
    assert [c[:3] for c in codes] == ["220", "220", "220", "421"]
    assert codes[3] == "421 4.7.0 Too many connections from your address, try again later"
    assert greeting(mx, "127.0.0.3").startswith("220 ")
    assert greeting(mx, "127.0.0.4").startswith("220 ")  # five from 127.0.0.0/24
    assert greeting(mx, "127.0.0.5") == (
        "421 4.7.0 Too many connections from your network, try again later"
    )
    assert greeting(mx, "127.0.1.5").startswith("220 ")  # another /24


def test_idle_connections_from_ten_addresses_do_not_fill_the_mx(make_mx: Any) -> None:
    """The attack at a tenth of the scale: ten addresses of one network each hold all the
    connections they may; then a few networks do; other clients are still served."""
    mx = make_mx(
        Limits(
            max_connections=100,
            max_connections_per_ip=10,
            max_connections_per_network=20,
            reserved_connections=20,
            reserved_per_network=2,
        )
    )
    admitted = [greeting(mx, f"127.0.9.{i}")[:3] for i in range(1, 11) for _ in range(10)]
    assert admitted.count("220") == 20
    # Three more networks take their twenty each: the total reaches 100 - 20 reserved.
    for net in range(10, 13):
        assert [greeting(mx, f"127.0.{net}.{i % 10 + 1}")[:3] for i in range(20)] == ["220"] * 20
    # Past that, a network holding more than two connections gets no more ...
    assert [greeting(mx, f"127.0.13.{i}")[:3] for i in range(1, 5)] == [
        "220",
        "220",
        "421",
        "421",
    ]
    # ... while a client of a network that holds none is served.
    for net in range(20, 30):
        assert greeting(mx, f"127.0.{net}.1").startswith("220 ")


def test_the_network_limit_counts_the_real_client_behind_the_proxy_protocol(
    make_mx: Any,
) -> None:
    mx = make_mx(Limits(max_connections_per_network=2, reserved_connections=0), proxy=True)
    header = b"PROXY TCP4 %s 192.0.2.1 51000 25\r\n"

    def via_balancer(client_ip: bytes) -> str:
        client = mx.connect("127.0.0.1")
        client.send(header % client_ip)
        reply = client.reply()
        if reply.startswith("421 "):
            assert client.is_closed()
            mx.in_reactor(lambda: None)
        return reply

    assert via_balancer(b"203.0.113.7").startswith("220 ")
    assert via_balancer(b"203.0.113.8").startswith("220 ")
    assert via_balancer(b"203.0.113.9").startswith("421 4.7.0 Too many connections from your net")
    assert via_balancer(b"198.51.100.9").startswith("220 ")  # same balancer, other network


def test_a_refused_or_closed_connection_gives_its_network_slot_back(make_mx: Any) -> None:
    mx = make_mx(Limits(max_connections_per_network=1, reserved_connections=0))
    first = mx.connect("127.0.0.7")
    assert first.reply().startswith("220 ")
    assert greeting(mx, "127.0.0.8").startswith("421 ")
    first.send(b"QUIT\r\n")
    assert first.reply().startswith("221 ")
    assert first.is_closed()
    mx.settle()
    assert greeting(mx, "127.0.0.8").startswith("220 ")


# -- counts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "network"),
    [
        ("192.0.2.77", "192.0.2.0/24"),
        ("::ffff:192.0.2.77", "192.0.2.0/24"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("unix-socket", "unix-socket"),
    ],
)
def test_network_of(host: str, network: str) -> None:
    assert network_of(host) == network


def test_network_counts_alone_and_over_processes() -> None:
    local = LocalCounts()
    assert [local.add_network("192.0.2.0/24") for _ in range(2)] == [1, 2]
    local.remove_network("192.0.2.0/24")
    local.remove_network("198.51.100.0/24")  # never counted: nothing changes
    assert local.per_network == {"192.0.2.0/24": 1}
    edge = SharedCounts.create(2)
    try:
        acceptor = SharedCounts(edge.fd, 1, 2)
        assert edge.add_network("192.0.2.0/24") == 1
        assert acceptor.add_network("192.0.2.0/24") == 2
        assert acceptor.add_network("198.51.100.0/24") == 1
        edge.remove_network("192.0.2.0/24")
        assert acceptor.add_network("192.0.2.0/24") == 2
        edge.clear(1)  # the acceptor ended
        assert edge.add_network("192.0.2.0/24") == 1
    finally:
        os.close(edge.fd)


def test_the_network_limit_holds_over_two_listeners_sharing_counts(in_reactor: Any) -> None:
    """Two processes' listeners (here two in one process, as the kernel spreads one
    network's connections over them), on real sockets."""
    edge = SharedCounts.create(2)
    counts = [edge, SharedCounts(edge.fd, 1, 2)]
    limits = Limits(max_connections_per_network=3, reserved_connections=0)
    ports = []
    try:
        for shared in counts:
            factory = SMTPServerFactory(FakeHandler, limits, "mx.test", Clock(), counts=shared)
            ports.append(
                in_reactor(in_reactor.reactor.listenTCP, 0, factory, interface="127.0.0.1")
            )
        clients, greetings = [], []
        for i in range(4):  # one after the other: the order the listeners see them in
            clients.append(Client(ports[i % 2].getHost().port, f"127.0.0.{20 + i}"))
            greetings.append(clients[-1].reply()[:3])
        assert greetings == ["220", "220", "220", "421"]
        for client in clients:
            client.close()
    finally:
        for port in ports:
            in_reactor(port.stopListening)
        os.close(edge.fd)


# -- configuration --------------------------------------------------------------------------


def test_the_listener_limits_come_from_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "tailpost.toml"
    path.write_text(
        "[edge]\ncommand_timeout = 30\nmin_data_rate = 512\ndata_rate_window = 45\n"
        "max_connections_per_network = 50\nnetwork_v4_prefix = 28\nnetwork_v6_prefix = 56\n"
        "reserved_connections = 100\nreserved_per_network = 5\n"
    )
    limits = smtp_limits(load_config(path))
    assert (limits.command_timeout, limits.min_data_rate, limits.data_rate_window) == (
        30,
        512,
        45,
    )
    assert (limits.max_connections_per_network, limits.reserved_connections) == (50, 100)
    assert (limits.network_v4_prefix, limits.network_v6_prefix) == (28, 56)
    assert limits.reserved_per_network == 5
    defaults = smtp_limits(load_config(None))
    assert (defaults.idle_timeout, defaults.command_timeout, defaults.min_data_rate) == (
        300,
        60,
        1024,
    )


@pytest.mark.parametrize(
    "text",
    [
        "[edge]\nreserved_connections = 1000\n",  # all of max_connections
        "[edge]\ncommand_timeout = 0\n",
        "[edge]\nmin_data_rate = -1\n",
        "[edge]\nmax_connections_per_network = 0\n",
        "[edge]\nnetwork_v4_prefix = 33\n",
        "[auth]\nfailure_delay = 60\n",  # above failure_delay_max
        "[auth]\nfailure_forget = 10\n",
    ],
)
def test_bad_listener_limits_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "tailpost.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)
