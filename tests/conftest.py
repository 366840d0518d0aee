import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
)
from aiortc.rtp import RtpPacket

from client.frame_transform import install_packet_observer
from client.media import ReceivedMedia, collect
from signaling.hub import Hub, Limits
from signaling.server import HubServer


@dataclass
class LoopbackSide:
    """One peer of a loopback call: its connection, senders and receivers by kind, what it
    received (decoded) and every RTP packet that reached it (as it crossed the wire)."""

    pc: RTCPeerConnection
    senders: dict[str, RTCRtpSender] = field(default_factory=dict)
    receivers: dict[str, RTCRtpReceiver] = field(default_factory=dict)
    received: ReceivedMedia = field(default_factory=ReceivedMedia)
    wire: dict[str, list[RtpPacket]] = field(default_factory=dict)


Prepare = Callable[[LoopbackSide], None]


class LoopbackCalls:
    """Two aiortc peer connections in one process, offer and answer exchanged directly.

    ``prepare`` runs on each side once its senders and receivers exist and before any media
    flows: the place to install frame transforms.
    """

    def __init__(self) -> None:
        self._sides: list[LoopbackSide] = []
        self._tasks: list[asyncio.Task[None]] = []

    def _side(self, tracks: Sequence[MediaStreamTrack]) -> LoopbackSide:
        side = LoopbackSide(RTCPeerConnection(RTCConfiguration(iceServers=[])))
        self._sides.append(side)
        for track in tracks:
            side.pc.addTrack(track)
        return side

    @staticmethod
    def _bind(side: LoopbackSide, prepare: Prepare | None) -> None:
        for transceiver in side.pc.getTransceivers():
            kind = transceiver.kind
            side.senders[kind] = transceiver.sender
            side.receivers[kind] = transceiver.receiver
            packets: list[RtpPacket] = side.wire.setdefault(kind, [])
            install_packet_observer(transceiver.receiver, packets.append)
        if prepare is not None:
            prepare(side)

    async def connect(
        self,
        offerer_tracks: Sequence[MediaStreamTrack],
        answerer_tracks: Sequence[MediaStreamTrack],
        prepare: Prepare | None = None,
    ) -> tuple[LoopbackSide, LoopbackSide]:
        offerer = self._side(offerer_tracks)
        self._bind(offerer, prepare)
        await offerer.pc.setLocalDescription(await offerer.pc.createOffer())
        answerer = self._side([])
        await answerer.pc.setRemoteDescription(offerer.pc.localDescription)
        for track in answerer_tracks:
            answerer.pc.addTrack(track)
        self._bind(answerer, prepare)
        await answerer.pc.setLocalDescription(await answerer.pc.createAnswer())
        await offerer.pc.setRemoteDescription(answerer.pc.localDescription)
        for side in (offerer, answerer):
            for receiver in side.receivers.values():
                self._tasks.append(asyncio.create_task(collect(receiver.track, side.received)))
        return offerer, answerer

    async def close(self) -> None:
        for side in self._sides:
            await side.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def loopback() -> AsyncIterator[LoopbackCalls]:
    """Set up loopback calls with ``await loopback.connect(...)``; all are closed afterwards."""
    calls = LoopbackCalls()
    yield calls
    await calls.close()


StartHub = Callable[..., Awaitable[HubServer]]


@pytest.fixture
async def start_hub() -> AsyncIterator[StartHub]:
    """Start real hubs on 127.0.0.1 (free ports) in the test's loop: ``await start_hub(limits)``.

    Keyword arguments go to ``HubServer``; every hub is closed (1001) afterwards.
    """
    servers: list[HubServer] = []

    async def start(limits: Limits | None = None, **options: Any) -> HubServer:
        server = HubServer(Hub(limits), **options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def hub(start_hub: StartHub) -> HubServer:
    """A real hub with the default limits: ``hub.url`` (ws://127.0.0.1:PORT), ``hub.server``."""
    return await start_hub()
