"""The Maildir work behind the loopback API: listing, reading, marking, moving, deleting.

`LocalMail` turns validated requests into Maildir operations and JSON-ready dicts. All of
it is blocking (file I/O and MIME parsing), so callers run it in a worker thread. Listing
keeps a bounded per-message summary cache: Maildir messages never change content under
their unique name (only flags, which come from the listing), so a summary parsed once is
good until the message is gone. A message's parse (up to the limits of
`maildir.mimetree`: a thousand parts) makes thousands of objects that reference counting
frees when it is done; the cyclic collector is paused meanwhile (the process's pause,
`connector.collector`, passed in by its assembly), else they reach its oldest generation
and set off a pass over every object of the process, which holds the interpreter, the
reactor's thread included, for 40 to 130 ms. This module must never build a path itself
(names go through the maildir package) and never delete a message outside Trash: deleting
moves to Trash first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from connector.collector import WHOLE, CollectorPause
from maildir import Folder, FolderNotFound, Maildir, MessageInfo, MessageNotFound
from maildir.message import (
    AttachmentInfo,
    MessageSummary,
    get_attachment,
    header_summary,
    parse_detail,
    summarize,
)
from maildir.verdict import parse_verdict
from webapi.local.models import MAX_LIMIT, QUEUE_ID, ListQuery
from webapi.local.risk import assess_attachment, assess_message

__all__ = ["JUNK", "TRASH", "Links", "LocalMail", "Resolved", "SummaryCache"]

PREFIX = "/localapi/v0/mail"
SEEN = "\\Seen"
INBOX = "INBOX"
TRASH = "Trash"
JUNK = "Junk"
QUEUE_ID_HEADER = "X-Tailpost-Queue-ID"
DEFAULT_CACHE_SIZE = 100_000


class Links:
    """Absolute URLs of API resources; `base` follows the real listening address."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def message(self, msg_id: str, mailbox: str, suffix: str = "") -> str:
        url = f"{self.base}{PREFIX}/messages/{quote(msg_id, safe='')}{suffix}"
        return f"{url}?{urlencode({'mailbox': mailbox})}" if mailbox != INBOX else url

    def attachment(self, msg_id: str, mailbox: str, index: int, download: bool) -> str:
        url = f"{self.base}{PREFIX}/messages/{quote(msg_id, safe='')}/attachments/{index}"
        params = {"mailbox": mailbox} if mailbox != INBOX else {}
        if download:
            params["download"] = "1"
        return f"{url}?{urlencode(params)}" if params else url


