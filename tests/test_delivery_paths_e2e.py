"""Whatever the MX accepts reaches the device's Maildir unchanged (property-based).

Hypothesis makes envelopes (the null sender, dot-atoms, quoted local parts, address
literals, UTF-8 addresses with SMTPUTF8, recipients in any letter case) and messages
(8-bit header fields and bodies, folded fields, lines up to the 1000-octet limit, lines
that start with dots); each goes through the real all-in-one process (MX, spool, delivery
queue, delivery client, connector, Maildir). The stored file must end with exactly the
octets sent, and what is on top of them must be trace fields the edge and the connector
add, nothing else.
"""

from __future__ import annotations

import itertools
import re
import smtplib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.processes import Process, allinone_config, host_port, wait_for

RECIPIENT = "demo@example.test"
TRACE_FIELDS = re.compile(
    rb"(?i)(return-path|delivered-to|received|authentication-results|arc-[a-z-]+|x-tailpost-[a-z0-9-]+):"
)
_serial = itertools.count()


@pytest.fixture(scope="module")
def allinone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, dict[str, str]]]:
    proc = Process("tailpost", tmp_path_factory.mktemp("paths"), allinone_config())
    listeners = proc.start()
    yield proc, listeners
    proc.stop()


# -- envelopes --------------------------------------------------------------------------

ATEXT = "abcxyzABCXYZ0189!#$%&'*+/=?^_`{|}~-"
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=8)
dot_atom = st.lists(atoms, min_size=1, max_size=3).map(".".join)
qtext = st.sampled_from([" ", "!", "#", "a", "Z", "(", ")", ",", ":", ";", "@", "[", "]"])
quoted_pair = st.sampled_from(['\\"', "\\\\", "\\ ", "\\a"])
quoted = st.lists(st.one_of(qtext, quoted_pair), max_size=8).map(lambda p: '"' + "".join(p) + '"')
label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?\Z")
domain = st.lists(label, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "test"]))
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: "[{}.{}.{}.{}]".format(*t))
ipv6 = st.sampled_from(["[IPv6:::1]", "[IPv6:2001:db8::25]", "[ipv6:fe80::1:2:3:4]"])
ascii_mailbox = st.builds(
    lambda local, dom: f"{local}@{dom}",
    st.one_of(dot_atom, quoted),
    st.one_of(domain, ipv4, ipv6),
)
utf8_words = st.text(alphabet="äöüßéñøåçž日本語кирил", min_size=1, max_size=6)
utf8_mailbox = st.builds(
    lambda local, dom: f"{local}@{dom}",
    st.one_of(utf8_words, st.builds(lambda a, b: a + "." + b, atoms, utf8_words)),
    st.one_of(domain, st.sampled_from(["bücher.example", "例え.テスト", "mañana.test"])),
)
recipient = st.sampled_from([RECIPIENT, "Demo@example.test", "DEMO@EXAMPLE.TEST"])

# -- messages ---------------------------------------------------------------------------

FIELD_NAMES = ["Subject", "Comments", "Keywords", "X-Mailer", "X-Note", "To", "Cc", "Date"]
# Any octet but CR and LF (bare ones are refused), and NUL, in a field or body line.
octets = st.binary(max_size=60).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
)
utf8_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=30).map(
    lambda s: s.encode()
)
field_value = st.one_of(octets, utf8_text)
field = st.builds(
    lambda name, value, folded: (
        name.encode() + b": " + value + (b"\r\n\t" + folded if folded else b"")
    ),
    st.sampled_from(FIELD_NAMES),
    field_value,
    st.one_of(st.just(b""), utf8_text.filter(lambda v: v.strip() != b"")),
)
body_line = st.one_of(
    octets,
    utf8_text,
    st.builds(lambda dots, rest: b"." * dots + rest, st.integers(1, 3), octets),
    st.builds(lambda n, c: c * n, st.integers(900, 998), st.sampled_from([b"x", b".", b"\xe9"])),
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, str, bool, bytes]:
    utf8 = draw(st.booleans())
    sender = draw(st.one_of(st.just(""), ascii_mailbox, *([utf8_mailbox] if utf8 else [])))
    rcpt = draw(recipient)
    fields = draw(st.lists(field, max_size=5))
    body = draw(st.lists(body_line, max_size=12))
    serial = next(_serial)
    head = [f"Message-ID: <{serial}.paths@e2e.test>".encode(), *fields]
    data = b"".join(line + b"\r\n" for line in head) + b"\r\n"
    data += b"".join(line + b"\r\n" for line in body)
    return sender, rcpt, utf8, data


def send(listeners: dict[str, str], sender: str, rcpt: str, utf8: bool, data: bytes) -> None:
    """One transaction, the paths written exactly as given (smtplib would re-quote them)."""
    host, port = host_port(listeners["mx"])
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.ehlo("client.e2e.test")
        smtp.command_encoding = "utf-8"
        params = (" SMTPUTF8" if utf8 else "") + ("" if data.isascii() else " BODY=8BITMIME")
        code, reply = smtp.docmd("MAIL", f"FROM:<{sender}>{params}")
        assert code == 250, (sender, reply)
        code, reply = smtp.docmd("RCPT", f"TO:<{rcpt}>")
        assert code == 250, (rcpt, reply)
        code, reply = smtp.data(data)
        assert code == 250, reply


def stored_copy(proc: Process, message_id: bytes) -> bytes | None:
    new = proc.data_dir / "device" / "Maildir" / "new"
    for path in sorted(new.iterdir()) if new.is_dir() else []:
        content = path.read_bytes()
        if message_id in content:
            return content
    return None


def trace_prefix_only(prefix: bytes) -> bool:
    """Whether `prefix` is nothing but whole trace fields (folded lines included)."""
    if not prefix:
        return True
    if not prefix.endswith(b"\r\n"):
        return False
    lines = prefix[:-2].split(b"\r\n")
    if not TRACE_FIELDS.match(lines[0]):
        return False
    return all(TRACE_FIELDS.match(line) or line[:1] in (b" ", b"\t") for line in lines)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(message=messages())
def test_what_the_mx_accepts_arrives_unchanged(
    allinone: tuple[Process, dict[str, str]], message: tuple[str, str, bool, bytes]
) -> None:
    proc, listeners = allinone
    sender, rcpt, utf8, data = message
    send(listeners, sender, rcpt, utf8, data)
    message_id = data.split(b"\r\n", 1)[0]
    stored = wait_for(lambda: stored_copy(proc, message_id), timeout=30)
    assert stored.endswith(data), (stored[:2000], data[:2000])
    prefix = stored[: len(stored) - len(data)]
    assert trace_prefix_only(prefix), prefix


def test_the_connector_offers_smtputf8_and_8bitmime(
    allinone: tuple[Process, dict[str, str]],
) -> None:
    _proc, listeners = allinone
    host, port = host_port(listeners["connector"])
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        smtp.ehlo("edge.e2e.test")
        assert smtp.has_extn("smtputf8") and smtp.has_extn("8bitmime")
