"""Which wafsvc workers the pool can reach, and which one gets a request.

wafsvc names the worker, its replica and the replica's worker count in each
stream's initial metadata. A worker is ready while at least one lane (one
EvaluateStream call) takes work for it. Dispatch is least in flight per
worker, not per lane or per replica: one HTTP/2 connection pins to one
SO_REUSEPORT worker, so lanes are only a way to reach workers.

A response goes to the worker its handle names (route), never elsewhere:
through a lane that takes work, or else through a retired lane that is
still open (a spare). A channel replaced by rotation keeps its lanes open as
spares while they are the only way to a worker that may hold transactions,
so rotation does not turn responses into misses. A draining worker (it
says so on its streams) keeps all its lanes as spares the same way: it takes
no new requests but answers the responses of what it holds, and ends its
streams once it holds nothing. A paused one (a reload) says so the same way,
then that it serves again: its lanes take work again (serve_again), and it
counts as reached meanwhile, so coverage repair leaves its channels alone.
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
        """The worker of that name, while at least one open lane reaches it."""
        return self._by_name.get(name)

    def route(self, name: str) -> Lane | None:
        """A lane to the worker of that name (a response for a transaction it
        holds), or None when no open lane reaches it: never another worker."""
        worker = self._by_name.get(name)
        if worker is None:
            return None
        if worker.lanes:
            return self.lane_of(worker)
        return worker.spares[0] if worker.spares else None

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
        if worker.draining:   # a stream that opened as the worker started draining
            worker.spares.append(lane)
            return
        worker.lanes.append(lane)
        if len(worker.lanes) == 1:
            self.ready.append(worker)
            log.info("wafsvc worker available", extra={"worker": name, "workers": len(self.ready)})

    def drain(self, worker: Worker) -> list[Lane]:
        """The worker drains: every lane of it becomes a spare (responses
        only). Returns those lanes, whose queued requests must go elsewhere."""
        if worker.draining:
            return []
        worker.draining = True
        lanes = list(worker.lanes)
        for lane in lanes:
            self.stop_taking_work(lane, spare=True)
        return lanes

    def serve_again(self, worker: Worker) -> bool:
        """The worker takes requests again (it paused): its lanes that are
        still open and not retired by rotation take work again."""
        if not worker.draining:
            return False
        worker.draining = False
        back = [lane for lane in worker.spares if not lane.retired]
        for lane in back:
            worker.spares.remove(lane)
            worker.lanes.append(lane)
        if worker.lanes and worker not in self.ready:
            self.ready.append(worker)
            log.info("wafsvc worker available", extra={"worker": worker.name, "workers": len(self.ready)})
        return True

    def stop_taking_work(self, lane: Lane, spare: bool = False) -> Worker | None:
        """Removes the lane from dispatch; answers still arrive on it. A
        spare (a retired lane, still open) still carries responses."""
        worker = lane.worker
        if worker is None or lane not in worker.lanes:
            return worker
        worker.lanes.remove(lane)
        worker.turn = 0
        if spare:
            worker.spares.append(lane)
        if not worker.lanes:
            self.ready.remove(worker)
            self._forget_replica_if_unreached(worker.replica)
            log.info("wafsvc worker has no lanes", extra={"worker": worker.name, "workers": len(self.ready)})
        self._forget_if_unreachable(worker)
        return worker

    def forget(self, lane: Lane) -> Worker | None:
        """The lane is closing: it reaches its worker no more."""
        worker = self.stop_taking_work(lane)
        if worker is not None and lane in worker.spares:
            worker.spares.remove(lane)
            self._forget_if_unreachable(worker)
            self._forget_replica_if_unreached(worker.replica)
        return worker

    def _forget_replica_if_unreached(self, replica: str) -> None:
        if not any(w.replica == replica and reached(w) for w in self._by_name.values()):
            self._replicas.pop(replica, None)

    def _forget_if_unreachable(self, worker: Worker) -> None:
        if not worker.lanes and not worker.spares and self._by_name.get(worker.name) is worker:
            del self._by_name[worker.name]

    def needs(self, lane: Lane) -> bool:
        """A retired lane is needed while it is the only way to its worker."""
        worker = lane.worker
        return worker is not None and lane in worker.spares and not worker.lanes

    def coverage(self) -> dict[str, tuple[int, int]]:
        """replica -> (workers with a lane, workers it reports)."""
        counts: dict[str, int] = {}
        for worker in self._by_name.values():
            if reached(worker):
                counts[worker.replica] = counts.get(worker.replica, 0) + 1
        return {replica: (counts.get(replica, 0), count) for replica, count in self._replicas.items()}


def reached(worker: Worker) -> bool:
    """Its lanes take work, or will again: it paused (or drains) on open
    lanes that rotation has not retired."""
    return bool(worker.lanes) or (worker.draining and any(not lane.retired for lane in worker.spares))