class SummaryCache:
    """A bounded, thread-safe LRU of message summaries keyed by (folder, message id)."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, str], MessageSummary] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, folder: str, msg_id: str) -> MessageSummary | None:
        with self._lock:
            summary = self._items.get((folder, msg_id))
            if summary is None:
                self.misses += 1
                return None
            self._items.move_to_end((folder, msg_id))
            self.hits += 1
            return summary

    def put(self, folder: str, msg_id: str, summary: MessageSummary) -> None:
        with self._lock:
            self._items[(folder, msg_id)] = summary
            self._items.move_to_end((folder, msg_id))
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


@dataclass(frozen=True)
class Resolved:
    folder: Folder
    info: MessageInfo
    data: bytes


class LocalMail:
    """Blocking operations on the device's Maildir for the API (run them in a thread)."""

    def __init__(
        self,
        maildir: Maildir,
        links: Links,
        cache: SummaryCache | None = None,
        pause: CollectorPause = WHOLE,
    ) -> None:
        self.maildir = maildir
        self.links = links
        self.cache = cache if cache is not None else SummaryCache()
        self.pause = pause

    # -- summaries ---------------------------------------------------------------------------

    def _summary(self, folder: Folder, info: MessageInfo) -> MessageSummary | None:
        cached = self.cache.get(folder.name, info.id)
        if cached is not None:
            return cached
        try:
            data = folder.read(info.id)
        except MessageNotFound:  # removed since it was listed
            return None
        with self.pause:  # see the module's docstring
            summary = summarize(data)
        self.cache.put(folder.name, info.id, summary)
        return summary

    def _item(self, folder: Folder, info: MessageInfo) -> dict[str, Any] | None:
        summary = self._summary(folder, info)
        if summary is None:
            return None
        return {
            "id": info.id,
            "proxy_message_id": summary.queue_id,
            "mailbox": folder.name,
            "subject": summary.subject,
            "from": summary.from_,
            "to": summary.to,
            "date": summary.date,
            "size_bytes": info.size,
            "flags": sorted(info.flags),
            "preview": summary.preview,
        }

    # -- reading -----------------------------------------------------------------------------

    def list(self, query: ListQuery) -> dict[str, Any]:
        folder = self.maildir.folder(query.mailbox)
        infos = folder.messages()
        if query.unread_only:
            infos = [info for info in infos if SEEN not in info.flags]
        infos.sort(key=lambda info: (info.internaldate, info.uid), reverse=True)
        window = slice(query.offset, query.offset + min(query.limit, MAX_LIMIT))
        if query.search:
            needle = query.search.casefold()
            matched = []
            for info in infos:
                item = self._item(folder, info)
                fields = (item["subject"], item["from"], item["preview"]) if item else ()
                if any(needle in str(field).casefold() for field in fields):
                    matched.append(item)
            total, page = len(matched), matched[window]
        else:
            total = len(infos)
            page = [self._item(folder, info) for info in infos[window]]
        messages = [item for item in page if item is not None]
        return {"mailbox": folder.name, "total": total, "messages": messages}

    def resolve(self, mailbox: str, ref: str, kind: str) -> Resolved:
        """The message `ref` names in `mailbox`: a Maildir id, queue id or Message-ID."""
        folder = self.maildir.folder(mailbox)
        if kind == "id":
            try:
                info = folder.get(ref)
                return Resolved(folder, info, folder.read(info.id))
            except MessageNotFound:
                if not QUEUE_ID.fullmatch(ref):
                    raise
                kind = "queue"
        for info in reversed(folder.messages()):
            summary = self.cache.get(folder.name, info.id)
            try:
                data = None
                if summary is None:
                    data = folder.read(info.id)
                    summary = header_summary(data)
                value = summary.message_id if kind == "msgid" else summary.queue_id
                if value == ref:
                    return Resolved(
                        folder, info, data if data is not None else folder.read(info.id)
                    )
            except MessageNotFound:
                continue
        raise MessageNotFound(ref)

    def detail(
        self,
        mailbox: str,
        ref: str,
        kind: str,
        html: str = "sanitized",
        remote_images: bool = False,
    ) -> dict[str, Any]:
        """The message; `body_html` sanitized unless `html` is "raw" (as received), remote
        images in it blocked unless `remote_images`."""
        found = self.resolve(mailbox, ref, kind)
        folder, info = found.folder, found.info

        def attachment_url(index: int) -> str:
            return self.links.attachment(info.id, folder.name, index, False)

        with self.pause:  # see the module's docstring
            detail = parse_detail(
                found.data, remote_images=remote_images, attachment_url=attachment_url
            )
        summary = detail.summary
        self.cache.put(folder.name, info.id, summary)
        return {
            "id": info.id,
            "proxy_message_id": summary.queue_id,
            "mailbox": folder.name,
            "subject": summary.subject,
            "from": summary.from_,
            "to": summary.to,
            "cc": summary.cc,
            "date": summary.date,
            "message_id": summary.message_id,
            "in_reply_to": detail.in_reply_to,
            "references": detail.references,
            "headers": detail.headers,
            "body_text": detail.body_text,
            "body_html": detail.body_html_raw if html == "raw" else detail.body_html,
            "attachments": [self._attachment_item(folder, info, a) for a in detail.attachments],
            "risk": assess_message(detail, parse_verdict(found.data)),
            "flags": sorted(info.flags),
            "size_bytes": info.size,
        }

    def _attachment_item(
        self, folder: Folder, info: MessageInfo, attachment: AttachmentInfo
    ) -> dict[str, Any]:
        links = self.links
        return {
            "index": attachment.index,
            "filename": attachment.filename,
            "content_type": attachment.content_type,
            "size_bytes": attachment.size_bytes,
            "open_url": links.attachment(info.id, folder.name, attachment.index, False),
            "download_url": links.attachment(info.id, folder.name, attachment.index, True),
            "risk": assess_attachment(attachment),
        }

    def attachment(
        self, mailbox: str, ref: str, kind: str, index: int
    ) -> tuple[AttachmentInfo, bytes]:
        data = self.resolve(mailbox, ref, kind).data
        with self.pause:  # see the module's docstring
            return get_attachment(data, index)

    # -- changes -----------------------------------------------------------------------------

    def _folder_or_create(self, name: str) -> Folder:
        try:
            return self.maildir.folder(name)
        except FolderNotFound:
            self.maildir.create_folder(name)
            return self.maildir.folder(name)

    def mark(self, mailbox: str, ref: str, kind: str, read: bool) -> dict[str, Any]:
        found = self.resolve(mailbox, ref, kind)
        flags = set(found.info.flags)
        if read:
            flags.add(SEEN)
        else:
            flags.discard(SEEN)
        info = found.folder.set_flags(found.info.id, flags)
        return {"status": "ok", "id": info.id, "mailbox": info.folder, "flags": sorted(info.flags)}

    def move(self, found: Resolved, dest_name: str) -> MessageInfo:
        """Move a resolved message to `dest_name` (made if missing); same folder: no-op."""
        dest = self._folder_or_create(dest_name)
        return found.folder.move(found.info.id, dest)

    def delete(self, mailbox: str, ref: str, kind: str) -> dict[str, Any]:
        """Move to Trash; a message already in Trash is removed for good."""
        found = self.resolve(mailbox, ref, kind)
        if found.folder.name == TRASH:
            found.folder.remove(found.info.id)
            return {"status": "ok", "message": "Message deleted.", "id": found.info.id}
        info = self.move(found, TRASH)
        return {
            "status": "ok",
            "message": "Message moved to Trash.",
            "id": info.id,
            "mailbox": info.folder,
        }
