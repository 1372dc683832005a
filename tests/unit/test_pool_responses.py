"""A response goes to the worker named in its handle and nowhere else; with
no way there it is a miss at once. Rotation keeps a way there. Lanes and
slots are built by hand; no channel is opened."""

from __future__ import annotations

import asyncio
import time

from gateway.channels import lanes_per_slot, listed_addresses, name_and_port
from gateway.failures import NO_ROUTE, WORKER_HUNG, Failure, MissReason
from gateway.pool import WafPool
from gateway.sweeper import MAX_ATTEMPTS
from tests.unit.pool_fakes import add_lane, add_slot, make_pool, send, two_workers
from wafapi import waf_pb2

RESPONSE = waf_pb2.ResponseRequest(transaction_handle="r1/a#n.1", status=200).SerializeToString()


def _respond(pool: WafPool, worker: str, results: list) -> None:
    pool.submit_response(worker, RESPONSE, lambda v, e: results.append((v, e)))


def test_a_response_goes_only_to_the_worker_its_handle_names():
    pool = make_pool()
    a, b = two_workers(pool, streaming=True)
    results = []
    for _ in range(3):
        _respond(pool, "r1/b", results)   # b is busier afterwards: pick() would choose a
    assert not a.queue and len(b.queue) == 3 and b.worker.inflight == 3
    batch = waf_pb2.EvaluateBatch.FromString(b"".join(p.entry for p in b.queue))
    assert [item.WhichOneof("item") for item in batch.requests] == ["response"] * 3
    assert batch.requests[0].response.transaction_handle == "r1/a#n.1"
    assert pool.stats.responses == 3 and not results


def test_no_lane_to_that_worker_is_a_miss_at_once():
    pool = make_pool()
    add_lane(pool, add_slot(pool, 1), "r1/a", streaming=True)
    results = []
    _respond(pool, "r1/gone", results)
    assert results == [(None, NO_ROUTE)] and NO_ROUTE.miss is MissReason.NO_ROUTE
    assert pool.inflight == 0 and pool.stats.unreachable == 1 and not pool.sweeper.by_deadline


def test_a_failed_stream_sends_the_response_again_only_to_the_same_worker():
    pool = make_pool()
    first, second = add_slot(pool, 1), add_slot(pool, 2)
    a1, b = add_lane(pool, first, "r1/a", streaming=True), add_lane(pool, first, "r1/b", streaming=True)
    a2 = add_lane(pool, second, "r1/a", streaming=True)
    results = []
    _respond(pool, "r1/a", results)
    lane = a1 if a1.queue else a2
    other = a2 if lane is a1 else a1
    send(lane)
    pool.detach(lane)                          # the stream broke: another lane to r1/a takes it
    assert len(other.queue) == 1 and not b.queue and not results
    send(other)
    pool.detach(other)                         # the worker is gone: no lane left to it
    assert results == [(None, NO_ROUTE)] and not b.queue and pool.inflight == 0


def test_when_its_worker_dies_every_lane_fails_and_the_response_is_a_miss_not_a_failure():
    pool = make_pool()
    lanes = [add_lane(pool, add_slot(pool, g), "r1/a", streaming=True) for g in range(1, MAX_ATTEMPTS + 3)]
    results = []
    _respond(pool, "r1/a", results)
    while not results:                         # the worker's streams fail one after another
        lane = next(lane for lane in lanes if lane.queue)
        send(lane)
        pool.detach(lane)
    assert results == [(None, NO_ROUTE)] and pool.inflight == 0


