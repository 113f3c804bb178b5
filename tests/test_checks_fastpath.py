"""The pipeline's answers at once (each stage's `NowOrLater`), and the kept pieces behind
them: the From scan, the ARC header scan, the Authentication-Results results, actions and
organizational domains. Each is compared with what the libraries make of the same input."""

from __future__ import annotations

import random
import re
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import authres
import authres.arc
import authres.dkim_b
import authres.dmarc
import pytest
from authres.core import AuthenticationResultProperty
from publicsuffixlist import PublicSuffixList
from twisted.internet import defer, task

from edge.checks import authresults, build_pipeline
from edge.checks.actions import ActionPolicy
from edge.checks.arc import has_arc_headers
from edge.checks.base import (
    ARCResult,
    DKIMResult,
    DMARCResult,
    Finding,
    Recipient,
    SPFResult,
    Transaction,
)
from edge.checks.dmarc import OrgDomains
from edge.checks.headers import (
    KEEP_ADDRESSES_UP_TO,
    from_addresses,
    from_values,
    header_section,
    plain_fields,
)
from edge.checks.pipeline import CheckPipeline, DataOutcome, StageTimeouts
from edge.config import Config
from edge.dns.resolver import DNSResolver
from edge.runtime.nowlater import is_deferred
from edge.smtp.replies import SMTPReplyError
from edge.store import open_store
from edge.store.cache import CachedLookups
from edge.store.keyring import StoreKeys
from tests.fakes import ScriptedCheck, WaitingCheck

# -- the pipeline ------------------------------------------------------------------------


def pipeline(checks: list[Any], clock: Any = None) -> CheckPipeline:
    return CheckPipeline(
        checks,
        ActionPolicy(),
        "mx.test",
        clock or task.Clock(),
        timeouts=StageTimeouts(mail=5.0, data=5.0),
    )


MESSAGE = b"From: A <a@x.test>\r\nSubject: s\r\n\r\nbody\r\n"


def test_stages_answer_at_once_when_every_check_does() -> None:
    log: list[str] = []
    spf = Finding("spf", "none", "r")
    p = pipeline([ScriptedCheck("one", log, [spf]), ScriptedCheck("two", log)])
    tx = p.transaction("192.0.2.1")
    assert p.connect(tx) is None
    assert p.mail(tx, "h.test", "a@x.test") is None
    assert p.rcpt(tx, Recipient("b@y.test")) is None
    outcome = p.data(tx, MESSAGE)
    assert isinstance(outcome, DataOutcome) and outcome.decision.action == "accept"
    assert log == ["one", "two"] * 3
    assert tx.findings == [spf, spf] and tx.header_from == ["a@x.test"]
    assert outcome.headers.startswith(b"Authentication-Results: mx.test;\r\n\tnone\r\n")
    # Through a Deferred, the same.
    tx2 = p.transaction("192.0.2.1")
    d = defer.maybeDeferred(p.mail, tx2, "h.test", "a@x.test")
    assert d.called and d.result is None
    judged = defer.maybeDeferred(p.data, tx2, MESSAGE)
    assert judged.called and judged.result == outcome


def test_a_refusal_at_once_is_raised() -> None:
    log: list[str] = []
    p = pipeline(
        [
            ScriptedCheck("one", log, [Finding("rules", "reject", "rule 1")]),
            ScriptedCheck("two", log),
        ]
    )
    tx = p.transaction("192.0.2.1")
    with pytest.raises(SMTPReplyError) as info:
        p.mail(tx, "h.test", "a@x.test")
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.7.1")
    assert log == ["one", "two"] and tx.findings == []


