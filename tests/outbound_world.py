"""The outbound path with real processes, for end-to-end tests: an edge (`twistd
tailpost-edge`) and a linked device (`twistd tailpost-device`), a local DNS server with the
remote domains' MX and `_mta-sts` records and the sender domain's DKIM records as the edge
publishes them (GET /v1/custom-domains/{domain}/dkim), a test CA, the HTTPS server of
MTA-STS policies, and remote MX hosts on 127.0.0.x (`tests.outbound_peers`: aiosmtpd,
Postfix's `smtp-sink` or its smtpd) on the one port the edge delivers to.

The edge's store is seeded before it starts, as an operator's approval leaves it: an account
owning `home.test` (a verified route and the address alice@home.test), a device of that
account with a device key, and DKIM keys (RSA and Ed25519) for `home.test`. The device gets
the key in its link file, as an approval gives it. The edge's relay and control ports are
fixed, so a restarted edge is found at the same address.
"""

from __future__ import annotations

import email
import json
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype

from edge.domains.scan import generate_dkim_keys
from edge.store import open_store
from edge.store.access import AccessStore
from edge.store.keyring import load_or_create_keys
from tests.dnsserver import LocalDNSServer
from tests.fakes import DownstreamMX
from tests.outbound_peers import LocalCA, PolicyServer, RemoteMX, free_port, start_mx
from tests.outbound_peers import Policy as Served
from tests.processes import Process
from tests.processes import free_port as free_tcp_port

ALICE = "alice@home.test"
DEVICE_ID = "dev_laptop"
HOSTS = [f"127.0.0.{n}" for n in range(2, 8)]
AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def sts_policy(mode: str, *mx: str) -> Served:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return Served("\r\n".join(lines) + "\r\n")


def message_ids(seen: list[Any]) -> list[str]:
    """The Message-ID of each message a remote MX took, in order."""
    found = []
    for s in seen:
        parsed = email.message_from_bytes(s.data)
        found.append(str(parsed.get("Message-ID", "")).strip())
    return found


def wait_until(check: Callable[[], Any], what: Callable[[], str] | str, limit: float = 30.0) -> Any:
    """Poll `check` until it returns something true; fail naming `what` after `limit` s."""
    end = time.monotonic() + limit
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what() if callable(what) else what}")
        time.sleep(0.05)


