"""Prometheus metrics and per-request logs of wafsvc.

One scrape shows the whole replica. wafsvc runs several worker processes, so
prometheus-client's multiprocess mode is used: before anything imports
prometheus_client, the supervisor points PROMETHEUS_MULTIPROC_DIR at a fresh
private directory; every process then writes its values to its own
memory-mapped files there, and a small HTTP server (forked by the
supervisor, so the supervisor itself stays single-threaded) merges them per
scrape with MultiProcessCollector. When a worker exits, its live gauges are
dropped (mark_process_dead); its counters stay, so totals never go back.

Workers see requests through ObservedEngine, a thin wrapper around the
engine (and its held-transaction store, wafsvc/responses.py): the gRPC
service is unchanged and metrics cost one extra call.
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import Callable

from wafsvc.errors import EvaluationFailed
from wafsvc.lifetime import die_with_parent
from wafsvc.responses import TransactionMiss

log = logging.getLogger("wafsvc.requests")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Engine work for one request: ~0.7 ms for a CRS GET, several ms for forms.
ENGINE_BUCKETS = (.0001, .00025, .0005, .00075, .001, .0015, .0025, .005, .01, .025, .05, .1, .25, 1.0)
PASS, BLOCK, MATCH, ERROR = "pass", "block", "match", "error"
# Longest a count waits in a worker before it reaches the shared files (and
# so a scrape); well under any scrape interval.
FLUSH_S = 0.25
ACTIVE: "WafMetrics | None" = None   # set in the supervisor, inherited by the workers


def verdict_kind(verdict) -> str:
    """Same classes as the gateway's: block, match (not blocked), pass."""
    if verdict.intervention:
        return BLOCK
    return MATCH if len(verdict.matches) else PASS


