"""The gateway alone: evaluations per gateway CPU-second.

    python -m bench.gateway_isolated                       # saturation and half load
    python -m bench.gateway_isolated --seconds 3 --rounds 1 --haproxy 3.2
    python -m bench.gateway_isolated --gateway-env GATEWAY_STREAMS=1
    python -m bench.gateway_isolated --rounds 1 --profile   # + py-spy of the gateway

The real gateway process (`python -m gateway`) between a synthetic HAProxy
(bench/spop_driver.py: HAProxy's HELLO, the shipped SPOE message, pipelined
NOTIFYs over many connections) and a stub wafsvc (bench/stub_wafsvc.py: real
gRPC EvaluateStream, a pass verdict at once). Neither HAProxy nor the engine
can cap or blur the figure, which the end-to-end bench cannot avoid on two
cores. The gateway is pinned to the first CPU, driver and stub to the others.

Each round measures, after a warm-up, the gateway's utime+stime from /proc
over the window against the verdicts that came back: first closed loop
(saturation), then open loop at fractions of the median peak (default half
load), with latency from each NOTIFY's intended send time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import shutil
import subprocess
import sys
import tempfile
import time

import uvloop

from bench import procstat, spop_driver, stats
from bench.setups import batch_counters
from stack.processes import ROOT, free_port, wait_for_port

TARGET = 15_000.0   # evaluations per gateway CPU-second (issue 17)
GATEWAY_ENV = {"LOG_LEVEL": "info"}  # as in the end-to-end bench; metrics on (for the batch size)


def cpu_split() -> tuple[set[int], set[int]]:
    """(gateway CPUs, driver-and-stub CPUs); one CPU only: both share it."""
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, set(cpus[1:])) if len(cpus) > 1 else (set(cpus), set(cpus))


def _pinned(cpus: set[int]):
    return lambda: os.sched_setaffinity(0, cpus)


class Processes:
    """The stub wafsvc and the gateway, each pinned to its CPUs."""

    def __init__(self, log_dir: pathlib.Path, stub_workers: int, gateway_env: dict[str, str],
                 gateway_cpus: set[int], other_cpus: set[int]) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs = []
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        stub_port, self.gateway_port, self.metrics_port = free_port(), free_port(), free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.stub = self._spawn(log_dir / "stub.log", [sys.executable, "-m", "bench.stub_wafsvc",
                                    "--listen", f"127.0.0.1:{stub_port}", "--workers", str(stub_workers)],
                                    env, other_cpus, stdout=subprocess.PIPE)
            if self.stub.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the stub wafsvc did not start: see {log_dir / 'stub.log'}")
            self.gateway = self._spawn(log_dir / "gateway.log", [sys.executable, "-m", "gateway"], {
                **env, **GATEWAY_ENV, "GATEWAY_LISTEN": f"127.0.0.1:{self.gateway_port}",
                "GATEWAY_WAFSVC": f"ipv4:127.0.0.1:{stub_port}",
                "GATEWAY_METRICS": f"127.0.0.1:{self.metrics_port}", **gateway_env}, gateway_cpus)
            wait_for_port(self.gateway_port, self.gateway, "gateway")
            wait_for_port(self.metrics_port, self.gateway, "gateway metrics")
        except BaseException:
            self.stop()
            raise

    def _spawn(self, log: pathlib.Path, argv: list[str], env: dict, cpus: set[int], stdout=None):
        out = open(log, "ab")
        self.logs.append(out)
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=stdout or out, stderr=out,
                                preexec_fn=_pinned(cpus), start_new_session=True)
        self.procs.append(proc)
        return proc

    def cpu(self) -> dict[str, float]:
        return {"gateway": procstat.cpu_seconds(self.gateway.pid),
                "stub": procstat.total_cpu(procstat.with_children(self.stub.pid)),
                "driver": time.process_time()}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for out in self.logs:
            out.close()


def _cpu_times() -> dict[str, list[int]]:
    with open("/proc/stat") as fh:
        return {line.split()[0]: [int(x) for x in line.split()[1:]] for line in fh if line.startswith("cpu")}


def _busy(before: dict, after: dict, name: str) -> float:
    delta = [a - b for a, b in zip(after[name], before[name])]
    return round(1.0 - (delta[3] + delta[4]) / max(1, sum(delta)), 3)


def py_spy(pid: int, seconds: float, raw: pathlib.Path) -> None:
    """py-spy --native of the gateway for `seconds` (it slows what it samples)."""
    spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).with_name("py-spy"))
    subprocess.run([spy, "record", "--native", "-r", "200", "-d", str(max(1, int(seconds))), "--format", "raw",
                    "-o", str(raw), "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def profile_table(raw: pathlib.Path) -> list[str]:
    from bench.profile import summarise

    total, by_component, by_thread = summarise(raw)
    lines = ["| component | share of samples |", "|---|---:|"]
    lines += [f"| {comp} | {n / total:.1%} |" for comp, n in by_component.most_common()]
    lines += [f"| thread: {thread} | {n / total:.1%} |" for thread, n in by_thread.most_common()]
    return lines


async def measure(procs: Processes, version: str, mix: str, connections: int, depth: int,
                  rate: float, warmup_s: float, seconds: float, gateway_cpus: set[int],
                  profile: pathlib.Path | None = None) -> dict:
    """One run, closed loop when rate is 0; returns its figures. Closed loop
    keeps `depth` NOTIFYs in flight per connection; open loop allows what
    HAProxy allows (MAX_DEPTH), so only the gateway's pace limits it."""
    driver = spop_driver.Driver(version, mix, depth if rate == 0 else spop_driver.MAX_DEPTH)
    conns = await spop_driver.open_connections("127.0.0.1", procs.gateway_port, driver, connections)
    marks = {}

    async def window() -> None:
        for mark in ("start", "end"):
            if mark == "end":
                if profile is not None:  # the window's figures then include py-spy's slowdown
                    await asyncio.to_thread(py_spy, procs.gateway.pid, seconds, profile)
                else:
                    await asyncio.sleep(seconds)
            marks[mark] = {"t": time.monotonic(), "acks": driver.tally.acks, "cpu": procs.cpu(),
                           "stat": _cpu_times(),
                           "batches": await asyncio.to_thread(batch_counters, procs.metrics_port)}

    try:
        if rate > 0:
            await spop_driver.run_open(conns, driver, rate, warmup_s, seconds, window)
        else:
            await spop_driver.run_closed(conns, driver, warmup_s, window)
    finally:
        driver.stopping = True
        for conn in conns:
            conn.transport.close()
    a, b = marks["start"], marks["end"]
    wall = b["t"] - a["t"]
    acks = b["acks"] - a["acks"]
    cpu = {name: b["cpu"][name] - a["cpu"][name] for name in a["cpu"]}
    messages, batched = (b["batches"][i] - a["batches"][i] for i in (0, 1))
    tally = driver.tally
    result = {
        "haproxy": version, "mode": "open loop" if rate else "closed loop", "offered_rate": round(rate, 1),
        "connections": connections, "depth": driver.depth, "seconds": round(wall, 3), "evaluations": acks,
        "evaluations_per_s": round(acks / wall, 1),
        "evaluations_per_gateway_cpu_s": round(acks / cpu["gateway"], 1) if cpu["gateway"] else 0.0,
        "cpu_us_per_evaluation": {name: round(v * 1e6 / max(1, acks), 1) for name, v in cpu.items()},
        "gateway_cpu_share": round(cpu["gateway"] / wall, 3),  # of one core
        "gateway_core_busy": _busy(a["stat"], b["stat"], f"cpu{min(gateway_cpus)}"),  # any process
        "machine_busy": _busy(a["stat"], b["stat"], "cpu"),
        "mean_batch": round(batched / messages, 2) if messages else 0.0,
        "failed": tally.failed, "unexpected": tally.unexpected, "errors": tally.errors[:5],
    }
    if rate:
        result["latency_us"] = stats.percentiles_us(tally.latencies)
        result["schedule_slip_us"] = stats.percentiles_us(tally.slips)
        result["waited_for_room"] = tally.waited
    return result


