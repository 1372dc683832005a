"""The pool's decisions, without sockets: which worker gets a request, what
moves off a hung worker, when coverage needs repair. Lanes and slots are
built by hand; no channel is ever opened."""

from __future__ import annotations

import time

from gateway.failures import STREAM_FAILED
from gateway.lanes import Lane
from gateway.pool import WafPool
from gateway.sweeper import MAX_ATTEMPTS
from tests.unit.pool_fakes import add_lane, add_slot, make_pool, send, two_workers
from wafapi import waf_pb2


def _submit(pool: WafPool, results: list) -> None:
    pool.submit(waf_pb2.EvaluateRequest(method="GET", uri=b"/").SerializeToString(),
                lambda v, e: results.append((v, e)))


def _worker(pool: WafPool, name: str):
    return pool.workers.get(name)


def _answer(pool: WafPool, lane: Lane, refs) -> None:
    batch = waf_pb2.VerdictBatch()
    for ref in refs:
        batch.verdicts.add(ref=ref).verdict.action = waf_pb2.ACTION_PASS
    pool.runner.on_verdicts(lane, batch)


def test_requests_go_to_the_worker_with_fewest_in_flight():
    pool = make_pool()
    a, b = two_workers(pool)
    results = []
    for _ in range(4):
        _submit(pool, results)
    assert len(a.queue) == len(b.queue) == 2
    send(a)
    _answer(pool, a, list(a.sent))
    assert len(results) == 2 and _worker(pool, "r1/a").inflight == 0
    _submit(pool, results)
    _submit(pool, results)
    assert len(a.queue) == 2 and len(b.queue) == 2


def test_everything_on_a_hung_worker_moves_and_it_gets_no_new_work():
    pool = make_pool()
    a, b = two_workers(pool)
    results = []
    for _ in range(4):
        _submit(pool, results)
    send(a)
    send(b)
    hung = _worker(pool, "r1/a")
    hung.last_answer = time.monotonic() - 10   # nothing since the requests were sent
    _answer(pool, b, list(b.sent))             # b answers: it is alive
    stuck = list(a.sent.values())
    pool.sweeper.hedge(stuck[0])
    assert hung.stalled and not a.sent and all(p.lane is b for p in stuck)
    assert pool.stats.hedges == 2 and pool.hooks.calls == [("retried", "r1/a")] * 2
    _submit(pool, results)
    assert _worker(pool, "r1/b").inflight == 3 and not a.queue
    # A late answer from the hung worker counts for nothing, but shows it
    # is back: it takes work again.
    _answer(pool, a, [p.ref for p in stuck])
    assert len(results) == 2 and not hung.stalled
    send(b)
    _answer(pool, b, list(b.sent))
    assert len(results) == 5 and all(error is None for _, error in results)


def test_a_worker_that_answers_keeps_its_slow_request():
    pool = make_pool()
    a, b = two_workers(pool)
    results = []
    _submit(pool, results)
    lane = a if a.queue else b
    send(lane)
    pending = next(iter(lane.sent.values()))
    lane.worker.last_answer = time.monotonic()  # answered other requests since
    pool.sweeper.hedge(pending)
    assert pending.lane is lane and not lane.worker.stalled and pool.stats.hedges == 0


def test_a_failed_lane_hands_its_requests_to_another_worker_until_attempts_run_out():
    pool = make_pool()
    a, b = two_workers(pool)
    results = []
    _submit(pool, results)
    lane = a if a.queue else b
    other = b if lane is a else a
    send(lane)
    pool.detach(lane)
    assert not lane.sent and len(other.queue) == 1 and not results
    pending = other.queue[0]
    pending.attempts = MAX_ATTEMPTS
    send(other)
    pool.detach(other)
    assert results == [(None, STREAM_FAILED)]
    assert pool.inflight == 0 and pool.live_workers() == []


def test_coverage_repair_replaces_a_slot_that_only_duplicates_covered_workers():
    pool = make_pool()
    first, second = add_slot(pool, 1), add_slot(pool, 2)
    first.opened, second.opened = 1.0, 2.0
    add_lane(pool, first, "r1/a")
    add_lane(pool, second, "r1/a")
    add_lane(pool, second, "r2/x", replica="r2", workers=1)
    assert pool.coverage() == {"r1": (1, 2), "r2": (1, 1)}
    # Replacing `second` would lose r2's only worker; `first` only repeats r1/a.
    assert pool.channels.spare_slot() is first
    add_lane(pool, first, "r1/b")
    assert pool.coverage() == {"r1": (2, 2), "r2": (1, 1)}


