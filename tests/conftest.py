import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import av
import pytest
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.codecs import get_decoder
from aiortc.codecs.vpx import VpxPayloadDescriptor, vp8_depayload
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from client.frame_transform import install_packet_observer
from client.media import ReceivedMedia, collect, left_channel
from signaling.hub import Hub, Limits
from signaling.server import HubServer
from tests.redis_server import RedisServer

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2)
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000)


async def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Return once ``condition()`` holds; fail the test if it does not within ``timeout``.

    The one way a test waits for something to happen: no test sleeps for a time it hopes
    is long enough. ``condition`` is polled every 10 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


class RtpLike(Protocol):
    """An RTP packet as a receiver got it: aiortc's RtpPacket (install_packet_observer)."""

    @property
    def payload_type(self) -> int: ...
    @property
    def sequence_number(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def payload(self) -> bytes: ...


def wire_frames(packets: Sequence[RtpLike], kind: str) -> list[bytes]:
    """The encoded frames as a receiver reassembles them from the RTP it got: audio payloads
    as they are, video payloads joined per frame after their VP8 payload descriptors.

    Retransmissions (RTX, the rarer payload type) and frames whose first packet was not
    captured are left out."""
    if not packets:
        return []
    media_type = Counter(p.payload_type for p in packets).most_common(1)[0][0]
    frames: dict[int, list[RtpLike]] = {}
    for packet in packets:
        if packet.payload_type == media_type:
            frames.setdefault(packet.timestamp, []).append(packet)
    result = []
    for group in frames.values():
        group.sort(key=lambda p: p.sequence_number)
        if kind == "video" and not VpxPayloadDescriptor.parse(group[0].payload)[0].partition_start:
            continue
        depayload = vp8_depayload if kind == "video" else bytes
        result.append(b"".join(depayload(p.payload) for p in group))
    return result


def decode_all(codec: RTCRtpCodecParameters, frames: Sequence[bytes]) -> list[Any]:
    """What aiortc's decoder for ``codec`` makes of ``frames``; a rejected frame gives nothing."""
    decoder = get_decoder(codec)
    decoded = []
    for timestamp, frame in enumerate(frames):
        try:
            decoded += decoder.decode(JitterFrame(frame, timestamp * 960))
        except av.FFmpegError:
            continue
    return decoded


def decoded_audio(frames: Sequence[bytes]) -> list[int]:
    """The left channel an Opus decoder makes of ``frames``, past its start-up."""
    samples: list[int] = []
    for frame in decode_all(OPUS, frames):
        channels = len(frame.layout.channels)
        samples += left_channel(bytes(frame.planes[0])[: frame.samples * channels * 2], channels)
    return samples[4800:]


def plaintext_runs_on_the_wire(
    plaintext: Sequence[bytes], packets: Sequence[RtpLike], run: int = 16
) -> list[bytes]:
    """Every ``run``-byte piece of the plaintext frames (at ``run``-byte steps) that appears
    anywhere in a payload of ``packets``: empty when no part of the plaintext crossed."""
    windows = {
        packet.payload[i : i + run]
        for packet in packets
        for i in range(len(packet.payload) - run + 1)
    }
    return [
        frame[i : i + run]
        for frame in plaintext
        for i in range(0, len(frame) - run + 1, run)
        if frame[i : i + run] in windows
    ]


@dataclass
class LoopbackSide:
    """One peer of a loopback call: its role ("offerer" or "answerer"), its connection, senders
    and receivers by kind, what it received (decoded) and every RTP packet that reached it (as it
    crossed the wire)."""

    role: str
    pc: RTCPeerConnection
    senders: dict[str, RTCRtpSender] = field(default_factory=dict)
    receivers: dict[str, RTCRtpReceiver] = field(default_factory=dict)
    received: ReceivedMedia = field(default_factory=ReceivedMedia)
    wire: dict[str, list[RtpPacket]] = field(default_factory=dict)


Prepare = Callable[[LoopbackSide], None]


class SdpRelay(Protocol):
    """How the offer and the answer travel from one side to the other, as a hub relays them:
    each method returns the description the other side gets (a hostile hub's own, say)."""

    async def offer(self, sdp: str) -> str: ...
    async def answer(self, sdp: str) -> str: ...


class LoopbackCalls:
    """Two aiortc peer connections in one process, the offer and answer exchanged directly or
    through an ``SdpRelay``.

    ``prepare`` runs on each side once its senders and receivers exist and before any media
    flows: the place to install frame transforms.
    """

    def __init__(self) -> None:
        self._sides: list[LoopbackSide] = []
        self._tasks: list[asyncio.Task[None]] = []

    def _side(self, role: str, tracks: Sequence[MediaStreamTrack]) -> LoopbackSide:
        side = LoopbackSide(role, RTCPeerConnection(RTCConfiguration(iceServers=[])))
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
        relay: SdpRelay | None = None,
    ) -> tuple[LoopbackSide, LoopbackSide]:
        offerer = self._side("offerer", offerer_tracks)
        self._bind(offerer, prepare)
        await offerer.pc.setLocalDescription(await offerer.pc.createOffer())
        offer = offerer.pc.localDescription.sdp
        if relay is not None:
            offer = await relay.offer(offer)
        answerer = self._side("answerer", [])
        await answerer.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        for track in answerer_tracks:
            answerer.pc.addTrack(track)
        self._bind(answerer, prepare)
        await answerer.pc.setLocalDescription(await answerer.pc.createAnswer())
        answer = answerer.pc.localDescription.sdp
        if relay is not None:
            answer = await relay.answer(answer)
        await offerer.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
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
    """A real hub with the default limits: ``hub.url`` (ws://127.0.0.1:PORT)."""
    return await start_hub()


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A real Valkey server on a free port, for this test alone."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()