def test_a_waiting_check_makes_a_deferred_and_the_rest_runs_after_it() -> None:
    log: list[str] = []
    answer: defer.Deferred[Any] = defer.Deferred()
    first, later = Finding("spf", "none"), Finding("dkim", "none")
    p = pipeline(
        [
            ScriptedCheck("one", log, [first]),
            WaitingCheck("wait", log, answer),
            ScriptedCheck("two", log),
        ]
    )
    tx = p.transaction("192.0.2.1")
    pending = p.mail(tx, "h.test", "a@x.test")
    assert isinstance(pending, defer.Deferred) and not pending.called
    assert log == ["one", "wait"]
    answer.callback([later])
    assert pending.called and pending.result is None
    assert log == ["one", "wait", "two"] and tx.findings == [first, later]


def test_a_fired_deferred_still_answers_at_once() -> None:
    log: list[str] = []
    p = pipeline(
        [
            WaitingCheck("done", log, defer.succeed([Finding("spf", "none")])),
            ScriptedCheck("two", log),
        ]
    )
    tx = p.transaction("192.0.2.1")
    assert p.mail(tx, "h.test", "a@x.test") is None
    assert [f.key for f in tx.findings] == ["spf.none"] and log == ["done", "two"]


def test_a_waiting_stage_times_out_into_a_tempfail() -> None:
    clock = task.Clock()
    p = pipeline([WaitingCheck("hang", [], defer.Deferred())], clock)
    pending = p.mail(p.transaction("192.0.2.1"), "h.test", "a@x.test")
    assert isinstance(pending, defer.Deferred)
    failures: list[Any] = []
    pending.addErrback(failures.append)
    clock.advance(4.9)
    assert not failures
    clock.advance(0.2)
    [failure] = failures
    assert failure.check(SMTPReplyError)
    assert (failure.value.reply.code, failure.value.reply.enhanced) == (451, "4.4.5")


def test_a_failing_check_fails_the_stage() -> None:
    p = pipeline([WaitingCheck("broken", [], defer.fail(ValueError("broken")))])
    tx = p.transaction("192.0.2.1")
    with pytest.raises(ValueError):
        p.data(tx, MESSAGE)
    failures: list[Any] = []
    defer.maybeDeferred(p.data, tx, MESSAGE).addErrback(failures.append)
    assert failures[0].check(ValueError)
    later: defer.Deferred[Any] = defer.Deferred()
    p = pipeline([WaitingCheck("broken later", [], later)])
    pending = p.data(tx, MESSAGE)
    assert isinstance(pending, defer.Deferred)
    pending.addErrback(failures.append)
    later.errback(ValueError("broken"))
    assert failures[1].check(ValueError)


def test_the_edge_pipeline_answers_at_once_once_its_caches_are_warm(
    dns_server: Any, in_reactor: Any, tmp_path: Path
) -> None:
    reactor = in_reactor.reactor
    zone = dns_server.zone
    zone.set("sender.test", "TXT", ["v=spf1 ip4:192.0.2.1 -all"])
    zone.set("_dmarc.sender.test", "TXT", ["v=DMARC1; p=reject"])
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}", keys=StoreKeys.generate())
    store.ensure_account()
    lookups = CachedLookups(store, ttl=60.0)
    resolver = DNSResolver(["127.0.0.1"], dns_server.port, timeout=1.0, reactor=reactor)
    config = Config(data_dir=str(tmp_path), hostname="mx.tailpost.test")
    p = build_pipeline(config, resolver, reactor, lookups.list_spam_rules, lookups.cached_or_load)
    assert p is not None
    message = b"From: <a@sender.test>\r\nTo: <b@inbound.test>\r\nSubject: x\r\n\r\nHello.\r\n"

    def coroutines() -> Any:
        async def run() -> DataOutcome:
            tx = p.transaction("192.0.2.1")
            await defer.maybeDeferred(p.connect, tx)
            await defer.maybeDeferred(p.mail, tx, "client.test", "a@sender.test")
            await defer.maybeDeferred(p.rcpt, tx, Recipient("b@inbound.test"))
            outcome = p.data(tx, message)
            return await outcome if is_deferred(outcome) else outcome

        return defer.ensureDeferred(run())

    def at_once() -> list[Any]:
        tx = p.transaction("192.0.2.1")
        return [
            p.connect(tx),
            p.mail(tx, "client.test", "a@sender.test"),
            p.rcpt(tx, Recipient("b@inbound.test")),
            p.data(tx, message),
        ]

    cold = in_reactor(coroutines)  # fills the caches (DNS, store, kept results)
    assert b"spf=pass" in cold.headers and b"dmarc=pass" in cold.headers
    connected, mailed, rcpt, outcome = in_reactor(at_once)
    assert (connected, mailed, rcpt) == (None, None, None)
    assert isinstance(outcome, DataOutcome) and outcome == cold
    store.close()


