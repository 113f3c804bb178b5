"""End to end with the real all-in-one process: POST /localapi/v0/mail/send queues the
message (Sent copy, outbound event), and its Idempotency-Key still holds after a restart."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tests.processes import Process, allinone_config
from tests.test_localapi_e2e import API

MAIL = "/localapi/v0/mail"


def test_send_and_replay_across_a_restart(tmp_path: Path) -> None:
    proc = Process("tailpost", tmp_path, allinone_config())
    listeners = proc.start()
    try:
        api = API(proc, listeners)
        status = api.json("GET", "/localapi/v0/status")
        sender = status["addresses"][0]
        attachment = base64.b64encode(b"x" * (2 * 1024 * 1024)).decode()  # over 1 MiB of body
        body = {
            "to": ["friend@example.net"],
            "bcc": "audit@example.net",
            "subject": "Daily summary",
            "body_text": "Everything completed successfully.",
            "attachments": [{"filename": "log.txt", "content_base64": attachment}],
        }
        first = api.call("POST", f"{MAIL}/send", body, {"Idempotency-Key": "daily-1"})
        assert first[0] == 200, first[2][:300]
        answer = json.loads(first[2])
        assert answer["status"] == "ok" and answer["message_id"].startswith("<")

        sent = api.json("GET", f"{MAIL}/messages?mailbox=Sent")
        assert [m["subject"] for m in sent["messages"]] == ["Daily summary"]
        events = api.json("GET", f"{MAIL}/outbound/recent")["events"]
        assert [e["status"] for e in events] == ["submitted"]
        assert events[0]["internet_message_id"] == answer["message_id"]
        assert events[0]["from"] == sender

        proc.stop()
        listeners = proc.start()
        api = API(proc, listeners)
        again = api.call("POST", f"{MAIL}/send", body, {"Idempotency-Key": "daily-1"})
        assert again[0] == 200 and json.loads(again[2]) == answer
        assert again[1].get("Idempotent-Replayed") == "true"
        assert len(api.json("GET", f"{MAIL}/messages?mailbox=Sent")["messages"]) == 1
    finally:
        proc.stop()
