"""The hub's only module that uses aiortc internals (``blindhub hub --route-media``).

The hub terminates each member's WebRTC connection and forwards encoded frames without decoding
or encoding anything. aiortc 1.16 has no API for that, so the functions below use five seams,
each per instance and never by patching a class:

- **taking frames** (``take_frames``): a receiver's jitter buffer ``add``
  (``RTCRtpReceiver.__jitter_buffer``) returns each reassembled frame (after the depacketizer,
  with the publisher's RTP timestamp) just before the receiver queues it for its decoder thread.
  The wrapper hands the frame to the hub and returns no frame, so the decoder thread never gets
  work. The audio buffer's ``_prefetch`` (4 frames by default, a decoder's cushion) is set to
  0: the hub holds a frame only until the next one starts, as the video buffer does.
- **forwarding frames** (``ForwardTrack``): a sender's track may return ``av.Packet`` instead
  of a frame; the sender then calls its encoder's ``pack`` (no encoding) and sends the packet's
  bytes as they are, under its own SSRC, sequence numbers and timestamp origin, and keeps them in
  its own history to answer the subscriber's NACKs. The hub's receiver sends NACKs to the
  publisher itself (video). So loss on one leg is repaired on that leg alone.
- **keyframe wanted** (``on_keyframe_wanted``): a subscriber's PLI or FIR reaches the sender's
  ``_handle_rtcp_packet``; the wrapper reports it to the hub instead of asking the (non-existent)
  encoder for a keyframe, and passes every other RTCP packet on (receiver reports, REMB).
- **budgeting retransmissions** (``on_nack``): a subscriber's generic NACK reaches the same
  ``_handle_rtcp_packet``, which would call ``_retransmit`` (resend from the sender's history
  of 128 packets) for every sequence number listed, however many and however often. The
  wrapper asks the hub how many it grants, and retransmits only those (each one once).
- **asking for a keyframe** (``request_keyframe``): the receiver's decoder-error event
  (``RTCRtpReceiver.__decoder_error``) makes it send a PLI with the next packet it gets,
  addressed to that packet's SSRC. The hub never decodes, so only this module sets it.
- **bounding SSRCs** (``bound_ssrcs``): a connection's RTP router (``RtpRouter.route_rtp`` of
  its one bundled DTLS transport) learns every new SSRC on a known payload type, and the
  receiver then keeps statistics for it, forever; past ``MAX_SSRCS`` packets of a new SSRC are
  dropped, so a member spraying SSRCs cannot grow the hub's memory.

tests/test_media_adapter.py fails with a message naming the seam if any of them moves, and
pyproject.toml pins aiortc to the minor version they were read from.
"""

import asyncio
import fractions
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
)
from aiortc.exceptions import InternalError, InvalidStateError, OperationError
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.rtcdtlstransport import RtpRouter
from aiortc.rtp import (
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    AnyRtcpPacket,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
    RtpPacket,
)

# Name-mangled private attributes of aiortc 1.16 that the seams rely on.
RECEIVER_JITTER_BUFFER: Final = "_RTCRtpReceiver__jitter_buffer"
RECEIVER_DECODER_ERROR: Final = "_RTCRtpReceiver__decoder_error"

CLOCK_RATES: Final = {"audio": 48000, "video": 90000}
CODECS: Final = {"audio": ("audio/opus",), "video": ("video/VP8", "video/rtx")}

FORWARD_QUEUE_FRAMES: Final = 32
"""Frames waiting for one subscriber's sender before the oldest is dropped: about half a
second of audio or one of video. A sender that falls that far behind is not keeping up."""

MAX_SSRCS: Final = 8
"""SSRCs the hub learns on one member's connection: a publisher sends three (audio, video and
its retransmissions) and a restarted stream a few more. aiortc keeps state for every SSRC it
has seen and never forgets one, so past this bound packets of a new SSRC are dropped."""

# What aiortc raises for SDP it cannot apply. Its parser validates with `assert`, indexing and
# `next()`, so malformed text also surfaces as AssertionError, IndexError, KeyError, and as
# RuntimeError (a StopIteration escaping a coroutine, PEP 479).
SDP_ERRORS: Final = (
    AssertionError,
    IndexError,
    KeyError,
    RuntimeError,
    ValueError,
    InternalError,
    InvalidStateError,
    OperationError,
)

FrameSink = Callable[[bytes, int], None]
"""Gets each frame a publisher sent (its bytes and RTP timestamp)."""


def hub_peer_connection() -> RTCPeerConnection:
    """A connection for one member: host candidates only (no STUN), one bundled transport."""
    return RTCPeerConnection(
        RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
    )


