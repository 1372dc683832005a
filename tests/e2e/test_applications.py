"""One agent, several sites: make up's applications (deploy/wafsvc/apps.yaml)
behind one HAProxy that picks them by Host (deploy/haproxy/apps.map), with
Debian's CRS, two wafsvc workers, HAProxy 2.6 and 3.2. Then what large
bodies get by default, reloads of the applications file under load, unknown
applications both ways, and validation."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import uuid
from xml.sax.saxutils import escape

import grpc
import pytest

from stack import free_port
from stack.load import Load
from stack.processes import APPS_MAP, DEBIAN_CRS, DEMO_APPS, ROOT
from tests.e2e.conftest import Reply, http_request, start_stack, wait_for
from wafapi import waf_pb2, waf_pb2_grpc

SQLI = "/?id=1%27%20or%20%271%27%3D%271"
BROWSER = [("User-Agent", "Mozilla/5.0 (X11; Linux x86_64)"), ("Accept", "text/html"),
           ("Accept-Language", "en")]
BOUNDARY = "----formdata7MA4YWxk"
ATTACK = b"1' or '1'='1' union select password from users --"
WORKERS = 2


@pytest.fixture(scope="module")
def sites(haproxy_bin, stack_logs):
    """make up's three applications, from copies of its files that the
    reload tests rewrite (and restore)."""
    apps = stack_logs / "apps.yaml"
    shutil.copy(DEMO_APPS, apps)
    host_map = stack_logs / "apps.map"
    host_map.write_text(APPS_MAP.read_text() + "news.localhost news\ngone.localhost gone\n")
    s = start_stack(stack_logs, haproxy_bin, wafsvc_ports=[free_port()], wafsvc_workers=WORKERS,
                    wafsvc_env={"CRS_DIR": DEBIAN_CRS, "PARANOIA": "1", "WAF_CONFIG": str(apps)},
                    haproxy_env={"APPS_MAP": str(host_map)})
    s.apps_file = apps
    yield s
    s.stop()


def get(stack, host: str, path: str = SQLI, port: int | None = None) -> Reply:
    return http_request(port or stack.spec.frontend_port, path=path, headers=[("Host", host)] + BROWSER)


def wafsvc_log(stack) -> str:
    return (stack.spec.log_dir / "wafsvc1.log").read_text(errors="replace")


def log_lines(stack, message: str) -> list[dict]:
    lines = []
    for line in wafsvc_log(stack).splitlines():
        if line.startswith("{") and f'"msg": "{message}"' in line:
            lines.append(json.loads(line))
    return lines


def reload_wafsvc(stack, text: str) -> None:
    """Writes the applications file (atomically, as docs/rules.md says), sends
    SIGHUP and waits until the supervisor and every worker have reloaded."""
    before = len(log_lines(stack, "rules reloaded"))
    staged = stack.apps_file.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, stack.apps_file)
    os.kill(stack.proc("wafsvc1").pid, signal.SIGHUP)
    wait_for(lambda: len(log_lines(stack, "rules reloaded")) >= before + 1 + WORKERS, timeout=30,
             what="the supervisor and every worker reloaded")


# -- several sites ------------------------------------------------------------------

def test_the_same_attack_is_blocked_on_the_shop_and_only_logged_on_the_blog(sites):
    shop, blog = get(sites, "shop.localhost"), get(sites, "blog.localhost")
    assert shop.status == 403 and 942100 in shop.rules and not shop.failed
    assert blog.status == 200 and blog.rules == shop.rules and not blog.failed
    assert blog.headers["X-Waf-Action"] == "pass"
    # A Host with a port, or in capitals, is the same site.
    assert get(sites, "Blog.Localhost:8080").status == 200
    assert get(sites, "shop.localhost:443").status == 403
    # wafsvc logs the blog's matches (detection only) with its application.
    logged = wait_for(lambda: [line for line in log_lines(sites, "request matched, not blocked (detect mode)")
                               if line["app"] == "blog"], what="the blog's matches logged")
    assert 942100 in logged[0]["rules"]
    blocked = [line["app"] for line in log_lines(sites, "request blocked")]
    assert "shop" in blocked and "blog" not in blocked
    # HAProxy's own line carries the rules too.
    haproxy_log = (sites.spec.log_dir / "haproxy.log").read_text(errors="replace")
    assert re.search(r' 200 .* waf=pass .*rules="[^"]*942100', haproxy_log)


def test_any_other_host_and_the_per_frontend_application_behave_as_before(sites):
    assert get(sites, "www.example.com").status == 403
    assert get(sites, "www.example.com", "/").status == 200
    # :8081 names its application for the whole frontend and ignores 942100.
    lenient = get(sites, "blog.localhost", port=sites.spec.frontend_alt_port)
    assert lenient.status == 200 and 942100 not in lenient.rules


def test_an_unknown_application_is_judged_by_the_default_one(sites):
    """gone.localhost maps to "gone", which wafsvc does not have:
    unknown_application: default judges it with the default (blocking)."""
    reply = get(sites, "gone.localhost")
    assert reply.status == 403 and 942100 in reply.rules and not reply.failed
    assert get(sites, "gone.localhost", "/").status == 200


def test_list_applications_answers_what_the_file_says(sites):
    with grpc.insecure_channel(f"127.0.0.1:{sites.spec.wafsvc_ports[0]}") as channel:
        reply = waf_pb2_grpc.WafStub(channel).ListApplications(waf_pb2.ListApplicationsRequest(), timeout=10)
    apps = {app.name: app for app in reply.applications}
    assert list(apps) == ["default", "shop", "blog"] and reply.unknown_application == "default"
    assert apps["default"].is_default and not apps["shop"].is_default
    assert (apps["shop"].mode, apps["blog"].mode) == ("block", "detect")
    assert apps["shop"].truncated_body == "pass" and apps["shop"].truncated_response_body == "pass"
    assert apps["shop"].rules == apps["blog"].rules > 800


# -- large bodies, under the default policy ---------------------------------------

def multipart(*parts: tuple[str, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += (b"Content-Type: image/jpeg\r\n" if filename else b"") + b"\r\n" + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def photo(size: int) -> bytes:
    return os.urandom(size).replace(b"--", b"-x").replace(b"\r\n", b"\rx")


def post(stack, host: str, body: bytes, content_type: str, chunked: bool = False, path: str = "/upload") -> Reply:
    headers = [("Host", host), *BROWSER, ("Content-Type", content_type)]
    return http_request(stack.spec.frontend_port, "POST", path, headers, body, timeout=60,
                        chunk_size=16384 if chunked else 0)


def haproxy_line(stack, path: str) -> str:
    """HAProxy's log line for the one request to `path`."""
    def line():
        log = (stack.spec.log_dir / "haproxy.log").read_text(errors="replace")
        return next((text for text in log.splitlines() if f'"POST {path} ' in text), None)
    return wait_for(line, what=f"HAProxy's log line for {path}")