# -- the From fields ---------------------------------------------------------------------


def parsed_from(head: bytes) -> list[str]:
    """What `email`'s parser reads as the From values of a header section, once each From
    field in the obsolete syntax (white space before the colon) is written as a From field."""
    head = re.sub(rb"(?im)^(from)[ \t]+:", rb"\1:", head)
    parsed = BytesHeaderParser(policy=compat32).parsebytes(head)
    return [str(v) for v in parsed.get_all("From") or []]


TRICKY = [
    b"From: a@x.test\r\nTo: b@y.test\r\n",
    b"FROM: a@x.test\r\nfrom:b@y.test\r\n",
    b"From :a@x.test\r\nSubject: s\r\n",  # the obsolete syntax: a From field
    b"Subject: s\r\nFrom : a@x.test\r\nTo: b@y.test\r\n",
    b"From\t: a@x.test\r\nTo: b@y.test\r\n",
    b"Subject: s\r\n From : folded\r\nX-From : a@x.test\r\n",  # neither is a From field
    b"From: A\r\n <a@x.test>\r\nSubject: s\r\n",
    b"From:\r\n\t<a@x.test>\r\n \r\nTo: b\r\n",
    b"From: a@x.test\r\nFrom: b@y.test\r\n",
    b"Subject: no from here\r\n",
    b"",
    b"From a@x.test Mon Jan  1 00:00:00 2026\r\nFrom: b@y.test\r\n",
    b" folded first\r\nFrom: a@x.test\r\n",
    b":no name\r\nFrom: a@x.test\r\n",
    b"From: a@x.test\nTo: b@y.test\n\nFrom: body@z.test\n",
    b"From: a@x.test\rTo: b@y.test\r\n",
    b"From: a@x.test\r\n",
    b"From: a@x.test",  # no line end
    b"From: =?utf-8?q?=C3=A9?= <a@x.test>\r\n",
    b"From: \xc3\xa9t\xe9 <a@x.test>\r\n",
    b"From:   \t <a@x.test>  \r\n",
    b"X-From: a@x.test\r\nFrom-Not: b@y.test\r\nReply-To: c@z.test\r\n",
    b"Subject: s\r\nFrom: a@x.test\r\nFrom x\r\n",
    b"From: a@x.test\r\n\x00bad\r\n",
]


@pytest.mark.parametrize("head", TRICKY)
def test_from_values_match_the_email_parser(head: bytes) -> None:
    assert from_values(head) == parsed_from(head)


def test_from_values_match_the_email_parser_on_random_sections() -> None:
    pieces = [
        *(b"From", b"FROM", b"from", b"From ", b"To", b"X-A", b":", b" ", b"\t"),
        *(b"\r\n", b"\n", b"\r", b"\r\n ", b"\r\n\t", b"a@b.test", b"<x@y.test>"),
        *(b"\xc3\xa9", b",", b'"q"', b"(c)", b"\x00", b"From:", b"from :"),
    ]
    rng = random.Random(5)
    plain = 0
    for _ in range(5000):
        head = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        if rng.random() < 0.7:
            head += b"\r\n"
        plain += plain_fields(head)
        assert from_values(head) == parsed_from(head), head
    assert 200 < plain < 4800  # both ways of reading were compared


