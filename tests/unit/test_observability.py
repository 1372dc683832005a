"""Metrics, request logs and audit-log settings: pure logic, no sockets.

The engine here is the real libmodsecurity (no socket involved); metrics go
to private registries, in single-process mode.
"""

from __future__ import annotations

import io
import json
import logging
import pathlib
import re
import time

import pytest
from prometheus_client import CollectorRegistry

from common.logs import JsonFormatter
from common.metrics import OTHER, BoundedValues
from common.options import ConfigError
from gateway import metrics as gateway_metrics
from gateway import mapping
from gateway.mapping import RequestContext
from gateway.requestlog import WARN_EVERY_S, RequestLog
from gateway.failures import STREAM_FAILED, TIMED_OUT, Failure, NoVerdict
from gateway.pool import WafPool
from wafapi import waf_pb2
from wafsvc import metrics as waf_metrics
from wafsvc.config import WafConfig
from wafsvc.engine import Engine, EvaluationFailed
from wafsvc.rules import RuleSetSpec, compose

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/modsec-spoa.json"
BASE = str(ROOT / "rules/modsecurity.conf")


def value(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# -- helpers ------------------------------------------------------------------

def test_bounded_values_keep_the_first_ones_and_fold_the_rest():
    bounded = BoundedValues(2)
    assert bounded("Shop.Example:8080") == "shop.example:8080"
    assert bounded("api") == "api"
    assert bounded("attacker-1") == OTHER
    assert bounded("attacker-2") == OTHER
    assert bounded("api") == "api"        # known values stay themselves
    assert bounded("") == OTHER and len(bounded) == 2
    assert BoundedValues(3)("") == "_none"
    assert len(BoundedValues(1)("x" * 1000)) <= 120


@pytest.mark.parametrize("failure,label", [
    (NoVerdict(Failure.INVALID_MESSAGE, "argument 'method' is missing"), "invalid_message"),
    (TIMED_OUT, "timeout"),
    (STREAM_FAILED, "unavailable"),
    (NoVerdict(Failure.REFUSED, "unknown application 'x'", "INVALID_ARGUMENT"), "invalid_argument"),
    (NoVerdict(Failure.REFUSED, "engine error: boom", "INTERNAL"), "internal"),
    (NoVerdict(Failure.REFUSED, "?", "NOT_A_GRPC_CODE"), "other"),
])
def test_failures_are_typed_values_with_a_bounded_label(failure, label):
    assert failure.label == label


def test_verdict_kinds():
    assert gateway_metrics.verdict_kind(waf_pb2.Verdict()) == "pass"
    assert gateway_metrics.verdict_kind(waf_pb2.Verdict(matches=[waf_pb2.RuleMatch(id=1)])) == "match"
    assert gateway_metrics.verdict_kind(waf_pb2.Verdict(intervention=True)) == "block"


def test_json_log_lines_carry_extra_fields():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("gateway"))
    logger = logging.getLogger("test.observability")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("request blocked", extra={"unique_id": "7F000001:1", "rules": [942100]})
    finally:
        logger.removeHandler(handler)
    line = out.getvalue()
    assert line.count("\n") == 1
    event = json.loads(line)
    assert event["unique_id"] == "7F000001:1" and event["rules"] == [942100]
    assert event["service"] == "gateway" and event["level"] == "warning" and event["msg"] == "request blocked"


def test_json_log_extras_never_overwrite_the_base_fields():
    record = logging.makeLogRecord({"msg": "worker died", "levelname": "ERROR", "pid": 4242, "service": "x"})
    event = json.loads(JsonFormatter("wafsvc").format(record))
    assert event["pid"] == record.process and event["extra_pid"] == 4242
    assert event["service"] == "wafsvc" and event["extra_service"] == "x"


# -- gateway hooks ------------------------------------------------------------

def _context(**kw) -> RequestContext:
    base = dict(unique_id="id-1", frontend="web", host="shop.example:8080", app="", body_truncated=False)
    return RequestContext(**{**base, **kw})


def _blocked() -> waf_pb2.Verdict:
    return waf_pb2.Verdict(intervention=True, status=403, action=waf_pb2.ACTION_DENY,
                           matches=[waf_pb2.RuleMatch(id=942100, matched_data="1' or '1'='1"),
                                    waf_pb2.RuleMatch(id=949110)])


