"""IMAP benchmark: the device's IMAP server against Dovecot on one large folder, in one run.

Both servers get a copy of the same Maildir (`--messages`, 100,000 by default: small
messages, a third unread, 100 different senders) and the same commands from `imaplib` on
127.0.0.1: a first `SELECT` and a first search on a header field (each server meets the
folder, and its headers, for the first time and builds what it keeps of them), then, in
rounds that take turns between the servers, `SELECT`, `UID FETCH 1:* (FLAGS)`, and three
`UID SEARCH`es (by flag, by a From address, by a Subject). Each figure is the median over
the rounds; the ratio is Dovecot's time over tailpost's (above 1:
tailpost is faster). Dovecot (the Debian package `dovecot-imapd`) runs as a private instance
on its own configuration in the temporary directory; without it, tailpost's figures alone.
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smtp_load  # noqa: E402
import smtp_peers  # noqa: E402

USER, PASSWORD = "bench", "bench-secret"

OPERATIONS: list[tuple[str, tuple[str, ...]]] = [
    ("SELECT INBOX", ()),
    ("UID FETCH 1:* (FLAGS)", ("FETCH", "1:*", "(FLAGS)")),
    ("UID SEARCH UNSEEN", ("SEARCH", "UNSEEN")),
    ('UID SEARCH FROM "s7@example.org"', ("SEARCH", "FROM", '"s7@example.org"')),
    ('UID SEARCH SUBJECT "message 4242"', ("SEARCH", "SUBJECT", '"message 4242"')),
]

FIRST: list[tuple[str, tuple[str, ...]]] = [
    ("first SELECT INBOX", ()),
    ('first UID SEARCH FROM "s8@example.org"', ("SEARCH", "FROM", '"s8@example.org"')),
]
"""Measured once, before the rounds: what each server does on meeting the folder, and on
the first search that reads every message's header (what it keeps of it serves later ones)."""

DOVECOT_CONF = """\
base_dir = {work}/run
state_dir = {work}/state
log_path = {work}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{maildir}
passdb {{
  driver = static
  args = password={password}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={work}/home
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
"""


def make_maildir(root: Path, count: int) -> None:
    """`count` small messages in cur/, every third unread, as a delivery agent leaves them."""
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    base = 1_700_000_000
    for i in range(count):
        data = (
            b"From: Sender %d <s%d@example.org>\r\nTo: bob@example.org\r\n"
            b"Subject: message %d\r\nMessage-ID: <m%d@example.org>\r\n"
            b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\n" % (i % 100, i % 100, i, i)
        ) + b"A line of the body.\r\n" * 20
        path = root / "cur" / f"{base + i}.M{i}P1.bench:2,{'S' if i % 3 else ''}"
        path.write_bytes(data)
        os.utime(path, (base + i, base + i))


class Server:
    def __init__(self, name: str, port: int, pid: int) -> None:
        self.name = name
        self.port = port
        self.pid = pid
        self.client: imaplib.IMAP4 | None = None

    def connect(self) -> imaplib.IMAP4:
        if self.client is None:
            self.client = imaplib.IMAP4("127.0.0.1", self.port, timeout=600)
            self.client.login(USER, PASSWORD)
        return self.client


@contextlib.contextmanager
def tailpost_imap(work: Path, maildir: Path) -> Iterator[Server]:
    port = smtp_peers.free_port()
    log = open(work / "tailpost-imap.log", "wb")  # noqa: SIM115
    env = dict(os.environ, PYTHONPATH=str(smtp_peers.REPO))
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-tailpost", str(maildir), str(port)],
        stdout=log,
        stderr=log,
        env=env,
    )
    try:
        wait_imap(port, proc)
        yield Server("tailpost", port, proc.pid)
    finally:
        smtp_peers.stop_process(proc)
        log.close()


