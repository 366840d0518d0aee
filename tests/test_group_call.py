"""Group calls through a real routing hub (``blindhub hub --route-media``) with real calls:
every member a ``GroupCall`` with its own tone and the numbered test pattern, every frame
SFrame-encrypted under its sender's key, the hub forwarding and recording what it forwards."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from client.call import CallConfig
from client.experiment.analysis import dominant_frequency
from client.group_call import GroupCall, GroupStats
from client.media import PatternTrack, ToneTrack
from client.session import Verify
from crypto.identity import IdentityKey, KnownPeers
from signaling.hub import Limits
from signaling.media_server import MediaServer
from signaling.recording import MediaRecorder
from signaling.server import HubServer
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

NAMES = ("alice", "bob", "carol", "dave")
TONES = {"alice": 440, "bob": 550, "carol": 660, "dave": 770}
# Enough audio for a dominant-frequency estimate (16,384 samples) with margin.
AUDIO_SAMPLES = 30_000


@pytest.fixture
async def start_routed_hub() -> AsyncIterator[Callable[..., Awaitable[HubServer]]]:
    """Start real routing hubs: ``await start_routed_hub(record=DIR)``; all closed after."""
    servers: list[HubServer] = []

    async def start(record: Path | None = None, **limits: Any) -> HubServer:
        recorder = None if record is None else MediaRecorder(record)
        media = MediaServer(Limits(max_peers_per_room=8, **limits), recorder=recorder)
        server = HubServer(media=media)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def member(hub: HubServer, name: str, **options: Any) -> CallConfig:
    defaults: dict[str, Any] = dict(
        room="group",
        hub_url=hub.url,
        name=name,
        identity=IdentityKey.generate(os.urandom),
        known_peers=KnownPeers(),
        tracks=[ToneTrack(TONES[name]), PatternTrack()],
        verify=Verify.TOFU,
        setup_timeout=20,
    )
    return CallConfig(**(defaults | options))


def heard_everyone(call: GroupCall, others: int) -> bool:
    return len(call.received) == others and all(
        len(media.samples) >= AUDIO_SAMPLES and media.pattern_numbers
        for media in call.received.values()
    )


async def run_group(calls: Sequence[GroupCall]) -> tuple[list[GroupStats], set[str | None]]:
    """Run every call until each heard every other, then hang all up; return the statistics
    and the security codes shown at that moment (hanging up changes them: members leave)."""
    tasks = [asyncio.create_task(call.run()) for call in calls]
    try:
        await wait_for(
            lambda: all(heard_everyone(call, len(calls) - 1) for call in calls), timeout=60
        )
        codes = {call.stats.security_code for call in calls}
    finally:
        for call in calls:
            call.hangup("done")
    return list(await asyncio.gather(*tasks)), codes


@pytest.mark.parametrize("size", [3, 4])
async def test_every_member_hears_every_other_on_its_own_track(start_routed_hub, size):
    hub = await start_routed_hub()
    calls = [GroupCall(member(hub, name)) for name in NAMES[:size]]
    stats, codes = await run_group(calls)
    assert len(codes) == 1 and None not in codes
    for call, summary in zip(calls, stats, strict=True):
        assert len(summary.members) == size - 1
        for peer, media in call.received.items():
            name = summary.members[peer].name
            assert name is not None
            heard = dominant_frequency(media.samples, media.sample_rate)
            assert abs(heard - TONES[name]) < 5, (call.config.name, name, heard)
            assert media.pattern_numbers
            assert summary.members[peer].audio["failed"] == 0, str(summary.members[peer].audio)
