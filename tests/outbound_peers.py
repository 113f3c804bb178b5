"""Real peers for outbound delivery tests, all on loopback: a test CA, remote MX hosts, and
the HTTPS server of MTA-STS policies.

The CA is made in the test with `cryptography`; the edge is told to trust it through its
configuration (`[edge] tls_ca_file`), as an operator would for a private CA. Remote MX hosts
are aiosmtpd servers (with STARTTLS and a certificate of the CA, with a self-signed one, or
without STARTTLS) or Postfix's `smtp-sink`, each on its own loopback address (127.0.0.x) and
the one port the edge delivers to MX hosts on (`[edge] mx_delivery_port`); or Postfix's own
smtpd, in a private instance that holds what it accepts in its own queue.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fakes import DownstreamMX


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class LocalCA:
    """A certificate authority of the test's own; `ca_file` is its certificate (PEM)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("tailpost test CA"))
            .issuer_name(_name("tailpost test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = root / "test-ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def server_context(self, *names: str, self_signed: bool = False) -> ssl.SSLContext:
        """A TLS server context with a certificate for `names` (issued by this CA, or
        signed by its own key)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        issuer, signer = (_name(names[0]), key) if self_signed else (self.cert.subject, self.key)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(signer, hashes.SHA256())
        )
        base = self.root / f"{names[0]}{'-self' if self_signed else ''}"
        cert_file, key_file = base.with_suffix(".crt"), base.with_suffix(".key")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_pem(key))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        return context


@dataclass
class Policy:
    """What the policy server answers for one host."""

    body: str
    status: int = 200
    content_type: str = "text/plain"
    location: str = ""


@dataclass
class PolicyServer:
    """An HTTPS server of MTA-STS policies on 127.0.0.1, by Host."""

    context: ssl.SSLContext
    policies: dict[str, Policy] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    port: int = 0
    server: Any = None

    def start(self) -> PolicyServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
                owner.requests.append(f"{host}{self.path}")
                policy = owner.policies.get(host)
                if policy is None or self.path != "/.well-known/mta-sts.txt":
                    policy = Policy("not found", status=404)
                body = policy.body.encode()
                self.send_response(policy.status)
                self.send_header("Content-Type", policy.content_type)
                self.send_header("Content-Length", str(len(body)))
                if policy.location:
                    self.send_header("Location", policy.location)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.socket = self.context.wrap_socket(server.socket, server_side=True)
        self.server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port(addresses: list[str]) -> int:
    """A port free on every one of `addresses` (the MX hosts share the delivery port)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on all the test addresses")


@dataclass
class RemoteMX:
    handler: DownstreamMX
    controller: Controller
    address: str


def start_mx(
    address: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    handler: DownstreamMX | None = None,
    **smtp: Any,
) -> RemoteMX:
    """An aiosmtpd MX at address:port, offering STARTTLS with `tls` (none without)."""
    handler = handler or DownstreamMX()
    kwargs: dict[str, Any] = dict(smtp)
    if tls is not None:
        kwargs.update(tls_context=tls, require_starttls=False)
    controller = Controller(
        handler, hostname=address, port=port, server_hostname="remote-mx.test", **kwargs
    )
    controller.start()
    handler.port = port
    return RemoteMX(handler, controller, address)


def tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


@dataclass
class Sink:
    """Postfix's smtp-sink, dumping each transaction into `dumps` (with X-Mail-Args and
    X-Rcpt-Args: the MAIL and RCPT parameters it was given)."""

    dumps: Path

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dumps.rglob("*")) if p.is_file()]


@contextlib.contextmanager
def smtp_sink(binary: str, address: str, port: int, *args: str) -> Iterator[Sink]:
    dumps = Path(tempfile.mkdtemp(prefix="tailpost-sink-"))
    dumps.chmod(0o777)  # smtp-sink drops root for nobody, who writes the dumps
    cmd = [binary, "-u", "nobody"] if os.geteuid() == 0 else [binary]
    cmd += ["-d", f"{dumps}/%M.", *args, f"{address}:{port}", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection((address, port), timeout=2) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"smtp-sink did not start: {proc.stderr!r}") from None
                time.sleep(0.05)
        yield Sink(dumps)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(dumps, ignore_errors=True)


POSTFIX_MX_MAIN = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
daemon_directory = {daemons}
command_directory = {commands}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-mx.test
mydestination =
relay_domains =
local_recipient_maps =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
# Every accepted message is held: stored in this instance's queue, never delivered.
smtpd_data_restrictions = check_client_access static:HOLD
smtpd_peername_lookup = no
biff = no
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
"""

POSTFIX_MX_MASTER = """\
{address}:{port} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
rewrite   unix - - n - - trivial-rewrite
proxymap  unix - - n - - proxymap
anvil     unix - - n - 1 anvil
qmgr      unix n - n 300 1 qmgr
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
postlog   unix-dgram n - n - 1 postlogd
"""


@dataclass
class PostfixMX:
    """A private Postfix instance whose smtpd is a remote MX host; what it accepted is held
    in its own queue (`messages` reads it back with `postcat`)."""

    root: Path
    postcat: str

    def messages(self) -> list[bytes]:
        held = self.root / "queue" / "hold"
        found = []
        for path in sorted(p for p in held.rglob("*") if p.is_file()):
            out = subprocess.run(
                [self.postcat, "-c", str(self.root / "conf"), "-bh", str(path)],
                capture_output=True,
                timeout=30,
                check=False,
            )
            if out.returncode == 0:
                found.append(out.stdout.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        return found


def postfix_unavailable() -> str | None:
    """Why a private Postfix instance cannot run here, or None."""
    if tool("postfix") is None or tool("postcat") is None:
        return "Postfix is not installed (make test installs it)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root to start its master"
    if not Path("/usr/lib/postfix/sbin/smtpd").exists():
        return "no Postfix daemons in /usr/lib/postfix/sbin"
    return None


@contextlib.contextmanager
def postfix_mx(address: str, port: int) -> Iterator[PostfixMX]:
    """Postfix's smtpd at address:port (see `postfix_unavailable` first), in a private
    instance in a directory of its own that the postfix user can reach, stopped and removed
    on leaving."""
    binary, postcat = tool("postfix"), tool("postcat")
    assert binary is not None and postcat is not None
    workdir = Path(tempfile.mkdtemp(prefix="tailpost-postfix-"))
    root = workdir / "postfix"
    confdir = root / "conf"
    for d in (confdir, root / "queue", root / "data"):
        d.mkdir(parents=True, exist_ok=True)
    shutil.chown(root / "data", user="postfix")
    for d in (workdir, root):
        d.chmod(0o755)  # the postfix user must reach its queue directory
    (confdir / "main.cf").write_text(
        POSTFIX_MX_MAIN.format(
            root=root,
            daemons="/usr/lib/postfix/sbin",
            commands=str(Path(binary).parent),
        )
    )
    (confdir / "master.cf").write_text(POSTFIX_MX_MASTER.format(address=address, port=port))

    def postfix(action: str) -> None:
        done = subprocess.run(
            [binary, "-c", str(confdir), action], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"postfix {action} failed: {done.stdout}{done.stderr}")

    postfix("start")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((address, port), timeout=2) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("Postfix's smtpd did not start") from None
                time.sleep(0.05)
        yield PostfixMX(root, postcat)
    finally:
        try:
            postfix("stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            postfix("abort")
        shutil.rmtree(workdir, ignore_errors=True)
