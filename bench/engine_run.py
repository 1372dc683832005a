"""The raw engine setup: the mix evaluated in-process through
wafsvc.engine.Engine, no network, no SPOP, no gRPC.

    python -m bench.engine_run --rules crs --mix benign --seconds 5
    python -m bench.engine_run --rules crs --set varied --batch 5   # as a worker's loop does it

Requests are mapped beforehand with the gateway's own mapping.build_request
from the SPOE arguments HAProxy would send, so the engine sees exactly what it
sees behind the gateway. `--batch N` adds the protobuf work of wafsvc's
stream handler (parse an EvaluateBatch of N, evaluate into a VerdictBatch,
serialize it), still without gRPC or asyncio; `--serve` measures windows on
request (scripts/wafsvc_cost.py). Prints one JSON line:
evaluations, CPU seconds of this process while evaluating (and its rusage
deltas: user, system, minor faults, context switches), wall seconds, the
engine's own time (Verdict.engine_time_us, summed) and the verdict counts.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time

from bench import workloads
from bench.rulesets import rule_specs
from gateway import mapping
from wafapi import waf_pb2
from wafsvc.engine import Engine


def request_set(mix: str, kind: str) -> list[workloads.Request]:
    """The requests to cycle through: the mix, its first request alone, or
    the mix 40 times with different values (more data, the same code paths)."""
    base = list(workloads.MIXES[mix])
    if kind == "mix":
        return base
    if kind == "one":
        return base[:1]
    out = []
    for i in range(40):
        for req in base:
            sep = "&" if "?" in req.path else "?"
            headers = tuple((k, v.replace("6f1c2a9e", f"{i:08x}")) for k, v in req.headers)
            body = req.body.replace(b"maria", f"maria{i}".encode()) if req.body else req.body
            out.append(workloads.Request(req.method, f"{req.path}{sep}v={i}", headers, body))
    return out


def mapped(requests: list[workloads.Request]) -> list[waf_pb2.EvaluateRequest]:
    return [mapping.build_request(workloads.spoe_args(req, i))[0] for i, req in enumerate(requests)]


def batches(requests: list[waf_pb2.EvaluateRequest], size: int) -> list[bytes]:
    """Serialized EvaluateBatch messages of `size` requests, cycling the set."""
    out, ref = [], 0
    for start in range(0, math.lcm(len(requests), size), size):
        batch = waf_pb2.EvaluateBatch()
        for k in range(start, start + size):
            ref += 1
            batch.requests.add(ref=ref, request=requests[k % len(requests)])
        out.append(batch.SerializeToString())
    return out


class Runner:
    """Evaluates a request set in a loop, engine calls only or the stream
    handler's work (`batch` > 0), and measures a window of it."""

    def __init__(self, engine: Engine) -> None:
        self.evaluate = engine.evaluate
        self.engine_us = 0
        self.verdicts = {"pass": 0, "intervention": 0}

    def _count(self, verdict) -> None:
        self.engine_us += verdict.engine_time_us
        self.verdicts["intervention" if verdict.intervention else "pass"] += 1

    def step_for(self, requests: list[waf_pb2.EvaluateRequest], batch: int, gap_s: float = 0.0):
        evaluate, count = self.evaluate, self._count
        if gap_s:
            def one_pass_with_gaps() -> int:
                # Light load: each request alone, the process idle in between.
                for req in requests:
                    count(evaluate(req))
                    time.sleep(gap_s)
                return len(requests)
            return one_pass_with_gaps
        if not batch:
            def one_pass() -> int:
                for req in requests:
                    count(evaluate(req))
                return len(requests)
            return one_pass
        encoded = batches(requests, batch)

        def one_pass_batched() -> int:
            # wafsvc/service.py's stream loop, minus gRPC and asyncio.
            done = 0
            for data in encoded:
                message = waf_pb2.EvaluateBatch.FromString(data)
                out = waf_pb2.VerdictBatch()
                for item in message.requests:
                    result = out.verdicts.add(ref=item.ref)
                    evaluate(item.request, result.verdict)
                    count(result.verdict)
                out.SerializeToString()
                done += len(message.requests)
            return done
        return one_pass_batched

    def measure(self, step, warmup_s: float, seconds: float, on_start=lambda: None) -> dict:
        warm_until = time.perf_counter() + warmup_s
        step()
        while time.perf_counter() < warm_until:  # warm caches (PCRE JIT, allocator)
            step()
        on_start()  # a profiler may attach now
        self.verdicts = dict.fromkeys(self.verdicts, 0)
        self.engine_us = count = 0
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        end = wall0 + seconds
        while time.perf_counter() < end:
            count += step()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        rusage = {"user_s": usage1.ru_utime - usage0.ru_utime, "system_s": usage1.ru_stime - usage0.ru_stime,
                  "minor_faults": usage1.ru_minflt - usage0.ru_minflt,
                  "voluntary_switches": usage1.ru_nvcsw - usage0.ru_nvcsw,
                  "involuntary_switches": usage1.ru_nivcsw - usage0.ru_nivcsw}
        return {"evaluations": count, "cpu_s": cpu, "wall_s": wall, "engine_us": self.engine_us,
                "rusage": rusage, "verdicts": dict(self.verdicts)}


def serve(runner: Runner, mix: str) -> None:
    """One line per window on stdin: "<set> <batch> <warmup_s> <seconds> [<gap_s>]";
    prints "measuring" when the window starts, then its JSON line."""
    sets = {}
    for line in sys.stdin:
        kind, batch, warmup_s, seconds, *gap = line.split()
        if kind not in sets:
            sets[kind] = mapped(request_set(mix, kind))
        step = runner.step_for(sets[kind], int(batch), float(gap[0]) if gap else 0.0)
        result = runner.measure(step, float(warmup_s), float(seconds), lambda: print("measuring", flush=True))
        print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rules", choices=("crs", "trivial"), required=True)
    parser.add_argument("--mix", choices=tuple(workloads.MIXES), default="benign")
    parser.add_argument("--set", choices=("mix", "one", "varied"), default="mix")
    parser.add_argument("--batch", type=int, default=0, help="0: engine calls only; N: the stream handler's work")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds (at least one pass) before measuring")
    parser.add_argument("--serve", action="store_true", help="measure windows asked for on stdin (scripts/wafsvc_cost.py)")
    parser.add_argument("--crs-dir", default="")
    args = parser.parse_args(argv)

    runner = Runner(Engine(rule_specs(args.rules, args.crs_dir)))
    if args.serve:
        serve(runner, args.mix)
        return 0
    step = runner.step_for(mapped(request_set(args.mix, args.set)), args.batch)
    json.dump(runner.measure(step, args.warmup, args.seconds), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
