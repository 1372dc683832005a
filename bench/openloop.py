"""Open-loop latency runs: bench/openloop.c, built here with gcc.

wrk is closed loop: a slow answer delays the next request, so queueing hides
(coordinated omission). openloop sends request k at start + k/rate whatever
the answers do, queues what finds no idle connection, and measures latency
from each request's intended send time. Its own lateness against the
schedule (slip) and the requests that waited for a connection are reported
beside the percentiles, so a run that could not keep its schedule shows it.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import struct
import subprocess
import time

from bench import procstat, workloads

SOURCE = pathlib.Path(__file__).resolve().parent / "openloop.c"


def binary(build_dir: pathlib.Path) -> pathlib.Path:
    """Compiles openloop.c once per source version."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FileNotFoundError("gcc is missing: bash scripts/install.sh bench")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    path = build_dir / f"openloop-{digest}"
    if not path.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([gcc, "-O2", "-Wall", "-o", str(path), str(SOURCE)], check=True)
    return path


def write_requests(mix: str, path: pathlib.Path) -> pathlib.Path:
    """The mix as <u32 length><raw request> records, the bytes wrk sends."""
    with open(path, "wb") as fh:
        for req in workloads.MIXES[mix]:
            raw = workloads.raw_request(req)
            fh.write(struct.pack(">I", len(raw)) + raw)
    return path


def run(port: int, mix: str, rate: float, seconds: float, work_dir: pathlib.Path, *, warmup_s: float = 1.0,
        connections: int = 64, groups: dict[str, list[int]] | None = None) -> dict:
    """One open-loop run at `rate` requests/s; CPU per process group is
    taken over the whole run (warm-up included) and divided by its answers."""
    work_dir.mkdir(parents=True, exist_ok=True)
    requests = write_requests(mix, work_dir / f"requests-{mix}.bin")
    out = work_dir / f"openloop-{time.monotonic_ns()}.json"
    argv = [str(binary(work_dir)), str(port), f"{rate:.3f}", f"{warmup_s:.3f}", f"{seconds:.3f}",
            str(connections), str(requests), str(out)]
    with procstat.CpuWindow(groups) as cpu:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=warmup_s + seconds + 60)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"openloop failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    failed = procstat.failed(result["statuses"])
    result.update({
        "mix": mix, "failed": failed, "machine_busy": cpu.machine_busy,
        "rps": result["achieved_rate"],  # answers to the requests due in the window, per second
        "cpu_s": cpu.cpu_s, "cpu_us_per_request": cpu.us_per(result["answered"] - failed),
    })
    return result
