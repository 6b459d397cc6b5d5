"""Tokens (hashed), auth required off loopback, per-user isolation, admin scope, rate limits, server-sent
progress events and signed, retried webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from fastapi.testclient import TestClient

from imagesmith.engine.generate import Engine
from imagesmith.serve.app import create_app
from imagesmith.serve.store import JobStore, token_digest
from imagesmith.serve.webhooks import webhook_secret
from imagesmith.serve.worker import Worker

from fixtures.cli import run_cli

GEN = {"prompt": "a red apple", "model": "tiny-sd15", "width": 64, "height": 64, "steps": 3, "seed": 5,
       "sampler_name": "Euler"}


@pytest.fixture()
def home(tiny_home, tmp_path):
    from fixtures.tiny import home_with_tiny_sd15
    settings = home_with_tiny_sd15(tmp_path / "home", tiny_home)
    return settings


def test_tokens_are_hashed_and_auth_isolates_users(home, capsys, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_HOME", str(home.home))
    assert run_cli(capsys, "users", "add", "ann")[0] == 0
    assert run_cli(capsys, "users", "add", "root", "--admin")[0] == 0
    code, out, _ = run_cli(capsys, "tokens", "create", "ann")
    ann = out.strip()
    assert code == 0 and ann.startswith("ism_")
    code, _, err = run_cli(capsys, "tokens", "create", "nobody")
    assert code == 2 and "no user 'nobody'" in err
    store = JobStore(f"sqlite:///{home.home / 'jobs.db'}")
    raw = store.engine.raw_connection()
    digests = [r[0] for r in raw.execute("select digest from tokens").fetchall()]
    assert digests == [token_digest(ann)] and ann not in (home.home / "jobs.db").read_bytes().decode("latin-1")
    root = store.create_token("root")
    store.add_user("bob")
    bob = store.create_token("bob")
    client = TestClient(create_app(home, store, require_auth=True))
    assert client.get("/healthz").status_code == 200
    r = client.post("/v1/jobs", json={"type": "generate", "request": GEN})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer ism_wrong"}).status_code == 401
    job = client.post("/v1/jobs", json={"type": "generate", "request": GEN},
                      headers={"Authorization": f"Bearer {ann}"}).json()["job_id"]
    assert client.get(f"/v1/jobs/{job}", headers={"Authorization": f"Bearer {ann}"}).status_code == 200
    assert client.get(f"/v1/jobs/{job}", headers={"Authorization": f"Bearer {bob}"}).status_code == 404
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {bob}"}).json()["total"] == 0
    assert client.get(f"/v1/jobs/{job}", headers={"Authorization": f"Bearer {root}"}).status_code == 200
    assert client.post(f"/v1/jobs/{job}/cancel", headers={"Authorization": f"Bearer {bob}"}).status_code == 404


def test_http_basic_auth_as_a1111_api_auth_clients_send_it(home):
    """A1111's --api-auth clients (webuiapi's set_auth, Open WebUI's AUTOMATIC1111_API_AUTH) speak HTTP Basic
    only: the user's name with a token as the password works wherever a Bearer token does."""
    import base64
    store = JobStore(f"sqlite:///{home.home / 'jobs-basic.db'}")
    store.add_user("ann")
    ann = store.create_token("ann")
    store.add_user("bob")
    client = TestClient(create_app(home, store, require_auth=True))

    def basic(user, password):
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    assert client.get("/sdapi/v1/samplers", headers=basic("ann", ann)).status_code == 200
    assert client.get("/v1/jobs", headers=basic("ann", ann)).json()["total"] == 0
    assert client.get("/sdapi/v1/samplers", headers=basic("bob", ann)).status_code == 401  # not bob's token
    assert client.get("/sdapi/v1/samplers", headers=basic("ann", "ism_wrong")).status_code == 401
    assert client.get("/sdapi/v1/samplers", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert client.get("/sdapi/v1/samplers").status_code == 401


def test_rate_limit(home):
    store = JobStore(f"sqlite:///{home.home / 'jobs.db'}")
    client = TestClient(create_app(home, store, rate_per_minute=3))
    codes = [client.get("/v1/jobs").status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[-1] == 429


def test_the_websocket_has_the_same_caller_as_http_rate_limit_included(home):
    """One dependency names the caller of HTTP and WebSocket routes: the socket takes a Bearer header, HTTP Basic
    or ?token=, is refused (4401) without one on a server that requires auth, and counts against the same rate
    limit as the user's HTTP calls (4429 past it)."""
    import base64

    from starlette.websockets import WebSocketDisconnect
    store = JobStore(f"sqlite:///{home.home / 'jobs-ws.db'}")
    store.add_user("ann")
    ann = store.create_token("ann")
    client = TestClient(create_app(home, store, require_auth=True, rate_per_minute=4))
    job = client.post("/v1/jobs", json={"type": "generate", "request": GEN},
                      headers={"Authorization": f"Bearer {ann}"}).json()["job_id"]  # 1st call of ann's 4
    store.cancel(job)

    def close_code(url, headers=None):
        try:
            with client.websocket_connect(url, headers=headers or {}) as ws:
                return ws.receive_json()["status"]
        except WebSocketDisconnect as exc:
            return exc.code
    assert close_code(f"/v1/jobs/{job}/ws") == 4401
    assert close_code(f"/v1/jobs/{job}/ws?token=ism_wrong") == 4401
    assert close_code(f"/v1/jobs/{job}/ws?token={ann}") == "canceled"  # 2nd
    basic = "Basic " + base64.b64encode(f"ann:{ann}".encode()).decode()
    assert close_code(f"/v1/jobs/{job}/ws", {"Authorization": basic}) == "canceled"  # 3rd
    assert close_code(f"/v1/jobs/{job}/ws", {"Authorization": f"Bearer {ann}"}) == "canceled"  # 4th
    assert close_code(f"/v1/jobs/{job}/ws?token={ann}") == 4429  # the same bucket as HTTP
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {ann}"}).status_code == 429
    assert client.get(f"/v1/jobs/{job}?token={ann}").status_code == 401  # ?token= is for WebSockets only


def test_every_route_but_health_needs_a_caller(home):
    """No route forgets the caller check (each router's routes are listed from the OpenAPI document)."""
    import re
    store = JobStore(f"sqlite:///{home.home / 'jobs-open.db'}")
    client = TestClient(create_app(home, store, require_auth=True))
    open_routes = {"/healthz", "/readyz"}
    checked = 0
    for path, operations in client.app.openapi()["paths"].items():
        url = re.sub(r"\{(\w+)\}", "0", path)
        for method in operations:
            r = client.request(method.upper(), url, json={})
            if path in open_routes:
                assert r.status_code == 200, path
            else:
                assert r.status_code == 401, (method, path, r.status_code)
                checked += 1
    assert checked >= 40


class _Hook(BaseHTTPRequestHandler):
    received: list = []
    fail_first = 1

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if _Hook.fail_first > 0:
            _Hook.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        _Hook.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_events_stream_and_signed_retried_webhook(home, monkeypatch):
    monkeypatch.setenv("IMAGESMITH_WEBHOOK_ALLOW", "127.0.0.1")  # the test's receiver is on loopback
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store = JobStore(f"sqlite:///{home.home / 'jobs.db'}")
    worker = Worker(store, home, engine=Engine(home, device="cpu"), lease_s=10)
    worker.webhook_backoff = 0.05
    client = TestClient(create_app(home, store))
    url = f"http://127.0.0.1:{server.server_port}/hook"
    job = client.post("/v1/jobs", json={"type": "generate", "request": GEN, "callback_url": url}).json()["job_id"]
    assert client.post("/v1/jobs", json={"type": "generate", "request": GEN,
                                         "callback_url": "file:///etc/passwd"}).status_code == 422
    running = threading.Thread(target=worker.run_once, daemon=True)
    running.start()
    with client.stream("GET", f"/v1/jobs/{job}/events") as stream:
        events = [line for line in stream.iter_lines() if line.startswith("event:")]
    assert events[-1] == "event: done" and events.count("event: done") == 1
    # "done" is streamed as soon as the job's row says so; the worker starts the webhook just after
    running.join(60)
    assert not running.is_alive() and worker.webhooks
    for t in worker.webhooks:
        t.join(10)
    server.shutdown()
    assert len(_Hook.received) == 1  # the 503 was retried once
    headers, body = _Hook.received[0]
    payload = json.loads(body)
    assert payload["job_id"] == job and payload["status"] == "succeeded" and payload["files"]
    expected = "sha256=" + hmac.new(webhook_secret(home.home).encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Imagesmith-Signature"] == expected


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:5432/", "http://127.1.2.3/", "http://10.0.0.1/", "http://172.16.5.4/", "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/", "http://100.64.0.1/", "http://0.0.0.0/", "http://224.0.0.1/",
    "http://240.0.0.1/", "http://[::1]/", "http://[::]/", "http://[fe80::1]/", "http://[fc00::1]/",
    "http://[ff02::1]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:10.0.0.1]/", "http://localhost:8188/hook",
])
def test_webhooks_to_non_public_addresses_are_refused_at_submit(home, target):
    """Loopback, private, link-local (cloud metadata), CGNAT, unspecified, multicast, reserved, IPv6 forms and
    IPv4-mapped IPv6, and a DNS name that resolves to 127.0.0.1: a 422 at submit, nothing queued."""
    store = JobStore(f"sqlite:///{home.home / 'jobs-ssrf.db'}")
    client = TestClient(create_app(home, store))
    r = client.post("/v1/jobs", json={"type": "generate", "request": GEN, "callback_url": target})
    assert r.status_code == 422 and "non-public address" in r.json()["error"]["message"]
    assert client.get("/v1/jobs").json()["total"] == 0


def test_the_allow_list_and_no_redirects(home, monkeypatch):
    from imagesmith.core.errors import BadRequest
    from imagesmith.serve.webhooks import allowed_networks, deliver, resolve_target
    assert resolve_target("http://8.8.8.8/x", allow=[])[3] == "8.8.8.8"  # a public address needs no lookup
    assert resolve_target("http://10.1.2.3/", allow=allowed_networks("10.0.0.0/8"))[3] == "10.1.2.3"
    with pytest.raises(BadRequest, match="not an address"):
        allowed_networks("intranet")

    class Redirect(BaseHTTPRequestHandler):
        hits: list = []

        def do_POST(self):
            Redirect.hits.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()

        def log_message(self, *args):
            pass
    server = HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("IMAGESMITH_WEBHOOK_ALLOW", "127.0.0.1")
    try:
        assert deliver(f"http://127.0.0.1:{server.server_port}/hook", {"status": "succeeded"}, "s", backoff=0) is False
    finally:
        server.shutdown()
    assert Redirect.hits == ["/hook"]  # one POST; the redirect was not followed, nor retried
    monkeypatch.delenv("IMAGESMITH_WEBHOOK_ALLOW")
    # at delivery the name is checked again: a target that is no longer allowed is dropped, not retried
    assert deliver("http://127.0.0.1:9/hook", {"status": "failed"}, "s", attempts=3, backoff=0) is False