class WafMetrics:
    """Metric objects; `registry=None` in multiprocess mode (the collector
    reads the files), a CollectorRegistry in unit tests."""

    def __init__(self, registry=None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = registry
        self.evaluations = Counter("modsec_waf_evaluations", "evaluations by application rule set and verdict "
                                   "(pass, block, match, error)", ["app", "verdict"], registry=r)
        self.rule_matches = Counter("modsec_waf_rule_matches", "rule matches by rule set, rule id, and whether "
                                    "the request was blocked", ["app", "rule_id", "outcome"], registry=r)
        self.invalid = Counter("modsec_waf_invalid_requests", "requests not inspected whole: body truncated "
                               "before inspection, or refused/failed by the engine (ErrorReason)",
                               ["app", "reason"], registry=r)
        self.responses = Counter("modsec_waf_response_evaluations", "responses of held transactions evaluated, "
                                 "by rule set and verdict (pass, block, match, error)", ["app", "verdict"],
                                 registry=r)
        self.misses = Counter("modsec_waf_response_misses", "responses whose held transaction was not there: "
                              "expired, evicted, reloaded, unknown, other_worker", ["reason"], registry=r)
        self.held = Gauge("modsec_waf_held_transactions", "transactions held for their response",
                          multiprocess_mode="livesum", registry=r)
        self.evictions = Counter("modsec_waf_held_transaction_evictions", "held transactions ended without "
                                 "their response: expired (TTL), evicted (count cap), reloaded, shutdown",
                                 ["reason"], registry=r)
        self.engine_seconds = Histogram("modsec_waf_engine_duration_seconds", "libmodsecurity work for one "
                                        "request (phases 1-2 and logging)", ["app"], buckets=ENGINE_BUCKETS,
                                        registry=r)
        self.rules_loaded = Gauge("modsec_waf_rules_loaded", "rules in the rule set in service, per rule set",
                                  ["app"], multiprocess_mode="livemax", registry=r)
        self.loaded_at = Gauge("modsec_waf_rules_loaded_timestamp_seconds", "when the oldest rule set still "
                               "in service in a live process was loaded (Unix time)",
                               multiprocess_mode="livemin", registry=r)
        self.reloads = Counter("modsec_waf_reloads", "rule reloads (SIGHUP) by result; a failed reload "
                               "keeps the previous rules", ["result"], registry=r)
        self.workers = Gauge("modsec_waf_workers", "worker processes alive in this replica",
                             multiprocess_mode="livesum", registry=r)
        self.restarts = Counter("modsec_waf_worker_restarts", "worker processes that died and were restarted",
                                registry=r)
        self.envoy_calls = Counter("modsec_waf_envoy_calls", "Envoy calls (ext_authz Check, ext_proc streams: "
                                   "one per HTTP request) by api and result (allowed, denied, error, abandoned)",
                                   ["api", "result"], registry=r)

    def rules(self, loaded) -> None:
        for app, count in loaded.rule_counts.items():
            self.rules_loaded.labels(app or "default").set(count)
        self.loaded_at.set(loaded.loaded_at)


class ObservedEngine:
    """The engine as the gRPC service sees it, plus metrics and logs.

    Blocks are logged at info, everything else per request at debug, errors
    at warning; lines carry the request's unique_id (HAProxy's unique-id),
    never request data.

    Metrics are tallied in plain dicts per request (well under a
    microsecond) and written to the shared files at most every FLUSH_S, from
    the server loop: a multiprocess increment costs ~4 us (lock, getpid,
    mmap write), and a blocked CRS request touches six or more series.
    """

    def __init__(self, engine, metrics: WafMetrics | None,
                 later: Callable[[float, Callable[[], None]], None] | None = None) -> None:
        self._engine = engine
        self._metrics = metrics
        self._later = later   # the server's call_later; without one (tools, tests) tallies are written at once
        self._info = log.isEnabledFor(logging.INFO)
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._children: dict = {}
        self._counts: dict = {}                  # counter child -> pending increments
        self._observed: dict = {}                # histogram child -> [count per bucket..., sum]
        self._flush_scheduled = False
        self._store = getattr(engine, "store", None)     # held transactions, when responses are inspected
        self._evicted = {}                               # store.ended at the last flush
        if metrics is not None:
            self._bounds = metrics.engine_seconds._upper_bounds   # ends with +Inf
            metrics.rules(engine.loaded)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def sync_rules(self) -> None:
        """After a reload: held transactions learn of it (wafsvc/responses.py),
        and the rules gauges describe what now serves."""
        reloaded = getattr(self._engine, "rules_reloaded", None)
        if reloaded is not None:
            reloaded()
        if self._metrics is not None:
            self._metrics.rules(self._engine.loaded)

    def evaluate(self, req, verdict=None):
        try:
            verdict = self._engine.evaluate(req, verdict)
        except EvaluationFailed as exc:
            self._failed(req, exc)
            raise
        self.request_verdict(req.application, req.transaction_id, verdict, req.body_truncated)
        return verdict

    def request_verdict(self, app: str, transaction_id: str, verdict, body_truncated: bool = False) -> None:
        """Counts and logs a request's verdict: evaluate() and the front
        ends that drive a Transaction themselves (Envoy's ext_proc)."""
        kind = verdict_kind(verdict)
        if self._metrics is not None:
            self._count(app or "default", body_truncated, verdict, kind)
        if kind == BLOCK:
            if self._info:
                log.info("request blocked", extra=self._event(transaction_id, app, verdict))
        elif verdict.body_truncated:
            # Passed with part of its body never inspected: always worth a line.
            if self._info:
                log.info("request passed with its body inspected in part",
                         extra=self._event(transaction_id, app, verdict))
        elif kind == MATCH and self._info and self._detects(verdict.application):
            # Detection only: these lines are what the application is for.
            log.info("request matched, not blocked (detect mode)", extra=self._event(transaction_id, app, verdict))
        elif self._debug:
            log.debug("request evaluated", extra={**self._event(transaction_id, app, verdict), "verdict": kind})

    def evaluate_response(self, resp, verdict=None):
        try:
            verdict = self._engine.evaluate_response(resp, verdict)
        except TransactionMiss as exc:
            if self._metrics is not None:
                self._add(self._child(self._metrics.misses, exc.reason_name.lower().removeprefix("transaction_")))
                self._schedule_flush()
            if self._info:
                log.info("response without its held transaction", extra={
                    "unique_id": resp.transaction_id, "reason": exc.reason_name})
            raise
        except EvaluationFailed as exc:
            if self._metrics is not None:
                self._add(self._child(self._metrics.responses, "_unknown", ERROR))
                self._schedule_flush()
            log.warning("response evaluation failed", extra={"unique_id": resp.transaction_id,
                                                              "code": exc.code, "reason": exc.reason_name,
                                                              "error": exc.message})
            raise
        self.response_verdict(resp.transaction_id, verdict)
        return verdict

    def response_verdict(self, transaction_id: str, verdict) -> None:
        """Counts and logs the verdict on a response (phases 3-4)."""
        kind = verdict_kind(verdict)
        app = verdict.application or "default"
        if self._metrics is not None:
            add = self._add
            add(self._child(self._metrics.responses, app, kind))
            if verdict.body_truncated:
                add(self._child(self._metrics.invalid, app, "response_body_truncated"))
            if kind != PASS:
                outcome = "blocked" if kind == BLOCK else "passed"
                for match in verdict.matches:
                    add(self._child(self._metrics.rule_matches, app, str(match.id), outcome))
            self._schedule_flush()
        if kind == BLOCK:
            if self._info:
                log.info("response blocked", extra=self._event(transaction_id, app, verdict))
        elif self._debug:
            log.debug("response evaluated", extra={**self._event(transaction_id, app, verdict), "verdict": kind})

    def envoy_call(self, api: str, result: str) -> None:
        """One Envoy call ended: api ext_authz or ext_proc; result allowed,
        denied, error or abandoned (Envoy ended the stream first)."""
        if self._metrics is not None:
            self._add(self._child(self._metrics.envoy_calls, api, result))
            self._schedule_flush()

    def housekeeping(self) -> None:
        """Every second, from the worker's server loop: expired held
        transactions end, and the gauges and counts reach the shared files."""
        sweep = getattr(self._engine, "sweep", None)
        if sweep is not None:
            sweep()
        self.flush()

    def flush(self) -> None:
        """Writes the tallies to the shared metric files."""
        self._flush_scheduled = False
        if self._store is not None and self._metrics is not None:
            self._metrics.held.set(len(self._store))
            for reason, total in self._store.ended.items():
                if total != self._evicted.get(reason, 0):
                    self._metrics.evictions.labels(reason.value).inc(total - self._evicted.get(reason, 0))
                    self._evicted[reason] = total
        counts, self._counts = self._counts, {}
        for child, amount in counts.items():
            child.inc(amount)
        observed, self._observed = self._observed, {}
        for child, tally in observed.items():
            # Histogram.observe, n at a time: the sum, then each bucket
            # (stored per bucket, made cumulative when collected).
            child._sum.inc(tally[-1])
            for index, amount in enumerate(tally[:-1]):
                if amount:
                    child._buckets[index].inc(amount)

    # -- hot path helpers ----------------------------------------------------
    def _child(self, metric, *labels):
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _add(self, child) -> None:
        self._counts[child] = self._counts.get(child, 0) + 1

    def _count(self, app: str, body_truncated: bool, verdict, kind: str) -> None:
        m = self._metrics
        # The configured application that judged it (not the name asked
        # for, which is client input): a bounded label.
        app = verdict.application or app
        add = self._add
        add(self._child(m.evaluations, app, kind))
        seconds = verdict.engine_time_us / 1e6
        child = self._child(m.engine_seconds, app)
        tally = self._observed.get(child)
        if tally is None:
            tally = self._observed[child] = [0] * len(self._bounds) + [0.0]
        tally[bisect.bisect_left(self._bounds, seconds)] += 1   # first bound >= seconds, as observe()
        tally[-1] += seconds
        if body_truncated:
            add(self._child(m.invalid, app, "body_truncated"))
        if kind != PASS:
            outcome = "blocked" if kind == BLOCK else "passed"
            for match in verdict.matches:
                add(self._child(m.rule_matches, app, str(match.id), outcome))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_scheduled:
            return
        if self._later is None:
            self.flush()
            return
        self._flush_scheduled = True
        self._later(FLUSH_S, self.flush)

    def _failed(self, req, exc: EvaluationFailed) -> None:
        self.failed(req.application, req.transaction_id, exc)

    def failed(self, app: str, transaction_id: str, exc: EvaluationFailed) -> None:
        """Counts and logs an evaluation that has no verdict."""
        label = self._label(app)   # unknown names are client input: not a label
        app = app or "default"
        if self._metrics is not None:
            self._add(self._child(self._metrics.evaluations, label, ERROR))
            self._add(self._child(self._metrics.invalid, label, exc.reason_name.lower()))
            self._schedule_flush()
        log.warning("evaluation failed", extra={"unique_id": transaction_id, "app": app,
                                                "code": exc.code, "reason": exc.reason_name,
                                                "error": exc.message})

    def _detects(self, name: str) -> bool:
        apps = getattr(self._engine, "apps", None)
        app = apps.apps.get(name) if apps is not None else None
        return app is not None and app.mode == "detect"

    def _label(self, name: str) -> str:
        """The configured application a name stands for, or "_unknown"."""
        apps = getattr(self._engine, "apps", None)
        if apps is None:
            label = name or "default"
            return label if label in self._engine.loaded.rule_counts else "_unknown"
        app = apps.resolve(name)
        return app.name if app is not None else "_unknown"

    @staticmethod
    def _event(transaction_id: str, app: str, verdict) -> dict:
        event = {"unique_id": transaction_id or verdict.transaction_id,
                 "app": verdict.application or app or "default",
                 "status": verdict.status, "rules": [m.id for m in verdict.matches],
                 "engine_us": verdict.engine_time_us}
        if verdict.body_truncated:
            # What was not inspected, for the log: "N bytes inspected, M declared".
            event["body_truncated"] = next((m.matched_data for m in verdict.matches
                                            if m.id in (99010, 99011)), True)
        return event


def observe(engine, later: Callable[[float, Callable[[], None]], None] | None = None) -> ObservedEngine:
    return ObservedEngine(engine, ACTIVE, later)


def _collector(path: str):
    """MultiProcessCollector, minus one race: a process that is being born
    has created its file but not yet sized it, and reading an empty file
    fails the whole scrape (seen on worker restarts). Such a process has no
    values yet, so its file is skipped."""
    import glob
    from prometheus_client.multiprocess import MultiProcessCollector

    def sized(name: str) -> bool:
        try:
            return os.path.getsize(name) >= 8
        except FileNotFoundError:
            return False

    class Collector(MultiProcessCollector):
        def collect(self):
            return self.merge([f for f in glob.glob(os.path.join(path, "*.db")) if sized(f)], accumulate=True)

    return Collector(None, path=path)


class Exporter:
    """The supervisor's side: the multiprocess directory, its own metrics
    (workers, restarts, reloads) and the /metrics server process."""

    def __init__(self, address: str) -> None:
        global ACTIVE
        if "prometheus_client" in sys.modules and os.environ.get(MULTIPROC_ENV) is None:
            raise RuntimeError("prometheus_client was imported before its multiprocess directory was set")
        # Private and fresh: values left by an earlier run must not be summed in.
        self.path = tempfile.mkdtemp(prefix="wafsvc-metrics-")
        os.environ[MULTIPROC_ENV] = self.path
        from prometheus_client import CollectorRegistry

        from common.metrics import bind_http

        registry = CollectorRegistry()
        registry.register(_collector(self.path))
        try:
            self.server = bind_http(address, registry)   # fails here, at start, if the port is taken
        except OSError:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        self.address = address
        self.metrics = ACTIVE = WafMetrics()
        self.pid = 0
        self.live_workers = 0

    # -- the HTTP server process -------------------------------------------
    def start(self) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            die_with_parent(parent)  # never outlive a SIGKILLed supervisor, holding the port
            os._exit(self._serve())
        self.pid = pid
        log.info("metrics listening", extra={"metrics": self.address, "server_pid": pid})

    def _serve(self) -> int:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the supervisor decides when we stop
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            self.server.serve_forever()
        except SystemExit:
            pass
        return 0

    def stop(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = 0
        self.server.server_close()
        shutil.rmtree(self.path, ignore_errors=True)

    # -- supervisor events -------------------------------------------------
    def worker_started(self) -> None:
        self.live_workers += 1
        self.metrics.workers.set(self.live_workers)

    def reaped(self, pid: int, restart: bool, was_worker: bool) -> None:
        """A child exited: drop its live gauges; restart the HTTP server if
        it was the one that died."""
        from prometheus_client import multiprocess

        if pid == self.pid:
            self.pid = 0
            if restart:
                log.error("metrics server died; restarting", extra={"server_pid": pid})
                self.start()
            return
        multiprocess.mark_process_dead(pid, self.path)
        if was_worker:
            self.live_workers -= 1
            self.metrics.workers.set(self.live_workers)
            if restart:
                self.metrics.restarts.inc()

    def reloaded(self, ok: bool, engine) -> None:
        self.metrics.reloads.labels("success" if ok else "failure").inc()
        self.metrics.rules(engine.loaded)
