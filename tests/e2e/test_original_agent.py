"""The original agent's haproxy.cfg and SPOE file keep blocking (issue 18).

Its users have a SPOE file with the message `modsecurity` (method, path,
query, reqver, ip, reqhdrs, reqbody, ignorerules) and a haproxy.cfg that
denies on `sess.modsec.intervention`. Both files are in original_agent/,
addresses adapted only, and run here unchanged in front of the gateway,
with real HAProxy (2.6 and 3.2), wafsvc and Debian's CRS at PL1.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.e2e.conftest import http_request, start_stack, wait_for
from tests.e2e.extra_haproxy import start_haproxy

ORIGINAL = pathlib.Path(__file__).resolve().parent / "original_agent"
SQLI = "/?id=1%27%20or%20%271%27%3D%271"
XSS_FORM = b"comment=%3Cscript%3Ealert%28document.cookie%29%3C%2Fscript%3E"
BROWSER = [("Host", "www.example.com"), ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
           ("Accept", "text/html,application/xhtml+xml"), ("Accept-Language", "en-GB,en;q=0.5")]
FORM = BROWSER + [("Content-Type", "application/x-www-form-urlencoded")]


def _first_verdict(port: int) -> None:
    """The original config fails open (no rule for a missing answer): wait
    until the agent answers before judging anything."""
    wait_for(lambda: http_request(port, path=SQLI, headers=BROWSER).status == 403, timeout=20,
             what="a first verdict through the original config")


@pytest.fixture(scope="module")
def stack(haproxy_bin, stack_logs):
    s = start_stack(stack_logs, haproxy_bin, haproxy_cfg=ORIGINAL / "haproxy.cfg",
                    spoe_conf=ORIGINAL / "modsec.conf",
                    wafsvc_env={"CRS_DIR": "/usr/share/modsecurity-crs", "PARANOIA": "1", "MODE": "block"})
    s.logs = stack_logs
    _first_verdict(s.spec.frontend_port)
    yield s
    s.stop()


def _blocks(stack) -> list[list[int]]:
    """The rule ids of every block wafsvc logged, oldest first."""
    lines = (stack.logs / "wafsvc1.log").read_text(errors="replace").splitlines()
    return [event["rules"] for event in map(json.loads, (line for line in lines if line.startswith("{")))
            if event.get("msg") == "request blocked"]


def _post(stack, body: bytes, port: int | None = None) -> tuple[int, list[int]]:
    """(status, rule ids of the block it caused, or [])."""
    before = len(_blocks(stack))
    status = http_request(port or stack.spec.frontend_port, "POST", "/comment", body=body, headers=FORM).status
    if status != 403:
        return status, []
    return status, wait_for(lambda: (_blocks(stack)[before:] or [None])[-1], what="wafsvc's block line")


def test_benign_get_passes(stack):
    assert http_request(stack.spec.frontend_port, headers=BROWSER).status == 200


def test_sqli_in_the_query_is_blocked(stack):
    assert http_request(stack.spec.frontend_port, path=SQLI, headers=BROWSER).status == 403


def _xss(rules: list[int]) -> bool:
    return any(941000 <= rule < 942000 for rule in rules)


@pytest.mark.parametrize("attempt", range(3))
def test_xss_in_a_form_body_is_blocked_never_passed_uninspected(stack, attempt):
    """Without option http-buffer-request, SPOE runs with whatever body
    HAProxy has read so far: all of it (the engine sees the XSS), or none
    yet (seen on 2.6 and 3.2 alike). Then Content-Length says the body was
    cut, and wafsvc denies it (rule 99010, WAF_TRUNCATED_BODY=block)."""
    status, rules = _post(stack, XSS_FORM)
    assert status == 403 and (_xss(rules) or rules == [99010]), rules


@pytest.mark.parametrize("attempt", range(3))
def test_a_benign_form_passes_or_is_refused_as_unseen(stack, attempt):
    assert _post(stack, b"comment=nice+shop") in ((200, []), (403, [99010]))


def test_with_http_buffer_request_added_every_body_is_inspected(stack, tmp_path):
    """The migration's first change (README): the body is always there."""
    original = (ORIGINAL / "haproxy.cfg").read_text()
    buffered = tmp_path / "haproxy.cfg"
    buffered.write_text(original.replace("    filter spoe", "    option http-buffer-request\n    filter spoe"))
    assert buffered.read_text().count("    option http-buffer-request\n") == 2
    extra = start_haproxy(stack, tmp_path, buffered, ORIGINAL / "modsec.conf")
    try:
        _first_verdict(extra.spec.frontend_port)
        for _ in range(3):
            assert _post(stack, b"comment=nice+shop", extra.spec.frontend_port) == (200, [])
            status, rules = _post(stack, XSS_FORM, extra.spec.frontend_port)
            assert status == 403 and _xss(rules) and 99010 not in rules, rules
    finally:
        extra.stop()


