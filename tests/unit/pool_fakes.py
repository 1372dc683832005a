"""A WafPool with slots and lanes built by hand (no channel is opened), for
the pool's unit tests (test_pool_logic, test_pool_responses)."""

from __future__ import annotations

from gateway.lanes import Lane, Slot
from gateway.pool import PoolHooks, WafPool


class Recorded(PoolHooks):
    """The pool's hook calls, in order."""

    def __init__(self) -> None:
        self.calls = []

    def retried(self, worker: str) -> None:
        self.calls.append(("retried", worker))

    def grpc_error(self, worker: str, code: str) -> None:
        self.calls.append(("grpc_error", worker, code))


class Channel:
    """What retiring a slot does with its channel."""
    closed = False

    async def close(self) -> None:
        self.closed = True


def make_pool() -> WafPool:
    return WafPool("ipv4:127.0.0.1:9", channels=2, streams=2, deadline_s=0.4, hedge_s=0.15, hooks=Recorded())


def add_slot(pool: WafPool, generation: int) -> Slot:
    slot = Slot(len(pool.channels.slots), generation, channel=Channel())
    pool.channels.slots.append(slot)
    return slot


def add_lane(pool: WafPool, slot: Slot, worker: str, replica: str = "r1", workers: int = 2,
             streaming: bool = False) -> Lane:
    """A lane attached to `worker`; `streaming`: its stream is open, as far
    as the pool can tell."""
    lane = pool.channels.add_lane(slot)
    pool.attach(lane, worker, replica, workers)
    if streaming:
        lane.call = object()
    return lane


def two_workers(pool: WafPool, streaming: bool = False) -> tuple[Lane, Lane]:
    """One slot with a lane to each of replica r1's two workers, r1/a and r1/b."""
    slot = add_slot(pool, 1)
    return (add_lane(pool, slot, "r1/a", streaming=streaming), add_lane(pool, slot, "r1/b", streaming=streaming))


def send(lane: Lane) -> None:
    """What the lane's writer does: queued requests become sent ones."""
    for pending in lane.queue:
        lane.sent[pending.ref] = pending
    lane.queue.clear()
