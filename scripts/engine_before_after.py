"""CPU per request of the in-process engine (bench.engine_run: the bench's
mixes through Engine.evaluate, no network) in two checkouts, alternating,
so that a change to the hot path can be judged on a shared machine.

    git worktree add /tmp/before <commit>
    python scripts/engine_before_after.py --before /tmp/before --after . --rounds 5

Each round runs every mix once per checkout, in alternating order; the
figure per checkout is the minimum over rounds (the least disturbed run).
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys


def run(tree: pathlib.Path, mix: str, rules: str, seconds: float, crs_dir: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, "-m", "bench.engine_run", "--rules", rules, "--mix", mix, "--seconds", str(seconds)]
    if crs_dir:
        argv += ["--crs-dir", crs_dir]
    out = json.loads(subprocess.run(argv, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout)
    return out["cpu_s"] / out["evaluations"] * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=".")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rules", default="crs", choices=("crs", "trivial"))
    parser.add_argument("--mixes", default="benign,attack")
    parser.add_argument("--crs-dir", default="")
    args = parser.parse_args(argv)
    trees = {"before": pathlib.Path(args.before).resolve(), "after": pathlib.Path(args.after).resolve()}
    samples = {mix: {name: [] for name in trees} for mix in args.mixes.split(",")}
    for n in range(args.rounds):
        order = list(trees) if n % 2 == 0 else list(reversed(trees))
        for mix in samples:
            for name in order:
                samples[mix][name].append(round(run(trees[name], mix, args.rules, args.seconds, args.crs_dir), 1))
    result = {"rules": args.rules, "rounds": args.rounds, "seconds_per_run": args.seconds,
              "trees": {k: str(v) for k, v in trees.items()}, "us_per_request": {}}
    for mix, by_tree in samples.items():
        low = {name: min(values) for name, values in by_tree.items()}
        result["us_per_request"][mix] = {"min": low, "samples": by_tree,
                                         "after_vs_before": round(low["after"] / low["before"], 4)}
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
