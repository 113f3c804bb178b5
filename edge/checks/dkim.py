"""DKIM verification (RFC 6376, Ed25519 per RFC 8463) of every signature, with dkimpy.

Each DKIM-Signature gets its own result (pass, fail, temperror, permerror) with its d=, s=
and the start of b=, for the Authentication-Results header and for DMARC. A message with
more than one From header fails every signature (a signed From must be unambiguous). Key
lookups go through tailpost's resolver. A message without a DKIM-Signature is answered at
once, without dkimpy; one with signatures is verified in the calling (reactor) thread when
it is small (`INLINE_LIMIT`) and the resolver's cache has the keys, else in the resolver's
worker pool. Nothing here waits on the network in the reactor thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from edge.checks.base import INLINE_LIMIT, BaseCheck, DKIMResult, Finding, Found, Transaction
from edge.dns.resolver import DNSResolver, DNSTemporaryError
from edge.runtime.nowlater import then

_WSP = re.compile(rb"\s+")
_SIG_HEADER = re.compile(rb"^dkim-signature:", re.I)


def dnsfunc_for(resolver: DNSResolver) -> Callable[..., bytes | None]:
    """dkimpy's `dnsfunc(name, timeout)`: the first TXT record of `name`, or None.

    A temporary DNS failure propagates as DNSTemporaryError (dkimpy would turn its own
    timeout error into a plain failure, which is not the same thing)."""

    def txt(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        records = resolver.txt(text.rstrip("."))
        return records[0].encode("utf-8", "surrogateescape") if records else None

    return txt


def _signature_headers(message: bytes) -> list[bytes]:
    """The values of the DKIM-Signature headers, top to bottom, unfolded."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end]
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return [f.split(b":", 1)[1] for f in fields if _SIG_HEADER.match(f)]


def _text(value: bytes | None) -> str:
    return value.decode("ascii", "replace") if value else ""


def verify_all(resolver: DNSResolver, message: bytes, from_count: int) -> list[DKIMResult]:
    """Blocking: verify every signature of `message`."""
    results: list[DKIMResult] = []
    signatures = _signature_headers(message)
    if not signatures:
        return results
    verifier = dkim.DKIM(message, minkey=1024)
    dnsfunc = dnsfunc_for(resolver)
    for idx, value in enumerate(signatures):
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            tags = {}
        domain = _text(tags.get(b"d")).lower()
        selector = _text(tags.get(b"s"))
        b = _text(_WSP.sub(b"", tags.get(b"b", b""))[:12])
        algorithm = _text(tags.get(b"a"))
        result = DKIMResult("fail", domain, selector, b, algorithm)
        if from_count > 1:
            result.reason = "more than one From header"
            results.append(result)
            continue
        try:
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
            result.result = "pass" if ok else "fail"
            if not ok:
                result.reason = "signature did not verify (bad signature or no usable key)"
        except DNSTemporaryError as exc:
            result.result, result.reason = "temperror", str(exc)
        except dkim.ValidationError as exc:
            # A body changed after signing is a plain failure; a malformed signature is not.
            mismatch = "body hash mismatch" in str(exc)
            result.result = "fail" if mismatch else "permerror"
            result.reason = str(exc)
        except dkim.DKIMException as exc:
            result.result, result.reason = "permerror", str(exc)
        results.append(result)
    return results


class DKIMCheck(BaseCheck):
    name = "dkim"

    def __init__(self, resolver: DNSResolver) -> None:
        self.resolver = resolver

    def data(self, tx: Transaction, message: bytes) -> Found:
        if not _signature_headers(message):
            return _found([], tx)
        resolver = self.resolver
        if len(message) <= INLINE_LIMIT:
            results = resolver.run_cached_now(verify_all, resolver, message, tx.from_count)
        else:
            results = resolver.run_async(verify_all, resolver, message, tx.from_count)
        return then(results, _found, tx)


def _found(results: list[DKIMResult], tx: Transaction) -> list[Finding]:
    tx.dkim = results
    if not results:
        return [Finding("dkim", "none", "no DKIM signature")]
    return [
        Finding("dkim", r.result, f"d={r.domain} s={r.selector}: {r.reason}".rstrip(": "))
        for r in results
    ]
