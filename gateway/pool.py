"""The gateway's path to wafsvc: long-lived bidi streams carrying batches.

Why streams and batches: a unary gRPC call costs ~250 us of CPU in Python, a
quarter of a CRS GET's engine work; a stream message carrying whatever
requests are ready costs a few percent (../shared/FACTS.md). HAProxy hands
over up to 16 pipelined NOTIFYs per read, so batches form on their own.

Shape:
- `channels` gRPC channels, each with its own connections (local subchannel
  pool) and round_robin over every address the target resolves to. Several
  connections per replica are needed: one HTTP/2 connection pins to one
  SO_REUSEPORT worker process.
- Each channel carries `streams` lanes; a lane is one EvaluateStream call.
  wafsvc names its worker process in the stream's initial metadata, so the
  pool balances per worker (least in flight), not per lane.
- A lane that fails hands its unanswered requests to other lanes (Evaluate is
  idempotent) and reconnects with backoff; round_robin skips dead replicas.
- Every request has one deadline. Past it the caller gets "no verdict" and
  applies the failure policy; the answer is never left waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Callable

import grpc

from wafapi import waf_pb2

log = logging.getLogger("gateway.pool")

Callback = Callable[["waf_pb2.Verdict | None", "str | None"], None]

STREAM_METHOD = "/waf.v1.Waf/EvaluateStream"
WORKER_METADATA = "x-waf-worker"
MAX_ATTEMPTS = 3
SWEEP_INTERVAL_S = 0.005
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 1.0
SETTLE_S = 0.2

# Errors worth another try elsewhere; the others describe the request itself.
RETRYABLE = {"UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED", "UNKNOWN"}


def _identity(data: bytes) -> bytes:
    return data


def _frame_field(number: int, payload: bytes) -> bytes:
    """Protobuf length-delimited field: lets us build a batch from requests
    serialized once at submit time, instead of copying messages per retry."""
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Pending:
    __slots__ = ("ref", "entry", "callback", "deadline", "attempts", "lane", "done")

    def __init__(self, ref: int, entry: bytes, callback: Callback, deadline: float) -> None:
        self.ref = ref
        self.entry = entry          # serialized BatchRequest, as a field of EvaluateBatch
        self.callback = callback
        self.deadline = deadline
        self.attempts = 0
        self.lane: Lane | None = None
        self.done = False


class Worker:
    """One wafsvc worker process, as named by its streams' metadata."""
    __slots__ = ("name", "lanes", "inflight", "turn")

    def __init__(self, name: str) -> None:
        self.name = name
        self.lanes: list[Lane] = []
        self.inflight = 0
        self.turn = 0


class Lane:
    __slots__ = ("index", "channel_index", "call", "worker", "queue", "wakeup", "sent")

    def __init__(self, index: int, channel_index: int) -> None:
        self.index = index
        self.channel_index = channel_index
        self.call = None
        self.worker: Worker | None = None
        self.queue: list[Pending] = []
        self.wakeup = asyncio.Event()
        self.sent: dict[int, Pending] = {}


class PoolStats:
    """Counters the metrics layer reads; plain ints keep the hot path cheap."""
    __slots__ = ("submitted", "answered", "timeouts", "retries", "lane_failures", "errors")

    def __init__(self) -> None:
        self.submitted = self.answered = self.timeouts = 0
        self.retries = self.lane_failures = self.errors = 0


