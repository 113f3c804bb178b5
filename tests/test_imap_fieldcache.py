"""Header fields kept between searches (`connector.imap.fieldcache`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.mail.imap4 import parseIdList

from connector.imap import fieldcache
from connector.imap.fieldcache import FieldCache
from connector.imap.mailbox import MaildirMailbox
from connector.imap.message import MaildirMessage
from connector.imap.search import run_search
from maildir import Maildir
from tests.test_imap import Server, _ok

MESSAGES = [
    b"From: Alice <alice@example.org>\r\nTo: bob@example.org, Carol <carol@example.org>\r\n"
    b"Subject: Quarterly Report\r\n\r\nbody\r\n",
    b"From: dave@example.net\r\nTo: bob@example.org\r\nCc: Erin <erin@example.net>\r\n"
    b"Subject:\r\n\r\nno subject\r\n",
    b"From: =?utf-8?q?J=C3=B6rg?= <jorg@example.de>\r\nTo: bob@example.org\r\n"
    b"To: second-to@example.org\r\nSubject: r\xc3\xa9sum\xc3\xa9 attached\r\n\r\nx\r\n",
    b"From: alice@example.org\r\nBcc: hidden@example.org\r\n\r\nno To, no Subject\r\n",
]

QUERIES: list[list[Any]] = [
    [b"FROM", b"alice"],
    [b"FROM", b"ALICE@EXAMPLE.ORG"],
    [b"TO", b"carol"],
    [b"TO", b"second-to"],
    [b"CC", b"erin"],
    [b"CC", b""],  # has a Cc field at all
    [b"BCC", b"hidden"],
    [b"SUBJECT", b"report"],
    [b"SUBJECT", b""],  # has a Subject field, even an empty one
    [b"SUBJECT", "résumé".encode()],
    [b"HEADER", b"Subject", b"quarterly"],
    [b"HEADER", b"X-Missing", b""],
    [b"OR", b"FROM", b"dave", b"TO", b"second"],
    [b"NOT", b"TO", b"bob"],
    [b"FROM", b"example", b"SUBJECT", b"a"],
]


def messages_of(maildir: Maildir) -> list[tuple[int, MaildirMessage]]:
    mbox = MaildirMailbox(maildir.folder("INBOX"), writeable=False)
    return mbox.fetch(parseIdList(b"1:*"), False)


def count_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the message files opened from now on."""
    opened: list[str] = []
    real_open = MaildirMessage.open

    def counting_open(self: MaildirMessage) -> Any:
        opened.append(self.info.id)
        return real_open(self)

    monkeypatch.setattr(MaildirMessage, "open", counting_open)
    return opened


@pytest.fixture
def maildir(tmp_path: Path) -> Maildir:
    store = Maildir(tmp_path / "mail", hostname="testhost")
    for data in MESSAGES:
        store.deliver(data)
    return store


@pytest.mark.parametrize(
    "query",
    QUERIES,
    ids=lambda q: b" ".join(x if isinstance(x, bytes) else b"?" for x in q).decode(
        "utf-8", "replace"
    ),
)
def test_a_cached_search_finds_what_reading_the_files_finds(
    maildir: Maildir, query: list[Any]
) -> None:
    cache = FieldCache()
    expected = run_search(list(query), messages_of(maildir), 4)
    cold = run_search(list(query), messages_of(maildir), 4, cache)
    warm = run_search(list(query), messages_of(maildir), 4, cache)
    assert cold == expected and warm == expected


def test_a_warm_cache_reads_no_file(maildir: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FieldCache()
    opened = count_opens(monkeypatch)
    run_search([b"FROM", b"alice"], messages_of(maildir), 4, cache)
    assert len(opened) == 4
    opened.clear()
    found = run_search(
        [b"OR", b"SUBJECT", b"report", b"CC", b"erin"], messages_of(maildir), 4, cache
    )
    assert [uid for _, uid in found] == [1, 2] and opened == []
    run_search([b"HEADER", b"X-Missing", b""], messages_of(maildir), 4, cache)
    assert len(opened) == 4  # a field not kept is read from the files


def test_gone_messages_leave_the_cache_once_it_outgrows_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Maildir(tmp_path / "mail", hostname="testhost")
    infos = [store.deliver(b"From: a@b.test\r\nSubject: %d\r\n\r\nx\r\n" % i) for i in range(30)]
    cache = FieldCache()
    run_search([b"FROM", b"a@b"], messages_of(store), 30, cache)
    assert cache.size("INBOX") == 30
    monkeypatch.setattr(fieldcache, "PRUNE_SLACK", 5)  # prune sooner
    folder = store.folder("INBOX")
    for info in infos[:20]:
        folder.set_flags(info.id, {"\\Deleted"})
    folder.expunge()
    run_search([b"FROM", b"a@b"], messages_of(store), 30, cache)
    assert cache.size("INBOX") == 10


def test_sessions_share_the_cache(
    in_reactor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = Server(in_reactor, tmp_path / "mail")
    for data in MESSAGES:
        server.maildir.deliver(data)
    first, second = server.client(), server.client()
    try:
        _ok(first.select("INBOX"))
        _ok(second.select("INBOX"))
        assert _ok(first.uid("SEARCH", "FROM", "alice")) == [b"1 4"]
        opened = count_opens(monkeypatch)
        assert _ok(second.uid("SEARCH", "TO", "bob")) == [b"1 2 3"]
        assert opened == []
    finally:
        first.logout()
        second.logout()
        server.stop()
