"""The gateway's path to wafsvc: long-lived bidi streams carrying batches.

Why streams and batches: a unary gRPC call costs ~250 us of CPU in Python, a
quarter of a CRS GET's engine work; a stream message carrying whatever
requests are ready costs a few percent (../shared/FACTS.md). HAProxy hands
over up to 16 pipelined NOTIFYs per read, so batches form on their own.

WafPool is the front: submit, and the fate of each request (dispatched,
retried, answered). The parts, one job each:
- gateway/workers.py: which workers are reached, and which gets a request;
- gateway/streams.py: one lane (EvaluateStream call): write batches, read verdicts;
- gateway/sweeper.py: deadlines, and hung workers (hedging);
- gateway/channels.py: gRPC channels, rotation, reaching every worker;
- gateway/lanes.py: the records they share.

Every request is answered exactly once: callback(verdict, None), or
callback(None, NoVerdict) at the latest at the deadline. A worker's in-flight
count goes down in one place, _release.

A response (submit_response) is pinned to the worker named in its handle:
it is dispatched only there (Workers.route), retried only there (another
lane to the same worker, after a stream failure), never hedged elsewhere,
and answered at once as a miss when no open lane reaches that worker (it
died, or finished draining, and its transactions with it: NO_ROUTE) or the
worker is hung (WORKER_HUNG): waiting could only end at the deadline.
A draining worker (it says so on its streams, or refuses a request with
DRAINING) gets no new requests but keeps its lanes for its responses
(worker_draining) until it ends them: a rolling update loses no response.
A pausing worker (a reload's parse) says so the same way, then that it
serves again (worker_serving): its lanes take requests again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import grpc

from gateway.channels import Channels, grpc_options
from gateway.failures import NO_ROUTE, STREAM_FAILED, WORKER_HUNG, NoVerdict
from gateway.lanes import Callback, Lane, Pending, PoolStats, Worker
from gateway.protowire import batch_entry, response_entry
from gateway.streams import LaneRunner
from gateway.sweeper import MAX_ATTEMPTS, Sweeper
from gateway.workers import Workers

log = logging.getLogger("gateway.pool")


class PoolHooks:
    """What the pool reports besides its counters; the metrics pass theirs in."""

    def retried(self, worker: str) -> None: ...
    def grpc_error(self, worker: str, code: str) -> None: ...


class WafPool:
    def __init__(self, target: str, *, channels: int = 4, streams: int = 4, max_batch: int = 16,
                 deadline_s: float = 0.4, hedge_s: float = 0.15, recycle_s: float = 15.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 call_metadata: tuple = (), max_message_bytes: int = 8 * 1024 * 1024,
                 channel_options: tuple = (), hooks: PoolHooks | None = None) -> None:
        self.target = target
        self.deadline_s = deadline_s
        self.hedge_s = hedge_s if 0 < hedge_s < deadline_s else deadline_s
        self.max_batch = max_batch
        self.stats = PoolStats()
        self.hooks = hooks or PoolHooks()
        self.closing = False
        self.workers = Workers()
        self.parked: deque[Pending] = deque()  # waiting for any live lane
        self.sweeper = Sweeper(self, self.hedge_s)
        self.runner = LaneRunner(self, tuple(call_metadata))
        self.channels = Channels(self, target, channels=channels, streams=streams, recycle_s=recycle_s,
                                 credentials=credentials,
                                 options=grpc_options(max_message_bytes, tuple(channel_options)))
        self._next_ref = 0
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        await self.channels.start()
        self._tasks.append(asyncio.create_task(self.sweeper.run(), name="deadline-sweep"))
        self._tasks.append(asyncio.create_task(self.channels.maintain(), name="pool-maintenance"))

    async def close(self) -> None:
        self.closing = True
        stats = self.stats
        log.info("pool closing", extra={"answered": stats.answered, "unanswered": self.inflight,
                                        "messages": stats.messages,
                                        "mean_batch": round(stats.batched / max(1, stats.messages), 2)})
        tasks = self._tasks + self.channels.tasks()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.channels.close()

    @property
    def inflight(self) -> int:
        return self.stats.submitted - self.stats.answered

    def live_workers(self) -> list[str]:
        return [worker.name for worker in self.workers.ready]

    def coverage(self) -> dict[str, tuple[int, int]]:
        return self.workers.coverage()

    # -- a request's way -------------------------------------------------
    def submit(self, request: bytes, callback: Callback) -> None:
        """Queues one evaluation, a serialized waf.v1.EvaluateRequest."""
        self._next_ref += 1
        ref = self._next_ref
        now = time.monotonic()
        pending = Pending(ref, batch_entry(ref, request), callback, now + self.deadline_s,
                          now + self.hedge_s)
        self.stats.submitted += 1
        self.sweeper.add(pending)
        self._dispatch(pending)

    def submit_response(self, worker: str, response: bytes, callback: Callback) -> None:
        """Queues one response, a serialized waf.v1.ResponseRequest, for the
        worker that holds its transaction."""
        self._next_ref += 1
        ref = self._next_ref
        now = time.monotonic()
        pending = Pending(ref, response_entry(ref, response), callback, now + self.deadline_s,
                          now + self.hedge_s)
        pending.pin = worker
        stats = self.stats
        stats.submitted += 1
        stats.responses += 1
        if self._unreachable(pending):  # answered at once: waiting cannot bring it back
            return
        self.sweeper.add(pending)
        self._dispatch(pending)

    def _unreachable(self, pending: Pending) -> bool:
        """Answers a response whose worker cannot be reached with its miss."""
        worker = self.workers.get(pending.pin)
        if worker is not None and not worker.stalled:
            return False
        self.stats.unreachable += 1
        self.finish(pending, None, NO_ROUTE if worker is None else WORKER_HUNG)
        return True

    def _dispatch(self, pending: Pending, avoid: Worker | None = None) -> None:
        if pending.pin is not None:
            if self._unreachable(pending):
                return
            lane = self.workers.route(pending.pin)
        else:
            lane = self.workers.pick(avoid)
            if lane is None:
                self.parked.append(pending)
                return
        lane.worker.inflight += 1
        pending.lane = lane
        pending.attempts += 1
        lane.queue.append(pending)
        lane.wakeup.set()

    def _release(self, pending: Pending) -> None:
        """The one place a worker's in-flight count goes down: the request
        leaves its lane (answered, retried elsewhere, or moved)."""
        lane = pending.lane
        if lane is not None:
            pending.lane = None
            if lane.worker is not None:
                lane.worker.inflight -= 1

    def finish(self, pending: Pending, verdict, failure: NoVerdict | None) -> None:
        if pending.done:
            return
        pending.done = True
        self._release(pending)
        self.stats.answered += 1
        try:
            pending.callback(verdict, failure)
        except Exception:
            log.exception("verdict callback failed")

    def can_retry(self, pending: Pending) -> bool:
        """Another attempt is allowed. A response may try every lane to its
        worker: when the worker died they fail one by one, then it has no
        route left and is a miss (NO_ROUTE), not a failure."""
        if pending.pin is not None:
            return time.monotonic() < pending.deadline
        return pending.attempts < MAX_ATTEMPTS and time.monotonic() < pending.deadline

    def retry(self, pending: Pending, failed: Worker | None) -> None:
        """Another attempt, on another worker if there is one."""
        self._release(pending)
        self.stats.retries += 1
        if failed is not None:
            self.hooks.retried(failed.name)
        self._dispatch(pending, avoid=failed)

    def redispatch(self, pending: Pending) -> None:
        """Moves a request queued on a lane, never sent, elsewhere: not an attempt."""
        self._release(pending)
        pending.attempts -= 1
        self._dispatch(pending)

    def worker_draining(self, worker: Worker) -> None:
        """The worker takes no new requests: its lanes carry only responses
        from now on, and requests queued on them go to other workers."""
        lanes = self.workers.drain(worker)
        if not lanes:
            return
        log.info("wafsvc worker draining: responses only", extra={"worker": worker.name,
                                                                  "workers": len(self.workers.ready)})
        for lane in lanes:
            moved = [p for p in lane.queue if p.pin is None]
            lane.queue[:] = [p for p in lane.queue if p.pin is not None]
            for pending in moved:
                if not pending.done and pending.lane is lane:
                    self.redispatch(pending)

    def worker_serving(self, worker: Worker) -> None:
        """The worker takes requests again (after a pause): back in rotation,
        and what waited for any worker goes now."""
        if self.workers.serve_again(worker):
            log.info("wafsvc worker serving again", extra={"worker": worker.name,
                                                           "workers": len(self.workers.ready)})
            self._dispatch_parked()

    # -- lanes coming and going -------------------------------------------
    def attach(self, lane: Lane, name: str, replica: str, workers: int) -> None:
        self.workers.attach(lane, name, replica, workers)
        self._dispatch_parked()

    def _dispatch_parked(self) -> None:
        parked = self.parked   # the sweeper holds it too: emptied in place
        for _ in range(len(parked)):   # parked again when still no worker takes requests
            pending = parked.popleft()
            if not pending.done:
                self._dispatch(pending)

    def detach(self, lane: Lane) -> None:
        """Takes the lane out of service and re-sends what it owed."""
        worker = self.workers.forget(lane)
        if worker is not None:
            worker.outstanding -= len(lane.unanswered)
        lane.unanswered.clear()
        orphans = list(lane.sent.values()) + lane.queue
        lane.sent.clear()
        lane.queue.clear()
        # The lane keeps its worker until its orphans are gone, so _release
        # takes them off that worker's count; dispatch no longer sees the
        # lane (stop_taking_work), so none can land on it again.
        for pending in orphans:
            if pending.done or pending.lane is not lane:
                continue
            if self.can_retry(pending):
                self.retry(pending, worker)
            else:
                self.finish(pending, None, STREAM_FAILED)
        lane.worker, lane.call = None, None
