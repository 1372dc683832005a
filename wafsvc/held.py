"""The held-transaction store of one worker: pure logic, no engine, no I/O.

Transactions kept for their response wait here, keyed by a sequence number
(the token in the caller's handle), under three bounds:

- a time to live: one that waits longer than its TTL is ended (EXPIRED);
  `ttl_s` by default, or its own (each application has one);
- a count: the newest one past `max_count` pushes out the oldest (EVICTED);
- rule generations: a reload lets held transactions finish on the rules
  they started with, but only one superseded generation is kept alive, so
  reloads faster than the TTL cannot pile up rule sets (RELOADED).

Every way out but `take` hands the value to `on_end(value, reason)` (the
engine's logging runs there) and is counted in `ended`. Each bound removes
from the front: entries are in insertion order, which is also generation
order and, while every entry has the same TTL, deadline order, so each
removal is O(1). With several TTLs an entry may expire behind one that
lives longer: `take` still refuses it (EXPIRED), and `expire()` (the
per-second sweep) then scans every entry, so none outlives its TTL by more
than the sweep's interval.
Why a token is gone is remembered for the last `remember` removals, so a
late response learns EXPIRED, EVICTED or RELOADED rather than UNKNOWN.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Reason(enum.Enum):
    EXPIRED = "expired"      # waited longer than the TTL
    EVICTED = "evicted"      # pushed out by newer ones (the cap)
    RELOADED = "reloaded"    # its rules were superseded twice
    SHUTDOWN = "shutdown"    # the worker stopped
    UNKNOWN = "unknown"      # never held here, already used, or forgotten


class Gone(LookupError):
    """The token names no held transaction; `reason` says why."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class _Entry:
    __slots__ = ("value", "deadline", "generation")

    def __init__(self, value, deadline: float, generation: int) -> None:
        self.value = value
        self.deadline = deadline
        self.generation = generation


class HeldStore(Generic[T]):
    def __init__(self, ttl_s: float, max_count: int, on_end: Callable[[T, Reason], None],
                 clock: Callable[[], float] = time.monotonic, remember: int | None = None) -> None:
        if ttl_s <= 0 or max_count < 1:
            raise ValueError("a held-transaction store needs a positive TTL and count")
        self.ttl_s = ttl_s
        self.max_count = max_count
        self._on_end = on_end
        self._clock = clock
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._gone: OrderedDict[int, Reason] = OrderedDict()
        self._remember = max(max_count, 1024) if remember is None else remember
        self._next = 1
        self.ended = {reason: 0 for reason in Reason}   # removals by reason, for metrics
        self.peak = 0                                    # most held at once since reset_peak()
        self._mixed = False                              # some entry has its own TTL

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, value: T, generation: int = 0, ttl_s: float | None = None) -> int:
        """Holds value (for `ttl_s`, the store's TTL by default); returns its token."""
        now = self._clock()
        self._expire(now)
        while len(self._entries) >= self.max_count:
            self._pop_oldest(Reason.EVICTED)
        token = self._next
        self._next += 1
        if ttl_s is None or ttl_s == self.ttl_s:
            ttl_s = self.ttl_s
        elif ttl_s <= 0:
            raise ValueError("a held transaction needs a positive TTL")
        else:
            self._mixed = True
        self._entries[token] = _Entry(value, now + ttl_s, generation)
        if len(self._entries) > self.peak:
            self.peak = len(self._entries)
        return token

    def take(self, token: int) -> T:
        """Removes and returns the held value, or raises Gone with the reason."""
        entry = self._entries.pop(token, None)
        if entry is None:
            raise Gone(self._gone.get(token, Reason.UNKNOWN))
        if self._clock() >= entry.deadline:
            self._end(token, entry, Reason.EXPIRED)
            raise Gone(Reason.EXPIRED)
        return entry.value

    def expire(self) -> int:
        """Ends every entry past its deadline; returns how many."""
        now = self._clock()
        ended = self._expire(now)
        if self._mixed:
            late = [token for token, entry in self._entries.items() if entry.deadline <= now]
            for token in late:
                self._end(token, self._entries.pop(token), Reason.EXPIRED)
            ended += len(late)
        return ended

    def end_generations_before(self, generation: int) -> int:
        """Ends every entry that started on an older rule generation."""
        ended = 0
        entries = self._entries
        while entries:
            token, entry = next(iter(entries.items()))
            if entry.generation >= generation:
                break
            self._pop_oldest(Reason.RELOADED)
            ended += 1
        return ended

    def clear(self, reason: Reason = Reason.SHUTDOWN) -> int:
        ended = len(self._entries)
        while self._entries:
            self._pop_oldest(reason)
        return ended

    def reset_peak(self) -> None:
        self.peak = len(self._entries)

    # -- internals ---------------------------------------------------------
    def _expire(self, now: float) -> int:
        ended = 0
        entries = self._entries
        while entries:
            token, entry = next(iter(entries.items()))
            if entry.deadline > now:
                break
            self._pop_oldest(Reason.EXPIRED)
            ended += 1
        return ended

    def _pop_oldest(self, reason: Reason) -> None:
        token, entry = self._entries.popitem(last=False)
        self._end(token, entry, reason)

    def _end(self, token: int, entry: _Entry, reason: Reason) -> None:
        self.ended[reason] += 1
        if self._remember:
            self._gone[token] = reason
            if len(self._gone) > self._remember:
                self._gone.popitem(last=False)
        self._on_end(entry.value, reason)
