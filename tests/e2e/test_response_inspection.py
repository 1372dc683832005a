"""Response inspection through HAProxy (issue 13): the shipped haproxy.cfg
and SPOE file, real gateway, wafsvc with CRS v4 and the demo backend's leak
pages, on HAProxy 2.6 and 3.2.

Frontend `web` opts in (txn.modsec.inspect_response); `web-lenient` does not,
so the same pages show what happens without it.
"""

from __future__ import annotations

import os
import pathlib
import time
import uuid

import pytest

from stack import free_port
from tests.e2e.conftest import Scrape, http_request, start_stack, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]
BROWSER = [("Host", "shop.example.com"), ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
           ("Accept", "text/html")]
SQLI = "/?id=1%27%20or%20%271%27%3D%271"
LEAKS = {  # the demo backend's page -> the CRS rule that catches it
    "/leaks/sql-error": 951230,
    "/leaks/directory-listing": 950130,
    "/leaks/php-source": 953120,
}


def crs_dir() -> str:
    for candidate in (os.environ.get("CRS_DIR", ""), str(ROOT.parent / "shared" / "crs" / "v4.28.0"),
                      "/work/shared/crs/v4.28.0"):
        if candidate and os.path.isfile(os.path.join(candidate, "rules", "RESPONSE-951-DATA-LEAKAGES-SQL.conf")):
            return candidate
    pytest.fail("CRS v4 not found beside the checkout (../shared/crs/v4.28.0) nor in CRS_DIR")



@pytest.fixture(scope="module")
def stack(haproxy_bin, stack_logs):
    gateway_metrics, waf_metrics = free_port(), free_port()
    s = start_stack(stack_logs, haproxy_bin, wafsvc_workers=2, wafsvc_metrics_ports=[waf_metrics],
                    wafsvc_env={"CRS_DIR": crs_dir(), "PARANOIA": "1", "MODE": "block"},
                    gateway_env={"GATEWAY_METRICS": f"127.0.0.1:{gateway_metrics}"})
    s.gateway = lambda: Scrape(gateway_metrics)
    s.waf = lambda: Scrape(waf_metrics)
    yield s
    s.stop()


def _get(port: int, path: str, method: str = "GET"):
    return http_request(port, method, path, headers=BROWSER)


def _response_rules(reply) -> list[int]:
    return [int(x) for x in (reply.headers.get("X-Waf-Response-Rules") or "").split()]


@pytest.mark.parametrize("path", sorted(LEAKS))
def test_a_leaking_page_is_blocked_where_responses_are_inspected(stack, path):
    reply = _get(stack.spec.frontend_port, path)
    assert reply.status == 403, (reply.status, dict(reply.headers))
    assert reply.headers["X-Waf-Response-Action"] == "deny"
    rules = _response_rules(reply)
    assert LEAKS[path] in rules and 959100 in rules   # the leak, then the outbound anomaly score
    assert b"hunter2" not in reply.body and b"SQL syntax" not in reply.body and b"Index of" not in reply.body
    assert not reply.failed and reply.headers.get("X-Waf-Response-Failed") is None


@pytest.mark.parametrize("path", sorted(LEAKS))
def test_the_same_page_passes_where_the_frontend_did_not_opt_in(stack, path):
    reply = _get(stack.spec.frontend_alt_port, path)
    assert reply.status == 200 and reply.body     # web-lenient: nothing kept, nothing sent
    assert reply.headers.get("X-Waf-Response-Action") is None and reply.headers.get("X-Waf-Rules") is not None


def test_benign_pages_and_answers_without_a_body_pass(stack):
    for method, path in (("GET", "/"), ("GET", "/capabilities"), ("HEAD", "/leaks/sql-error")):
        reply = _get(stack.spec.frontend_port, path, method)
        # HEAD: the Content-Length of a body that is never sent is no truncation.
        assert reply.status == 200, (method, path, dict(reply.headers))
        assert reply.headers["X-Waf-Response-Action"] == "pass" and not _response_rules(reply)


