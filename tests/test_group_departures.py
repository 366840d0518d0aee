"""The group call's memory of who left, without a call: recent departures are refused, old
ones forgotten, so a long call with many leaves keeps it small."""

from client.group_call import STALE_SECONDS, RecentDepartures
from signaling.protocol import PeerId

A, B, C = (PeerId(name) for name in "abc")


def test_a_departed_member_is_refused_for_the_whole_window_then_forgotten() -> None:
    departed = RecentDepartures(STALE_SECONDS)
    departed.add(A, now=10.0)
    assert departed.refuses(A, now=10.0)
    assert departed.refuses(A, now=10.0 + STALE_SECONDS)
    assert not departed.refuses(A, now=10.0 + STALE_SECONDS + 0.001)
    assert not departed.refuses(B, now=10.0)


def test_a_long_call_keeps_only_the_departures_of_the_last_window() -> None:
    departed = RecentDepartures(STALE_SECONDS)
    leaves = 10_000
    for n in range(leaves):
        departed.add(PeerId(f"p{n}"), now=n * 1.0)
    last = (leaves - 1) * 1.0
    assert len(departed) <= STALE_SECONDS + 1  # one leave a second: the window's few
    assert departed.refuses(PeerId(f"p{leaves - 1}"), now=last)
    assert departed.refuses(PeerId(f"p{leaves - 2}"), now=last)
    assert not departed.refuses(PeerId("p0"), now=last)


def test_leaving_again_restarts_the_window() -> None:
    departed = RecentDepartures(STALE_SECONDS)
    departed.add(A, now=0.0)
    departed.add(B, now=1.0)
    departed.add(A, now=2.0)  # a hub may name the same id again
    departed.add(C, now=1.0 + STALE_SECONDS + 0.5)  # prunes B, not A
    assert departed.refuses(A, now=2.0 + STALE_SECONDS)
    assert len(departed) == 2
