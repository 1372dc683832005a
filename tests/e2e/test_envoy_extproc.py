"""What only ext_proc does: responses inspected on the request's own
transaction, and request bodies streamed to the engine chunk by chunk.
Real Envoy, real wafsvc with Debian's CRS at PL1, deploy/envoy/ext_proc.yaml
as shipped (request body STREAMED, response body BUFFERED) plus an Envoy in
BUFFERED request mode beside it."""

from __future__ import annotations

import base64
import json

import pytest

from stack.envoy import EnvoySpec, EnvoyStack
from tests.e2e.conftest import http_request
from tests.e2e.test_envoy import BROWSER, FORM, XSS_FORM

SQL_ERROR_PAGE = (b"<html><body><h1>Error</h1><p>You have an error in your SQL syntax; check the manual that "
                  b"corresponds to your MySQL server version for the right syntax to use near ''' at line 1</p>"
                  b"</body></html>")
BOUNDARY = "b0undary"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def envoy(tmp_path_factory):
    spec = EnvoySpec(envoy_filter="ext_proc", log_dir=tmp_path_factory.mktemp("envoy-extproc"),
                     wafsvc_env={"CRS_DIR": "/usr/share/modsecurity-crs", "PARANOIA": "1", "MODE": "block"})
    s = EnvoyStack(spec).start()
    buffered, _ = s.start_envoy("envoy-buffered", "ext_proc",
                                {"processing_mode": {"request_body_mode": "BUFFERED"}})
    s.wait_until_ready(buffered)
    s.buffered_port = buffered
    yield s
    codes = s.stop()
    assert all(code == 0 for code in codes.values()), codes


def reflect(envoy, body: bytes, content_type: str = "text/html"):
    spec = {"status": 200, "headers": {"Content-Type": content_type},
            "encodedBody": base64.b64encode(body).decode()}
    return http_request(envoy.spec.envoy_port, "POST", "/reflect",
                        headers=[*BROWSER, ("Content-Type", "application/json")], body=json.dumps(spec).encode())


def test_a_response_that_leaks_an_sql_error_is_replaced_by_a_403(envoy):
    reply = reflect(envoy, SQL_ERROR_PAGE)
    assert reply.status == 403
    assert b"SQL syntax" not in reply.body
    rules = reply.headers["x-waf-rules"].split()
    assert any(rule.startswith("951") for rule in rules), rules


def test_an_ordinary_page_passes_with_its_body(envoy):
    page = b"<html><body><p>Trail runners, light and grippy.</p></body></html>"
    reply = reflect(envoy, page)
    assert reply.status == 200
    assert reply.body == page


def upload(field: bytes, size: int = 5 * MIB) -> tuple[list, bytes]:
    """A multipart upload: a file of `size` bytes, then a form field."""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"shoe.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + b"Z" * size + \
        f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"comment\"\r\n\r\n".encode() + field + \
        f"\r\n--{BOUNDARY}--\r\n".encode()
    return [*BROWSER, ("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")], body


def test_a_5_mb_upload_with_an_attack_at_its_end_is_denied_in_streamed_mode(envoy):
    headers, body = upload(b"<script>alert(document.cookie)</script>")
    assert len(body) > 5 * MIB   # far past Envoy's 1 MiB buffer and HAProxy's 64 KiB
    reply = http_request(envoy.spec.envoy_port, "POST", "/upload", headers=headers, body=body, timeout=60)
    assert reply.status == 403
    assert "941100" in reply.headers["x-waf-rules"].split()


def test_the_same_upload_without_the_attack_passes(envoy):
    headers, body = upload(b"Lovely shoes, thanks")
    reply = http_request(envoy.spec.envoy_port, "POST", "/upload", headers=headers, body=body, timeout=60)
    assert reply.status == 200


def test_streamed_mode_fed_the_body_in_many_messages(envoy):
    stats = envoy.envoy_stats()
    # Two 5 MiB uploads cannot come in one message each: Envoy sent chunks
    # (about 1 MiB here), each answered before it went on.
    assert stats["http.web.ext_proc.stream_msgs_sent"] >= 2 * (1 + 5)
    assert stats["http.web.ext_proc.stream_msgs_sent"] == stats["http.web.ext_proc.stream_msgs_received"]
    assert stats["http.web.ext_proc.message_timeouts"] == 0


def test_buffered_mode_denies_an_attack_in_a_form_body(envoy):
    reply = http_request(envoy.buffered_port, "POST", "/comments", headers=[*BROWSER, FORM], body=XSS_FORM)
    assert reply.status == 403
    assert http_request(envoy.buffered_port, "POST", "/comments", headers=[*BROWSER, FORM],
                        body=b"comment=nice").status == 200