def test_gateway_hooks_count_verdicts_blocks_rules_and_latency():
    registry = CollectorRegistry()
    hooks = gateway_metrics.GatewayMetrics(registry)
    hooks.verdict(_context(), waf_pb2.Verdict(), 0.002)
    hooks.verdict(_context(), _blocked(), 0.004)
    hooks.verdict(_context(app="api", body_truncated=True),
                  waf_pb2.Verdict(matches=[waf_pb2.RuleMatch(id=920350)]), 0.001)
    assert value(registry, "modsec_gateway_evaluations_total", verdict="pass", app="default") == 1
    assert value(registry, "modsec_gateway_evaluations_total", verdict="block", app="default") == 1
    assert value(registry, "modsec_gateway_evaluations_total", verdict="match", app="api") == 1
    assert value(registry, "modsec_gateway_blocks_total", frontend="web", host="shop.example:8080") == 1
    assert value(registry, "modsec_gateway_rule_matches_total", rule_id="942100", outcome="blocked") == 1
    assert value(registry, "modsec_gateway_rule_matches_total", rule_id="920350", outcome="passed") == 1
    assert value(registry, "modsec_gateway_invalid_requests_total", reason="body_truncated") == 1
    assert value(registry, "modsec_gateway_request_duration_seconds_count") == 3
    assert value(registry, "modsec_gateway_request_duration_seconds_bucket", le="0.002") == 2


def test_gateway_hooks_count_failures_and_protocol_errors():
    registry = CollectorRegistry()
    hooks = gateway_metrics.GatewayMetrics(registry)
    hooks.invalid_message(mapping.InvalidMessage(mapping.Problem.MISSING_ARGUMENT, "is missing",
                                                 "check-request", "uri", "add uri=url"))
    hooks.failure(None, NoVerdict(Failure.INVALID_MESSAGE, "argument 'method' is missing"), 0.0)
    hooks.failure(_context(), TIMED_OUT, 0.4)
    hooks.failure(_context(), NoVerdict(Failure.REFUSED, "engine error: boom", "INTERNAL"), 0.01)
    hooks.protocol_error("invalid")
    hooks.connection_opened()
    hooks.connection_closed("io")
    hooks.frame("notify")
    hooks.retried("host/1/2")
    hooks.grpc_error("host/1/2", "UNAVAILABLE")
    assert value(registry, "modsec_gateway_failures_total", reason="invalid_message") == 1
    assert value(registry, "modsec_gateway_invalid_messages_total", message="check-request",
                 problem="missing_argument", argument="uri") == 1
    assert value(registry, "modsec_gateway_failures_total", reason="timeout") == 1
    assert value(registry, "modsec_gateway_failures_total", reason="internal") == 1
    assert value(registry, "modsec_gateway_evaluations_total", verdict="error", app="default") == 2
    assert value(registry, "modsec_gateway_invalid_requests_total", reason="message") == 1
    assert value(registry, "modsec_gateway_invalid_requests_total", reason="engine_error") == 1
    assert value(registry, "modsec_gateway_invalid_requests_total", reason="spop_frame") == 1
    assert value(registry, "modsec_gateway_spop_protocol_errors_total", status="invalid") == 1
    assert value(registry, "modsec_gateway_spop_connections_open") == 0
    assert value(registry, "modsec_gateway_spop_connections_closed_total", reason="io") == 1
    assert value(registry, "modsec_gateway_spop_frames_total", type="notify") == 1
    assert value(registry, "modsec_gateway_grpc_retries_total", worker="host/1/2") == 1
    assert value(registry, "modsec_gateway_grpc_errors_total", worker="host/1/2", code="UNAVAILABLE") == 1


def test_hosts_from_requests_cannot_explode_the_label_set():
    registry = CollectorRegistry()
    hooks = gateway_metrics.GatewayMetrics(registry, max_label_values=3)
    for i in range(50):
        hooks.verdict(_context(host=f"random-{i}.example"), _blocked(), 0.001)
    hosts = {s.labels["host"] for f in registry.collect() if f.name == "modsec_gateway_blocks"
             for s in f.samples if s.name.endswith("_total")}
    assert hosts == {"random-0.example", "random-1.example", "random-2.example", OTHER}


