"""The poll pacer (signaling/pacing.py), on a clock of its own: when a busy hub waits before
it polls again, and for how long."""

import math

import pytest

from signaling.hub import Limits
from signaling.pacing import MAX_WINDOW, PollPacer

WINDOW = 0.0002


def run(
    pacer: PollPacer, turns: int, every: float, messages: int, start: float = 0.0
) -> tuple[list[float], float]:
    """``turns`` turns of ``messages`` each from ``start``, each ending ``every`` seconds
    after the wait that followed the one before: the wait after each, and when the next
    turn would end."""
    waits, now = [], start
    for _ in range(turns):
        wait = pacer.after_turn(now, messages)
        waits.append(wait)
        now += wait + every
    return waits, now


def test_a_busy_hub_waits_out_the_rest_of_its_window_after_each_turn():
    pacer = PollPacer(WINDOW)
    # 100,000 messages a second, two per turn: fifty times the rate that makes it busy.
    waits, _ = run(pacer, 1_000, every=0.00002, messages=2)
    assert pacer.busy
    # Busy within its first 10 ms of such load, from then on each turn waits the rest of the
    # window: the turn took 20 us of it.
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[-500:] == pytest.approx([WINDOW - 0.00002] * 500)
    assert pacer.waits == sum(1 for wait in waits if wait) and pacer.waited == pytest.approx(
        sum(waits)
    )


@pytest.mark.parametrize(
    ("every", "messages"),
    [(0.01, 1), (WINDOW, 1), (WINDOW / 2, 0)],
    ids=["idle", "one-per-window", "turns-that-sent-nothing"],
)
def test_below_two_messages_per_window_it_polls_at_once(every, messages):
    pacer = PollPacer(WINDOW)
    waits, _ = run(pacer, 2_000, every=every, messages=messages)
    assert set(waits) == {0.0}
    assert not pacer.busy and pacer.waits == 0


def test_a_turn_longer_than_the_window_is_not_followed_by_a_wait():
    pacer = PollPacer(WINDOW)
    _, now = run(pacer, 1_000, every=0.00002, messages=2)
    assert pacer.busy
    # 64 messages that took 300 us: the hub was away from polling longer than a window.
    assert pacer.after_turn(now - 0.00002 + 0.0003, 64) == 0.0
    assert pacer.busy


def test_once_the_load_stops_the_next_message_is_answered_at_once():
    pacer = PollPacer(WINDOW)
    _, now = run(pacer, 1_000, every=0.00002, messages=2)
    # 50 ms later (five times the rate's averaging time): the rate it remembers has decayed.
    assert pacer.after_turn(now + 0.05, 1) == 0.0
    assert not pacer.busy


def test_no_wait_ever_passes_the_window():
    pacer, now = PollPacer(WINDOW), 0.0
    for every in (0.0, 0.000001, 0.00005, 0.00019):
        waits, now = run(pacer, 500, every=every, messages=8, start=now)
        assert max(waits) <= WINDOW


def test_a_window_of_zero_never_waits():
    pacer = PollPacer(0.0)
    waits, _ = run(pacer, 1_000, every=0.0, messages=64)
    assert set(waits) == {0.0}
    assert not pacer.busy


@pytest.mark.parametrize("window", [-0.0001, MAX_WINDOW * 1.01, math.nan, math.inf])
def test_a_window_out_of_range_is_refused_by_the_limits_and_the_pacer(window):
    for make in (lambda: Limits(batch_window=window), lambda: PollPacer(window)):
        with pytest.raises(ValueError, match=r"batch window must be from 0 to 0\.01 seconds"):
            make()


def test_a_clock_that_went_back_still_gets_no_more_than_a_window():
    pacer = PollPacer(WINDOW)
    _, now = run(pacer, 1_000, every=0.00002, messages=2)
    assert pacer.busy
    assert pacer.after_turn(now - 1.0, 2) == WINDOW
