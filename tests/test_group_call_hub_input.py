"""What the hub alone controls in a group call (the slot map, peer-left) cannot make this
peer keep state for peers that are not in the room: driven without a network."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

from client.call import CallConfig
from client.group_call import GroupCall, _FromHub, _Slot
from client.group_session import GroupSession
from client.session import Verify
from crypto.identity import IdentityKey, KnownPeers
from signaling.protocol import MediaTrack, MediaTracks, PeerId, PeerLeft


def started_call() -> GroupCall:
    config = CallConfig(
        room="group",
        hub_url="ws://hub.invalid",
        name="alice",
        identity=IdentityKey.generate(os.urandom),
        known_peers=KnownPeers(),
        tracks=[],
        verify=Verify.TOFU,
    )
    call = GroupCall(config)
    call.session = GroupSession(config.session_config(), now=asyncio.get_running_loop().time())
    return call


async def test_a_slot_mapped_to_peers_not_in_the_room_makes_no_receivers():
    call = started_call()
    slot = _Slot(SimpleNamespace(mid="2", kind="audio", receiver=None))  # type: ignore[arg-type]
    call._slots[slot.mid] = slot
    unprotect = call._slot_transform(slot)
    frame = bytes(40)
    for index in range(100):
        ghost = PeerId(f"ghost{index}")
        await call._handle(_FromHub(MediaTracks((MediaTrack("2", "audio", ghost),))), 0.0)
        assert unprotect(frame, index) is None
    assert not call.receivers
    assert call.stats.unmapped_frames == 100


async def test_peer_left_for_peers_not_in_the_room_is_not_kept():
    call = started_call()
    for index in range(100):
        await call._handle(_FromHub(PeerLeft(PeerId(f"ghost{index}"))), 0.0)
    assert call.stats.leaves_announced == {}