def test_request_log_has_ids_only_unless_asked(caplog):
    caplog.set_level(logging.INFO, logger="gateway.requests")
    gateway_metrics.GatewayMetrics(CollectorRegistry()).verdict(_context(), _blocked(), 0.003)
    gateway_metrics.GatewayMetrics(CollectorRegistry(), request_data=True).verdict(_context(), _blocked(), 0.003)
    plain, detailed = caplog.records
    assert plain.unique_id == "id-1" and plain.rules == [942100, 949110] and plain.status == 403
    assert not hasattr(plain, "host") and not hasattr(plain, "matched_data")
    assert detailed.host == "shop.example:8080" and detailed.matched_data == "1' or '1'='1"


def test_a_broken_spoe_file_is_warned_about_at_once_then_once_a_minute(caplog):
    caplog.set_level(logging.WARNING, logger="gateway.requests")
    now = [1000.0]
    hooks = RequestLog(clock=lambda: now[0])
    missing = mapping.InvalidMessage(mapping.Problem.MISSING_ARGUMENT, "is missing", "check-request", "uri",
                                     "add uri=url to the args of spoe-message check-request")
    unknown = mapping.InvalidMessage(mapping.Problem.UNKNOWN_MESSAGE, "no message the gateway knows",
                                     "check-requests", hint="name the message check-request")
    for _ in range(5):
        hooks.invalid_message(missing)
    hooks.invalid_message(unknown)
    now[0] += WARN_EVERY_S
    hooks.invalid_message(missing)
    warned = [r for r in caplog.records if r.name == "gateway.requests"]
    assert [(r.problem, r.spoe_message, r.argument, r.refused) for r in warned] == [
        ("missing_argument", "check-request", "uri", 1), ("unknown_message", "check-requests", "", 1),
        ("missing_argument", "check-request", "uri", 5)]
    assert "fix the SPOE file" in warned[0].getMessage() and "uri=url" in warned[0].fix


def test_unknown_arguments_are_logged_the_first_time_each_appears(caplog):
    caplog.set_level(logging.WARNING, logger="gateway.requests")
    hooks = RequestLog()
    for _ in range(3):
        hooks.ignored("check-request", "url")
        hooks.ignored("modsecurity", "reqhdr")
        hooks.ignored("other-message", "")
    records = [r for r in caplog.records if r.name == "gateway.requests"]
    assert [(r.spoe_message, getattr(r, "argument", None)) for r in records] == [
        ("check-request", "url"), ("modsecurity", "reqhdr"), ("other-message", None)]
    assert records[0].fix == "did you mean 'uri'?" and records[1].fix == "did you mean 'reqhdrs'?"


def test_pool_counters_are_read_at_scrape_time():
    registry = CollectorRegistry()
    hooks = gateway_metrics.GatewayMetrics(registry)
    pool = WafPool("ipv4:127.0.0.1:9", hooks=hooks)      # never started: no socket is opened
    hooks.watch_pool(pool)
    pool.stats.submitted, pool.stats.answered, pool.stats.retries = 10, 7, 2
    assert value(registry, "modsec_gateway_pool_submitted_total") == 10
    assert value(registry, "modsec_gateway_pool_inflight") == 3
    assert value(registry, "modsec_gateway_pool_retries_total") == 2
    assert value(registry, "modsec_gateway_pool_workers") == 0
    assert pool.hooks is hooks


# -- wafsvc -------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    return Engine({"": RuleSetSpec(base_conf=BASE, rules_file=str(ROOT / "rules/block-localhost.conf"))})


def _request(ip: str, **kw) -> waf_pb2.EvaluateRequest:
    return waf_pb2.EvaluateRequest(transaction_id="uid-" + ip, client_ip=ip, method="GET", uri=b"/", **kw)


