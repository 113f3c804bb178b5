"""ARC (RFC 8617): verify the chain a message arrives with, and seal what the edge saw.

Verification runs dkimpy's ARC verifier through tailpost's resolver. A message without ARC
headers is answered at once, without dkimpy; one with them is verified in the calling
(reactor) thread when it is small (`INLINE_LIMIT`) and the resolver's cache has the keys,
else in the resolver's worker pool, so nothing here waits on the network in the reactor
thread.

Sealing adds the edge's own ARC set (ARC-Authentication-Results, ARC-Message-Signature,
ARC-Seal) over the message with the edge's Authentication-Results on top, so the device and
its mail clients can check what the edge saw. It is the forwarding hop's act: the deliverer
seals a message as stored right before sending it to its target (`edge.delivery.client`), in a
worker thread (two RSA signatures). The sealing key is an RSA key file; `ensure_key` makes
one on first start.
"""

from __future__ import annotations

import base64
import os
import re
import time
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from edge.checks.base import INLINE_LIMIT, ARCResult, BaseCheck, Finding, Found, Transaction
from edge.checks.dkim import dnsfunc_for
from edge.checks.headers import header_section, plain_fields
from edge.dns.resolver import DNSResolver, DNSTemporaryError
from edge.runtime.nowlater import then

_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")  # as dkimpy's header parser reads a field
_ARC_FIELDS = frozenset(dkim.ARC.ARC_HEADERS)
_ARC_FIELD = re.compile(
    rb"^(?:" + b"|".join(re.escape(n) for n in sorted(_ARC_FIELDS)) + rb"):", re.I | re.M
)
NOT_SIGNED = "Message is not ARC signed"  # dkimpy's reason for a message without a chain


def has_arc_headers(message: bytes) -> bool:
    """Whether dkimpy's ARC verifier has anything to look at in `message`.

    False only when the header section, read line by line as dkimpy reads it, is well formed
    and has no ARC header field: then dkimpy would answer "none" too. Anything it would
    read differently (or refuse) is left to dkimpy. A section of plain CRLF-terminated
    fields (`plain_fields`) is searched for an ARC field name in one pass.
    """
    head = header_section(message)
    if plain_fields(head):
        return _ARC_FIELD.search(head) is not None
    pos, size, fields = 0, len(message), 0
    while pos < size:
        nl = message.find(b"\n", pos)
        end = size if nl < 0 else nl
        line = message[pos:end]
        if nl >= 0 and line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return False  # end of the header section
        if line[0] in (9, 32):
            if not fields:
                return True
        else:
            match = _FIELD_NAME.match(line)
            if match is not None:
                if match.group(1).lower() in _ARC_FIELDS:
                    return True
                fields += 1
            elif not line.startswith(b"From "):
                return True
        pos = end + 1
    return False


def verify_chain(resolver: DNSResolver, message: bytes) -> ARCResult:
    """Blocking: the chain validation status of `message` (none without ARC headers)."""
    if not has_arc_headers(message):
        return ARCResult("none", 0, NOT_SIGNED)
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

    def data(self, tx: Transaction, message: bytes) -> Found:
        if not has_arc_headers(message):
            return _found(_UNSIGNED, tx)
        resolver = self.resolver
        if len(message) <= INLINE_LIMIT:
            result = resolver.run_cached_now(verify_chain, resolver, message)
        else:
            result = resolver.run_async(verify_chain, resolver, message)
        return then(result, _found, tx)


_UNSIGNED = ARCResult("none", 0, NOT_SIGNED)


def _found(result: ARCResult, tx: Transaction) -> list[Finding]:
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