@contextlib.contextmanager
def dovecot_imap(work: Path, maildir: Path) -> Iterator[Server]:
    binary = shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None
    )
    if binary is None:
        raise smtp_peers.PeerUnavailable("dovecot is not installed (Debian package dovecot-imapd)")
    for sub in ("run", "state", "home"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:  # Dovecot serves no mailbox as root: the folder goes to `nobody`
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
        work.chmod(0o711)  # (mkdtemp makes it 0700) so that `nobody` can reach its parts
        for path in [work / "home", maildir, *maildir.rglob("*")]:
            os.chown(path, uid, gid)
    port = smtp_peers.free_port()
    conf = work / "dovecot.conf"
    conf.write_text(
        DOVECOT_CONF.format(
            work=work, maildir=maildir, password=PASSWORD, uid=uid, gid=gid, port=port
        )
    )
    proc = subprocess.Popen(
        [binary, "-F", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "dovecot.stderr", "wb"),  # noqa: SIM115
    )
    try:
        wait_imap(port, proc)
        yield Server("dovecot", port, proc.pid)
    finally:
        smtp_peers.stop_process(proc)


def wait_imap(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see the logs with --keep")
        with contextlib.suppress(OSError):
            imaplib.IMAP4("127.0.0.1", port, timeout=5).logout()
            return
        time.sleep(0.1)
    raise TimeoutError(f"no IMAP server on port {port} within {timeout} s")


def run_operation(client: imaplib.IMAP4, command: tuple[str, ...]) -> float:
    started = time.perf_counter()
    typ, data = client.uid(*command) if command else client.select("INBOX")
    elapsed = time.perf_counter() - started
    if typ != "OK":
        raise RuntimeError(f"{command or 'SELECT'}: {typ} {data!r}"[:300])
    return elapsed


def measure(servers: list[Server], repeat: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, list[float]]] = {s.name: {} for s in servers}
    for server in servers:  # the first meeting with the folder, and with its headers
        for label, command in FIRST:
            took = run_operation(server.connect(), command)
            results[server.name][label] = [took]
            print(f"  {server.name}: {label} {took:.2f} s", flush=True)
    for round_no in range(repeat):
        for label, command in OPERATIONS:
            for server in servers:
                took = run_operation(server.connect(), command)
                results[server.name].setdefault(label, []).append(took)
        print(f"  round {round_no + 1} of {repeat} done", flush=True)
    return {
        name: {label: statistics.median(times) for label, times in ops.items()}
        for name, ops in results.items()
    }


def render(figures: dict[str, dict[str, float]], rss: dict[str, int], count: int) -> str:
    names = list(figures)
    lines = [
        f"IMAP on one folder of {count:,} messages; machine: "
        + ", ".join(f"{k} {v}" for k, v in smtp_load.machine().items()),
        "",
        "| operation | "
        + " | ".join(f"{n} ms" for n in names)
        + (" | dovecot / tailpost |" if "dovecot" in names else " |"),
        "|---|" + "---:|" * len(names) + ("---:|" if "dovecot" in names else ""),
    ]
    for label in figures[names[0]]:
        cells = [f"{figures[n][label] * 1000:,.1f}" for n in names]
        ratio = ""
        if "dovecot" in names:
            ratio = f" | {figures['dovecot'][label] / figures['tailpost'][label]:.2f}x"
        lines.append(f"| {label} | " + " | ".join(cells) + ratio + " |")
    lines.append("")
    lines.append(
        "Resident memory after the run: "
        + ", ".join(f"{n} {rss[n] / 2**20:.1f} MiB" for n in names)
        + " (Dovecot: all its processes)"
    )
    return "\n".join(lines)


def serve_tailpost(maildir: str, port: int) -> None:
    from twisted.internet import reactor

    from connector.imap import make_imap_factory
    from maildir import Maildir

    factory = make_imap_factory(Maildir(Path(maildir)), lambda u, p: (u, p) == (USER, PASSWORD))
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    reactor.run()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="messages in the folder")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median counts")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.repeat < 1:
        parser.error("--messages and --repeat must be positive")
    smtp_peers.stop_on_signals()
    work = Path(tempfile.mkdtemp(prefix="tailpost-imap-bench-"))
    print(f"work directory {work}", flush=True)
    try:
        started = time.monotonic()
        make_maildir(work / "tailpost-mail", args.messages)
        shutil.copytree(work / "tailpost-mail", work / "dovecot-mail")
        print(
            f"  {args.messages:,} messages written in {time.monotonic() - started:.0f} s",
            flush=True,
        )
        with contextlib.ExitStack() as running:
            servers = [running.enter_context(tailpost_imap(work, work / "tailpost-mail"))]
            try:
                servers.append(running.enter_context(dovecot_imap(work, work / "dovecot-mail")))
            except smtp_peers.PeerUnavailable as exc:
                print(f"  dovecot: skipped ({exc})", flush=True)
            figures = measure(servers, args.repeat)
            rss = {s.name: smtp_load.rss_tree_bytes(s.pid) for s in servers}
            for server in servers:
                if server.client is not None:
                    with contextlib.suppress(Exception):
                        server.client.logout()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(render(figures, rss, args.messages))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-tailpost":
        serve_tailpost(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())
