"""The setups `make bench` compares, each started once and left idle
between runs:

- haproxy: HAProxy, no WAF, serving a static page itself (the ceiling)
- spoa:    the same HAProxy frontend with SPOE -> gateway -> wafsvc (one
           replica of WAF_WORKERS=2), one stack per rule set
- nginx:   nginx + ModSecurity-nginx, 2 workers, one server per rule set
The raw engine runs in-process (bench/engine_run.py) and needs no setup.

Adding a setup (response inspection, Envoy...): subclass Setup, say which
rule sets it runs, whether it must block attacks and which process groups
are the product under test, and add the class to SETUPS. Every phase of the
harness (verdict checks, throughput, latency curves, same-rate latency)
then runs it beside the others; its keys in latest.json are
"<name>/<rules>/<mix>". Headline ratios stay explicit in bench/report.py.
"""

from __future__ import annotations

import http.client
import os
import pathlib
import shutil
import subprocess
from dataclasses import dataclass

from bench import procstat, rulesets, workloads
from stack.processes import ROOT, Stack, StackSpec, free_port, wait_for_health, wait_for_port

CONF = ROOT / "bench" / "conf"
SPOE_CONF = ROOT / "deploy" / "haproxy" / "spoe-modsecurity.conf"
NGINX_MODULES = ("/usr/lib/nginx/modules/ngx_http_modsecurity_module.so",
                 "/usr/lib/nginx/modules/ngx_http_echo_module.so")
INDEX_HTML = ("<!doctype html><html lang=en><head><meta charset=utf-8><title>Shop</title>"
              "<link rel=stylesheet href=/static/app.css></head><body><header><nav>"
              + "".join(f"<a href=/catalog/{c}>{c}</a>" for c in ("shoes", "boots", "socks", "sale"))
              + "</nav></header><main><h1>Trail runners</h1>"
              + "".join(f"<article><h2>Model {i}</h2><p>Light, grippy, waterproof.</p></article>" for i in range(8))
              + "</main></body></html>\n")


def write_www(run_dir: pathlib.Path) -> pathlib.Path:
    www = run_dir / "www"
    www.mkdir(parents=True, exist_ok=True)
    index = www / "index.html"
    index.write_text(INDEX_HTML)
    return index


@dataclass(frozen=True)
class Context:
    """What every setup gets to start."""
    run_dir: pathlib.Path
    haproxy_bin: str
    crs_dir: str
    replicas: int = 1
    workers: int = 2


class Setup:
    name = ""                      # key prefix in latest.json
    label = ""                     # in tables and charts
    rules: tuple[str, ...] = ()    # rule sets it runs; ("none",) for no WAF
    blocks = True                  # must block every attack before it is timed
    ours: tuple[str, ...] = ()     # process groups that are the product under test

    def port(self, rules: str) -> int:
        raise NotImplementedError

    def groups(self, rules: str) -> dict[str, list[int]]:
        """Process group name -> pids, for CPU and memory accounting."""
        raise NotImplementedError

    def counters(self, rules: str) -> dict[str, float]:
        """Monotonic counters read before and after each run (optional)."""
        return {}

    def stop(self) -> None:
        raise NotImplementedError


class HaproxyStack:
    """One native stack: HAProxy alone, or in front of gateway and wafsvc
    when `rules` is given."""

    def __init__(self, run_dir: pathlib.Path, haproxy_bin: str, rules: str = "", crs_dir: str = "",
                 replicas: int = 1, workers: int = 2, gateway_env: dict | None = None,
                 haproxy_cfg: pathlib.Path = CONF / "haproxy.cfg", haproxy_env: dict | None = None,
                 name: str = "spoa") -> None:
        self.rules = rules
        index = write_www(run_dir)
        haproxy_env = {"INDEX_FILE": str(index), **(haproxy_env or {})}
        if rules:
            haproxy_env["BENCH_WAF"] = "1"
        self.metrics_port = free_port() if rules else 0
        gateway_env = {**(gateway_env or {}), **({"GATEWAY_METRICS": f"127.0.0.1:{self.metrics_port}"} if rules else {})}
        spec = StackSpec(wafsvc_ports=[free_port() for _ in range(replicas)], wafsvc_workers=workers,
                         wafsvc_env={**rulesets.wafsvc_env(rules, crs_dir), "LOG_LEVEL": "warning"} if rules else {},
                         gateway_env={"LOG_LEVEL": "info", **(gateway_env or {})},
                         haproxy_env=haproxy_env, haproxy_bin=haproxy_bin,
                         haproxy_cfg=haproxy_cfg, spoe_conf=SPOE_CONF,
                         log_dir=run_dir / (f"{name}-{rules}" if rules else "haproxy"))
        self.stack = Stack(spec)
        try:
            if rules:
                replicas_procs = [self.stack.start_wafsvc(i) for i in range(replicas)]
                for i, proc in enumerate(replicas_procs):
                    wait_for_health(spec.wafsvc_ports[i], proc, f"wafsvc{i + 1}")
                self.stack.start_gateway()
            self.stack.start_haproxy()
            self.stack.wait_until_protected()
        except BaseException:
            self.stack.stop()
            raise

    @property
    def port(self) -> int:
        return self.stack.spec.frontend_port

    def groups(self) -> dict[str, list[int]]:
        out = {"haproxy": [self.stack.proc("haproxy").pid]}
        if self.rules:
            out["gateway"] = [self.stack.proc("gateway").pid]
            out["wafsvc"] = [pid for name, proc in self.stack.procs if name.startswith("wafsvc")
                             for pid in procstat.with_children(proc.pid)]
        return out

    def stop(self) -> None:
        self.stack.stop()


