"""Metrics, logs and the audit log, seen the way an on-call engineer sees them:
requests through real HAProxy, then /metrics scraped and parsed with
prometheus_client's own parser, and the log files read back.

The module runs against every HAProxy binary (2.6 and 3.2). Tests share one
stack and run in file order; each measures deltas, so the order only
matters for the last one, which stops the stack.
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import time
import urllib.parse
import urllib.request

import pytest

from gateway.spop import Message, encode_haproxy_hello, encode_notify
from stack import free_port
from stack.processes import HAPROXY_DIR
from tests.e2e.conftest import Scrape, start_stack, wait_for
from wafsvc.metrics import FLUSH_S

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPOE_CONF = HAPROXY_DIR / "spoe-modsecurity.conf"
SQLI = "/?id=1%27%20or%20%271%27%3D%271"
HOST = "shop.example:8080"
BROWSER = [("Host", HOST), ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
           ("Accept", "text/html"), ("Accept-Language", "en-GB,en;q=0.5")]


@pytest.fixture(scope="module")
def obs(haproxy_bin, stack_logs):
    ports = {"gateway": free_port(), "wafsvc": free_port()}
    audit = stack_logs / "audit.json"
    # Exact counts need every request to get its verdict, even when the
    # shared CPU is busy: more time than the shipped 400/500 ms.
    spoe = stack_logs / "spoe-modsecurity.conf"
    shipped = SPOE_CONF.read_text()
    assert "timeout processing 500ms" in shipped
    spoe.write_text(shipped.replace("timeout processing 500ms", "timeout processing 5s"))
    stack = start_stack(stack_logs, haproxy_bin, wafsvc_workers=2, wafsvc_metrics_ports=[ports["wafsvc"]],
                        spoe_conf=spoe,
                        wafsvc_env={"CRS_DIR": "/usr/share/modsecurity-crs", "PARANOIA": "1",
                                    "WAF_AUDIT_LOG": str(audit),
                                    # unknown names refused, so that test_unknown_application_... sees it
                                    "WAF_UNKNOWN_APPLICATION": "refuse"},
                        gateway_env={"GATEWAY_METRICS": f"127.0.0.1:{ports['gateway']}",
                                     "GATEWAY_DEADLINE_MS": "4500"})
    stack.metrics_ports = ports
    stack.audit = audit
    stack.logs = stack_logs
    yield stack
    stack.stop()


# -- helpers ------------------------------------------------------------------


def scrape(obs, service: str) -> Scrape:
    return Scrape(obs.metrics_ports[service])


def settled_waf(obs, timeout: float = 10.0) -> Scrape:
    """wafsvc workers write their tallies every FLUSH_S: scrape once two
    scrapes that far apart agree, so nothing counted is still pending."""
    deadline = time.monotonic() + timeout
    last = scrape(obs, "wafsvc")
    while time.monotonic() < deadline:
        time.sleep(FLUSH_S * 2)
        now = scrape(obs, "wafsvc")
        if now.samples == last.samples:
            return now
        last = now
    raise AssertionError("wafsvc metrics never settled")


def request(obs, path: str = "/", headers=BROWSER, port: int | None = None) -> tuple[int, int]:
    """Returns (status, client port); the port finds the request in HAProxy's log."""
    conn = http.client.HTTPConnection("127.0.0.1", port or obs.spec.frontend_port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        client_port = conn.sock.getsockname()[1]
        resp = conn.getresponse()
        resp.read()
        return resp.status, client_port
    finally:
        conn.close()


def haproxy_line(obs, client_port: int) -> str:
    def find():
        # Newest first: both HAProxy versions' runs share this log file.
        for line in reversed((obs.logs / "haproxy.log").read_text(errors="replace").splitlines()):
            if f"127.0.0.1:{client_port} [" in line and " id=" in line:
                return line
        return None
    return wait_for(find, what=f"HAProxy log line of client port {client_port}")


def json_events(path) -> list[dict]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def worker_pids(obs) -> set[int]:
    """Live workers of this run's replica: children of its supervisor that
    said "worker serving" (the metrics server is a child too)."""
    supervisor = obs.proc("wafsvc1").pid
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as fh:
        children = {int(pid) for pid in fh.read().split()}
    serving = {e["pid"] for e in json_events(obs.logs / "wafsvc1.log") if e.get("msg") == "worker serving"}
    return children & serving


# -- tests --------------------------------------------------------------------

def test_counters_and_histograms_move_by_what_was_sent(obs):
    gw0, waf0 = scrape(obs, "gateway"), settled_waf(obs)
    benign, attacks = 12, 7
    statuses = [request(obs)[0] for _ in range(benign)] + [request(obs, SQLI)[0] for _ in range(attacks)]
    assert statuses == [200] * benign + [403] * attacks
    gw, waf = scrape(obs, "gateway"), settled_waf(obs)

    def delta(before, after, name, **labels):
        return after.total(name, **labels) - before.total(name, **labels)

    assert delta(gw0, gw, "modsec_gateway_evaluations_total", verdict="pass", app="default") == benign
    assert delta(gw0, gw, "modsec_gateway_evaluations_total", verdict="block", app="default") == attacks
    assert delta(gw0, gw, "modsec_gateway_blocks_total", frontend="web", host=HOST) == attacks
    assert delta(gw0, gw, "modsec_gateway_rule_matches_total", rule_id="942100", outcome="blocked") == attacks
    assert delta(gw0, gw, "modsec_gateway_rule_matches_total", rule_id="949110", outcome="blocked") == attacks
    assert delta(gw0, gw, "modsec_gateway_request_duration_seconds_count") == benign + attacks
    assert delta(gw0, gw, "modsec_gateway_request_duration_seconds_bucket", le="+Inf") == benign + attacks
    assert delta(gw0, gw, "modsec_gateway_request_duration_seconds_sum") > 0
    # Frontend web inspects responses: each request that passed sends its
    # response too (a blocked one has none).
    assert delta(gw0, gw, "modsec_gateway_spop_frames_total", type="notify") == 2 * benign + attacks
    assert delta(gw0, gw, "modsec_gateway_pool_submitted_total") == 2 * benign + attacks
    assert delta(gw0, gw, "modsec_gateway_response_evaluations_total", verdict="pass", app="default") == benign
    assert delta(gw0, gw, "modsec_gateway_pool_responses_total") == benign
    assert gw.total("modsec_gateway_spop_connections_open") >= 1
    assert gw.total("modsec_gateway_pool_workers") >= 1
    assert delta(waf0, waf, "modsec_waf_evaluations_total", app="default", verdict="pass") == benign
    assert delta(waf0, waf, "modsec_waf_evaluations_total", app="default", verdict="block") == attacks
    assert delta(waf0, waf, "modsec_waf_rule_matches_total", rule_id="942100", outcome="blocked") == attacks
    assert delta(waf0, waf, "modsec_waf_response_evaluations_total", app="default", verdict="pass") == benign
    assert delta(waf0, waf, "modsec_waf_engine_duration_seconds_count", app="default") == benign + attacks
    engine_s = delta(waf0, waf, "modsec_waf_engine_duration_seconds_sum", app="default")
    gateway_s = delta(gw0, gw, "modsec_gateway_request_duration_seconds_sum")
    assert 0 < engine_s < gateway_s    # the engine's time is part of the gateway's
    assert waf.total("modsec_waf_workers") == 2
    assert waf.total("modsec_waf_rules_loaded", app="default") > 500   # CRS


def test_pool_health_shows_every_worker_reached(obs):
    gw = wait_for(lambda: (lambda s: s if s.total("modsec_gateway_pool_replica_workers", state="reached") == 2
                           else None)(scrape(obs, "gateway")), timeout=20, what="both workers reached")
    assert gw.total("modsec_gateway_pool_replica_workers", state="reported") == 2
    assert gw.total("modsec_gateway_pool_workers") == 2
    assert len(gw.labels("modsec_gateway_pool_replica_workers", "replica")) == 1


def test_one_scrape_covers_every_worker_of_the_replica(obs):
    """Streams straight to wafsvc, on fresh connections until each of the
    two workers (named in the stream metadata) has answered some: the one
    scrape counts all of them."""
    import grpc
    from wafapi import waf_pb2

    before = settled_waf(obs)
    served: dict[str, int] = {}
    target = f"127.0.0.1:{obs.spec.wafsvc_ports[0]}"
    for attempt in range(40):
        if len(served) == 2:
            break
        # A distinct channel argument forces a new connection, which
        # SO_REUSEPORT hands to either worker.
        with grpc.insecure_channel(target, options=[("test.attempt", attempt)]) as channel:
            call = channel.stream_stream("/waf.v1.Waf/EvaluateStream",
                                         request_serializer=waf_pb2.EvaluateBatch.SerializeToString,
                                         response_deserializer=waf_pb2.VerdictBatch.FromString)
            batch = waf_pb2.EvaluateBatch(requests=[waf_pb2.BatchRequest(ref=i, request=waf_pb2.EvaluateRequest(
                transaction_id=f"merge-{attempt}-{i}", method="GET", uri=b"/", client_ip="10.0.0.1",
                headers=[waf_pb2.Header(name=b"host", value=b"www.example.com")])) for i in range(3)])
            responses = call(iter([batch]))
            worker = dict(responses.initial_metadata())["x-waf-worker"]
            assert len(list(responses)[0].verdicts) == 3
            served[worker] = served.get(worker, 0) + 3
    assert len(served) == 2, f"only reached {served}"
    after = settled_waf(obs)
    assert (after.total("modsec_waf_evaluations_total", verdict="pass")
            - before.total("modsec_waf_evaluations_total", verdict="pass")) == sum(served.values())


def test_blocks_are_counted_per_frontend(obs):
    """web-lenient ignores 942100 only: an XSS is still blocked there."""
    gw0 = scrape(obs, "gateway")
    status, _ = request(obs, "/?q=%3Cscript%3Ealert(1)%3C/script%3E", port=obs.spec.frontend_alt_port)
    gw = scrape(obs, "gateway")
    assert status == 403
    assert (gw.total("modsec_gateway_blocks_total", frontend="web-lenient")
            - gw0.total("modsec_gateway_blocks_total", frontend="web-lenient")) == 1


def test_a_blocked_request_is_followed_by_its_unique_id(obs):
    status, client_port = request(obs, SQLI)
    assert status == 403
    line = haproxy_line(obs, client_port)
    unique_id = re.search(r" id=(\S+)", line).group(1)
    assert " waf=deny " in line and " waf_status=403 " in line and " 403 " in line
    rules = re.search(r'rules="([^"]*)"', line).group(1).split()
    assert "942100" in rules and "949110" in rules
    assert re.search(r" spoe_ms=\d+", line)
    assert " PR-- " in line    # termination state: denied by HAProxy

    def logged(name):
        return [e for e in json_events(obs.logs / name) if e.get("unique_id") == unique_id]
    gateway = wait_for(lambda: logged("gateway.log"), what="gateway log line")
    wafsvc = wait_for(lambda: logged("wafsvc1.log"), what="wafsvc log line")
    assert gateway[0]["msg"] == wafsvc[0]["msg"] == "request blocked"
    assert [str(r) for r in gateway[0]["rules"]] == rules
    assert "host" not in gateway[0] and "matched_data" not in gateway[0]   # ids only by default
    audit = wait_for(lambda: [e for e in json_events(obs.audit)
                              if e["transaction"]["unique_id"] == unique_id], what="audit entry")
    assert len(audit) == 1
    entry = audit[0]["transaction"]
    assert {m["details"]["ruleId"] for m in entry["messages"]} >= {"942100", "949110"}
    assert entry["request"]["uri"] == SQLI and entry["is_interrupted"]


def test_audit_log_is_relevant_only(obs):
    _, client_port = request(obs)
    unique_id = re.search(r" id=(\S+)", haproxy_line(obs, client_port)).group(1)
    _, attack_port = request(obs, SQLI)
    attack_id = re.search(r" id=(\S+)", haproxy_line(obs, attack_port)).group(1)
    ids = wait_for(lambda: (lambda ids: ids if attack_id in ids else None)(
        {e["transaction"]["unique_id"] for e in json_events(obs.audit)}), what="audit entry")
    assert unique_id not in ids


def test_invalid_requests_are_counted(obs):
    gw0, waf0 = scrape(obs, "gateway"), settled_waf(obs)
    # HAProxy cuts bodies at tune.bufsize (64 KiB): the engine sees less
    # than Content-Length says, and both services count it.
    body = b"a=" + b"x" * 100_000
    conn = http.client.HTTPConnection("127.0.0.1", obs.spec.frontend_port, timeout=10)
    conn.request("POST", "/", body=body, headers={"Host": HOST, "Content-Type": "application/x-www-form-urlencoded"})
    conn.getresponse().read()
    conn.close()
    # A SPOE message without its method, then a malformed frame, straight to the gateway.
    with socket.create_connection(("127.0.0.1", obs.spec.gateway_port), timeout=5) as sock:
        sock.sendall(encode_haproxy_hello(("2.0",), 16380, ("pipelining",)))
        sock.recv(4096)
        sock.sendall(encode_notify(1, 1, [Message("check-request", (("id", "no-method"),))]))
        assert sock.recv(4096)   # an ACK with the failure policy
        sock.sendall(b"\x00\x00\x00\x09\xee\x00\x00\x00\x01\x00\x00\x00\x00")
        while sock.recv(4096):
            pass                   # AGENT-DISCONNECT, then the gateway closes
    gw = wait_for(lambda: (lambda s: s if s.total("modsec_gateway_spop_protocol_errors_total")
                           > gw0.total("modsec_gateway_spop_protocol_errors_total") else None)(
        scrape(obs, "gateway")), what="protocol error counted")

    def delta(before, after, name, **labels):
        return after.total(name, **labels) - before.total(name, **labels)

    waf = wait_for(lambda: (lambda s: s if delta(waf0, s, "modsec_waf_invalid_requests_total",
                                                 reason="body_truncated") else None)(scrape(obs, "wafsvc")),
                   what="truncated body counted by wafsvc")
    assert delta(gw0, gw, "modsec_gateway_invalid_requests_total", reason="body_truncated") == 1
    # wafsvc counts evaluations: a 64 KiB form is slow enough that the pool
    # may hedge it to a second worker, so one request can be two evaluations.
    hedged = delta(gw0, gw, "modsec_gateway_pool_retries_total")   # hedges included
    assert 1 <= delta(waf0, waf, "modsec_waf_invalid_requests_total", reason="body_truncated") <= 1 + hedged
    assert delta(gw0, gw, "modsec_gateway_invalid_requests_total", reason="message") == 1
    assert delta(gw0, gw, "modsec_gateway_failures_total", reason="invalid_message") == 1
    assert delta(gw0, gw, "modsec_gateway_invalid_requests_total", reason="spop_frame") == 1
    assert delta(gw0, gw, "modsec_gateway_spop_protocol_errors_total") == 1


def test_unknown_application_is_an_engine_error(obs):
    """A rule set name the replica does not have: wafsvc refuses, the
    gateway applies the failure policy and counts an engine error."""
    from gateway.spop import encode_hdrs_bin
    gw0, waf0 = scrape(obs, "gateway"), settled_waf(obs)
    args = (("id", "unknown-app"), ("app", "no-such-app"), ("method", "GET"), ("uri", "/"),
            ("headers", encode_hdrs_bin([(b"host", b"x")])), ("body", None))
    with socket.create_connection(("127.0.0.1", obs.spec.gateway_port), timeout=5) as sock:
        sock.sendall(encode_haproxy_hello(("2.0",), 16380, ("pipelining",)))
        sock.recv(4096)
        sock.sendall(encode_notify(1, 1, [Message("check-request", args)]))
        assert sock.recv(4096)
    gw, waf = scrape(obs, "gateway"), settled_waf(obs)
    assert (gw.total("modsec_gateway_failures_total", reason="not_found")
            - gw0.total("modsec_gateway_failures_total", reason="not_found")) == 1
    assert (gw.total("modsec_gateway_invalid_requests_total", reason="engine_error")
            - gw0.total("modsec_gateway_invalid_requests_total", reason="engine_error")) == 1
    assert (gw.total("modsec_gateway_grpc_errors_total", code="NOT_FOUND")
            - gw0.total("modsec_gateway_grpc_errors_total", code="NOT_FOUND")) == 1
    assert (waf.total("modsec_waf_evaluations_total", app="_unknown", verdict="error")
            - waf0.total("modsec_waf_evaluations_total", app="_unknown", verdict="error")) == 1
    assert "no-such-app" not in waf.labels("modsec_waf_evaluations_total", "app")


def test_reload_is_counted_and_the_rule_set_age_resets(obs):
    waf0 = settled_waf(obs)
    loaded0 = waf0.total("modsec_waf_rules_loaded_timestamp_seconds")
    obs.proc("wafsvc1").send_signal(signal.SIGHUP)
    waf = wait_for(lambda: (lambda s: s if s.total("modsec_waf_rules_loaded_timestamp_seconds") > loaded0
                            and s.total("modsec_waf_reloads_total", result="success") else None)(
        scrape(obs, "wafsvc")), timeout=15, what="reload visible in metrics")
    assert waf.total("modsec_waf_reloads_total", result="success") == \
        waf0.total("modsec_waf_reloads_total", result="success") + 1
    assert time.time() - waf.total("modsec_waf_rules_loaded_timestamp_seconds") < 15


def test_a_dead_worker_keeps_its_counts_and_is_replaced(obs):
    before = settled_waf(obs)
    victim = sorted(worker_pids(obs))[0]
    os.kill(victim, signal.SIGKILL)
    after = wait_for(lambda: (lambda s: s if s.total("modsec_waf_worker_restarts_total") >= 1
                              and s.total("modsec_waf_workers") == 2 else None)(scrape(obs, "wafsvc")),
                     timeout=15, what="worker restarted")
    # Counters of the dead process stay: totals never go back.
    assert after.total("modsec_waf_evaluations_total") >= before.total("modsec_waf_evaluations_total")
    assert after.total("modsec_waf_rules_loaded", app="default") == before.total("modsec_waf_rules_loaded", app="default")
    wait_for(lambda: len(worker_pids(obs) - {victim}) == 2, timeout=15, what="replacement worker serving")
    status, _ = request(obs, SQLI)
    assert status == 403


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed (scripts/install.sh)")
def test_real_prometheus_scrapes_and_answers_every_dashboard_query(obs, tmp_path):
    """The shipped config passes promtool; a real Prometheus scrapes both
    services and evaluates every query of the Grafana dashboard."""
    import subprocess
    check = subprocess.run(["promtool", "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: gateway, static_configs: [{{targets: ['127.0.0.1:{obs.metrics_ports['gateway']}']}}]}}\n"
        f"  - {{job_name: wafsvc, static_configs: [{{targets: ['127.0.0.1:{obs.metrics_ports['wafsvc']}']}}]}}\n")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))

    def get(path: str, **params):
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{api}/{path}?{query}", timeout=5) as resp:
            return json.load(resp)

    def query(expr: str):
        reply = get("query", query=expr)
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]

    try:
        def targets_up():
            try:
                active = get("targets")["data"]["activeTargets"]
            except OSError:
                return False
            return len(active) == 2 and all(t["health"] == "up" for t in active)
        wait_for(targets_up, timeout=30, what="Prometheus scraping both services")
        for _ in range(5):   # traffic spread over several scrapes, for rate()
            request(obs)
            request(obs, SQLI)
            time.sleep(1)
        dashboard = json.loads((ROOT / "deploy/grafana/dashboards/modsec-spoa.json").read_text())
        exprs = [t["expr"].replace("$__rate_interval", "30s")
                 for panel in dashboard["panels"] for t in panel.get("targets", [])]
        for expr in exprs:
            query(expr)   # valid PromQL, evaluated against real series
        blocking = query('topk(10, sum by (rule_id) (rate(modsec_gateway_rule_matches_total{outcome="blocked"}[30s])))')
        assert "942100" in {r["metric"]["rule_id"] for r in blocking}
        p99 = query("histogram_quantile(0.99, sum by (le) (rate(modsec_gateway_request_duration_seconds_bucket[30s])))")
        assert 0 < float(p99[0]["value"][1]) < 5
        assert query("sum(modsec_waf_workers)")[0]["value"][1] == "2"
        assert float(query("time() - min(modsec_waf_rules_loaded_timestamp_seconds)")[0]["value"][1]) >= 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_sigterm_loses_no_audit_entry(obs):
    """Last: stops the stack. Every request blocked under load before
    SIGTERM is in the audit log afterwards, whole."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: request(obs, SQLI), range(40)))
    ports = [port for status, port in results if status == 403]
    assert len(ports) == 40
    ids = {re.search(r" id=(\S+)", haproxy_line(obs, port)).group(1) for port in ports}
    obs.stop()
    entries = json_events(obs.audit)     # json.loads fails on any torn line
    assert ids <= {e["transaction"]["unique_id"] for e in entries}
