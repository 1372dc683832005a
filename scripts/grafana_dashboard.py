"""Builds deploy/grafana/dashboards/modsec-spoa.json from the panel list
below, so the dashboard is edited as code and reviewed as a diff:

    python scripts/grafana_dashboard.py > deploy/grafana/dashboards/modsec-spoa.json

tests/unit/test_observability.py checks that the JSON is this output and
that it only names metrics and labels the services export.
"""
import json
R = "$__rate_interval"
panels, y = [], 0
pid = 0
def row(title):
    global y, pid
    pid += 1
    panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1
x = 0
def panel(title, targets, unit="short", w=8, kind="timeseries", desc=""):
    global x, y, pid
    pid += 1
    if x + w > 24:
        x = 0; y += 8
    p = {"id": pid, "type": kind, "title": title, "description": desc,
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "gridPos": {"h": 8, "w": w, "x": x, "y": y},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
         "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": l,
                      "datasource": {"type": "prometheus", "uid": "${datasource}"}} for i, (e, l) in enumerate(targets)]}
    panels.append(p)
    x += w
def newrow(title):
    global x, y
    if x: y += 8
    x = 0
    row(title)

newrow("Traffic and verdicts")
panel("Evaluations by verdict", [(f'sum by (verdict) (rate(modsec_gateway_evaluations_total[{R}]))', "{{verdict}}")], "reqps",
      desc="pass: nothing matched; match: rules matched, request passed (every would-be block in MODE=detect); block; error: no verdict, failure policy applied")
panel("Blocked share", [(f'sum(rate(modsec_gateway_evaluations_total{{verdict="block"}}[{R}])) / sum(rate(modsec_gateway_evaluations_total[{R}]))', "blocked")], "percentunit")
panel("Blocks by frontend and host", [(f'sum by (frontend, host) (rate(modsec_gateway_blocks_total[{R}]))', "{{frontend}} {{host}}")], "reqps",
      desc="host is the Host header (host:port); at most 64 distinct values, later ones count as _other")
panel("Top rules in blocked requests", [(f'topk(10, sum by (rule_id) (rate(modsec_gateway_rule_matches_total{{outcome="blocked"}}[{R}])))', "{{rule_id}}")], "reqps", w=12)
panel("Top rules matched without a block", [(f'topk(10, sum by (rule_id) (rate(modsec_gateway_rule_matches_total{{outcome="passed"}}[{R}])))', "{{rule_id}}")], "reqps", w=12,
      desc="in MODE=detect these are the rules that would have blocked")
panel("Evaluations by application (gateway)", [(f'sum by (app, verdict) (rate(modsec_gateway_evaluations_total[{R}]))', "{{app}} {{verdict}}")], "reqps", w=12,
      desc="app: the application (WAF_CONFIG) that judged the request, as HAProxy's txn.modsec.app named it")
panel("Evaluations by rule set (wafsvc)", [(f'sum by (app, verdict) (rate(modsec_waf_evaluations_total[{R}]))', "{{app}} {{verdict}}")], "reqps", w=12)
panel("Blocks by rule set and rule (wafsvc)", [(f'topk(10, sum by (app, rule_id) (rate(modsec_waf_rule_matches_total{{outcome="blocked"}}[{R}])))', "{{app}} {{rule_id}}")], "reqps", w=12)

newrow("Latency")
panel("Gateway end to end (NOTIFY to verdict)", [
    (f'histogram_quantile({q}, sum by (le) (rate(modsec_gateway_request_duration_seconds_bucket[{R}])))', f"p{int(q*100)}") for q in (0.5, 0.95, 0.99)], "s", w=12)
panel("Engine alone (wafsvc), by rule set", [
    (f'histogram_quantile({q}, sum by (le, app) (rate(modsec_waf_engine_duration_seconds_bucket[{R}])))', f"{{{{app}}}} p{int(q*100)}") for q in (0.5, 0.99)], "s", w=12)

newrow("Errors and invalid requests")
panel("Error rate (no verdict)", [(f'sum(rate(modsec_gateway_evaluations_total{{verdict="error"}}[{R}])) / sum(rate(modsec_gateway_evaluations_total[{R}]))', "errors")], "percentunit")
panel("Failure policy applied, by reason", [(f'sum by (reason) (rate(modsec_gateway_failures_total[{R}]))', "{{reason}}")], "reqps")
panel("Invalid requests, by reason", [(f'sum by (reason) (rate(modsec_gateway_invalid_requests_total[{R}]))', "gateway {{reason}}"),
                                      (f'sum by (reason) (rate(modsec_waf_invalid_requests_total[{R}]))', "wafsvc {{reason}}")], "reqps",
      desc="spop_frame, message: malformed SPOP; body_truncated: HAProxy cut the body (tune.bufsize); engine_error and error codes: wafsvc refused or failed")
panel("Truncated bodies", [(f'sum(rate(modsec_gateway_invalid_requests_total{{reason="body_truncated"}}[{R}]))', "requests, gateway"),
                           (f'sum by (app, reason) (rate(modsec_waf_invalid_requests_total{{reason=~"body_truncated|response_body_truncated"}}[{R}]))', "{{app}} {{reason}}, wafsvc")], "reqps",
      desc="bodies longer than HAProxy's tune.bufsize arrive cut: what arrived is inspected, then the truncated-body policy passes them flagged (99010/99011) or denies them")