def add_transceiver(pc: RTCPeerConnection, kind: str, direction: str) -> RTCRtpTransceiver:
    """A transceiver of ``kind`` that offers only Opus (audio) or VP8 with RTX (video)."""
    transceiver = pc.addTransceiver(kind, direction=direction)
    capabilities = RTCRtpSender.getCapabilities(kind)
    transceiver.setCodecPreferences(
        [codec for codec in capabilities.codecs if codec.mimeType in CODECS[kind]]
    )
    return transceiver


class ForwardTrack(MediaStreamTrack):
    """A sender's source of frames received from a publisher, as ``av.Packet``: the sender packs
    and sends their bytes unchanged."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._time_base = fractions.Fraction(1, CLOCK_RATES[kind])
        self._frames: deque[tuple[bytes, int]] = deque()
        self._ready = asyncio.Event()

    def put(self, frame: bytes, rtp_timestamp: int) -> bool:
        """Queue ``frame`` for sending; past ``FORWARD_QUEUE_FRAMES`` the oldest is dropped
        (and True returned)."""
        dropped = len(self._frames) >= FORWARD_QUEUE_FRAMES
        if dropped:
            self._frames.popleft()
        self._frames.append((frame, rtp_timestamp))
        self._ready.set()
        return dropped

    def clear(self) -> None:
        """Forget queued frames (the slot changed publisher)."""
        self._frames.clear()

    async def recv(self) -> "av.Packet[Any]":
        while not self._frames:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        frame, rtp_timestamp = self._frames.popleft()
        packet = av.Packet(frame)
        packet.pts = rtp_timestamp
        packet.time_base = self._time_base
        return packet

    def stop(self) -> None:
        super().stop()
        self._ready.set()  # wake a waiting recv, which then ends the sender's loop


def take_frames(receiver: RTCRtpReceiver, sink: FrameSink) -> None:
    """Hand every frame ``receiver`` reassembles to ``sink`` instead of its decoder.

    Must be called before the first packet arrives (before ``setRemoteDescription``)."""
    jitter_buffer: JitterBuffer = getattr(receiver, RECEIVER_JITTER_BUFFER)
    add = jitter_buffer.add
    jitter_buffer._prefetch = 0

    def add_and_take(packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        pli_flag, frame = add(packet)
        if frame is not None:
            sink(frame.data, frame.timestamp)
        return pli_flag, None

    # Per instance on purpose: a client's receivers in the same process stay untouched.
    jitter_buffer.add = add_and_take  # type: ignore[method-assign]


def on_keyframe_wanted(sender: RTCRtpSender, wanted: Callable[[], None]) -> None:
    """Call ``wanted`` for each PLI or FIR the subscriber sends about ``sender``'s stream."""
    handle_rtcp_packet: Callable[[AnyRtcpPacket], Awaitable[None]]
    handle_rtcp_packet = sender._handle_rtcp_packet

    async def handle_or_report(packet: AnyRtcpPacket) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            wanted()
            return
        await handle_rtcp_packet(packet)

    sender._handle_rtcp_packet = handle_or_report  # type: ignore[method-assign]


def on_nack(sender: RTCRtpSender, granted: Callable[[int], int]) -> None:
    """Retransmit, for each NACK the subscriber sends about ``sender``'s stream, only as many of
    the packets it lists as ``granted(count)`` returns, the first ones listed."""
    handle_rtcp_packet: Callable[[AnyRtcpPacket], Awaitable[None]]
    handle_rtcp_packet = sender._handle_rtcp_packet
    retransmit: Callable[[int], Awaitable[None]] = sender._retransmit

    async def handle_within_budget(packet: AnyRtcpPacket) -> None:
        if not (isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK):
            await handle_rtcp_packet(packet)
            return
        # A sequence number listed twice (one NACK may list each many times) is sent once.
        lost = list(dict.fromkeys(packet.lost))
        for sequence_number in lost[: granted(len(lost))]:
            await retransmit(sequence_number)

    sender._handle_rtcp_packet = handle_within_budget  # type: ignore[method-assign]


def request_keyframe(receiver: RTCRtpReceiver) -> None:
    """Ask the publisher of ``receiver``'s (video) stream for a keyframe: a PLI goes out with
    the next packet received, addressed to its SSRC."""
    getattr(receiver, RECEIVER_DECODER_ERROR).set()


def bound_ssrcs(receiver: RTCRtpReceiver) -> None:
    """Drop the packets of any new SSRC once ``receiver``'s transport (with max-bundle, the
    connection's only one) knows ``MAX_SSRCS``."""
    router: RtpRouter = receiver.transport._rtp_router
    route_rtp = router.route_rtp

    def route_known(packet: RtpPacket) -> RTCRtpReceiver | None:
        if packet.ssrc not in router.ssrc_table and len(router.ssrc_table) >= MAX_SSRCS:
            return None
        return route_rtp(packet)  # type: ignore[return-value]

    router.route_rtp = route_known  # type: ignore[method-assign]
