"""Reading a spool directory back: each segment's messages, with what its log says of them.

A segment (`<name>.seg`, the format in `edge.spool.segments`; `<name>.batch` from earlier versions)
holds batches of committed messages; its log (`<name>.log`) holds one JSON line per change:
a recipient finished, held (with the reason) or released, delay warned. A torn last line of a log is ignored,
and a segment is read up to its first batch that is not whole and valid. Nothing here
writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.logger import Logger

from edge.spool import segments
from edge.spool.items import Envelope, SpoolEntry

log = Logger()

_LEGACY = "B"  # how the names of earlier versions' batch files (`<name>.batch`) begin


def recoverable(root: Path) -> list[SpoolEntry]:
    """The messages with an unfinished recipient that a start would hand back for delivery,
    read from the spool at `root` without changing anything (also while an edge runs)."""
    found = scan_queue(segment_paths(Path(root) / "queue"), set(), warn=False)
    return sorted(
        (e for entries in found.values() for e in entries if e.pending),
        key=lambda e: e.envelope.qid,
    )


def segment_path(queue: Path, name: str) -> Path:
    return queue / (f"{name}.batch" if name.startswith(_LEGACY) else f"{name}.seg")


def segment_paths(queue: Path) -> list[Path]:
    return sorted(queue.glob("*.seg")) + sorted(queue.glob(f"{_LEGACY}*.batch"))


def scan_queue(paths: list[Path], skip: set[str], warn: bool) -> dict[str, list[SpoolEntry]]:
    """Each segment's messages, with what its log says of them, by segment name."""
    found: dict[str, list[SpoolEntry]] = {}
    for path in paths:
        name = path.stem
        if name in skip:
            continue
        try:
            if path.suffix == ".batch":
                records = segments.read_legacy_batch(path)
            else:
                scan = segments.read_segment(path)
                records = scan.records
                if warn and scan.damaged_at is not None:
                    log.warn(
                        "spool segment {name}: no whole batch at offset {at}; the rest of the"
                        " segment is dropped (a batch never acknowledged, or damage)",
                        name=name,
                        at=scan.damaged_at,
                    )
        except FileNotFoundError:
            continue  # deleted meanwhile (by a running edge)
        entries = [SpoolEntry(Envelope.from_json(e), name, at, n) for e, at, n in records]
        _apply_log(path.with_suffix(".log"), {e.envelope.qid: e for e in entries})
        found[name] = entries
    return found


def _apply_log(path: Path, entries: dict[str, SpoolEntry]) -> None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line: that recipient is simply tried again
        entry = entries.get(record.get("q", ""))
        if entry is None:
            continue
        if "r" in record:
            entry.outcomes[record["r"]] = record["o"]
        if "held" in record:
            entry.held = bool(record["held"])
            entry.held_reason = str(record.get("reason", "")) if entry.held else ""
        if record.get("warned"):
            entry.warned = True