# The edge's own Authentication-Results, as `edge.checks.authresults` writes it: results
# separated by ";" and folding whitespace, each in the plain form that authres writes and
# reads back unchanged (lower-case method and result, single spaces, a value a token, an
# address or a quoted string without escapes that needs its quotes). A header in any other
# form is parsed by dkimpy (with authres), as before: same outcome, only slower.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_TOKEN_CHARS = r"A-Za-z0-9!#$%&'*+.^_`{|}~\-"
_QCHAR = r"[\x20\x21\x23-\x3f\x41-\x5b\x5d-\x7e]"  # printable; no '"', '\\' or '@'
_VALUE = (
    rf"(?:[{_TOKEN_CHARS}]+"  # a token
    rf"|{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"  # an address
    rf'|"{_QCHAR}*[ ()<>,;:/\[\]?=]{_QCHAR}*")'  # a quoted string that needs its quotes
)
_RESULT = re.compile(
    rf"(?P<method>spf|dkim|dmarc|arc)=(?P<result>[a-z]+)(?: reason={_VALUE})?"
    rf"(?: (?:smtp|header|policy)\.[a-z]+={_VALUE})*"
)
_DOT_ATOM = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_SEPARATOR = re.compile(r";(?:\r\n)?[ \t]+")


def _edge_results(
    headers: list[list[bytes]], srv_id: bytes
) -> tuple[int, list[bytes], list[bytes]] | None:
    """How many Authentication-Results headers claim `srv_id`, their results and their arc=
    results, as dkimpy would consolidate them; None when it takes authres to tell."""
    count = 0
    results: list[bytes] = []
    arc: list[bytes] = []
    srv = srv_id.decode("utf-8")
    for name, raw in headers:
        if name != b"Authentication-Results":
            continue
        try:
            value = raw.strip().decode("utf-8")
        except UnicodeDecodeError:
            return None
        authserv_id, *parts = _SEPARATOR.split(value)
        if not _DOT_ATOM.fullmatch(authserv_id):
            return None
        if authserv_id.lower() != srv:
            continue  # another server's (or not parseable at all): dkimpy skips it too
        count += 1
        if parts == ["none"]:
            continue
        if not parts:
            return None
        for part in parts:
            match = _RESULT.fullmatch(part)
            if match is None:
                return None
            results.append(part.encode("utf-8"))
            if match["method"] == "arc":
                arc.append(match["result"].encode("ascii"))
    return count, results, arc


