"""Batched evaluation over one EvaluateStream, for asyncio.

The asyncio twin of stream.py, with the same contract: requests awaited by
concurrent tasks leave together (up to max_batch per message, whatever is
ready, no waiting for more), answers are matched by ref, and a failed stream
is reopened (another replica when there is one) for the requests it had not
answered, a draining worker's stream keeps only its responses, and a paused
worker's is the current one again once it serves, unless another has opened.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Iterable

import grpc

from modsec_spoa_client._shared import RequestInput, request_message, response_message
from modsec_spoa_client.config import ClientConfig
from modsec_spoa_client.errors import WafError, WafTimeout, from_rpc_error
from modsec_spoa_client.models import HttpResponse, Verdict
from modsec_spoa_client.stream import REPLICA_METADATA, WORKER_METADATA, Pending, drained, settle, worker_of
from wafapi import waf_pb2

_END = None


class AsyncEvaluationStream:
    def __init__(self, stub, config: ClientConfig, metadata) -> None:
        self._stub = stub
        self._config = config
        self._metadata = metadata
        self._refs = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._queue: asyncio.Queue | None = None
        self._left: dict[str, asyncio.Queue] = {}   # draining worker -> its stream: responses only
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self.worker = ""
        self.replica = ""
        self.restarts = 0

    async def evaluate(self, request: RequestInput, *, inspect_response: bool = False) -> Verdict:
        message = waf_pb2.BatchRequest(request=request_message(request, self._config, inspect_response))
        return await self._send(message, self._config.retries)

    async def evaluate_response(self, handle: str | Verdict, response: HttpResponse) -> Verdict:
        """The response of a transaction kept by a request on this stream."""
        if isinstance(handle, Verdict):
            handle = handle.transaction_handle
        return await self._send(waf_pb2.BatchRequest(response=response_message(handle, response)), 0)

    async def evaluate_all(self, requests: Iterable[RequestInput]) -> list[Verdict | WafError]:
        """Verdicts in input order; a request without one gets its WafError."""
        return await asyncio.gather(*(self.evaluate(r) for r in requests), return_exceptions=True)

    async def _send(self, message: waf_pb2.BatchRequest, retries: int) -> Verdict:
        if self._closed:
            raise RuntimeError("the stream is closed")
        future = asyncio.get_running_loop().create_future()
        message.ref = next(self._refs)
        item = Pending(message, future, time.monotonic() + self._config.deadline, retries)
        self._pending[message.ref] = item
        left = self._left.get(worker_of(message)) if self._left else None
        if left is not None:
            left.put_nowait(message)
        else:
            if self._queue is None:
                self._open()
            self._queue.put_nowait(message)
        try:
            async with asyncio.timeout(self._config.deadline):  # no task per call, unlike wait_for
                return await future
        except TimeoutError:
            raise WafTimeout("no verdict within the deadline", code="DEADLINE_EXCEEDED") from None
        finally:
            if self._pending.get(message.ref) is item and future.cancelled():
                del self._pending[message.ref]  # timed out: never re-sent

    def _open(self) -> None:
        items: asyncio.Queue = asyncio.Queue()
        self._queue = items
        task = asyncio.get_running_loop().create_task(self._run(items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _batches(self, items: asyncio.Queue):
        max_batch = self._config.max_batch
        while True:
            first = await items.get()
            if first is _END:
                return
            batch = [first]
            while len(batch) < max_batch and not items.empty():
                item = items.get_nowait()
                if item is _END:
                    yield waf_pb2.EvaluateBatch(requests=batch)
                    return
                batch.append(item)
            yield waf_pb2.EvaluateBatch(requests=batch)

    async def _run(self, items: asyncio.Queue) -> None:
        call = self._stub.EvaluateStream(self._batches(items), metadata=self._metadata)
        try:
            metadata = dict(await call.initial_metadata() or ())
            worker = self.worker = metadata.get(WORKER_METADATA, "")
            self.replica = metadata.get(REPLICA_METADATA, "")
            async for batch in call:
                if batch.draining:
                    self._leave(items, worker, again_stays=True)
                elif worker in self._left:
                    self._rejoin(items, worker)
                for answer in batch.verdicts:
                    item = self._pending.pop(answer.ref, None)
                    if item is None or item.future.done():
                        continue
                    if answer.error.reason == waf_pb2.DRAINING and item.message.HasField("request"):
                        self._leave(items, worker)
                        self._resend(item)   # on the new stream: not a retry
                        continue
                    settle(item.future, answer)
            error = drained()
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
        except asyncio.CancelledError:
            call.cancel()
            raise
        self._failed(items, error)

    def _leave(self, items: asyncio.Queue, worker: str, again_stays: bool = False) -> None:
        """The worker drains: new items go to a new stream; this one carries
        the responses of the transactions it holds until it ends. again_stays:
        see stream.py."""
        if again_stays and self._left.get(worker) not in (None, items):
            return
        if self._queue is items:
            self._queue = None
            older = self._left.get(worker)
            if older is not None:   # its responses go to this one from now on
                older.put_nowait(_END)
            self._left[worker] = items

    def _rejoin(self, items: asyncio.Queue, worker: str) -> None:
        """The worker serves again (it paused): its stream is the current one
        again, unless another has opened since."""
        if self._left.get(worker) is items and self._queue is None and not self._closed:
            del self._left[worker]
            self._queue = items
            self.worker = worker

    def _resend(self, item: Pending) -> None:
        if self._closed:
            item.future.set_exception(drained())
            return
        self._pending[item.message.ref] = item
        if self._queue is None:
            self._open()
        self._queue.put_nowait(item.message)

    def _failed(self, items: asyncio.Queue, error: WafError) -> None:
        if self._queue is not items:
            for worker, left in list(self._left.items()):
                if left is items:
                    del self._left[worker]
                    items.put_nowait(_END)
            return
        self._queue = None
        again = [item for item in self._pending.values() if error.retryable and item.retryable]
        if again and not self._closed:
            self.restarts += 1
            self._open()
        for ref, item in list(self._pending.items()):
            if item in again and not self._closed:
                item.retries_left -= 1
                self._queue.put_nowait(item.message)
            else:
                del self._pending[ref]
                if not item.future.done():
                    item.future.set_exception(error)

    async def aclose(self) -> None:
        """Ends the stream after what was submitted is answered (or times out)."""
        self._closed = True
        waiting = [item.future for item in self._pending.values()]
        if waiting:
            await asyncio.wait(waiting, timeout=self._config.deadline)
        for items in [self._queue, *self._left.values()]:
            if items is not None:
                items.put_nowait(_END)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._config.deadline)
        for task in set(self._tasks):
            task.cancel()

    async def __aenter__(self) -> "AsyncEvaluationStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