def truncated(reply: Reply) -> bool:
    """txn.modsec.body_truncated, through the debug header; never 0: unset when whole."""
    assert reply.headers.get("X-Waf-Body-Truncated") in (None, "1")
    return reply.headers.get("X-Waf-Body-Truncated") == "1"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_clean_2_mb_upload_passes_flagged(sites, chunked):
    body = multipart(("title", None, b"holiday"), ("file", "beach.jpg", photo(2 * 1024 * 1024)))
    path = f"/upload?run={uuid.uuid4().hex}"
    reply = post(sites, "shop.localhost", body, f"multipart/form-data; boundary={BOUNDARY}", chunked, path)
    assert reply.status == 200 and reply.rules == [99010] and not reply.failed and truncated(reply)
    assert " body_truncated=1 " in haproxy_line(sites, path)
    passed = wait_for(lambda: log_lines(sites, "request passed with its body inspected in part"),
                      what="the partly inspected upload logged")
    assert passed[-1]["app"] == "shop" and "bytes inspected" in passed[-1]["body_truncated"]


@pytest.mark.parametrize("where", ["first field", "after a 55 kB file"])
def test_a_2_mb_upload_with_an_attack_in_its_first_60_kb_is_blocked(sites, where):
    big = photo(2 * 1024 * 1024)
    parts = {"first field": [("q", None, ATTACK), ("file", "a.jpg", big)],
             "after a 55 kB file": [("notes", "n.txt", b"a" * 55000), ("q", None, ATTACK), ("file", "a.jpg", big)]}
    body = multipart(*parts[where])
    assert body.index(ATTACK) < 60 * 1024
    reply = post(sites, "shop.localhost", body, f"multipart/form-data; boundary={BOUNDARY}")
    assert reply.status == 403 and 942100 in reply.rules and 99010 in reply.rules and truncated(reply)


