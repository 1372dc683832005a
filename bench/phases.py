"""The phases of `make bench`, each over every setup of bench/setups.py:
verdict checks, throughput (wrk, closed loop), latency (open loop: a curve
per setup at fractions of its own peak, and every setup at half of
modsec-spoa's peak) and the memory soak. Rounds alternate the cases, so a
passing disturbance on a shared machine spreads over all of them; every
figure keeps its per-round values beside the median.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
from collections import Counter
from typing import Callable

from bench import loadgen, openloop, procstat, setups, stats

ROOT = pathlib.Path(__file__).resolve().parent.parent
MIXES = ("benign", "attack")
ENGINE_RULES = ("crs", "trivial")
FRACTIONS = (0.10, 0.25, 0.50, 0.75, 0.90)   # latency curve: of each setup's own peak
HALF = 0.50
REFERENCE = "spoa"                            # the same-rate comparison runs at half of its peak

Log = Callable[[str], None]


def fraction_label(fraction: float) -> str:
    return f"{fraction:.0%}"


# -- verdicts ---------------------------------------------------------------

def check_verdicts(running: list[setups.Setup]) -> dict[str, dict[str, int]]:
    """Every request of both mixes once through every setup. Benign requests
    must get 200 (POSTs included); a WAF must block every attack (403, or 503
    when a loaded machine runs past the gateway's deadline: fail closed).
    The attack mix's POSTs carry their attack in the body only, so a setup
    that skipped phase 2 fails here."""
    checks = {}
    for setup in running:
        for rules in setup.rules:
            for mix in MIXES:
                got = setups.statuses(setup.port(rules), mix)
                key = f"{setup.name}/{rules}/{mix}"
                checks[key] = dict(Counter(str(s) for s in got))
                if mix == "benign" or not setup.blocks:
                    bad = [s for s in got if s != 200]
                else:
                    bad = [s for s in got if s not in (403, 503)] or ([] if 403 in got else got)
                if bad:
                    raise RuntimeError(f"{key}: wrong answers {checks[key]}")
    return checks


# -- throughput -------------------------------------------------------------

def engine_run(rules: str, mix: str, seconds: float, crs_dir: str, processes: int) -> dict:
    """The raw engine: `processes` in parallel (the same cores as the others)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "bench.engine_run", "--rules", rules, "--mix", mix,
            "--seconds", str(seconds), "--crs-dir", crs_dir]
    machine = procstat.cpu_times()
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
            "cpu_us_per_request": {"engine": cpu * 1e6 / evaluations}, "verdicts": verdicts,
            "machine_busy": procstat.busy_between(machine, procstat.cpu_times())}


def measure(setup: setups.Setup, rules: str, run: Callable[..., dict]) -> dict:
    """One run with the setup's counters read around it (mean batch)."""
    before = setup.counters(rules)
    result = run(setup.port(rules), groups=setup.groups(rules))
    after = setup.counters(rules)
    messages = after.get("stream_messages", 0) - before.get("stream_messages", 0)
    if messages > 0:
        result["mean_batch"] = (after["batched_requests"] - before["batched_requests"]) / messages
    return result


def throughput(running: list[setups.Setup], *, rounds: int, seconds: float, connections: int, crs_dir: str,
               work_dir: pathlib.Path, log: Log) -> dict[str, list[dict]]:
    """Every (setup, rules, mix) and the raw engine once per round."""
    cases = [(s, rules, mix) for s in running for rules in s.rules for mix in MIXES]
    cases += [(None, rules, mix) for rules in ENGINE_RULES for mix in MIXES]
    runs: dict[str, list[dict]] = {}
    for round_no in range(rounds):
        shift = round_no % len(cases)
        for setup, rules, mix in cases[shift:] + cases[:shift]:
            if setup is None:
                key = f"engine/{rules}/{mix}"
                result = engine_run(rules, mix, seconds, crs_dir, processes=os.cpu_count() or 2)
            else:
                key = f"{setup.name}/{rules}/{mix}"
                result = measure(setup, rules, lambda port, groups: loadgen.run(
                    port, mix, seconds, work_dir, connections=connections, groups=groups))
            runs.setdefault(key, []).append(result)
            log(f"round {round_no + 1}/{rounds} {key}: {result['rps']:.0f}/s "
                + (f"batch={result['mean_batch']:.1f} " if "mean_batch" in result else "")
                + " ".join(f"{k}={v:.0f}us" for k, v in result["cpu_us_per_request"].items()))
    return runs


# -- latency, open loop -----------------------------------------------------

