"""The spine: HAProxy -> SPOP gateway -> gRPC -> wafsvc (CRS, blocking)."""

from __future__ import annotations

import random
import string

import grpc
import pytest

from stack import free_port
from tests.e2e.conftest import http_request, start_stack
from wafapi import waf_pb2, waf_pb2_grpc

SQLI = "/?id=1%27%20or%20%271%27%3D%271"
XSS_FORM = b"comment=%3Cscript%3Ealert%28document.cookie%29%3C%2Fscript%3E"
BROWSER = [("Host", "www.example.com"), ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
           ("Accept", "text/html,application/xhtml+xml"), ("Accept-Language", "en-GB,en;q=0.5")]


def _random_text(rng: random.Random, size: int) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(size))


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """Random long header names and values, and rules that match only the
    exact bytes: a 418 verdict proves they reached the engine intact."""
    rng = random.Random()
    probe = {
        "value_240": _random_text(rng, 240),
        "value_8k": _random_text(rng, 8000),
        # HAProxy's HTX stores a header name's length in 8 bits: 255 is the
        # longest name it can carry, longer ones get its own 400.
        "name_255": "x-" + _random_text(rng, 253).lower(),
    }
    rules = tmp_path_factory.mktemp("rules") / "probe.conf"
    rules.write_text(
        f'SecRule REQUEST_HEADERS:x-probe-240 "@streq {probe["value_240"]}" "id:10240,phase:1,deny,status:418,log"\n'
        f'SecRule REQUEST_HEADERS:x-probe-8k "@streq {probe["value_8k"]}" "id:18000,phase:1,deny,status:418,log"\n'
        f'SecRule REQUEST_HEADERS_NAMES "@streq {probe["name_255"]}" "id:10255,phase:1,deny,status:418,log"\n'
        f'SecRule REQUEST_HEADERS:x-probe-body-length "@gt 0" "id:10300,phase:2,deny,status:418,log,chain"\n'
        f'    SecRule REQUEST_BODY_LENGTH "@eq %{{REQUEST_HEADERS.x-probe-body-length}}"\n'
    )
    probe["rules"] = str(rules)
    return probe


@pytest.fixture(scope="module")
def stack(haproxy_bin, stack_logs, probe):
    s = start_stack(stack_logs, haproxy_bin, wafsvc_ports=[free_port(), free_port()],
                    wafsvc_env={"CRS_DIR": "/usr/share/modsecurity-crs", "PARANOIA": "1",
                                "MODE": "block", "RULES": probe["rules"]})
    yield s
    s.stop()


def test_benign_get_passes(stack):
    reply = http_request(stack.spec.frontend_port, headers=BROWSER)
    assert reply.status == 200
    assert reply.rules == []


def test_sqli_in_query_is_blocked(stack):
    reply = http_request(stack.spec.frontend_port, path=SQLI, headers=BROWSER)
    assert reply.status == 403
    assert 942100 in reply.rules and 949110 in reply.rules


def test_xss_in_form_body_is_blocked(stack):
    reply = http_request(stack.spec.frontend_port, "POST", "/comment", body=XSS_FORM,
                         headers=BROWSER + [("Content-Type", "application/x-www-form-urlencoded")])
    assert reply.status == 403
    assert any(941000 <= rule < 942000 for rule in reply.rules), reply.rules


def test_ignored_rules_apply_to_their_frontend_only(stack):
    lenient = http_request(stack.spec.frontend_alt_port, path=SQLI, headers=BROWSER)
    assert lenient.status == 200, lenient.rules
    assert 942100 not in lenient.rules
    # The removal must not leak into the shared rule set.
    strict = http_request(stack.spec.frontend_port, path=SQLI, headers=BROWSER)
    assert strict.status == 403


