"""Measures what a reload (SIGHUP) costs the requests in flight: the slowest
reply and the failed ones among those started while wafsvc reloaded, under
steady load through HAProxy. A measurement, not a test: it prints numbers.

    PYTHONPATH=. .venv/bin/python scripts/reload_under_load.py [--reloads 10] [--burners 2]

Starts its own stack on free ports (make up's applications file with Debian's
CRS, one replica with 2 workers, the distribution's HAProxy), runs 4
keep-alive clients (10 ms between requests each) and `--burners` busy
processes beside them (a loaded machine), then reloads `--reloads` times,
adding and removing an application in turn. The gateway's log tells how
often it had to hedge (a worker that answered nothing for GATEWAY_HEDGE_MS);
wafsvc's, how long each worker paused and parsed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from stack import free_port
from stack.load import Load
from stack.processes import DEBIAN_CRS, DEMO_APPS
from tests.e2e.conftest import start_stack, wait_for

NEWS = "\n  - name: news\n    mode: detect\n"
WORKERS = 2


def events(log: pathlib.Path, message: str) -> list[dict]:
    return [json.loads(line) for line in log.read_text(errors="replace").splitlines()
            if line.startswith("{") and f'"msg": "{message}"' in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--burners", type=int, default=2, help="busy processes beside the stack")
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="reload-"))
    apps = work / "apps.yaml"
    shutil.copy(DEMO_APPS, apps)
    original = apps.read_text()
    stack = start_stack(work, "/usr/sbin/haproxy", wafsvc_ports=[free_port()], wafsvc_workers=WORKERS,
                        wafsvc_env={"CRS_DIR": DEBIAN_CRS, "PARANOIA": "1", "WAF_CONFIG": str(apps)})
    wafsvc_log = work / "wafsvc1.log"
    burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.burners)]
    slowest_all, failed_all = 0.0, 0
    try:
        with Load(stack.spec.frontend_port, clients=4, pause_s=0.01) as load:
            wait_for(lambda: len(load.results) >= 20, timeout=30, what="the load running")
            for i in range(args.reloads):
                before = len(events(wafsvc_log, "rules reloaded"))
                started = time.monotonic()
                staged = apps.with_suffix(".new")
                staged.write_text(original + (NEWS if i % 2 == 0 else ""))
                os.replace(staged, apps)
                os.kill(stack.proc("wafsvc1").pid, signal.SIGHUP)
                wait_for(lambda: len(events(wafsvc_log, "rules reloaded")) >= before + 1 + WORKERS, timeout=60,
                         what="the supervisor and every worker reloaded")
                ended = time.monotonic()
                time.sleep(0.5)   # replies to requests started during the reload
                window = [r for r in list(load.results) if started <= r[5] <= ended]
                failed = [r for r in window if r[0] != 200 or r[2]]
                slowest = max((r[4] for r in window), default=0.0)
                slowest_all, failed_all = max(slowest_all, slowest), failed_all + len(failed)
                print(f"reload {i + 1}: {len(window)} replies, {len(failed)} failed, slowest {slowest * 1000:.0f} ms, "
                      f"over 150 ms: {sum(r[4] > 0.15 for r in window)}", flush=True)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        stack.stop()
    hedges = (work / "gateway.log").read_text(errors="replace").count("is not answering")
    parses = [e["seconds"] for e in events(wafsvc_log, "rules reloaded")]
    pauses = events(wafsvc_log, "serving again after a pause")
    print(f"all: {failed_all} failed, slowest {slowest_all * 1000:.0f} ms, gateway hedges {hedges}; "
          f"parse {min(parses):.2f}-{max(parses):.2f} s")
    if pauses:
        print(f"pauses: {len(pauses)}, waited {min(p['waited_s'] for p in pauses) * 1000:.0f}-"
              f"{max(p['waited_s'] for p in pauses) * 1000:.0f} ms before parsing, "
              f"{sum(p['refused'] for p in pauses)} requests refused (re-sent elsewhere)")
    print(f"logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
