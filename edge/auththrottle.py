"""A delay on failed logins that grows per client address and per user name, and the one
log line each failure gets.

Every listener that checks a password (the connector's SMTP AUTH, IMAP LOGIN and
AUTHENTICATE) asks one shared `AuthThrottle` to run its check. After a failure, the answer
waits `base_delay` seconds, doubled for each earlier failure of the same client address
(IPv6: its /64) or user name, up to `max_delay`; until that delay has passed, no other
attempt for that address or user is checked (it waits its turn, then is checked), so
parallel connections or pipelined commands gain nothing over waiting. A success answers at
once when no such delay runs, and forgets the address's and the user's failures. A record
is forgotten `forget_after` seconds after its last failure, and at most `max_keys`
records are kept (the least recently failed go first).

Each failure is logged as one line a log watcher (fail2ban) can match:

    auth failed: service=imap rhost=203.0.113.9 user=alice%20x reason=bad-credentials ...

The user name is percent-encoded (only letters, digits and `@._+-` are kept as they are),
so it can hold no space, `=`, newline or other character that could make the line say
something else.

It must never block the reactor (delays are the clock's `callLater`), never check a
password for an address or user while the delay of its last failure runs, never keep more
than `max_keys` records, and never write a user name into the log as received.
"""

from __future__ import annotations

import ipaddress
import string
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from edge.runtime.nowlater import then
from edge.smtp.conncount import network_of

_log = Logger()

MAX_LOGGED_USER = 100
"""Characters of a user name that are logged (before encoding) and keyed on."""

_SAFE = "@._+-"
_PLAIN = frozenset(string.ascii_letters + string.digits + _SAFE)


def log_safe(value: str) -> str:
    """`value` for a log line: percent-encoded but for letters, digits and `@._+-`, cut to
    `MAX_LOGGED_USER` characters first (then `...` marks the cut)."""
    cut = value[:MAX_LOGGED_USER]
    encoded = cut if _PLAIN.issuperset(cut) else quote(cut, safe=_SAFE, errors="replace")
    return encoded + ("..." if len(value) > MAX_LOGGED_USER else "")


def log_host(host: str) -> str:
    """The client address for a log line: an IP address as it is, anything else encoded."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return log_safe(host) or "unknown"


@dataclass
class _Record:
    failures: int
    last: float
    """When the last failure was."""
    until: float
    """No attempt for this key is checked before this time."""


class AuthThrottle:
    """Failed-login delays and their log lines, for every listener of one process."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        base_delay: float = 2.0,
        max_delay: float = 30.0,
        forget_after: float = 900.0,
        per_connection: int = 3,
        max_keys: int = 10000,
        log: Logger | None = None,
    ) -> None:
        """`per_connection`: failures after which a listener stops checking attempts on
        that connection (0: no such limit)."""
        self.clock = clock
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.per_connection = per_connection
        self.max_keys = max_keys
        self.log = log or _log
        self._records: OrderedDict[str, _Record] = OrderedDict()

    # -- the attempt ------------------------------------------------------------------

    def attempt(
        self, service: str, rhost: str, user: str, check: Callable[[], Any]
    ) -> bool | defer.Deferred[bool]:
        """Run `check()` (true or false, now or by Deferred) for a login of `user` from
        `rhost` once no delay of an earlier failure for either runs; its truth, at once for
        a success, after the failure's delay for a failure. An exception of `check` is
        passed on (and is no failed login)."""
        keys = self._keys(rhost, user)
        wait = max((r.until for r in map(self._records.get, keys) if r), default=0.0)
        wait -= self.clock.seconds()
        if wait > 0:
            d = task.deferLater(self.clock, wait, lambda: None)
            return d.addCallback(lambda _: self._check(service, rhost, user, keys, check))
        return self._check(service, rhost, user, keys, check)

    def _check(
        self,
        service: str,
        rhost: str,
        user: str,
        keys: tuple[str, str],
        check: Callable[[], Any],
    ) -> bool | defer.Deferred[bool]:
        return then(check(), self._checked, service, rhost, user, keys)  # type: ignore[no-any-return]

    def _checked(
        self, ok: Any, service: str, rhost: str, user: str, keys: tuple[str, str]
    ) -> bool | defer.Deferred[bool]:
        if ok:
            for key in keys:
                self._records.pop(key, None)
            return True
        delay = self.failed(keys)
        self._log_failure(service, rhost, user, "bad-credentials", delay)
        return task.deferLater(self.clock, delay, lambda: False)

    def failed(self, keys: tuple[str, ...]) -> float:
        """Count a failure for each of `keys`: the delay before it is answered."""
        now = self.clock.seconds()
        delay = 0.0
        for key in keys:
            record = self._records.pop(key, None)
            if record is None or now - record.last >= self.forget_after:
                record = _Record(0, now, now)
            record.failures += 1
            record.last = now
            delay = max(delay, self.delay_for(record.failures))
            self._records[key] = record  # the most recently failed last
        for key in keys:
            self._records[key].until = now + delay
        while len(self._records) > self.max_keys:
            self._records.popitem(last=False)
        return delay

    def delay_for(self, failures: int) -> float:
        """The delay after the `failures`-th failure in a row."""
        if failures <= 0:
            return 0.0
        return min(self.max_delay, self.base_delay * 2.0 ** min(failures - 1, 32))

    def _keys(self, rhost: str, user: str) -> tuple[str, str]:
        return (
            "addr " + network_of(rhost, 32, 64),
            "user " + user[:MAX_LOGGED_USER].casefold(),
        )

    def __len__(self) -> int:
        """How many addresses and users have a record."""
        return len(self._records)

    # -- the log line -----------------------------------------------------------------

    def _log_failure(self, service: str, rhost: str, user: str, reason: str, delay: float) -> None:
        self.log.warn(
            "{line}",
            line=failure_line(service, rhost, user, reason, delay),
            service=service,
            rhost=rhost,
        )


def failure_line(service: str, rhost: str, user: str, reason: str, delay: float) -> str:
    """The log line of one failed login (see the module's docstring)."""
    return (
        f"auth failed: service={log_safe(service)} rhost={log_host(rhost)} "
        f"user={log_safe(user)} reason={log_safe(reason)} delay={delay:g}"
    )
