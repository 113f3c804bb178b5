"""ARC (RFC 8617): verify the chain a message arrives with, and seal what the edge saw.

Verification runs dkimpy's ARC verifier through tailpost's resolver. Sealing adds the
edge's own ARC set (ARC-Authentication-Results, ARC-Message-Signature, ARC-Seal) over the
message with the edge's Authentication-Results on top, so the device and its mail clients
can check what the edge saw. The sealing key is an RSA key file; `ensure_key` makes one on
first start. This module never runs crypto or DNS in the reactor thread.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from edge.checks.base import ARCResult, BaseCheck, Finding, Transaction
from edge.checks.dkim import dnsfunc_for
from edge.dns import DNSResolver, DNSTemporaryError


def verify_chain(resolver: DNSResolver, message: bytes) -> ARCResult:
    """Blocking: the chain validation status of `message` (none without ARC headers)."""
    try:
        cv, results, reason = dkim.arc_verify(message, dnsfunc=dnsfunc_for(resolver))
    except DNSTemporaryError as exc:
        return ARCResult("fail", 0, f"temporary DNS failure: {exc}")
    status = cv.decode() if isinstance(cv, bytes) else ("fail" if cv is None else str(cv))
    if status not in ("pass", "fail", "none"):
        status = "fail"
    return ARCResult(status, len(results), str(reason))


class ARCCheck(BaseCheck):
    name = "arc"

    def __init__(self, resolver: DNSResolver) -> None:
        self.resolver = resolver

    async def data(self, tx: Transaction, message: bytes) -> list[Finding]:
        result: ARCResult = await self.resolver.run_async(verify_chain, self.resolver, message)
        tx.arc = result
        return [Finding("arc", result.result, result.reason)]


def ensure_key(path: Path) -> bytes:
    """The PEM private key at `path`, made (RSA 2048, mode 0600) if it does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return path.read_bytes()


def dns_record(private_pem: bytes) -> str:
    """The TXT record value that publishes the sealing key (`<selector>._domainkey.<domain>`)."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


class _SealingARC(dkim.ARC):  # type: ignore[misc]
    """dkimpy's ARC signer, with the RSA signature made by `cryptography`.

    dkimpy signs with its own pure-Python RSA, some 15 ms per signature (two per seal);
    `cryptography` makes the same PKCS#1 v1.5 signature in well under a millisecond. Only
    the signing step differs from dkimpy's `gen_header`: the fields, folding and header
    hashing are dkimpy's own."""

    def __init__(self, message: bytes, key: rsa.RSAPrivateKey) -> None:
        super().__init__(message, signature_algorithm=b"rsa-sha256")
        self._key = key

    def gen_header(
        self,
        fields: list[tuple[bytes, bytes]],
        include_headers: Any,
        canon_policy: Any,
        header_name: bytes,
        pk: Any,
        standardize: bool = False,
    ) -> bytes:
        value = b"; ".join(b"=".join(x) for x in fields)
        value = dkim.fold(value, namelen=len(header_name), linesep=b"\r\n")
        value = dkim.RE_BTAG.sub(b"\\1", value)
        header = (header_name, b" " + value)
        h = self.hasher()
        headers = canon_policy.canonicalize_headers(self.headers)
        self.signed_headers = dkim.hash_headers(
            h, canon_policy, headers, include_headers, header, dict(fields)
        )
        signature = self._key.sign(h.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        fields = [(k, base64.b64encode(signature) if k == b"b" else v) for k, v in fields]
        value = b"; ".join(b"=".join(x) for x in fields) + self.linesep
        out: bytes = dkim.fold(value, namelen=len(header_name), linesep=self.linesep)
        return out


class ARCSealer:
    """Seals messages with the edge's key; `seal` is blocking (run it in a worker thread)."""

    def __init__(self, private_pem: bytes, selector: str, domain: str, authserv_id: str) -> None:
        self.private_pem = private_pem
        key = serialization.load_pem_private_key(private_pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the ARC sealing key must be an RSA key")
        self.key = key
        self.selector = selector.encode()
        self.domain = domain.encode()
        self.authserv_id = authserv_id.encode()

    def seal(self, message: bytes, timestamp: int | None = None) -> list[bytes]:
        """The ARC set to put on top of `message` (which carries the edge's A-R on top).

        Empty when the message cannot carry one (ARC signs the From header, so a message
        without one is passed on unsealed)."""
        signer = _SealingARC(message, self.key)
        try:
            headers = signer.sign(
                self.selector,
                self.domain,
                self.private_pem,
                self.authserv_id,
                include_headers=signer.default_sign_headers(),
                timestamp=timestamp,
            )
        except dkim.DKIMException:
            return []
        return [h if h.endswith(b"\r\n") else h + b"\r\n" for h in headers]
