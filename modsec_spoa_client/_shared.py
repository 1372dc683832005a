"""What Client and AsyncClient share besides config and models: turning the
caller's input into a request message, the retry rule, which pinned
connection reaches which worker (response inspection), and the state and
steps of a client that do not wait (ClientBase)."""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from typing import Union

import grpc

from modsec_spoa_client.config import ClientConfig
from modsec_spoa_client.errors import ErrorReason, TransactionLost, WafError, WafTimeout, from_rpc_error
from modsec_spoa_client.models import HttpRequest, HttpResponse, Verdict, worker_of
from modsec_spoa_client.rawhttp import parse_request
from wafapi import waf_pb2, waf_pb2_grpc

RequestInput = Union[HttpRequest, bytes, bytearray, memoryview]
KNOWN_WORKERS = 1024  # workers remembered per client (restarts make new names)


def request_message(request: RequestInput, config: ClientConfig,
                    inspect_response: bool = False) -> waf_pb2.EvaluateRequest:
    """An HttpRequest, or raw HTTP/1.x request bytes, as the wire message;
    a body past config.max_body_bytes is cut and flagged, never dropped silently."""
    if isinstance(request, (bytes, bytearray, memoryview)):
        request = parse_request(bytes(request))
    elif not isinstance(request, HttpRequest):
        raise TypeError(f"expected HttpRequest or raw request bytes, got {type(request).__name__}")
    limit = config.max_body_bytes
    if limit and len(request.body) > limit:
        request = dataclasses.replace(request, body=request.body[:limit], body_truncated=True)
    return request.to_proto(inspect_response)


def response_message(handle: str, response: HttpResponse) -> waf_pb2.ResponseRequest:
    if not isinstance(response, HttpResponse):
        raise TypeError(f"expected HttpResponse, got {type(response).__name__}")
    return response.to_proto(handle)


class Attempts:
    """The retry rule: retryable failures are tried again while attempts and
    the deadline (one for all attempts) last."""

    def __init__(self, config: ClientConfig, retries: int | None = None) -> None:
        self.deadline = time.monotonic() + config.deadline
        self.left = config.retries if retries is None else retries
        self.count = 0

    def remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise WafTimeout("no verdict within the deadline", code="DEADLINE_EXCEEDED")
        return remaining

    def again(self, error: WafError) -> bool:
        """True to retry after `error`; False means raise it."""
        if not error.retryable or self.left <= 0 or self.deadline <= time.monotonic():
            return False
        self.left -= 1
        self.count += 1
        return True


class WorkerRoutes:
    """Which pinned connection (index) reaches which wafsvc worker, learnt
    from the handles of kept transactions. A pinned connection is one TCP
    connection, so it reaches one worker until it reconnects."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._next = 0
        self._routes: OrderedDict[str, int] = OrderedDict()

    def next_index(self) -> int:
        index = self._next
        self._next = (index + 1) % self.size
        return index

    def learn(self, handle: str, index: int) -> None:
        worker = worker_of(handle)
        if worker:
            self._routes[worker] = index
            self._routes.move_to_end(worker)
            while len(self._routes) > KNOWN_WORKERS:
                self._routes.popitem(last=False)

    def index_for(self, handle: str) -> int:
        worker = worker_of(handle)
        if not worker:
            raise TransactionLost(f"malformed transaction handle {handle!r}", code="INVALID_ARGUMENT",
                                  reason=ErrorReason.FIELD_INVALID)
        try:
            return self._routes[worker]
        except KeyError:
            raise TransactionLost(f"no connection of this client reaches worker {worker!r}: use the "
                                  f"client that evaluated the request", code="NOT_FOUND",
                                  reason=ErrorReason.TRANSACTION_OTHER_WORKER) from None


class ClientBase:
    """Client and AsyncClient differ only where they wait (grpc vs grpc.aio):
    `_grpc` is the module whose channels they open; the rest is here."""

    _grpc = grpc

    def __init__(self, config: ClientConfig | None = None, **settings) -> None:
        """`Client(ClientConfig(...))`, or the config's fields as keywords."""
        self.config = config.replace(**settings) if config is not None else ClientConfig(**settings)
        self._metadata = self.config.metadata()
        # Response inspection: the request and its response must reach the
        # same worker, so they travel on pinned connections (pick_first).
        self._routes = WorkerRoutes(self.config.response_channels)
        self._pinned: list = []   # (channel, WafStub) by index
        self.retries = 0  # attempts beyond the first, over this client's life

    def _open_channel(self, balanced: bool, index: int = 0):
        options = self.config.options(balanced) + [("modsec_spoa.channel", index)]
        credentials = self.config.credentials()
        if credentials is None:
            return self._grpc.insecure_channel(self.config.target, options=options)
        return self._grpc.secure_channel(self.config.target, credentials, options=options)

    def _pinned_stub(self, index: int) -> waf_pb2_grpc.WafStub:
        while len(self._pinned) <= index:
            channel = self._open_channel(balanced=False, index=len(self._pinned) + 1)
            self._pinned.append((channel, waf_pb2_grpc.WafStub(channel)))
        return self._pinned[index][1]

    def _request_route(self, inspect_response: bool) -> tuple[waf_pb2_grpc.WafStub, int]:
        """The stub a request goes to, and its pinned index (-1: balanced).
        A request whose response will be inspected goes on the next pinned
        connection, so that its worker can be learnt from the handle."""
        if not inspect_response:
            return self._stub, -1
        index = self._routes.next_index()
        return self._pinned_stub(index), index

    def _learnt(self, verdict: Verdict, index: int) -> Verdict:
        if index >= 0 and verdict.transaction_handle:
            self._routes.learn(verdict.transaction_handle, index)
        return verdict

    def _response_call(self, handle: str | Verdict,
                       response: HttpResponse) -> tuple[waf_pb2_grpc.WafStub, waf_pb2.ResponseRequest]:
        """The pinned stub that reaches the worker holding `handle`'s
        transaction, and the message for it."""
        if isinstance(handle, Verdict):
            handle = handle.transaction_handle
        return self._pinned_stub(self._routes.index_for(handle)), response_message(handle, response)

    def _retry_or_raise(self, attempts: Attempts, exc: grpc.RpcError) -> None:
        error = from_rpc_error(exc)
        if not attempts.again(error):
            raise error from None
        self.retries += 1