def test_ignored_rule_ids_are_honoured(stack):
    """The second frontend sets txn.ignorerules '942100 99999': its SQLi
    score stays below the threshold, and the removal does not leak."""
    assert http_request(stack.spec.frontend_alt_port, path=SQLI, headers=BROWSER).status == 200
    assert _post(stack, XSS_FORM, stack.spec.frontend_alt_port)[0] == 403
    assert http_request(stack.spec.frontend_port, path=SQLI, headers=BROWSER).status == 403


def test_a_pass_after_a_block_on_one_connection(stack):
    """sess.modsec.intervention lives on the connection: each verdict must
    overwrite it, or a kept-alive connection would keep the last answer."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", stack.spec.frontend_port, timeout=10)
    try:
        statuses = []
        for path in ("/", SQLI, "/", "/"):
            conn.request("GET", path, headers=dict(BROWSER))
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            if response.will_close:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", stack.spec.frontend_port, timeout=10)
        assert statuses == [200, 403, 200, 200]
    finally:
        conn.close()


def test_the_gateway_knows_every_original_argument(stack):
    log = (stack.logs / "gateway.log").read_text(errors="replace")
    assert "SPOE argument unknown" not in log and "SPOE message refused" not in log


def test_the_int_ne_1_deny_rule_behaves_like_eq_1(stack, tmp_path):
    """One published version denies with `-m int ne 1`. HAProxy 2.6 and 3.2
    parse `ne` as an operator but do not implement it: the ACL matches a
    value equal to 1. For the 0/1 this agent sets, it blocks as -m bool."""
    extra = start_haproxy(stack, tmp_path, ORIGINAL / "haproxy-int-ne.cfg", ORIGINAL / "modsec.conf")
    try:
        _first_verdict(extra.spec.frontend_port)
        assert http_request(extra.spec.frontend_port, headers=BROWSER).status == 200
        assert http_request(extra.spec.frontend_port, path=SQLI, headers=BROWSER).status == 403
    finally:
        extra.stop()


def test_the_truncation_flag_is_set_in_both_scopes_and_never_left_over(stack, tmp_path):
    """The original agent's message gets body_truncated like check-request
    (txn, unset when whole) and, like intervention, in the session scope:
    0 or 1 on every answer, so a kept-alive connection never shows an
    earlier request's value. A user who logs it adds the fields below."""
    import http.client
    original = (ORIGINAL / "haproxy.cfg").read_text()
    flagged = tmp_path / "haproxy.cfg"
    flagged.write_text(original.replace("global\n", "global\n    tune.bufsize 65536\n", 1).replace(
        "    filter spoe", "    option http-buffer-request\n"
        "    http-after-response set-header X-Sess-Cut %[var(sess.modsec.body_truncated)]\n"
        "    http-after-response set-header X-Txn-Cut %[var(txn.modsec.body_truncated)]\n    filter spoe"))
    extra = start_haproxy(stack, tmp_path, flagged, ORIGINAL / "modsec.conf")
    boundary = "----formdata7MA4YWxk"
    upload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
              f"Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8" + b"\x00\x10" * 60_000 + \
        f"\r\n--{boundary}--\r\n".encode()
    try:
        _first_verdict(extra.spec.frontend_port)
        conn = http.client.HTTPConnection("127.0.0.1", extra.spec.frontend_port, timeout=10)
        seen = []
        for body, content_type in ((upload, f"multipart/form-data; boundary={boundary}"),
                                   (b"comment=nice+shop", "application/x-www-form-urlencoded")):
            conn.request("POST", "/comment", body=body, headers=dict(BROWSER, **{"Content-Type": content_type}))
            response = conn.getresponse()
            response.read()
            seen.append((response.status, response.getheader("X-Sess-Cut"), response.getheader("X-Txn-Cut")))
            assert not response.will_close
        conn.close()
        assert seen == [(200, "1", "1"), (200, "0", "")]
    finally:
        extra.stop()
