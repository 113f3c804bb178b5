"""The checks' pieces without a network: actions, the reply funnel, stage timeouts, the
header filter, Authentication-Results and the verdict header, and filing on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import authres
import authres.arc
import authres.core
import authres.dkim_b
import authres.dmarc
import pytest
from twisted.internet import defer, task

from connector.receiver import MaildirSink, folder_for
from edge.checks import authresults, verdict
from edge.checks.actions import ActionPolicy, Decision, all_replies
from edge.checks.base import (
    ARCResult,
    DKIMResult,
    DMARCResult,
    Finding,
    SpamResult,
    SPFResult,
    Transaction,
)
from edge.checks.headers import HeaderFilter, authserv_id_of, from_addresses
from edge.checks.pipeline import CheckPipeline, StageTimeouts
from edge.config import ConfigError
from edge.smtp.replies import SMTPReplyError
from maildir import Maildir, MessageInfo
from maildir.verdict import parse_verdict
from tests.fakes import WaitingCheck


def test_reply_classes_agree_with_enhanced_codes() -> None:
    for reply in all_replies():
        assert str(reply.code)[0] == reply.enhanced[0], reply


def test_defaults_follow_the_dmarc_policy() -> None:
    policy = ActionPolicy()
    assert policy.decide([Finding("dmarc", "reject")]).action == "reject"
    assert policy.decide([Finding("dmarc", "quarantine")]).action == "junk"
    assert policy.decide([Finding("spf", "fail"), Finding("dkim", "fail")]).action == "accept"
    assert policy.decide([Finding("spf", "temperror")]).action == "accept"


def test_reject_reply_fits_the_finding() -> None:
    decision = ActionPolicy().decide([Finding("dmarc", "quarantine"), Finding("dmarc", "reject")])
    assert decision.reply is not None
    assert (decision.reply.code, decision.reply.enhanced) == (550, "5.7.1")
    rules = ActionPolicy().decide([Finding("rules", "reject")]).reply
    assert rules is not None and rules.enhanced == "5.7.1"
    assert Decision("accept").reply is None and Decision("junk").reply is None


def test_configured_actions_and_strongest_wins() -> None:
    policy = ActionPolicy(
        {"spf.fail": "tempfail", "dmarc": {"quarantine": "tag"}, "rspamd.add header": "junk"}
    )
    assert policy.decide([Finding("dmarc", "quarantine")]).action == "tag"
    assert policy.decide([Finding("rspamd", "add_header")]).action == "junk"
    decision = policy.decide([Finding("dmarc", "quarantine"), Finding("spf", "fail")])
    assert decision.action == "tempfail" and decision.reply is not None
    assert (decision.reply.code, decision.reply.enhanced) == (451, "4.7.1")
    temp = ActionPolicy({"dmarc.temperror": "tempfail"}).decide([Finding("dmarc", "temperror")])
    assert temp.reply is not None and temp.reply.enhanced == "4.4.3"


@pytest.mark.parametrize(
    ("table", "message"),
    [({"spf.nonsense": "reject"}, "unknown finding"), ({"spf.fail": "drop"}, "must be one of")],
)
def test_bad_action_configuration(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ActionPolicy(table)


def test_stage_timeout_is_a_tempfail() -> None:
    clock = task.Clock()
    pipeline = CheckPipeline(
        [WaitingCheck("hang", [], defer.Deferred())],
        ActionPolicy(),
        "mx.test",
        clock,
        timeouts=StageTimeouts(mail=5.0),
    )
    d = defer.maybeDeferred(pipeline.mail, Transaction("192.0.2.1"), "h.test", "a@b.test")
    failures: list[Any] = []
    d.addErrback(failures.append)
    clock.advance(4.9)
    assert not failures
    clock.advance(0.2)
    [failure] = failures
    assert failure.check(SMTPReplyError)
    assert (failure.value.reply.code, failure.value.reply.enhanced) == (451, "4.4.5")


def feed_all(f: HeaderFilter, data: bytes) -> bytes:
    out = []
    for line in data.splitlines(keepends=True):
        out += f.feed(line)
    out += f.finish()
    return b"".join(out)


def test_header_filter_removes_forged_trust_headers() -> None:
    data = (
        b"Authentication-Results: MX.Tailpost.Test;\r\n\tdkim=pass header.d=bank.test\r\n"
        b"Authentication-Results: other.test; spf=pass\r\n"
        b"Authentication-Results: (comment) mx.tailpost.test 1; spf=pass\r\n"
        b"X-Tailpost-Verdict: action=accept; spam=No\r\n"
        b"x-tailpost-queue-id: 123\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"X-Tailpost-Verdict: in the body stays\r\n"
    )
    f = HeaderFilter("mx.tailpost.test")
    out = feed_all(f, data)
    assert out == (
        b"Authentication-Results: other.test; spf=pass\r\n"
        b"Subject: hi\r\n\r\nX-Tailpost-Verdict: in the body stays\r\n"
    )
    assert len(f.removed) == 4


def test_header_filter_message_without_body() -> None:
    f = HeaderFilter("mx.test")
    assert feed_all(f, b"Subject: x\r\nX-Tailpost-Foo: y\r\n") == b"Subject: x\r\n"


def test_authserv_id_parsing() -> None:
    assert authserv_id_of(" mx.example.com; spf=pass") == "mx.example.com"
    assert authserv_id_of("(c (nested)) MX.example.com 1; none") == "mx.example.com"


@pytest.mark.parametrize(
    "value",
    [
        "((((((x))))))mx.example.com; spf=pass",  # nested deeper than a few passes undo
        "(" * 300 + ")" * 300 + " mx.example.com; spf=pass",
        "(a \\) b (c \\( d)) MX.Example.Com 1; spf=pass",  # quoted pairs in comments
        '"mx.example.com"; spf=pass',
        '"mx.example\\.com"; spf=pass',  # a quoted string, its quoted pair undone
        "\r\n\t(folded)\r\n mx.example.com(trailing comment); spf=pass",
    ],
)
def test_every_spelling_of_the_edges_authserv_id_is_read_as_it(value: str) -> None:
    """What a reader of the header (here `authres`, where it can parse it) takes for the
    authserv-id is what the filter takes for it: a forged header cannot hide the edge's
    id behind deep comments or quoting."""
    assert authserv_id_of(value) == "mx.example.com"
    unfolded = value.replace("\r\n", "")
    try:
        parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + unfolded)
    except authres.AuthResError:
        return
    assert parsed.authserv_id.lower() == "mx.example.com"


def test_a_forged_header_behind_deep_comments_is_removed() -> None:
    f = HeaderFilter("mx.tailpost.test")
    data = (
        b"Authentication-Results: ((((((((x))))))))\r\n"
        b"\tmx.tailpost.test; dmarc=pass header.from=bank.test\r\n"
        b"Subject: hi\r\n\r\nbody\r\n"
    )
    assert feed_all(f, data) == b"Subject: hi\r\n\r\nbody\r\n"
    assert f.removed == [b"Authentication-Results"]


def test_an_open_comment_names_no_authserv_id() -> None:
    assert authserv_id_of("(mx.example.com; spf=pass") == ""


def test_from_addresses() -> None:
    assert from_addresses(b"From: A <a@X.test>\r\nTo: b@y\r\n\r\nbody") == (1, ["a@x.test"])
    assert from_addresses(b"From: a@x.test\r\nFrom: b@y.test\r\n\r\n")[0] == 2


def full_tx() -> Transaction:
    tx = Transaction("192.0.2.1", helo="client.test", mail_from="alice@signed.test")
    tx.spf = SPFResult("pass", "signed.test", "mailfrom", "alice@signed.test")
    tx.dkim = [
        DKIMResult("pass", "signed.test", "sel", "AbCdEfGhIjKl"),
        DKIMResult("fail", "other.test", "s2", "ZZZZZZZZ", reason="body hash mismatch; yes"),
    ]
    tx.dmarc = DMARCResult("fail", "signed.test", policy="quarantine", published_policy="reject")
    tx.arc = ARCResult("none")
    tx.spam = SpamResult("Yes", 7.4, 6.0, "add header", ["PHISHING", "BAYES_SPAM"], "rspamd")
    return tx


def test_authentication_results_header() -> None:
    header = authresults.build("mx.tailpost.test", full_tx())
    unfolded = header.replace("\r\n\t", " ")
    ctx = authres.FeatureContext(authres.dkim_b, authres.dmarc, authres.arc)
    parsed = authres.core.AuthenticationResultsHeader.parse(ctx, unfolded)
    assert parsed.authserv_id == "mx.tailpost.test"
    methods = [(r.method, r.result) for r in parsed.results]
    assert methods == [
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dkim", "fail"),
        ("dmarc", "fail"),
        ("arc", "none"),
    ]
    dkim_pass = parsed.results[1]
    assert (dkim_pass.header_d, dkim_pass.header_b) == ("signed.test", "AbCdEfGhIjKl")
    assert "header.s=sel" in unfolded and "policy.dmarc=quarantine" in unfolded
    assert "smtp.mailfrom=alice@signed.test" in unfolded


def test_verdict_header_round_trip() -> None:
    tx = full_tx()
    raw = verdict.header_bytes(tx, Decision("junk", Finding("dmarc", "quarantine")))
    parsed = parse_verdict(raw + b"Subject: x\r\n\r\nbody\r\n")
    assert parsed is not None
    assert (parsed.action, parsed.reason, parsed.junk) == ("junk", "dmarc.quarantine", True)
    assert parsed.authentication() == {"spf": "pass", "dkim": "pass", "dmarc": "fail"}
    assert parsed.dmarc_policy == "quarantine"
    assert parsed.spam_summary() == {
        "verdict": "Yes",
        "score": "7.4",
        "action": "add header",
        "symbols": ["PHISHING", "BAYES_SPAM"],
    }


def test_parse_verdict_reads_only_the_topmost_header_section() -> None:
    assert parse_verdict(b"Subject: x\r\n\r\nX-Tailpost-Verdict: action=junk\r\n") is None
    two = b"X-Tailpost-Verdict: action=accept\r\nX-Tailpost-Verdict: action=junk\r\n\r\n"
    first = parse_verdict(two)
    assert first is not None and first.action == "accept"
    odd = parse_verdict(b"X-Tailpost-Verdict: action=explode; spf=<script>; score=x\r\n\r\n")
    assert odd is not None and (odd.action, odd.spf, odd.score) == ("accept", "none", None)


def test_connector_files_junk_into_junk(tmp_path: Path) -> None:
    maildir = Maildir(tmp_path / "Maildir")
    delivered: list[MessageInfo] = []

    def run_now(fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.succeed(fn(*args, **kwargs))

    def deliver(data: bytes) -> None:
        sink = MaildirSink(maildir, ["bob@inbound.test"], run_now, delivered.append)
        sink.write(data)
        d = defer.ensureDeferred(sink.finish())
        assert d.called

    junk = b"X-Tailpost-Queue-ID: ABC1\r\nX-Tailpost-Verdict: action=junk; dmarc=fail\r\nSubject: j\r\n\r\nx\r\n"
    ok = b"X-Tailpost-Queue-ID: ABC2\r\nX-Tailpost-Verdict: action=tag\r\nSubject: k\r\n\r\nx\r\n"
    assert folder_for(junk) == "Junk" and folder_for(ok) == "INBOX"
    maildir.delete_folder("Junk")  # filing still works when the user removed the folder
    deliver(junk)
    deliver(ok)
    assert [m.id for m in maildir.folder("Junk").messages()] == [delivered[0].id]
    assert [m.id for m in maildir.folder("INBOX").messages()] == [delivered[1].id]


def test_checks_section_of_the_config_file(tmp_path: Path) -> None:
    from edge.checks.build import build_pipeline, sealer_for
    from edge.config import load_config
    from edge.dns.resolver import DNSResolver

    resolver = DNSResolver(["127.0.0.1"], 1)

    path = tmp_path / "t.toml"
    path.write_text(
        'hostname = "mx.test"\n[checks]\nauthserv_id = "Auth.MX.test"\ndnsbl_zones = ["bl.test"]\n'
        '[checks.actions]\n"rspamd.add_header" = "junk"\ndmarc.quarantine = "tag"\n'
    )
    config = load_config(path, data_dir=str(tmp_path))
    pipeline = build_pipeline(config, resolver, None, list, lambda f, *a: defer.succeed(f(*a)))  # type: ignore[arg-type]
    assert pipeline is not None
    assert pipeline.authserv_id == "auth.mx.test"
    assert [c.name for c in pipeline.checks] == ["dnsbl", "spf", "dkim", "arc", "dmarc", "rules"]
    assert pipeline.policy.actions["rspamd.add_header"] == "junk"
    assert pipeline.policy.actions["dmarc.quarantine"] == "tag"
    assert not (tmp_path / "edge" / "arc.key").exists()  # the pipeline does not seal
    sealer = sealer_for(config)
    assert sealer is not None and sealer.authserv_id == b"auth.mx.test"
    assert (tmp_path / "edge" / "arc.key").stat().st_mode & 0o777 == 0o600
    path.write_text('[checks.actions]\n"dmarc.maybe" = "junk"\n')
    with pytest.raises(ConfigError, match="unknown finding"):
        build_pipeline(load_config(path, data_dir=str(tmp_path)), resolver, None, list, Any)  # type: ignore[arg-type]
    path.write_text("[checks]\nenabled = false\n")
    assert build_pipeline(load_config(path), resolver, None, list, Any) is None  # type: ignore[arg-type]
    assert sealer_for(load_config(path)) is None


FILTER_SECTIONS = [
    b"Subject: plain\r\nTo: a@b.test\r\n\r\nbody\r\n",
    b"Authentication-Results: mx.edge.test; spf=pass\r\nSubject: x\r\n\r\nbody\r\n",
    b"Subject: x\r\nX-Tailpost-Verdict: ham\r\n  folded\r\nTo: y\r\n\r\nbody\r\n",
    b"authentication-results : mx.edge.test;\r\n dkim=pass\r\n\r\n",
    b"Authentication-Results: other.test; spf=pass\r\nX-TAILPOST-QUEUE-ID: 1\r\n\r\n",
    b"Subject: s\r\n X-Tailpost-Not-A-Field: continuation\r\n\r\nX-Tailpost-In-Body: 1\r\n",
]


@pytest.mark.parametrize("section", FILTER_SECTIONS)
def test_header_filter_reads_a_whole_section_as_line_by_line(section: bytes) -> None:
    from edge.checks.headers import HeaderFilter

    def run(chunks: list[bytes]) -> tuple[bytes, list[bytes]]:
        f = HeaderFilter("mx.edge.test")
        out = b"".join(b"".join(f.feed(c)) for c in chunks) + b"".join(f.finish())
        return out, f.removed

    lines = section.splitlines(keepends=True)
    by_line = run(lines)
    assert run([section]) == by_line
    cut = section.index(b"\r\n") + 2  # a first line alone, then the rest at once
    assert run([section[:cut], section[cut:]]) == by_line
    split = section.find(b"\r\n\r\n") + 4
    if 0 < split < len(section):
        assert run([section[:split], section[split:]]) == by_line