@dataclass
class World:
    base: Path
    in_reactor: Any
    dns: LocalDNSServer
    ca: LocalCA
    web: PolicyServer
    mx_port: int
    edge: Process
    device: Process
    device_key: str
    relay_port: int
    control_port: int
    edge_listeners: dict[str, str] = field(default_factory=dict)
    listeners: dict[str, str] = field(default_factory=dict)
    remotes: list[RemoteMX] = field(default_factory=list)
    dkim_published: bool = False

    # -- the remote side ----------------------------------------------------------------------

    def remote(
        self, name: str, address: str, tls: str = "ca", handler: DownstreamMX | None = None
    ) -> RemoteMX:
        """An aiosmtpd MX host `name` at `address`: STARTTLS with a certificate of the CA for
        its name ("ca"), a self-signed one ("self") or none ("none")."""
        context = None
        if tls != "none":
            context = self.ca.server_context(name, self_signed=tls == "self")
        self.dns.zone.set(name, "A", [address])
        started = start_mx(address, self.mx_port, context, handler)
        self.remotes.append(started)
        return started

    def domain(self, domain: str, mx: list[tuple[int, str]], sts: Served | None = None) -> None:
        self.dns.zone.set(domain, "MX", mx)
        if sts is not None:
            self.dns.zone.set(f"_mta-sts.{domain}", "TXT", ["v=STSv1; id=20261208"])
            self.dns.zone.set(f"mta-sts.{domain}", "A", ["127.0.0.1"])
            self.web.policies[f"mta-sts.{domain}"] = sts

    def dkim_dns(self, name: bytes, timeout: int = 5) -> bytes:
        """dkimpy's `dnsfunc`: the TXT record at `name`, asked of the test's DNS server."""
        query = dns.message.make_query(name.decode().rstrip("."), dns.rdatatype.TXT)
        answer = dns.query.udp(query, "127.0.0.1", timeout=timeout, port=self.dns.port)
        for rrset in answer.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return b""

    def verify_dkim(self, data: bytes) -> list[bytes]:
        """The algorithms (a=) of the message's DKIM signatures, after checking that every one
        verifies against the records in the test's DNS server."""
        signer = dkim.DKIM(data)
        algorithms = []
        count = sum(
            1
            for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            if line.lower().startswith(b"dkim-signature:")
        )
        for idx in range(count):
            assert signer.verify(idx=idx, dnsfunc=self.dkim_dns), f"signature {idx} fails"
            fields = signer.signature_fields
            algorithms.append(fields[b"a"])
            assert fields[b"d"] == b"home.test"
        return algorithms

    # -- processes ----------------------------------------------------------------------------

    def start_edge(self) -> None:
        self.edge_listeners = self.edge.start()
        if not self.dkim_published:
            self.publish_dkim()

    def publish_dkim(self) -> None:
        """Put the sender domain's DKIM records into the test's DNS as the edge publishes
        them (GET /v1/custom-domains/home.test/dkim, asked with the device's key)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.control_port}/v1/custom-domains/home.test/dkim",
            headers={"Authorization": f"Bearer {self.device_key}"},
        )
        with urllib.request.urlopen(request, timeout=15) as response:
            records = json.loads(response.read())["dkim_keys"]
        assert sorted(r["algorithm"] for r in records) == ["ed25519", "rsa"], records
        for record in records:
            assert "".join(record["txt_strings"]) == record["value"]
            self.dns.zone.set(record["host"], "TXT", [record["value"]])
        self.dkim_published = True

    def start_device(self) -> None:
        self.listeners = self.device.start()

    def set_device_relay(self, address: str) -> None:
        text = self.device.config_path.read_text()
        old = next(line for line in text.splitlines() if line.startswith("edge_relay = "))
        self.device.config_path.write_text(text.replace(old, f'edge_relay = "{address}"'))

    def stop(self) -> None:
        self.device.stop()
        self.edge.stop()
        for remote in self.remotes:
            remote.controller.stop()
        self.web.stop()
        self.in_reactor(self.dns.stop)

    # -- the device's side --------------------------------------------------------------------

    def credentials(self) -> dict[str, Any]:
        return json.loads((self.device.data_dir / "device" / "credentials.json").read_text())  # type: ignore[no-any-return]

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://{self.listeners['http']}/localapi/v0{path}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.credentials()['local_api_token']}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def outbound_events(self) -> list[dict[str, Any]]:
        status, body = self.api("GET", "/mail/outbound/recent?after=0&limit=500")
        assert status == 200, body
        return list(body["events"])

    def statuses(self, proxy_message_id: str) -> list[tuple[str, str | None]]:
        return [
            (e["status"], e.get("recipient"))
            for e in self.outbound_events()
            if e["proxy_message_id"] == proxy_message_id
        ]

    def submit(self, message: bytes, recipients: list[str], sender: str = ALICE) -> str:
        """Through the device's submission listener (STARTTLS, AUTH): the queue item's id."""
        host, _, port = self.listeners["submission"].rpartition(":")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with smtplib.SMTP(host, int(port), timeout=20) as smtp:
            smtp.starttls(context=context)
            smtp.login(sender, self.credentials()["imap"][sender])
            assert smtp.mail(sender)[0] == 250
            for rcpt in recipients:
                assert smtp.rcpt(rcpt)[0] == 250
            code, reply = smtp.data(message)
        assert code == 250 and reply.startswith(b"2.0.0 Queued as out_"), reply
        return reply.decode().rsplit(" ", 1)[1]

    def edge_events(self) -> list[dict[str, Any]]:
        """The delivery events of the device's relayed mail (GET /v1/outbound/events)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.control_port}/v1/outbound/events?after=0&limit=500",
            headers={"Authorization": f"Bearer {self.device_key}"},
        )
        with urllib.request.urlopen(request, timeout=15) as response:
            return list(json.loads(response.read())["events"])

    def edge_settled(self) -> bool:
        """Whether every recipient of every message the edge took from the device has a
        final outcome: nothing more will reach a remote MX."""
        open_: set[tuple[str, str]] = set()
        for event in self.edge_events():
            key = (event["queue_id"], event["recipient"])
            if event["event"] == "accepted":
                open_.add(key)
            elif event["event"] in ("delivered", "bounced", "expired", "deleted"):
                open_.discard(key)
        return not open_

    def device_queue(self) -> list[Path]:
        """The files of the device's outbound queue (empty once every message is final)."""
        queue = self.device.data_dir / "device" / "outbound" / "queue"
        return [p for p in queue.rglob("*") if p.is_file()] if queue.exists() else []

    def relay_client(self) -> smtplib.SMTP:
        """An SMTP client of the edge's relay, logged in with the device's credentials."""
        client = smtplib.SMTP("127.0.0.1", self.relay_port, timeout=20)
        client.ehlo("laptop.test")
        client.login(DEVICE_ID, self.device_key)
        return client


