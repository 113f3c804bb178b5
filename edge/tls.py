"""TLS material: the self-signed certificate made on first start, contexts, and pins.

Used by the edge, the device's connector and the all-in-one. The private key is written with
mode 0600 and never logged. A pin is the SHA-256 of a certificate's SubjectPublicKeyInfo
(base64, as RFC 7469's `pin-sha256`); `PinnedClientTLS` is the edge's client context for a
device's connector, which trusts that one key and nothing else. Nothing here listens or
connects.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer


def ensure_self_signed(cert_path: Path, key_path: Path, hostname: str) -> bool:
    """Create a self-signed certificate for `hostname` unless one exists; True if created."""
    if cert_path.exists() and key_path.exists():
        return False
    cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return True


def server_context(cert_path: Path, key_path: Path) -> Any:
    """A Twisted TLS server context factory from PEM files."""
    pem = Path(cert_path).read_bytes() + b"\n" + Path(key_path).read_bytes()
    return ssl.PrivateCertificate.loadPEM(pem).options()


# -- the connector hop's pin -------------------------------------------------------------------

PIN_PATTERN = re.compile(r"^[A-Za-z0-9+/]{43}=$")
"""A pin as written: the base64 of a SHA-256 digest (RFC 7469's `pin-sha256` value)."""


def spki_pin(cert: x509.Certificate) -> str:
    """The pin of `cert`: base64 of the SHA-256 of its DER SubjectPublicKeyInfo.

    The key, not the certificate: a certificate renewed over the same key keeps its pin
    (RFC 7469 §2.4). The same value as
    `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256
    -binary | base64`."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def pin_of_file(cert_path: Path) -> str:
    """The pin of the first certificate in the PEM file `cert_path`."""
    return spki_pin(x509.load_pem_x509_certificate(Path(cert_path).read_bytes()))


def is_pin(value: object) -> bool:
    """Whether `value` has the shape of a pin (`PIN_PATTERN`)."""
    return isinstance(value, str) and PIN_PATTERN.match(value) is not None


@implementer(IOpenSSLClientConnectionCreator)
class PinnedClientTLS:
    """A client TLS context that accepts exactly one server key: the one pinned.

    For the edge's hop to a device's connector, whose certificate is self-signed: no CA is
    consulted and no name is checked; the handshake succeeds only when the leaf
    certificate's SPKI hash is `pin`, so nothing (AUTH included) is ever sent to another
    peer. One per connection: `seen` keeps the pin the peer presented, for the log."""

    def __init__(self, pin: str) -> None:
        if not is_pin(pin):
            raise ValueError(f"not a SHA-256 SPKI pin: {pin!r}")
        self.pin = pin
        self.seen: str | None = None

    @property
    def mismatch(self) -> bool:
        """The peer presented a certificate with another key."""
        return self.seen is not None and not hmac.compare_digest(self.seen, self.pin)

    def _verify(self, conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if depth != 0:
            return True  # only the peer's own certificate counts; it is checked at depth 0
        self.seen = spki_pin(cert.to_cryptography())
        return hmac.compare_digest(self.seen, self.pin)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return SSL.Connection(context, None)


# -- the MX hop's certificate check (MTA-STS) ---------------------------------------------------

_VERIFY_ERRORS = {
    10: "the certificate has expired",
    18: "the certificate is self-signed",
    19: "a self-signed certificate is in the chain",
    20: "the issuer is not a trusted CA",
    21: "the issuer is not a trusted CA",
}


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingClientTLS:
    """A client TLS context that checks the server's certificate: its chain against the CA
    roots (`ca_file`, or the system's when empty) and its names against `hostname` (RFC 6125,
    with `service_identity`), sending `hostname` as SNI.

    `strict`: a certificate that does not verify fails the handshake (MTA-STS `enforce`);
    otherwise the handshake goes on and `problem` says what was wrong (`testing`). One per
    connection: `problem` is the first thing found wrong with this peer's certificate."""

    def __init__(self, hostname: str, ca_file: str = "", *, strict: bool = True) -> None:
        self.hostname = hostname.lower().rstrip(".")
        self.ca_file = ca_file
        self.strict = strict
        self.problem = ""

    def _verify(self, conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if not ok and not self.problem:
            why = _VERIFY_ERRORS.get(errno, f"verification error {errno}")
            self.problem = f"certificate not trusted: {why} (depth {depth})"
        if depth == 0 and not self.problem:
            try:
                verify_certificate_hostname(cert.to_cryptography(), self.hostname)
            except (VerificationError, CertificateError, ValueError):
                self.problem = f"certificate not valid for {self.hostname}"
        return not (self.strict and self.problem)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        if self.ca_file:
            context.load_verify_locations(self.ca_file)
        else:
            context.set_default_verify_paths()
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        connection = SSL.Connection(context, None)
        connection.set_tlsext_host_name(self.hostname.encode("idna"))
        connection.set_connect_state()
        return connection
