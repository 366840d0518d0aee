"""Per-frame transforms on aiortc senders and receivers (the only module using aiortc internals).

The model is the W3C WebRTC Encoded Transform: a sender's transform sees each whole encoded
frame after the encoder and before the packetizer; a receiver's transform sees each reassembled
frame after the depacketizer and before the decoder. aiortc 1.16 has no API for this, so the
adapters below wrap two internal seams, per instance and never by patching a class:

- sender: ``RTCRtpSender._next_encoded_frame`` returns the encoder's payloads (for VP8 already
  split behind payload descriptors). The adapter joins them back into the frame, transforms it
  and packetizes the result again. Both the encoder path and the pre-encoded ``av.Packet`` path
  go through this method, and NACK/RTX retransmissions resend packets built from its result, so
  nothing untransformed can be retransmitted.
- receiver: the jitter buffer's ``add`` returns each reassembled frame just before the receiver
  queues it for the decoder thread. The adapter replaces the receiver's jitter buffer with a
  proxy whose ``add`` transforms that frame or withholds it.

Two more seams shape what an audio sender shows in clear: a sender makes its encoder only when
it has none (``RTCRtpSender.__encoder``), so it can be given a constant-bitrate Opus encoder
before it starts; and the frames the sender adapter returns carry no audio level, so the
``ssrc-audio-level`` header extension stays empty even where a peer negotiated it. Tests watch
the wire through ``RTCDtlsTransport._handle_rtp_data``, which gets every RTP packet after SRTP
with its header exactly as it crossed.

tests/test_aiortc_internals.py fails with a clear message if any of these seams move, and
pyproject.toml pins aiortc to the minor version they were read from.
"""

from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCDtlsTransport, RTCRtpReceiver, RTCRtpSender
from aiortc.codecs.opus import SAMPLES_PER_FRAME as OPUS_SAMPLES_PER_FRAME
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder, VpxPayloadDescriptor, vp8_depayload
from aiortc.exceptions import InternalError, InvalidStateError, OperationError
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpsender import RTCEncodedFrame
from aiortc.rtp import RtpPacket

FrameTransform = Callable[[bytes], bytes | None]
"""Takes one encoded frame; returns the bytes to pass on, or None to pass nothing on."""

PacketObserver = Callable[[RtpPacket], None]
"""Sees each RTP packet a receiver gets (after SRTP, before RTX unwrapping); must not alter it."""

RtpDataObserver = Callable[[bytes], None]
"""Sees each RTP packet a transport gets, as bytes after SRTP: the header and its extensions
exactly as they crossed the wire in clear, then the payload SRTP decrypted."""

SUPPORTED_CODECS = frozenset({"opus", "VP8"})

# Name-mangled private attributes of aiortc 1.16 that the adapters rely on.
RECEIVER_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
RECEIVER_DECODER_ERROR = "_RTCRtpReceiver__decoder_error"
SENDER_ENCODER = "_RTCRtpSender__encoder"

# What aiortc raises for SDP it cannot apply. Its parser validates with `assert`, indexing and
# `next()`, so malformed text also surfaces as AssertionError, IndexError, KeyError, and as
# RuntimeError (a StopIteration escaping a coroutine, PEP 479).
SDP_ERRORS = (
    AssertionError,
    IndexError,
    KeyError,
    RuntimeError,
    ValueError,
    InternalError,
    InvalidStateError,
    OperationError,
)


class UnsupportedCodecError(ValueError):
    """A sender with a frame transform was asked to send a codec the transform cannot frame.

    Raised inside aiortc's sending task, which then stops the sender: nothing is sent in clear.
    """


class TransformAlreadyInstalledError(ValueError):
    """A sender or receiver already has a frame transform; a second one would run twice."""


class EncoderAlreadyChosenError(ValueError):
    """A sender already made its encoder (it has started): too late to choose another."""


def install_sender_transform(sender: RTCRtpSender, transform: FrameTransform) -> None:
    """Run ``transform`` on every encoded frame ``sender`` produces, before packetization.

    Must be called before the sender starts (before ``setRemoteDescription`` completes), so
    that no frame is ever sent untransformed.
    """
    if "_next_encoded_frame" in vars(sender):
        raise TransformAlreadyInstalledError("this sender already has a frame transform")
    next_encoded_frame: Callable[[RTCRtpCodecParameters], Awaitable[RTCEncodedFrame | None]]
    next_encoded_frame = sender._next_encoded_frame
    # Opus frames the encoder returned together, waiting to be sent one by one.
    pending: list[RTCEncodedFrame] = []

    async def next_transformed_frame(codec: RTCRtpCodecParameters) -> RTCEncodedFrame | None:
        if pending:
            return pending.pop(0)
        if codec.name not in SUPPORTED_CODECS:
            raise UnsupportedCodecError(f"no frame transform for codec {codec.name}")
        encoded = await next_encoded_frame(codec)
        if encoded is None:
            return None
        if codec.name == "VP8":
            return _transform_vp8(encoded, transform)
        frames = _transform_opus(encoded, transform)
        pending.extend(frames[1:])
        return frames[0] if frames else None

    # Per instance on purpose: other senders in the process stay untouched.
    sender._next_encoded_frame = next_transformed_frame  # type: ignore[method-assign]


