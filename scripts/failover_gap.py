"""Measures the failover gap: the longest latency added to requests while a
wafsvc replica dies (SIGKILL) or hangs (SIGSTOP), under steady load through
HAProxy. A measurement, not a test: it prints numbers.

    PYTHONPATH=. .venv/bin/python scripts/failover_gap.py [--fault kill|stop] [--crs]

Starts its own stack on free ports (2 replicas, 1 worker each, the
distribution's HAProxy), runs 6 keep-alive clients, injects the fault after 3 s
and compares the requests that were in flight around the fault with the
steady state before it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import statistics
import sys
import tempfile
import time

from stack import Stack, StackSpec, free_port
from stack.load import Load
from stack.processes import DEBIAN_CRS

LIGHT_RULES = 'SecRule REQUEST_HEADERS:x-attack "@streq 1" "id:1001,phase:1,deny,status:403,log"\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=("kill", "stop"), default="kill")
    parser.add_argument("--crs", action="store_true", help="CRS instead of one light rule")
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="failover-"))
    rules = work / "rules.conf"
    rules.write_text(LIGHT_RULES)
    waf_env = {"CRS_DIR": DEBIAN_CRS} if args.crs else {"RULES": str(rules)}
    spec = StackSpec(wafsvc_ports=[free_port(), free_port()], wafsvc_env=waf_env, log_dir=work / "logs",
                     haproxy_env={"WAF_DEBUG_HEADERS": "1"})
    stack = Stack(spec).start()
    try:
        with Load(spec.frontend_port, clients=args.clients) as load:
            time.sleep(3)
            fault_at = time.monotonic()
            victim = stack.proc("wafsvc1")
            os.killpg(victim.pid, signal.SIGKILL if args.fault == "kill" else signal.SIGSTOP)
            time.sleep(3)
            if args.fault == "stop":
                os.killpg(victim.pid, signal.SIGCONT)
    finally:
        stack.stop()
    results = load.results
    before = sorted(r[4] for r in results if fault_at - 2 < r[5] and r[5] + r[4] < fault_at)
    # In flight at the fault, or started within one second after it.
    around = [r for r in results if r[5] <= fault_at + 1 and r[5] + r[4] >= fault_at]
    after = sorted(r[4] for r in results if r[5] > fault_at + 1)
    bad = load.bad()
    p50 = statistics.median(before)
    worst = max(r[4] for r in around)
    print(f"fault: {args.fault}, rules: {'CRS' if args.crs else 'light'}, clients: {args.clients}")
    print(f"requests: {len(results)}, without a verdict: {len(bad)}, client errors: {len(load.errors)}")
    print(f"steady state before: p50 {p50 * 1000:.1f} ms, p99 {before[int(len(before) * 0.99)] * 1000:.1f} ms,"
          f" max {before[-1] * 1000:.1f} ms")
    print(f"around the fault ({len(around)} requests): max {worst * 1000:.1f} ms")
    print(f"after (1 replica): p50 {statistics.median(after) * 1000:.1f} ms, max {after[-1] * 1000:.1f} ms")
    print(f"failover gap (max around the fault - p50 before): {(worst - p50) * 1000:.1f} ms")
    print(f"logs: {work / 'logs'}")
    return 1 if bad or load.errors else 0


if __name__ == "__main__":
    sys.exit(main())
