"""Prometheus metrics of the gateway (GATEWAY_METRICS=HOST:PORT turns them on).

One process, one registry. The hot path (one verdict) only adds to plain
ints (Tallies: verdicts, latency, blocks, rule matches, frames), exported
when Prometheus scrapes; label values from requests (Host) or HAProxy
(frontend) are bounded, and the pool's own counters are plain ints read at
scrape time too. Rare events (failures, protocol errors) use
prometheus_client directly.

Names and one PromQL query each: docs/operations.md, "Metrics and logs".
"""

from __future__ import annotations

import logging
import threading

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from common.metrics import BoundedValues, ChildCache, bind_http
from gateway import mapping
from gateway.failures import Failure, NoVerdict
from gateway.requestlog import RequestLog

log = logging.getLogger("gateway.metrics")

# Gateway end to end: NOTIFY decoded -> verdict ready. The deadline (400 ms
# by default) is the last bucket that matters.
LATENCY_BUCKETS = (.0005, .001, .002, .003, .005, .0075, .01, .015, .025, .05, .1, .2, .4, .8, 1.6)

PASS, BLOCK, MATCH, ERROR, MISS = "pass", "block", "match", "error", "miss"


def verdict_kind(verdict) -> str:
    """block: the engine stopped the request; match: rules matched but it
    passes (every would-be block in MODE=detect); pass: nothing matched."""
    if verdict.intervention:
        return BLOCK
    return MATCH if len(verdict.matches) else PASS


class Tallies:
    """The per-request metrics, counted in plain ints and exported when
    Prometheus scrapes: a labelled prometheus_client increment costs a lock
    and a few calls, several per request. Names, labels and buckets are the
    same as prometheus_client's would be. The scrape runs on another thread:
    dict() and list() copies are atomic under the GIL."""

    def __init__(self) -> None:
        self.frames: dict[str, int] = {}
        self.evaluations: dict[tuple[str, str], int] = {}
        self.blocks: dict[tuple[str, str], int] = {}
        self.rules: dict[tuple[int, str], int] = {}
        self.responses: dict[tuple[str, str], int] = {}
        self._bounds = LATENCY_BUCKETS
        self._counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def collect(self):
        for name, doc, labels, values in (
                ("modsec_gateway_spop_frames", "SPOP frames received from HAProxy, by type", ["type"],
                 {(kind,): n for kind, n in dict(self.frames).items()}),
                ("modsec_gateway_evaluations", "evaluations by verdict (pass, block, match, error) and "
                 "application rule set", ["verdict", "app"], dict(self.evaluations)),
                ("modsec_gateway_blocks", "blocked requests by HAProxy frontend and Host (host:port)",
                 ["frontend", "host"], dict(self.blocks)),
                ("modsec_gateway_rule_matches", "rule matches by rule id, and whether the request (or "
                 "response) was blocked", ["rule_id", "outcome"],
                 {(str(rule), outcome): n for (rule, outcome), n in dict(self.rules).items()}),
                ("modsec_gateway_response_evaluations", "responses inspected (check-response), by verdict "
                 "(pass, block, match, miss, error) and application rule set", ["verdict", "app"],
                 dict(self.responses))):
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, n in values.items():
                family.add_metric(list(key), n)
            yield family
        counts, total = list(self._counts), self._sum
        buckets, cumulative = [], 0
        for bound, n in zip(self._bounds + (float("inf"),), counts):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        latency = HistogramMetricFamily("modsec_gateway_request_duration_seconds",
                                        "time from NOTIFY to verdict in the gateway, wafsvc round trip included")
        latency.add_metric([], buckets, total)
        yield latency


