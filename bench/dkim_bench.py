"""DKIM signing speed: the edge's signer (`edge.outbound.dkimsign.DkimSigner`) next to
dkimpy's own `dkim.sign`, on the same 4 KB messages, on one core.

Keys: a new RSA-2048 and Ed25519 pair (`generate_dkim_keys`), in a SQLite store in a
temporary directory with its own store key, as the edge keeps them. Messages: `--distinct`
different messages of about `--size` octets (a header section like a mail client's, body
lines of 76 characters). dkimpy signs the same header fields as tailpost (it is given
tailpost's `h=` list for each message) with relaxed/relaxed. Each signature of both signers
is checked once with `dkim.verify` before any timing.

In each round each signer signs for `--seconds` of CPU time of this thread (other work on
the machine does not count), taking turns, the first of the pair alternating between rounds.
Each figure is the median over `--rounds`; the ratio is tailpost's rate over dkimpy's (above
1: tailpost is faster), with its range over the rounds. "both" is one call of tailpost's
signer for a domain with both keys (two signatures) against two calls of `dkim.sign`. In the
RSA rounds, OpenSSL's RSA-2048 signature of a digest alone is timed too: the floor, and what
tailpost adds to it per message.

    .venv/bin/python bench/dkim_bench.py [--rounds 5] [--seconds 1.0] [--size 4096]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import smtp_load  # noqa: E402

from edge.domains.scan import GeneratedKey, generate_dkim_keys  # noqa: E402
from edge.outbound.dkimsign import DkimSigner  # noqa: E402
from edge.store import open_store  # noqa: E402
from edge.store.access import AccessStore  # noqa: E402
from edge.store.keyring import StoreKeys  # noqa: E402

TARGET_RSA = 2000  # RSA-2048 signatures per second on one core
DOMAINS = {"rsa": "rsa.bench.test", "ed25519": "ed.bench.test", "both": "both.bench.test"}
ALGORITHM = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
LABELS = {
    "rsa": "rsa-sha256 (RSA-2048)",
    "ed25519": "ed25519-sha256",
    "both": "both (one call / two calls)",
}

Sign = Callable[[bytes], bytes]


def messages(count: int, size: int) -> list[bytes]:
    """`count` different messages of about `size` octets."""
    out = []
    for i in range(count):
        head = (
            f'From: "Sender {i}" <sender{i}@both.bench.test>\r\n'
            f"To: rcpt{i}@example.net,\r\n other{i}@example.net\r\n"
            f"Cc: copy{i}@example.net\r\n"
            f"Subject: bench message {i}\r\n"
            f"Date: Mon, 07 Dec 2026 12:{i % 60:02d}:00 +0000\r\n"
            f"Message-ID: <{i}.bench@both.bench.test>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode()
        line = (f"{i:08d} " + "x" * 67 + "\r\n").encode()
        body = line * max(1, (size - len(head)) // len(line))
        rest = size - len(head) - len(body) - 2
        out.append(head + body + (b"y" * rest + b"\r\n" if rest > 0 else b""))
    return out


def build_keys(tmp: Path) -> tuple[AccessStore, dict[str, GeneratedKey]]:
    store = open_store(f"sqlite:///{tmp / 'store.db'}", keys=StoreKeys.generate())
    access = AccessStore(store)
    keys = {k.algorithm: k for k in generate_dkim_keys("bench")}
    for algorithm, key in keys.items():
        for domain in (DOMAINS[algorithm], DOMAINS["both"]):
            access.add_dkim_key(
                domain, key.selector, key.algorithm, key.private_pem, key.public_b64
            )
    return access, keys


def signers(
    access: AccessStore, keys: dict[str, GeneratedKey], case: str
) -> tuple[Sign, Sign, Callable[[bytes], list[list[bytes]]]]:
    """(tailpost's sign, dkimpy's sign, the h= lists tailpost signs) for `case`."""
    signer = DkimSigner(access)
    domain = DOMAINS[case]
    used = ["rsa", "ed25519"] if case == "both" else [case]
    listed: dict[bytes, list[list[bytes]]] = {}

    def h_lists(message: bytes) -> list[list[bytes]]:
        found = listed.get(message)
        if found is None:
            header = signer.sign(message, domain)
            found = [
                re.sub(rb"\s", b"", h).split(b":") for h in re.findall(rb"\bh=([^;]*);", header)
            ]
            listed[message] = found
        return found

    def ours(message: bytes) -> bytes:
        return signer.sign(message, domain)

    def theirs(message: bytes) -> bytes:
        out = b""
        for algorithm, names in zip(used, h_lists(message), strict=True):
            key = keys[algorithm]
            out += dkim.sign(
                message,
                key.selector.encode(),
                domain.encode(),
                key.private_pem.encode(),
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=names,
                signature_algorithm=ALGORITHM[algorithm],
            )
        return out

    return ours, theirs, h_lists


def openssl_alone(key: GeneratedKey) -> Sign:
    """The floor: OpenSSL's RSA signature of a SHA-256 digest, nothing else."""
    private = serialization.load_pem_private_key(key.private_pem.encode(), None)
    assert isinstance(private, rsa.RSAPrivateKey)
    digest = hashlib.sha256(b"x").digest()
    pad, prehashed = padding.PKCS1v15(), Prehashed(hashes.SHA256())
    return lambda _message: private.sign(digest, pad, prehashed)


