"""Which wafsvc workers the pool can reach, and which one gets a request.

wafsvc names the worker, its replica and the replica's worker count in each
stream's initial metadata. A worker is ready while at least one lane (one
EvaluateStream call) takes work for it. Dispatch is least in flight per
worker, not per lane or per replica: one HTTP/2 connection pins to one
SO_REUSEPORT worker, so lanes are only a way to reach workers.
"""

from __future__ import annotations

import logging

from gateway.lanes import Lane, Worker

log = logging.getLogger("gateway.pool")

STALLED = 1 << 30  # a stalled (hung) worker gets work only when every worker is stalled


class Workers:
    def __init__(self) -> None:
        self.ready: list[Worker] = []             # with at least one lane taking work
        self._by_name: dict[str, Worker] = {}
        self._replicas: dict[str, int] = {}       # replica -> worker count it reports
        self._turn = 0

    def get(self, name: str) -> Worker | None:
        """The ready worker of that name: what a request that must reach one
        given worker (a transaction it holds) would be dispatched to."""
        return self._by_name.get(name)

    def pick(self, avoid: Worker | None = None) -> Lane | None:
        """A lane of the least loaded worker, rotating among ties so idle
        workers share the load; None when no worker is ready."""
        ready = self.ready
        count = len(ready)
        if not count:
            return None
        self._turn = (self._turn + 1) % count
        best = None
        best_load = 0
        for i in range(count):
            worker = ready[(self._turn + i) % count]
            if worker is avoid and count > 1:
                continue
            load = worker.inflight + (STALLED if worker.stalled else 0)
            if best is None or load < best_load:
                best, best_load = worker, load
        return self.lane_of(best)

    @staticmethod
    def lane_of(worker: Worker) -> Lane:
        """Join the batch this worker is filling, if any: the lane writes its
        whole queue as one message on the next loop iteration. Rotating per
        request would spread one wakeup's requests over every lane, one per
        message (measured: mean batch 1.2)."""
        lane = worker.lanes[worker.turn % len(worker.lanes)]
        if not lane.queue:
            worker.turn = (worker.turn + 1) % len(worker.lanes)
            lane = worker.lanes[worker.turn]
        return lane

    def attach(self, lane: Lane, name: str, replica: str, workers: int) -> None:
        worker = self._by_name.get(name)
        if worker is None:
            worker = self._by_name[name] = Worker(name, replica)
        self._replicas[replica] = workers
        lane.worker = worker
        worker.lanes.append(lane)
        if len(worker.lanes) == 1:
            self.ready.append(worker)
            log.info("wafsvc worker available", extra={"worker": name, "workers": len(self.ready)})

    def stop_taking_work(self, lane: Lane) -> Worker | None:
        """Removes the lane from dispatch; answers still arrive on it."""
        worker = lane.worker
        if worker is None or lane not in worker.lanes:
            return worker
        worker.lanes.remove(lane)
        worker.turn = 0
        if not worker.lanes:
            self.ready.remove(worker)
            if self._by_name.get(worker.name) is worker:
                del self._by_name[worker.name]
            if not any(w.replica == worker.replica for w in self.ready):
                self._replicas.pop(worker.replica, None)
            log.info("wafsvc worker has no lanes", extra={"worker": worker.name, "workers": len(self.ready)})
        return worker

    def coverage(self) -> dict[str, tuple[int, int]]:
        """replica -> (workers with a lane, workers it reports)."""
        reached: dict[str, int] = {}
        for worker in self.ready:
            reached[worker.replica] = reached.get(worker.replica, 0) + 1
        return {replica: (reached.get(replica, 0), count) for replica, count in self._replicas.items()}
