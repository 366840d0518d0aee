"""SFrame transforms keyed by hand on a real aiortc call (two peer connections, no hub).

What a ``Call`` cannot be made to do without a test-only hack lives here: a receiver holding
the wrong key for its peer, and a sender with no key at all. Whole calls through the hub, with
the on-the-wire checks, are in tests/test_call.py.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from aiortc import RTCRtpReceiver

from client.frame_transform import (
    install_receiver_transform,
    install_sender_transform,
    request_keyframe,
)
from client.media import PatternTrack, ToneTrack
from crypto.frame_crypto import MediaKey, SFrameReceiver, SFrameSender
from crypto.sframe import SFrameError
from tests.conftest import LoopbackCalls, LoopbackSide, wait_for

pytestmark = pytest.mark.slow

OFFERER_KEY = bytes(range(16))
ANSWERER_KEY = bytes(range(100, 116))
# One KID and base key per peer, as the key agreement gives them.
KIDS = {"offerer": 0x10, "answerer": 0x21}
TONES = {"offerer": 440.0, "answerer": 660.0}


@dataclass
class Protection:
    """One side's SFrame contexts."""

    sender: SFrameSender = field(default_factory=SFrameSender)
    receiver: SFrameReceiver = field(default_factory=SFrameReceiver)


def keyframe_requester(receiver: RTCRtpReceiver) -> Callable[[SFrameError], None]:
    def on_failure(error: SFrameError) -> None:
        request_keyframe(receiver)

    return on_failure


def protect(keys: dict[str, bytes | None], receive_keys: dict[str, bytes]):
    """A loopback ``prepare`` giving each side SFrame transforms with the given keys.

    ``keys[name]`` is that side's sending key (None: no key); ``receive_keys[name]`` is the key
    that side's receiver uses for the other side's KID.
    """
    protections: dict[str, Protection] = {}

    def prepare(side):
        name = side.role
        peer = "answerer" if name == "offerer" else "offerer"
        protection = protections[name] = Protection()
        sending_key = keys[name]
        if sending_key is not None:
            protection.sender.use_key(MediaKey(0, KIDS[name], sending_key))
        protection.receiver.add_key(MediaKey(0, KIDS[peer], receive_keys[name]))
        for kind in ("audio", "video"):
            install_sender_transform(side.senders[kind], protection.sender.transform(kind))
            rtp_receiver = side.receivers[kind]
            install_receiver_transform(
                rtp_receiver,
                protection.receiver.transform(kind, keyframe_requester(rtp_receiver)),
            )

    return prepare, protections


async def start_protected_call(
    loopback: LoopbackCalls, keys: dict[str, bytes | None], receive_keys: dict[str, bytes]
) -> tuple[LoopbackSide, LoopbackSide, dict[str, Protection]]:
    prepare, protections = protect(keys, receive_keys)
    offerer, answerer = await loopback.connect(
        [ToneTrack(TONES["offerer"]), PatternTrack()],
        [ToneTrack(TONES["answerer"]), PatternTrack()],
        prepare=prepare,
    )
    return offerer, answerer, protections


async def test_a_wrong_key_drops_every_frame_and_counts_failures(loopback):
    wrong_key = os.urandom(16)
    offerer, answerer, protections = await start_protected_call(
        loopback,
        {"offerer": OFFERER_KEY, "answerer": ANSWERER_KEY},
        {"offerer": ANSWERER_KEY, "answerer": wrong_key},
    )
    counters = protections["answerer"].receiver.counters
    await wait_for(lambda: counters["audio"].failed >= 25 and counters["video"].failed >= 10)
    # The other direction works, so the call itself is up.
    await wait_for(lambda: len(offerer.received.pattern_numbers) >= 5)
    for kind in ("audio", "video"):
        assert counters[kind].frames == 0
    assert answerer.received.audio_frames == 0 and answerer.received.video_frames == 0


async def test_no_key_means_nothing_is_sent(loopback):
    offerer, answerer, protections = await start_protected_call(
        loopback,
        {"offerer": None, "answerer": ANSWERER_KEY},
        {"offerer": ANSWERER_KEY, "answerer": OFFERER_KEY},
    )
    counters = protections["offerer"].sender.counters
    await wait_for(lambda: len(offerer.received.pattern_numbers) >= 5)
    await wait_for(lambda: counters["video"].dropped_without_key >= 10)
    assert counters["audio"].dropped_without_key >= 10
    assert answerer.wire["audio"] == [] and answerer.wire["video"] == []
    assert answerer.received.audio_frames == 0 and answerer.received.video_frames == 0
