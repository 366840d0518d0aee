"""Whole calls through a real hub on a free port, real aiortc on loopback."""

import asyncio
import os

import pytest

from client.analysis import dominant_frequency
from client.call import (
    Call,
    CallConfig,
    CallFailed,
    ExperimentOnlyLayers,
    IdentityMismatch,
    VerificationRefused,
    Verify,
)
from client.media import PatternTrack, ToneTrack
from crypto.identity import IdentityKey, KnownPeers
from crypto.sframe import SFrameHeader

pytestmark = pytest.mark.slow


def config(hub, name, tone, **options) -> CallConfig:
    defaults = dict(
        room="room1",
        hub_url=hub.url,
        name=name,
        identity=IdentityKey.generate(os.urandom),
        known_peers=KnownPeers(),
        tracks=[ToneTrack(tone), PatternTrack()],
        verify=Verify.TOFU,
        duration=2.5,
        setup_timeout=20,
    )
    return CallConfig(**(defaults | options))


async def run_pair(first: CallConfig, second: CallConfig):
    alice, bob = Call(first), Call(second)
    alice_task = asyncio.create_task(alice.run())
    await asyncio.sleep(0.1)  # alice is in the room first, so she initiates
    results = await asyncio.gather(alice_task, bob.run(), return_exceptions=True)
    return alice, bob, results


async def test_a_full_call_both_ways(hub):
    alice, bob, results = await run_pair(config(hub, "alice", 440), config(hub, "bob", 660))
    for result in results:
        assert not isinstance(result, BaseException), result
    for call, heard in ((alice, 660), (bob, 440)):
        received = call.received
        assert abs(dominant_frequency(received.samples, received.sample_rate) - heard) < 5
        numbers = received.pattern_numbers
        assert len(numbers) >= 10 and numbers == sorted(numbers)
        stats = call.stats
        assert stats.protection is not None and stats.protection.end_to_end_encrypted
        assert stats.protection.pin == "pinned" and stats.protection.sas
        for kind in (stats.audio, stats.video):
            assert kind.sent > 0 and kind.decrypted > 0 and kind.failed == 0
            assert kind.sframe_bytes_added > 0
        assert stats.setup_seconds is not None
    assert alice.stats.protection.sas == bob.stats.protection.sas
    # Both hung up at their duration or on the other's bye.
    assert {alice.stats.ended_by, bob.stats.ended_by} <= {"duration", "peer-bye", "peer-left"}
