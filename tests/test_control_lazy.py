"""The control listener: `/health` and `/metrics` at once, the `/v1` API built on the first
request that needs it, and nothing of the web framework loaded before that."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from edge.dns.resolver import DNSResolver
from edge.runtime.adminkeys import admin_key_path, load_admin_keys
from edge.store import Store, open_store
from tests.test_control_support import make_config
from webapi.v1.listener import Control, LazyResource, LazySite, build_control


@dataclass
class Reply:
    code: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def get(url: str, key: str | None = None) -> Reply:
    request = urllib.request.Request(url)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, response.read(), dict(response.headers))
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read(), dict(err.headers))


@dataclass
class Listening:
    control: Control
    url: str
    store: Store
    key: str


@pytest.fixture(name="listening")
def listening_fixture(tmp_path: Path, in_reactor: Any) -> Iterator[Listening]:
    config = make_config(control_listen="127.0.0.1:0")
    config.data_dir = str(tmp_path)
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    store.create_route("lazy.test", type="byod", connector_id=None)
    resolver = DNSResolver(["127.0.0.1"], 1, timeout=1.0, reactor=in_reactor.reactor)
    control = build_control(config, store, resolver, in_reactor.reactor, lambda: 3)
    key = load_admin_keys(admin_key_path(config))[0]  # made on the first start
    in_reactor(control.listener.startService)
    control.on_ready({"control": control.listener.address})
    yield Listening(control, f"http://{control.listener.address}", store, key)
    in_reactor(control.listener.stopService)
    store.close()


def test_health_and_metrics_answer_without_building_the_api(listening: Listening) -> None:
    health = get(f"{listening.url}/health")
    assert health.code == 200
    assert health.json()["checks"]["database"]["status"] == "ok"
    assert health.headers["Content-Type"] == "application/json"
    assert health.headers["Cache-Control"] == "no-store"
    metrics = get(f"{listening.url}/metrics")
    assert metrics.code == 200
    assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "tailpost_queue_messages 3\n" in metrics.body.decode()
    assert "tailpost_routes 1\n" in metrics.body.decode()
    assert listening.control.api is None
    lazy = listening.control.root.rest
    assert isinstance(lazy, LazyResource) and lazy.built is None


def test_the_first_requests_build_the_api_and_are_answered(listening: Listening) -> None:
    url = listening.url
    calls = [
        (f"{url}/v1/email-routes", listening.key),
        (f"{url}/v1/openapi.json", None),
        (f"{url}/nothing-here", None),
        (f"{url}/v1/email-routes", None),
        (f"{url}/health", None),
    ]
    with ThreadPoolExecutor(len(calls)) as pool:
        routes, document, missing, anonymous, health = pool.map(lambda c: get(*c), calls)
    assert routes.code == 200
    assert [r["domain"] for r in routes.json()["routes"]] == ["lazy.test"]
    assert document.code == 200 and document.json()["servers"] == [{"url": url}]
    assert missing.code == 404 and missing.json()["code"] == "not_found"
    assert anonymous.code == 401 and anonymous.json()["code"] == "auth_missing_header"
    assert health.code == 200
    api = listening.control.api
    assert api is not None and api.base_url == url
    listening.control.on_ready({"control": "edge.test:8025"})  # reaches the built API too
    assert api.base_url == "http://edge.test:8025"
    # Later requests go straight to the built tree, including the operational endpoints'
    # answers for other methods.
    assert get(f"{url}/v1/email-routes", listening.key).code == 200
    request = urllib.request.Request(f"{url}/health", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 405


def dummy() -> Any:
    """A request for unit tests (typed loosely: it does not declare IRequest)."""
    return DummyRequest([b""])


class Text(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"built"


class Deferring:
    """Stands in for `deferToThread`: each call returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, defer.Deferred[Any]]] = []

    def __call__(self, fn: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((fn, d))
        return d

    def finish(self) -> None:
        fn, d = self.calls.pop(0)
        try:
            result = fn()
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)


def test_requests_wait_for_the_build_and_the_one_that_left_is_skipped() -> None:
    run = Deferring()
    prepared: list[str] = []
    lazy = LazyResource(lambda: prepared.append("imports"), Text, run)
    first, second, gone = dummy(), dummy(), dummy()
    for request in (first, second, gone):
        assert lazy.render(request) == NOT_DONE_YET
    assert len(run.calls) == 1 and prepared == [] and lazy.built is None
    gone.processingFailed(Failure(ConnectionError("client went away")))
    run.finish()
    assert prepared == ["imports"]
    assert first.written == [b"built"] and first.finished == 1
    assert second.written == [b"built"] and second.finished == 1
    assert gone.written == [] and gone.finished == 0
    third = dummy()
    assert lazy.render(third) == b"built"  # built once: no thread any more
    assert run.calls == []


def test_a_failed_build_answers_500_and_the_next_request_tries_again() -> None:
    run = Deferring()
    attempts: list[int] = []

    def build() -> Resource:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("cannot build")
        return Text()

    lazy = LazyResource(lambda: None, build, run)
    request = dummy()
    lazy.render(request)
    run.finish()
    assert request.responseCode == 500 and request.finished == 1
    body = json.loads(b"".join(request.written))
    assert body["code"] == "internal_error" and "cannot build" not in json.dumps(body)
    assert lazy.built is None
    retry = dummy()
    lazy.render(retry)
    run.finish()
    assert retry.written == [b"built"] and len(attempts) == 2


def test_the_site_is_made_at_the_first_connection_and_follows_the_listener() -> None:
    clock = Clock()
    factory = LazySite(Text(), clock)
    factory.doStart()
    assert factory.site is None
    protocol = factory.buildProtocol(None)
    site = factory.site
    assert site is not None and protocol is not None and protocol.factory is site
    assert site.numPorts == 1
    factory.doStop()
    assert site.numPorts == 0
    factory.doStart()  # the listener starts again: so does the site
    assert site.numPorts == 1 and factory.buildProtocol(None) is not None
    assert factory.site is site
    factory.doStop()


def test_an_idle_edge_does_not_load_the_web_framework(tmp_path: Path) -> None:
    code = f"""
import json, sys, threading, urllib.request
from twisted.internet import reactor
from edge.app import build_edge
from edge.config import Config

config = Config(data_dir={str(tmp_path)!r})
config.edge.mx_listen = config.edge.control_listen = config.edge.relay_listen = "127.0.0.1:0"
edge = build_edge(config, reactor)
edge.service.startService()
loaded = []

def client():
    loaded.append(sorted(m for m in ("twisted.web.server", "klein") if m in sys.modules))
    url = "http://" + edge.control.listener.address
    loaded.append(urllib.request.urlopen(url + "/health", timeout=30).status)
    heavy = ("klein", "werkzeug", "pydantic", "webapi.v1.app", "webapi.v1.site")
    loaded.append(sorted(m for m in heavy if m in sys.modules))
    urllib.request.urlopen(url + "/v1/openapi.json", timeout=30).read()
    loaded.append(sorted(m for m in heavy if m in sys.modules))
    reactor.callFromThread(reactor.stop)

reactor.callWhenRunning(lambda: threading.Thread(target=client).start())
reactor.run()
print(json.dumps(loaded))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    before, status, after_health, after_api = json.loads(done.stdout.strip().splitlines()[-1])
    assert before == [] and status == 200 and after_health == []
    assert after_api == ["klein", "pydantic", "webapi.v1.app", "webapi.v1.site", "werkzeug"]
