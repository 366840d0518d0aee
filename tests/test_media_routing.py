"""The media-routing core without I/O: slots, routes, media-tracks, the PLI throttle, the
retransmission budget."""

import pytest

from signaling.media_routing import (
    ApplyAnswer,
    CloseMedia,
    MediaCommand,
    MediaRouter,
    RequestKeyframe,
    RetransmitBudget,
    SendOffer,
    SendTracks,
    SlotChanged,
    slot_mid,
)
from signaling.protocol import ErrorCode, MediaTrack, MediaTracks, PeerId, Refused

A, B, C, D = (PeerId(name) for name in "abcd")


def tracks(*publishers: PeerId | None) -> MediaTracks:
    return MediaTracks(
        tuple(
            MediaTrack(slot_mid(slot, kind), kind, publisher)
            for slot, publisher in enumerate(publishers)
            if publisher is not None
            for kind in ("audio", "video")
        )
    )


def connect(router: MediaRouter, peer: PeerId, now: float, room: str = "r") -> list[MediaCommand]:
    (offer,) = router.join(peer, room, now)
    assert isinstance(offer, SendOffer)
    (apply,) = router.answer(peer, "sdp")
    assert apply == ApplyAnswer(peer, offer.session, "sdp")
    return router.answer_applied(peer, offer.session, now)


def test_slot_mids_follow_the_publish_mids():
    assert [slot_mid(0, "audio"), slot_mid(0, "video"), slot_mid(6, "video")] == ["2", "3", "15"]


def test_members_get_the_lowest_free_slot_and_a_keyframe_is_asked_for():
    router = MediaRouter(4, answer_timeout=10)
    assert connect(router, A, 0.0) == [SendTracks(A, "r", tracks()), RequestKeyframe(A)]
    assert connect(router, B, 1.0) == [
        SlotChanged(A, 0, B),
        SlotChanged(B, 0, A),
        SendTracks(A, "r", tracks(B)),
        SendTracks(B, "r", tracks(A)),
        RequestKeyframe(B),
        RequestKeyframe(A),
    ]
    assert router.routes(A) == ((B, 0),) and router.routes(B) == ((A, 0),)
    assert router.subscriber_count == 2


def test_a_leave_frees_slots_and_the_next_member_takes_the_lowest():
    router = MediaRouter(4, answer_timeout=10)
    for number, peer in enumerate((A, B, C)):
        connect(router, peer, float(number))
    assert router.slots_of(C) == (A, B, None)
    session = router.session_of(B)
    assert session is not None
    assert router.leave(B) == [
        CloseMedia(B, session),
        SlotChanged(A, 0, None),
        SendTracks(A, "r", tracks(None, C)),
        SlotChanged(C, 1, None),
        SendTracks(C, "r", tracks(A, None)),
    ]
    assert router.routes(A) == ((C, 0),) and router.routes(B) == ()
    commands = connect(router, D, 10.0)
    assert router.slots_of(A) == (D, C, None) and router.slots_of(D) == (A, C, None)
    assert SendTracks(A, "r", tracks(D, C)) in commands
    assert router.routes(D) == ((A, 0), (C, 1))


def test_rooms_are_apart():
    router = MediaRouter(4, answer_timeout=10)
    connect(router, A, 0.0, room="r")
    assert connect(router, B, 0.0, room="s") == [SendTracks(B, "s", tracks()), RequestKeyframe(B)]
    assert router.routes(A) == () and router.routes(B) == ()


def test_an_unexpected_answer_is_refused_and_a_failed_one_may_be_retried():
    router = MediaRouter(2, answer_timeout=10)
    with pytest.raises(Refused) as refused:
        router.answer(A, "sdp")
    assert refused.value.code is ErrorCode.UNEXPECTED_MEDIA
    (offer,) = router.join(A, "r", 5.0)
    assert isinstance(offer, SendOffer)
    assert router.answer_deadline(A) == 15.0
    router.answer(A, "bad")
    with pytest.raises(Refused):
        router.answer(A, "again while applying")
    router.answer_failed(A, offer.session)
    router.answer(A, "good")
    router.answer_applied(A, offer.session, 6.0)
    assert router.answer_deadline(A) is None
    with pytest.raises(Refused):
        router.answer(A, "a second one")


