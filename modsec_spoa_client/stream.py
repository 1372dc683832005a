"""Batched evaluation over one long-lived EvaluateStream (blocking API).

Requests submitted while the previous message is on its way leave together,
up to max_batch per message, so a busy caller pays the per-message gRPC cost
once for many requests. Every item carries a ref and comes back exactly once
(the proto's ordering contract); answers are matched by ref, so callers may
submit from several threads.

    with client.stream() as stream:
        for verdict in stream.evaluate_many(requests):   # in input order
            ...

When the stream fails (the worker died or drained), requests not yet
answered are sent again on a new stream, which the round-robin channel opens
on another replica when there is one; responses of kept transactions are
not (their worker is gone) and fail with WafUnavailable. A draining worker
says so first (VerdictBatch.draining): new requests then go to a new stream
(one it refused, DRAINING, too), while the responses of the transactions it
holds still go to it on the old stream, until it ends that stream. A worker
that only paused (a reload) then says it serves again on that old stream:
it becomes the current stream again if none has opened since; else it stays
open for that worker's responses, and is ended when the worker pauses or
drains again or the client closes.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import grpc

from modsec_spoa_client._shared import RequestInput, request_message, response_message
from modsec_spoa_client.config import ClientConfig
from modsec_spoa_client.errors import (ErrorReason, WafError, WafTimeout, WafUnavailable, error_for,
                                       from_rpc_error, reason_of)
from modsec_spoa_client.models import HttpResponse, Verdict
from wafapi import waf_pb2

WORKER_METADATA = "x-waf-worker"
REPLICA_METADATA = "x-waf-replica"
_END = object()


@dataclass
class Pending:
    """A submitted item waiting for its answer (a concurrent.futures or an
    asyncio future: the blocking and asyncio streams share this)."""
    message: waf_pb2.BatchRequest
    future: concurrent.futures.Future
    deadline: float
    retries_left: int

    @property
    def retryable(self) -> bool:
        return (self.message.HasField("request") and self.retries_left > 0
                and not self.future.done() and time.monotonic() < self.deadline)


def settle(future, answer: waf_pb2.BatchVerdict) -> None:
    """One answer of the stream into the future of its item."""
    if answer.HasField("verdict"):
        future.set_result(Verdict.from_proto(answer.verdict))
    else:
        future.set_exception(error_for(answer.error.code, answer.error.message, reason_of(answer.error.reason)))


def worker_of(message: waf_pb2.BatchRequest) -> str:
    """The worker a response must reach ("" for a request)."""
    return message.response.transaction_handle.rpartition("#")[0] if message.HasField("response") else ""


def drained() -> WafError:
    """The error of a stream the worker ended cleanly (it is draining)."""
    return WafUnavailable("the worker ended the stream (draining)", code="UNAVAILABLE", reason=ErrorReason.DRAINING)


def _batches(items: queue.SimpleQueue, max_batch: int) -> Iterator[waf_pb2.EvaluateBatch]:
    """Whatever is ready becomes one message: no waiting for more."""
    while True:
        first = items.get()
        if first is _END:
            return
        batch = [first]
        while len(batch) < max_batch:
            try:
                item = items.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                yield waf_pb2.EvaluateBatch(requests=batch)
                return
            batch.append(item)
        yield waf_pb2.EvaluateBatch(requests=batch)


class EvaluationStream:
    def __init__(self, stub, config: ClientConfig, metadata) -> None:
        self._stub = stub
        self._config = config
        self._metadata = metadata
        self._lock = threading.Lock()
        self._refs = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._queue: queue.SimpleQueue | None = None
        self._left: dict[str, queue.SimpleQueue] = {}   # draining worker -> its stream: responses only
        self._closed = False
        self.worker = ""   # x-waf-worker serving the current stream
        self.replica = ""
        self.restarts = 0  # streams opened again after a failure

    # -- submitting ----------------------------------------------------------
    def submit(self, request: RequestInput, *, inspect_response: bool = False) -> concurrent.futures.Future:
        """Queues one request; the future gives a Verdict or raises a WafError."""
        message = waf_pb2.BatchRequest(request=request_message(request, self._config, inspect_response))
        return self._submit(message, self._config.retries)

    def submit_response(self, handle: str | Verdict, response: HttpResponse) -> concurrent.futures.Future:
        """The response of a transaction kept by a request on this stream."""
        if isinstance(handle, Verdict):
            handle = handle.transaction_handle
        return self._submit(waf_pb2.BatchRequest(response=response_message(handle, response)), 0)

    def evaluate(self, request: RequestInput, *, inspect_response: bool = False) -> Verdict:
        return self._result(self.submit(request, inspect_response=inspect_response))

    def evaluate_response(self, handle: str | Verdict, response: HttpResponse) -> Verdict:
        return self._result(self.submit_response(handle, response))

    def evaluate_many(self, requests: Iterable[RequestInput], window: int = 256) -> Iterator[Verdict | WafError]:
        """Verdicts in input order, `window` requests in flight at most. A
        request without a verdict yields its WafError instead of raising, so
        one failure does not end the run."""
        waiting: deque[concurrent.futures.Future] = deque()
        for request in requests:
            waiting.append(self.submit(request))
            if len(waiting) >= window:
                yield self._outcome(waiting.popleft())
        while waiting:
            yield self._outcome(waiting.popleft())

    def _submit(self, message: waf_pb2.BatchRequest, retries: int) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the stream is closed")
            message.ref = next(self._refs)
            self._pending[message.ref] = Pending(message, future, time.monotonic() + self._config.deadline, retries)
            left = self._left.get(worker_of(message)) if self._left else None
            if left is not None:
                left.put(message)
                return future
            if self._queue is None:
                self._open()
            self._queue.put(message)
        return future

    def _result(self, future: concurrent.futures.Future) -> Verdict:
        try:
            return future.result(timeout=self._config.deadline)
        except concurrent.futures.TimeoutError:
            raise WafTimeout("no verdict within the deadline", code="DEADLINE_EXCEEDED") from None

    def _outcome(self, future: concurrent.futures.Future) -> Verdict | WafError:
        try:
            return self._result(future)
        except WafError as exc:
            return exc

    # -- the gRPC stream -------------------------------------------------------
    def _open(self) -> None:
        """Under the lock: a new stream, fed by a new queue."""
        items: queue.SimpleQueue = queue.SimpleQueue()
        call = self._stub.EvaluateStream(_batches(items, self._config.max_batch), metadata=self._metadata)
        self._queue = items
        threading.Thread(target=self._read, args=(call, items), name="waf-stream-reader", daemon=True).start()

    def _read(self, call, items: queue.SimpleQueue) -> None:
        try:
            metadata = dict(call.initial_metadata() or ())
            worker = self.worker = metadata.get(WORKER_METADATA, "")
            self.replica = metadata.get(REPLICA_METADATA, "")
            for batch in call:
                if batch.draining:
                    self._leave(items, worker, again_stays=True)
                elif worker in self._left:
                    self._rejoin(items, worker)
                for answer in batch.verdicts:
                    with self._lock:
                        item = self._pending.pop(answer.ref, None)
                    if item is None or item.future.done():
                        continue  # answered after its deadline: nobody waits
                    if answer.error.reason == waf_pb2.DRAINING and item.message.HasField("request"):
                        self._leave(items, worker)
                        self._resend(item)
                        continue
                    settle(item.future, answer)
            error = drained()
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
        self._failed(items, error)

    def _leave(self, items: queue.SimpleQueue, worker: str, again_stays: bool = False) -> None:
        """The worker drains: new items go to a new stream; this one carries
        the responses of the transactions it holds until it ends. again_stays:
        a new stream that reached the worker another one left (it pauses:
        the channel leads there) stays current, rather than open one stream
        per message until it serves again."""
        with self._lock:
            if again_stays and self._left.get(worker) not in (None, items):
                return
            if self._queue is items:
                self._queue = None
                older = self._left.get(worker)
                if older is not None:   # its responses go to this one from now on
                    older.put(_END)
                self._left[worker] = items

    def _rejoin(self, items: queue.SimpleQueue, worker: str) -> None:
        """The worker serves again (it paused): its stream is the current one
        again, unless another has opened since."""
        with self._lock:
            if self._left.get(worker) is items and self._queue is None and not self._closed:
                del self._left[worker]
                self._queue = items
                self.worker = worker

    def _resend(self, item: Pending) -> None:
        """A request a draining worker refused: on the new stream (not a retry)."""
        with self._lock:
            if not self._closed:
                self._pending[item.message.ref] = item
                if self._queue is None:
                    self._open()
                self._queue.put(item.message)
                return
        item.future.set_exception(drained())

    def _failed(self, items: queue.SimpleQueue, error: WafError) -> None:
        """The stream behind `items` ended: re-send what may be, fail the rest."""
        with self._lock:
            if self._queue is not items:
                for worker, left in list(self._left.items()):
                    if left is items:   # a draining worker's stream ended: its requests iterator too
                        del self._left[worker]
                        items.put(_END)
                return
            items.put(_END)
            self._queue = None
            again = [item for item in self._pending.values() if error.retryable and item.retryable]
            lost = [ref for ref, item in self._pending.items() if item not in again]
            failed = [self._pending.pop(ref) for ref in lost]
            if again and not self._closed:
                self.restarts += 1
                self._open()
                for item in again:
                    item.retries_left -= 1
                    self._queue.put(item.message)
            else:
                failed += again
                for item in again:
                    self._pending.pop(item.message.ref, None)
        for item in failed:
            if not item.future.done():
                item.future.set_exception(error)

    # -- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        """Ends the stream after what was submitted is answered (or times out)."""
        with self._lock:
            self._closed = True
            waiting = [item.future for item in self._pending.values()]
        concurrent.futures.wait(waiting, timeout=self._config.deadline)
        with self._lock:
            streams = [self._queue, *self._left.values()]
        for items in streams:
            if items is not None:
                items.put(_END)
        with self._lock:
            left, self._pending = list(self._pending.values()), {}
        for item in left:
            if not item.future.done():
                item.future.set_exception(WafUnavailable("the stream was closed", code="CANCELLED"))

    def __enter__(self) -> "EvaluationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