def test_a_whole_body_sets_no_flag(sites):
    path = f"/upload?run={uuid.uuid4().hex}"
    body = multipart(("title", None, b"holiday"), ("file", "beach.jpg", photo(40_000)))
    reply = post(sites, "shop.localhost", body, f"multipart/form-data; boundary={BOUNDARY}", path=path)
    assert reply.status == 200 and reply.rules == [] and not truncated(reply)
    assert " body_truncated=- " in haproxy_line(sites, path)
    attack = post(sites, "shop.localhost", multipart(("q", None, ATTACK)), f"multipart/form-data; boundary={BOUNDARY}")
    assert attack.status == 403 and 942100 in attack.rules and 99010 not in attack.rules and not truncated(attack)


def padded_json(first: bytes, last: bytes = b"done") -> bytes:
    """A 150 kB JSON document: `first` in its first field, `last` in a
    field after 150 kB of whitespace (cheap to inspect, unlike 64 kB of
    values), so HAProxy's buffer cuts it in between."""
    return (b'{"title": "holiday", "q": ' + json.dumps(first.decode()).encode() + b"," + b" " * 150_000
            + b'"tail": ' + json.dumps(last.decode()).encode() + b"}")


def test_a_cut_json_document_is_closed_inspected_and_passes_flagged(sites):
    """wafsvc closes the document where it was cut (wafsvc/bodies.py), so it
    parses: what arrived is inspected, the rest is not (the padding risk)."""
    clean = post(sites, "shop.localhost", padded_json(b"beach"), "application/json")
    assert clean.status == 200 and clean.rules == [99010] and truncated(clean)
    attack = post(sites, "shop.localhost", padded_json(ATTACK), "application/json")
    assert attack.status == 403 and 942100 in attack.rules and 99010 in attack.rules and truncated(attack)
    past_the_cut = post(sites, "shop.localhost", padded_json(b"beach", ATTACK), "application/json")
    assert past_the_cut.status == 200 and past_the_cut.rules == [99010] and truncated(past_the_cut)


def padded_xml(first: bytes) -> bytes:
    """A 160 kB XML document: `first` in its first element, then empty
    elements (a long text of spaces would cost CRS seconds), so that
    HAProxy's buffer cuts it among them."""
    return (b"<?xml version='1.0'?><order><item>holiday</item><q>" + escape(first.decode()).encode() + b"</q>"
            + b"<p/>" * 40_000 + b"</order>")


