"""The Python client's own CPU per evaluate, unary and stream mode, against a
real wafsvc (started here: one worker, one trivial rule).

    PYTHONPATH=. .venv/bin/python scripts/client_overhead.py [--requests 5000] [--rounds 3]

CPU is this process's user+system time (all its threads, gRPC's included)
divided by the evaluations; wafsvc runs in its own process and is not
counted. Rounds alternate the modes; the minimum and median are printed.
Modes: unary = one blocking Client, calls one after another; stream =
Client.stream().evaluate_many (256 in flight, up to 16 per message);
aio_unary_x16 = AsyncClient, 16 tasks calling at once; aio_stream =
AsyncClient.stream().evaluate_all, 256 at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modsec_spoa_client import AsyncClient, Client, HttpRequest  # noqa: E402
from stack import Stack, StackSpec, free_port  # noqa: E402
from stack.processes import wait_for_health  # noqa: E402

RULE = 'SecRule ARGS "@contains attack" "id:1001,phase:2,deny,status:403,log"\n'
REQUEST = HttpRequest("GET", "/search?q=shoes&page=2", headers=(
    ("Host", "shop.example"), ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64)"), ("Accept", "text/html"),
    ("Accept-Language", "en-US,en;q=0.5"), ("Accept-Encoding", "gzip, deflate"), ("Connection", "keep-alive"),
    ("Cookie", "session=0123456789abcdef"), ("Upgrade-Insecure-Requests", "1")), client_ip="192.0.2.10")


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def unary(client: Client, n: int) -> float:
    started = cpu()
    for _ in range(n):
        client.evaluate(REQUEST)
    return (cpu() - started) / n * 1e6


def stream(client: Client, n: int) -> float:
    with client.stream() as s:
        started = cpu()
        for verdict in s.evaluate_many(REQUEST for _ in range(n)):
            assert not isinstance(verdict, Exception), verdict
        return (cpu() - started) / n * 1e6


def aio_unary(target: str, n: int, concurrency: int = 16) -> float:
    async def run() -> float:
        async with AsyncClient(target=target) as client:
            await client.evaluate(REQUEST)
            started = cpu()

            async def worker(count: int) -> None:
                for _ in range(count):
                    await client.evaluate(REQUEST)
            await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
            return (cpu() - started) / (n // concurrency * concurrency) * 1e6
    return asyncio.run(run())


def aio_stream(target: str, n: int) -> float:
    async def run() -> float:
        async with AsyncClient(target=target) as client:
            async with client.stream() as s:
                await s.evaluate(REQUEST)
                started = cpu()
                for _ in range(n // 256):
                    await s.evaluate_all([REQUEST] * 256)
                return (cpu() - started) / (n // 256 * 256) * 1e6
    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON here (e.g. docs/client_overhead.json)")
    args = parser.parse_args()
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        rules = pathlib.Path(tmp, "rules.conf")
        rules.write_text(RULE)
        port = free_port()
        stack = Stack(StackSpec(log_dir=pathlib.Path(tmp), wafsvc_ports=[port], wafsvc_workers=1,
                                wafsvc_env={"RULES": str(rules)}))
        proc = stack.start_wafsvc(0)
        try:
            wait_for_health(port, proc, "wafsvc")
            target = f"127.0.0.1:{port}"
            results: dict[str, list[float]] = {"unary": [], "stream": [], "aio_unary_x16": [], "aio_stream": []}
            with Client(target=target) as client:
                client.evaluate(REQUEST)
                for _ in range(args.rounds):
                    results["unary"].append(unary(client, args.requests))
                    results["stream"].append(stream(client, args.requests))
                    results["aio_unary_x16"].append(aio_unary(target, args.requests))
                    results["aio_stream"].append(aio_stream(target, args.requests))
        finally:
            stack.stop()
    summary = {mode: {"min_us": round(min(v), 1), "median_us": round(statistics.median(v), 1)}
               for mode, v in results.items()}
    report = json.dumps({"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "load_average_before": load_before, "cpus": os.cpu_count(),
                         "requests_per_round": args.requests, "rounds": args.rounds,
                         "client_cpu_per_evaluate": summary}, indent=2)
    print(report)
    if args.out:
        pathlib.Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
