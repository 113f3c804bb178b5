"""Optional Rspamd scan: each message goes to Rspamd's `/checkv2`, its answer is evidence.

Rspamd's score, action and symbols are recorded; its action becomes the finding
`rspamd.<action>` (`rspamd.add_header`, `rspamd.reject`, ...), which configuration maps to
tailpost's actions like any other finding. An unreachable or failing Rspamd is recorded as
`rspamd.temperror` and never loses mail by itself. The request is made with Twisted's HTTP
client on the reactor; nothing here blocks.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

if TYPE_CHECKING:
    from twisted.web.http_headers import Headers

from edge.checks.actions import normalize_key
from edge.checks.base import BaseCheck, Finding, SpamResult, Transaction

_NOT_SPAM = ("no action", "greylist")


def parse_reply(body: bytes) -> SpamResult:
    """Rspamd's JSON answer as a SpamResult; ValueError when it is not one."""
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("action"), str):
        raise ValueError("Rspamd answer without an action")
    symbols = data.get("symbols") or {}
    names: list[str] = []
    if isinstance(symbols, dict):
        ranked = sorted(
            symbols.items(),
            key=lambda kv: -float(kv[1].get("score", 0) if isinstance(kv[1], dict) else 0),
        )
        names = [str(name) for name, _ in ranked]
    action = data["action"].lower()

    def number(key: str) -> float | None:
        value = data.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    return SpamResult(
        "No" if action in _NOT_SPAM else "Yes",
        score=number("score"),
        required=number("required_score"),
        action=action,
        symbols=names,
        source="rspamd",
    )


class RspamdCheck(BaseCheck):
    name = "rspamd"

    def __init__(self, reactor: Any, url: str, hostname: str, timeout: float = 20.0) -> None:
        # Twisted's HTTP client (about 1.4 MiB) is loaded only by an edge that uses Rspamd.
        from twisted.web.client import Agent, HTTPConnectionPool

        self.url = url.rstrip("/") + "/checkv2"
        self.hostname = hostname
        self.agent = Agent(
            reactor, connectTimeout=timeout, pool=HTTPConnectionPool(reactor, persistent=True)
        )

    def _headers(self, tx: Transaction) -> Headers:
        from twisted.web.http_headers import Headers

        headers = Headers(
            {
                b"IP": [tx.client_ip.encode()],
                b"Helo": [tx.helo.encode("utf-8", "replace")],
                b"From": [tx.mail_from.encode("utf-8", "replace")],
                b"Rcpt": [r.address.encode("utf-8", "replace") for r in tx.recipients],
                b"MTA-Name": [self.hostname.encode()],
                b"Content-Type": [b"message/rfc822"],
            }
        )
        return headers

    async def data(self, tx: Transaction, message: bytes) -> list[Finding]:
        from twisted.web.client import FileBodyProducer, readBody

        try:
            response = await self.agent.request(
                b"POST",
                self.url.encode(),
                self._headers(tx),
                FileBodyProducer(BytesIO(message)),
            )
            body = await readBody(response)
            if response.code != 200:
                raise ValueError(f"HTTP {response.code}: {body[:200]!r}")
            result = parse_reply(body)
        except defer.CancelledError:
            raise
        except Exception as exc:  # unreachable, refused, bad answer: evidence, not a fault
            return [Finding("rspamd", "temperror", f"{self.url}: {exc}")]
        if tx.spam is not None and tx.spam.source == "rules":
            result.verdict = "Yes"  # a block rule matched: spam whatever Rspamd thinks
            result.symbols = [*tx.spam.symbols, *result.symbols]
        tx.spam = result
        score = "" if result.score is None else f" score {result.score}"
        return [
            Finding(
                "rspamd",
                normalize_key(result.action),
                f"{result.action}{score} ({', '.join(result.symbols[:10])})",
            )
        ]
