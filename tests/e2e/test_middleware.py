"""The ASGI (Starlette on uvicorn) and WSGI (Flask on waitress) middleware
protect real apps over real sockets against a real wafsvc."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from stack import free_port
from stack.processes import ROOT, wait_for_port
from tests.e2e.conftest import http_request
from tests.e2e.wafsvc_only import start_wafsvc, target

SERVERS = {
    "starlette-uvicorn": lambda port: [sys.executable, "-m", "uvicorn", "--factory", "--port", str(port),
                                       "--log-level", "warning", "tests.e2e.middleware_apps:asgi_app"],
    "flask-waitress": lambda port: [sys.executable, "-m", "waitress", f"--port={port}",
                                    "--call", "tests.e2e.middleware_apps:wsgi_app"],
}


@pytest.fixture(scope="module")
def waf(tmp_path_factory):
    # truncated bodies pass (flagged), so the app can show it got all of a large one
    stack = start_wafsvc(tmp_path_factory.mktemp("waf"), env={"WAF_TRUNCATED_BODY": "allow"})
    yield target(stack)
    stack.stop()


def serve(kind: str, waf_target: str, failure_policy: str = "closed"):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MODSEC_SPOA_TARGET": waf_target,
           "MODSEC_SPOA_DEADLINE_MS": "1000", "FAILURE_POLICY": failure_policy}
    proc = subprocess.Popen(SERVERS[kind](port), cwd=ROOT, env=env, start_new_session=True)
    wait_for_port(port, proc, kind)
    return proc, port


@pytest.fixture(scope="module", params=sorted(SERVERS))
def app(request, waf):
    proc, port = serve(request.param, waf)
    yield port
    proc.terminate()
    proc.wait(10)


def test_attack_in_the_query_gets_403_from_the_middleware(app):
    reply = http_request(app, path="/search?q=attack", headers=[("Host", "shop")])
    assert reply.status == 403 and b"refused by the web application firewall" in reply.body


def test_attack_in_the_body_gets_403(app):
    reply = http_request(app, "POST", "/form", headers=[("Host", "shop"), ("Content-Type", "text/plain")],
                         body=b"hello attack")
    assert reply.status == 403


def test_benign_request_passes_and_the_app_reads_its_body(app):
    body = b"name=alice&comment=" + b"kind words " * 200
    reply = http_request(app, "POST", "/form", headers=[("Host", "shop"),
                                                         ("Content-Type", "application/x-www-form-urlencoded")],
                         body=body)
    assert reply.status == 200, reply.body
    seen = json.loads(reply.body)
    assert seen["sha256"] == hashlib.sha256(body).hexdigest() and seen["verdict"]["blocked"] is False


def test_a_body_past_the_inspection_limit_reaches_the_app_whole(app):
    # 300 KB: the client inspects the first 128 KB and flags the cut
    # (rule 99010; this wafsvc lets truncated bodies pass); the app still
    # reads every byte.
    body = os.urandom(150 * 1024).hex().encode()
    reply = http_request(app, "PUT", "/upload", headers=[("Host", "shop"),
                                                         ("Content-Type", "application/octet-stream")], body=body)
    assert reply.status == 200, reply.body
    seen = json.loads(reply.body)
    assert seen["length"] == len(body) and seen["sha256"] == hashlib.sha256(body).hexdigest()
    assert 99010 in [m["id"] for m in seen["verdict"]["matches"]]


def test_a_request_wafsvc_refuses_gets_400(app):
    # Past WAF_MAX_HEADERS (128): wafsvc refuses to judge it (LIMIT_HEADER_COUNT),
    # so it must not pass uninspected, whatever the failure policy.
    headers = [("Host", "shop")] + [(f"X-H{i}", "v") for i in range(140)]
    reply = http_request(app, path="/", headers=headers)
    assert reply.status == 400, reply.body


@pytest.mark.parametrize("kind", sorted(SERVERS))
@pytest.mark.parametrize("policy, status", [("closed", 503), ("open", 200)])
def test_waf_down_applies_the_failure_policy(kind, policy, status):
    proc, port = serve(kind, f"127.0.0.1:{free_port()}", policy)
    try:
        reply = http_request(port, path="/search?q=attack", headers=[("Host", "shop")])
        assert reply.status == status, reply.body
        if status == 200:
            assert json.loads(reply.body)["verdict"] is None  # let through without a verdict
    finally:
        proc.terminate()
        proc.wait(10)