def check(access: AccessStore, sign: Sign, message: bytes, count: int) -> None:
    """Every signature `sign` makes for `message` verifies (with the store's keys)."""

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        selector, _, domain = name.decode().rstrip(".").partition("._domainkey.")
        for key in access.dkim_keys(domain):
            if key.selector == selector:
                return key.dns_value().encode()
        return None

    signed = sign(message) + message
    checker = dkim.DKIM(signed)
    results = [checker.verify(idx=i, dnsfunc=txt) for i in range(count)]
    if signed.count(b"DKIM-Signature:") != count or not all(results):
        raise SystemExit(f"a signature does not verify: {results}")


def rate(sign: Sign, batch: list[bytes], seconds: float) -> float:
    """Calls per second of this thread's CPU time, signing for about `seconds`."""
    clock = time.thread_time
    done, count = 0, len(batch)
    start = clock()
    while True:
        for _ in range(8):
            sign(batch[done % count])
            done += 1
        elapsed = clock() - start
        if elapsed >= seconds:
            return done / elapsed


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, list[float]]]:
    access, keys = build_keys(tmp)
    batch = messages(args.distinct, args.size)
    results: dict[str, dict[str, list[float]]] = {}
    for case in ("rsa", "ed25519", "both"):
        ours, theirs, h_lists = signers(access, keys, case)
        count = 2 if case == "both" else 1
        for message in batch:
            h_lists(message)  # tailpost's h= lists, for dkimpy (and the keys loaded)
        check(access, ours, batch[0], count)
        check(access, theirs, batch[0], count)
        figures: dict[str, list[float]] = {"tailpost": [], "dkimpy": [], "openssl": []}
        for round_no in range(args.rounds):
            pair = [("tailpost", ours), ("dkimpy", theirs)]
            for name, sign in pair if round_no % 2 == 0 else pair[::-1]:
                figures[name].append(rate(sign, batch, args.seconds))
            if case == "rsa":
                figures["openssl"].append(rate(openssl_alone(keys["rsa"]), batch, args.seconds))
        print(f"  {LABELS[case]}: {args.rounds} rounds done", flush=True)
        results[case] = figures
    return results


def render(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    size = len(messages(1, args.size)[0])
    lines = [
        f"DKIM signing of {size:,}-octet messages on one core (CPU time of the signing thread), "
        f"median of {args.rounds} rounds; machine: "
        + ", ".join(f"{k} {v}" for k, v in smtp_load.machine().items()),
        "",
        "| algorithm | tailpost calls/s | dkimpy calls/s | tailpost us/call "
        "| tailpost / dkimpy | by round |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for case, figures in results.items():
        ours = statistics.median(figures["tailpost"])
        theirs = statistics.median(figures["dkimpy"])
        by_round = [a / b for a, b in zip(figures["tailpost"], figures["dkimpy"], strict=True)]
        lines.append(
            f"| {LABELS[case]} | {ours:,.0f} | {theirs:,.0f} | {1e6 / ours:,.0f} "
            f"| {ours / theirs:.1f}x | {min(by_round):.1f}x to {max(by_round):.1f}x |"
        )
    ours = statistics.median(results["rsa"]["tailpost"])
    floor = statistics.median(results["rsa"]["openssl"])
    verdict = "met" if ours >= TARGET_RSA else "NOT met"
    lines += [
        "",
        f"Target: at least {TARGET_RSA:,} RSA-2048 signatures/s on one core: {verdict} "
        f"({ours:,.0f}/s). OpenSSL's RSA-2048 signature alone, same rounds: {floor:,.0f}/s "
        f"({1e6 / floor:,.0f} us; tailpost's canonicalization, hashing and header: "
        f"{1e6 / ours - 1e6 / floor:,.0f} us a message).",
        f"Versions: dkimpy {dkim_version()}, cryptography {cryptography_version()}.",
    ]
    return "\n".join(lines)


def dkim_version() -> str:
    from importlib.metadata import version

    return version("dkimpy")


def cryptography_version() -> str:
    from importlib.metadata import version

    return version("cryptography")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median counts")
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per signer")
    parser.add_argument("--size", type=int, default=4096, help="octets per message")
    parser.add_argument("--distinct", type=int, default=200, help="different messages")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.size < 512 or args.distinct < 1:
        parser.error("--rounds, --seconds, --distinct must be positive, --size at least 512")
    with tempfile.TemporaryDirectory(prefix="tailpost-dkim-bench-") as tmp:
        results = measure(args, Path(tmp))
    print()
    print(render(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