OBSOLETE_FROM = [
    (b"Subject: s\r\nFrom : a@x.test\r\nTo: b@y.test\r\n", ["a@x.test"]),
    (b"From\t \t:a@x.test\r\n", ["a@x.test"]),
    (b"from  : A <a@x.test>\r\n", ["A <a@x.test>"]),
    (b"Subject: s\r\n From : folded\r\nX-From : a@x.test\r\n", []),
]


@pytest.mark.parametrize(("head", "values"), OBSOLETE_FROM)
def test_a_from_field_in_the_obsolete_syntax_is_a_from_field(
    head: bytes, values: list[str]
) -> None:
    assert from_values(head) == values


def test_a_second_from_in_the_obsolete_syntax_is_counted() -> None:
    """A reader that shows `From : evil` must not let DMARC judge only the other From."""
    message = b"From: good@x.test\r\nFrom : evil@y.test\r\nSubject: s\r\n\r\nbody\r\n"
    assert from_addresses(message) == (2, ["good@x.test", "evil@y.test"])


def test_from_addresses_of_a_whole_message_and_kept_addresses() -> None:
    message = b"From: A <A@X.test>, b@Y.test\r\nSubject: s\r\n\r\nFrom: c@z.test\r\n"
    assert from_addresses(message) == (1, ["a@x.test", "b@y.test"])
    first = from_addresses(message)[1]
    first.append("changed@x.test")
    assert from_addresses(message) == (1, ["a@x.test", "b@y.test"])
    many = ", ".join(f"u{n}@x.test" for n in range(200))
    assert len(many) > KEEP_ADDRESSES_UP_TO
    count, addresses = from_addresses(f"From: {many}\r\n\r\n".encode())
    assert count == 1 and len(addresses) == 200 and addresses[-1] == "u199@x.test"
    assert from_addresses(b"From: nobody\r\nFrom: <a@b.test>\r\n\r\n") == (2, ["a@b.test"])


ARC_CASES = [
    (b"Subject: x\r\nARC-Seal: i=1\r\n\r\nbody\r\n", True),
    (b"Subject: x\r\narc-message-signature: i=1\r\n\r\n", True),
    (b"ARC-Authentication-Results: i=1; x\r\nSubject: x\r\n\r\n", True),
    (b"Subject: x\r\n\r\nARC-Seal: in the body\r\n", False),
    (b"Subject: x\r\n ARC-Seal: folded text\r\n\r\n", False),
    (b"X-ARC-Seal: i=1\r\nARC-Sealed: no\r\n\r\n", False),
    (b"Subject: x\r\nTo: y\r\n\r\n", False),
    (b"Subject: x\r\n", False),
]


@pytest.mark.parametrize(("message", "expected"), ARC_CASES)
def test_arc_header_scan_reads_as_the_line_by_line_reading(message: bytes, expected: bool) -> None:
    assert plain_fields(header_section(message))
    assert has_arc_headers(message) is expected
    # The same message with bare LF takes the line-by-line reading dkimpy's way.
    bare = message.replace(b"\r\n", b"\n")
    assert not plain_fields(header_section(bare))
    assert has_arc_headers(bare) is expected


# -- Authentication-Results, actions, organizational domains ------------------------------