class WafPool:
    def __init__(self, target: str, *, channels: int = 4, streams: int = 4, max_batch: int = 16,
                 deadline_s: float = 0.4, credentials: grpc.ChannelCredentials | None = None,
                 call_metadata: tuple = (), max_message_bytes: int = 8 * 1024 * 1024) -> None:
        self.target = target
        self.deadline_s = deadline_s
        self.max_batch = max_batch
        self.stats = PoolStats()
        self.on_retry: Callable[[str], None] | None = None  # worker name -> metrics
        self.on_error: Callable[[str, str], None] | None = None  # (worker name, gRPC code) -> metrics
        self._credentials = credentials
        self._call_metadata = tuple(call_metadata)
        self._channel_count = channels
        self._lanes = [Lane(i, i % channels) for i in range(channels * streams)]
        self._channels: list[grpc.aio.Channel] = []
        self._workers: dict[str, Worker] = {}
        self._ready: list[Worker] = []       # workers with at least one live lane
        self._parked: deque[Pending] = deque()  # waiting for any live lane
        self._by_deadline: deque[Pending] = deque()
        self._next_ref = 0
        self._turn = 0
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._options = [
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 0),  # retries are ours: per request, across lanes
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        for index in range(self._channel_count):
            options = self._options + [("grpc.channel_index", index)]  # distinct channel, own connections
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                channel = grpc.aio.secure_channel(self.target, self._credentials, options=options)
            self._channels.append(channel)
        await self._settle()
        for lane in self._lanes:
            self._tasks.append(asyncio.create_task(self._run_lane(lane), name=f"lane-{lane.index}"))
        self._tasks.append(asyncio.create_task(self._sweep(), name="deadline-sweep"))

    async def _settle(self, timeout_s: float = 1.0) -> None:
        """round_robin only picks READY subchannels: streams opened while
        some replicas are still connecting would all land on the first one.
        Give every channel a moment to connect to all of them first."""
        async def ready(channel: grpc.aio.Channel) -> None:
            channel.get_state(try_to_connect=True)
            await channel.channel_ready()
        try:
            await asyncio.wait_for(asyncio.gather(*(ready(c) for c in self._channels)), timeout_s)
            await asyncio.sleep(SETTLE_S)
        except asyncio.TimeoutError:
            log.warning("wafsvc not reachable yet; streams will connect when it is",
                        extra={"target": self.target})

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close()

    @property
    def inflight(self) -> int:
        return self.stats.submitted - self.stats.answered

    def live_workers(self) -> list[str]:
        return [worker.name for worker in self._ready]

    # -- submitting ------------------------------------------------------
    def submit(self, request: waf_pb2.EvaluateRequest, callback: Callback) -> None:
        """Queues one evaluation; callback(verdict, None) or (None, reason)
        is called exactly once, at the latest at the deadline."""
        self._next_ref += 1
        ref = self._next_ref
        entry = _frame_field(1, waf_pb2.BatchRequest(ref=ref, request=request).SerializeToString())
        pending = Pending(ref, entry, callback, time.monotonic() + self.deadline_s)
        self.stats.submitted += 1
        self._by_deadline.append(pending)
        self._dispatch(pending)

    def _dispatch(self, pending: Pending, avoid: Worker | None = None) -> None:
        ready = self._ready
        if not ready:
            self._parked.append(pending)
            return
        # Least in flight, rotating among ties so idle workers share the load.
        count = len(ready)
        self._turn = (self._turn + 1) % count
        best = None
        for i in range(count):
            worker = ready[(self._turn + i) % count]
            if worker is avoid and count > 1:
                continue
            if best is None or worker.inflight < best.inflight:
                best = worker
        worker = best
        worker.turn = (worker.turn + 1) % len(worker.lanes)
        lane = worker.lanes[worker.turn]
        worker.inflight += 1
        pending.lane = lane
        pending.attempts += 1
        lane.queue.append(pending)
        lane.wakeup.set()

    def _finish(self, pending: Pending, verdict, error) -> None:
        if pending.done:
            return
        pending.done = True
        lane = pending.lane
        if lane is not None:
            pending.lane = None
            if lane.worker is not None:
                lane.worker.inflight -= 1
        self.stats.answered += 1
        try:
            pending.callback(verdict, error)
        except Exception:
            log.exception("verdict callback failed")

    # -- lanes -----------------------------------------------------------
    async def _run_lane(self, lane: Lane) -> None:
        channel = self._channels[lane.channel_index]
        method = channel.stream_stream(STREAM_METHOD, request_serializer=_identity,
                                       response_deserializer=waf_pb2.VerdictBatch.FromString)
        backoff = BACKOFF_MIN_S
        while not self._closing:
            call = method(metadata=self._call_metadata or None, wait_for_ready=True)
            writer = None
            try:
                metadata = await call.initial_metadata()
                name = dict(metadata or ()).get(WORKER_METADATA)
                if call.done() or name is None:
                    await call  # raises the call's error
                    raise ConnectionError("stream ended before it started")
                lane.call = call
                self._attach(lane, name)
                backoff = BACKOFF_MIN_S
                writer = asyncio.create_task(self._write_lane(lane, call))
                async for batch in call:
                    self._on_verdicts(lane, batch)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if self.on_error is not None and not self._closing:
                    self.on_error(lane.worker.name if lane.worker else "", exc.code().name)
                if not self._closing:
                    log.warning("stream to wafsvc failed", extra={
                        "lane": lane.index, "worker": lane.worker.name if lane.worker else None,
                        "code": exc.code().name, "details": exc.details()})
            except Exception as exc:  # keep the lane alive whatever happened
                log.warning("stream to wafsvc ended", extra={"lane": lane.index, "error": repr(exc)})
            finally:
                if writer is not None:
                    writer.cancel()
                call.cancel()
                self._detach(lane)
            if self._closing:
                return
            self.stats.lane_failures += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _write_lane(self, lane: Lane, call) -> None:
        max_batch = self.max_batch
        while True:
            await lane.wakeup.wait()
            lane.wakeup.clear()
            while lane.queue:
                items = lane.queue[:max_batch]
                del lane.queue[:max_batch]
                live = [p for p in items if not p.done]
                if not live:
                    continue
                for p in live:
                    lane.sent[p.ref] = p
                await call.write(b"".join(p.entry for p in live))

    def _on_verdicts(self, lane: Lane, batch: waf_pb2.VerdictBatch) -> None:
        sent = lane.sent
        for item in batch.verdicts:
            pending = sent.pop(item.ref, None)
            if pending is None or pending.done:
                continue
            if item.HasField("verdict"):
                self._finish(pending, item.verdict, None)
                continue
            self.stats.errors += 1
            if self.on_error is not None:
                self.on_error(lane.worker.name if lane.worker else "", item.error.code)
            reason = f"{item.error.code}: {item.error.message}"
            if item.error.code in RETRYABLE and self._can_retry(pending):
                self._retry(pending, lane.worker)
            else:
                self._finish(pending, None, reason)

    def _can_retry(self, pending: Pending) -> bool:
        return pending.attempts < MAX_ATTEMPTS and time.monotonic() < pending.deadline

    def _retry(self, pending: Pending, failed: Worker | None) -> None:
        lane = pending.lane
        if lane is not None and lane.worker is not None:
            lane.worker.inflight -= 1
        pending.lane = None
        self.stats.retries += 1
        if self.on_retry is not None and failed is not None:
            self.on_retry(failed.name)
        self._dispatch(pending, avoid=failed)

    def _attach(self, lane: Lane, name: str) -> None:
        worker = self._workers.get(name)
        if worker is None:
            worker = self._workers[name] = Worker(name)
        lane.worker = worker
        worker.lanes.append(lane)
        if len(worker.lanes) == 1:
            self._ready.append(worker)
            log.info("wafsvc worker available", extra={"worker": name, "workers": len(self._ready)})
        while self._parked:
            pending = self._parked.popleft()
            if not pending.done:
                self._dispatch(pending)

    def _detach(self, lane: Lane) -> None:
        """Takes the lane out of service and re-sends what it owed."""
        worker, lane.worker, lane.call = lane.worker, None, None
        orphans = list(lane.sent.values()) + lane.queue
        lane.sent.clear()
        lane.queue.clear()
        if worker is not None:
            worker.lanes.remove(lane)
            worker.turn = 0
            if not worker.lanes:
                self._ready.remove(worker)
                del self._workers[worker.name]
                log.warning("wafsvc worker lost", extra={"worker": worker.name, "workers": len(self._ready)})
        for pending in orphans:
            if pending.done:
                continue
            if worker is not None:
                worker.inflight -= 1
            pending.lane = None
            if self._can_retry(pending):
                self.stats.retries += 1
                if self.on_retry is not None and worker is not None:
                    self.on_retry(worker.name)
                self._dispatch(pending, avoid=worker)
            else:
                self._finish(pending, None, "wafsvc stream failed and no retry was possible")

    async def _sweep(self) -> None:
        """Answers requests whose deadline passed. One deadline for all, so
        submit order is deadline order and only the head needs looking at."""
        queue = self._by_deadline
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            while queue and (queue[0].done or queue[0].deadline <= now):
                pending = queue.popleft()
                if not pending.done:
                    self.stats.timeouts += 1
                    lane = pending.lane
                    if lane is not None:
                        lane.sent.pop(pending.ref, None)
                    self._finish(pending, None, "no verdict within the deadline")
