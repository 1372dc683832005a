"""gRPC between the gateway (or any client) and wafsvc: TLS, mutual TLS and a
bearer token, against a real wafsvc process with certificates made per run.

Each refusal is checked next to the matching acceptance, so a test cannot pass
because nothing works at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stack import Stack, StackSpec, free_port
from stack.processes import ROOT
from stack.processes import wait_for_health
from tests.e2e.conftest import http_request
from tests.e2e.tls_certs import SERVER_NAME, make_pki
from wafapi import waf_pb2, waf_pb2_grpc

TOKEN = "t0ken-for-this-test-run"
SQLI = "/?id=1%27%20or%20%271%27%3D%271"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def _gateway_env(pki, token_file, cert=None, key=None) -> dict[str, str]:
    return {"GATEWAY_TLS_CA": str(pki.ca), "GATEWAY_TLS_CERT": str(cert or pki.client_cert),
            "GATEWAY_TLS_KEY": str(key or pki.client_key), "GATEWAY_TLS_SERVER_NAME": SERVER_NAME,
            "GATEWAY_TOKEN_FILE": str(token_file)}


@pytest.fixture(scope="module")
def wafsvc(pki, token_file, tmp_path_factory):
    """One wafsvc with TLS, client certificates required and a token."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("logs") / "wafsvc.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WAF_LISTEN": f"127.0.0.1:{port}", "WAF_WORKERS": "1",
           "RULES": str(ROOT / "rules" / "block-localhost.conf"),
           "WAF_TLS_CERT": str(pki.server_cert), "WAF_TLS_KEY": str(pki.server_key),
           "WAF_TLS_CLIENT_CA": str(pki.ca), "WAF_TOKEN_FILE": str(token_file)}
    proc = subprocess.Popen([sys.executable, "-m", "wafsvc"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(port, proc, "wafsvc", gateway_env=_gateway_env(pki, token_file))
        yield port
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def _channel(port, pki, *, tls=True, ca=None, cert=None, key=None):
    if not tls:
        return grpc.insecure_channel(f"127.0.0.1:{port}")
    creds = grpc.ssl_channel_credentials(
        (ca or pki.ca).read_bytes(), key.read_bytes() if key else None, cert.read_bytes() if cert else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)])


def _evaluate(channel, token: str | None = TOKEN, timeout: float = 5):
    request = waf_pb2.EvaluateRequest(method="GET", uri=b"/", client_ip="10.1.2.3",
                                      headers=[waf_pb2.Header(name=b"host", value=b"x")])
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    return waf_pb2_grpc.WafStub(channel).Evaluate(request, timeout=timeout, metadata=metadata)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_right_certificate_and_token_get_a_verdict(wafsvc, pki):
    with _channel(wafsvc, pki, cert=pki.client_cert, key=pki.client_key) as channel:
        verdict = _evaluate(channel)
    assert verdict.action == waf_pb2.ACTION_PASS


def test_plaintext_is_refused(wafsvc, pki):
    with _channel(wafsvc, pki, tls=False) as channel:
        assert _code(lambda: _evaluate(channel, timeout=2)) == grpc.StatusCode.UNAVAILABLE


def test_tls_without_client_certificate_is_refused(wafsvc, pki):
    with _channel(wafsvc, pki) as channel:
        assert _code(lambda: _evaluate(channel, timeout=2)) == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_is_refused(wafsvc, pki):
    with _channel(wafsvc, pki, cert=pki.rogue_client_cert, key=pki.rogue_client_key) as channel:
        assert _code(lambda: _evaluate(channel, timeout=2)) == grpc.StatusCode.UNAVAILABLE


def test_server_not_signed_by_the_trusted_ca_is_refused(wafsvc, pki):
    with _channel(wafsvc, pki, ca=pki.rogue_ca, cert=pki.client_cert, key=pki.client_key) as channel:
        assert _code(lambda: _evaluate(channel, timeout=2)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ""])
def test_missing_or_wrong_token_is_refused(wafsvc, pki, token):
    with _channel(wafsvc, pki, cert=pki.client_cert, key=pki.client_key) as channel:
        assert _code(lambda: _evaluate(channel, token=token)) == grpc.StatusCode.UNAUTHENTICATED


