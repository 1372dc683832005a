"""wrk runs, flat out at fixed concurrency: throughput and the soak.
(Latency at a given rate is open loop: bench/openloop.py.)"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import time

from bench import procstat, workloads

LUA = pathlib.Path(__file__).resolve().parent / "lua" / "mix.lua"


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise FileNotFoundError("wrk is missing: bash scripts/install.sh bench")
    return path


def run(port: int, mix: str, seconds: float, work_dir: pathlib.Path, *, connections: int = 32,
        stop_after: int = 0, groups: dict[str, list[int]] | None = None) -> dict:
    """One wrk run; returns wrk's summary plus CPU seconds per process group."""
    work_dir.mkdir(parents=True, exist_ok=True)
    table = workloads.write_lua_table(mix, work_dir / f"requests-{mix}.lua")
    out = work_dir / f"wrk-{time.monotonic_ns()}.json"
    env = {**os.environ, "BENCH_REQUESTS": str(table), "BENCH_OUT": str(out)}
    if stop_after:
        env["BENCH_STOP_AFTER"] = str(stop_after)
    argv = [wrk_binary(), "-t1", f"-c{connections}", f"-d{max(1, math.ceil(seconds))}s", "--timeout", "5s",
            "-s", str(LUA), f"http://127.0.0.1:{port}/"]
    groups = groups or {}
    before = {name: procstat.total_cpu(pids) for name, pids in groups.items()}
    machine = procstat.cpu_times()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = proc.communicate(timeout=seconds + 120)
    after = {name: procstat.total_cpu(pids) for name, pids in groups.items()}
    machine_busy = procstat.busy_between(machine, procstat.cpu_times())
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed ({proc.returncode}): {output.decode(errors='replace')[-2000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    # A 5xx is no verdict (the gateway's deadline ran out, fail closed):
    # it counts as a failure, not as throughput, and costs are per verdict.
    failed = sum(n for code, n in result["statuses"].items() if code.startswith("5"))
    verdicts = result["requests"] - failed
    requests = max(1, verdicts)
    wall = result["duration_us"] / 1e6
    result.update({
        "mix": mix, "connections": connections, "failed": failed, "machine_busy": machine_busy,
        "rps": verdicts / wall if wall else 0.0,
        "cpu_s": {name: after[name] - before[name] for name in groups},
        "cpu_us_per_request": {name: (after[name] - before[name]) * 1e6 / requests for name in groups},
    })
    return result
