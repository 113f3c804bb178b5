"""`tailpost queue ...`: the delivery queue of a running edge, through its control API.

    tailpost queue list [--state S] [--device ID] [--domain D] [--min-age SECONDS] [--json]
    tailpost queue show|retry|hold|release|delete|bounce QUEUE_ID

The running edge owns the queue, so these commands ask it over HTTP (the address from
`<data_dir>/run/listening.json`, else `edge.control_url` / `edge.control_listen`) with the
admin key from the key file. Exit status: 0 done, 1 refused (unknown id, held, busy),
3 the edge cannot be reached. This module must never print the admin key.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from typing import Any, TextIO

from edge.config import Config
from edge.delivery.queueops import STATES
from edge.runtime.adminkeys import admin_key_path, load_admin_keys

ACTIONS = ("show", "retry", "hold", "release", "delete", "bounce")


class Unreachable(Exception):
    pass


def control_url(config: Config) -> str:
    try:
        info = json.loads((config.data_path / "run" / "listening.json").read_text())
        return f"http://{info['listeners']['control']}"
    except (OSError, ValueError, KeyError):
        pass
    return (config.edge.control_url or f"http://{config.edge.control_listen}").rstrip("/")


def call(config: Config, method: str, path: str) -> tuple[int, Any]:
    key = load_admin_keys(admin_key_path(config))[0]
    request = urllib.request.Request(
        control_url(config) + path,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Length": "0"},
        data=b"" if method == "POST" else None,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except OSError as exc:
        raise Unreachable(str(exc)) from exc


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _print_list(items: list[dict[str, Any]], out: TextIO) -> None:
    header = ("QUEUE ID", "STATE", "AGE", "TRIES", "SENDER", "PENDING", "LAST ERROR")
    rows = [header]
    for m in items:
        error = next(iter(m["last_errors"].values()), "") if m["last_errors"] else ""
        if m.get("held_reason"):
            error = "held: " + m["held_reason"]
        rows.append(
            (
                m["id"],
                m["state"],
                _age(m["age_seconds"]),
                str(m["attempts"]),
                m["sender"] or "<>",
                ",".join(m["pending"]),
                error[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")
    out.write(f"{len(items)} message(s)\n")


def _queue(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    try:
        if args.command == "list":
            query = [
                f"{name}={value}"
                for name, value in (
                    ("state", args.state),
                    ("device", args.device),
                    ("domain", args.domain),
                    ("min_age", args.min_age),
                )
                if value is not None
            ]
            status, body = call(
                config, "GET", "/v1/queue" + ("?" + "&".join(query) if query else "")
            )
        elif args.command == "show":
            status, body = call(config, "GET", f"/v1/queue/{args.queue_id}")
        elif args.command == "delete":
            status, body = call(config, "DELETE", f"/v1/queue/{args.queue_id}")
        else:
            status, body = call(config, "POST", f"/v1/queue/{args.queue_id}/{args.command}")
    except Unreachable as exc:
        out.write(f"tailpost: the edge's control API cannot be reached: {exc}\n")
        return 3
    if status >= 400:
        out.write(f"tailpost: {body.get('error', 'refused')} ({body.get('code', status)})\n")
        return 1
    if args.json or args.command not in ("list", "show"):
        json.dump(body, out, indent=2, sort_keys=True)
        out.write("\n")
    elif args.command == "list":
        _print_list(body["messages"], out)
    else:
        for key in ("id", "state", "sender", "pending", "attempts", "last_errors", "held"):
            out.write(f"{key:12} {body[key]}\n")
        if body.get("held_reason"):
            out.write(f"{'held reason':12} {body['held_reason']}\n")
        out.write(f"{'age':12} {_age(body['age_seconds'])}\n")
        when = body["next_attempt_at"]
        nxt = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else "-"
        out.write(f"{'next try':12} {nxt}\n")
    return 0


def add_queue(groups: Any) -> None:
    queue = groups.add_parser("queue", help="list and act on the delivery queue of a running edge")
    commands = queue.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="queued messages, oldest first")
    listing.add_argument("--state", choices=STATES)
    listing.add_argument("--device", help="only messages waiting for this device id")
    listing.add_argument("--domain", help="only messages with a recipient on this domain")
    listing.add_argument("--min-age", type=float, help="only messages older than SECONDS")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_queue)
    helps = {
        "show": "envelope, attempts and last errors of one message",
        "retry": "try delivering now",
        "hold": "stop delivery attempts until released",
        "release": "resume delivery attempts",
        "delete": "drop the message for every unfinished recipient (no report)",
        "bounce": "give up now and send the sender a failure report",
    }
    for action in ACTIONS:
        sub = commands.add_parser(action, help=helps[action])
        sub.add_argument("queue_id")
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(handler=_queue)
