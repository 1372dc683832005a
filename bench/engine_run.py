"""The raw engine setup: the mix evaluated in-process through
wafsvc.engine.Engine, no network, no SPOP, no gRPC.

    python -m bench.engine_run --rules crs --mix benign --seconds 5

Requests are mapped beforehand with the gateway's own mapping.build_request
from the SPOE arguments HAProxy would send, so the engine sees exactly what it
sees behind the gateway. Prints one JSON line: evaluations, CPU seconds of
this process while evaluating, wall seconds, and the verdict counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench import workloads
from bench.rulesets import rule_specs
from gateway import mapping
from wafsvc.engine import Engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rules", choices=("crs", "trivial"), required=True)
    parser.add_argument("--mix", choices=tuple(workloads.MIXES), required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--crs-dir", default="")
    args = parser.parse_args(argv)

    engine = Engine(rule_specs(args.rules, args.crs_dir))
    requests = [mapping.build_request(workloads.spoe_args(req, i))[0]
                for i, req in enumerate(workloads.MIXES[args.mix])]
    for req in requests * 3:  # warm caches (PCRE JIT, allocator)
        engine.evaluate(req)
    verdicts = {"pass": 0, "intervention": 0}
    count = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    end = wall0 + args.seconds
    evaluate = engine.evaluate
    while time.perf_counter() < end:
        for req in requests:
            verdict = evaluate(req)
            verdicts["intervention" if verdict.intervention else "pass"] += 1
        count += len(requests)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    json.dump({"evaluations": count, "cpu_s": cpu, "wall_s": wall, "verdicts": verdicts}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
