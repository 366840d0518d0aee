"""What the hub alone controls in a group call (the slot map, peer-left) cannot make this
peer keep state for peers that are not in the room: driven without a network."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

from aiortc import RTCPeerConnection

from client.call import CallConfig
from client.group_call import GroupCall, _FromHub, _Slot
from client.group_session import Ended, GroupSession
from client.hub_connection import HubClosed
from client.session import Verify
from crypto.identity import IdentityKey, KnownPeers
from signaling.protocol import MediaOffer, MediaTrack, MediaTracks, PeerId, PeerLeft


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


class ClosingHub:
    """A hub that offers media and closes the connection before the answer arrives."""

    async def send_media_answer(self, _sdp: str) -> None:
        raise HubClosed(1006, "")

    async def close(self) -> None:
        pass


async def test_a_hub_that_closes_before_the_media_answer_ends_the_call_as_hub_lost():
    call = started_call()
    call._joined = SimpleNamespace(hub=ClosingHub())  # type: ignore[assignment]
    offerer = RTCPeerConnection()
    offerer.addTransceiver("audio")
    await offerer.setLocalDescription(await offerer.createOffer())
    try:
        actions = await call._handle(_FromHub(MediaOffer(offerer.localDescription.sdp)), 0.0)
    finally:
        await offerer.close()
        await call._close()
    ended = [action for action in actions if isinstance(action, Ended)]
    assert ended and ended[0].reason == "hub-lost" and call.stats.hub_lost
