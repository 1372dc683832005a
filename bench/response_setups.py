"""Response inspection (issue 13) in `make bench`: what inspecting the
response costs per request, beside nginx + ModSecurity, which runs phases
3 and 4 on every response it serves.

- spoa_proxied:   HAProxy + SPOE + gateway + wafsvc inspecting requests
                  only, in front of a backend (bench/conf/haproxy-responses.cfg);
- spoa_responses: the same, responses inspected too (the frontend opts in).

HAProxy runs no http-response rules on a page it makes itself, so these two
need a backend where the spoa setup has none; it is a second frontend of the
same HAProxy serving the same page. The added cost of response inspection is
spoa_responses minus spoa_proxied, taken side by side (report.summarise:
`response_inspection_added_cpu_us_<rules>`); spoa_responses against nginx is
the like-for-like comparison of a WAF that sees both directions.
"""

from __future__ import annotations

from bench.setups import CONF, Context, HaproxyStack, Spoa  # defined before bench.setups imports this module
from stack.processes import free_port

CONFIG = CONF / "haproxy-responses.cfg"


class SpoaProxied(Spoa):
    name, label = "spoa_proxied", "HAProxy +\nmodsec-spoa,\nbackend"
    responses = False

    def _stack(self, ctx: Context, rules: str) -> HaproxyStack:
        env = {"PAGE_ADDR": f"127.0.0.1:{free_port()}"}
        if self.responses:
            env["BENCH_RESPONSES"] = "1"
        return HaproxyStack(ctx.run_dir, ctx.haproxy_bin, rules=rules, crs_dir=ctx.crs_dir, replicas=ctx.replicas,
                            workers=ctx.workers, haproxy_cfg=CONFIG, haproxy_env=env, name=self.name)


class SpoaResponses(SpoaProxied):
    name, label = "spoa_responses", "HAProxy +\nmodsec-spoa,\nresponses"
    responses = True


def summarise(t: dict, cpu) -> dict[str, float]:
    """The headline figures of response inspection from the throughput runs
    (`t`: key -> run), `cpu(run, groups)` being report.py's CPU sum."""
    s: dict[str, float] = {}
    for rules in ("crs", "trivial"):
        on, off = t.get(f"spoa_responses/{rules}/benign"), t.get(f"spoa_proxied/{rules}/benign")
        if on and off:
            s[f"response_inspection_added_cpu_us_{rules}"] = cpu(on) - cpu(off)
            s[f"response_inspection_cpu_us_{rules}"] = cpu(on)
        nginx = t.get(f"nginx/{rules}/benign")
        if on and nginx:
            s[f"response_inspection_cpu_ratio_vs_nginx_{rules}"] = cpu(on) / cpu(nginx, ("nginx",))
            s[f"response_inspection_throughput_ratio_vs_nginx_{rules}"] = on["rps"] / nginx["rps"]
    return s
