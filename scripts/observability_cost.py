"""What metrics and logging cost: the same stack with them off and on,
side by side, under wrk (bench/loadgen.py, the benchmark mixes).

    PYTHONPATH=. .venv/bin/python scripts/observability_cost.py [--seconds 4] [--rounds 3]

Three stacks run at once, idle but one: `off` (no metrics, LOG_LEVEL=warning),
`metrics` (GATEWAY_METRICS and WAF_METRICS on, LOG_LEVEL=warning) and `all`
(metrics, LOG_LEVEL=info so every block is logged by both services, and the
JSON audit log). Runs alternate between them, round after round, so drift
on the shared CPU hits all three alike; compare the ratios within a run, not
the absolute numbers. CPU per request is the gateway's and wafsvc's own CPU
time (/proc) divided by the requests answered.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import sys
import tempfile

from bench import loadgen, procstat
from stack import Stack, StackSpec, free_port
from stack.processes import DEBIAN_CRS

CONFIGS = ("off", "metrics", "all")


def start(name: str, work: pathlib.Path, crs_dir: str, workers: int) -> Stack:
    wafsvc_env = {"CRS_DIR": crs_dir, "LOG_LEVEL": "warning"}
    gateway_env = {"LOG_LEVEL": "warning"}
    metrics_ports: list[int] = []
    if name in ("metrics", "all"):
        metrics_ports = [free_port()]
        gateway_env["GATEWAY_METRICS"] = f"127.0.0.1:{free_port()}"
    if name == "all":
        wafsvc_env.update(LOG_LEVEL="info", WAF_AUDIT_LOG=str(work / name / "audit.json"))
        gateway_env["LOG_LEVEL"] = "info"
    spec = StackSpec(log_dir=work / name, wafsvc_workers=workers, wafsvc_env=wafsvc_env,
                     wafsvc_metrics_ports=metrics_ports, gateway_env=gateway_env)
    return Stack(spec).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--crs-dir", default=DEBIAN_CRS)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="obs-cost-"))
    stacks = {}
    try:
        for name in CONFIGS:
            stacks[name] = start(name, work, args.crs_dir, args.workers)
        results: dict[tuple[str, str], list[dict]] = {}
        for round_ in range(args.rounds):
            for mix in ("benign", "attack"):
                # Rotate the order each round: no setup always goes first.
                order = CONFIGS[round_ % 3:] + CONFIGS[:round_ % 3]
                for name in order:
                    stack = stacks[name]
                    groups = {"gateway": [stack.proc("gateway").pid],
                              "wafsvc": procstat.with_children(stack.proc("wafsvc1").pid)}
                    result = loadgen.run(stack.spec.frontend_port, mix, args.seconds, work / "wrk",
                                         connections=args.connections, groups=groups)
                    results.setdefault((mix, name), []).append(result)
                    print(f"round {round_ + 1} {mix:6} {name:7} {result['rps']:8.0f} req/s  "
                          f"gateway {result['cpu_us_per_request']['gateway']:6.0f} us/req  "
                          f"wafsvc {result['cpu_us_per_request']['wafsvc']:6.0f} us/req", file=sys.stderr)
        print(f"\n| mix | setup | req/s (median) | vs off | gateway CPU us/req | wafsvc CPU us/req | "
              f"both vs off |\n|---|---|---|---|---|---|---|")
        for mix in ("benign", "attack"):
            base_rps = statistics.median(r["rps"] for r in results[(mix, "off")])
            base_cpu = statistics.median(sum(r["cpu_us_per_request"].values()) for r in results[(mix, "off")])
            for name in CONFIGS:
                runs = results[(mix, name)]
                rps = statistics.median(r["rps"] for r in runs)
                gw = statistics.median(r["cpu_us_per_request"]["gateway"] for r in runs)
                waf = statistics.median(r["cpu_us_per_request"]["wafsvc"] for r in runs)
                both = statistics.median(sum(r["cpu_us_per_request"].values()) for r in runs)
                print(f"| {mix} | {name} | {rps:.0f} | {rps / base_rps:.3f} | {gw:.0f} | {waf:.0f} | "
                      f"{both / base_cpu:.3f} |")
    finally:
        for stack in stacks.values():
            stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