def _transform_vp8(encoded: RTCEncodedFrame, transform: FrameTransform) -> RTCEncodedFrame | None:
    descriptor, _ = VpxPayloadDescriptor.parse(encoded.payloads[0])
    frame = b"".join(vp8_depayload(payload) for payload in encoded.payloads)
    transformed = transform(frame)
    if transformed is None:
        return None
    encoded.payloads = Vp8Encoder._packetize(transformed, descriptor.picture_id or 0)
    return encoded


def _transform_opus(encoded: RTCEncodedFrame, transform: FrameTransform) -> list[RTCEncodedFrame]:
    # aiortc sends every Opus packet of one encode call with the same RTP timestamp, and the
    # receiver glues same-timestamp packets together. Each packet is a frame of its own, so it
    # gets its own timestamp here, and the receiver sees exactly the frame that was transformed.
    frames = []
    for index, payload in enumerate(encoded.payloads):
        transformed = transform(payload)
        if transformed is not None:
            timestamp = encoded.timestamp + index * OPUS_SAMPLES_PER_FRAME
            # No audio level: it was measured on the plaintext (ssrc-audio-level, in clear).
            # aiortc annotates it as int, but its own None (for video) means "none".
            frames.append(RTCEncodedFrame([transformed], timestamp, None))  # type: ignore[arg-type]
    return frames


class _TransformingJitterBuffer:
    """Stands in for a receiver's jitter buffer and transforms each frame it completes."""

    def __init__(self, jitter_buffer: Any, transform: FrameTransform) -> None:
        self._jitter_buffer = jitter_buffer
        self._transform = transform

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        pli_flag, frame = self._jitter_buffer.add(packet)
        if frame is None:
            return pli_flag, None
        transformed = self._transform(frame.data)
        if transformed is None:
            return pli_flag, None
        frame.data = transformed
        return pli_flag, frame


def install_receiver_transform(receiver: RTCRtpReceiver, transform: FrameTransform) -> None:
    """Run ``transform`` on every frame ``receiver`` reassembles, before it is decoded.

    Must be called before the first packet arrives (before ``setRemoteDescription`` completes).
    """
    jitter_buffer = getattr(receiver, RECEIVER_JITTER_BUFFER)
    if isinstance(jitter_buffer, _TransformingJitterBuffer):
        raise TransformAlreadyInstalledError("this receiver already has a frame transform")
    setattr(receiver, RECEIVER_JITTER_BUFFER, _TransformingJitterBuffer(jitter_buffer, transform))


def request_keyframe(receiver: RTCRtpReceiver) -> None:
    """Ask the remote video sender for a keyframe (an RTCP PLI).

    Uses the receiver's own decoder-error path, so the PLI goes out with the next packet
    received, addressed to that packet's media SSRC. Audio receivers ignore the request.
    """
    getattr(receiver, RECEIVER_DECODER_ERROR).set()


def install_packet_observer(receiver: RTCRtpReceiver, observer: PacketObserver) -> None:
    """Let ``observer`` see every RTP packet ``receiver`` gets, as it crossed the wire."""
    handle_rtp_packet: Callable[[RtpPacket, int], Awaitable[None]]
    handle_rtp_packet = receiver._handle_rtp_packet

    async def observe_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
        observer(packet)
        await handle_rtp_packet(packet, arrival_time_ms=arrival_time_ms)

    receiver._handle_rtp_packet = observe_rtp_packet  # type: ignore[method-assign]


def install_constant_bitrate_opus(sender: RTCRtpSender, bitrate: int) -> None:
    """Make ``sender`` encode Opus at a constant ``bitrate`` (bit/s): every 20 ms frame has
    the same size, whatever the audio (libopus hard CBR pads each packet to its budget).

    Must be called before the sender starts. aiortc's own encoder is variable-bitrate, so the
    size of each frame follows voice activity; nothing else about the encoding changes.
    """
    if getattr(sender, SENDER_ENCODER) is not None:
        raise EncoderAlreadyChosenError("this sender has already made its encoder")
    setattr(sender, SENDER_ENCODER, _ConstantBitrateOpusEncoder(bitrate))


class _ConstantBitrateOpusEncoder(OpusEncoder):
    """aiortc's Opus encoder (48 kHz stereo, 20 ms, "voip"), with variable bitrate off."""

    def __init__(self, bitrate: int) -> None:
        super().__init__()
        self.codec.bit_rate = bitrate
        self.codec.options = {**self.codec.options, "vbr": "off"}


def install_rtp_data_observer(transport: RTCDtlsTransport, observer: RtpDataObserver) -> None:
    """Let ``observer`` see every RTP packet ``transport`` gets, as bytes after SRTP.

    A packet observer sees headers as the receiver parsed them, which drops any extension the
    receiver did not negotiate; this one sees every extension that crossed the wire.
    """
    handle_rtp_data: Callable[[bytes, int], Awaitable[None]] = transport._handle_rtp_data

    async def observe_rtp_data(data: bytes, arrival_time_ms: int) -> None:
        observer(data)
        await handle_rtp_data(data, arrival_time_ms)

    transport._handle_rtp_data = observe_rtp_data  # type: ignore[method-assign]