class PoolCollector:
    """Reads WafPool's plain-int counters at scrape time: zero hot-path cost."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def collect(self):
        stats = self.pool.stats
        for name, value, doc in (
                ("submitted", stats.submitted, "evaluations handed to the pool"),
                ("answered", stats.answered, "evaluations answered (verdict or failure)"),
                ("timeouts", stats.timeouts, "evaluations that reached the deadline without a verdict"),
                ("retries", stats.retries, "evaluations sent again to another worker"),
                ("stream_failures", stats.lane_failures, "evaluation streams to wafsvc that failed and were reopened"),
                ("errors", stats.errors, "per-request errors reported by wafsvc"),
                ("hedges", getattr(stats, "hedges", 0),
                 "evaluations re-sent because a worker was slow to answer (hung, not dead)"),
                ("recycles", getattr(stats, "recycles", 0),
                 "connection sets replaced (rotation, so new replicas get traffic)"),
                ("coverage_repairs", getattr(stats, "coverage_repairs", 0),
                 "extra connections opened to reach wafsvc workers no stream reached"),
                ("stream_messages", getattr(stats, "messages", 0),
                 "stream messages sent to wafsvc (batched_requests / this = achieved batch size)"),
                ("batched_requests", getattr(stats, "batched", 0), "requests carried by those messages"),
                ("responses", getattr(stats, "responses", 0),
                 "responses sent to the worker that holds their transaction"),
                ("responses_unreachable", getattr(stats, "unreachable", 0),
                 "responses answered at once as misses: the worker named in their handle has no stream "
                 "(dead, draining) or hangs")):
            family = CounterMetricFamily(f"modsec_gateway_pool_{name}", doc)
            family.add_metric([], value)
            yield family
        coverage = GaugeMetricFamily("modsec_gateway_pool_replica_workers",
                                     "per wafsvc replica: workers it reports, and workers the gateway "
                                     "has a stream to", labels=["replica", "state"])
        for replica, (reached, reported) in (self.pool.coverage() if hasattr(self.pool, "coverage")
                                             else {}).items():
            coverage.add_metric([replica, "reached"], reached)
            coverage.add_metric([replica, "reported"], reported)
        yield coverage
        inflight = GaugeMetricFamily("modsec_gateway_pool_inflight", "evaluations waiting for wafsvc now")
        inflight.add_metric([], self.pool.inflight)
        yield inflight
        workers = GaugeMetricFamily("modsec_gateway_pool_workers",
                                    "wafsvc worker processes with at least one open stream")
        workers.add_metric([], len(self.pool.live_workers()))
        yield workers


class GatewayMetrics(RequestLog):
    """The server's hooks with metrics; logging comes from RequestLog."""

    def __init__(self, registry: CollectorRegistry, pool=None, *, request_data: bool = False,
                 max_label_values: int = 64, app_label=None) -> None:
        super().__init__(request_data)
        r = registry
        self._open = Gauge("modsec_gateway_spop_connections_open", "SPOP connections from HAProxy open now",
                           registry=r)
        self._opened = Counter("modsec_gateway_spop_connections_opened", "SPOP connections accepted",
                               registry=r)
        closed = Counter("modsec_gateway_spop_connections_closed", "SPOP connections closed, by how",
                         ["reason"], registry=r)
        self._closed = ChildCache(lambda reason: closed.labels(reason))
        protocol = Counter("modsec_gateway_spop_protocol_errors",
                           "connections dropped for a malformed or unexpected SPOP frame, by SPOP status",
                           ["status"], registry=r)
        self._protocol = ChildCache(lambda status: protocol.labels(status))
        invalid = Counter("modsec_gateway_invalid_requests",
                          "requests that could not be inspected whole: malformed SPOP frame or message, "
                          "body truncated by HAProxy, or an error from the engine", ["reason"], registry=r)
        self._invalid = ChildCache(lambda reason: invalid.labels(reason))
        messages = Counter("modsec_gateway_invalid_messages",
                           "SPOE messages refused (answered by the failure policy) because the SPOE file "
                           "does not match what the gateway expects: by message name, problem "
                           "(unknown_message, missing_argument, null_argument, wrong_type, bad_value) "
                           "and argument", ["message", "problem", "argument"], registry=r)
        self._messages = ChildCache(lambda key: messages.labels(*key))
        self._message_names = BoundedValues(32)
        failures = Counter("modsec_gateway_failures", "requests answered by the failure policy, by reason",
                           ["reason"], registry=r)
        self._failures = ChildCache(lambda reason: failures.labels(reason))
        misses = Counter("modsec_gateway_response_misses", "responses whose held transaction was gone, "
                         "answered by the miss policy: by reason (expired, evicted, reloaded, unknown, "
                         "other_worker, no_route, worker_hung, no_handle) and policy (pass, block)", ["reason", "policy"],
                         registry=r)
        self._misses = ChildCache(lambda key: misses.labels(*key))
        response_failures = Counter("modsec_gateway_response_failures", "responses answered by the "
                                    "failure policy (no verdict, not a miss), by reason", ["reason"], registry=r)
        self._response_failures = ChildCache(lambda reason: response_failures.labels(reason))
        # Per request: plain ints, exported at scrape time (Tallies).
        tallies = self._tallies = Tallies()
        registry.register(tallies)
        self._frames = tallies.frames
        self._evaluations = tallies.evaluations
        self._blocks = tallies.blocks
        self._rules = tallies.rules
        self._responses = tallies.responses
        self._observe = tallies.observe
        grpc_errors = Counter("modsec_gateway_grpc_errors", "errors from wafsvc: per-request error codes and "
                              "failed streams, by wafsvc worker", ["worker", "code"], registry=r)
        self._grpc_errors = ChildCache(lambda key: grpc_errors.labels(*key))
        retries = Counter("modsec_gateway_grpc_retries", "evaluations retried elsewhere, by the worker that "
                          "failed them", ["worker"], registry=r)
        self._retries = ChildCache(lambda worker: retries.labels(worker))
        self._frontends = BoundedValues(max_label_values)
        self._hosts = BoundedValues(max_label_values)
        self._apps = BoundedValues(max_label_values)
        # A failed request's application as a bounded label (gateway/apps.py:
        # a configured name or _unknown); verdicts name theirs.
        self._app_label = app_label or (lambda name: name or "default")
        self._registry = registry
        if pool is not None:
            self.watch_pool(pool)

    def watch_pool(self, pool) -> None:
        """Exports the pool's counters, read at scrape time. (The pool calls
        retried and grpc_error: it is given this object as its hooks.)"""
        self._registry.register(PoolCollector(pool))

    # -- GatewayHooks --------------------------------------------------------
    def connection_opened(self) -> None:
        self._open.inc()
        self._opened.inc()

    def connection_closed(self, status: str) -> None:
        self._open.dec()
        self._closed[status].inc()

    def frame(self, kind: str) -> None:
        frames = self._frames
        frames[kind] = frames.get(kind, 0) + 1

    def protocol_error(self, status: str) -> None:
        self._protocol[status].inc()
        self._invalid["spop_frame"].inc()

    def invalid_message(self, error: mapping.InvalidMessage) -> None:
        super().invalid_message(error)
        self._invalid["message"].inc()
        # The argument comes from the gateway's own schemas: bounded already.
        self._messages[(self._message_names(error.message), error.problem.value, error.argument)].inc()

    def verdict(self, context: mapping.RequestContext, verdict, seconds: float) -> None:
        if self.debug or (self.info and verdict.intervention):
            super().verdict(context, verdict, seconds)
        self._observe(seconds)
        kind = verdict_kind(verdict)
        key = (kind, self._apps(verdict.application or context.app or "default"))
        evaluations = self._evaluations
        evaluations[key] = evaluations.get(key, 0) + 1
        if kind != PASS:
            self._not_passed(context, verdict, kind)

    def _not_passed(self, context: mapping.RequestContext, verdict, kind: str) -> None:
        """A request's or a response's verdict that did more than pass: the
        truncation, blocks by frontend and host, and the rules that matched.
        (Passes skip it: the hot path.)"""
        if context.body_truncated:
            self._invalid["body_truncated"].inc()
        if kind == BLOCK:
            key = (self._frontends(context.frontend), self._hosts(context.host))
            self._blocks[key] = self._blocks.get(key, 0) + 1
        outcome = "blocked" if kind == BLOCK else "passed"
        rules = self._rules
        for match in verdict.matches:
            key = (match.id, outcome)
            rules[key] = rules.get(key, 0) + 1

    def failure(self, context, failure: NoVerdict, seconds: float) -> None:
        self._failures[failure.label].inc()
        if context is None:
            return  # an invalid message: counted by invalid_message, never evaluated
        self._observe(seconds)
        key = (ERROR, self._apps(self._app_label(context.app)))
        self._evaluations[key] = self._evaluations.get(key, 0) + 1
        if failure.failure is Failure.REFUSED:
            self._invalid["engine_error"].inc()
        if context.body_truncated:
            self._invalid["body_truncated"].inc()

    # -- responses -------------------------------------------------------------
    def response_verdict(self, context: mapping.RequestContext, verdict, seconds: float) -> None:
        super().response_verdict(context, verdict, seconds)
        kind = verdict_kind(verdict)
        key = (kind, self._apps(context.app or "default"))
        self._responses[key] = self._responses.get(key, 0) + 1
        if kind != PASS:
            self._not_passed(context, verdict, kind)

    def response_miss(self, context: mapping.RequestContext, failure: NoVerdict, policy, seconds: float) -> None:
        super().response_miss(context, failure, policy, seconds)
        self._misses[(failure.miss.value, policy.value)].inc()
        key = (MISS, self._apps(context.app or "default"))
        self._responses[key] = self._responses.get(key, 0) + 1

    def response_failure(self, context, failure: NoVerdict, seconds: float) -> None:
        self._response_failures[failure.label].inc()
        if context is None:
            return  # an invalid message: counted by invalid_message
        key = (ERROR, self._apps(context.app or "default"))
        self._responses[key] = self._responses.get(key, 0) + 1

    # -- pool ----------------------------------------------------------------
    def retried(self, worker: str) -> None:
        self._retries[worker].inc()

    def grpc_error(self, worker: str, code: str) -> None:
        self._grpc_errors[(worker or "unknown", code)].inc()


def serve(address: str, registry: CollectorRegistry):
    """Serves /metrics on a daemon thread; the event loop never waits on it."""
    server = bind_http(address, registry)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("metrics listening", extra={"metrics": address})
    return server