def test_stream_with_wrong_token_is_refused(wafsvc, pki):
    batch = waf_pb2.EvaluateBatch(requests=[waf_pb2.BatchRequest(
        ref=1, request=waf_pb2.EvaluateRequest(method="GET", uri=b"/", client_ip="10.1.2.3"))])
    with _channel(wafsvc, pki, cert=pki.client_cert, key=pki.client_key) as channel:
        stub = waf_pb2_grpc.WafStub(channel)
        wrong = stub.EvaluateStream(iter([batch]), metadata=(("authorization", "Bearer wrong"),), timeout=5)
        assert _code(lambda: list(wrong)) == grpc.StatusCode.UNAUTHENTICATED
        right = stub.EvaluateStream(iter([batch]), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
        assert [v.ref for b in right for v in b.verdicts] == [1]


def test_health_needs_the_certificate_but_not_the_token(wafsvc, pki):
    request = health_pb2.HealthCheckRequest(service="waf.v1.Waf")
    with _channel(wafsvc, pki, cert=pki.client_cert, key=pki.client_key) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with _channel(wafsvc, pki, tls=False) as channel:
        assert _code(lambda: health_pb2_grpc.HealthStub(channel).Check(request, timeout=2)) \
            == grpc.StatusCode.UNAVAILABLE


def test_wafsvc_refuses_an_empty_token_file(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WAF_LISTEN": f"127.0.0.1:{free_port()}",
           "RULES": str(ROOT / "rules" / "block-localhost.conf"), "WAF_TOKEN_FILE": str(empty)}
    done = subprocess.run([sys.executable, "-m", "wafsvc"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "WAF_TOKEN_FILE" in done.stderr


# -- the whole path: HAProxy -> gateway -(mTLS + token)-> wafsvc -----------

def _stack(tmp_path, pki, token_file, gateway_env) -> Stack:
    wafsvc_env = {"CRS_DIR": "/usr/share/modsecurity-crs", "WAF_TLS_CERT": str(pki.server_cert),
                  "WAF_TLS_KEY": str(pki.server_key), "WAF_TLS_CLIENT_CA": str(pki.ca),
                  "WAF_TOKEN_FILE": str(token_file)}
    spec = StackSpec(log_dir=tmp_path, haproxy_bin=shutil.which("haproxy") or "haproxy",
                     haproxy_env={"WAF_DEBUG_HEADERS": "1"}, wafsvc_env=wafsvc_env,
                     gateway_env={**gateway_env, "GATEWAY_DEADLINE_MS": "400"})
    return Stack(spec)


def test_gateway_reaches_wafsvc_over_mutual_tls_with_token(tmp_path, pki, token_file):
    with _stack(tmp_path, pki, token_file, _gateway_env(pki, token_file)) as stack:
        assert http_request(stack.spec.frontend_port).status == 200
        blocked = http_request(stack.spec.frontend_port, path=SQLI)
        assert blocked.status == 403 and 942100 in blocked.rules and not blocked.failed


def test_gateway_with_a_wrong_token_fails_closed(tmp_path, pki, token_file):
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    stack = _stack(tmp_path, pki, token_file, _gateway_env(pki, wrong))
    stack.start_backend()
    stack.start_wafsvc(0)
    wait_for_health(stack.spec.wafsvc_ports[0], stack.proc("wafsvc1"), "wafsvc1",
                    gateway_env=stack.spec.gateway_env)
    try:
        stack.start_gateway()
        stack.start_haproxy()
        replies = [http_request(stack.spec.frontend_port, path=SQLI) for _ in range(3)]
        # Never a pass: no verdict means 503 under the fail-closed policy.
        assert {r.status for r in replies} == {503}
        assert "UNAUTHENTICATED" in (tmp_path / "gateway.log").read_text()  # the log says why
    finally:
        stack.stop()


# -- worker memory limit ------------------------------------------------------

def test_worker_over_its_memory_limit_is_recycled(tmp_path):
    """WAF_WORKER_MAX_RSS_MB below what any worker needs: each worker drains,
    exits and is replaced by the supervisor, again and again."""
    import time
    port = free_port()
    log_path = tmp_path / "wafsvc.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WAF_LISTEN": f"127.0.0.1:{port}", "WAF_WORKERS": "1",
           "RULES": str(ROOT / "rules" / "block-localhost.conf"), "WAF_WORKER_MAX_RSS_MB": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "wafsvc"], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and log_path.read_text().count("over its memory limit") < 2:
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(15)
    text = log_path.read_text()
    assert text.count("over its memory limit") >= 2, text[-2000:]
    assert '"limit_mb": 1' in text