def test_a_request_the_waf_blocks_sends_no_response(stack):
    before = stack.gateway()
    reply = _get(stack.spec.frontend_port, SQLI)
    assert reply.status == 403 and 942100 in reply.rules
    assert reply.headers.get("X-Waf-Response-Action") is None
    after = stack.gateway()
    assert after.total("modsec_gateway_pool_responses_total") == before.total("modsec_gateway_pool_responses_total")
    assert (after.total("modsec_gateway_evaluations_total", verdict="block")
            - before.total("modsec_gateway_evaluations_total", verdict="block")) == 1


def _cut(reply) -> bool:
    """txn.modsec.res_body_truncated, through the debug header; unset (never 0) when whole."""
    assert reply.headers.get("X-Waf-Response-Body-Truncated") in (None, "1")
    return reply.headers.get("X-Waf-Response-Body-Truncated") == "1"


def _log_line(stack, path: str) -> str:
    def line():
        log = (stack.spec.log_dir / "haproxy.log").read_text(errors="replace")
        return next((text for text in log.splitlines() if f'"GET {path} ' in text), None)
    return wait_for(line, what=f"HAProxy's log line for {path}")


def test_a_response_body_past_the_buffer_is_flagged_like_a_request_body(stack):
    # 200 kB of text: HAProxy buffers tune.bufsize (64 KiB) of it; the rest
    # is never inspected, which is flagged (99011, res_body_truncated) and,
    # under the default WAF_TRUNCATED_RESPONSE_BODY=pass, let through.
    path = f"/large/200000?run={uuid.uuid4().hex}"
    reply = _get(stack.spec.frontend_port, path)
    assert reply.status == 200 and len(reply.body) == 200000
    assert reply.headers["X-Waf-Response-Action"] == "pass" and 99011 in _response_rules(reply) and _cut(reply)
    assert reply.headers.get("X-Waf-Body-Truncated") is None          # the request's own flag: its body was whole
    assert " res_body_truncated=1" in _log_line(stack, path)
    path = f"/large/20000?run={uuid.uuid4().hex}"
    fits = _get(stack.spec.frontend_port, path)      # inspected whole
    assert fits.status == 200 and 99011 not in _response_rules(fits) and not _cut(fits)
    assert " res_body_truncated=-" in _log_line(stack, path)


@pytest.mark.parametrize("path", sorted(LEAKS))
def test_a_leak_in_the_first_part_of_a_large_page_is_still_blocked(stack, path):
    reply = _get(stack.spec.frontend_port, f"{path}?pad=200000")
    assert reply.status == 403 and reply.headers["X-Waf-Response-Action"] == "deny", _response_rules(reply)
    rules = _response_rules(reply)
    assert LEAKS[path] in rules and 99011 in rules and _cut(reply)


def _settled_waf(stack) -> Scrape:
    """wafsvc's workers write their counts every 0.25 s: wait until the
    earlier tests' have landed."""
    previous = None
    while True:
        scrape = stack.waf()
        total = scrape.total("modsec_waf_response_evaluations_total")
        if total == previous:
            return scrape
        previous = total
        time.sleep(0.6)


def test_response_verdicts_are_counted_by_verdict(stack):
    gateway0, waf0 = stack.gateway(), _settled_waf(stack)
    assert _get(stack.spec.frontend_port, "/").status == 200
    assert _get(stack.spec.frontend_port, "/leaks/php-source").status == 403

    def moved(after, before, name, **labels):
        return after.total(name, **labels) - before.total(name, **labels)

    gateway = stack.gateway()
    assert moved(gateway, gateway0, "modsec_gateway_response_evaluations_total", verdict="pass") == 1
    assert moved(gateway, gateway0, "modsec_gateway_response_evaluations_total", verdict="block") == 1
    assert moved(gateway, gateway0, "modsec_gateway_rule_matches_total", rule_id="953120", outcome="blocked") == 1
    assert moved(gateway, gateway0, "modsec_gateway_response_misses_total") == 0
    waf = wait_for(lambda: (lambda s: s if moved(s, waf0, "modsec_waf_response_evaluations_total") == 2 else None)(
        stack.waf()), what="wafsvc to count both responses")
    assert moved(waf, waf0, "modsec_waf_response_evaluations_total", verdict="block") == 1
