"""wafsvc's CPU beyond the engine's own: how much, and where it goes.

    PYTHONPATH=. .venv/bin/python scripts/wafsvc_cost.py [--rules crs] [--seconds 5] [--rounds 3] [--perf]

The same requests go three ways, pinned to the first CPU (the client of the
worker runs on the second):
- engine:  Engine.evaluate in a loop (bench/engine_run.py), nothing else;
- handler: the stream handler's work without gRPC or asyncio: parse an
           EvaluateBatch of N, evaluate into a VerdictBatch, serialize;
- worker:  one wafsvc worker (WAF_WORKERS=1) over EvaluateStream, N requests
           per message, two messages in flight (as the gateway's window).
for each request set (the benign mix, its first request alone, the mix 40
times with different values) and batch size. CPU per request is utime+stime
from /proc or getrusage, with minor faults and context switches beside it.
The three ways of one case run in short windows one after the other,
--repeats times (the order rotating), so that other load on a shared
machine hits them alike; differences are taken within each repetition.

Extra work shows as CPU outside the engine; a colder cache as the engine's
own CPU per request growing in the worker. --perf tells the two apart: perf
(cpu-clock, DWARF call graphs) samples every window and charges each sample
with libmodsecurity on its stack to the engine (and the samples in
libmodsecurity's own code, PCRE included, to "engine self").
--py-spy adds a py-spy --native profile of the worker (mix, batch 5).
--gap-ms G adds two ways at light load, batch 1: one request, then G ms
idle, in-process (engine-gap) and through the worker (worker-gap).
--variant NAME:K=V,K=V adds a way "worker-NAME": another worker, started
with those settings in its environment (a lever to compare side by side;
repeatable), driven exactly as "worker". --baseline PATH adds the way
"worker-baseline": a worker run from another checkout (`git worktree add
/tmp/base main`), to compare code.
--neighbour adds a way: engine-only again, with a cache-hungry
process sharing its CPU, as HAProxy, the gateway and wrk share wafsvc's
cores in `make bench` (which the engine-only setup there never does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import engine_run, procstat, rulesets  # noqa: E402
from stack import Stack, StackSpec  # noqa: E402
from stack.processes import wait_for_health  # noqa: E402

SETS = ("mix", "one", "varied")
STREAM_METHOD = "/waf.v1.Waf/EvaluateStream"
WINDOW = 2
ENGINE_DSO = "libmodsecurity-"


def pin_all(pid: int, cpus: set[int]) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def proc_counters(pid: int) -> dict[str, float]:
    """utime, stime (s) and minor faults of a process; context switches of all its threads."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    out = {"user_s": int(fields[11]) / procstat.CLOCK_TICKS, "system_s": int(fields[12]) / procstat.CLOCK_TICKS,
           "minor_faults": int(fields[7]), "voluntary_switches": 0, "involuntary_switches": 0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = open(f"/proc/{pid}/task/{tid}/status").read()
        except FileNotFoundError:
            continue
        out["voluntary_switches"] += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))
        out["involuntary_switches"] += int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))
    return out


def perf_engine_share(pid: int, seconds: float, work: pathlib.Path) -> dict[str, float]:
    """Shares of `pid`'s CPU samples over `seconds`: with libmodsecurity on
    the stack (the engine and what it calls), and in its own code."""
    data = work / f"perf-{pid}-{time.monotonic_ns()}.data"
    subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "500", "--call-graph", "dwarf,8192",
                    "-p", str(pid), "-o", str(data), "--", "sleep", str(seconds)],
                   check=True, capture_output=True)
    done = subprocess.run(["perf", "report", "-i", str(data), "--children", "--sort", "dso", "-g", "none",
                           "--stdio"], capture_output=True, text=True)
    data.unlink()
    report = done.stdout
    found = re.search(r"^# Samples: (\S+)", report, re.M)
    if not found:
        raise RuntimeError(f"perf report found no samples: {done.stderr[-1000:]}")
    samples = found.group(1)  # "683", "5K"
    engine = engine_self = 0.0
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+(\S+)", line)
        if match and match[3].startswith(ENGINE_DSO):
            engine, engine_self = float(match[1]) / 100, float(match[2]) / 100
    return {"samples": samples, "engine_share": engine, "engine_self_share": engine_self}


# -- in-process -------------------------------------------------------------

