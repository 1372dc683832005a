"""wafsvc entry point: load rules, fork workers, supervise them.

    python -m wafsvc --crs-dir /usr/share/modsecurity-crs --workers 2

The parent loads and checks the rules before forking, so workers share that
memory and a bad rule file fails at start. gRPC is created only inside the
workers, after fork (gRPC must not be initialised before fork()).

Signals: SIGTERM/SIGINT drain and stop, SIGHUP reloads rules everywhere.

Drain: health turns NOT_SERVING, the server refuses new calls (GOAWAY), every
stream ends as soon as it has answered what it read (idle ones at once; the
gateway re-sends anything unanswered elsewhere), and the worker exits. Calls
still running after WAF_DRAIN_GRACE_MS are cut.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time

from common import logs
from common.options import ConfigError, config_error
from common.secrets import read_secret
from wafsvc.config import WafConfig
from wafsvc.engine import Engine
from wafsvc.lifetime import die_with_parent
from wafsvc.limits import IgnoreListBudget
from wafsvc.rules import RuleSetSpec, RulesError

log = logging.getLogger("wafsvc")

RESTART_BACKOFF_S = 0.5


def rule_specs(config: WafConfig) -> dict[str, RuleSetSpec]:
    common = dict(base_conf=config.base_conf, mode=config.mode, crs_dir=config.crs_dir,
                  crs_setup=config.crs_setup, paranoia=config.paranoia,
                  extra_directives=config.extra_directives,
                  audit_log=config.audit_log, audit_log_parts=config.audit_log_parts)
    specs = {}
    if config.rules or config.crs_dir:
        specs[""] = RuleSetSpec(rules_file=config.rules, **common)
    for name, path in config.apps.items():
        specs[name] = RuleSetSpec(rules_file=path, **common)
    return specs


async def serve(config: WafConfig, engine: Engine, replica_id: str) -> None:
    from wafsvc.limits import Limited, Limits
    from wafsvc.metrics import observe
    from wafsvc.responses import Responses
    from wafsvc.service import build_server, server_credentials, set_serving, worker_name

    # Held transactions (response inspection) are this worker's own, so the
    # store is made here, after the fork.
    responses = Responses(engine, worker_name(replica_id), config.transaction_ttl_ms,
                          config.max_held_transactions)
    # Every request and response is checked before the engine runs (limits,
    # bytes the engine would cut); refusals are counted by observe() too.
    checked = Limited(responses, Limits(config.max_headers, config.max_header_bytes, config.max_uri_bytes,
                                        config.max_body_bytes))
    observed = observe(checked)  # metrics (WAF_METRICS) and per-request logs
    # Credentials are gRPC objects: built here, after the fork.
    credentials = (server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
                   if config.tls_cert else None)
    token = read_secret(config.token_file) if config.token_file else ""
    server, servicer, health = build_server(observed, config.listen, config.max_request_bytes,
                                            replica_id, config.workers,
                                            credentials=credentials, token=token)
    # NOT_SERVING until this worker can answer: a health check never sees the
    # replica ready before its rules are in place.
    await set_serving(health, False)
    await server.start()
    await set_serving(health, True)
    log.info("worker serving", extra={"listen": config.listen, "worker": servicer.worker_id})
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload(engine, config) and observed.sync_rules())
    housekeeping = asyncio.create_task(servicer.housekeeping())
    watchdog = None
    if config.worker_max_rss_mb:
        watchdog = asyncio.create_task(watch_rss(config.worker_max_rss_mb, stopping))
    await stopping.wait()
    if watchdog is not None:
        watchdog.cancel()
    started = time.monotonic()
    # NOT_SERVING first, so health-checking balancers stop sending; then
    # refuse new calls and end each stream once it has answered what it read.
    servicer.draining = True
    await set_serving(health, False)
    stop = asyncio.ensure_future(server.stop(config.drain_grace_ms / 1000))
    await asyncio.sleep(0)  # let stop() send GOAWAY before the streams end
    servicer.drain()
    await stop
    housekeeping.cancel()
    responses.close_all()  # their audit entries are written; late responses miss
    observed.flush()  # counts tallied since the last flush
    log.info("worker stopped", extra={"worker": servicer.worker_id, "replica": servicer.replica_id,
                                      "evaluations": servicer.evaluations,
                                      "drain_seconds": round(time.monotonic() - started, 3)})


RSS_CHECK_INTERVAL_S = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


async def watch_rss(limit_mb: int, stopping: asyncio.Event) -> None:
    """Recycles a worker that grew past its memory limit: it drains like on
    SIGTERM and exits; the supervisor forks a fresh one from the loaded rules."""
    while not stopping.is_set():
        rss = rss_bytes()
        if rss > limit_mb * 1024 * 1024:
            log.error("worker over its memory limit; draining and restarting",
                      extra={"rss_mb": rss // (1024 * 1024), "limit_mb": limit_mb})
            stopping.set()
            return
        await asyncio.sleep(RSS_CHECK_INTERVAL_S)


def reload(engine: Engine, config: WafConfig) -> bool:
    """Parses the rules again; on any error the rules in service stay."""
    started = time.perf_counter()
    try:
        loaded = engine.reload(rule_specs(config))
    except RulesError as exc:
        log.error("rule reload failed; the previous rules stay in service", extra={
            "error": str(exc), "reload_failures": engine.reload_failures})
        return False
    log.info("rules reloaded", extra={"rules": dict(loaded.rule_counts),
                                      "reload_successes": engine.reload_successes,
                                      "seconds": round(time.perf_counter() - started, 3)})
    return True


def run_worker(config: WafConfig, engine: Engine, replica_id: str, parent: int) -> int:
    # A worker whose supervisor was killed drains and exits instead of
    # serving on, unsupervised, beside the replica that replaces it.
    die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        import uvloop
        uvloop.run(serve(config, engine, replica_id))
    except Exception:
        log.exception("worker failed")
        return 1
    return 0


class Supervisor:
    """Keeps `workers` processes alive; forwards SIGTERM/SIGINT/SIGHUP."""

    def __init__(self, config: WafConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.children: dict[int, int] = {}  # pid -> worker index
        self.exporter = None  # wafsvc.metrics.Exporter when WAF_METRICS is set
        # Names this replica in stream metadata; a restarted replica is a new one.
        self.replica_id = f"{socket.gethostname()}/{os.getpid()}"

    def spawn(self, index: int) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            os._exit(run_worker(self.config, self.engine, self.replica_id, parent))
        self.children[pid] = index
        if self.exporter is not None:
            self.exporter.worker_started()

    def run(self) -> int:
        handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        if self.exporter is not None:
            self.exporter.start()
        for index in range(self.config.workers):
            self.spawn(index)
        stopping = False
        while self.children:
            info = signal.sigwaitinfo(handled)
            if info.si_signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
                stopping = True
                log.info("stopping: draining workers")
                self.signal_children(signal.SIGTERM)
            elif info.si_signo == signal.SIGHUP:
                ok = reload(self.engine, self.config)  # so restarted workers get the new rules
                if self.exporter is not None:
                    self.exporter.reloaded(ok, self.engine)
                self.signal_children(signal.SIGHUP)
            self.reap(restart=not stopping)
        if self.exporter is not None:
            self.exporter.stop()
        return 0

    def signal_children(self, signo: int) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signo)
            except ProcessLookupError:
                pass

    def reap(self, restart: bool) -> None:
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if self.exporter is not None:
                self.exporter.reaped(pid, restart, index is not None)
            if index is None:
                continue
            if restart:
                log.error("worker died; restarting", extra={"pid": pid, "status": status, "worker": index})
                time.sleep(RESTART_BACKOFF_S)
                self.spawn(index)


def main(argv: list[str] | None = None) -> int:
    try:
        config = WafConfig.from_args(argv)
    except ConfigError as exc:
        return config_error("wafsvc", str(exc))
    logs.setup(config.log_level, "wafsvc")
    exporter = None
    if config.metrics:
        from wafsvc.metrics import Exporter
        try:
            exporter = Exporter(config.metrics)  # before any worker exists: they inherit its directory
        except OSError as exc:
            log.error("cannot listen for metrics", extra={"metrics": config.metrics, "error": str(exc)})
            return 1
    if config.token_file:  # checked before forking, so a bad file fails at start
        try:
            read_secret(config.token_file)
        except (OSError, ValueError) as exc:
            return config_error("wafsvc", f"WAF_TOKEN_FILE: {exc}")
    try:
        engine = Engine(rule_specs(config), config.ignore_profiles, config.truncated_body,
                        preload=config.ignore_preload,
                        ignore_budget=IgnoreListBudget(config.ignore_new_lists_per_min))
    except RulesError as exc:
        log.error("cannot load rules", extra={"error": str(exc)})
        if exporter is not None:
            exporter.stop()
        return 1
    log.info("rules loaded", extra={"rules": dict(engine.loaded.rule_counts), "workers": config.workers,
                                    "mode": config.mode, "paranoia": config.paranoia})
    if exporter is not None:
        # The supervisor's own gauge too: livemin would take its unset 0.
        exporter.metrics.rules(engine.loaded)
    supervisor = Supervisor(config, engine)
    supervisor.exporter = exporter
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
