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
    with procstat.CpuWindow(groups) as cpu:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = proc.communicate(timeout=seconds + 120)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed ({proc.returncode}): {output.decode(errors='replace')[-2000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    # Costs are per verdict (procstat.failed: a 5xx is none).
    failed = procstat.failed(result["statuses"])
    verdicts = result["requests"] - failed
    wall = result["duration_us"] / 1e6
    result.update({
        "mix": mix, "connections": connections, "failed": failed, "machine_busy": cpu.machine_busy,
        "rps": verdicts / wall if wall else 0.0,
        "cpu_s": cpu.cpu_s, "cpu_us_per_request": cpu.us_per(verdicts),
    })
    return result
