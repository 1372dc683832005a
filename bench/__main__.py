"""`make bench`: modsec-spoa against the raw engine, HAProxy without a WAF
and nginx + ModSecurity, side by side on this machine.

    python -m bench                 # the full run, a few minutes
    python -m bench --smoke         # every code path in a few seconds (tests)

Writes <out>/latest.json, <out>/latest.md and <out>/latest.png.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import gateway_isolated, loadgen, procstat, report, rulesets, setups

ROOT = pathlib.Path(__file__).resolve().parent.parent
MIXES = ("benign", "attack")
RULES = ("crs", "trivial")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def engine_run(rules: str, mix: str, seconds: float, crs_dir: str, processes: int) -> dict:
    """The raw engine: `processes` in parallel (the same cores as the others)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "bench.engine_run", "--rules", rules, "--mix", mix,
            "--seconds", str(seconds), "--crs-dir", crs_dir]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, cwd=ROOT) for _ in range(processes)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"engine run failed: {rules} {mix}")
        results.append(json.loads(out))
    evaluations = sum(r["evaluations"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    wall = max(r["wall_s"] for r in results)
    verdicts = {k: sum(r["verdicts"][k] for r in results) for k in results[0]["verdicts"]}
    return {"rps": evaluations / wall, "requests": evaluations, "cpu_s": {"engine": cpu},
            "cpu_us_per_request": {"engine": cpu * 1e6 / evaluations}, "verdicts": verdicts}


def median_of(runs: list[dict]) -> dict:
    """Median figures over the alternating rounds (by rps for the run kept)."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    mid = dict(ordered[len(ordered) // 2])
    mid["rps_all"] = [round(r["rps"], 1) for r in runs]
    mid["cpu_us_per_request"] = {k: statistics.median(r["cpu_us_per_request"][k] for r in runs)
                                 for k in runs[0]["cpu_us_per_request"]}
    if all("mean_batch" in r for r in runs):
        mid["mean_batch"] = statistics.median(r["mean_batch"] for r in runs)
    if "latency_us" in runs[0]:
        mid["latency_us"] = {k: statistics.median(r["latency_us"][k] for r in runs) for k in runs[0]["latency_us"]}
    return mid


def memory(setup: setups.Setup) -> dict:
    out = {}
    for group, pids in setup.groups("trivial").items():
        for pid in pids:
            try:
                out[f"{group}:{pid}"] = procstat.memory_kib(pid)
            except FileNotFoundError:
                pass
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1-second runs, one round, 2,000-request soak")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each throughput/latency run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--soak", type=int, default=200_000, help="requests for the memory growth run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--haproxy", default=os.environ.get("HAPROXY_BIN", "haproxy"))
    parser.add_argument("--crs-dir", default="")
    parser.add_argument("--replicas", type=int, default=1, help="wafsvc replicas")
    parser.add_argument("--workers", type=int, default=2, help="WAF_WORKERS per replica")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds, args.soak = 1.0, 1, 2_000
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
                     "settings": {"seconds": args.seconds, "rounds": args.rounds, "connections": args.connections,
                                  "crs_dir": crs_dir, "paranoia": 1, "wafsvc_replicas": args.replicas,
                                  "wafsvc_workers": args.workers, "soak_requests": args.soak,
                                  "haproxy": args.haproxy}}
    # The gateway alone first, pinned to one core, before the stacks exist.
    log("isolated gateway: SPOP driver -> gateway -> stub wafsvc")
    results["gateway_isolated"] = gateway_isolated.run(
        versions=("2.6", "3.2"), loads=(0.5,), seconds=min(args.seconds, 0.5) if args.smoke else args.seconds,
        warmup_s=0.3 if args.smoke else 1.0, rounds=args.rounds, connections=8 if args.smoke else 32,
        log_dir=run_dir / "gateway-isolated", log=log)
    started: list[setups.Setup] = []
    try:
        log(f"starting setups (CRS {crs_dir})")
        nowaf = setups.HaproxySetup(run_dir, args.haproxy)
        started.append(nowaf)
        spoa = {rules: setups.HaproxySetup(run_dir, args.haproxy, rules=rules, crs_dir=crs_dir,
                                           replicas=args.replicas, workers=args.workers) for rules in RULES}
        started.extend(spoa.values())
        nginx = setups.NginxSetup(run_dir, crs_dir)
        started.append(nginx)

        # Verdicts first: a setup that does not block attacks measures nothing.
        checks = {}
        for rules in RULES:
            for name, setup in (("spoa", spoa[rules]), ("nginx", nginx)):
                for mix in MIXES:
                    checks[f"{name}/{rules}/{mix}"] = setups.verdicts(setup.port(rules), mix)
        results["verdict_checks"] = checks
        for key, counts in checks.items():
            # 503 is a fail-closed timeout on a loaded machine, not a pass.
            if key.endswith("/attack") and ("403" not in counts or not set(counts) <= {"403", "503"}):
                raise RuntimeError(f"{key}: attacks not all blocked: {counts}")
            if key.endswith("/benign") and "403" in counts:
                raise RuntimeError(f"{key}: benign requests blocked: {counts}")

        # Throughput: every (setup, rules, mix) once per round, rounds alternate.
        cases = [("haproxy", nowaf, "none", mix) for mix in MIXES]
        cases += [(f"spoa", spoa[rules], rules, mix) for rules in RULES for mix in MIXES]
        cases += [("nginx", nginx, rules, mix) for rules in RULES for mix in MIXES]
        cases += [("engine", None, rules, mix) for rules in RULES for mix in MIXES]
        runs: dict[str, list[dict]] = {}
        for round_no in range(args.rounds):
            order = cases[round_no % len(cases):] + cases[:round_no % len(cases)]
            for name, setup, rules, mix in order:
                key = f"{name}/{rules}/{mix}"
                if setup is None:
                    result = engine_run(rules, mix, args.seconds, crs_dir, processes=os.cpu_count() or 2)
                else:
                    rules_for_port = rules if rules != "none" else "trivial"
                    batches = getattr(setup, "batch_counters", lambda: (0.0, 0.0))
                    before = batches()
                    result = loadgen.run(setup.port(rules_for_port), mix, args.seconds, run_dir / "wrk",
                                         connections=args.connections, groups=setup.groups(rules_for_port))
                    after = batches()
                    if after[0] > before[0]:
                        result["mean_batch"] = (after[1] - before[1]) / (after[0] - before[0])
                runs.setdefault(key, []).append(result)
                log(f"round {round_no + 1}/{args.rounds} {key}: {result['rps']:.0f}/s "
                    + (f"batch={result['mean_batch']:.1f} " if "mean_batch" in result else "")
                    + " ".join(f"{k}={v:.0f}us" for k, v in result["cpu_us_per_request"].items()))
        throughput = {key: median_of(value) for key, value in runs.items()}
        results["throughput"] = throughput

        # Latency at a fixed rate: half of modsec-spoa's peak, same rate for all.
        latency: dict[str, list[dict]] = {}
        rates = {rules: throughput[f"spoa/{rules}/benign"]["rps"] / 2 for rules in RULES}
        for round_no in range(args.rounds):
            for rules in RULES:
                for name, setup in (("haproxy", nowaf), ("spoa", spoa[rules]), ("nginx", nginx)):
                    port_rules = "trivial" if setup is nowaf else rules
                    result = loadgen.run(setup.port(port_rules), "benign", args.seconds, run_dir / "wrk",
                                         rate=rates[rules], groups=setup.groups(port_rules))
                    key = f"{name}/{rules}/benign@{rates[rules]:.0f}"
                    latency.setdefault(key, []).append(result)
                    log(f"latency {key}: {result['rps']:.0f}/s p50={result['latency_us']['p50']}us "
                        f"p99={result['latency_us']['p99']}us")
        results["latency"] = {key: median_of(value) for key, value in latency.items()}
        results["latency_rates"] = rates

        # Memory: RSS before and after `soak` requests through the trivial stack.
        target = spoa["trivial"]
        mem_before = memory(target)
        seconds = max(2.0, args.soak / max(1.0, throughput["spoa/trivial/benign"]["rps"]) * 3)
        soak = loadgen.run(target.port("trivial"), "benign", seconds, run_dir / "wrk",
                           connections=args.connections, stop_after=args.soak, groups=target.groups("trivial"))
        mem_after = memory(target)
        mem_crs = memory(spoa["crs"])
        results["memory"] = {"soak_requests": soak["requests"], "before": mem_before, "after": mem_after,
                             "crs_stack": mem_crs}
        log(f"soak: {soak['requests']} requests")
        results["machine"]["busy_after"] = round(procstat.busy_fraction(1.0), 3)
        results["machine"]["loadavg_after"] = os.getloadavg()
    finally:
        for setup in reversed(started):
            setup.stop()
        shutil.rmtree(run_dir, ignore_errors=True)

    results["summary"] = report.summarise(results)
    report.write(results, out_dir)
    log(f"wrote {out_dir}/latest.json, latest.md, latest.png")
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