def test_a_cut_xml_document_is_closed_inspected_and_passes_flagged(sites):
    """As JSON: wafsvc ends the elements still open where it was cut, so
    that libxml2 parses it (before, it was refused: 400, 200002)."""
    clean = post(sites, "shop.localhost", padded_xml(b"beach"), "application/xml")
    assert clean.status == 200 and clean.rules == [99010] and truncated(clean)
    attack = post(sites, "shop.localhost", padded_xml(ATTACK), "text/xml; charset=utf-8")
    assert attack.status == 403 and 942100 in attack.rules and 99010 in attack.rules and truncated(attack)
    whole = post(sites, "shop.localhost", padded_xml(b"beach").replace(b"<p/>", b""), "application/xml")
    assert whole.status == 200 and whole.rules == [] and not truncated(whole)


def test_a_cut_xml_document_that_cannot_be_closed_is_refused_flagged(sites):
    """Cut inside its DOCTYPE's internal subset: what it declares is
    unknown, so it is not closed, and libxml2's parse error denies it."""
    doctype = b"<?xml version='1.0'?><!DOCTYPE order [" + b"<!ENTITY e 'v'>" * 10_000 + b"]><order>&e;</order>"
    reply = post(sites, "shop.localhost", doctype, "application/xml")
    assert reply.status == 400 and reply.rules == [200002, 99010] and truncated(reply)


# -- reloads -------------------------------------------------------------------------

NEWS = "\n  - name: news\n    mode: detect\n"


def test_reloading_a_file_that_adds_an_application_under_load_fails_no_request(sites):
    original = sites.apps_file.read_text()
    assert get(sites, "news.localhost").status == 403     # unknown yet: the default judges it
    try:
        with Load(sites.spec.frontend_port, clients=4, pause_s=0.01) as load:
            wait_for(lambda: len(load.results) >= 20, timeout=30, what="the load running")
            reload_wafsvc(sites, original + NEWS)
            seen = len(load.results)
            wait_for(lambda: len(load.results) >= seen + 20, timeout=30, what="more requests after the reload")
        assert not load.errors and not load.bad(), (load.errors[:3], load.bad()[:3])
        news = get(sites, "news.localhost")
        assert news.status == 200 and 942100 in news.rules     # news detects
    finally:
        reload_wafsvc(sites, original)


def test_unknown_applications_refused_when_so_configured_get_the_failure_policy(sites):
    original = sites.apps_file.read_text()
    try:
        reload_wafsvc(sites, original.replace("unknown_application: default", "unknown_application: refuse"))
        for path in (SQLI, "/"):
            refused = get(sites, "gone.localhost", path)
            # The gateway's failure policy (closed): 503, flagged, with the reason.
            assert refused.status == 503 and refused.failed, refused.headers
            assert "NOT_FOUND" in refused.headers["X-Waf-Error"] and "unknown application" in \
                refused.headers["X-Waf-Error"]
        assert get(sites, "shop.localhost").status == 403 and get(sites, "www.example.com", "/").status == 200
    finally:
        reload_wafsvc(sites, original)
    assert get(sites, "gone.localhost", "/").status == 200


def test_a_file_that_fails_keeps_the_previous_applications_serving(sites):
    original = sites.apps_file.read_text()
    broken = original + ("  - name: broken\n    rules:\n      directives: |\n"
                         "        SecRule ARGS \"@contains x\" \"id:5001,phase:2,deny,nosuchaction\"\n")
    failures = len(log_lines(sites, "rule reload failed; the previous rules stay in service"))
    staged = sites.apps_file.with_suffix(".new")
    staged.write_text(broken)
    os.replace(staged, sites.apps_file)
    try:
        os.kill(sites.proc("wafsvc1").pid, signal.SIGHUP)
        failed = wait_for(lambda: log_lines(sites, "rule reload failed; the previous rules stay in service")[failures:],
                          timeout=30, what="the failed reload logged")
        lines = original.count("\n")
        assert f"File: {sites.apps_file}. Line: {lines + 4}." in failed[0]["error"], failed[0]["error"]
        assert "application 'broken'" in failed[0]["error"]
        # Only the supervisor tried: the workers serve on as they were.
        assert get(sites, "blog.localhost").status == 200 and get(sites, "shop.localhost").status == 403
    finally:
        sites.apps_file.write_text(original)