panel("SPOE messages refused (SPOE file mismatch)", [(f'sum by (message, problem, argument) (increase(modsec_gateway_invalid_messages_total[{R}]))', "{{message}} {{problem}} {{argument}}")], "short",
      desc="the SPOE file sends what the gateway does not expect (unknown message, missing or null argument, wrong type): each is answered by the failure policy. Anything here is a configuration mistake")
panel("SPOP protocol errors, by status", [(f'sum by (status) (rate(modsec_gateway_spop_protocol_errors_total[{R}]))', "{{status}}")], "reqps")
panel("gRPC errors, by code", [(f'sum by (code) (rate(modsec_gateway_grpc_errors_total[{R}]))', "{{code}}")], "reqps")
panel("Retries, by wafsvc worker", [(f'sum by (worker) (rate(modsec_gateway_grpc_retries_total[{R}]))', "{{worker}}")], "reqps")

newrow("Response inspection")
panel("Responses by verdict", [(f'sum by (verdict) (rate(modsec_gateway_response_evaluations_total[{R}]))', "{{verdict}}")], "reqps",
      desc="responses of requests kept for inspection (check-response); miss: the held transaction was gone, the miss policy answered")
panel("Responses by application (wafsvc)", [(f'sum by (app, verdict) (rate(modsec_waf_response_evaluations_total[{R}]))', "{{app}} {{verdict}}")], "reqps")
panel("Response misses, by reason", [(f'sum by (reason, policy) (rate(modsec_gateway_response_misses_total[{R}]))', "gateway {{reason}} ({{policy}})"),
                                     (f'sum by (reason) (rate(modsec_waf_response_misses_total[{R}]))', "wafsvc {{reason}}")], "reqps",
      desc="no_route: the worker holding the transaction has no stream (died, drains); worker_hung; expired/evicted/reloaded/unknown: wafsvc no longer had it")
panel("Held transactions (waiting for their response)", [("sum(modsec_waf_held_transactions)", "held")], "short",
      desc="per worker at most WAF_MAX_HELD_TRANSACTIONS (about 60 KB each with CRS)")
panel("Held transactions ended without a response, by reason", [(f'sum by (reason) (rate(modsec_waf_held_transaction_evictions_total[{R}]))', "{{reason}}")], "ops",
      desc="expired: past WAF_TRANSACTION_TTL_MS; evicted: past WAF_MAX_HELD_TRANSACTIONS; reloaded; shutdown")
panel("Responses without a verdict", [(f'sum by (reason) (rate(modsec_gateway_response_failures_total[{R}]))', "failure policy: {{reason}}"),
                                      (f'sum(rate(modsec_gateway_pool_responses_unreachable_total[{R}]))', "holding worker unreachable")], "reqps")

newrow("Envoy (ext_authz, ext_proc)")
panel("Envoy calls, by API and result", [(f'sum by (api, result) (rate(modsec_waf_envoy_calls_total[{R}]))', "{{api}} {{result}}")], "reqps", w=12,
      desc="one per HTTP request Envoy sends; abandoned: Envoy ended the ext_proc stream before a verdict")
panel("Envoy calls denied or failed", [(f'sum by (api) (rate(modsec_waf_envoy_calls_total{{result=~"denied|error"}}[{R}])) / sum by (api) (rate(modsec_waf_envoy_calls_total[{R}]))', "{{api}}")], "percentunit", w=12)

newrow("Pool health")
panel("wafsvc workers", [("sum(modsec_gateway_pool_workers)", "reached by the gateway"), ("sum(modsec_waf_workers)", "alive (wafsvc)")], "short")
panel("Evaluations in flight", [("sum(modsec_gateway_pool_inflight)", "in flight")], "short")
panel("Streams failed, hedges, timeouts", [(f'sum(rate(modsec_gateway_pool_stream_failures_total[{R}]))', "stream failures"),
                                   (f'sum(rate(modsec_gateway_pool_hedges_total[{R}]))', "re-sent from a slow worker"),
                                   (f'sum(rate(modsec_gateway_pool_timeouts_total[{R}]))', "deadline reached")], "ops")
panel("Workers reached per replica", [('sum by (replica) (modsec_gateway_pool_replica_workers{state="reached"})', "{{replica}} reached"),
                                      ('sum by (replica) (modsec_gateway_pool_replica_workers{state="reported"})', "{{replica}} has")], "short",
      desc="a replica with fewer workers reached than it has is only partly used")
panel("SPOP connections open", [("sum(modsec_gateway_spop_connections_open)", "open")], "short")
panel("SPOP frames, by type", [(f'sum by (type) (rate(modsec_gateway_spop_frames_total[{R}]))', "{{type}}")], "ops")
panel("Worker restarts", [(f'sum(increase(modsec_waf_worker_restarts_total[1h]))', "last hour")], "short", kind="stat")

newrow("Rules")
panel("Rules loaded", [("max by (app) (modsec_waf_rules_loaded)", "{{app}}")], "short", kind="stat")
panel("Age of the oldest rule set in service", [("time() - min(modsec_waf_rules_loaded_timestamp_seconds)", "age")], "s", kind="stat")
panel("Reloads in the last hour", [('sum by (result) (increase(modsec_waf_reloads_total[1h]))', "{{result}}")], "short", kind="stat")

dash = {"uid": "modsec-spoa", "title": "modsec-spoa", "tags": ["waf", "haproxy", "modsecurity"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                  "current": {"text": "Prometheus", "value": "prometheus"}, "label": "Data source"}]},
        "annotations": {"list": []}, "editable": False, "panels": panels}
if __name__ == "__main__":
    print(json.dumps(dash, indent=2))