def test_a_stale_result_is_ignored():
    router = MediaRouter(2, answer_timeout=10)
    (offer,) = router.join(A, "r", 0.0)
    assert isinstance(offer, SendOffer)
    router.answer(A, "sdp")
    assert router.leave(A) == [CloseMedia(A, offer.session)]
    router.join(A, "r", 1.0)
    assert router.answer_applied(A, offer.session, 1.0) == []
    assert router.subscriber_count == 0


def test_plis_are_throttled_per_publisher():
    router = MediaRouter(3, answer_timeout=10, pli_interval=0.2)
    for peer in (A, B, C):
        connect(router, peer, 0.0)
    counters = router.counters
    forwarded, throttled = counters.plis_forwarded, counters.plis_throttled
    slot_of_a_at_b = router.slots_of(B).index(A)
    slot_of_a_at_c = router.slots_of(C).index(A)
    assert router.keyframe_wanted(B, slot_of_a_at_b, 1.0) == [RequestKeyframe(A)]
    assert router.keyframe_wanted(C, slot_of_a_at_c, 1.1) == []
    assert router.keyframe_wanted(B, slot_of_a_at_b, 1.19) == []
    assert router.keyframe_wanted(B, slot_of_a_at_b, 1.25) == [RequestKeyframe(A)]
    # Another publisher has its own allowance; an unknown slot asks nobody.
    assert router.keyframe_wanted(A, router.slots_of(A).index(B), 1.25) == [RequestKeyframe(B)]
    assert router.keyframe_wanted(A, 5, 1.25) == []
    assert counters.plis_forwarded - forwarded == 3
    assert counters.plis_throttled - throttled == 2


def test_retransmissions_are_granted_within_each_subscribers_budget():
    budget = RetransmitBudget(rate_per_second=100.0, rate_burst=50)
    router = MediaRouter(3, answer_timeout=10, retransmit_budget=budget)
    for peer in (A, B, C):
        connect(router, peer, 0.0)
    # A flood: a NACK for a whole history gets the burst, then nothing until it refills.
    assert router.retransmissions_wanted(B, 128, 1.0) == 50
    assert router.retransmissions_wanted(B, 128, 1.0) == 0
    assert router.retransmissions_wanted(B, 128, 1.1) == 10  # 100/s for 0.1 s
    assert router.retransmissions_wanted(B, 3, 1.1) == 0
    # Another subscriber's budget is its own, untouched by B's flood.
    assert router.retransmissions_wanted(C, 2, 1.1) == 2
    # A bucket never holds more than its burst, however long it rested.
    assert router.retransmissions_wanted(B, 128, 100.0) == 50
    # A clock that goes back refills nothing; a peer that is no member is granted nothing.
    assert router.retransmissions_wanted(C, 48, 0.5) == 48
    assert router.retransmissions_wanted(C, 1, 0.4) == 0
    assert router.retransmissions_wanted(D, 5, 100.0) == 0
    counters = router.counters
    assert counters.retransmissions_granted == 50 + 10 + 2 + 50 + 48
    assert counters.retransmissions_refused == 78 + 128 + 118 + 3 + 78 + 1 + 5


def test_a_member_that_leaves_and_joins_again_starts_with_a_full_budget():
    router = MediaRouter(3, answer_timeout=10, retransmit_budget=RetransmitBudget(10.0, 20))
    connect(router, A, 0.0)
    assert router.retransmissions_wanted(A, 25, 0.0) == 20
    router.leave(A)
    assert router.retransmissions_wanted(A, 1, 0.5) == 0
    connect(router, A, 0.5)
    assert router.retransmissions_wanted(A, 25, 0.5) == 20


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 10), (-1.0, 10), (10.0, 0)])
def test_a_retransmission_budget_must_be_positive(rate: float, burst: int):
    with pytest.raises(ValueError):
        RetransmitBudget(rate, burst)


def test_forwarded_frames_are_counted_per_copy():
    router = MediaRouter(3, answer_timeout=10)
    router.forwarded("video", 1000, 2)
    router.forwarded("audio", 80, 0)
    counters = router.counters
    assert counters.frames_received == {"video": 1, "audio": 1}
    assert counters.frames_forwarded == {"video": 2, "audio": 0}
    assert counters.bytes_forwarded == {"video": 2000, "audio": 0}


def test_a_routed_room_needs_two_peers():
    with pytest.raises(ValueError):
        MediaRouter(1, answer_timeout=10)
