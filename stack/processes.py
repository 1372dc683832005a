"""Starts and stops the local topology, in dependency order."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAPROXY_DIR = ROOT / "deploy" / "haproxy"
DEBIAN_CRS = "/usr/share/modsecurity-crs"
# make up's several sites: wafsvc's applications and HAProxy's Host map.
DEMO_APPS = ROOT / "deploy" / "wafsvc" / "apps.yaml"
APPS_MAP = HAPROXY_DIR / "apps.map"


IGNORE_RULES_SETTING = re.compile(r"set-var\(txn\.ignorerules\)\s+str\('([^']*)'\)")


def ignore_lists_in(haproxy_cfg: pathlib.Path) -> str:
    """The txn.ignorerules lists a HAProxy config sets, as WAF_IGNORE_PRELOAD
    wants them, so wafsvc builds their rule sets before the first request."""
    return ";".join(IGNORE_RULES_SETTING.findall(pathlib.Path(haproxy_cfg).read_text()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{name} did not listen on port {port} within {timeout}s")


def health_channel(port: int, gateway_env: dict[str, str]):
    """A channel to wafsvc that speaks TLS when the gateway's settings do."""
    import grpc

    def read(name: str) -> bytes | None:
        path = gateway_env.get(name)
        return pathlib.Path(path).read_bytes() if path else None
    if not (gateway_env.get("GATEWAY_TLS_CA") or gateway_env.get("GATEWAY_TLS_CERT")):
        return grpc.insecure_channel(f"127.0.0.1:{port}")
    credentials = grpc.ssl_channel_credentials(read("GATEWAY_TLS_CA"), read("GATEWAY_TLS_KEY"),
                                               read("GATEWAY_TLS_CERT"))
    name = gateway_env.get("GATEWAY_TLS_SERVER_NAME")
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)