class HaproxyAlone(Setup):
    name, label, rules, blocks = "haproxy", "HAProxy\nno WAF", ("none",), False

    def __init__(self, ctx: Context) -> None:
        self.stack = HaproxyStack(ctx.run_dir, ctx.haproxy_bin)

    def port(self, rules: str) -> int:
        return self.stack.port

    def groups(self, rules: str) -> dict[str, list[int]]:
        return self.stack.groups()

    def stop(self) -> None:
        self.stack.stop()


class Spoa(Setup):
    name, label, rules = "spoa", "HAProxy +\nmodsec-spoa", ("crs", "trivial")
    ours = ("gateway", "wafsvc")   # modsec-spoa itself; HAProxy is counted beside it

    def __init__(self, ctx: Context) -> None:
        self.stacks: dict[str, HaproxyStack] = {}
        try:
            for rules in self.rules:
                self.stacks[rules] = self._stack(ctx, rules)
        except BaseException:
            self.stop()
            raise

    def _stack(self, ctx: Context, rules: str) -> HaproxyStack:
        """One rule set's stack (subclasses put a backend behind it)."""
        return HaproxyStack(ctx.run_dir, ctx.haproxy_bin, rules=rules, crs_dir=ctx.crs_dir,
                            replicas=ctx.replicas, workers=ctx.workers)

    def port(self, rules: str) -> int:
        return self.stacks[rules].port

    def groups(self, rules: str) -> dict[str, list[int]]:
        return self.stacks[rules].groups()

    def counters(self, rules: str) -> dict[str, float]:
        messages, batched = batch_counters(self.stacks[rules].metrics_port)
        return {"stream_messages": messages, "batched_requests": batched}

    def stop(self) -> None:
        for stack in self.stacks.values():
            stack.stop()


class Nginx(Setup):
    """nginx + ModSecurity-nginx. The page comes from the echo module's
    content handler: it runs after ModSecurity's phase 2 (the body is
    inspected) and answers POSTs with 200, where the static module answers
    405 and an error_page redirect would run ModSecurity twice."""
    name, label, rules = "nginx", "nginx +\nModSecurity", ("crs", "trivial")

    def __init__(self, ctx: Context) -> None:
        missing = [m for m in NGINX_MODULES if not os.path.exists(m)]
        if not shutil.which("nginx") or missing:
            raise FileNotFoundError(f"nginx or its modules missing ({missing}): bash scripts/install.sh bench")
        run = ctx.run_dir / "nginx"
        run.mkdir(parents=True, exist_ok=True)
        # Workers may run as an unprivileged user: let them read the run folder.
        for path in (ctx.run_dir, run):
            path.chmod(0o755)
        for rules in self.rules:
            (run / f"rules-{rules}.conf").write_text(rulesets.composed_text(rules, ctx.crs_dir))
        self.ports = {rules: free_port() for rules in self.rules}
        conf = (CONF / "nginx.conf").read_text().replace("@RUN@", str(run))
        conf = conf.replace("@PAGE@", INDEX_HTML.rstrip("\n"))  # echo adds the newline back
        conf = conf.replace("@CRS_PORT@", str(self.ports["crs"])).replace("@TRIVIAL_PORT@", str(self.ports["trivial"]))
        (run / "nginx.conf").write_text(conf)
        self.log = open(run / "nginx.out", "ab")
        self.proc = subprocess.Popen(["nginx", "-p", str(run), "-c", str(run / "nginx.conf"),
                                      "-e", str(run / "nginx-error.log")],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for port in self.ports.values():
                wait_for_port(port, self.proc, "nginx", timeout=60)
        except BaseException:
            self.stop()
            raise

    def port(self, rules: str) -> int:
        return self.ports[rules]

    def groups(self, rules: str) -> dict[str, list[int]]:
        return {"nginx": procstat.with_children(self.proc.pid)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# The harness runs these, in this order. Envoy's (issue 16) live in
# bench/envoy_setups.py, response inspection's (issue 13) in
# bench/response_setups.py.
from bench.envoy_setups import EnvoyAuthz, EnvoyExtProc  # noqa: E402  (they build on Setup above)
from bench.response_setups import SpoaProxied, SpoaResponses  # noqa: E402

SETUPS: tuple[type[Setup], ...] = (HaproxyAlone, Spoa, Nginx, EnvoyAuthz, EnvoyExtProc, SpoaProxied, SpoaResponses)


def batch_counters(metrics_port: int) -> tuple[float, float]:
    """(stream messages, requests they carried) from a gateway's metrics:
    their ratio over a run is the batch size it achieved."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("modsec_gateway_pool_stream_messages_total", "modsec_gateway_pool_batched_requests_total"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return (values.get("modsec_gateway_pool_stream_messages_total", 0.0),
            values.get("modsec_gateway_pool_batched_requests_total", 0.0))


def statuses(port: int, mix: str) -> list[int]:
    """Sends every request of a mix once, in order; the status of each.
    Proves that a setup answers and blocks what it should before its speed
    is worth anything."""
    out = []
    for req in workloads.MIXES[mix]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.putrequest(req.method, req.path, skip_host=True, skip_accept_encoding=True)
            for name, value in req.all_headers():
                conn.putheader(name, value)
            conn.endheaders(req.body or None)
            out.append(conn.getresponse().status)
        finally:
            conn.close()
    return out
