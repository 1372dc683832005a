"""One lane: an EvaluateStream call to one wafsvc worker, kept open.

The writer sends whatever requests queued on the lane as one message,
within a window of WORKER_WINDOW unanswered messages per worker; the reader
hands each answer to the pool. A stream that fails or ends is reopened with
backoff, and what it owed goes back to the pool (WafPool.detach).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from gateway.failures import refusal
from gateway.lanes import Lane, passthrough
from wafapi import waf_pb2

log = logging.getLogger("gateway.pool")

STREAM_METHOD = "/waf.v1.Waf/EvaluateStream"
# Stream metadata set by wafsvc/service.py.
WORKER_METADATA = "x-waf-worker"
REPLICA_METADATA = "x-waf-replica"
WORKERS_METADATA = "x-waf-workers"
# Stream messages a worker may hold unanswered. It evaluates one at a time,
# so two keep it busy (one running, one waiting); what arrives meanwhile
# queues here and leaves as one message when an answer comes back. Without
# a window every request went out alone when wafsvc was the bottleneck
# (CRS): one message each way per request, most of the gateway's CPU.
WORKER_WINDOW = 2
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 1.0
# Errors worth another try elsewhere; the others describe the request itself.
RETRYABLE = {"UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED", "UNKNOWN"}


def _count(text: str | None, default: int) -> int:
    try:
        return max(1, int(text)) if text is not None else default
    except ValueError:
        return default


class LaneRunner:
    """Runs lanes for a WafPool: its workers, stats, hooks and outcomes."""

    def __init__(self, pool, call_metadata: tuple) -> None:
        self.pool = pool
        self.metadata = call_metadata or None

    async def run(self, lane: Lane) -> None:
        pool = self.pool
        method = lane.slot.channel.stream_stream(STREAM_METHOD, request_serializer=passthrough,
                                                 response_deserializer=waf_pb2.VerdictBatch.FromString)
        backoff = BACKOFF_MIN_S
        while not pool.closing and not lane.retired:
            call = method(metadata=self.metadata, wait_for_ready=True)
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
                pool.attach(lane, name, metadata.get(REPLICA_METADATA, name),
                            _count(metadata.get(WORKERS_METADATA), 1))
                backoff = BACKOFF_MIN_S
                writer = asyncio.create_task(self._write(lane, call))
                async for batch in call:
                    self.on_verdicts(lane, batch)
                # The worker ended the stream: it is draining. Not a failure.
                log.info("wafsvc stream ended by the worker", extra={
                    "lane": lane.index, "worker": lane.worker.name if lane.worker else None})
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if not pool.closing and not lane.retired:
                    pool.hooks.grpc_error(lane.worker.name if lane.worker else "", exc.code().name)
                    pool.stats.lane_failures += 1
                    log.warning("stream to wafsvc failed", extra={
                        "lane": lane.index, "worker": lane.worker.name if lane.worker else None,
                        "code": exc.code().name, "details": exc.details()})
            except Exception as exc:  # keep the lane alive whatever happened
                pool.stats.lane_failures += 1
                log.warning("stream to wafsvc ended", extra={"lane": lane.index, "error": repr(exc)})
            finally:
                if writer is not None:
                    writer.cancel()
                call.cancel()
                pool.detach(lane)
            if pool.closing or lane.retired:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _write(self, lane: Lane, call) -> None:
        pool = self.pool
        stats = pool.stats
        max_batch = pool.max_batch
        try:
            while True:
                await lane.wakeup.wait()
                lane.wakeup.clear()
                while lane.queue:
                    worker = lane.worker
                    if worker is not None and worker.outstanding >= WORKER_WINDOW:
                        break  # the worker's next answer wakes this lane (on_verdicts)
                    items = lane.queue[:max_batch]
                    del lane.queue[:max_batch]
                    live = [p for p in items if not p.done and p.lane is lane]
                    if not live:
                        continue
                    for p in live:
                        lane.sent[p.ref] = p
                    stats.messages += 1
                    stats.batched += len(live)
                    if worker is not None:
                        worker.outstanding += 1
                        lane.unanswered.append(len(live))
                    await call.write(b"".join([p.entry for p in live]))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The reader sees the call end and re-sends what this lane owed.
            log.debug("stream write failed", extra={"lane": lane.index, "error": repr(exc)})
            call.cancel()

    def on_verdicts(self, lane: Lane, batch: waf_pb2.VerdictBatch) -> None:
        pool = self.pool
        sent = lane.sent
        worker = lane.worker
        verdicts = batch.verdicts
        answers, unanswered = len(verdicts), lane.unanswered
        while answers and unanswered:
            take = min(answers, unanswered[0])
            answers -= take
            if take == unanswered[0]:
                unanswered.popleft()
                if worker is not None:
                    worker.outstanding -= 1
            else:
                unanswered[0] -= take
        # The worker's state, on every message (the last one wins): it takes
        # no new requests (it drains or pauses), or it serves (again).
        if worker is not None and batch.draining != worker.draining:
            if batch.draining:
                pool.worker_draining(worker)
            else:
                pool.worker_serving(worker)
        if worker is not None:
            worker.last_answer = time.monotonic()
            for other in worker.lanes:  # what queued while the window was full goes now
                if other.queue:
                    other.wakeup.set()
            for other in worker.spares:  # responses only (a draining worker, a rotated channel)
                if other.queue:
                    other.wakeup.set()
            if worker.stalled:
                worker.stalled = False
                log.info("wafsvc worker answers again", extra={"worker": worker.name})
        for item in verdicts:
            pending = sent.pop(item.ref, None)
            if pending is None or pending.done or pending.lane is not lane:
                continue
            if item.HasField("verdict"):
                pool.finish(pending, item.verdict, None)
                continue
            error = item.error
            if error.reason == waf_pb2.DRAINING and pending.pin is None:
                # Not a failure: the worker drains. Another takes the request.
                if worker is not None:
                    pool.worker_draining(worker)
                pool.redispatch(pending)
                continue
            pool.stats.errors += 1
            pool.hooks.grpc_error(worker.name if worker else "", error.code)
            # A response is never sent again: its worker has taken (and ended)
            # the transaction, whatever went wrong.
            if error.code in RETRYABLE and pending.pin is None and pool.can_retry(pending):
                pool.retry(pending, worker)
            else:
                pool.finish(pending, None, refusal(error.code, error.message, error.reason))
