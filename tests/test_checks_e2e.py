"""End to end with the real all-in-one: a p=reject spoof is refused at the edge; a signed,
aligned message arrives on the device with a correct Authentication-Results header, the
edge's verdict, and `risk` in the local API. All DNS comes from a local server."""

from __future__ import annotations

import email
import smtplib
from pathlib import Path
from typing import Any

import dkim
import pytest

from maildir.verdict import parse_verdict
from tests.processes import Process, allinone_config, host_port, wait_for
from tests.test_checks_dkim import rsa_key
from tests.test_e2e import credentials, find_by_subject, http_get, imap_login


def test_dmarc_reject_refused_and_signed_message_arrives_with_results(
    dns_server: Any, tmp_path: Path
) -> None:
    pem, record = rsa_key()
    z = dns_server.zone
    z.set("good.test", "TXT", ["v=spf1 ip4:127.0.0.1 -all"])
    z.set("_dmarc.good.test", "TXT", ["v=DMARC1; p=reject"])
    z.set("s1._domainkey.good.test", "TXT", [record])
    z.set("bank.test", "TXT", ["v=spf1 ip4:192.0.2.10 -all"])
    z.set("_dmarc.bank.test", "TXT", ["v=DMARC1; p=reject"])

    proc = Process(
        "tailpost", tmp_path / "aio", allinone_config(dns_port=dns_server.port, dns_timeout=2.0)
    )
    listeners = proc.start()
    try:
        host, port = host_port(listeners["mx"])
        spoof = (
            b"From: Bank <alerts@bank.test>\r\nTo: demo@example.test\r\nSubject: verify now\r\n"
            b"\r\nPlease log in.\r\n"
        )
        body = (
            b"From: Ann <ann@good.test>\r\nTo: demo@example.test\r\nSubject: checked e2e\r\n"
            b"Message-ID: <e2e-checks@good.test>\r\n"
            b"Authentication-Results: mx.tailpost.test; dmarc=pass header.from=bank.test\r\n"
            b"\r\nSigned and aligned.\r\n"
        )
        signed = (
            dkim.sign(body, b"s1", b"good.test", pem, include_headers=[b"from", b"to", b"subject"])
            + body
        )
        with smtplib.SMTP(host, port) as smtp:
            smtp.ehlo("client.good.test")
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("alerts@bank.test", ["demo@example.test"], spoof)
            assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (550, b"5.7.1")
            assert smtp.sendmail("ann@good.test", ["demo@example.test"], signed) == {}

        imap = imap_login(proc, listeners)
        raw = wait_for(lambda: find_by_subject(imap, "checked e2e"))
        assert find_by_subject(imap, "verify now") is None
        imap.logout()
        msg = email.message_from_bytes(raw)
        results = msg.get_all("Authentication-Results") or []
        assert len(results) == 1  # the forged one claiming the edge's name is gone
        ar = " ".join(results[0].split())
        assert ar.startswith("mx.tailpost.test;")
        assert "spf=pass smtp.mailfrom=ann@good.test" in ar
        assert "dkim=pass header.d=good.test header.s=s1 header.b=" in ar
        assert "dmarc=pass header.from=good.test policy.dmarc=reject" in ar
        assert "arc=none" in ar
        assert msg["ARC-Seal"] is not None and "i=1" in msg["ARC-Seal"]
        verdict = parse_verdict(raw)
        assert verdict is not None and verdict.action == "accept"
        assert verdict.authentication() == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}

        token = credentials(proc)["local_api_token"]
        status, listing = http_get(listeners, "/localapi/v0/mail/messages?search=checked", token)
        assert status == 200 and listing["total"] == 1
        status, detail = http_get(
            listeners, f"/localapi/v0/mail/messages/{listing['messages'][0]['id']}", token
        )
        assert status == 200
        assert detail["risk"]["authentication"] == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    finally:
        proc.stop()
