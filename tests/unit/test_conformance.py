"""The conformance runner's pure parts: go-ftw loading, request bytes,
judging, overrides. No sockets."""

from __future__ import annotations

import pathlib
import textwrap

import pytest

from conformance import rawhttp
from conformance.ftw import FormatError, StageInput, StageOutput, expand_template, load_tests, parse_input
from conformance.judge import FAIL, PASS, SKIP, Observation, combine, judge
from conformance.overrides import load_overrides


def test_go_ftw_defaults_and_header_order():
    inp = parse_input({"headers": {"Host": "h", "B": "2", "A": "1"}, "data": "x=1"}, "t")
    assert (inp.method, inp.uri, inp.version) == ("GET", "/", "HTTP/1.1")
    raw = rawhttp.build_request(inp)
    assert raw == (b"GET / HTTP/1.1\r\nHost: h\r\nB: 2\r\nA: 1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                   b"Content-Length: 3\r\nConnection: close\r\n\r\nx=1")


def test_no_autocompletion_sends_exactly_the_given_headers_and_empty_fields():
    inp = parse_input({"version": "", "headers": {"Host": "h"}, "data": "abc", "autocomplete_headers": False}, "t")
    assert rawhttp.build_request(inp) == b"GET / \r\nHost: h\r\n\r\nabc"


def test_data_is_sent_as_utf8_like_go_and_templates_expand():
    assert parse_input({"data": "\xe9"}, "t").data == b"\xc3\xa9"
    assert expand_template('a{{ "xy" | repeat 3 }}b') == "axyxyxyb"
    with pytest.raises(FormatError):
        expand_template("{{ now }}")


def test_encoded_request_is_sent_as_is():
    inp = parse_input({"encoded_request": "R0VUIC8gSFRUUC8xLjENCg0K", "uri": "/ignored"}, "t")
    assert rawhttp.build_request(inp) == b"GET / HTTP/1.1\r\n\r\n"


def test_parse_request_for_the_in_process_engine():
    req = rawhttp.parse_request(b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nokEXTRA")
    assert (req.method, req.uri, req.version, req.body) == ("POST", "/a?b=1", "1.1", b"ok")
    assert req.headers == [(b"Host", b"x"), (b"Content-Length", b"2")]
    chunked = rawhttp.parse_request(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n")
    assert chunked.body == b"ab"


def test_judge_checks_everything_present_and_skips_what_it_cannot_see():
    out = StageOutput(expect_ids=(1,), no_expect_ids=(2,), status=(200,))
    assert judge(out, Observation([1], status=200)).result == PASS
    assert judge(out, Observation([1, 2], status=200)).result == FAIL
    assert judge(out, Observation([1], status=403)).result == FAIL
    # In-process: no status; the id checks are judged, the status is not.
    assert judge(out, Observation([1], status=None)).result == PASS
    assert judge(StageOutput(status=(400,)), Observation([], status=None)).result == SKIP
    # The stack has no log text: a regex-only test is skipped, never passed.
    assert judge(StageOutput(match_regex="x"), Observation([1], status=200)).result == SKIP
    assert judge(StageOutput(match_regex=r'\[id "1"\]'), Observation([1], log_text='[id "1"]')).result == PASS
    assert judge(StageOutput(expect_ids=(1,)), Observation(error="reset")).result == FAIL
    assert judge(StageOutput(expect_error=True), Observation(error="reset")).result == PASS
    assert judge(StageOutput(expect_error=True), Observation(status=400)).result == FAIL
    # HAProxy answered itself: "no rule matched" is not judged, a status is.
    assert judge(StageOutput(no_expect_ids=(1,)), Observation([], status=400, reached_waf=False)).result == SKIP
    assert judge(StageOutput(status=(400,), no_expect_ids=(1,)),
                 Observation([], status=400, reached_waf=False)).result == PASS
    assert judge(StageOutput(expect_ids=(1,)), Observation([], status=400, reached_waf=False)).result == FAIL
    assert combine([judge(out, Observation([1], status=200)), judge(StageOutput(), Observation())]).result == PASS


def test_overrides_need_a_reason_and_a_category(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("test_overrides:\n  - {rule_id: 1, test_ids: [2], category: engine}\n")
    with pytest.raises(FormatError, match="reason"):
        load_overrides(path)
    path.write_text("test_overrides:\n  - {rule_id: 1, test_ids: [2], category: engine, reason: r,"
                    " haproxy_versions: ['3.2'], output: {status: 400}}\n")
    assert load_overrides(path, "2.6.12") == {}
    assert load_overrides(path, "3.2.26")["1-2"].output.status == (400,)


def test_layout_is_the_contract(tmp_path):
    (tmp_path / "REQUEST-1-X").mkdir()
    (tmp_path / "REQUEST-1-X" / "1.yaml").write_text(textwrap.dedent("""
        rule_id: 1
        tests:
          - test_id: 1
            stages: [{input: {uri: /}, output: {log: {expect_ids: [1]}}}]
          - test_id: 2
            stages: [{input: {data: "{{ unknown }}"}, output: {log: {expect_ids: [1]}}}]
        """))
    (tmp_path / "REQUEST-1-X" / "placeholder.yaml").write_text("# all commented out\n")
    tests = load_tests(tmp_path)
    assert [(t.key, t.rule_file) for t in tests] == [("1-1", "REQUEST-1-X"), ("1-2", "REQUEST-1-X")]
    assert "unsupported go-ftw template" in tests[1].load_error  # fails alone, hides nothing
    with pytest.raises(FormatError):
        load_tests(tmp_path / "REQUEST-1-X")


def test_shipped_overrides_file_loads():
    overrides = load_overrides(pathlib.Path(__file__).parents[2] / "conformance" / "overrides.yaml", "2.6.12")
    assert overrides and all(o.reason and o.category for o in overrides.values())


# -- albedo's answers, for the in-process response phases ---------------------------

@pytest.mark.parametrize("body,content_type", [
    (b"ViewStateException: Invalid viewstate detected.", "text/plain; charset=utf-8"),
    (b"  <html><head><title>x</title>", "text/html; charset=utf-8"),
    (b"<!-- Simple PHP backdoor -->", "text/html; charset=utf-8"),
    (b"<h1>.:NCC:. Shell v", "text/html; charset=utf-8"),
    (b"<?php echo 1; ?>", "text/plain; charset=utf-8"),     # not markup Go knows: text
    (b"<?xml version='1.0'?><a/>", "text/xml; charset=utf-8"),
    (b"<htmlx>", "text/plain; charset=utf-8"),             # a signature needs a space or '>' after it
    (b"\x00\x01binary", "application/octet-stream"),
])
def test_albedo_sniffs_content_types_like_go(body, content_type):
    from conformance.albedo import detect_content_type
    assert detect_content_type(body) == content_type
    # The demo backend (a standalone script in its image) sniffs the same way.
    import importlib.util
    spec = importlib.util.spec_from_file_location("demo_albedo", pathlib.Path(__file__).parents[2] / "deploy"
                                                  / "backend" / "albedo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.detect_content_type(body) == content_type


def test_albedo_reflects_the_spec_and_refuses_bad_ones():
    from conformance.albedo import respond
    reply = respond("POST", "/reflect", b'{"status": 503, "headers": {"X-A": "1"}, "body": "<p>down</p>"}')
    assert reply.status == 503 and reply.body == b"<p>down</p>"
    assert (b"X-A", b"1") in reply.headers and (b"Content-Type", b"text/html; charset=utf-8") in reply.headers
    assert respond("POST", "/reflect", b'{"encodedBody": "aGk="}').body == b"hi"
    assert respond("POST", "/reflect", b'{"body": "x", "headers": {"Content-Type": "image/png"}}').headers[0] == \
        (b"Content-Type", b"image/png")
    bad = respond("POST", "/reflect", b"<%- sidebar.id %>")
    assert (bad.status, bad.body) == (400, b"Invalid JSON in request body")
    assert respond("POST", "/reflect", b'{"status": 99}').status == 400
    assert respond("POST", "/post", b"anything").body == b""
    assert respond("GET", "/reflect", b"").status == 200   # only POST reflects