def authres_header(authserv_id: str, tx: Transaction) -> str:
    """The header as authres writes it with one object per result (folded the same way)."""
    results: list[object] = []
    if tx.spf is not None:
        spf = tx.spf
        kw = (
            {"smtp_mailfrom": spf.sender}
            if spf.identity == "mailfrom"
            else {"smtp_helo": spf.domain}
        )
        results.append(authres.SPFAuthenticationResult(result=spf.result, **kw))
    if tx.dkim:
        for r in tx.dkim:
            reason = authresults._short(r.reason if r.result != "pass" else "")
            res = authres.DKIMAuthenticationResult(
                result=r.result,
                reason=reason or None,
                header_d=r.domain or None,
                header_s=r.selector or None,
            )
            if r.b:
                res.properties.append(AuthenticationResultProperty("header", "b", r.b[:12]))
            results.append(res)
    elif tx.spf is not None or tx.dmarc is not None:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    if tx.dmarc is not None:
        d = tx.dmarc
        policy = d.policy if d.result == "fail" else d.published_policy
        results.append(
            authres.dmarc.DMARCAuthenticationResult(
                result=d.result,
                header_from=d.from_domain or None,
                policy=policy if d.result in ("pass", "fail") else None,
            )
        )
    if tx.arc is not None:
        results.append(authres.arc.ARCAuthenticationResult(result=tx.arc.result))
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    return str(header).replace("; ", ";\r\n\t")


def transactions() -> list[Transaction]:
    out = [Transaction("192.0.2.1")]
    tx = Transaction("192.0.2.1")
    tx.arc = ARCResult("fail", 2, "broken")
    out.append(tx)
    for sender, identity in (
        ("a@x.test", "mailfrom"),
        ('"odd; local part"@x.test', "mailfrom"),
        ("", "helo"),
        ("b.c@sub.x.test", "mailfrom"),
    ):
        for dmarc in (
            None,
            DMARCResult("pass", "x.test", published_policy="reject"),
            DMARCResult("fail", "x.test", policy="quarantine", published_policy="reject"),
            DMARCResult("none", "", reason="no From address"),
            DMARCResult("temperror", "x.test"),
        ):
            tx = Transaction("192.0.2.1", mail_from=sender)
            tx.spf = SPFResult("softfail", "x.test", identity, sender or "postmaster@h.test")
            tx.dmarc = dmarc
            tx.arc = ARCResult("none")
            out.append(tx)
    tx = Transaction("192.0.2.1")
    tx.dkim = [
        DKIMResult("pass", "x.test", "sel", "AbCdEfGhIjKlMnOp", reason="ignored"),
        DKIMResult("fail", "y.test", "s2", "ZZ", reason='body "hash"; mismatch ' + "x" * 100),
        DKIMResult("permerror", "", "", "", reason="no d= tag"),
    ]
    out.append(tx)
    return out


@pytest.mark.parametrize("tx", transactions())
@pytest.mark.parametrize("authserv_id", ["mx.tailpost.test", "MX.Tailpost.Test"])
def test_authentication_results_as_authres_writes_them(tx: Transaction, authserv_id: str) -> None:
    expected = authres_header(authserv_id, tx)
    assert authresults.build(authserv_id, tx) == expected
    assert authresults.build(authserv_id, tx) == expected  # (kept results, the same)
    assert authresults.header_bytes(authserv_id, tx) == expected.encode() + b"\r\n"


def test_actions_are_looked_up_per_check_and_result() -> None:
    policy = ActionPolicy({"spf": {"fail": "junk"}, "rspamd.add_header": "reject"})
    findings = [
        Finding("spf", "fail"),
        Finding("spf", "pass"),
        Finding("rspamd", "add header"),
        Finding("unknown", "thing"),
    ]
    for _ in range(2):
        assert [policy.action_for(f) for f in findings] == ["junk", "accept", "reject", "accept"]
    assert policy.decide(findings[:2]).finding == findings[0]
    assert policy.decide(findings).action == "reject"


def test_organizational_domains_are_kept_and_stay_right() -> None:
    psl = PublicSuffixList()
    orgs = OrgDomains(psl, max_entries=3)
    names = ["Mail.Example.CO.UK.", "a.b.example.com", "example.com", "x.test", "sub.x.test"]
    for _ in range(2):
        for name in names:
            plain = name.lower().strip(".")
            assert orgs.org(name) == (psl.privatesuffix(plain) or plain)
    assert orgs.org("Mail.Example.CO.UK.") == "example.co.uk"