def test_a_miss_from_wafsvc_is_typed_and_a_failed_response_is_never_retried():
    pool = make_pool()
    a, _ = two_workers(pool, streaming=True)
    results = []
    _respond(pool, "r1/a", results)
    _respond(pool, "r1/a", results)
    send(a)
    first, second = list(a.sent)
    batch = waf_pb2.VerdictBatch()
    miss = batch.verdicts.add(ref=first).error
    miss.code, miss.reason = "NOT_FOUND", waf_pb2.TRANSACTION_EVICTED
    broken = batch.verdicts.add(ref=second).error
    broken.code, broken.reason = "INTERNAL", waf_pb2.ENGINE_ERROR  # retryable for a request
    pool.runner.on_verdicts(a, batch)
    (_, gone), (_, failed) = results
    assert gone.failure is Failure.MISS and gone.miss is MissReason.EVICTED and gone.reason == waf_pb2.TRANSACTION_EVICTED
    assert failed.failure is Failure.REFUSED and failed.label == "internal"
    assert pool.stats.retries == 0 and pool.inflight == 0


def test_a_hung_worker_turns_its_responses_into_misses_and_its_requests_move():
    pool = make_pool()
    a, b = two_workers(pool, streaming=True)
    results = []
    _respond(pool, "r1/a", results)
    while not any(p.pin is None for p in a.queue):  # least in flight: requests land on a too
        pool.submit(waf_pb2.EvaluateRequest(method="GET", uri=b"/").SerializeToString(),
                    lambda v, e: results.append((v, e)))
    send(a)
    response = next(p for p in a.sent.values() if p.pin is not None)
    requests_on_b = len(b.queue)
    a.worker.last_answer = time.monotonic() - 10
    b.worker.last_answer = time.monotonic()
    pool.sweeper.hedge(response)
    # The response only r1/a can evaluate is a miss at once; its requests move.
    assert a.worker.stalled and not a.sent and results[0] == (None, WORKER_HUNG)
    assert len(b.queue) == requests_on_b + 1 and all(p.pin is None for p in b.queue)
    _respond(pool, "r1/a", results)                # while it hangs: a miss at once too
    assert results[-1] == (None, WORKER_HUNG) and pool.stats.unreachable == 2


def test_a_retired_lane_stays_the_way_to_its_worker_until_another_one_is():
    async def run():
        pool = make_pool()
        old, new = add_slot(pool, 1), add_slot(pool, 2)
        a_old = add_lane(pool, old, "r1/a", streaming=True)
        b_new = add_lane(pool, new, "r1/b", streaming=True)
        retiring = asyncio.create_task(pool.channels._retire(old))
        await asyncio.sleep(0.12)
        worker = a_old.worker
        assert not worker.lanes and worker.spares == [a_old] and worker not in pool.workers.ready
        assert not retiring.done()                      # r1/a may hold transactions: still needed
        results = []
        _respond(pool, "r1/a", results)
        assert len(a_old.queue) == 1 and not b_new.queue  # routed through the spare, never to r1/b
        pool.submit(waf_pb2.EvaluateRequest(method="GET", uri=b"/").SerializeToString(), lambda v, e: None)
        assert len(b_new.queue) == 1                     # new work never goes to a retired lane
        send(a_old)
        batch = waf_pb2.VerdictBatch()
        batch.verdicts.add(ref=next(iter(a_old.sent))).verdict.action = waf_pb2.ACTION_PASS
        pool.runner.on_verdicts(a_old, batch)
        a_new = add_lane(pool, new, "r1/a", streaming=True)                 # coverage repair reached r1/a again
        await asyncio.wait_for(retiring, 2)
        assert results[0][0] is not None and pool.workers.route("r1/a") is a_new
        assert worker.spares == [] and old.channel.closed
    asyncio.run(run())


def test_a_retired_lane_that_is_not_the_only_way_closes_at_once():
    async def run():
        pool = make_pool()
        old, new = add_slot(pool, 1), add_slot(pool, 2)
        add_lane(pool, old, "r1/a", streaming=True)
        add_lane(pool, new, "r1/a", streaming=True)
        await asyncio.wait_for(pool.channels._retire(old), 1)
        assert pool.workers.route("r1/a").slot is new and old.channel.closed
    asyncio.run(run())