def _point(runs: list[dict]) -> dict:
    """Spread over rounds of one load point; latency percentiles as medians."""
    keys = ("evaluations_per_gateway_cpu_s", "evaluations_per_s", "gateway_cpu_share", "mean_batch")
    out = {key: stats.spread([r[key] for r in runs]) for key in keys}
    out["gateway_cpu_us_per_evaluation"] = stats.spread([r["cpu_us_per_evaluation"]["gateway"] for r in runs])
    out["failed"] = sum(r["failed"] + r["unexpected"] for r in runs)
    for key in ("latency_us", "schedule_slip_us"):
        if key in runs[0]:
            out[key] = {p: statistics.median(r[key][p] for r in runs) for p in runs[0][key]}
    return out


def run(*, versions=("2.6",), loads=(0.5,), seconds: float = 5.0, warmup_s: float = 1.0, rounds: int = 3,
        connections: int = 32, depth: int = 4, mix: str = "benign", stub_workers: int = 2,
        gateway_env: dict[str, str] | None = None, log_dir: pathlib.Path | None = None, log=print,
        profile: bool = False) -> dict:
    """Saturation, then each load fraction of the median peak, per HAProxy version."""
    gateway_cpus, other_cpus = cpu_split()
    own_dir = log_dir is None  # ours to remove when all went well; kept (logs) when not
    log_dir = log_dir or pathlib.Path(tempfile.mkdtemp(prefix="gateway-isolated-"))
    out = {"settings": {"seconds": seconds, "warmup_s": warmup_s, "rounds": rounds, "connections": connections,
                        "depth": depth, "mix": mix, "stub_workers": stub_workers, "loads": list(loads),
                        "gateway_env": {**GATEWAY_ENV, **(gateway_env or {})},
                        "cpus": {"gateway": sorted(gateway_cpus), "driver_and_stub": sorted(other_cpus)}},
           "runs": {}, "points": {}, "profiles": {}}
    own_affinity = os.sched_getaffinity(0)
    procs = Processes(log_dir, stub_workers, gateway_env or {}, gateway_cpus, other_cpus)
    try:
        os.sched_setaffinity(0, other_cpus)
        for version in versions:
            runs = out["runs"][version] = {}

            def once(label: str, rate: float) -> None:
                result = uvloop.run(measure(procs, version, mix, connections, depth, rate, warmup_s,
                                            seconds, gateway_cpus))
                runs.setdefault(label, []).append(result)
                if profile and len(runs[label]) == rounds:  # one more window, sampled
                    raw = log_dir / f"gateway-{version}-{label.rstrip('%')}.raw"
                    profiled = uvloop.run(measure(procs, version, mix, connections, depth, rate, warmup_s,
                                                  seconds, gateway_cpus, raw))
                    out["profiles"].setdefault(version, {})[label] = {
                        "evaluations_per_s": profiled["evaluations_per_s"], "table": profile_table(raw)}
                log(f"gateway isolated, HAProxy {version}, {label}: {result['evaluations_per_s']:,.0f}/s, "
                    f"{result['evaluations_per_gateway_cpu_s']:,.0f} per gateway CPU-s, "
                    f"gateway {result['gateway_cpu_share']:.0%} of its core (core busy "
                    f"{result['gateway_core_busy']:.0%}), batch {result['mean_batch']}, "
                    f"failed {result['failed'] + result['unexpected']}"
                    + (f", p99 {result['latency_us']['p99'] / 1000:.2f} ms, slip p99 "
                       f"{result['schedule_slip_us']['p99'] / 1000:.2f} ms" if rate else ""))

            for _ in range(rounds):
                once("saturation", 0.0)
            peak = statistics.median(r["evaluations_per_s"] for r in runs["saturation"])
            for fraction in loads:
                for _ in range(rounds):
                    once(f"{fraction:.0%}", fraction * peak)
            out["points"][version] = {label: _point(rs) for label, rs in runs.items()}
    finally:
        os.sched_setaffinity(0, own_affinity)
        procs.stop()
    if own_dir:
        shutil.rmtree(log_dir, ignore_errors=True)
    first = out["points"][versions[0]]
    out["evaluations_per_gateway_cpu_s"] = first["saturation"]["evaluations_per_gateway_cpu_s"]["median"]
    if loads:
        out["evaluations_per_gateway_cpu_s_at_load"] = {
            label: point["evaluations_per_gateway_cpu_s"]["median"] for label, point in first.items()
            if label != "saturation"}
    return out


