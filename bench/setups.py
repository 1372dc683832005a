"""The setups under test, each started once and left idle between runs:

- haproxy:  HAProxy, no WAF, serving a static file (the ceiling)
- spoa-*:   the same HAProxy frontend with SPOE -> gateway -> wafsvc (one
            replica of WAF_WORKERS=2), one stack per rule set
- nginx:    nginx + ModSecurity-nginx, 2 workers, one server per rule set
The raw engine runs in-process (bench/engine_run.py) and needs no setup.
"""

from __future__ import annotations

import http.client
import os
import pathlib
import shutil
import subprocess
import time

from bench import procstat, rulesets, workloads
from stack.processes import ROOT, Stack, StackSpec, free_port, wait_for_health, wait_for_port

CONF = ROOT / "bench" / "conf"
SPOE_CONF = ROOT / "deploy" / "haproxy" / "spoe-modsecurity.conf"
NGINX_MODULE = "/usr/lib/nginx/modules/ngx_http_modsecurity_module.so"
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


class Setup:
    name = ""
    ours: tuple[str, ...] = ()   # process groups that are modsec-spoa itself

    def port(self, rules: str) -> int:
        raise NotImplementedError

    def groups(self, rules: str) -> dict[str, list[int]]:
        """Process group name -> pids, for CPU and memory accounting."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class HaproxySetup(Setup):
    """HAProxy alone, or in front of the gateway when `rules` is given."""

    def __init__(self, run_dir: pathlib.Path, haproxy_bin: str, rules: str = "", crs_dir: str = "",
                 replicas: int = 1, workers: int = 2, gateway_env: dict | None = None) -> None:
        self.rules = rules
        self.name = f"spoa-{rules}" if rules else "haproxy"
        self.ours = ("gateway", "wafsvc") if rules else ()
        index = write_www(run_dir)
        haproxy_env = {"INDEX_FILE": str(index)}
        if rules:
            haproxy_env["BENCH_WAF"] = "1"
        self.metrics_port = free_port() if rules else 0
        gateway_env = {**(gateway_env or {}), **({"GATEWAY_METRICS": f"127.0.0.1:{self.metrics_port}"} if rules else {})}
        spec = StackSpec(wafsvc_ports=[free_port() for _ in range(replicas)], wafsvc_workers=workers,
                         wafsvc_env={**rulesets.wafsvc_env(rules, crs_dir), "LOG_LEVEL": "warning"} if rules else {},
                         gateway_env={"LOG_LEVEL": "info", **(gateway_env or {})},
                         haproxy_env=haproxy_env, haproxy_bin=haproxy_bin,
                         haproxy_cfg=CONF / "haproxy.cfg", spoe_conf=SPOE_CONF,
                         log_dir=run_dir / self.name)
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

    def port(self, rules: str) -> int:
        return self.stack.spec.frontend_port

    def batch_counters(self) -> tuple[float, float]:
        return batch_counters(self.metrics_port) if self.metrics_port else (0.0, 0.0)

    def groups(self, rules: str) -> dict[str, list[int]]:
        out = {"haproxy": [self.stack.proc("haproxy").pid]}
        if self.rules:
            out["gateway"] = [self.stack.proc("gateway").pid]
            out["wafsvc"] = [pid for name, proc in self.stack.procs if name.startswith("wafsvc")
                             for pid in procstat.with_children(proc.pid)]
        return out

    def stop(self) -> None:
        self.stack.stop()


class NginxSetup(Setup):
    name = "nginx"

    def __init__(self, run_dir: pathlib.Path, crs_dir: str = "") -> None:
        if not shutil.which("nginx") or not os.path.exists(NGINX_MODULE):
            raise FileNotFoundError("nginx or ModSecurity-nginx missing: bash scripts/install.sh bench")
        run = run_dir / "nginx"
        run.mkdir(parents=True, exist_ok=True)
        # Workers may run as an unprivileged user: let them read the run folder.
        for path in (run_dir, run):
            path.chmod(0o755)
        write_www(run)
        for rules in ("crs", "trivial"):
            (run / f"rules-{rules}.conf").write_text(rulesets.composed_text(rules, crs_dir))
        self.ports = {"crs": free_port(), "trivial": free_port()}
        conf = (CONF / "nginx.conf").read_text().replace("@RUN@", str(run))
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


def verdicts(port: int, mix: str) -> dict[str, int]:
    """Sends every request of a mix once; status code -> count. Proves that
    a setup blocks what it should before its speed is worth anything."""
    counts: dict[str, int] = {}
    for req in workloads.MIXES[mix]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.putrequest(req.method, req.path, skip_host=True, skip_accept_encoding=True)
            for name, value in req.all_headers():
                conn.putheader(name, value)
            conn.endheaders(req.body or None)
            status = conn.getresponse().status
        finally:
            conn.close()
        counts[str(status)] = counts.get(str(status), 0) + 1
    return counts


def settle(seconds: float = 0.5) -> None:
    time.sleep(seconds)
