"""A stand-in for wafsvc that answers every request at once with a pass
verdict: the isolated gateway benchmark's far end (bench/gateway_isolated.py).

    python -m bench.stub_wafsvc --listen 127.0.0.1:50051 --workers 2

It speaks the real contract over real gRPC: EvaluateStream only, each stream
opened with the x-waf-worker / x-waf-replica / x-waf-workers metadata, its
workers forked processes sharing the port by SO_REUSEPORT like wafsvc's. No
engine runs, so the gateway's own cost is what a benchmark against it shows.
Answers are encoded by hand (one field per verdict) to keep the stub's own
CPU low: it shares a core with the SPOP driver. Prints "ready" once every
worker listens; SIGTERM stops them all.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from gateway.protowire import field, varint
from wafapi import waf_pb2

STREAM_METHOD = ("waf.v1.Waf", "EvaluateStream")
WORKER_METADATA, REPLICA_METADATA, WORKERS_METADATA = "x-waf-worker", "x-waf-replica", "x-waf-workers"
ACTION_PASS = waf_pb2.ACTION_PASS


# Tags, (field number << 3) | 2: Verdict.transaction_id = 7, VerdictBatch.verdicts = 1,
# BatchVerdict.verdict = 2.
_TRANSACTION_ID, _VERDICTS, _VERDICT = b"\x3a", b"\x0a", b"\x12"
PASS_VERDICT = bytes((4 << 3, ACTION_PASS))  # Verdict.action = ACTION_PASS; the rest default


def pass_verdicts(items) -> bytes:
    """A serialized VerdictBatch: for each (ref, transaction_id), a pass
    verdict that echoes the transaction id, as wafsvc's does."""
    out = bytearray()
    for ref, transaction_id in items:
        verdict = PASS_VERDICT + (field(_TRANSACTION_ID, transaction_id.encode()) if transaction_id else b"")
        out += field(_VERDICTS, b"\x08" + varint(ref) + field(_VERDICT, verdict))
    return bytes(out)


def answer(data: bytes) -> bytes:
    """One EvaluateBatch in, its VerdictBatch out."""
    batch = waf_pb2.EvaluateBatch.FromString(data)
    return pass_verdicts((item.ref, item.request.transaction_id) for item in batch.requests)


async def serve(listen: str, worker: str, replica: str, workers: int, ready_fd: int) -> None:
    import asyncio

    import grpc

    metadata = ((WORKER_METADATA, worker), (REPLICA_METADATA, replica), (WORKERS_METADATA, str(workers)))

    async def evaluate_stream(request_iterator, context):
        await context.send_initial_metadata(metadata)
        async for data in request_iterator:
            yield answer(data)

    handler = grpc.method_handlers_generic_handler(STREAM_METHOD[0], {
        STREAM_METHOD[1]: grpc.stream_stream_rpc_method_handler(evaluate_stream)})  # bytes in, bytes out
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--workers", type=int, default=2, help="worker processes on the port")
    args = parser.parse_args(argv)
    replica = f"{socket.gethostname()}/stub-{os.getpid()}"
    ready_r, ready_w = os.pipe()
    children = []
    for _ in range(args.workers):  # fork before any gRPC object exists
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            import uvloop
            uvloop.run(serve(args.listen, f"{replica}/{os.getpid()}", replica, args.workers, ready_w))
            os._exit(0)
        children.append(pid)
    os.close(ready_w)
    signal.signal(signal.SIGTERM, lambda *_: [os.kill(pid, signal.SIGTERM) for pid in children])
    ready = b""
    while len(ready) < args.workers:
        chunk = os.read(ready_r, args.workers)
        if not chunk:
            print("a stub worker died before listening", file=sys.stderr)
            return 1
        ready += chunk
    print("ready", flush=True)
    status = 0
    for pid in children:
        _, code = os.waitpid(pid, 0)
        status = status or os.waitstatus_to_exitcode(code)
    return status


if __name__ == "__main__":
    sys.exit(main())
