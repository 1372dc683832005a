"""A worker that pauses (a reload's parse) and serves again, as the gateway
sees it: VerdictBatch.draining is the worker's state on every message, the
last one wins. Lanes and slots are built by hand; no channel is opened."""

from __future__ import annotations

from tests.unit.pool_fakes import add_lane, add_slot, make_pool, send, two_workers
from wafapi import waf_pb2

PAUSING, SERVING = waf_pb2.VerdictBatch(draining=True), waf_pb2.VerdictBatch(draining=False)
RESPONSE = waf_pb2.ResponseRequest(transaction_handle="r1/a#n.1", status=200).SerializeToString()


def _request(pool, results: list) -> None:
    pool.submit(waf_pb2.EvaluateRequest(method="GET", uri=b"/").SerializeToString(),
                lambda v, e: results.append((v, e)))


def _answer(pool, lane, draining: bool) -> None:
    """The worker answers all the lane has sent, saying its state."""
    batch = waf_pb2.VerdictBatch(draining=draining)
    for ref in lane.sent:
        batch.verdicts.add(ref=ref).verdict.action = waf_pb2.ACTION_PASS
    pool.runner.on_verdicts(lane, batch)


def test_a_paused_worker_gets_no_requests_then_takes_them_again_on_the_same_lanes():
    pool = make_pool()
    a, b = two_workers(pool, streaming=True)
    worker = a.worker
    results = []
    pool.runner.on_verdicts(a, PAUSING)
    assert worker.draining and worker not in pool.workers.ready and a in worker.spares
    for _ in range(4):
        _request(pool, results)
    assert not a.queue and len(b.queue) == 4
    # Its responses still go to it, on the same lane.
    pool.submit_response("r1/a", RESPONSE, lambda v, e: results.append((v, e)))
    assert [p.pin for p in a.queue] == ["r1/a"]
    send(a)
    _answer(pool, a, draining=True)   # answered while still paused: still out of rotation
    assert len(results) == 1 and worker.draining and worker not in pool.workers.ready
    pool.runner.on_verdicts(a, SERVING)
    assert not worker.draining and worker in pool.workers.ready and a in worker.lanes and not worker.spares
    for _ in range(4):
        _request(pool, results)
    assert a.queue, "back in rotation: the least loaded worker gets requests again"


def test_every_message_carries_the_state_so_the_last_one_wins():
    """Messages on two streams to one worker may arrive interleaved; each
    stream ends its pause with "serving", so the worker ends up serving."""
    pool = make_pool()
    first, second = add_slot(pool, 1), add_slot(pool, 2)
    a1, a2 = add_lane(pool, first, "r1/a", streaming=True), add_lane(pool, second, "r1/a", streaming=True)
    worker = a1.worker
    pool.runner.on_verdicts(a1, PAUSING)
    pool.runner.on_verdicts(a1, SERVING)
    assert worker in pool.workers.ready
    pool.runner.on_verdicts(a2, PAUSING)   # late, from the other stream
    assert worker not in pool.workers.ready and set(worker.spares) == {a1, a2}
    pool.runner.on_verdicts(a2, SERVING)
    assert worker in pool.workers.ready and set(worker.lanes) == {a1, a2}


def test_requests_parked_while_the_only_worker_pauses_go_when_it_serves_again():
    pool = make_pool()
    lane = add_lane(pool, add_slot(pool, 1), "r1/a", workers=1, streaming=True)
    results = []
    pool.runner.on_verdicts(lane, PAUSING)
    for _ in range(3):
        _request(pool, results)
    assert len(pool.parked) == 3 and not lane.queue and not results
    # A stream opening meanwhile stays out of rotation too (and does not spin the parked ones).
    late = add_lane(pool, add_slot(pool, 2), "r1/a", workers=1, streaming=True)
    assert late in lane.worker.spares and len(pool.parked) == 3
    pool.runner.on_verdicts(lane, SERVING)
    assert not pool.parked and len(lane.queue) + len(late.queue) == 3
    assert all(p.attempts == 1 for p in lane.queue + late.queue)


def test_requests_refused_during_the_pause_go_elsewhere_without_spending_an_attempt():
    pool = make_pool()
    a, b = two_workers(pool, streaming=True)
    results = []
    _request(pool, results)
    lane, other = (a, b) if a.queue else (b, a)
    send(lane)
    refusal = waf_pb2.VerdictBatch(draining=True)
    error = refusal.verdicts.add(ref=next(iter(lane.sent))).error
    error.code, error.reason = "UNAVAILABLE", waf_pb2.DRAINING
    pool.runner.on_verdicts(lane, refusal)
    assert not results and len(other.queue) == 1 and other.queue[0].attempts == 1
    assert pool.stats.errors == 0 and pool.stats.retries == 0
    pool.runner.on_verdicts(lane, SERVING)
    assert lane.worker in pool.workers.ready


def test_a_paused_worker_still_counts_as_reached_and_a_rotated_lane_does_not_come_back():
    pool = make_pool()
    old, new = add_slot(pool, 1), add_slot(pool, 2)
    retired = add_lane(pool, old, "r1/a", streaming=True)
    b = add_lane(pool, old, "r1/b", streaming=True)
    fresh = add_lane(pool, new, "r1/a", streaming=True)
    retired.retired = True
    pool.workers.stop_taking_work(retired, spare=True)   # what rotation does
    pool.runner.on_verdicts(fresh, PAUSING)
    # Coverage repair must not churn channels for a worker that only pauses.
    assert pool.coverage() == {"r1": (2, 2)}
    pool.runner.on_verdicts(fresh, SERVING)
    assert fresh.worker.lanes == [fresh] and fresh.worker.spares == [retired]
    assert b.worker in pool.workers.ready and pool.coverage() == {"r1": (2, 2)}