class InProcess:
    """bench.engine_run --serve: one engine, loaded once, measuring windows."""

    def __init__(self, rules: str, crs_dir: str, cpus: set[int]) -> None:
        argv = [sys.executable, "-m", "bench.engine_run", "--rules", rules, "--serve", "--crs-dir", crs_dir]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: os.sched_setaffinity(0, cpus))

    def window(self, request_set: str, batch: int, seconds: float, perf_dir: pathlib.Path | None,
               gap_s: float = 0.0) -> dict:
        self.proc.stdin.write(f"{request_set} {batch} 0.3 {seconds} {gap_s}\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "measuring":
            raise RuntimeError("bench.engine_run --serve stopped")
        perf = perf_engine_share(self.proc.pid, seconds - 0.2, perf_dir) if perf_dir else None
        result = json.loads(self.proc.stdout.readline())
        n = result["evaluations"]
        figures = {k: v / n for k, v in result["rusage"].items()}
        figures["cpu_us"] = (result["rusage"]["user_s"] + result["rusage"]["system_s"]) * 1e6 / n
        if perf:
            figures["perf"] = perf
        return figures

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


# -- one worker over gRPC -----------------------------------------------------

class Worker:
    def __init__(self, rules: str, crs_dir: str, work: pathlib.Path, cpus: set[int],
                 env: dict[str, str] | None = None, code_root: pathlib.Path = ROOT) -> None:
        spec = StackSpec(wafsvc_workers=1, log_dir=work / "wafsvc", code_root=code_root,
                         wafsvc_env={**rulesets.wafsvc_env(rules, crs_dir), "LOG_LEVEL": "warning",
                                     **(env or {})})
        self.stack = Stack(spec)
        proc = self.stack.start_wafsvc(0)
        try:
            wait_for_health(spec.wafsvc_ports[0], proc, "wafsvc")
            self.pid = procstat.children(proc.pid)[0]
            pin_all(proc.pid, cpus)
            pin_all(self.pid, cpus)
        except BaseException:
            self.stack.stop()
            raise
        self.port = spec.wafsvc_ports[0]

    def stop(self) -> None:
        self.stack.stop()


async def drive(port: int, batches: list[bytes], warmup_s: float, seconds: float, on_window,
                gap_s: float = 0.0) -> dict:
    """Sends batches in turn, WINDOW in flight (or one at a time, `gap_s`
    after each answer); counts answers in the window."""
    import grpc
    from wafapi import waf_pb2

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(STREAM_METHOD)(wait_for_ready=True)
        room = asyncio.Semaphore(1 if gap_s else WINDOW)
        state = {"answered": 0, "engine_us": 0, "counting": False, "stop": False}

        async def send() -> None:
            turn = 0
            while not state["stop"]:
                await room.acquire()
                await call.write(batches[turn % len(batches)])
                turn += 1

        async def receive() -> None:
            async for data in call:
                answer = waf_pb2.VerdictBatch.FromString(data)
                if state["counting"]:
                    state["answered"] += len(answer.verdicts)
                    state["engine_us"] += sum(v.verdict.engine_time_us for v in answer.verdicts)
                if gap_s:
                    await asyncio.sleep(gap_s)
                room.release()  # wafsvc answers a message in one part unless it runs past 50 ms

        tasks = [asyncio.create_task(send()), asyncio.create_task(receive())]
        await asyncio.sleep(warmup_s)
        state["counting"] = True
        extra = await on_window(seconds)
        state["counting"] = False
        state["stop"] = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        call.cancel()
        return {**state, **extra}


def worker_window(worker: Worker, request_set: str, batch: int, seconds: float,
                  perf_dir: pathlib.Path | None, gap_s: float = 0.0) -> dict:
    encoded = engine_run.batches(engine_run.mapped(engine_run.request_set("benign", request_set)), batch)

    async def window(length: float) -> dict:
        before = proc_counters(worker.pid)
        if perf_dir is not None:
            perf = await asyncio.to_thread(perf_engine_share, worker.pid, length, perf_dir)
        else:
            await asyncio.sleep(length)
            perf = None
        return {"before": before, "after": proc_counters(worker.pid), "perf": perf}

    result = asyncio.run(drive(worker.port, encoded, 0.3, seconds, window, gap_s))
    n = max(1, result["answered"])
    figures = {k: (result["after"][k] - result["before"][k]) / n for k in result["before"]}
    figures["cpu_us"] = (figures["user_s"] + figures["system_s"]) * 1e6
    if result["perf"]:
        figures["perf"] = result["perf"]
    return figures


# -- py-spy ---------------------------------------------------------------------

def py_spy(worker: Worker, seconds: float, work: pathlib.Path) -> str:
    from bench.profile import summarise

    spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).with_name("py-spy"))
    raw = work / "worker.raw"
    encoded = engine_run.batches(engine_run.mapped(engine_run.request_set("benign", "mix")), 5)

    async def window(length: float) -> dict:
        proc = await asyncio.create_subprocess_exec(spy, "record", "--native", "-r", "200", "-d", str(int(length)),
                                                    "--format", "raw", "-o", str(raw), "-p", str(worker.pid),
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await proc.wait()
        return {}

    asyncio.run(drive(worker.port, encoded, 1.0, seconds, window))
    total, by_component, by_thread = summarise(raw)
    lines = ["| component (py-spy --native, worker, mix, batch 5) | share of samples |", "|---|---:|"]
    lines += [f"| {comp} | {n / total:.1%} |" for comp, n in by_component.most_common()]
    lines += ["", "| thread | share |", "|---|---:|"]
    lines += [f"| {thread} | {n / total:.1%} |" for thread, n in by_thread.most_common()]
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------

WAYS = ("engine", "handler", "worker")
# Walks 16 MiB (four times L2 here) a cache line at a time, forever.
NEIGHBOUR = ("buf = bytearray(16 << 20)\nn = len(buf)\nwhile True:\n"
             "    for i in range(0, n, 64):\n        buf[i] = (buf[i] + 1) & 255\n")


class Neighbour:
    def __init__(self, cpus: set[int]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], preexec_fn=lambda: os.sched_setaffinity(0, cpus))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def split(figures: dict) -> dict:
    """CPU per request, and with perf its engine part, engine-self part and rest."""
    out = {"cpu_us": figures["cpu_us"], "system_us": figures["system_s"] * 1e6,
           "minor_faults": figures["minor_faults"],
           "switches": figures["voluntary_switches"] + figures["involuntary_switches"]}
    if "perf" in figures:
        out["engine_us"] = figures["cpu_us"] * figures["perf"]["engine_share"]
        out["engine_self_us"] = figures["cpu_us"] * figures["perf"]["engine_self_share"]
        out["rest_us"] = figures["cpu_us"] - out["engine_us"]
    return out