def test_coverage_repair_adds_a_slot_when_none_can_be_spared():
    pool = make_pool()
    only = add_slot(pool, 1)
    add_lane(pool, only, "r1/a", workers=3)
    assert pool.channels.spare_slot() is None
    actions = []
    pool.channels.add_slot = lambda: actions.append("add")          # opening one needs a channel
    pool.channels.replace = lambda slot, why: actions.append("replace")
    now = time.monotonic()
    assert pool.channels.repair_coverage(now) and actions == ["add"]
    assert not pool.channels.repair_coverage(now) and actions == ["add"]  # cooldown between repairs
    add_lane(pool, only, "r1/b", workers=3)
    add_lane(pool, only, "r1/c", workers=3)
    assert not pool.channels.repair_coverage(now + 1) and pool.coverage() == {"r1": (3, 3)}


def test_declaring_workers_hung_is_rationed_so_overload_cannot_snowball():
    pool = make_pool()
    slot = add_slot(pool, 1)
    lanes = [add_lane(pool, slot, f"r1/{name}", workers=5) for name in "abcde"]
    results = []
    for _ in range(5):
        _submit(pool, results)
    for lane in lanes:
        send(lane)
        lane.worker.last_answer = time.monotonic() - 10
    for lane in lanes:
        if lane.sent:
            pool.sweeper.hedge(next(iter(lane.sent.values())))
    stalled = [lane.worker for lane in lanes if lane.worker.stalled]
    assert len(stalled) == 3  # STALL_BURST, then one per STALL_REFILL_S


def test_a_message_answered_in_parts_frees_the_window_once():
    pool = make_pool()
    lane = add_lane(pool, add_slot(pool, 1), "r1/a", workers=1)
    results = []
    for _ in range(4):
        _submit(pool, results)
    refs = [p.ref for p in lane.queue]
    send(lane)
    lane.worker.outstanding = 1                      # what the writer counts for one message
    lane.unanswered.append(4)
    _answer(pool, lane, refs[:1])                    # a partial flush from a long batch
    assert lane.worker.outstanding == 1 and len(results) == 1
    _answer(pool, lane, refs[1:])
    assert lane.worker.outstanding == 0 and not lane.unanswered and len(results) == 4


def test_a_refusal_is_a_typed_value_and_a_retryable_error_goes_elsewhere():
    from gateway.failures import Failure
    pool = make_pool()
    a, b = two_workers(pool)
    results = []
    _submit(pool, results)
    _submit(pool, results)
    lanes = [lane for lane in (a, b) if lane.queue]
    for lane in lanes:
        send(lane)
    first, second = lanes[0], lanes[-1]
    refs = list(first.sent)
    batch = waf_pb2.VerdictBatch()
    error = batch.verdicts.add(ref=refs[0]).error
    error.code, error.message, error.reason = "INVALID_ARGUMENT", "unknown application 'x'", waf_pb2.UNKNOWN_APPLICATION
    pool.runner.on_verdicts(first, batch)
    verdict, failure = results[0]
    assert verdict is None and failure.failure is Failure.REFUSED and failure.label == "invalid_argument"
    assert failure.reason == waf_pb2.UNKNOWN_APPLICATION and str(failure).startswith("INVALID_ARGUMENT: ")
    # UNAVAILABLE (an engine out of memory, say) is retried on the other worker, not answered.
    other_ref = list(second.sent)[0] if second is not first else refs[1]
    batch = waf_pb2.VerdictBatch()
    error = batch.verdicts.add(ref=other_ref).error
    error.code, error.reason = "UNAVAILABLE", waf_pb2.ENGINE_ERROR
    pool.runner.on_verdicts(second, batch)
    assert len(results) == 1 and pool.stats.retries == 1
    assert ("grpc_error", second.worker.name, "UNAVAILABLE") in pool.hooks.calls
    assert sum(w.inflight for w in pool.workers.ready) == 1 == pool.inflight


def test_in_flight_counts_return_to_zero_whatever_the_path():
    pool = make_pool()
    a, b = two_workers(pool)
    results = []
    for _ in range(6):
        _submit(pool, results)
    send(a)
    pool.detach(a)                                   # a's requests move to b
    send(b)
    _answer(pool, b, list(b.sent)[:3])               # some answered
    pool.sweeper.by_deadline[0].deadline = 0         # the rest time out
    for pending in list(pool.sweeper.by_deadline):
        if not pending.done:
            pool.finish(pending, None, STREAM_FAILED)
    assert len(results) == 6 and pool.inflight == 0
    assert all(w.inflight == 0 for w in pool.workers.ready) and b.worker.inflight == 0
