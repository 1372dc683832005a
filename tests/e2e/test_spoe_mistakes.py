"""A wrong SPOE file never turns the WAF off (issue 18).

Each case takes the shipped deploy/haproxy/spoe-modsecurity.conf, makes one
mistake a user could make, and runs it under the shipped haproxy.cfg, whose
failure policy is closed, in front of a real gateway, wafsvc and CRS.
Benign requests and attacks alike must get 503, never a silent 200, and the
gateway's metric and warning must say what is wrong. The control case (the
file unchanged) proves the same harness does tell attacks from benign.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import os

import pytest

from stack import free_port
from stack.processes import HAPROXY_DIR
from tests.e2e.conftest import Scrape, http_request, start_stack, wait_for
from tests.e2e.extra_haproxy import start_haproxy

SHIPPED = (HAPROXY_DIR / "spoe-modsecurity.conf").read_text()
SQLI = "/?id=1%27%20or%20%271%27%3D%271"
XSS_FORM = b"comment=%3Cscript%3Ealert%28document.cookie%29%3C%2Fscript%3E"
BROWSER = [("Host", "www.example.com"), ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
           ("Accept", "text/html")]
FORM = BROWSER + [("Content-Type", "application/x-www-form-urlencoded")]


def _edit(old: str, new: str, count: int = 1):
    def apply(text: str) -> str:
        assert text.count(old) == count, f"{old!r} should appear {count} times in the shipped SPOE file"
        return text.replace(old, new)
    return apply


# name -> (the mistake, what the gateway counts: (message, problem, argument),
#          or None when HAProxy never asks the gateway and haproxy.cfg's own
#          fail-closed rule answers)
MISTAKES = {
    "message name misspelt": (_edit("check-request", "check-requests", 2),
                              ("check-requests", "unknown_message", "")),
    "uri misspelt url": (_edit("uri=url", "url=url"), ("check-request", "missing_argument", "uri")),
    "method misspelt": (_edit(" dst_port=dst_port method=method", " dst_port=dst_port meth=method"), ("check-request", "missing_argument", "method")),
    "headers left out": (_edit(" headers=req.hdrs_bin", ""), ("check-request", "missing_argument", "headers")),
    "body left out": (_edit(" body=req.body ", " "), ("check-request", "missing_argument", "body")),
    "headers as text (req.hdrs)": (_edit("headers=req.hdrs_bin", "headers=req.hdrs"),
                                   ("check-request", "bad_value", "headers")),
    "uri of the wrong type (src)": (_edit("uri=url", "uri=src"), ("check-request", "wrong_type", "uri")),
    "another var-prefix": (_edit("option var-prefix modsec", "option var-prefix waf"), None),
    "a backend event": (_edit("event on-frontend-http-request", "event on-backend-http-request"), None),
}
# Misspelt arguments: the unknown name is logged too, with its likely fix.
MISSPELT = {"uri misspelt url": ("url", "uri"), "method misspelt": ("meth", "method")}



@pytest.fixture(scope="module")
def stack(haproxy_bin, stack_logs):
    metrics = free_port()
    s = start_stack(stack_logs, haproxy_bin,
                    wafsvc_env={"CRS_DIR": "/usr/share/modsecurity-crs", "PARANOIA": "1", "MODE": "block"},
                    gateway_env={"GATEWAY_METRICS": f"127.0.0.1:{metrics}", "GATEWAY_FAILURE_POLICY": "closed"})
    s.scrape = lambda: Scrape(metrics)
    s.logs = stack_logs
    yield s
    s.stop()


def _haproxy_with(stack, tmp_path: pathlib.Path, spoe_text: str):
    spoe = tmp_path / "spoe-modsecurity.conf"
    spoe.write_text(spoe_text)
    return start_haproxy(stack, tmp_path, HAPROXY_DIR / "haproxy.cfg", spoe,
                         {"WAF_DEBUG_HEADERS": "1", "WAF_FAILURE_POLICY": "closed"})


def _three_requests(port: int):
    return [http_request(port, headers=BROWSER), http_request(port, path=SQLI, headers=BROWSER),
            http_request(port, "POST", "/comment", body=XSS_FORM, headers=FORM)]


def _gateway_warnings(stack) -> list[dict]:
    lines = (stack.logs / "gateway.log").read_text(errors="replace").splitlines()
    return [e for e in map(json.loads, (line for line in lines if line.startswith("{")))
            if e.get("level") == "warning"]


def test_control_the_shipped_file_tells_attacks_from_benign(stack, tmp_path):
    extra = _haproxy_with(stack, tmp_path, SHIPPED)
    try:
        wait_for(lambda: http_request(extra.spec.frontend_port, headers=BROWSER).status == 200, timeout=15,
                 what="a first verdict")
        assert [r.status for r in _three_requests(extra.spec.frontend_port)] == [200, 403, 403]
    finally:
        extra.stop()


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_wrong_spoe_file_gets_503_never_a_silent_200(stack, tmp_path, mistake):
    edit, counted = MISTAKES[mistake]
    before = stack.scrape()
    extra = _haproxy_with(stack, tmp_path, edit(SHIPPED))
    try:
        replies = _three_requests(extra.spec.frontend_port)
    finally:
        extra.stop()
    assert [r.status for r in replies] == [503, 503, 503], mistake
    assert all(r.failed for r in replies)
    after = stack.scrape()
    invalid = "modsec_gateway_invalid_messages_total"
    if counted is None:
        # HAProxy never got an answer it could use: haproxy.cfg fails closed.
        assert {r.headers.get("X-Waf-Error") for r in replies} == {"no answer from the WAF agent"}
        assert after.total(invalid) == before.total(invalid)
        return
    message, problem, argument = counted
    assert all(r.headers.get("X-Waf-Error", "").startswith("invalid SPOE message") for r in replies)
    labels = {"message": message, "problem": problem, "argument": argument}
    assert after.total(invalid, **labels) - before.total(invalid, **labels) == 3
    assert (after.total("modsec_gateway_failures_total", reason="invalid_message")
            - before.total("modsec_gateway_failures_total", reason="invalid_message")) == 3
    warned = wait_for(lambda: [w for w in _gateway_warnings(stack) if w.get("problem") == problem
                               and w.get("spoe_message") == message and w.get("argument") == argument],
                      what="the gateway's warning")
    assert "fix the SPOE file" in warned[0]["msg"] and warned[0]["fix"]
    if argument:
        assert f"{argument}=" in warned[0]["fix"] or argument in warned[0]["reason"]
    if mistake in MISSPELT:   # the misspelt name itself is logged, with the argument meant
        name, meant = MISSPELT[mistake]
        unknown = [w for w in _gateway_warnings(stack) if w.get("argument") == name]
        assert unknown[0]["msg"] == "SPOE argument unknown to the gateway; ignored"
        assert unknown[0]["fix"] == f"did you mean {meant!r}?"


def test_a_message_listed_but_not_defined_stops_haproxy_at_start(stack, tmp_path):
    """Misspelt in spoe-agent's 'messages' line only: HAProxy itself
    refuses the configuration, so nothing runs unprotected."""
    spoe = tmp_path / "spoe-modsecurity.conf"
    spoe.write_text(_edit("messages check-request", "messages check-requests")(SHIPPED))
    env = {**os.environ, "SPOE_CONF": str(spoe), "GATEWAY_ADDR": f"127.0.0.1:{free_port()}"}
    checked = subprocess.run([stack.spec.haproxy_bin, "-c", "-f", str(HAPROXY_DIR / "haproxy.cfg")],
                             env=env, capture_output=True, text=True, timeout=30)
    assert checked.returncode != 0
    assert "check-requests" in checked.stdout + checked.stderr
