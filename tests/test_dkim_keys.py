"""DKIM keys as the operator sees them: made once for a domain (and for the all-in-one's demo
domain at its first start), and `tailpost dkim show` printing the TXT records to publish, which
verify the signer's signatures when served as printed."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import dkim
import pytest
from twisted.internet import reactor

from connector.allinone import build_allinone
from edge.config import Config, load_config
from edge.outbound.dkimkeys import dkim_records, ensure_dkim_keys, txt_strings
from edge.outbound.dkimsign import DkimSigner
from edge.runtime.cli import main
from edge.runtime.storeopen import open_configured_store
from edge.store.access import AccessStore
from tests.processes import allinone_config

DOMAIN = "example.org"
MESSAGE = b"From: ann@example.org\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


def test_txt_strings() -> None:
    assert txt_strings("a" * 600) == ("a" * 255, "a" * 255, "a" * 90)
    assert txt_strings("b" * 255) == ("b" * 255,)
    assert txt_strings("b" * 510) == ("b" * 255, "b" * 255)
    assert txt_strings("") == ("",)


@pytest.fixture(name="config")
def config_fixture(tmp_path: Path) -> Config:
    return load_config(None, data_dir=str(tmp_path / "data"))


def cli(config: Config, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--data-dir", str(config.data_path), *args], out, err)
    return code, out.getvalue(), err.getvalue()


def test_keys_are_made_once(config: Config) -> None:
    store = open_configured_store(config)
    try:
        access = AccessStore(store)
        keys, made = ensure_dkim_keys(access, "Example.ORG.")
        assert made and [k.algorithm for k in keys] == ["rsa", "ed25519"]
        assert all(k.domain == DOMAIN and k.selector.startswith("tp") for k in keys)
        again, made = ensure_dkim_keys(access, DOMAIN)
        assert not made and [k.id for k in again] == [k.id for k in keys]
    finally:
        store.close()


def zone_lookup(lines: list[str]) -> object:
    """dkimpy's key lookup answered from zone-file lines as `dkim show` prints them."""
    zone: dict[str, str] = {}
    for line in lines:
        match = re.fullmatch(r"(\S+)\. IN TXT ((?:\"[^\"]*\" ?)+)", line)
        assert match, line
        strings = re.findall(r"\"([^\"]*)\"", match.group(2))
        assert all(len(s) <= 255 for s in strings)
        zone[match.group(1)] = "".join(strings)

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        value = zone.get(name.decode("ascii").rstrip("."))
        return value.encode("ascii") if value is not None else None

    return txt


def test_dkim_show_prints_records_that_verify(config: Config) -> None:
    store = open_configured_store(config)
    try:
        access = AccessStore(store)
        keys, _ = ensure_dkim_keys(access, DOMAIN)
        signed = DkimSigner(access).sign(MESSAGE, DOMAIN) + MESSAGE
    finally:
        store.close()
    code, out, err = cli(config, "dkim", "show", "Example.ORG")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split("._domainkey.")[0] for line in lines] == [k.selector for k in keys]
    assert lines[0].count('" "') == 1  # the RSA record is two strings
    assert "PRIVATE" not in out
    lookup = zone_lookup(lines)
    checker = dkim.DKIM(signed)
    assert [checker.verify(idx=i, dnsfunc=lookup) for i in range(2)] == [True, True]
    code, out, err = cli(config, "dkim", "show", DOMAIN, "--json")
    assert code == 0, err
    shown = json.loads(out)["records"]
    assert shown == [r.to_dict() for r in dkim_records(DOMAIN, keys)]
    assert [r["zone_line"] for r in shown] == lines


def test_dkim_show_errors(config: Config) -> None:
    code, out, err = cli(config, "dkim", "show", "nokeys.example")
    assert code == 1 and out == "" and "no active DKIM key for nokeys.example" in err
    code, out, err = cli(config, "dkim", "show", "not a domain")
    assert code == 1 and "invalid domain" in err


def test_the_all_in_one_gives_its_demo_domain_keys(tmp_path: Path) -> None:
    path = tmp_path / "tailpost.toml"
    path.write_text(allinone_config())
    stores = []
    try:
        for _ in range(2):  # a first start, then a restart
            config = load_config(str(path), data_dir=str(tmp_path / "aio"))
            _top, edge, _device, _report = build_allinone(config, reactor)
            stores.append(edge.store)
        first, second = (AccessStore(s).dkim_keys(config.demo.domain) for s in stores)
        assert [k.algorithm for k in first] == ["rsa", "ed25519"]
        assert [k.id for k in second] == [k.id for k in first]  # kept, not made again
    finally:
        for store in stores:
            store.close()
    code, out, err = cli(config, "dkim", "show", config.demo.domain)
    assert code == 0 and len(out.splitlines()) == 2, err
