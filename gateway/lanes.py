"""The records the pool's parts share: a pending request, a wafsvc worker,
a lane (one EvaluateStream call), a slot (one gRPC channel and its lanes),
and the counters the metrics read. gateway/pool.py drives them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

import grpc

from wafapi import waf_pb2

Callback = Callable[["waf_pb2.Verdict | None", "NoVerdict | None"], None]  # see gateway.failures


def passthrough(data: bytes) -> bytes:
    """The stream's request serializer: batches are bytes already."""
    return data


class Pending:
    __slots__ = ("ref", "entry", "callback", "deadline", "hedge_at", "attempts", "lane", "done", "pin")

    def __init__(self, ref: int, entry: bytes, callback: Callback, deadline: float, hedge_at: float) -> None:
        self.ref = ref
        self.entry = entry          # serialized BatchRequest, as a field of EvaluateBatch (protowire)
        self.callback = callback
        self.deadline = deadline
        self.hedge_at = hedge_at
        self.attempts = 0
        self.lane: Lane | None = None
        self.done = False
        self.pin: str | None = None   # a response: the one worker that may evaluate it


class Worker:
    """One wafsvc worker process, as named by its streams' metadata."""
    __slots__ = ("name", "replica", "lanes", "spares", "inflight", "turn", "stalled", "last_answer",
                 "outstanding", "draining")

    def __init__(self, name: str, replica: str) -> None:
        self.name = name
        self.replica = replica
        self.lanes: list[Lane] = []   # lanes that take new work
        self.spares: list[Lane] = []  # retired lanes still open: they carry responses only (routing)
        self.inflight = 0
        self.turn = 0
        self.stalled = False          # hung: no new work until it answers
        self.last_answer = time.monotonic()
        self.outstanding = 0          # stream messages sent to it and not answered yet
        self.draining = False         # it said so: responses only, no new requests


class Lane:
    __slots__ = ("index", "slot", "call", "worker", "queue", "wakeup", "sent", "retired", "unanswered")

    def __init__(self, index: int, slot: "Slot") -> None:
        self.index = index
        self.slot = slot
        self.call = None
        self.worker: Worker | None = None
        self.queue: list[Pending] = []
        self.wakeup = asyncio.Event()
        self.sent: dict[int, Pending] = {}
        self.retired = False
        # Requests still unanswered in each message sent, oldest first: the
        # worker answers a stream's messages in order, possibly in several
        # parts (wafsvc flushes long batches), so counting answers suffices.
        self.unanswered: deque[int] = deque()


class Slot:
    """One gRPC channel (a connection to each replica) and its lanes."""
    __slots__ = ("position", "generation", "channel", "lanes", "tasks", "opened")

    def __init__(self, position: int, generation: int, channel: grpc.aio.Channel) -> None:
        self.position = position
        self.generation = generation
        self.channel = channel
        self.lanes: list[Lane] = []
        self.tasks: list[asyncio.Task] = []
        self.opened = time.monotonic()


class PoolStats:
    """Counters the metrics layer reads; plain ints keep the hot path cheap."""
    __slots__ = ("submitted", "answered", "timeouts", "retries", "lane_failures", "errors",
                 "hedges", "recycles", "coverage_repairs",
                 "messages", "batched", "responses", "unreachable")

    def __init__(self) -> None:
        self.submitted = self.answered = self.timeouts = 0
        self.retries = self.lane_failures = self.errors = 0
        self.hedges = self.recycles = self.coverage_repairs = 0
        # Stream messages written and the requests they carried: batched /
        # messages is the batch size actually achieved.
        self.messages = self.batched = 0
        # Responses routed to the worker named in their handle, and those
        # answered at once because that worker could not be reached.
        self.responses = self.unreachable = 0