def test_observed_engine_counts_and_logs(engine, caplog):
    caplog.set_level(logging.INFO, logger="wafsvc.requests")
    registry = CollectorRegistry()
    observed = waf_metrics.ObservedEngine(engine, waf_metrics.WafMetrics(registry))
    assert observed.evaluate(_request("127.0.0.1")).intervention
    truncated = observed.evaluate(_request("10.0.0.1", body_truncated=True))
    assert truncated.intervention and truncated.matches[-1].id == 99010  # WAF_TRUNCATED_BODY=block
    assert not observed.evaluate(_request("10.0.0.3")).intervention
    with pytest.raises(EvaluationFailed):
        observed.evaluate(_request("10.0.0.2", application="nope"))
    assert value(registry, "modsec_waf_evaluations_total", app="default", verdict="block") == 2
    assert value(registry, "modsec_waf_evaluations_total", app="default", verdict="pass") == 1
    assert value(registry, "modsec_waf_evaluations_total", app="_unknown", verdict="error") == 1
    assert value(registry, "modsec_waf_invalid_requests_total", app="_unknown", reason="unknown_application") == 1
    assert value(registry, "modsec_waf_invalid_requests_total", app="default", reason="body_truncated") == 1
    assert value(registry, "modsec_waf_engine_duration_seconds_count", app="default") == 3
    assert value(registry, "modsec_waf_rules_loaded", app="default") == engine.loaded.rule_counts["default"]
    assert value(registry, "modsec_waf_rules_loaded_timestamp_seconds") == engine.loaded.loaded_at
    blocked = [r for r in caplog.records if r.getMessage() == "request blocked"]
    assert [r.unique_id for r in blocked] == ["uid-127.0.0.1", "uid-10.0.0.1"]
    failed = [r for r in caplog.records if r.getMessage() == "evaluation failed"]
    assert failed[0].unique_id == "uid-10.0.0.2" and failed[0].code == "NOT_FOUND"


def test_rule_matches_are_labelled_by_rule_id(engine):
    registry = CollectorRegistry()
    observed = waf_metrics.ObservedEngine(engine, waf_metrics.WafMetrics(registry))
    verdict = observed.evaluate(_request("127.0.0.1"))
    for match in verdict.matches:
        assert value(registry, "modsec_waf_rule_matches_total", app="default", rule_id=str(match.id),
                     outcome="blocked") == 1


# -- audit log settings -------------------------------------------------------

def test_audit_log_settings_go_into_the_first_load(tmp_path):
    text = compose(RuleSetSpec(base_conf=BASE, audit_log=str(tmp_path / "audit.json")))
    lines = text.splitlines()
    assert lines[0].startswith("Include") and "modsecurity.conf" in lines[0]
    assert lines[1:6] == ["SecAuditEngine RelevantOnly", "SecAuditLogFormat JSON", "SecAuditLogType Serial",
                          "SecAuditLogParts ABHZ", f'SecAuditLog "{tmp_path / "audit.json"}"']
    assert "SecAudit" not in compose(RuleSetSpec(base_conf=BASE))


def test_audit_log_settings_are_checked(monkeypatch):
    monkeypatch.chdir(ROOT)
    rules = ["--rules", "rules/block-localhost.conf"]
    with pytest.raises(ConfigError, match="WAF_AUDIT_LOG"):
        WafConfig.from_args(rules + ["--audit-log", "/nonexistent/dir/audit.json"], {})
    with pytest.raises(ConfigError, match="WAF_AUDIT_LOG_PARTS"):
        WafConfig.from_args(rules, {"WAF_AUDIT_LOG_PARTS": "AB;Z"})
    assert WafConfig.from_args(rules, {"WAF_AUDIT_LOG_PARTS": "abchz"}).audit_log_parts == "ABCHZ"


# -- the dashboard ------------------------------------------------------------

def _exported() -> dict[str, set[str]]:
    """Every sample name both services can export, with its label names."""
    registry = CollectorRegistry()
    gateway_metrics.GatewayMetrics(registry, WafPool("ipv4:127.0.0.1:9"))
    waf_metrics.WafMetrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: dict[str, set[str]] = {}
    for collector in list(registry._collector_to_names) or []:
        for family in collector.describe() if hasattr(collector, "describe") else collector.collect():
            labels = set(getattr(collector, "_labelnames", ())) | set(getattr(family, "_labelnames", ()))
            for suffix in suffixes[family.type]:
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def test_dashboard_only_uses_metrics_and_labels_that_exist():
    exported = _exported()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = set()
    for expr in exprs:
        metrics = re.findall(r"\b(modsec_[a-z0-9_]+)", expr)
        assert metrics, expr
        labels_known = set().union(*(exported.get(m, set()) for m in metrics))
        for metric in metrics:
            assert metric in exported, f"{metric} (in {expr!r}) is not exported"
            used.add(metric)
        for selector in re.findall(r"modsec_[a-z0-9_]+\{([^}]*)\}", expr):
            for label in re.findall(r"([a-z_]+)\s*=", selector):
                assert label in labels_known, f"label {label} in {expr!r}"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                assert label in labels_known, f"label {label} in {expr!r}"
    # Blocks per rule, latency quantiles, error rate, pool health, response
    # inspection, Envoy's calls and refused SPOE messages are all there.
    for needed in ("modsec_gateway_rule_matches_total", "modsec_gateway_request_duration_seconds_bucket",
                   "modsec_waf_engine_duration_seconds_bucket", "modsec_gateway_pool_workers",
                   "modsec_gateway_response_evaluations_total", "modsec_gateway_response_misses_total",
                   "modsec_waf_response_misses_total", "modsec_waf_held_transactions",
                   "modsec_waf_held_transaction_evictions_total", "modsec_waf_envoy_calls_total",
                   "modsec_gateway_invalid_messages_total"):
        assert needed in used, needed
    # Per application, and truncated bodies, are panels of their own.
    assert any("by (app" in e and "modsec_gateway_evaluations_total" in e for e in exprs)
    assert any('reason="body_truncated"' in e for e in exprs)