def table(results: dict, sets: list[str], batches: list[int], with_perf: bool, ways=WAYS) -> list[str]:
    """Medians per way, and the medians of the differences to the engine-only
    window of the same repetition."""
    keys = ["cpu_us", "system_us", "minor_faults", "switches"] + (["engine_us", "engine_self_us", "rest_us"]
                                                                   if with_perf else [])
    head = ("| set | batch | way | CPU µs/req | CPU − engine-only (min–max) | system µs | minor faults | switches |"
            + (" engine µs (perf) | − engine-only | engine self µs | rest µs (perf) | − engine-only |"
               if with_perf else ""))
    lines = [head, "|---|---:|---|---:|---|---:|---:|---:|" + ("---:|---:|---:|---:|---:|" if with_perf else "")]
    for request_set in sets:
        for batch in batches:
            reps = results[(request_set, batch)]
            for way in ways:
                med = {k: statistics.median(r[way][k] for r in reps) for k in keys}
                diff = [r[way]["cpu_us"] - r["engine"]["cpu_us"] for r in reps]
                shown = 1 if way.endswith("-gap") else batch  # light load: one request per message
                row = (f"| {request_set} | {shown} | {way} | {med['cpu_us']:,.0f} | "
                       f"{statistics.median(diff):,.0f} ({min(diff):,.0f}–{max(diff):,.0f}) | "
                       f"{med['system_us']:,.0f} | {med['minor_faults']:.3f} | {med['switches']:.2f} |")
                if with_perf:
                    d_engine = statistics.median(r[way]["engine_us"] - r["engine"]["engine_us"] for r in reps)
                    d_rest = statistics.median(r[way]["rest_us"] - r["engine"]["rest_us"] for r in reps)
                    row += (f" {med['engine_us']:,.0f} | {d_engine:,.0f} | {med['engine_self_us']:,.0f} | "
                            f"{med['rest_us']:,.0f} | {d_rest:,.0f} |")
                lines.append(row)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", choices=("crs", "trivial"), default="crs")
    parser.add_argument("--seconds", type=float, default=2.0, help="each window")
    parser.add_argument("--repeats", type=int, default=5, help="windows of each way per case")
    parser.add_argument("--batches", default="1,5,16")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--perf", action="store_true", help="profile every window with perf")
    parser.add_argument("--py-spy", action="store_true", help="also a py-spy profile of the worker")
    parser.add_argument("--neighbour", action="store_true", help="also engine-only beside a cache-hungry process")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="also one request at a time, this long apart")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V",
                        help="also a worker with these environment settings, as way worker-NAME")
    parser.add_argument("--baseline", type=pathlib.Path, help="also a worker run from this checkout")
    parser.add_argument("--ways", default=",".join(WAYS), help="the base ways to run (engine is always one)")
    parser.add_argument("--crs-dir", default="")
    parser.add_argument("--out", type=pathlib.Path, help="also write the tables here (Markdown)")
    args = parser.parse_args()
    variants = {}
    for item in args.variant:
        name, _, settings = item.partition(":")
        variants[f"worker-{name}"] = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
    roots = {name: ROOT for name in variants}
    if args.baseline:
        variants["worker-baseline"], roots["worker-baseline"] = {}, args.baseline.resolve()
    base = tuple(way for way in args.ways.split(",") if way)
    gaps = (("engine-gap", "worker-gap") + tuple(f"{name}-gap" for name in variants)) if args.gap_ms else ()
    ways = (("engine",) if "engine" not in base else ()) + base + tuple(variants) + (
        ("neighbour",) if args.neighbour else ()) + gaps
    gap_s = args.gap_ms / 1000
    crs_dir = args.crs_dir or rulesets.default_crs_dir()
    cpus = sorted(os.sched_getaffinity(0))
    engine_cpus, client_cpus = {cpus[0]}, set(cpus[1:]) or {cpus[0]}
    os.sched_setaffinity(0, client_cpus)
    batches = [int(b) for b in args.batches.split(",")]
    sets = args.sets.split(",")
    work = pathlib.Path(tempfile.mkdtemp(prefix="wafsvc-cost-"))
    perf_dir = work if args.perf else None
    results: dict[tuple, list[dict]] = {}
    busy0, started = procstat.cpu_times(), time.time()
    workers = {"worker": Worker(args.rules, crs_dir, work, engine_cpus)}
    in_process = InProcess(args.rules, crs_dir, engine_cpus)
    spy = ""
    try:
        for repeat in range(args.repeats):
            for request_set in sets:
                for batch in batches:
                    rep = {}
                    turn = repeat % len(ways)
                    for way in ways[turn:] + ways[:turn]:
                        target = way.removesuffix("-gap")
                        if target in variants and target not in workers:
                            workers[target] = Worker(args.rules, crs_dir, work / target, engine_cpus,
                                                     variants[target], roots[target])
                        if target in workers:   # through a worker: at `batch`, or one at a time with gaps
                            figures = worker_window(workers[target], request_set, 1 if way.endswith("-gap") else batch,
                                                    args.seconds, perf_dir, gap_s if way.endswith("-gap") else 0.0)
                        elif way == "engine-gap":
                            figures = in_process.window(request_set, 0, args.seconds, perf_dir, gap_s)
                        elif way == "neighbour":
                            neighbour = Neighbour(engine_cpus)
                            try:
                                figures = in_process.window(request_set, 0, args.seconds, perf_dir)
                            finally:
                                neighbour.stop()
                        else:
                            figures = in_process.window(request_set, 0 if way == "engine" else batch,
                                                        args.seconds, perf_dir)
                        rep[way] = split(figures)
                    results.setdefault((request_set, batch), []).append(rep)
                    print(f"repeat {repeat + 1} {request_set:6} batch {batch:2}: " + ", ".join(
                        f"{way} {rep[way]['cpu_us']:,.0f}" + (f" (engine {rep[way]['engine_us']:,.0f})"
                                                             if "engine_us" in rep[way] else "")
                        for way in ways) + " us/req", file=sys.stderr, flush=True)
        if args.py_spy:
            spy = py_spy(workers["worker"], 10, work)
    finally:
        in_process.stop()
        for worker in workers.values():
            worker.stop()
        shutil.rmtree(work, ignore_errors=True)
    busy = procstat.busy_between(busy0, procstat.cpu_times())
    lines = [f"# wafsvc's CPU beyond the engine ({args.rules}, benign mix)", "",
             f"`scripts/wafsvc_cost.py {' '.join(sys.argv[1:])}`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
             f"{(time.time() - started) / 60:.0f} min; machine busy {busy:.0%} over the run (all processes, "
             f"{len(cpus)} CPUs). Medians over the repetitions; CPU per request is user+system; \"− engine-only\" "
             "is the median of the differences to the engine-only window of the same repetition.", ""]
    lines += table(results, sets, batches, args.perf, ways)
    if spy:
        lines += ["", spy]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
