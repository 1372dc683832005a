"""What one EvaluateStream message costs a server process, by server shape,
with no engine in the way: each shape answers every batch at once with
pass verdicts (bench/stub_wafsvc.py's answer), pinned to the first CPU; a
grpc.aio client on the other CPU drives them in alternating windows.

    python -m tools.grpc_server_levers                      # every shape
    python -m tools.grpc_server_levers --shapes aio,loop --repeats 5

Shapes (any of them with extra environment: "loop GRPC_POLL_STRATEGY=poll",
or a channel argument: "aio grpc.http2.bdp_probe=0"):
- aio:  grpc.aio on uvloop, an async generator handler (what wafsvc ran);
- sync: grpc.server with a thread pool, a generator handler;
- loop: one thread polls the completion queue and answers inline
        (wafsvc/rpc.py's way, reduced to this one method).
Loads: "busy b1" (one request per message, two messages in flight),
"gap b1" (one message, then 2 ms idle: light load), "busy b8".
Reported per message: the server's CPU (utime+stime), its system part and
context switches (all threads).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys

from bench import engine_run
from bench.stub_wafsvc import STREAM_METHOD, answer
from stack.processes import ROOT, free_port

METADATA = (("x-waf-worker", "w"), ("x-waf-replica", "r"), ("x-waf-workers", "1"))
SHAPES = ("aio", "aio GRPC_EXPERIMENTS=-event_engine_listener", "sync", "loop",
          "loop GRPC_EXPERIMENTS=-event_engine_listener")
LOADS = (("busy b1", 1, 0.0), ("gap b1", 1, 0.002), ("busy b8", 8, 0.0))


# -- the servers (run in a child process: python -m tools.grpc_server_levers --serve SHAPE PORT) --

def serve_aio(port: int, options: list) -> None:
    import grpc
    import uvloop

    async def handler(requests, context):
        await context.send_initial_metadata(METADATA)
        async for data in requests:
            yield answer(data)

    async def main() -> None:
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(STREAM_METHOD[0], {
            STREAM_METHOD[1]: grpc.stream_stream_rpc_method_handler(handler)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()
    uvloop.run(main())


def serve_sync(port: int, options: list) -> None:
    from concurrent import futures

    import grpc

    def handler(requests, context):
        context.send_initial_metadata(METADATA)
        for data in requests:
            yield answer(data)

    server = grpc.server(futures.ThreadPoolExecutor(2), options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(STREAM_METHOD[0], {
        STREAM_METHOD[1]: grpc.stream_stream_rpc_method_handler(handler)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def serve_loop(port: int, options: list) -> None:
    from grpc._cython import cygrpc

    from wafsvc.rpc import message_of
    cq = cygrpc.CompletionQueue()
    server = cygrpc.Server(tuple(options), False)
    server.register_completion_queue(cq)
    server.add_http2_port(f"127.0.0.1:{port}".encode())
    server.start()
    server.request_call(cq, cq, None)
    print("ready", flush=True)
    while True:
        event = cq.poll()
        if event.tag is None:   # a new call
            call = event.call
            server.request_call(cq, cq, None)
            call.start_server_batch((cygrpc.SendInitialMetadataOperation(METADATA, 0),
                                     cygrpc.ReceiveMessageOperation(0)), (call, True))
            continue
        call, reading = event.tag
        if not reading:   # sent: read the next one
            call.start_server_batch((cygrpc.ReceiveMessageOperation(0),), (call, True))
            continue
        data = message_of(event)
        if data is None:
            call.start_server_batch((cygrpc.ReceiveCloseOnServerOperation(0), cygrpc.SendStatusFromServerOperation(
                (), cygrpc.StatusCode.ok, b"", 0)), (call, None))
        else:
            call.start_server_batch((cygrpc.SendMessageOperation(answer(data), 0),), (call, False))


# -- the driver ------------------------------------------------------------------------------------

def start(shape: str, cpu: int) -> tuple[subprocess.Popen, int]:
    kind, *extra = shape.split()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    options = []
    for item in extra:
        key, value = item.split("=", 1)
        if key.startswith("grpc."):
            options.append(item)
        else:
            env[key] = value
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tools.grpc_server_levers", "--serve", kind, str(port),
                             *options], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    if proc.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"{shape} did not start")
    return proc, port


def window(pid: int, port: int, batch: int, seconds: float, gap_s: float) -> dict:
    from scripts.wafsvc_cost import drive, proc_counters
    encoded = engine_run.batches(engine_run.mapped(engine_run.request_set("benign", "mix")), batch)

    async def measured(length: float) -> dict:
        before = proc_counters(pid)
        await asyncio.sleep(length)
        return {"before": before, "after": proc_counters(pid)}

    result = asyncio.run(drive(port, encoded, 0.3, seconds, measured, gap_s))
    messages = max(1, result["answered"]) / batch
    delta = {k: result["after"][k] - result["before"][k] for k in result["before"]}
    return {"cpu_us": (delta["user_s"] + delta["system_s"]) * 1e6 / messages,
            "system_us": delta["system_s"] * 1e6 / messages,
            "switches": (delta["voluntary_switches"] + delta["involuntary_switches"]) / messages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default=";".join(SHAPES), help="';'-separated shapes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.serve:
        kind, port, *options = args.serve
        opts = [(k, int(v)) for k, v in (o.split("=", 1) for o in options)]
        {"aio": serve_aio, "sync": serve_sync, "loop": serve_loop}[kind](int(port), opts)
        return 0
    shapes = [s.strip() for s in args.shapes.split(";") if s.strip()]
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, set(cpus[1:]) or {cpus[0]})
    servers = {shape: start(shape, cpus[0]) for shape in shapes}
    results: dict = {}
    try:
        for repeat in range(args.repeats):
            for load, batch, gap_s in LOADS:
                turn = repeat % len(shapes)
                for shape in shapes[turn:] + shapes[:turn]:
                    proc, port = servers[shape]
                    figures = window(proc.pid, port, batch, args.seconds, gap_s)
                    results.setdefault((load, shape), []).append(figures)
                    print(f"repeat {repeat + 1} {load} {shape}: {figures['cpu_us']:.0f} us/message",
                          file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.kill()
            proc.wait()
    print("| load | shape | server CPU µs/message (min–max) | system µs | context switches |")
    print("|---|---|---:|---:|---:|")
    for load, _, _ in LOADS:
        for shape in shapes:
            runs = results[(load, shape)]
            cpu = [r["cpu_us"] for r in runs]
            print(f"| {load} | {shape} | {statistics.median(cpu):.0f} ({min(cpu):.0f}–{max(cpu):.0f}) | "
                  f"{statistics.median(r['system_us'] for r in runs):.0f} | "
                  f"{statistics.median(r['switches'] for r in runs):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