def make_world(
    base: Path,
    in_reactor: Any,
    *,
    edge_retry: float = 0.5,
    relay_retry: tuple[float, float] = (0.2, 0.5),
    edge_relay: str | None = None,
    sts_domains: tuple[str, ...] = (),
    edge_extra: str = "",
) -> World:
    """Everything made and configured, nothing of tailpost started (`start_edge`,
    `start_device`). `edge_relay`: the device's relay address (default: the edge's);
    `sts_domains`: the domains whose MTA-STS policies the HTTPS server has a certificate for;
    `edge_extra`: more lines of the edge's `[edge]` table."""
    dns_server: LocalDNSServer = in_reactor(LocalDNSServer, in_reactor.reactor)
    ca = LocalCA(base)
    names = [f"mta-sts.{d}" for d in sts_domains] or ["mta-sts.invalid"]
    web = PolicyServer(ca.server_context(*names)).start()
    mx_port = free_port(HOSTS)
    relay_port, control_port, connector_port = (free_tcp_port() for _ in range(3))

    (base / "edge" / "edge").mkdir(mode=0o700, parents=True, exist_ok=True)
    keys, _made = load_or_create_keys(base / "edge" / "edge" / "store.key")
    store = open_store(f"sqlite:///{base / 'edge' / 'edge' / 'store.db'}", keys=keys)
    access = AccessStore(store)
    store.ensure_account("acct_home", "acct_home")
    store.create_device(
        "laptop",
        device_id=DEVICE_ID,
        account_id="acct_home",
        connector_smtp_addr=f"127.0.0.1:{connector_port}",
        connector_username="edge-1",
        connector_secret="s3cret-connector",
    )
    store.create_route(
        "home.test",
        type="byod",
        connector_id=DEVICE_ID,
        delivery_mode="split",
        status="active",
        verified_at=AT,
        account_id="acct_home",
    )
    store.add_byod_address("alice", "home.test", DEVICE_ID)
    for key in generate_dkim_keys("202612"):
        access.add_dkim_key(
            "home.test", key.selector, key.algorithm, key.private_pem, key.public_b64
        )
    device_key = access.issue_key(DEVICE_ID)
    store.close()

    dns = f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_server.port}\ntimeout = 2.0\n'
    edge = Process(
        "tailpost-edge",
        base / "edge",
        f"""
hostname = "edge.tailpost.test"
[edge]
mx_listen = "127.0.0.1:0"
control_listen = "127.0.0.1:{control_port}"
relay_listen = "127.0.0.1:{relay_port}"
retry_schedule = [{edge_retry}]
mx_delivery_port = {mx_port}
mta_sts_port = {web.port}
tls_ca_file = "{ca.ca_file}"
delivery_timeout = 10.0
{edge_extra}
[checks]
enabled = false
{dns}""",
    )
    relay_at = edge_relay if edge_relay is not None else f"127.0.0.1:{relay_port}"
    device = Process(
        "tailpost-device",
        base / "device",
        f"""
hostname = "laptop.tailpost.test"
[device]
connector_listen = "127.0.0.1:{connector_port}"
imap_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
submission_listen = "127.0.0.1:0"
connector_username = "edge-1"
connector_password = "s3cret-connector"
addresses = ["{ALICE}"]
edge_url = "http://127.0.0.1:{control_port}"
edge_relay = "{relay_at}"
relay_retry_initial = {relay_retry[0]}
relay_retry_max = {relay_retry[1]}
outcome_poll_interval = 0.2
{dns}""",
    )
    link = {
        "status": "authorized",
        "device_id": DEVICE_ID,
        "account_id": "acct_home",
        "device_key": device_key,
    }
    link_file = base / "device" / "device" / "edge-link.json"
    link_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    link_file.write_text(json.dumps(link))
    link_file.chmod(0o600)
    return World(
        base,
        in_reactor,
        dns_server,
        ca,
        web,
        mx_port,
        edge,
        device,
        device_key,
        relay_port,
        control_port,
    )