def wait_for_health(port: int, proc: subprocess.Popen, name: str, timeout: float = 60.0,
                    gateway_env: dict[str, str] | None = None) -> None:
    """Waits until wafsvc's grpc.health.v1 says SERVING (rules loaded)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with health_channel(port, gateway_env or {}) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="waf.v1.Waf"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{name} was not SERVING within {timeout}s")


@dataclass
class StackSpec:
    """Ports default to free ones; `make up` pins the documented ports."""
    frontend_port: int = field(default_factory=free_port)
    frontend_alt_port: int = field(default_factory=free_port)
    backend_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    wafsvc_ports: list[int] = field(default_factory=lambda: [free_port()])
    wafsvc_workers: int = 1
    # Prometheus /metrics per wafsvc replica (same order as wafsvc_ports); empty = off.
    wafsvc_metrics_ports: list[int] = field(default_factory=list)
    # RULES / CRS_DIR / PARANOIA / MODE / WAF_* for every replica.
    wafsvc_env: dict[str, str] = field(default_factory=lambda: {"CRS_DIR": DEBIAN_CRS})
    gateway_env: dict[str, str] = field(default_factory=dict)
    haproxy_env: dict[str, str] = field(default_factory=dict)
    haproxy_bin: str = os.environ.get("HAPROXY_BIN", "haproxy")
    haproxy_cfg: pathlib.Path = HAPROXY_DIR / "haproxy.cfg"
    spoe_conf: pathlib.Path = HAPROXY_DIR / "spoe-modsecurity.conf"
    log_dir: pathlib.Path | None = None  # None: inherit the terminal
    # Where the Python services run from: another checkout compares code side by side.
    code_root: pathlib.Path = ROOT


class Stack:
    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._logs: list = []

    # -- one process -----------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        root = self.spec.code_root
        full_env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1", **env}
        if self.spec.log_dir is not None:
            self.spec.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.spec.log_dir / f"{name}.log", "ab")
            self._logs.append(out)
        else:
            out = None
        # Own session: Ctrl-C reaches only the launcher, which stops the
        # processes in order instead of all at once.
        proc = subprocess.Popen(argv, env=full_env, cwd=root, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start_backend(self) -> None:
        proc = self._spawn("backend", [sys.executable, str(ROOT / "deploy/backend/albedo.py"),
                                       "--listen", f"127.0.0.1:{self.spec.backend_port}"], {})
        wait_for_port(self.spec.backend_port, proc, "backend")

    def start_wafsvc(self, index: int) -> subprocess.Popen:
        port = self.spec.wafsvc_ports[index]
        env = {"WAF_LISTEN": f"127.0.0.1:{port}", "WAF_WORKERS": str(self.spec.wafsvc_workers),
               "WAF_IGNORE_PRELOAD": ignore_lists_in(self.spec.haproxy_cfg), **self.spec.wafsvc_env}
        if index < len(self.spec.wafsvc_metrics_ports):
            env["WAF_METRICS"] = f"127.0.0.1:{self.spec.wafsvc_metrics_ports[index]}"
        proc = self._spawn(f"wafsvc{index + 1}", [sys.executable, "-m", "wafsvc"], env)
        return proc

    def start_gateway(self) -> subprocess.Popen:
        targets = ",".join(f"127.0.0.1:{port}" for port in self.spec.wafsvc_ports)
        env = {"GATEWAY_LISTEN": f"127.0.0.1:{self.spec.gateway_port}",
               "GATEWAY_WAFSVC": f"ipv4:{targets}", **self.spec.gateway_env}
        proc = self._spawn("gateway", [sys.executable, "-m", "gateway"], env)
        wait_for_port(self.spec.gateway_port, proc, "gateway")
        return proc

    def start_haproxy(self) -> subprocess.Popen:
        env = {"FRONTEND_ADDR": f"127.0.0.1:{self.spec.frontend_port}",
               "FRONTEND_ALT_ADDR": f"127.0.0.1:{self.spec.frontend_alt_port}",
               "BACKEND_ADDR": f"127.0.0.1:{self.spec.backend_port}",
               "GATEWAY_ADDR": f"127.0.0.1:{self.spec.gateway_port}",
               "SPOE_CONF": str(self.spec.spoe_conf), **self.spec.haproxy_env}
        proc = self._spawn("haproxy", [self.spec.haproxy_bin, "-db", "-f", str(self.spec.haproxy_cfg)], env)
        wait_for_port(self.spec.frontend_port, proc, "haproxy")
        return proc

    # -- the whole stack ---------------------------------------------------
    def start(self) -> "Stack":
        try:
            self.start_backend()
            replicas = [self.start_wafsvc(i) for i in range(len(self.spec.wafsvc_ports))]
            for i, proc in enumerate(replicas):
                wait_for_health(self.spec.wafsvc_ports[i], proc, f"wafsvc{i + 1}",
                                gateway_env=self.spec.gateway_env)
            self.start_gateway()
            self.start_haproxy()
            self.wait_until_protected()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_protected(self, timeout: float = 15.0) -> None:
        """HAProxy marks the agent up after its first spop-check; until then
        requests fail closed. Wait for a first real verdict."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.spec.frontend_port}/"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code not in (503, 504):
                    return  # a verdict (e.g. 403 from block-localhost rules)
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("the stack never answered with a verdict")

    def proc(self, name: str) -> subprocess.Popen:
        return next(p for n, p in reversed(self.procs) if n == name)

    # -- faults, for the pool tests and the failover measurement ----------
    def kill_wafsvc(self, index: int, signo: int = signal.SIGKILL) -> int:
        """Signals a whole replica (supervisor and workers: its own process
        group), as a container runtime would; returns its exit status."""
        proc = self.proc(f"wafsvc{index + 1}")
        try:
            os.killpg(proc.pid, signo)
        except ProcessLookupError:
            pass
        return proc.wait(30)

    def restart_wafsvc(self, index: int) -> subprocess.Popen:
        """Starts replica `index` again on its port and waits until SERVING."""
        old = self.proc(f"wafsvc{index + 1}")
        if old.poll() is None:
            raise RuntimeError(f"wafsvc{index + 1} is still running")
        self.procs = [(n, p) for n, p in self.procs if p is not old]
        proc = self.start_wafsvc(index)
        wait_for_health(self.spec.wafsvc_ports[index], proc, f"wafsvc{index + 1}")
        return proc

    def stop(self, timeout: float = 15.0) -> dict[str, int]:
        """SIGTERM in reverse start order (HAProxy first), then wait."""
        codes = {}
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if name != "haproxy" else signal.SIGUSR1)
            try:
                codes[name] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        self.procs.clear()
        for out in self._logs:
            out.close()
        self._logs.clear()
        return codes

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