def latency(running: list[setups.Setup], peaks: dict[str, float], *, rounds: int, seconds: float,
            warmup_s: float, connections: int, work_dir: pathlib.Path,
            log: Log) -> tuple[dict[str, dict[str, list[dict]]], dict[str, list[dict]]]:
    """(curves, same_rate). curves["<name>/<rules>"]["<n>%"]: runs at that
    fraction of the setup's own peak; same_rate["<name>/<rules>/benign@<rate>"]:
    every setup at half of the reference's peak with the same rules (HAProxy
    alone under both rule sets' keys), the reference's own run being its
    curve's 50% point."""
    cases = []  # (curve key or None, same-rate keys, setup, rules, rate)
    same_rate_rules = {rules: HALF * peaks[f"{REFERENCE}/{rules}"] for s in running if s.name == REFERENCE
                       for rules in s.rules}
    for setup in running:
        for rules in setup.rules:
            for fraction in FRACTIONS:
                rate = fraction * peaks[f"{setup.name}/{rules}"]
                shared = ([f"{setup.name}/{rules}/benign@{rate:.0f}"]
                          if setup.name == REFERENCE and fraction == HALF else [])
                cases.append(((f"{setup.name}/{rules}", fraction_label(fraction)), shared, setup, rules, rate))
    for rules, rate in same_rate_rules.items():
        for setup in running:
            if setup.name != REFERENCE and (rules in setup.rules or setup.rules == ("none",)):
                run_rules = rules if rules in setup.rules else setup.rules[0]
                cases.append((None, [f"{setup.name}/{rules}/benign@{rate:.0f}"], setup, run_rules, rate))
    curves: dict[str, dict[str, list[dict]]] = {}
    same_rate: dict[str, list[dict]] = {}
    for round_no in range(rounds):
        shift = round_no % len(cases)
        for curve, shared, setup, rules, rate in cases[shift:] + cases[:shift]:
            result = measure(setup, rules, lambda port, groups: openloop.run(
                port, "benign", rate, seconds, work_dir, warmup_s=warmup_s, connections=connections,
                groups=groups))
            if curve:
                curves.setdefault(curve[0], {}).setdefault(curve[1], []).append(result)
            for key in shared:
                same_rate.setdefault(key, []).append(result)
            lat, slip = result["latency_us"], result["slip_us"]
            log(f"latency {curve[0] + ' ' + curve[1] if curve else shared[0]} at {rate:,.0f}/s: "
                f"got {result['rps']:,.0f}/s p50={lat['p50'] / 1000:.2f} p99={lat['p99'] / 1000:.2f} "
                f"p99.9={lat['p999'] / 1000:.2f} ms, slip p99={slip['p99'] / 1000:.2f} ms, "
                f"queued {result['queued_for_connection']}, 5xx {result['failed']}")
    return curves, same_rate


# -- memory -----------------------------------------------------------------

def memory_of(groups: dict[str, list[int]]) -> dict:
    out = {}
    for group, pids in groups.items():
        for pid in pids:
            try:
                out[f"{group}:{pid}"] = procstat.memory_kib(pid)
            except FileNotFoundError:
                pass
    return out


def soak(setup: setups.Setup, rules: str, requests: int, rps: float, connections: int,
         work_dir: pathlib.Path) -> dict:
    """RSS of every process before and after `requests` requests."""
    before = memory_of(setup.groups(rules))
    # wrk runs its whole -d even after the script stops it: not much longer than needed.
    seconds = max(2.0, requests / max(1.0, rps) * 1.5)
    run = loadgen.run(setup.port(rules), "benign", seconds, work_dir, connections=connections,
                      stop_after=requests, groups=setup.groups(rules))
    return {"soak_requests": run["requests"], "before": before, "after": memory_of(setup.groups(rules))}


# -- combining rounds -------------------------------------------------------

def combine(runs: list[dict]) -> dict:
    """The median run (by rps) with median figures and each round's values."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    mid = dict(ordered[len(ordered) // 2])
    mid["rps_all"] = [round(r["rps"], 1) for r in runs]
    mid["cpu_us_per_request"] = {k: statistics.median(r["cpu_us_per_request"][k] for r in runs)
                                 for k in runs[0]["cpu_us_per_request"]}
    spread = {"rps": stats.spread([r["rps"] for r in runs]),
              "cpu_us_per_request": {k: stats.spread([r["cpu_us_per_request"][k] for r in runs])
                                     for k in runs[0]["cpu_us_per_request"]},
              "machine_busy": stats.spread([r.get("machine_busy", 0.0) for r in runs])}
    if all("mean_batch" in r for r in runs):
        mid["mean_batch"] = statistics.median(r["mean_batch"] for r in runs)
        spread["mean_batch"] = stats.spread([r["mean_batch"] for r in runs])
    for key in ("latency_us", "slip_us"):
        if key in runs[0]:
            mid[key] = {k: statistics.median(r[key][k] for r in runs) for k in runs[0][key]}
            spread[key] = {k: stats.spread([r[key][k] for r in runs]) for k in ("p50", "p99", "p999")}
    mid["spread"] = spread
    return mid
