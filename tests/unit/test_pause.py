"""wafsvc/pause.py: a worker says it pauses, waits until no request comes
for a while (or at most a bound), runs the blocking work, says it serves
again. A fake clock and timer list stand in for the server's loop."""

from __future__ import annotations

from wafsvc.pause import CHECK_S, Pause


class Loop:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list = []
        self.said: list[bool] = []   # the state each announce told the streams

    def call_later(self, delay_s: float, callback) -> None:
        self.timers.append((self.now + delay_s, callback))

    def advance(self, seconds: float) -> None:
        """Runs the timers due within `seconds`, as the server loop does."""
        end = self.now + seconds
        while self.timers and min(t for t, _ in self.timers) <= end:
            self.timers.sort(key=lambda t: t[0])
            due, callback = self.timers.pop(0)
            self.now = max(self.now, due)
            callback()
        self.now = end


def _pause(loop: Loop) -> Pause:
    pause = Pause(lambda: loop.said.append(pause.paused), loop.call_later, clock=lambda: loop.now,
                  quiet_s=0.02, longest_s=0.25)
    return pause


def test_it_announces_waits_for_quiet_runs_the_work_and_serves_again():
    loop = Loop()
    pause = _pause(loop)
    done = []
    assert pause.run(lambda: done.append(pause.paused)) and pause.paused and loop.said == [True]
    loop.advance(0.01)
    pause.request_refused()            # the gateway had not reacted yet
    loop.advance(0.015)
    assert not done, "a request came 15 ms ago: not quiet yet"
    loop.advance(0.01)
    assert done == [True], "the work runs while still paused"
    assert not pause.paused and loop.said == [True, False] and pause.refused == 1


def test_requests_that_never_stop_delay_the_work_only_up_to_the_bound():
    loop = Loop()
    pause = _pause(loop)
    done = []
    pause.run(lambda: done.append(loop.now))
    while not done:
        pause.request_refused()
        loop.advance(CHECK_S)
    assert 0.25 <= done[0] < 0.25 + 2 * CHECK_S and loop.said == [True, False]


def test_a_second_request_while_waiting_is_covered_by_the_first():
    loop = Loop()
    pause = _pause(loop)
    done = []
    assert pause.run(lambda: done.append(1))
    assert not pause.run(lambda: done.append(2))
    loop.advance(1)
    assert done == [1] and loop.said == [True, False]
    assert pause.run(lambda: done.append(3))   # a later reload pauses again
    loop.advance(1)
    assert done == [1, 3] and loop.said == [True, False, True, False]


def test_failing_work_still_ends_the_pause():
    loop = Loop()
    pause = _pause(loop)

    def work():
        raise RuntimeError("boom")

    pause.run(work)
    try:
        loop.advance(1)
    except RuntimeError:
        pass
    assert not pause.paused and loop.said == [True, False]


def test_only_streams_open_before_the_pause_are_refused():
    loop = Loop()
    pause = _pause(loop)
    before = pause.current()
    assert before is None and not pause.refuses(before)
    pause.run(lambda: None)
    during = pause.current()
    assert pause.refuses(before) and not pause.refuses(during)
    loop.advance(1)
    assert not pause.refuses(before) and not pause.refuses(during)
    pause.run(lambda: None)   # the next pause: a stream from the last one is refused now
    assert pause.refuses(during) and not pause.refuses(pause.current())
