"""Workers reload one at a time (wafsvc/rollout.py)."""

from wafsvc.rollout import Rollout


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_worker_is_told_once_the_previous_one_reported():
    told, clock = [], Clock()
    rollout = Rollout(lambda pid: told.append(pid) or True, timeout_s=30, clock=clock)
    rollout.start([11, 12, 13])
    assert told == [11] and rollout.current == 11 and rollout.wait_s() == 30
    rollout.done(12)               # not its turn: it is simply no longer waited for
    rollout.done(11)
    assert told == [11, 13] and rollout.current == 13
    rollout.done(13)
    assert rollout.current == 0 and rollout.wait_s() is None


def test_a_silent_or_gone_worker_holds_up_no_one():
    told, clock = [], Clock()
    gone = {21}
    rollout = Rollout(lambda pid: pid not in gone and (told.append(pid) or True), timeout_s=5, clock=clock)
    rollout.start([21, 22, 23])
    assert told == [22]            # 21 is gone: skipped
    clock.now = 4.0
    rollout.tick()
    assert rollout.current == 22 and rollout.wait_s() == 1.0
    clock.now = 5.0
    rollout.tick()                 # 22 never reported
    assert told == [22, 23] and rollout.current == 23


def test_a_new_reload_starts_over():
    told = []
    rollout = Rollout(lambda pid: told.append(pid) or True)
    rollout.start([1, 2])
    rollout.start([1, 2])
    assert told == [1, 1] and rollout.current == 1
