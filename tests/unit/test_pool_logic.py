"""The pool's decisions, without sockets: which worker gets a request, what
moves off a hung worker, when coverage needs repair. Lanes and slots are
built by hand; no channel is ever opened."""

from __future__ import annotations

import time

from gateway.lanes import Lane, Slot
from gateway.pool import MAX_ATTEMPTS, WafPool
from wafapi import waf_pb2


def _pool() -> WafPool:
    return WafPool("ipv4:127.0.0.1:9", channels=2, streams=2, deadline_s=0.4, hedge_s=0.15)


def _lane(pool: WafPool, slot: Slot, worker: str, replica: str = "r1", workers: int = 2) -> Lane:
    pool._lane_index += 1
    lane = Lane(pool._lane_index, slot)
    slot.lanes.append(lane)
    pool._attach(lane, worker, replica, workers)
    return lane


def _slot(pool: WafPool, generation: int) -> Slot:
    slot = Slot(len(pool._slots), generation, channel=None)
    pool._slots.append(slot)
    return slot


def _submit(pool: WafPool, results: list) -> None:
    pool.submit(waf_pb2.EvaluateRequest(method="GET", uri=b"/"), lambda v, e: results.append((v, e)))


def _send(lane: Lane) -> None:
    """What the lane's writer does: queued requests become sent ones."""
    for pending in lane.queue:
        lane.sent[pending.ref] = pending
    lane.queue.clear()


def _answer(pool: WafPool, lane: Lane, refs) -> None:
    batch = waf_pb2.VerdictBatch()
    for ref in refs:
        batch.verdicts.add(ref=ref).verdict.action = waf_pb2.ACTION_PASS
    pool._on_verdicts(lane, batch)


def test_requests_go_to_the_worker_with_fewest_in_flight():
    pool = _pool()
    slot = _slot(pool, 1)
    a, b = _lane(pool, slot, "r1/a"), _lane(pool, slot, "r1/b")
    results = []
    for _ in range(4):
        _submit(pool, results)
    assert len(a.queue) == len(b.queue) == 2
    _send(a)
    _answer(pool, a, list(a.sent))
    assert len(results) == 2 and pool._workers["r1/a"].inflight == 0
    _submit(pool, results)
    _submit(pool, results)
    assert len(a.queue) == 2 and len(b.queue) == 2


def test_everything_on_a_hung_worker_moves_and_it_gets_no_new_work():
    pool = _pool()
    slot = _slot(pool, 1)
    a, b = _lane(pool, slot, "r1/a"), _lane(pool, slot, "r1/b")
    results = []
    for _ in range(4):
        _submit(pool, results)
    _send(a)
    _send(b)
    hung = pool._workers["r1/a"]
    hung.last_answer = time.monotonic() - 10   # nothing since the requests were sent
    _answer(pool, b, list(b.sent))             # b answers: it is alive
    stuck = list(a.sent.values())
    pool._hedge(stuck[0])
    assert hung.stalled and not a.sent and all(p.lane is b for p in stuck)
    assert pool.stats.hedges == 2
    _submit(pool, results)
    assert pool._workers["r1/b"].inflight == 3 and not a.queue
    # A late answer from the hung worker counts for nothing, but shows it
    # is back: it takes work again.
    _answer(pool, a, [p.ref for p in stuck])
    assert len(results) == 2 and not hung.stalled
    _send(b)
    _answer(pool, b, list(b.sent))
    assert len(results) == 5 and all(error is None for _, error in results)


def test_a_worker_that_answers_keeps_its_slow_request():
    pool = _pool()
    slot = _slot(pool, 1)
    a, b = _lane(pool, slot, "r1/a"), _lane(pool, slot, "r1/b")
    results = []
    _submit(pool, results)
    lane = a if a.queue else b
    _send(lane)
    pending = next(iter(lane.sent.values()))
    lane.worker.last_answer = time.monotonic()  # answered other requests since
    pool._hedge(pending)
    assert pending.lane is lane and not lane.worker.stalled and pool.stats.hedges == 0


def test_a_failed_lane_hands_its_requests_to_another_worker_until_attempts_run_out():
    pool = _pool()
    slot = _slot(pool, 1)
    a, b = _lane(pool, slot, "r1/a"), _lane(pool, slot, "r1/b")
    results = []
    _submit(pool, results)
    lane = a if a.queue else b
    other = b if lane is a else a
    _send(lane)
    pool._detach(lane)
    assert not lane.sent and len(other.queue) == 1 and not results
    pending = other.queue[0]
    pending.attempts = MAX_ATTEMPTS
    _send(other)
    pool._detach(other)
    assert results == [(None, "wafsvc stream failed and no retry was possible")]
    assert pool.inflight == 0 and pool.live_workers() == []


def test_coverage_repair_replaces_a_slot_that_only_duplicates_covered_workers():
    pool = _pool()
    first, second = _slot(pool, 1), _slot(pool, 2)
    first.opened, second.opened = 1.0, 2.0
    _lane(pool, first, "r1/a")
    _lane(pool, second, "r1/a")
    _lane(pool, second, "r2/x", replica="r2", workers=1)
    assert pool.coverage() == {"r1": (1, 2), "r2": (1, 1)}
    # Replacing `second` would lose r2's only worker; `first` only repeats r1/a.
    assert pool._spare_slot({"r1"}) is first
    _lane(pool, first, "r1/b")
    assert pool.coverage() == {"r1": (2, 2), "r2": (1, 1)}


def test_coverage_repair_adds_a_slot_when_none_can_be_spared():
    pool = _pool()
    only = _slot(pool, 1)
    _lane(pool, only, "r1/a", workers=3)
    assert pool._spare_slot({"r1"}) is None
    actions = []
    pool._add_slot = lambda: actions.append("add")          # opening one needs a channel
    pool._replace = lambda slot, why: actions.append("replace")
    now = time.monotonic()
    assert pool._repair_coverage(now) and actions == ["add"]
    assert not pool._repair_coverage(now) and actions == ["add"]  # cooldown between repairs
    _lane(pool, only, "r1/b", workers=3)
    _lane(pool, only, "r1/c", workers=3)
    assert not pool._repair_coverage(now + 1) and pool.coverage() == {"r1": (3, 3)}


def test_declaring_workers_hung_is_rationed_so_overload_cannot_snowball():
    pool = _pool()
    slot = _slot(pool, 1)
    lanes = [_lane(pool, slot, f"r1/{name}", workers=5) for name in "abcde"]
    results = []
    for _ in range(5):
        _submit(pool, results)
    for lane in lanes:
        _send(lane)
        lane.worker.last_answer = time.monotonic() - 10
    for lane in lanes:
        if lane.sent:
            pool._hedge(next(iter(lane.sent.values())))
    stalled = [lane.worker for lane in lanes if lane.worker.stalled]
    assert len(stalled) == 3  # STALL_BURST, then one per STALL_REFILL_S


def test_a_message_answered_in_parts_frees_the_window_once():
    pool = _pool()
    lane = _lane(pool, _slot(pool, 1), "r1/a", workers=1)
    results = []
    for _ in range(4):
        _submit(pool, results)
    refs = [p.ref for p in lane.queue]
    _send(lane)
    lane.worker.outstanding = 1                      # what the writer counts for one message
    lane.unanswered.append(4)
    _answer(pool, lane, refs[:1])                    # a partial flush from a long batch
    assert lane.worker.outstanding == 1 and len(results) == 1
    _answer(pool, lane, refs[1:])
    assert lane.worker.outstanding == 0 and not lane.unanswered and len(results) == 4