def test_every_replica_gets_a_lane_of_each_new_slot():
    assert listed_addresses("ipv4:10.0.0.1:50051,10.0.0.2:50051,10.0.0.3:50051") == 3
    assert listed_addresses("ipv6:[::1]:50051,[::2]:50051") == 2
    assert listed_addresses("dns:///wafsvc:50051") is None
    assert name_and_port("dns:///wafsvc:50051") == ("wafsvc", "50051")
    assert name_and_port("dns://10.0.0.53/wafsvc.prod:50051") == ("wafsvc.prod", "50051")
    assert name_and_port("wafsvc:50051") == ("wafsvc", "50051")
    # GATEWAY_STREAMS=4 with 6 replicas: 6 lanes, one per replica (round_robin).
    assert lanes_per_slot(4, 6, 2) == 6
    assert lanes_per_slot(4, 2, 2) == 4
    # Addresses unknown (the name did not resolve): one more than the
    # replicas known, so a new one is reached by the next rotation.
    assert lanes_per_slot(4, 0, 5) == 6


def _request(pool: WafPool, results: list) -> None:
    pool.submit(waf_pb2.EvaluateRequest(method="GET", uri=b"/").SerializeToString(),
                lambda v, e: results.append((v, e)))


def test_a_draining_worker_gets_responses_but_no_new_requests():
    """Its streams say so (VerdictBatch.draining): requests queued for it
    move to the other worker, new ones never go there, and its responses
    still reach it on the same lane until it ends the stream."""
    pool = make_pool()
    a, b = two_workers(pool, streaming=True)
    results = []
    for _ in range(4):
        _request(pool, results)
    _respond(pool, "r1/a", results)
    assert len(a.queue) == 3 and len(b.queue) == 2
    pool.runner.on_verdicts(a, waf_pb2.VerdictBatch(draining=True))
    draining = pool.workers.get("r1/a")
    assert draining.draining and draining not in pool.workers.ready and a in draining.spares
    assert [p.pin for p in a.queue] == ["r1/a"] and len(b.queue) == 4 and draining.inflight == 1
    _request(pool, results)
    _respond(pool, "r1/a", results)
    assert len(a.queue) == 2 and len(b.queue) == 5 and not results
    assert pool.inflight == 7 == draining.inflight + pool.workers.get("r1/b").inflight
    # Its answers still count; once it ends the stream, a late response is a miss.
    send(a)
    batch = waf_pb2.VerdictBatch()
    for ref in a.sent:
        batch.verdicts.add(ref=ref).verdict.action = waf_pb2.ACTION_PASS
    pool.runner.on_verdicts(a, batch)
    assert len(results) == 2 and all(e is None for _, e in results) and draining.inflight == 0
    pool.detach(a)
    _respond(pool, "r1/a", results)
    assert results[-1] == (None, NO_ROUTE)


def test_a_request_refused_as_draining_goes_elsewhere_without_spending_an_attempt():
    pool = make_pool()
    a, b = two_workers(pool, streaming=True)
    results = []
    _request(pool, results)
    lane, other = (a, b) if a.queue else (b, a)
    send(lane)
    ref = next(iter(lane.sent))
    refusal = waf_pb2.VerdictBatch()
    error = refusal.verdicts.add(ref=ref).error
    error.code, error.reason = "UNAVAILABLE", waf_pb2.DRAINING
    pool.runner.on_verdicts(lane, refusal)
    assert not results and len(other.queue) == 1 and other.queue[0].attempts == 1
    assert lane.worker.draining and lane.worker not in pool.workers.ready
    assert pool.stats.errors == 0 and pool.stats.retries == 0 and not pool.hooks.calls
    # A stream that opens on the draining worker carries responses only.
    late = add_lane(pool, add_slot(pool, 2), lane.worker.name, streaming=True)
    assert late in lane.worker.spares and lane.worker not in pool.workers.ready
