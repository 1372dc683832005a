"""Bad HTTP through real HAProxy, gateway, wafsvc and CRS: every request gets
either a verdict or a clear error, in bounded time, and nothing with an
attack in it passes, wherever the attack hides (after the point where HAProxy
cuts the body, in a chunked body, in a part of a huge multipart body...).

Requests are raw bytes on a socket, so HAProxy sees exactly what a hostile
client would send. Outcomes are counted and printed per HAProxy version.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections import Counter

import grpc
import pytest

from stack import free_port
from tests.e2e.conftest import start_stack
from wafapi import waf_pb2, waf_pb2_grpc

TRUNCATED_RULE = 99010
SQLI = b"1' or '1'='1"
SQLI_QS = b"1%27%20or%20%271%27%3D%271"
REPLY_TIMEOUT_S = 15  # well past SPOE's 500 ms and the gateway's deadline: a hang fails

OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module")
def stack(haproxy_bin, stack_logs, request):
    OUTCOMES.clear()
    # The strict truncated-body policy (block): these tests check that no
    # uninspected byte gets through. The default (pass, flagged) is tested
    # in test_applications.py.
    s = start_stack(stack_logs, haproxy_bin, wafsvc_ports=[free_port()],
                    wafsvc_env={"CRS_DIR": "/usr/share/modsecurity-crs", "PARANOIA": "1", "MODE": "block",
                                "WAF_TRUNCATED_BODY": "block"})
    yield s
    s.stop()
    summary = (f"hostile input through {haproxy_bin}: {sum(OUTCOMES.values())} requests, "
               + ", ".join(f"{k}={v}" for k, v in sorted(OUTCOMES.items())))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:  # shown in `make test` output, not only with -s
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + summary)


class Outcome:
    def __init__(self, status: int, headers: http.client.HTTPMessage, seconds: float) -> None:
        self.status = status
        self.action = headers.get("X-Waf-Action") or ""
        self.rules = [int(x) for x in (headers.get("X-Waf-Rules") or "").split()]
        self.failed = headers.get("X-Waf-Failed") == "1"
        self.seconds = seconds

    @property
    def kind(self) -> str:
        if self.failed:
            return f"waf-failed-{self.status}"
        if self.action:
            return f"verdict-{self.action}-{self.status}"
        return f"haproxy-{self.status}" if self.status else "haproxy-closed"  # refused before SPOE

    def __repr__(self) -> str:
        return f"<{self.kind} rules={self.rules} {self.seconds:.2f}s>"


def send(stack, raw: bytes, name: str) -> Outcome:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", stack.spec.frontend_port), timeout=REPLY_TIMEOUT_S) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # HAProxy may answer and close before reading it all
        response = http.client.HTTPResponse(sock, method="GET")
        try:
            response.begin()
            response.read()
        except http.client.RemoteDisconnected:  # HAProxy closed on it without a word
            outcome = Outcome(0, http.client.HTTPMessage(), time.monotonic() - started)
            OUTCOMES["haproxy-closed"] += 1
            print(f"  {name}: closed without a response")
            return outcome
    outcome = Outcome(response.status, response.headers, time.monotonic() - started)
    OUTCOMES[outcome.kind] += 1
    print(f"  {name}: {outcome}")
    return outcome


def request(method: str = "GET", target: bytes = b"/", headers: list[tuple[bytes, bytes]] = (),
            body: bytes | None = None, chunked: int = 0) -> bytes:
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: hostile.example", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if body is not None and chunked:
        lines.append(b"Transfer-Encoding: chunked")
        encoded = b"".join(b"%x\r\n" % len(body[i:i + chunked]) + body[i:i + chunked] + b"\r\n"
                           for i in range(0, len(body), chunked)) + b"0\r\n\r\n"
        return b"\r\n".join(lines) + b"\r\n\r\n" + encoded
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


FORM = [(b"Content-Type", b"application/x-www-form-urlencoded")]


def assert_not_passed(outcome: Outcome) -> None:
    """An attack was in there: a deny verdict or an error, never a 200."""
    assert outcome.status != 200 and outcome.status < 500 or outcome.failed, outcome


# -- many and large things ----------------------------------------------------

@pytest.mark.parametrize("count", [90, 5000])
def test_many_headers(stack, count):
    headers = [(b"X-H%d" % i, b"v") for i in range(count)]
    outcome = send(stack, request(headers=headers), f"{count} headers")
    if count < 101:  # HAProxy's tune.http.maxhdr: up to 101 headers, else its own 400
        assert outcome.kind == "verdict-pass-200", outcome
    else:
        assert outcome.kind == "haproxy-400", outcome


@pytest.mark.parametrize("size", [4000, 30000, 70000])
def test_large_header_value(stack, size):
    outcome = send(stack, request(headers=[(b"X-Big", b"a" * size)]), f"header of {size} bytes")
    if size <= 30000:
        assert outcome.kind == "verdict-pass-200", outcome
    else:  # more than fits HAProxy's buffer: its own 400 (or 431), never a pass
        assert outcome.kind in ("haproxy-400", "haproxy-431"), outcome


def test_attack_in_a_large_header_is_seen(stack):
    outcome = send(stack, request(headers=[(b"X-Pad", b"a" * 20000), (b"Referer", b"http://x/?id=" + SQLI)]),
                   "SQLi after a 20 kB header")
    assert outcome.status == 403 and 942100 in outcome.rules, outcome


def test_thousands_of_query_arguments(stack):
    target = b"/?" + b"&".join(b"a%d=%d" % (i, i) for i in range(3000))
    outcome = send(stack, request(target=target), "3000 query arguments")
    # SecArgumentsLimit 1000 + rule 200007 (rules/modsecurity.conf): refused, clearly.
    assert outcome.status == 400 and 200007 in outcome.rules, outcome


def test_thousands_of_form_arguments_with_an_attack_at_the_end(stack):
    body = b"&".join(b"f%d=x" % i for i in range(3000)) + b"&q=" + SQLI_QS
    outcome = send(stack, request("POST", b"/form", FORM, body), "3000 form arguments + SQLi")
    assert_not_passed(outcome)


def test_many_cookies(stack):
    cookie = b"; ".join(b"c%d=v" % i for i in range(500))
    outcome = send(stack, request(headers=[(b"Cookie", cookie)]), "500 cookies")
    assert outcome.action in ("pass", "deny"), outcome


# -- bytes that are not text ----------------------------------------------------

def test_nul_and_invalid_utf8_percent_encoded_in_uri(stack):
    outcome = send(stack, request(target=b"/p%00a%ff%fe?q=%c3%28%00"), "%00 and invalid UTF-8 in URI")
    assert outcome.action in ("pass", "deny"), outcome  # a verdict either way


def test_raw_invalid_utf8_in_uri(stack):
    outcome = send(stack, request(target=b"/\xff\xfe?q=\xc3\x28"), "raw invalid UTF-8 in URI")
    # HAProxy refuses raw non-ASCII in the request line unless told otherwise.
    assert outcome.kind == "haproxy-400" or outcome.action, outcome


def test_raw_nul_in_header_value_is_refused(stack):
    outcome = send(stack, request(headers=[(b"X-Nul", b"a\x00b")]), "raw NUL in a header")
    # HAProxy 3.x refuses it; 2.6 lets it through and CRS denies it (920270).
    assert outcome.kind == "haproxy-400" or (outcome.status == 403 and 920270 in outcome.rules), outcome


def test_invalid_utf8_in_header_value_gets_a_verdict(stack):
    outcome = send(stack, request(headers=[(b"X-Bin", b"\xff\xfe\xc3\x28\x80")]), "invalid UTF-8 in a header")
    assert outcome.action in ("pass", "deny"), outcome


def test_attack_next_to_invalid_utf8_in_a_header(stack):
    outcome = send(stack, request(headers=[(b"Referer", b"http://x/\xff\xfe?id=" + SQLI)]),
                   "SQLi beside invalid UTF-8")
    assert outcome.status == 403 and 942100 in outcome.rules and not outcome.failed, outcome


def test_binary_body_with_nul_and_invalid_utf8(stack):
    body = b"a=\x00\xff\xfe&b=" + bytes(range(256))
    outcome = send(stack, request("POST", b"/form", FORM, body), "binary form body")
    assert outcome.action in ("pass", "deny"), outcome


# -- multipart and chunked ------------------------------------------------------

def _multipart(parts: int, last: bytes) -> bytes:
    chunks = [b"--B\r\nContent-Disposition: form-data; name=\"p%d\"\r\n\r\nv\r\n" % i for i in range(parts)]
    chunks.append(b"--B\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\n" + last + b"\r\n--B--\r\n")
    return b"".join(chunks)


def test_multipart_with_many_parts_and_an_attack_in_the_last(stack):
    body = _multipart(800, SQLI)
    outcome = send(stack, request("POST", b"/upload", [(b"Content-Type", b"multipart/form-data; boundary=B")], body),
                   f"multipart, 801 parts ({len(body)} bytes)")
    assert_not_passed(outcome)


def test_chunked_body_is_inspected(stack):
    outcome = send(stack, request("POST", b"/form", FORM, b"q=" + SQLI_QS, chunked=3),
                   "chunked SQLi, 3-byte chunks")
    assert outcome.status == 403 and 942100 in outcome.rules, outcome


def test_chunked_benign_body_passes(stack):
    outcome = send(stack, request("POST", b"/form", FORM, b"a=" + b"b" * 30000, chunked=1000),
                   "chunked 30 kB benign")
    assert outcome.kind == "verdict-pass-200", outcome


# -- bodies longer than HAProxy hands to SPOE ------------------------------------

@pytest.mark.parametrize("chunked", [0, 4096], ids=["content-length", "chunked"])
def test_attack_past_the_buffer_is_not_passed(stack, chunked):
    """HAProxy hands SPOE about 64 kB of body (tune.bufsize 65536). An attack
    past that point is never inspected: under WAF_TRUNCATED_BODY=block the
    request must be denied as truncated (99010), never let through."""
    body = b"a=" + b"b" * 80000 + b"&q=" + SQLI_QS
    outcome = send(stack, request("POST", b"/form", FORM, body, chunked=chunked),
                   f"SQLi after 80 kB, {'chunked' if chunked else 'content-length'}")
    assert outcome.status == 403 and TRUNCATED_RULE in outcome.rules, outcome


@pytest.mark.parametrize("size", [60000, 63000, 64300, 64500, 200000])
def test_bodies_around_the_buffer_size(stack, size):
    body = b"a=" + b"b" * (size - 2)
    outcome = send(stack, request("POST", b"/form", FORM, body), f"{size}-byte form body")
    # Whatever the size: a verdict (pass, 403 truncated, 400 over
    # SecRequestBodyNoFilesLimit) or fail-closed 503, and never a hang.
    assert outcome.action or outcome.status == 503, outcome
    if size > 65536:
        assert outcome.status == 403 and TRUNCATED_RULE in outcome.rules, outcome


# -- smuggling-shaped requests ---------------------------------------------------

def test_content_length_and_transfer_encoding_together(stack):
    body = b"q=" + SQLI_QS
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    raw = (b"POST /form HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\n"
           b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    outcome = send(stack, raw, "CL + TE with SQLi in the chunked body")
    # HAProxy drops Content-Length and uses the chunks, the body the backend sees too.
    assert_not_passed(outcome)


def test_conflicting_content_lengths_are_refused(stack):
    raw = (b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n"
           b"Content-Length: 30\r\n\r\nabc")
    outcome = send(stack, raw, "two different Content-Lengths")
    assert outcome.kind in ("haproxy-400", "haproxy-closed"), outcome


def test_outcomes_were_counted(stack):
    assert sum(OUTCOMES.values()) >= 20


# -- wafsvc's own request size limit ------------------------------------------

def test_grpc_request_over_the_size_limit_gets_a_clear_error(stack):
    """WAF_MAX_REQUEST_BYTES (4 MiB default) bounds what one call may carry."""
    request_ = waf_pb2.EvaluateRequest(method="POST", uri=b"/", client_ip="10.0.0.1",
                                       body=b"x" * (5 * 1024 * 1024))
    with grpc.insecure_channel(f"127.0.0.1:{stack.spec.wafsvc_ports[0]}",
                               options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        with pytest.raises(grpc.RpcError) as info:
            waf_pb2_grpc.WafStub(channel).Evaluate(request_, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (info.value.details() or "")
