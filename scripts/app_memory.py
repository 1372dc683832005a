"""Memory per application: what each CRS application costs a wafsvc worker.

    python scripts/app_memory.py [--crs-dir DIR] [--counts 1,2,4,8] [--out docs/measurements/app_memory.json]

Starts real wafsvc replicas (one worker each) with an applications file of N
CRS applications, waits until SERVING, and reads the worker's RSS and PSS
(/proc/PID/smaps_rollup). Two shapes for each N:

- distinct: every application's rule text differs (a comment line), so each
  has its own rule set, as sites with their own rules would;
- shared: the applications differ only by policies kept outside the rule
  text (failure policy, truncated-body policy), so they share one rule set.

MiB per application is the slope between the smallest and the largest N.
RSS counts the pages a worker shares with its supervisor (rules are loaded
before the fork, copy-on-write); PSS splits them among the processes that
share them. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import results  # noqa: E402
from stack.processes import free_port, wait_for_health  # noqa: E402

MIB = 1024 * 1024


def config_text(count: int, shared: bool) -> str:
    lines = ["applications:"]
    for index in range(count):
        lines.append(f"  - name: site{index}")
        if shared:
            lines.append(f"    failure_policy: {'closed' if index % 2 else 'open'}")
        else:
            lines.append(f"    rules: {{directives: '# site {index}'}}")
    return "\n".join(["default_application: site0", *lines]) + "\n"


def children(pid: int) -> list[int]:
    try:
        text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def memory(pid: int) -> dict[str, float]:
    fields = {}
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return {"rss_mib": round(fields["Rss"] / MIB, 1), "pss_mib": round(fields["Pss"] / MIB, 1)}


def measure(crs_dir: str, count: int, shared: bool, workdir: pathlib.Path) -> dict:
    path = workdir / f"apps-{count}-{'shared' if shared else 'distinct'}.yaml"
    path.write_text(config_text(count, shared))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CRS_DIR": crs_dir, "WAF_CONFIG": str(path),
           "WAF_LISTEN": f"127.0.0.1:{port}", "WAF_WORKERS": "1", "LOG_LEVEL": "warning"}
    env.pop("WAF_METRICS", None)
    proc = subprocess.Popen([sys.executable, "-m", "wafsvc"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_health(port, proc, "wafsvc", timeout=300)
        time.sleep(1.0)   # the worker's first housekeeping, allocator settled
        workers = children(proc.pid)
        if len(workers) != 1:
            raise RuntimeError(f"expected one worker, found {workers}")
        return {"applications": count, "shape": "shared" if shared else "distinct",
                "worker": memory(workers[0]), "supervisor": memory(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(60)


def slope(rows: list[dict], shape: str, field: str) -> float:
    mine = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["applications"])
    first, last = mine[0], mine[-1]
    return round((last["worker"][field] - first["worker"][field]) / (last["applications"] - first["applications"]),
                 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crs-dir", default=str(ROOT.parent / "shared" / "crs" / "v4.28.0"))
    parser.add_argument("--counts", default="1,2,4,8")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shared in (False, True):
            for count in counts:
                rows.append(measure(args.crs_dir, count, shared, pathlib.Path(tmp)))
                print(json.dumps(rows[-1]), file=sys.stderr)
    result = {
        "what": "wafsvc worker memory with N CRS applications (one worker, after start)",
        "crs_dir": args.crs_dir, "python": platform.python_version(),
        "measured_at": results.now(),
        "mib_per_distinct_application": {"rss": slope(rows, "distinct", "rss_mib"),
                                         "pss": slope(rows, "distinct", "pss_mib")},
        "mib_per_shared_application": {"rss": slope(rows, "shared", "rss_mib"),
                                       "pss": slope(rows, "shared", "pss_mib")},
        "rows": rows,
    }
    return results.emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
