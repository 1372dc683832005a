"""Workers reload one at a time.

A worker parsing CRS answers nothing for 50-100 ms per distinct rule set,
longer on a busy machine. If every worker parsed at once, requests would
wait past the gateway's deadline; one at a time, the others answer and the
gateway sends them the work (the parsing worker pauses first:
wafsvc/pause.py). The supervisor tells the first worker (SIGHUP); each reports when
it is done (SIGUSR1 to the supervisor), and the next is told then, or after
`timeout_s` if a worker never reports. Pure logic: the supervisor passes in
how to tell a worker.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

REPORT_TIMEOUT_S = 30.0


class Rollout:
    def __init__(self, tell: Callable[[int], bool], timeout_s: float = REPORT_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tell = tell            # tell(pid) -> False when that process is gone
        self._timeout_s = timeout_s
        self._clock = clock
        self._queue: list[int] = []
        self.current = 0             # the worker reloading now; 0 when none
        self._deadline = 0.0

    def start(self, pids: Iterable[int]) -> None:
        """A new reload: every worker, in turn (a rollout under way starts over)."""
        self._queue = list(pids)
        self.current = 0
        self._next()

    def done(self, pid: int) -> None:
        """`pid` reported (or died): the next worker's turn if it was the current one."""
        if pid == self.current:
            self.current = 0
            self._next()
        elif pid in self._queue:
            self._queue.remove(pid)

    def wait_s(self) -> float | None:
        """How long the supervisor may wait for a signal; None: no limit."""
        if not self.current:
            return None
        return max(0.0, self._deadline - self._clock())

    def tick(self) -> None:
        """The wait ran out: move on without the current worker's report."""
        if self.current and self._clock() >= self._deadline:
            self.current = 0
            self._next()

    def _next(self) -> None:
        while self._queue:
            pid = self._queue.pop(0)
            if self._tell(pid):
                self.current, self._deadline = pid, self._clock() + self._timeout_s
                return
