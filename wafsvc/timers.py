"""Callbacks due at a time, run by wafsvc's server loop (wafsvc/rpc.py)
between polls: no thread, no lock."""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Callable


class Timers:
    """Callbacks due at a time, run by the server loop between polls."""

    def __init__(self) -> None:
        self._heap: list = []
        self._seq = itertools.count()

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._seq), callback))

    def every(self, interval_s: float, callback: Callable[[], None]) -> None:
        def tick() -> None:
            self.call_later(interval_s, tick)
            callback()
        self.call_later(interval_s, tick)

    def wait_s(self, longest: float) -> float:
        if not self._heap:
            return longest
        return min(longest, max(0.0, self._heap[0][0] - time.monotonic()))

    def due(self) -> list[Callable[[], None]]:
        heap, now, out = self._heap, time.monotonic(), []
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        return out
