"""Per-frame transforms on aiortc senders and receivers (the only module using aiortc internals).

The model is the W3C WebRTC Encoded Transform: a sender's transform sees each whole encoded
frame after the encoder and before the packetizer; a receiver's transform sees each reassembled
frame after the depacketizer and before the decoder. aiortc 1.16 has no API for this, so the
adapters below wrap two internal seams, per instance and never by patching a class:

- sender: ``RTCRtpSender._next_encoded_frame`` returns the encoder's payloads (for VP8 already
  split behind payload descriptors). The adapter takes the frame back out of them, transforms
  it and packetizes the result again behind the encoder's own descriptors. Both the encoder
  path and the pre-encoded ``av.Packet`` path go through this method, and NACK/RTX
  retransmissions resend packets built from its result, so nothing untransformed can be
  retransmitted.
- receiver: the jitter buffer's ``add`` returns each reassembled frame just before the receiver
  queues it for the decoder thread. The adapter wraps that ``add`` on the receiver's own jitter
  buffer so that it transforms that frame or withholds it. A group call's receivers may hold a
  frame whose key has not arrived yet and pass it on later: ``LateDelivery`` puts it on the
  receiver's decoder queue (``__decoder_queue``) as the receiver itself would have, with the
  codec of its payload type (``__codecs``) and its timestamp mapped (``__timestamp_mapper``).

Both run once per frame in the event loop's thread, between the encoder's or the network's
work, where every step finds the caches cold: so each does as few steps as it can (no
descriptor objects, no new frame objects for the usual one-packet-per-frame case).

Two more seams shape what an audio sender shows in clear: a sender makes its encoder only when
it has none (``RTCRtpSender.__encoder``), so it can be given a constant-bitrate Opus encoder
before it starts; and the frames the sender adapter returns carry no audio level, so the
``ssrc-audio-level`` header extension stays empty even where a peer negotiated it. Tests watch
the wire through ``RTCDtlsTransport._handle_rtp_data``, which gets every RTP packet after SRTP
with its header exactly as it crossed.

tests/test_aiortc_internals.py fails with a clear message if any of these seams move, and
pyproject.toml pins aiortc to the minor version they were read from.
"""

from collections import deque
from collections.abc import Awaitable, Callable

from aiortc import RTCDtlsTransport, RTCRtpReceiver, RTCRtpSender
from aiortc.codecs.opus import SAMPLES_PER_FRAME as OPUS_SAMPLES_PER_FRAME
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import PACKET_MAX as VP8_PACKET_MAX
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpsender import RTCEncodedFrame
from aiortc.rtp import RtpPacket

from signaling.media_adapter import SDP_ERRORS as HUB_SDP_ERRORS

FrameTransform = Callable[[bytes], bytes | None]
"""Takes one encoded frame; returns the bytes to pass on, or None to pass nothing on."""

PacketObserver = Callable[[RtpPacket], None]
"""Sees each RTP packet a receiver gets (after SRTP, before RTX unwrapping); must not alter it."""

HoldingTransform = Callable[[bytes, int], bytes | None]
"""Takes one encoded frame and its RTP timestamp; returns the bytes to pass on, or None to pass
nothing on now (the frame is dropped, or held and handed to the receiver's ``LateDelivery``)."""

RtpDataObserver = Callable[[bytes], None]
"""Sees each RTP packet a transport gets, as bytes after SRTP: the header and its extensions
exactly as they crossed the wire in clear, then the payload SRTP decrypted."""

SUPPORTED_CODECS = frozenset({"opus", "VP8"})

# Name-mangled private attributes of aiortc 1.16 that the adapters rely on.
RECEIVER_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
RECEIVER_DECODER_ERROR = "_RTCRtpReceiver__decoder_error"
SENDER_ENCODER = "_RTCRtpSender__encoder"
RECEIVER_CODECS = "_RTCRtpReceiver__codecs"
RECEIVER_DECODER_QUEUE = "_RTCRtpReceiver__decoder_queue"
RECEIVER_DECODER_THREAD = "_RTCRtpReceiver__decoder_thread"
RECEIVER_TIMESTAMP_MAPPER = "_RTCRtpReceiver__timestamp_mapper"

