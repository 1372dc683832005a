"""`make bench`: modsec-spoa against the raw engine, HAProxy without a WAF
and nginx + ModSecurity, side by side on this machine, plus the gateway
alone (bench/gateway_isolated.py).

    python -m bench                 # the full run, about 30 minutes
    python -m bench --smoke         # every code path in a minute (tests)
    python -m bench --setups spoa,nginx --rounds 1   # a quick look

Writes <out>/latest.json, <out>/latest.md and <out>/latest.png.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

from bench import gateway_isolated, loadgen, phases, procstat, report, rulesets, setups, versions

ROOT = pathlib.Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def per_round(runs: dict[str, list[dict]], round_no: int) -> dict[str, dict]:
    return {key: values[round_no] for key, values in runs.items() if round_no < len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="short runs, one round, 2,000-request soak")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each throughput run")
    parser.add_argument("--latency-seconds", type=float, default=5.0, help="measured part of each latency run")
    parser.add_argument("--latency-warmup", type=float, default=1.0, help="unmeasured start of each latency run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians and spread are reported")
    parser.add_argument("--soak", type=int, default=200_000, help="requests for the memory growth run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (throughput)")
    parser.add_argument("--latency-connections", type=int, default=64, help="open-loop generator connections")
    parser.add_argument("--setups", default=",".join(s.name for s in setups.SETUPS),
                        help="comma-separated setups to run (spoa and nginx are needed for the headline)")
    parser.add_argument("--no-isolated", action="store_true", help="skip the isolated gateway benchmark")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--haproxy", default=os.environ.get("HAPROXY_BIN", "haproxy"))
    parser.add_argument("--crs-dir", default="")
    parser.add_argument("--replicas", type=int, default=1, help="wafsvc replicas")
    parser.add_argument("--workers", type=int, default=2, help="WAF_WORKERS per replica")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.latency_seconds, args.latency_warmup, args.rounds, args.soak = 1.0, 0.5, 0.2, 1, 2_000
    chosen = [s for s in setups.SETUPS if s.name in args.setups.split(",")]
    crs_dir = args.crs_dir or rulesets.default_crs_dir()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="modsec-spoa-bench-"))
    loadgen.wrk_binary()

    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": args.smoke,
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version(),
                                 "busy_before": round(procstat.busy_fraction(1.0), 3),
                                 "loadavg_before": os.getloadavg()},
                     "versions": versions.collect(crs_dir, args.haproxy),
                     "settings": {"seconds": args.seconds, "rounds": args.rounds, "connections": args.connections,
                                  "latency_seconds": args.latency_seconds, "latency_warmup_s": args.latency_warmup,
                                  "latency_connections": args.latency_connections,
                                  "latency_fractions": list(phases.FRACTIONS), "setups": [s.name for s in chosen],
                                  "crs_dir": crs_dir, "paranoia": 1, "wafsvc_replicas": args.replicas,
                                  "wafsvc_workers": args.workers, "soak_requests": args.soak,
                                  "haproxy": args.haproxy}}
    if not args.no_isolated:
        # The gateway alone first, pinned to one core, before the stacks exist.
        log("isolated gateway: SPOP driver -> gateway -> stub wafsvc")
        results["gateway_isolated"] = gateway_isolated.run(
            versions=("2.6", "3.2"), loads=(phases.HALF,), seconds=0.5 if args.smoke else args.seconds,
            warmup_s=0.3 if args.smoke else 1.0, rounds=args.rounds, connections=8 if args.smoke else 32,
            log_dir=run_dir / "gateway-isolated", log=log)
    running: list[setups.Setup] = []
    try:
        ctx = setups.Context(run_dir, args.haproxy, crs_dir, args.replicas, args.workers)
        for cls in chosen:
            log(f"starting {cls.name}")
            running.append(cls(ctx))
        by_name = {s.name: s for s in running}

        # Verdicts first: a setup that does not answer and block as it should measures nothing.
        results["verdict_checks"] = phases.check_verdicts(running)

        runs = phases.throughput(running, rounds=args.rounds, seconds=args.seconds, connections=args.connections,
                                 crs_dir=crs_dir, work_dir=run_dir / "wrk", log=log)
        results["throughput"] = {key: phases.combine(value) for key, value in runs.items()}
        peaks = {key.rsplit("/", 1)[0]: run["rps"] for key, run in results["throughput"].items()
                 if key.endswith("/benign") and not key.startswith("engine/")}

        curves, same_rate = phases.latency(running, peaks, rounds=args.rounds, seconds=args.latency_seconds,
                                           warmup_s=args.latency_warmup, connections=args.latency_connections,
                                           work_dir=run_dir / "openloop", log=log)
        results["latency_curves"] = {key: {"peak_rps": peaks[key],
                                           "points": {label: phases.combine(rs) for label, rs in points.items()}}
                                     for key, points in curves.items()}
        results["latency"] = {key: phases.combine(value) for key, value in same_rate.items()}
        results["latency_rates"] = {rules: phases.HALF * peaks[f"{phases.REFERENCE}/{rules}"]
                                    for rules in by_name[phases.REFERENCE].rules} if phases.REFERENCE in by_name else {}

        if "spoa" in by_name:
            results["memory"] = phases.soak(by_name["spoa"], "trivial", args.soak,
                                            results["throughput"]["spoa/trivial/benign"]["rps"],
                                            args.connections, run_dir / "wrk")
            results["memory"]["crs_stack"] = phases.memory_of(by_name["spoa"].groups("crs"))
            log(f"soak: {results['memory']['soak_requests']} requests")
        results["machine"]["busy_after"] = round(procstat.busy_fraction(1.0), 3)
        results["machine"]["loadavg_after"] = os.getloadavg()
        # The headline per round too: every ratio from runs taken side by side.
        results["summary_rounds"] = [
            report.summarise({**results, "throughput": per_round(runs, r), "latency": per_round(same_rate, r)})
            for r in range(args.rounds)]
    finally:
        for setup in reversed(running):
            setup.stop()
        shutil.rmtree(run_dir, ignore_errors=True)

    results["summary"] = report.summarise(results)
    results["summary_spread"] = report.spread_of(results["summary_rounds"], results.get("gateway_isolated"))
    report.write(results, out_dir)
    log(f"wrote {out_dir}/latest.json, latest.md, latest.png")
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
