"""The gateway's path to wafsvc: long-lived bidi streams carrying batches.

Why streams and batches: a unary gRPC call costs ~250 us of CPU in Python, a
quarter of a CRS GET's engine work; a stream message carrying whatever
requests are ready costs a few percent (../shared/FACTS.md). HAProxy hands
over up to 16 pipelined NOTIFYs per read, so batches form on their own.

Shape:
- `channels` slots, each one gRPC channel with its own connections (local
  subchannel pool) and round_robin over every address the target resolves to
  (`dns:///wafsvc:50051` or `ipv4:a:p,b:p`). Each slot carries `streams`
  lanes; a lane is one EvaluateStream call.
- wafsvc names the worker process, its replica and the replica's worker
  count in each stream's initial metadata. Dispatch is least in flight per
  worker, not per lane or per replica.
- Coverage: one HTTP/2 connection pins to one SO_REUSEPORT worker, chosen by
  a hash of the connection, so some worker may get no connection at all. A
  maintenance task compares the workers reached with the counts replicas
  report and, while some are missing, replaces a slot whose connections only
  duplicate covered workers (fresh connections, fresh hashes) or adds a slot,
  within a bound.
- Rotation: every `recycle_s` the oldest slot is replaced, so replicas that
  joined DNS, came back after a crash or were down at start get lanes (a new
  channel resolves the target again), without restarting the gateway.
  Replacing is lossless: the new slot's lanes start first, the old ones take
  no new work and close once they have answered, at the latest after one
  deadline.
- Failure: a lane that fails hands its unanswered requests to other workers
  (Evaluate is idempotent) and reconnects with backoff; round_robin skips
  dead replicas. A request unanswered after `hedge_s` (a hung, not dead,
  replica) is re-sent to another worker, and that worker takes no new work
  until it answers again; keepalive closes its connections in the end.
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

from gateway.lanes import (Callback, Lane, Pending, PoolStats, Slot, Worker, batch_field,
                           passthrough)
from wafapi import waf_pb2

log = logging.getLogger("gateway.pool")

STREAM_METHOD = "/waf.v1.Waf/EvaluateStream"
# Stream metadata set by wafsvc/service.py.
WORKER_METADATA = "x-waf-worker"
REPLICA_METADATA = "x-waf-replica"
WORKERS_METADATA = "x-waf-workers"
MAX_ATTEMPTS = 4
# Stream messages a worker may hold unanswered. It evaluates one at a time,
# so two keep it busy (one running, one waiting); what arrives meanwhile
# queues here and leaves as one message when an answer comes back. Without
# a window every request went out alone when wafsvc was the bottleneck
# (CRS): one message each way per request, most of the gateway's CPU.
WORKER_WINDOW = 2
SWEEP_INTERVAL_S = 0.005
MAINTAIN_INTERVAL_S = 0.25
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 1.0
SETTLE_S = 0.2
CONNECT_TIMEOUT_S = 2.0
COVERAGE_COOLDOWN_S = 0.5        # between two coverage repairs
COVERAGE_FAST_ATTEMPTS = 20      # then repair only as often as rotation
# Declaring a worker hung re-sends all it holds, which doubles that work. A
# saturated worker answering a big batch late looks hung too, so the pool
# may do it STALL_BURST times, then once per STALL_REFILL_S: a real hang
# costs one, an overload cannot snowball into re-sending everything.
STALL_BURST, STALL_REFILL_S = 3.0, 2.0

# Errors worth another try elsewhere; the others describe the request itself.
RETRYABLE = {"UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED", "UNKNOWN"}


class WafPool:
    def __init__(self, target: str, *, channels: int = 4, streams: int = 4, max_batch: int = 16,
                 deadline_s: float = 0.4, hedge_s: float = 0.15, recycle_s: float = 15.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 call_metadata: tuple = (), max_message_bytes: int = 8 * 1024 * 1024,
                 channel_options: tuple = ()) -> None:
        self.target = target
        self.deadline_s = deadline_s
        self.hedge_s = hedge_s if 0 < hedge_s < deadline_s else deadline_s
        self.recycle_s = recycle_s
        self.max_batch = max_batch
        self.stats = PoolStats()
        self.on_retry: Callable[[str], None] | None = None  # worker name -> metrics
        self.on_error: Callable[[str, str], None] | None = None  # (worker name, gRPC code) -> metrics
        self._credentials = credentials
        self._call_metadata = tuple(call_metadata)
        self._channel_count = channels
        self._streams = streams
        self._max_slots = max(4 * channels, 16)
        self._slots: list[Slot] = []
        self._generation = 0
        self._lane_index = 0
        self._workers: dict[str, Worker] = {}
        self._replicas: dict[str, int] = {}   # replica -> worker count it reports
        self._ready: list[Worker] = []        # workers with at least one lane taking work
        self._parked: deque[Pending] = deque()  # waiting for any live lane
        self._by_deadline: deque[Pending] = deque()
        self._by_hedge: deque[Pending] = deque()
        self._sweep_wake = asyncio.Event()  # set when work arrives while the sweep sleeps idle
        self._stall_tokens = STALL_BURST
        self._stall_checked = time.monotonic()
        self._next_ref = 0
        self._turn = 0
        self._tasks: list[asyncio.Task] = []
        self._replacing: asyncio.Task | None = None
        self._last_rotation = time.monotonic()
        self._coverage_attempts = 0
        self._next_repair = 0.0
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
            ("grpc.dns_min_time_between_resolutions_ms", 1000),
            *channel_options,  # e.g. the TLS server name override
        ]

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        slots = [self._new_slot(i) for i in range(self._channel_count)]
        await self._settle([slot.channel for slot in slots])
        for slot in slots:
            self._slots.append(slot)
            self._start_lanes(slot)
        self._tasks.append(asyncio.create_task(self._sweep(), name="deadline-sweep"))
        self._tasks.append(asyncio.create_task(self._maintain(), name="pool-maintenance"))

    def _new_slot(self, position: int) -> Slot:
        self._generation += 1
        # A distinct channel argument gives a distinct channel with its own
        # connections, hence new SO_REUSEPORT hashes.
        options = self._options + [("grpc.channel_index", self._generation)]
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            channel = grpc.aio.secure_channel(self.target, self._credentials, options=options)
        return Slot(position, self._generation, channel)

    def _start_lanes(self, slot: Slot) -> None:
        for _ in range(self._streams):
            self._lane_index += 1
            lane = Lane(self._lane_index, slot)
            slot.lanes.append(lane)
            slot.tasks.append(asyncio.create_task(self._run_lane(lane), name=f"lane-{lane.index}"))

    async def _settle(self, channels: list[grpc.aio.Channel], timeout_s: float = 1.0) -> bool:
        """round_robin only picks READY subchannels: streams opened while
        some replicas are still connecting would all land on the first one.
        Give the channels a moment to connect to all of them first."""
        async def ready(channel: grpc.aio.Channel) -> None:
            channel.get_state(try_to_connect=True)
            await channel.channel_ready()
        try:
            await asyncio.wait_for(asyncio.gather(*(ready(c) for c in channels)), timeout_s)
            await asyncio.sleep(SETTLE_S)
            return True
        except asyncio.TimeoutError:
            log.warning("wafsvc not reachable yet; streams will connect when it is",
                        extra={"target": self.target})
            return False

    async def close(self) -> None:
        self._closing = True
        stats = self.stats
        log.info("pool closing", extra={"answered": stats.answered, "unanswered": self.inflight,
                                        "messages": stats.messages,
                                        "mean_batch": round(stats.batched / max(1, stats.messages), 2)})
        tasks = list(self._tasks)
        if self._replacing is not None:
            tasks.append(self._replacing)
        for slot in self._slots:
            tasks.extend(slot.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in self._slots:
            await slot.channel.close()

    @property
    def inflight(self) -> int:
        return self.stats.submitted - self.stats.answered

    def live_workers(self) -> list[str]:
        return [worker.name for worker in self._ready]

    def coverage(self) -> dict[str, tuple[int, int]]:
        """replica -> (workers with a lane, workers it reports)."""
        reached: dict[str, int] = {}
        for worker in self._ready:
            reached[worker.replica] = reached.get(worker.replica, 0) + 1
        return {replica: (reached.get(replica, 0), count) for replica, count in self._replicas.items()}

    # -- submitting ------------------------------------------------------
    def submit(self, request: waf_pb2.EvaluateRequest, callback: Callback) -> None:
        """Queues one evaluation; callback(verdict, None) or (None, reason)
        is called exactly once, at the latest at the deadline."""
        self._next_ref += 1
        ref = self._next_ref
        entry = batch_field(1, waf_pb2.BatchRequest(ref=ref, request=request).SerializeToString())
        now = time.monotonic()
        pending = Pending(ref, entry, callback, now + self.deadline_s, now + self.hedge_s)
        self.stats.submitted += 1
        if not self._by_deadline:
            self._sweep_wake.set()
        self._by_deadline.append(pending)
        self._by_hedge.append(pending)
        self._dispatch(pending)

    def _dispatch(self, pending: Pending, avoid: Worker | None = None) -> None:
        ready = self._ready
        if not ready:
            self._parked.append(pending)
            return
        # Least in flight, rotating among ties so idle workers share the load;
        # a stalled worker only when every worker is.
        count = len(ready)
        self._turn = (self._turn + 1) % count
        best = None
        best_load = 0
        for i in range(count):
            worker = ready[(self._turn + i) % count]
            if worker is avoid and count > 1:
                continue
            load = worker.inflight + (1 << 30 if worker.stalled else 0)
            if best is None or load < best_load:
                best, best_load = worker, load
        worker = best
        lane = worker.lanes[worker.turn % len(worker.lanes)]
        if not lane.queue:
            # Join the batch this worker is filling, if any: the lane writes
            # its whole queue as one message on the next loop iteration.
            # Rotating per request would spread one wakeup's requests over
            # every lane, one per message (measured: mean batch 1.2).
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
        method = lane.slot.channel.stream_stream(STREAM_METHOD, request_serializer=passthrough,
                                                 response_deserializer=waf_pb2.VerdictBatch.FromString)
        backoff = BACKOFF_MIN_S
        while not self._closing and not lane.retired:
            call = method(metadata=self._call_metadata or None, wait_for_ready=True)
            writer = None
            try:
                metadata = dict(await call.initial_metadata() or ())
                name = metadata.get(WORKER_METADATA)
                if call.done() or name is None:
                    # A stream call cannot be awaited; its status says why it
                    # ended (UNAUTHENTICATED token, UNAVAILABLE TLS handshake...).
                    code = await call.code()
                    raise ConnectionError(f"stream ended before it started: {code.name}: "
                                          f"{await call.details()}")
                if lane.retired:
                    return
                lane.call = call
                self._attach(lane, name, metadata.get(REPLICA_METADATA, name),
                             _int(metadata.get(WORKERS_METADATA), 1))
                backoff = BACKOFF_MIN_S
                writer = asyncio.create_task(self._write_lane(lane, call))
                async for batch in call:
                    self._on_verdicts(lane, batch)
                # The worker ended the stream: it is draining. Not a failure.
                log.info("wafsvc stream ended by the worker", extra={
                    "lane": lane.index, "worker": lane.worker.name if lane.worker else None})
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if not self._closing and not lane.retired:
                    if self.on_error is not None:
                        self.on_error(lane.worker.name if lane.worker else "", exc.code().name)
                    self.stats.lane_failures += 1
                    log.warning("stream to wafsvc failed", extra={
                        "lane": lane.index, "worker": lane.worker.name if lane.worker else None,
                        "code": exc.code().name, "details": exc.details()})
            except Exception as exc:  # keep the lane alive whatever happened
                self.stats.lane_failures += 1
                log.warning("stream to wafsvc ended", extra={"lane": lane.index, "error": repr(exc)})
            finally:
                if writer is not None:
                    writer.cancel()
                call.cancel()
                self._detach(lane)
            if self._closing or lane.retired:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _write_lane(self, lane: Lane, call) -> None:
        max_batch = self.max_batch
        try:
            while True:
                await lane.wakeup.wait()
                lane.wakeup.clear()
                while lane.queue:
                    worker = lane.worker
                    if worker is not None and worker.outstanding >= WORKER_WINDOW:
                        break  # the worker's next answer wakes this lane (_on_verdicts)
                    items = lane.queue[:max_batch]
                    del lane.queue[:max_batch]
                    live = [p for p in items if not p.done and p.lane is lane]
                    if not live:
                        continue
                    for p in live:
                        lane.sent[p.ref] = p
                    self.stats.messages += 1
                    self.stats.batched += len(live)
                    if worker is not None:
                        worker.outstanding += 1
                        lane.unanswered.append(len(live))
                    await call.write(b"".join(p.entry for p in live))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The reader sees the call end and re-sends what this lane owed.
            log.debug("stream write failed", extra={"lane": lane.index, "error": repr(exc)})
            call.cancel()

    def _on_verdicts(self, lane: Lane, batch: waf_pb2.VerdictBatch) -> None:
        sent = lane.sent
        worker = lane.worker
        answers, unanswered = len(batch.verdicts), lane.unanswered
        while answers and unanswered:
            take = min(answers, unanswered[0])
            answers -= take
            if take == unanswered[0]:
                unanswered.popleft()
                if worker is not None:
                    worker.outstanding -= 1
            else:
                unanswered[0] -= take
        if worker is not None:
            worker.last_answer = time.monotonic()
            for other in worker.lanes:  # what queued while the window was full goes now
                if other.queue:
                    other.wakeup.set()
            if worker.stalled:
                worker.stalled = False
                log.info("wafsvc worker answers again", extra={"worker": worker.name})
        for item in batch.verdicts:
            pending = sent.pop(item.ref, None)
            if pending is None or pending.done or pending.lane is not lane:
                continue
            if item.HasField("verdict"):
                self._finish(pending, item.verdict, None)
                continue
            self.stats.errors += 1
            if self.on_error is not None:
                self.on_error(worker.name if worker else "", item.error.code)
            reason = f"{item.error.code}: {item.error.message}"
            if item.error.code in RETRYABLE and self._can_retry(pending):
                self._retry(pending, worker)
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

    def _attach(self, lane: Lane, name: str, replica: str, workers: int) -> None:
        worker = self._workers.get(name)
        if worker is None:
            worker = self._workers[name] = Worker(name, replica)
        self._replicas[replica] = workers
        lane.worker = worker
        worker.lanes.append(lane)
        if len(worker.lanes) == 1:
            self._ready.append(worker)
            log.info("wafsvc worker available", extra={"worker": name, "workers": len(self._ready)})
        while self._parked:
            pending = self._parked.popleft()
            if not pending.done:
                self._dispatch(pending)

    def _stop_taking_work(self, lane: Lane) -> Worker | None:
        """Removes the lane from dispatch; answers still arrive on it."""
        worker = lane.worker
        if worker is None or lane not in worker.lanes:
            return worker
        worker.lanes.remove(lane)
        worker.turn = 0
        if not worker.lanes:
            self._ready.remove(worker)
            if self._workers.get(worker.name) is worker:
                del self._workers[worker.name]
            if not any(w.replica == worker.replica for w in self._ready):
                self._replicas.pop(worker.replica, None)
            log.info("wafsvc worker has no lanes", extra={"worker": worker.name, "workers": len(self._ready)})
        return worker

    def _detach(self, lane: Lane) -> None:
        """Takes the lane out of service and re-sends what it owed."""
        worker = self._stop_taking_work(lane)
        if worker is not None:
            worker.outstanding -= len(lane.unanswered)
        lane.unanswered.clear()
        orphans = list(lane.sent.values()) + lane.queue
        lane.sent.clear()
        lane.queue.clear()
        # The lane keeps its worker until its orphans are gone, so _retry and
        # _finish take them off that worker's count; dispatch no longer sees
        # the lane (_stop_taking_work), so none can land on it again.
        for pending in orphans:
            if pending.done or pending.lane is not lane:
                continue
            if self._can_retry(pending):
                self._retry(pending, worker)
            else:
                self._finish(pending, None, "wafsvc stream failed and no retry was possible")
        lane.worker, lane.call = None, None

    async def _sweep(self) -> None:
        """Answers requests whose deadline passed, and re-sends those a
        worker sits on for too long. One deadline for all, so submit order is
        deadline order and only the heads need looking at.

        It sleeps until the first head is due, and not at all while nothing
        is pending: waking every 5 ms cost ~2% of a core when idle, which at
        CRS request rates (hundreds/s) was most of the gateway's CPU per
        request."""
        queue, hedges, parked = self._by_deadline, self._by_hedge, self._parked
        while True:
            while queue and queue[0].done:
                queue.popleft()
            while hedges and hedges[0].done:
                hedges.popleft()
            if not queue and not hedges and not parked:
                self._sweep_wake.clear()
                await self._sweep_wake.wait()
                continue
            heads = [q[0].deadline if q is queue else q[0].hedge_at for q in (queue, hedges) if q]
            due = min(heads, default=time.monotonic())
            await asyncio.sleep(max(SWEEP_INTERVAL_S, due - time.monotonic()))
            now = time.monotonic()
            while parked and parked[0].done:
                parked.popleft()  # answered by the deadline while no worker was up
            while hedges and (hedges[0].done or hedges[0].hedge_at <= now):
                pending = hedges.popleft()
                if not pending.done and pending.lane is not None:
                    self._hedge(pending)
            while queue and (queue[0].done or queue[0].deadline <= now):
                pending = queue.popleft()
                if not pending.done:
                    self.stats.timeouts += 1
                    lane = pending.lane
                    if lane is not None:
                        lane.sent.pop(pending.ref, None)
                    self._finish(pending, None, "no verdict within the deadline")

    def _hedge(self, pending: Pending) -> None:
        """The worker has not answered anything since this request was
        submitted: it is hung (or stuck on one huge request). Everything it
        holds goes elsewhere, and it gets no new work until it answers."""
        worker = pending.lane.worker
        if worker is None or worker.last_answer >= pending.hedge_at - self.hedge_s:
            return  # it answers, just not this one yet: re-sending would double the work
        if not any(w is not worker and not w.stalled for w in self._ready):
            return  # nowhere better to go
        now = time.monotonic()
        self._stall_tokens = min(STALL_BURST, self._stall_tokens + (now - self._stall_checked) / STALL_REFILL_S)
        self._stall_checked = now
        if self._stall_tokens < 1:
            return  # too many lately: more likely overload than hangs
        self._stall_tokens -= 1
        worker.stalled = True
        log.warning("wafsvc worker is not answering; sending its requests elsewhere",
                    extra={"worker": worker.name, "after_ms": round(self.hedge_s * 1000)})
        for lane in list(worker.lanes):
            held = list(lane.sent.values()) + lane.queue
            lane.sent.clear()
            lane.queue.clear()
            for item in held:
                if not item.done and item.lane is lane and item.attempts < MAX_ATTEMPTS:
                    self.stats.hedges += 1
                    self._retry(item, worker)
                elif not item.done and item.lane is lane:
                    lane.sent[item.ref] = item  # out of attempts: the deadline answers it

    # -- keeping every worker of every replica reached -------------------
    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTAIN_INTERVAL_S)
            if self._replacing is not None and not self._replacing.done():
                continue
            now = time.monotonic()
            if self._repair_coverage(now):
                continue
            if self.recycle_s > 0 and now - self._last_rotation >= self.recycle_s and self._slots:
                self._last_rotation = now
                oldest = min(self._slots, key=lambda slot: slot.opened)
                self._replace(oldest, "rotation")

    def _repair_coverage(self, now: float) -> bool:
        missing = {replica for replica, (reached, count) in self.coverage().items() if reached < count}
        if not missing:
            self._coverage_attempts = 0
            return False
        if now < self._next_repair:
            return False
        self._coverage_attempts += 1
        self.stats.coverage_repairs += 1
        fast = self._coverage_attempts <= COVERAGE_FAST_ATTEMPTS
        self._next_repair = now + (COVERAGE_COOLDOWN_S if fast else max(self.recycle_s, 5.0))
        if self._coverage_attempts == COVERAGE_FAST_ATTEMPTS:
            log.warning("some wafsvc workers still have no connection; retrying slowly",
                        extra={"coverage": self.coverage()})
        spare = self._spare_slot(missing)
        if spare is not None:
            self._replace(spare, "coverage")
        elif len(self._slots) < self._max_slots:
            self._add_slot()
        return True

    def _spare_slot(self, missing: set[str]) -> Slot | None:
        """A slot whose every lane reaches a worker that another slot
        reaches too: replacing it loses nothing and rolls new hashes."""
        holders: dict[str, set[int]] = {}
        for slot in self._slots:
            for lane in slot.lanes:
                if lane.worker is not None and lane in lane.worker.lanes:
                    holders.setdefault(lane.worker.name, set()).add(slot.generation)
        for slot in sorted(self._slots, key=lambda s: s.opened):
            names = {lane.worker.name for lane in slot.lanes if lane.worker is not None}
            if all(len(holders.get(name, ())) > 1 for name in names):
                return slot
        return None

    def _add_slot(self) -> None:
        slot = self._new_slot(len(self._slots))
        log.info("adding a gRPC channel to reach every wafsvc worker",
                 extra={"channels": len(self._slots) + 1, "coverage": self.coverage()})
        self._replacing = asyncio.create_task(self._bring_up(slot, None))

    def _replace(self, old: Slot, why: str) -> None:
        self.stats.recycles += 1
        log.debug("replacing a gRPC channel", extra={"why": why, "generation": old.generation})
        self._replacing = asyncio.create_task(self._bring_up(self._new_slot(old.position), old))

    async def _bring_up(self, slot: Slot, old: Slot | None) -> None:
        """New lanes first, then the old ones stop taking work and close once
        they have answered: nothing in flight is lost to a replacement."""
        try:
            await self._settle([slot.channel], CONNECT_TIMEOUT_S)
            if self._closing:
                await slot.channel.close()
                return
            self._start_lanes(slot)
            until = time.monotonic() + CONNECT_TIMEOUT_S
            while any(lane.worker is None for lane in slot.lanes) and time.monotonic() < until:
                await asyncio.sleep(0.02)
            if old is None:
                self._slots.append(slot)
                return
            self._slots[self._slots.index(old)] = slot
            await self._retire(old)
        except asyncio.CancelledError:
            for dropped in (slot, old):
                if dropped is not None and dropped not in self._slots:
                    for task in dropped.tasks:
                        task.cancel()
                    await dropped.channel.close()
            raise

    async def _retire(self, slot: Slot) -> None:
        for lane in slot.lanes:
            lane.retired = True
            self._stop_taking_work(lane)
            queued, lane.queue = lane.queue, []
            for pending in queued:
                if not pending.done and pending.lane is lane:
                    if lane.worker is not None:
                        lane.worker.inflight -= 1
                    pending.lane = None
                    pending.attempts -= 1  # not an attempt: it was never sent
                    self._dispatch(pending)
        deadline = time.monotonic() + self.deadline_s
        while any(lane.sent for lane in slot.lanes) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in slot.tasks:
            task.cancel()
        await asyncio.gather(*slot.tasks, return_exceptions=True)
        await slot.channel.close()


def _int(text: str | None, default: int) -> int:
    try:
        return max(1, int(text)) if text is not None else default
    except ValueError:
        return default
