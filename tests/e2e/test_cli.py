"""`modsec-spoa`, the console script `make install` puts in .venv/bin, end to
end against a running wafsvc: exit codes, table and JSON output, raw HTTP and
HAR input, and replay's per-rule summary."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest

from stack import free_port
from stack.processes import ROOT
from tests.e2e.wafsvc_only import start_wafsvc, target

CLI = ROOT / ".venv" / "bin" / "modsec-spoa"


@pytest.fixture(scope="module")
def waf(tmp_path_factory):
    if not CLI.exists():
        pytest.fail(f"{CLI} is missing: run make install")
    stack = start_wafsvc(tmp_path_factory.mktemp("cli"))
    yield target(stack)
    stack.stop()


def cli(*args: str, target_: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MODSEC_SPOA_TARGET", None)
    if target_:
        env["MODSEC_SPOA_TARGET"] = target_
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def test_blocked_request_exits_1_and_shows_the_rule(waf):
    run = cli("evaluate", "http://shop.example/search?q=attack", target_=waf)
    assert run.returncode == 1, run.stderr
    assert "BLOCKED" in run.stdout and "1001" in run.stdout and "attack marker" in run.stdout


def test_allowed_request_exits_0_with_json(waf):
    run = cli("evaluate", "http://shop.example/search?q=shoes", "-H", "X-Probe: probe", "--json", "--target", waf)
    assert run.returncode == 0, run.stderr
    verdict = json.loads(run.stdout)
    assert verdict["blocked"] is False and [m["id"] for m in verdict["matches"]] == [1002]


def test_method_headers_and_data(waf, tmp_path):
    assert cli("evaluate", "http://shop/form", "-d", "name=attack", target_=waf).returncode == 1
    assert cli("evaluate", "http://shop/form", "-X", "PUT", "-H", "Content-Type: text/plain", "-d", "fine",
               target_=waf).returncode == 0
    body = tmp_path / "body.bin"
    body.write_bytes(b"\x00\x01binary\nattack\n")
    run = cli("evaluate", "http://shop/upload", "--data-binary", f"@{body}", "-H",
              "Content-Type: application/octet-stream", "--json", target_=waf)
    assert run.returncode == 1 and json.loads(run.stdout)["matches"][0]["id"] == 1001


def test_raw_request_file(waf, tmp_path):
    raw = tmp_path / "request.http"
    raw.write_bytes(b"POST /login HTTP/1.1\r\nHost: shop\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                    b"Content-Length: 20\r\n\r\nuser=bob&pass=attack")
    assert cli("evaluate", "--raw", str(raw), target_=waf).returncode == 1


def _har(entries) -> dict:
    return {"log": {"version": "1.2", "entries": [{"request": e} for e in entries]}}


def test_har_file_and_entry(waf, tmp_path):
    har = tmp_path / "capture.har"
    har.write_text(json.dumps(_har([
        {"method": "GET", "url": "https://shop/?q=shoes", "httpVersion": "h2",
         "headers": [{"name": ":authority", "value": "shop"}, {"name": "accept", "value": "*/*"}]},
        {"method": "POST", "url": "https://shop/api", "httpVersion": "HTTP/1.1", "headers": [],
         "postData": {"mimeType": "text/plain", "text": base64.b64encode(b"an attack").decode(),
                      "encoding": "base64"}},
    ])))
    assert cli("evaluate", "--har", str(har), target_=waf).returncode == 0
    assert cli("evaluate", "--har", str(har), "--entry", "1", target_=waf).returncode == 1
    assert cli("evaluate", "--har", str(har), "--entry", "2", target_=waf).returncode == 2


def test_no_wafsvc_exits_3_and_bad_usage_exits_2(tmp_path):
    down = cli("evaluate", "http://shop/", "--deadline-ms", "2000", target_=f"127.0.0.1:{free_port()}")
    assert down.returncode == 3 and "WafUnavailable" in down.stderr
    assert cli("evaluate", target_="127.0.0.1:1").returncode == 2
    assert cli("evaluate", "not a url", target_="127.0.0.1:1").returncode == 2
    assert cli("evaluate", "http://shop/", "-H", "no colon", target_="127.0.0.1:1").returncode == 2


def test_replay_summarises_blocks_per_rule(waf, tmp_path):
    entries = []
    for i in range(120):
        query = "q=attack" if i % 4 == 0 else "q=shoes"
        headers = [{"name": "Host", "value": "shop"}] + ([{"name": "X-Probe", "value": "probe"}] if i % 3 == 0 else [])
        entries.append({"method": "GET", "url": f"http://shop/item/{i}?{query}", "headers": headers})
    har = tmp_path / "many.har"
    har.write_text(json.dumps(_har(entries)))
    run = cli("replay", str(har), "--json", target_=waf)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["requests"], summary["blocked"], summary["allowed"], summary["no_verdict"]) == (120, 30, 90, 0)
    rules = {r["id"]: r for r in summary["rules"]}
    assert rules[1001]["in_blocked"] == 30 and rules[1001]["in_allowed"] == 0
    # i % 12 == 0 carries both the probe header and the attack
    assert rules[1002]["in_blocked"] == 10 and rules[1002]["in_allowed"] == 30
    table = cli("replay", str(har), target_=waf)
    assert table.returncode == 0 and "120 requests: 90 allowed, 30 blocked" in table.stdout


def test_replay_of_url_lists_reports_requests_without_verdict(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("# a comment\nhttp://shop/?q=1\nhttp://shop/?q=2\n")
    run = cli("replay", str(urls), "--json", "--deadline-ms", "1500", target_=f"127.0.0.1:{free_port()}")
    assert run.returncode == 3
    assert json.loads(run.stdout)["no_verdict"] == 2