@pytest.mark.parametrize("header", ["value_240", "value_8k"])
def test_long_header_values_arrive_intact(stack, probe, header):
    name = {"value_240": "X-Probe-240", "value_8k": "X-Probe-8k"}[header]
    exact = http_request(stack.spec.frontend_port, headers=BROWSER + [(name, probe[header])])
    assert exact.status == 403 and {"value_240": 10240, "value_8k": 18000}[header] in exact.rules
    altered = probe[header][:-1] + ("A" if probe[header][-1] != "A" else "B")
    assert http_request(stack.spec.frontend_port, headers=BROWSER + [(name, altered)]).status == 200


def test_longest_header_name_arrives_intact(stack, probe):
    reply = http_request(stack.spec.frontend_port, headers=BROWSER + [(probe["name_255"], "1")])
    assert reply.status == 403 and 10255 in reply.rules
    shorter = probe["name_255"][:-1]
    assert http_request(stack.spec.frontend_port, headers=BROWSER + [(shorter, "1")]).status == 200


def test_header_name_beyond_haproxy_limit_is_refused_not_passed(stack):
    reply = http_request(stack.spec.frontend_port, headers=BROWSER + [("x-" + "n" * 4000, "1")])
    assert reply.status == 400  # HAProxy's own answer: it never reaches the backend


def test_binary_body_with_nul_bytes_is_evaluated(stack):
    data = bytes(range(256)) * 8 + b"\x00\x00tail"
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob.bin\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--XyZ--\r\n")
    headers = BROWSER + [("Content-Type", "multipart/form-data; boundary=XyZ")]
    reply = http_request(stack.spec.frontend_port, "POST", "/upload", body=body, headers=headers)
    assert reply.status == 200 and not reply.failed
    # The engine saw every byte: the probe rule matches on the exact length.
    probed = http_request(stack.spec.frontend_port, "POST", "/upload", body=body,
                          headers=headers + [("X-Probe-Body-Length", str(len(body)))])
    assert probed.status == 403 and 10300 in probed.rules
    off_by_one = http_request(stack.spec.frontend_port, "POST", "/upload", body=body,
                              headers=headers + [("X-Probe-Body-Length", str(len(body) + 1))])
    assert off_by_one.status == 200


def _grpc_verdict(stack, uri: bytes, method="GET", headers=(), body=b"") -> waf_pb2.Verdict:
    request = waf_pb2.EvaluateRequest(
        method=method, uri=uri, http_version="1.1", client_ip="127.0.0.1", client_port=40000,
        server_ip="127.0.0.1", server_port=stack.spec.frontend_port,
        headers=[waf_pb2.Header(name=n.lower().encode(), value=v.encode()) for n, v in headers],
        body=body, content_length=len(body) if body else -1)
    with grpc.insecure_channel(f"127.0.0.1:{stack.spec.wafsvc_ports[0]}") as channel:
        return waf_pb2_grpc.WafStub(channel).Evaluate(request, timeout=10)


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/", None),
    ("GET", SQLI, None),
    ("POST", "/comment", XSS_FORM),
])
def test_direct_grpc_call_gives_the_same_verdict(stack, method, path, body):
    headers = list(BROWSER)
    if body is not None:
        headers += [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", str(len(body)))]
    direct = _grpc_verdict(stack, path.encode(), method, headers, body or b"")
    through = http_request(stack.spec.frontend_port, method, path, headers=[h for h in headers if h[0] != "Content-Length"], body=body)
    assert through.status == (direct.status if direct.intervention else 200)
    assert through.rules == [m.id for m in direct.matches]


def test_gateway_finds_wafsvc_through_dns(haproxy_bin, tmp_path):
    """Compose and Kubernetes point the gateway at dns:///wafsvc:50051, every
    replica behind one name; here the name is localhost. Without a verdict
    the stack fails closed (503), so a broken resolver path cannot pass."""
    port = free_port()
    s = start_stack(tmp_path, haproxy_bin, wafsvc_ports=[port],
                    gateway_env={"GATEWAY_WAFSVC": f"dns:///localhost:{port}"})
    try:
        assert http_request(s.spec.frontend_port, headers=BROWSER).status == 200
        assert http_request(s.spec.frontend_port, path=SQLI, headers=BROWSER).status == 403
    finally:
        s.stop()
