"""Deadlines and hung workers.

Every request has one deadline: past it the pool answers "no verdict" and
the failure policy applies; the answer is never left waiting. A request a
worker sits on for `hedge_s`, while that worker has answered nothing since
it was sent, marks the worker as hung: everything it holds goes elsewhere,
and it takes no new work until it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from gateway.failures import TIMED_OUT, WORKER_HUNG
from gateway.lanes import Pending

log = logging.getLogger("gateway.pool")

SWEEP_INTERVAL_S = 0.005
MAX_ATTEMPTS = 4
# Declaring a worker hung re-sends all it holds, which doubles that work. A
# saturated worker answering a big batch late looks hung too, so the pool
# may do it STALL_BURST times, then once per STALL_REFILL_S: a real hang
# costs one, an overload cannot snowball into re-sending everything.
STALL_BURST, STALL_REFILL_S = 3.0, 2.0


class Sweeper:
    def __init__(self, pool, hedge_s: float) -> None:
        self.pool = pool
        self.hedge_s = hedge_s
        self.by_deadline: deque[Pending] = deque()
        self.by_hedge: deque[Pending] = deque()
        self.wake = asyncio.Event()  # set when work arrives while the sweep sleeps idle
        self._stall_tokens = STALL_BURST
        self._stall_checked = time.monotonic()

    def add(self, pending: Pending) -> None:
        if not self.by_deadline:
            self.wake.set()
        self.by_deadline.append(pending)
        self.by_hedge.append(pending)

    async def run(self) -> None:
        """One deadline for all, so submit order is deadline order and only
        the heads need looking at.

        It sleeps until the first head is due, and not at all while nothing
        is pending: waking every 5 ms cost ~2% of a core when idle, which at
        CRS request rates (hundreds/s) was most of the gateway's CPU per
        request."""
        queue, hedges, parked = self.by_deadline, self.by_hedge, self.pool.parked
        while True:
            while queue and queue[0].done:
                queue.popleft()
            while hedges and hedges[0].done:
                hedges.popleft()
            if not queue and not hedges and not parked:
                self.wake.clear()
                await self.wake.wait()
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
                    self.hedge(pending)
            while queue and (queue[0].done or queue[0].deadline <= now):
                pending = queue.popleft()
                if not pending.done:
                    self.pool.stats.timeouts += 1
                    lane = pending.lane
                    if lane is not None:
                        lane.sent.pop(pending.ref, None)
                    self.pool.finish(pending, None, TIMED_OUT)

    def hedge(self, pending: Pending) -> None:
        """The worker has not answered anything since this request was
        submitted: it is hung (or stuck on one huge request). Everything it
        holds goes elsewhere, and it gets no new work until it answers;
        responses, which no other worker can evaluate, are misses now."""
        pool = self.pool
        worker = pending.lane.worker
        if worker is None or worker.last_answer >= pending.hedge_at - self.hedge_s:
            return  # it answers, just not this one yet: re-sending would double the work
        if not any(w is not worker and not w.stalled for w in pool.workers.ready):
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
        for lane in worker.lanes + worker.spares:
            sent, queued = list(lane.sent.values()), lane.queue
            lane.sent.clear()
            lane.queue = []
            for item in sent + queued:
                if item.done or item.lane is not lane:
                    continue
                if item.pin is not None:
                    # A response only that worker can evaluate: a miss now
                    # (WORKER_HUNG), rather than a failure at the deadline.
                    pool.stats.unreachable += 1
                    pool.finish(item, None, WORKER_HUNG)
                elif item.attempts < MAX_ATTEMPTS:
                    pool.stats.hedges += 1
                    pool.retry(item, worker)
                else:
                    lane.sent[item.ref] = item  # out of attempts: the deadline answers it
