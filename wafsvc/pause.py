"""A worker out of rotation while it blocks: the parse of a reload.

libmodsecurity holds the GIL while it parses rules (50-100 ms per distinct
CRS rule set, much longer on a busy machine), so the worker's one thread
answers nothing meanwhile. Requests sent to it then wait for the parse, or
for the gateway's hedge, and under load reach the deadline. So a worker
pauses first: every stream is told it takes no new requests
(VerdictBatch.draining), what still arrives before the gateway has reacted
is refused with DRAINING (the gateway sends it elsewhere, not as an
attempt), and once no request has come for QUIET_S (LONGEST_WAIT_S at
most) the worker parses, then tells every stream it serves again.
A stream opened during the pause is not refused: the gateway sends no
request on it (it knows the worker pauses), and a client whose channel
brings it back to this worker would only bounce between refusals; what it
sends is evaluated, or waits for the parse like before pauses existed.

Pure logic: the worker passes in how to tell its streams (announce, which
sends each the current state) and its timers.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("wafsvc.pause")

# The gateway reacts within a loop iteration, a few ms even when busy; what
# it had sent before arrives at once. Waiting longer only delays the reload.
QUIET_S = 0.02
LONGEST_WAIT_S = 0.25
CHECK_S = 0.005


class Pause:
    def __init__(self, announce: Callable[[], None], call_later: Callable[[float, Callable[[], None]], None],
                 clock: Callable[[], float] = time.monotonic, quiet_s: float = QUIET_S,
                 longest_s: float = LONGEST_WAIT_S) -> None:
        self._announce = announce       # tells every stream the current state (paused or not)
        self._call_later = call_later
        self._clock = clock
        self._quiet_s = quiet_s
        self._longest_s = longest_s
        self._work: Callable[[], None] | None = None
        self._started = self._last_request = 0.0
        self.refused = 0                # requests refused during the current pause
        self.number = 0                 # pauses so far: the current one's, while paused

    @property
    def paused(self) -> bool:
        return self._work is not None

    def current(self) -> int | None:
        """The pause under way (its number), None when serving."""
        return self.number if self._work is not None else None

    def refuses(self, opened_during: int | None) -> bool:
        """Paused, and the stream asking was open before this pause began."""
        return self._work is not None and opened_during != self.number

    def run(self, work: Callable[[], None]) -> bool:
        """Pauses, runs work once the gateway has stopped sending, serves
        again. False when a pause is already waiting: its work (a reload
        reads the latest files) covers this one."""
        if self._work is not None:
            return False
        self._work = work
        self.number += 1
        self._started = self._last_request = self._clock()
        self.refused = 0
        self._announce()
        self._call_later(CHECK_S, self._check)
        return True

    def request_refused(self) -> None:
        """A request arrived while paused (and was refused): not quiet yet."""
        self.refused += 1
        self._last_request = self._clock()

    def _check(self) -> None:
        now = self._clock()
        if now - self._last_request < self._quiet_s and now - self._started < self._longest_s:
            self._call_later(CHECK_S, self._check)
            return
        work, waited = self._work, now - self._started
        try:
            work()
        finally:
            self._work = None
            self._announce()
            log.info("serving again after a pause", extra={
                "waited_s": round(waited, 3), "paused_s": round(self._clock() - self._started, 3),
                "refused": self.refused})