# -- validation (no stack) -------------------------------------------------------------

def validate(path: pathlib.Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "CRS_DIR": DEBIAN_CRS, **env}
    return subprocess.run([sys.executable, "-m", "wafsvc", "--validate", str(path)], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_validate_passes_the_demo_and_fails_a_broken_rule_with_its_file_and_line(tmp_path):
    good = validate(DEMO_APPS)
    assert good.returncode == 0, good.stderr
    assert "3 application(s), 2 distinct rule set(s)" in good.stdout and "blog: detect" in good.stdout
    rules = tmp_path / "shop.conf"
    rules.write_text("# the shop's own rules\n\nSecRule ARGS:coupon \"@rx ^X\" \"id:7001,phase:2,deny,stauts:403\"\n")
    apps = tmp_path / "apps.yaml"
    apps.write_text("applications:\n  - name: shop\n    rules:\n      files: [shop.conf]\n")
    bad = validate(apps)
    assert bad.returncode == 1
    assert f"application 'shop' ({apps}:2)" in bad.stderr and f"File: {rules}. Line: 3." in bad.stderr, bad.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text("applications:\n  - name: shop\n    mode: block\n    paranioa: 2\n")
    result = validate(typo)
    assert result.returncode == 1 and f"{typo}:4: applications[0]: unknown key 'paranioa'" in result.stderr
    assert validate(tmp_path / "missing.yaml").returncode == 2


# -- each application's failure policy, followed by the gateway -------------------------

POLICIES = """\
default_application: default
applications:
  - name: default                 # none of its own: the gateway's (closed)
  - name: shop
    failure_policy: open
  - name: blog
    mode: detect
    failure_policy: closed
"""


@pytest.fixture(scope="module")
def policy_stack(haproxy_bin, tmp_path_factory):
    logs = tmp_path_factory.mktemp("policies")
    (logs / "site.conf").write_text('SecRule ARGS "@contains attack" "id:1001,phase:2,deny,status:403,log"\n')
    (logs / "apps.yaml").write_text(POLICIES)
    s = start_stack(logs, haproxy_bin, wafsvc_ports=[free_port()],
                    wafsvc_env={"RULES": str(logs / "site.conf"), "WAF_CONFIG": str(logs / "apps.yaml")},
                    gateway_env={"GATEWAY_FAILURE_POLICY": "closed"}, haproxy_env={"APPS_MAP": str(APPS_MAP)})
    yield s
    s.stop()


def test_with_wafsvc_down_each_application_gets_its_own_failure_policy(policy_stack):
    stack = policy_stack
    gateway_log = stack.spec.log_dir / "gateway.log"
    wait_for(lambda: "applications learned from wafsvc" in gateway_log.read_text(errors="replace"),
             timeout=30, what="the gateway learning the applications")
    assert get(stack, "shop.localhost", "/?q=attack").status == 403
    stack.kill_wafsvc(0)
    shop = get(stack, "shop.localhost", "/")
    assert shop.status == 200 and shop.failed and shop.headers["X-Waf-Action"] == "pass"   # open
    # No verdict: body_truncated comes from the gateway's own detection.
    upload = post(stack, "shop.localhost", multipart(("file", "a.jpg", photo(200_000))),
                  f"multipart/form-data; boundary={BOUNDARY}")
    assert upload.status == 200 and upload.failed and truncated(upload) and not truncated(shop)
    for host in ("blog.localhost", "www.example.com"):                                       # closed
        reply = get(stack, host, "/")
        assert reply.status == 503 and reply.failed, host
    failures = [json.loads(line) for line in gateway_log.read_text(errors="replace").splitlines()
                if '"msg": "no verdict; failure policy applied"' in line]
    assert {(f["app"], f["policy"]) for f in failures} >= {("shop", "open"), ("blog", "closed")}
