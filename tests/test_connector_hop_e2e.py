"""The connector hop end to end, with real processes: pinned STARTTLS from the edge to the
device, a wrong pin deferring the mail (never bouncing it), and the all-in-one's own device
pinned at bootstrap, also after its certificate was replaced.

With a pin, the edge can deliver only over STARTTLS to the pinned key (see
`edge.delivery.client`), so mail that arrives under a pin shows the hop was encrypted."""

from __future__ import annotations

import base64
import smtplib
from pathlib import Path

from edge.spool.scan import recoverable
from edge.store import Store, open_store
from edge.store.events import DeliveryEvents
from edge.store.keyring import load_keys
from edge.tls import pin_of_file
from tests.processes import (
    Process,
    allinone_config,
    edge_and_device,
    host_port,
    maildir_new,
    spool_queue,
    wait_for,
)

OTHER_PIN = base64.b64encode(bytes(32)).decode()


def send(listeners: dict[str, str], rcpt: str, subject: str) -> None:
    host, port = host_port(listeners["mx"])
    with smtplib.SMTP(host, port) as smtp:
        smtp.sendmail("a@sender.test", [rcpt], f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def edge_store(data_dir: Path) -> Store:
    """The edge's store in `data_dir`, opened with its key, as an operator's script would."""
    return open_store(
        f"sqlite:///{data_dir / 'edge' / 'store.db'}",
        keys=load_keys(data_dir / "edge" / "store.key"),
    )


def connector_pin(data_dir: Path) -> str:
    return pin_of_file(data_dir / "device" / "tls" / "connector-cert.pem")


def set_pin(edge: Process, device_id: str, pin: str) -> None:
    store = edge_store(edge.data_dir)
    try:
        store.set_connector_tls_pin(device_id, pin)
    finally:
        store.close()


def events(edge: Process) -> dict[str, str]:
    """The edge's delivery events for me@home.test: event -> the latest detail."""
    store = edge_store(edge.data_dir)
    try:
        found = DeliveryEvents(store).query(recipient="me@home.test")
    finally:
        store.close()
    return {e.event: e.detail for e in reversed(found)}


def test_a_wrong_pin_defers_the_mail_until_the_right_one_is_known(tmp_path: Path) -> None:
    edge, device = edge_and_device(tmp_path, retry=0.3)
    try:
        device.start()  # makes the connector's certificate
        pin = connector_pin(device.data_dir)
        set_pin(edge, "dev_home", OTHER_PIN)
        listeners = edge.start()
        new = maildir_new(device)
        send(listeners, "me@home.test", "pinned")
        wait_for(lambda: "presented a TLS key with pin" in edge.log())
        assert pin in edge.log() and OTHER_PIN in edge.log()
        wait_for(lambda: "deferred" in events(edge))
        assert not new.exists() or not list(new.iterdir())
        assert recoverable(spool_queue(edge).parent)  # still queued

        set_pin(edge, "dev_home", pin)  # the device's pin reaches the edge
        wait_for(lambda: new.exists() and list(new.iterdir()))
        [stored] = list(new.iterdir())
        assert b"Subject: pinned" in stored.read_bytes()
        wait_for(lambda: "delivered" in events(edge))
        seen = events(edge)
        assert "bounced" not in seen, seen  # deferred while the pin was wrong, never bounced
        assert all("pin" in detail for event, detail in seen.items() if event == "deferred")
    finally:
        edge.stop()
        device.stop()


def test_the_allinone_pins_its_device_and_survives_a_new_certificate(tmp_path: Path) -> None:
    proc = Process("tailpost", tmp_path / "aio", allinone_config())
    listeners = proc.start()
    new = proc.data_dir / "device" / "Maildir" / "new"
    try:
        first = connector_pin(proc.data_dir)
        send(listeners, "demo@example.test", "first key")
        wait_for(lambda: new.exists() and len(list(new.iterdir())) == 1)
        proc.stop()
        store = edge_store(proc.data_dir)
        device = store.get_device("dev_local")
        store.close()
        assert device is not None and device.connector_tls_pin == first

        for name in ("connector-cert.pem", "connector-key.pem"):  # a new certificate
            (proc.data_dir / "device" / "tls" / name).unlink()
        listeners = proc.start()
        second = connector_pin(proc.data_dir)
        assert second != first
        send(listeners, "demo@example.test", "second key")
        wait_for(lambda: len(list(new.iterdir())) == 2)
    finally:
        proc.stop()