class _SealingARC(dkim.ARC):  # type: ignore[misc]
    """dkimpy's ARC signer, with the RSA signature made by `cryptography`.

    dkimpy signs with its own pure-Python RSA, some 15 ms per signature (two per seal);
    `cryptography` makes the same PKCS#1 v1.5 signature in well under a millisecond. Only
    the signing step differs from dkimpy's `gen_header`: the fields, folding and header
    hashing are dkimpy's own. `seal` is dkimpy's `ARC.sign` without its two costly
    preliminaries: the key is parsed once (by `ARCSealer`), and the edge's own
    Authentication-Results are read without authres when they are in the edge's own plain
    form (otherwise dkimpy's `sign` does all of it)."""

    headers: list[Any]  # (dkimpy's: [name, value] as read, then canonicalized tuples)

    def __init__(self, message: bytes, key: rsa.RSAPrivateKey) -> None:
        super().__init__(message, signature_algorithm=b"rsa-sha256")
        self._key = key
        self._canonical = False  # self.headers already canonicalized (relaxed), by `seal`

    def seal(
        self, selector: bytes, domain: bytes, pem: bytes, srv_id: bytes, timestamp: int | None
    ) -> list[bytes]:
        include_headers = self.default_sign_headers()
        found = _edge_results(self.headers, srv_id)
        if found is None:
            out: list[bytes] = self.sign(
                selector, domain, pem, srv_id, include_headers, timestamp=timestamp
            )
            return out
        # From here on as dkimpy's ARC.sign (1.1.8), step by step.
        count, results, arc_results = found
        self.add_should_not(("Authentication-Results",))
        if not count:
            return []  # "no AR headers found, chain terminated"
        auth_results = srv_id + b"".join(b";" + self.linesep + b" " + r for r in results)
        if not arc_results:
            cv = dkim.CV_None
        elif len(arc_results) != 1:
            cv = dkim.CV_Fail
        else:
            cv = arc_results[0]
        include_headers = tuple(x.lower() for x in include_headers)
        self.include_headers = include_headers
        if b"from" not in include_headers:
            raise dkim.ParameterError("The From header field MUST be signed")
        for x in set(include_headers).intersection(self.should_not_sign):
            raise dkim.ParameterError(f"The {x!r} header field SHOULD NOT be signed")
        max_instance, arc_headers_w_instance = self.sorted_arc_headers()
        instance = max_instance + 1 if arc_headers_w_instance else 1
        if instance > 50:
            raise dkim.ParameterError("Maximum instance tag value exceeded")
        if instance == 1 and cv != dkim.CV_None:
            raise dkim.ParameterError("No existing chain found on message, cv should be none")
        if instance != 1 and cv == dkim.CV_None:
            return []  # "no previous AR arc results found and instance > 1"
        arc_headers = [y for x, y in arc_headers_w_instance] if cv != dkim.CV_Fail else []
        canon_policy = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        # Relaxed header canonicalization is idempotent: done once here, not per signature.
        self.headers = canon_policy.canonicalize_headers(self.headers)
        self._canonical = True
        aar_value = b"i=%d; " % instance + auth_results.rstrip() + self.linesep
        new_arc_set = [b"ARC-Authentication-Results: " + aar_value]
        arc_headers.insert(0, (b"ARC-Authentication-Results", aar_value))
        self.headers = canon_policy.canonicalize_headers(arc_headers[:1]) + self.headers

        self.hasher = dkim.HASH_ALGORITHMS[self.signature_algorithm]
        h = self.hasher()
        h.update(canon_policy.canonicalize_body(self.body))
        bodyhash = base64.b64encode(h.digest())
        stamp = str(timestamp or int(time.time())).encode("ascii")
        ams_fields = [
            (b"i", str(instance).encode("ascii")),
            (b"a", self.signature_algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", domain),
            (b"s", selector),
            (b"t", stamp),
            (b"h", b" : ".join(include_headers)),
            (b"bh", bodyhash),
            (b"b", b"0" * 60),  # folds b= onto its own line, as dkimpy does
        ]
        res = self.gen_header(
            ams_fields, include_headers, canon_policy, b"ARC-Message-Signature", None
        )
        new_arc_set.append(b"ARC-Message-Signature: " + res)
        arc_headers.insert(0, (b"ARC-Message-Signature", res))
        self.headers = canon_policy.canonicalize_headers(arc_headers[:1]) + self.headers

        as_fields = [
            (b"i", str(instance).encode("ascii")),
            (b"cv", cv),
            (b"a", self.signature_algorithm),
            (b"d", domain),
            (b"s", selector),
            (b"t", stamp),
            (b"b", b"0" * 60),
        ]
        as_include_headers = [x[0].lower() for x in arc_headers]
        as_include_headers.reverse()
        if cv == dkim.CV_Fail:
            self.headers.reverse()  # a failed chain: only the newest set is sealed
        res = self.gen_header(as_fields, as_include_headers, canon_policy, b"ARC-Seal", None)
        new_arc_set.append(b"ARC-Seal: " + res)
        new_arc_set.reverse()
        return new_arc_set

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
        headers = self.headers
        if not self._canonical:
            headers = canon_policy.canonicalize_headers(headers)
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

        Empty when the message cannot carry one: without the edge's Authentication-Results
        (nothing to attest), or without a From header (ARC signs it)."""
        signer = _SealingARC(message, self.key)
        try:
            headers = signer.seal(
                self.selector, self.domain, self.private_pem, self.authserv_id, timestamp
            )
        except dkim.DKIMException:
            return []
        return [h if h.endswith(b"\r\n") else h + b"\r\n" for h in headers]
