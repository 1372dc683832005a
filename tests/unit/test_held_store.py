"""The held-transaction store: TTL, count cap, rule generations, and the
reason every removal is remembered by. Pure logic with a fake clock."""

from __future__ import annotations

import pytest

from wafsvc.held import Gone, HeldStore, Reason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ended():
    return []


def store(ended, ttl=10.0, cap=3, **kw) -> tuple[HeldStore, Clock]:
    clock = Clock()
    return HeldStore(ttl, cap, lambda value, reason: ended.append((value, reason)), clock=clock, **kw), clock


def test_a_value_is_taken_once(ended):
    s, _ = store(ended)
    token = s.put("a")
    assert s.take(token) == "a" and len(s) == 0
    with pytest.raises(Gone) as gone:
        s.take(token)
    assert gone.value.reason is Reason.UNKNOWN
    assert ended == []  # taken values are the caller's to end


def test_tokens_are_unique_and_never_reused(ended):
    s, _ = store(ended, cap=2)
    tokens = [s.put(i) for i in range(10)]
    assert len(set(tokens)) == 10


def test_never_held_is_unknown(ended):
    s, _ = store(ended)
    with pytest.raises(Gone) as gone:
        s.take(12345)
    assert gone.value.reason is Reason.UNKNOWN


def test_the_oldest_is_evicted_first_past_the_cap(ended):
    s, _ = store(ended, cap=3)
    tokens = [s.put(name) for name in "abcde"]
    assert len(s) == 3
    assert ended == [("a", Reason.EVICTED), ("b", Reason.EVICTED)]
    for token in tokens[:2]:
        with pytest.raises(Gone) as gone:
            s.take(token)
        assert gone.value.reason is Reason.EVICTED
    assert [s.take(t) for t in tokens[2:]] == ["c", "d", "e"]
    assert s.ended[Reason.EVICTED] == 2


def test_expiry_at_the_deadline_by_take_and_by_sweep(ended):
    s, clock = store(ended, ttl=10.0, cap=10)
    first = s.put("first")
    clock.now += 5
    second = s.put("second")
    clock.now += 5                  # first's deadline exactly
    with pytest.raises(Gone) as gone:
        s.take(first)
    assert gone.value.reason is Reason.EXPIRED and ended == [("first", Reason.EXPIRED)]
    assert s.expire() == 0          # second has 5 s left
    clock.now += 4.999
    assert s.expire() == 0
    clock.now += 0.001
    assert s.expire() == 1 and len(s) == 0
    with pytest.raises(Gone) as gone:
        s.take(second)
    assert gone.value.reason is Reason.EXPIRED
    assert s.ended[Reason.EXPIRED] == 2


def test_put_sweeps_expired_ones_first(ended):
    s, clock = store(ended, ttl=1.0, cap=2)
    s.put("a")
    s.put("b")
    clock.now += 2
    s.put("c")                      # a and b expired: none evicted
    assert ended == [("a", Reason.EXPIRED), ("b", Reason.EXPIRED)] and len(s) == 1


def test_generations_end_oldest_first_and_only_older_ones(ended):
    s, _ = store(ended, cap=10)
    old = [s.put(f"g1-{i}", generation=1) for i in range(2)]
    mid = s.put("g2", generation=2)
    new = s.put("g3", generation=3)
    assert s.end_generations_before(2) == 2
    assert ended == [("g1-0", Reason.RELOADED), ("g1-1", Reason.RELOADED)]
    with pytest.raises(Gone) as gone:
        s.take(old[0])
    assert gone.value.reason is Reason.RELOADED
    assert s.take(mid) == "g2" and s.take(new) == "g3"


def test_clear_ends_everything_with_its_reason(ended):
    s, _ = store(ended, cap=10)
    for i in range(4):
        s.put(i)
    assert s.clear() == 4 and len(s) == 0
    assert [reason for _, reason in ended] == [Reason.SHUTDOWN] * 4


def test_reasons_are_remembered_for_a_bounded_number_of_removals(ended):
    s, _ = store(ended, cap=1, remember=3)
    tokens = [s.put(i) for i in range(6)]     # 0..4 evicted, 5 held
    reasons = []
    for token in tokens[:5]:
        with pytest.raises(Gone) as gone:
            s.take(token)
        reasons.append(gone.value.reason)
    assert reasons == [Reason.UNKNOWN, Reason.UNKNOWN, Reason.EVICTED, Reason.EVICTED, Reason.EVICTED]


def test_peak_follows_the_count(ended):
    s, _ = store(ended, cap=10)
    tokens = [s.put(i) for i in range(6)]
    for token in tokens[:5]:
        s.take(token)
    assert s.peak == 6
    s.reset_peak()
    assert s.peak == 1


def test_bad_bounds_are_refused(ended):
    with pytest.raises(ValueError):
        HeldStore(0, 10, lambda *_: None)
    with pytest.raises(ValueError):
        HeldStore(1, 0, lambda *_: None)


def test_200k_puts_stay_within_the_cap(ended):
    s, clock = store(ended, ttl=30.0, cap=1000)
    s._on_end = lambda value, reason: None
    for i in range(200_000):
        s.put(i)
        clock.now += 0.0001
    assert len(s) == 1000 and s.ended[Reason.EVICTED] == 199_000
    assert len(s._gone) <= 1024