# What aiortc raises for SDP it cannot apply: the hub's adapter reads it from aiortc too, and
# the hub cannot import the client, so the one definition is there.
SDP_ERRORS = HUB_SDP_ERRORS


class UnsupportedCodecError(ValueError):
    """A sender with a frame transform was asked to send a codec the transform cannot frame,
    or the encoder's payloads are not laid out as the transform expects.

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
    pending: deque[RTCEncodedFrame] = deque()

    async def next_transformed_frame(codec: RTCRtpCodecParameters) -> RTCEncodedFrame | None:
        if pending:
            return pending.popleft()
        name = codec.name
        if name not in SUPPORTED_CODECS:
            raise UnsupportedCodecError(f"no frame transform for codec {name}")
        encoded = await next_encoded_frame(codec)
        if encoded is None:
            return None
        if name == "VP8":
            return _transform_vp8(encoded, transform)
        return _transform_opus(encoded, transform, pending)

    # Per instance on purpose: other senders in the process stay untouched.
    sender._next_encoded_frame = next_transformed_frame  # type: ignore[method-assign]


# aiortc's VP8 packetizer (Vp8Encoder._packetize, for encoded frames and av.Packets alike)
# starts every payload of a frame with the same 4-byte descriptor: X=1 with only I set, then
# the 15-bit picture ID (M=1); S=1 on the first payload only. The transformed frame is
# packetized again behind the same descriptor bytes.
VP8_DESCRIPTOR_LENGTH = 4
VP8_FIRST_DESCRIPTOR = b"\x90\x80"  # X=1, S=1, partition 0; only I
VP8_NEXT_DESCRIPTOR = b"\x80\x80"  # the same without S
VP8_PAYLOAD_SIZE = VP8_PACKET_MAX - VP8_DESCRIPTOR_LENGTH  # frame bytes in one payload


def _transform_vp8(encoded: RTCEncodedFrame, transform: FrameTransform) -> RTCEncodedFrame | None:
    payloads = encoded.payloads
    first = payloads[0]
    if not (first.startswith(VP8_FIRST_DESCRIPTOR) and first[2] & 0x80):
        raise UnsupportedCodecError(f"unexpected VP8 payload descriptor {first[:4].hex()}")
    if len(payloads) == 1:
        frame = first[VP8_DESCRIPTOR_LENGTH:]
    else:
        following = VP8_NEXT_DESCRIPTOR + first[2:VP8_DESCRIPTOR_LENGTH]
        # A loop, not all() over a generator: one frame object fewer, once a frame.
        for payload in payloads[1:]:
            if not payload.startswith(following):
                raise UnsupportedCodecError("VP8 payload descriptors differ inside one frame")
        frame = b"".join([payload[VP8_DESCRIPTOR_LENGTH:] for payload in payloads])
    transformed = transform(frame)
    if transformed is None:
        return None
    size = VP8_PAYLOAD_SIZE
    if len(transformed) <= size:
        encoded.payloads = [first[:VP8_DESCRIPTOR_LENGTH] + transformed]
    else:
        following = VP8_NEXT_DESCRIPTOR + first[2:VP8_DESCRIPTOR_LENGTH]
        encoded.payloads = [first[:VP8_DESCRIPTOR_LENGTH] + transformed[:size]] + [
            following + transformed[start : start + size]
            for start in range(size, len(transformed), size)
        ]
    return encoded


def _transform_opus(
    encoded: RTCEncodedFrame, transform: FrameTransform, pending: deque[RTCEncodedFrame]
) -> RTCEncodedFrame | None:
    """The first transformed frame (in ``encoded`` itself); any further ones go to ``pending``."""
    # aiortc sends every Opus packet of one encode call with the same RTP timestamp, and the
    # receiver glues same-timestamp packets together. Each packet is a frame of its own, so it
    # gets its own timestamp here, and the receiver sees exactly the frame that was transformed.
    payloads = encoded.payloads
    transformed = transform(payloads[0])
    for index in range(1, len(payloads)):
        further = transform(payloads[index])
        if further is not None:
            timestamp = encoded.timestamp + index * OPUS_SAMPLES_PER_FRAME
            pending.append(RTCEncodedFrame([further], timestamp, None))  # type: ignore[arg-type]
    # No audio level on any frame: it is measured on the plaintext and would travel in clear
    # (ssrc-audio-level). aiortc annotates it as int, but its own None (for video) means none.
    encoded.audio_level = None  # type: ignore[assignment]
    if transformed is None:
        return pending.popleft() if pending else None
    encoded.payloads = [transformed]
    return encoded


def install_receiver_transform(receiver: RTCRtpReceiver, transform: FrameTransform) -> None:
    """Run ``transform`` on every frame ``receiver`` reassembles, before it is decoded.

    Must be called before the first packet arrives (before ``setRemoteDescription`` completes).
    """
    jitter_buffer: JitterBuffer = getattr(receiver, RECEIVER_JITTER_BUFFER)
    if "add" in vars(jitter_buffer):
        raise TransformAlreadyInstalledError("this receiver already has a frame transform")
    add = jitter_buffer.add

    def add_and_transform(packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        pli_flag, frame = add(packet)
        if frame is not None:
            transformed = transform(frame.data)
            if transformed is None:
                return pli_flag, None
            frame.data = transformed
        return pli_flag, frame

    # Per instance on purpose, as for the sender.
    jitter_buffer.add = add_and_transform  # type: ignore[method-assign]


class LateDelivery:
    """Passes a frame that a holding transform withheld to its receiver's decoder, later.

    Called in the event loop's thread, like the transform. A frame is passed on only once the
    receiver has decoded before (it knows the payload type) and while its decoder runs.
    """

    def __init__(self, receiver: RTCRtpReceiver) -> None:
        self._receiver = receiver
        self.payload_type: int | None = None  # of the last frame the receiver reassembled

    def __call__(self, frame: bytes, timestamp: int) -> bool:
        """Queue ``frame`` (RTP timestamp ``timestamp``) for decoding; False if it cannot be."""
        receiver = self._receiver
        codec = getattr(receiver, RECEIVER_CODECS).get(self.payload_type)
        if codec is None or getattr(receiver, RECEIVER_DECODER_THREAD) is None:
            return False
        mapped = getattr(receiver, RECEIVER_TIMESTAMP_MAPPER).map(timestamp)
        getattr(receiver, RECEIVER_DECODER_QUEUE).put((codec, JitterFrame(frame, mapped)))
        return True


def install_holding_receiver_transform(
    receiver: RTCRtpReceiver, transform: HoldingTransform
) -> LateDelivery:
    """Run ``transform`` on every frame ``receiver`` reassembles, with its RTP timestamp;
    return what passes the frames it held on later. The same rules as
    ``install_receiver_transform``."""
    jitter_buffer: JitterBuffer = getattr(receiver, RECEIVER_JITTER_BUFFER)
    if "add" in vars(jitter_buffer):
        raise TransformAlreadyInstalledError("this receiver already has a frame transform")
    add = jitter_buffer.add
    late = LateDelivery(receiver)

    def add_and_transform(packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        pli_flag, frame = add(packet)
        if frame is not None:
            late.payload_type = packet.payload_type
            transformed = transform(frame.data, frame.timestamp)
            if transformed is None:
                return pli_flag, None
            frame.data = transformed
        return pli_flag, frame

    jitter_buffer.add = add_and_transform  # type: ignore[method-assign]
    return late


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
