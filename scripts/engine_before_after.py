"""CPU per request of the whole-request hot path (Engine.evaluate) before
and after a change to wafsvc/engine.py, measured in ONE process that
alternates between the two engines, so that a shared, busy machine
disturbs both alike (separate processes a few seconds apart do not).

    git worktree add /tmp/before <commit>      # or: git archive <commit> | tar -x -C /tmp/before
    python scripts/engine_before_after.py --before /tmp/before --rounds 40

The "before" engine is /tmp/before/wafsvc/engine.py with that tree's
rules/modsecurity.conf; the "after" one is this checkout's. Both evaluate
the bench's mixes (bench/workloads.py, mapped as the gateway maps them).
Per mix and engine: the minimum and median over rounds of CPU time per
request. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import workloads  # noqa: E402
from bench.rulesets import TRIVIAL_RULES, default_crs_dir  # noqa: E402
from gateway import mapping  # noqa: E402
from wafsvc.engine import Engine  # noqa: E402
from wafsvc.rules import RuleSetSpec  # noqa: E402


def engine_module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location("engine_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine_before"] = module
    spec.loader.exec_module(module)
    return module


def specs(tree: pathlib.Path, rules: str, crs_dir: str) -> dict:
    base = str(tree / "rules" / "modsecurity.conf")
    if rules == "crs":
        return {"": RuleSetSpec(base_conf=base, crs_dir=crs_dir, paranoia=1)}
    return {"": RuleSetSpec(base_conf=base, rules_file=str(TRIVIAL_RULES))}


def cpu_per_request(engine, requests, repeat: int) -> float:
    evaluate = engine.evaluate
    started = time.process_time()
    for _ in range(repeat):
        for req in requests:
            evaluate(req)
    return (time.process_time() - started) / (repeat * len(requests)) * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a checkout of the earlier commit")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--rules", default="crs", choices=("crs", "trivial"))
    parser.add_argument("--mixes", default="benign,attack")
    parser.add_argument("--crs-dir", default="")
    args = parser.parse_args(argv)
    before_tree = pathlib.Path(args.before).resolve()
    crs_dir = args.crs_dir or default_crs_dir()
    engines = {"before": engine_module(before_tree / "wafsvc" / "engine.py").Engine(specs(before_tree, args.rules,
                                                                                              crs_dir)),
               "after": Engine(specs(ROOT, args.rules, crs_dir))}
    repeat = 6 if args.rules == "crs" else 300   # a round is about a tenth of a second per engine
    result = {"rules": args.rules, "crs_dir": crs_dir if args.rules == "crs" else "", "rounds": args.rounds,
              "before": str(before_tree), "us_per_request": {}}
    for mix in args.mixes.split(","):
        requests = [mapping.build_request(workloads.spoe_args(req, i))[0]
                    for i, req in enumerate(workloads.MIXES[mix])]
        for engine in engines.values():
            cpu_per_request(engine, requests, repeat)          # warm: PCRE JIT, allocator
        samples = {name: [] for name in engines}
        for n in range(args.rounds):
            for name in (("before", "after") if n % 2 == 0 else ("after", "before")):
                samples[name].append(cpu_per_request(engines[name], requests, repeat))
        low = {name: round(min(values), 1) for name, values in samples.items()}
        result["us_per_request"][mix] = {
            "min": low, "median": {name: round(statistics.median(v), 1) for name, v in samples.items()},
            "after_vs_before_min": round(low["after"] / low["before"], 4)}
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