def table(result: dict) -> str:
    lines = ["| HAProxy | load | evals/s | evals per gateway CPU-s (min-max) | gateway µs/eval | "
             "batch | p50 / p99 / p99.9 ms | slip p99 ms | failed |", "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for version, points in result["points"].items():
        for label, p in points.items():
            e = p["evaluations_per_gateway_cpu_s"]
            lat = p.get("latency_us")
            lines.append(
                f"| {version} | {label} | {p['evaluations_per_s']['median']:,.0f} | {e['median']:,.0f} "
                f"({e['min']:,.0f}-{e['max']:,.0f}) | {p['gateway_cpu_us_per_evaluation']['median']:,.1f} | "
                f"{p['mean_batch']['median']:.1f} | "
                + (f"{lat['p50'] / 1000:.2f} / {lat['p99'] / 1000:.2f} / {lat['p999'] / 1000:.2f} | "
                   f"{p['schedule_slip_us']['p99'] / 1000:.2f}" if lat else "closed loop | ")
                + f" | {p['failed']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window of each run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32, help="SPOP connections")
    parser.add_argument("--depth", type=int, default=4, help=f"NOTIFYs in flight per connection (1-{spop_driver.MAX_DEPTH})")
    parser.add_argument("--haproxy", action="append", choices=sorted(spop_driver.HELLO_CAPTURES),
                        help="HAProxy version to mimic (repeatable; default 2.6)")
    parser.add_argument("--load", action="append", type=float,
                        help="open-loop load as a fraction of the peak (repeatable; default 0.5)")
    parser.add_argument("--mix", default="benign", choices=("benign", "attack"))
    parser.add_argument("--stub-workers", type=int, default=2)
    parser.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra gateway setting, e.g. GATEWAY_STREAMS=1 (repeatable)")
    parser.add_argument("--profile", action="store_true",
                        help="after the rounds of each load, one more window under py-spy --native")
    parser.add_argument("--out", type=pathlib.Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    gateway_env = dict(item.split("=", 1) for item in args.gateway_env)
    result = run(versions=tuple(args.haproxy or ("2.6",)), loads=tuple(args.load or (0.5,)),
                 seconds=args.seconds, warmup_s=args.warmup, rounds=args.rounds, connections=args.connections,
                 depth=args.depth, mix=args.mix, stub_workers=args.stub_workers, gateway_env=gateway_env,
                 log=lambda m: print(m, file=sys.stderr, flush=True), profile=args.profile)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    for version, labels in result["profiles"].items():
        for label, prof in labels.items():
            print(f"\n### gateway, HAProxy {version}, {label} (py-spy --native; "
                  f"{prof['evaluations_per_s']:,.0f} evaluations/s while sampled)\n")
            print("\n".join(prof["table"]))
    figure = result["evaluations_per_gateway_cpu_s"]
    print(f"\nevaluations per gateway CPU-second at saturation: {figure:,.0f} (target >= {TARGET:,.0f})")
    failed = sum(p["failed"] for points in result["points"].values() for p in points.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
