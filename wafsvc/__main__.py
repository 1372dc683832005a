"""wafsvc entry point: load rules, fork workers, supervise them.

    python -m wafsvc --crs-dir /usr/share/modsecurity-crs --workers 2
    python -m wafsvc --config /etc/modsec-spoa/apps.yaml
    python -m wafsvc --validate /etc/modsec-spoa/apps.yaml   # 0 valid, 1 invalid, 2 usage

The parent loads and checks the rules before forking, so workers share that
memory and a bad rule file fails at start. gRPC is created only inside the
workers, after fork (gRPC must not be initialised before fork()).

Signals: SIGTERM/SIGINT drain and stop, SIGHUP reloads the applications
file (WAF_CONFIG) and every rule set: first in the supervisor, then, if that
worked, in each worker in turn (wafsvc/rollout.py: each reports with
SIGUSR1 when done), so that while one worker parses the others answer. A
worker pauses around its parse (wafsvc/pause.py): its streams tell the
gateway to send it no requests until it serves again.

Drain: health turns NOT_SERVING, the server refuses new calls (GOAWAY), every
stream tells the gateway to send no new requests (it re-sends anything
refused or unanswered elsewhere) and ends once the worker holds no
transaction: their responses are still inspected here (wafsvc/service.py).
Idle, a worker exits at once; held transactions end with their response or
TTL; calls still running after WAF_DRAIN_GRACE_MS are cut.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time

from common import logs
from common.options import ConfigError, config_error
from common.secrets import read_secret
from wafsvc.apps import Applications, from_config
from wafsvc.config import WafConfig
from wafsvc.engine import Engine
from wafsvc.lifetime import die_with_parent
from wafsvc.rollout import Rollout
from wafsvc.limits import IgnoreListBudget
from wafsvc.rules import RuleSetSpec, RulesError

log = logging.getLogger("wafsvc")

RESTART_BACKOFF_S = 0.5
GRPC_EXPERIMENTS = "-event_engine_listener"


def rule_specs(config: WafConfig) -> dict[str, RuleSetSpec]:
    """Rule-set specs by application, "" for the default (tools, conformance)."""
    apps = from_config(config)
    return {("" if name == apps.default else name): app.rules for name, app in apps.apps.items()}


def serve(config: WafConfig, engine: Engine, replica_id: str, parent: int = 0) -> None:
    from wafsvc.limits import Limited, Limits
    from wafsvc.metrics import observe
    from wafsvc.responses import Responses
    from wafsvc.rpc import Timers
    from wafsvc.service import HOUSEKEEPING_S, build_server, server_credentials, set_serving, worker_name

    # Held transactions (response inspection) are this worker's own, so the
    # store is made here, after the fork.
    responses = Responses(engine, worker_name(replica_id), config.transaction_ttl_ms,
                          config.max_held_transactions)
    # Every request and response is checked before the engine runs (limits,
    # bytes the engine would cut); refusals are counted by observe() too.
    checked = Limited(responses, Limits(config.max_headers, config.max_header_bytes, config.max_uri_bytes,
                                        config.max_body_bytes))
    # Credentials are gRPC objects: built here, after the fork.
    credentials = (server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
                   if config.tls_cert else None)
    token = read_secret(config.token_file) if config.token_file else ""
    timers = Timers()   # run by the server's loop
    observed = observe(checked, timers.call_later)  # metrics (WAF_METRICS) and per-request logs
    server, servicer = build_server(observed, config.listen, config.max_request_bytes, replica_id,
                                    config.workers, credentials=credentials, token=token, timers=timers,
                                    held=lambda: len(responses.store))
    # NOT_SERVING until this worker can answer: a health check never sees the
    # replica ready before its rules are in place.
    set_serving(server, False)
    server.start()
    set_serving(server, True)
    log.info("worker serving", extra={"listen": config.listen, "worker": servicer.worker_id})
    drain = {}

    def stop() -> None:
        if drain:
            return
        drain["started"] = time.monotonic()
        drain["held"] = len(responses.store)
        # NOT_SERVING first (in drain()), so health-checking balancers stop
        # sending; then refuse new calls and end each stream once it has
        # answered what it read.
        servicer.draining = True
        server.drain(config.drain_grace_ms / 1000)

    def reload_and_report() -> None:
        if reload(engine, config):
            observed.sync_rules()
        # Done, either way: the supervisor tells the next worker (wafsvc/rollout.py).
        if parent and os.getppid() == parent:
            os.kill(parent, signal.SIGUSR1)

    server.on_signal(signal.SIGTERM, stop)
    server.on_signal(signal.SIGINT, stop)
    # Out of rotation while it parses; a SIGHUP during a pause's wait is covered by it.
    server.on_signal(signal.SIGHUP, lambda: servicer.pause.run(reload_and_report))
    timers.every(HOUSEKEEPING_S, servicer.housekeeping)
    if config.worker_max_rss_mb:
        timers.every(RSS_CHECK_INTERVAL_S, lambda: over_rss(config.worker_max_rss_mb) and stop())
    server.run()
    # Held past the grace period: their audit entries are written; late responses miss.
    unanswered = responses.close_all()
    observed.flush()  # counts tallied since the last flush
    log.info("worker stopped", extra={"worker": servicer.worker_id, "replica": servicer.replica_id,
                                      "evaluations": servicer.evaluations, "held_at_drain": drain.get("held", 0),
                                      "held_at_exit": unanswered,
                                      "drain_seconds": round(time.monotonic() - drain.get("started", 0), 3)})


RSS_CHECK_INTERVAL_S = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def over_rss(limit_mb: int) -> bool:
    """A worker grown past its memory limit is recycled: it drains like on
    SIGTERM and exits; the supervisor forks a fresh one from the loaded rules."""
    rss = rss_bytes()
    if rss <= limit_mb * 1024 * 1024:
        return False
    log.error("worker over its memory limit; draining and restarting",
              extra={"rss_mb": rss // (1024 * 1024), "limit_mb": limit_mb})
    return True


def reload(engine: Engine, config: WafConfig) -> bool:
    """Reads the applications file and parses every rule set again; on any
    error the applications and rules in service stay."""
    started = time.perf_counter()
    try:
        loaded = engine.reload(from_config(config))
    except ConfigError as exc:   # the file itself (AppFileError: file and line)
        engine.reload_failures += 1
        engine.last_reload_error = str(exc)
        log.error("reload failed; the previous applications and rules stay in service", extra={
            "error": str(exc), "reload_failures": engine.reload_failures})
        return False
    except RulesError as exc:
        log.error("rule reload failed; the previous rules stay in service", extra={
            "error": str(exc), "reload_failures": engine.reload_failures})
        return False
    log.info("rules reloaded", extra={"rules": dict(loaded.rule_counts), "rule_sets": loaded.rule_sets,
                                      "default": engine.apps.default,
                                      "reload_successes": engine.reload_successes,
                                      "seconds": round(time.perf_counter() - started, 3)})
    return True


def run_worker(config: WafConfig, engine: Engine, replica_id: str, parent: int) -> int:
    # A worker whose supervisor was killed drains and exits instead of
    # serving on, unsupervised, beside the replica that replaces it.
    die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        serve(config, engine, replica_id, parent)
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
        self.rollout = Rollout(self._tell_reload)
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
        handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1}
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        if self.exporter is not None:
            self.exporter.start()
        for index in range(self.config.workers):
            self.spawn(index)
        stopping = False
        while self.children:
            wait_s = self.rollout.wait_s()
            info = signal.sigwaitinfo(handled) if wait_s is None else signal.sigtimedwait(handled, wait_s)
            if info is None:                   # a worker never reported its reload
                self.rollout.tick()
                continue
            if info.si_signo == signal.SIGUSR1:
                self.rollout.done(info.si_pid)   # that worker has reloaded: the next one's turn
            elif info.si_signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
                stopping = True
                log.info("stopping: draining workers")
                self.signal_children(signal.SIGTERM)
            elif info.si_signo == signal.SIGHUP:
                ok = reload(self.engine, self.config)  # so restarted workers get the new rules
                if self.exporter is not None:
                    self.exporter.reloaded(ok, self.engine)
                if ok and not stopping:  # what failed here would fail in every worker: they serve on
                    self.rollout.start(sorted(self.children, key=self.children.get))
            self.reap(restart=not stopping)
        if self.exporter is not None:
            self.exporter.stop()
        return 0

    def _tell_reload(self, pid: int) -> bool:
        if pid not in self.children:
            return False
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return False
        return True

    def signal_children(self, signo: int) -> None:
        # The metrics server ignores SIGHUP; it is not in self.children anyway.
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
            self.rollout.done(pid)   # a worker that died while reloading holds up no one
            if self.exporter is not None:
                self.exporter.reaped(pid, restart, index is not None)
            if index is None:
                continue
            if restart:
                log.error("worker died; restarting", extra={"pid": pid, "status": status, "worker": index})
                time.sleep(RESTART_BACKOFF_S)
                self.spawn(index)


def validate(path: str, argv: list[str]) -> int:
    """--validate: reads the applications file as the service would (with
    the environment's defaults) and parses every rule set. 0 valid, 1 not,
    2 a usage or environment error."""
    try:
        config = WafConfig.from_args([*argv, "--config", path])
    except ConfigError as exc:
        return config_error("wafsvc", str(exc))
    logging.basicConfig(level=logging.ERROR)
    try:
        apps = from_config(config)
        engine = Engine(apps, config.ignore_profiles)
    except (ConfigError, RulesError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(describe(apps, engine))
    return 0


def describe(apps: Applications, engine: Engine) -> str:
    """One line per application, then what the rule sets cost to keep."""
    lines = [f"{apps.source}: valid; {len(apps.apps)} application(s), {engine.loaded.rule_sets} distinct "
             f"rule set(s); unknown applications: {apps.unknown}"]
    for name, app in apps.apps.items():
        flags = [app.mode, f"{engine.loaded.rule_counts[name]} rules",
                 f"failure {app.failure_policy or 'caller'}",
                 f"truncated body {app.truncated_body} (min {app.min_inspected})",
                 f"truncated response {app.truncated_response_body}",
                 "responses " + ("inspected" if app.response_inspection else "not inspected")]
        if app.ignore_lists:
            flags.append("ignore lists " + "; ".join(" ".join(map(str, ids)) for ids in app.ignore_lists))
        marker = " (default)" if name == apps.default else ""
        lines.append(f"  {name}{marker}: {', '.join(flags)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--validate" in argv:
        at = argv.index("--validate")
        if at + 1 >= len(argv) or argv[at + 1].startswith("--"):
            return config_error("wafsvc", "--validate needs the applications file: --validate CONFIG")
        return validate(argv[at + 1], argv[:at] + argv[at + 2:])
    try:
        config = WafConfig.from_args(argv)
        apps = from_config(config)
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
        engine = Engine(apps, config.ignore_profiles,
                        ignore_budget=IgnoreListBudget(config.ignore_new_lists_per_min))
    except RulesError as exc:
        log.error("cannot load rules", extra={"error": str(exc)})
        if exporter is not None:
            exporter.stop()
        return 1
    log.info("rules loaded", extra={"rules": dict(engine.loaded.rule_counts), "workers": config.workers,
                                    "rule_sets": engine.loaded.rule_sets, "default": apps.default,
                                    "source": apps.source,
                                    "modes": {name: app.mode for name, app in apps.apps.items()}})
    if exporter is not None:
        # The supervisor's own gauge too: livemin would take its unset 0.
        exporter.metrics.rules(engine.loaded)
    # Inherited by the workers: gRPC's own poller reads the sockets on the
    # thread that waits for events, the one that runs the handlers
    # (wafsvc/rpc.py). A GRPC_EXPERIMENTS of the operator's own stays.
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    supervisor = Supervisor(config, engine)
    supervisor.exporter = exporter
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