def test_docs_document_every_metric():
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Metrics and logs"):]
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in _exported()}
    missing = sorted(name for name in families if name not in section)
    assert not missing, f"docs/operations.md 'Metrics and logs' lacks {missing}"


def test_dashboard_json_is_built_from_its_script():
    import runpy
    built = runpy.run_path(str(ROOT / "scripts/grafana_dashboard.py"))["dash"]
    assert json.loads(DASHBOARD.read_text()) == built, \
        "run: python scripts/grafana_dashboard.py > deploy/grafana/dashboards/modsec-spoa.json"


def test_blocks_are_not_logged_below_info(caplog):
    caplog.set_level(logging.WARNING, logger="gateway.requests")
    gateway_metrics.GatewayMetrics(CollectorRegistry()).verdict(_context(), _blocked(), 0.003)
    assert not [r for r in caplog.records if r.name == "gateway.requests"]


class _FixedEngine:
    """Answers with prepared verdicts; the tally logic is what is tested."""
    class loaded:
        rule_counts = {"": 1}
        loaded_at = 0.0

    def __init__(self, verdicts):
        self.verdicts = iter(verdicts)

    def evaluate(self, req, verdict=None):
        return next(self.verdicts)


def test_tallied_histogram_equals_observe():
    times_us = [50, 100, 250, 999, 1000, 1001, 2_500, 2_000_000]
    verdicts = [waf_pb2.Verdict(engine_time_us=t) for t in times_us]
    registry, reference = CollectorRegistry(), CollectorRegistry()
    observed = waf_metrics.ObservedEngine(_FixedEngine(verdicts), waf_metrics.WafMetrics(registry))
    expected = waf_metrics.WafMetrics(reference).engine_seconds.labels("default")
    for t in times_us:
        observed.evaluate(_request("10.0.0.1"))
        expected.observe(t / 1e6)

    def samples(reg):
        return sorted((s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
                      for f in reg.collect() if f.name == "modsec_waf_engine_duration_seconds"
                      for s in f.samples if not s.name.endswith("_created"))
    assert samples(registry) == samples(reference)


def test_tallies_reach_the_metrics_within_the_flush_interval():
    from wafsvc.rpc import Timers
    registry = CollectorRegistry()
    verdicts = [waf_pb2.Verdict(intervention=True, matches=[waf_pb2.RuleMatch(id=942100)])] * 3
    timers = Timers()
    observed = waf_metrics.ObservedEngine(_FixedEngine(verdicts), waf_metrics.WafMetrics(registry),
                                          timers.call_later)
    for _ in range(3):
        observed.evaluate(_request("10.0.0.1"))
    # Tallied on the hot path, not yet written; one flush is due within FLUSH_S.
    assert value(registry, "modsec_waf_evaluations_total", app="default", verdict="block") == 0
    assert 0 < timers.wait_s(10.0) <= waf_metrics.FLUSH_S
    time.sleep(timers.wait_s(10.0))
    due = timers.due()
    assert len(due) == 1
    due[0]()
    assert value(registry, "modsec_waf_evaluations_total", app="default", verdict="block") == 3
    assert value(registry, "modsec_waf_rule_matches_total", app="default", rule_id="942100",
                 outcome="blocked") == 3
