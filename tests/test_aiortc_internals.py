"""The aiortc internals client/frame_transform.py relies on, checked loudly.

If aiortc moves one of these seams, the structural tests below say which one and what to
re-read; the loopback tests then prove the adapter still sees exactly whole frames.
"""

import fractions
import inspect
import random
import struct
from array import array
from collections import Counter, deque
from collections.abc import Callable

import aiortc
import av
import pytest
from aiortc import RTCDtlsTransport, RTCRtpReceiver, RTCRtpSender
from aiortc.codecs import HEADER_EXTENSIONS, vpx
from aiortc.codecs.opus import SAMPLES_PER_FRAME as OPUS_SAMPLES_PER_FRAME
from aiortc.codecs.opus import OpusEncoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpsender import RTCEncodedFrame
from aiortc.rtp import RTCP_PSFB_PLI, AnyRtcpPacket, RtcpPsfbPacket

from client import frame_transform
from client.frame_transform import (
    SENDER_ENCODER,
    EncoderAlreadyChosenError,
    LateDelivery,
    TransformAlreadyInstalledError,
    install_constant_bitrate_opus,
    install_holding_receiver_transform,
    install_receiver_transform,
    install_sender_transform,
    request_keyframe,
)
from client.media import PatternTrack, ToneTrack
from client.rtp_policy import AUDIO_BITRATE, AUDIO_LEVEL
from tests.conftest import wait_for
from tests.rtp_wire import RawTap

TESTED_VERSIONS = ("1.16.",)
REREAD = "re-read aiortc's rtcrtpsender.py / rtcrtpreceiver.py and update client/frame_transform.py"


def source_of(function) -> str:
    return inspect.getsource(function)


def test_aiortc_version_is_one_the_adapter_was_written_for():
    assert aiortc.__version__.startswith(TESTED_VERSIONS), (
        f"aiortc {aiortc.__version__} is untested: {REREAD}"
    )


def test_sender_fetches_every_frame_through_next_encoded_frame():
    run_rtp = source_of(RTCRtpSender._run_rtp)
    assert "await self._next_encoded_frame(codec)" in run_rtp, (
        f"RTCRtpSender._run_rtp no longer calls self._next_encoded_frame: {REREAD}"
    )
    assert "enc_frame.payloads" in run_rtp and "enc_frame.timestamp" in run_rtp, (
        f"RTCRtpSender._run_rtp no longer packetizes RTCEncodedFrame.payloads: {REREAD}"
    )
    assert list(inspect.signature(RTCEncodedFrame).parameters) == [
        "payloads",
        "timestamp",
        "audio_level",
    ], f"RTCEncodedFrame changed shape: {REREAD}"
    next_frame = source_of(RTCRtpSender._next_encoded_frame)
    assert ".encode" in next_frame and ".pack(data)" in next_frame, (
        f"_next_encoded_frame no longer covers both encoder and av.Packet paths: {REREAD}"
    )


def test_retransmissions_resend_the_packets_built_from_transformed_frames():
    run_rtp = source_of(RTCRtpSender._run_rtp)
    retransmit = source_of(RTCRtpSender._retransmit)
    assert "self.__rtp_history[" in run_rtp and "packet.payload = payload" in run_rtp, (
        f"the RTP history is no longer filled from the encoded frame's payloads: {REREAD}"
    )
    assert "self.__rtp_history.get(" in retransmit and "encode" not in retransmit, (
        f"_retransmit no longer resends only packets from the RTP history: {REREAD}"
    )


def test_receiver_decodes_only_what_the_jitter_buffer_returns():
    handle = source_of(RTCRtpReceiver._handle_rtp_packet)
    assert "self.__jitter_buffer.add(packet)" in handle, (
        f"RTCRtpReceiver no longer reassembles frames with its jitter buffer: {REREAD}"
    )
    assert "self.__decoder_queue.put((codec, encoded_frame))" in handle, (
        f"RTCRtpReceiver no longer queues the jitter buffer's frame for decoding: {REREAD}"
    )
    assert handle.count("__decoder_queue.put") == 1, (
        f"RTCRtpReceiver queues frames for decoding from a second place: {REREAD}"
    )
    assert "self.__decoder_error.is_set()" in handle and "pli_flag = True" in handle, (
        f"RTCRtpReceiver no longer turns its decoder-error flag into a PLI: {REREAD}"
    )
    assert list(inspect.signature(JitterBuffer.add).parameters) == ["self", "packet"]
    assert list(inspect.signature(JitterFrame).parameters) == ["data", "timestamp"]


def test_vp8_packetizer_writes_the_descriptor_layout_the_adapter_reframes():
    # The adapter takes the frame out of the encoder's VP8 payloads and packetizes the
    # transformed frame behind the same descriptors, assuming Vp8Encoder._packetize's layout
    # (frame_transform.VP8_FIRST_DESCRIPTOR): it must give exactly what the packetizer would
    # have given for the transformed frame, at every picture ID and around every size limit.
    for method in (vpx.Vp8Encoder.encode, vpx.Vp8Encoder.pack):
        assert "self._packetize(" in source_of(method), (
            f"Vp8Encoder.{method.__name__} no longer packetizes with Vp8Encoder._packetize: "
            f"{REREAD}"
        )
    size = vpx.PACKET_MAX - frame_transform.VP8_DESCRIPTOR_LENGTH
    seen: list[bytes] = []

    def grow(frame: bytes) -> bytes:
        seen.append(frame)
        return frame + b"\xee" * 17

    for picture_id in (0, 1, 127, 128, 32767):
        for length in (1, size - 17, size - 16, size, size + 1, 3 * size + 5):
            frame = bytes(range(256)) * (length // 256) + bytes(length % 256)
            encoded = RTCEncodedFrame(vpx.Vp8Encoder._packetize(frame, picture_id), 0, 0)
            result = frame_transform._transform_vp8(encoded, grow)
            assert seen.pop() == frame, f"the VP8 depacketization moved: {REREAD}"
            assert result is not None
            assert result.payloads == vpx.Vp8Encoder._packetize(grow(frame), picture_id), (
                f"Vp8Encoder._packetize's descriptor layout moved: {REREAD}"
            )


def test_pre_encoded_vp8_packets_are_reframed_the_same_way():
    # A track may yield encoded av.Packets; the sender then packs them (Vp8Encoder.pack).
    encoder = vpx.Vp8Encoder()
    packet = av.Packet(bytes(range(256)) * 9)
    packet.pts, packet.time_base = 0, fractions.Fraction(1, 90000)
    picture_id = encoder.picture_id
    payloads, _ = encoder.pack(packet)
    result = frame_transform._transform_vp8(RTCEncodedFrame(payloads, 0, 0), lambda f: f[::-1])
    assert result is not None
    assert result.payloads == vpx.Vp8Encoder._packetize(bytes(packet)[::-1], picture_id)


def test_vp8_payloads_in_another_layout_stop_the_sender():
    # Raised inside aiortc's sending task, the error stops the sender: nothing goes out.
    frame = bytes(3000)
    for payloads in (
        [b"\x10" + frame],  # no extended control bits
        [bytes(vpx.VpxPayloadDescriptor(1, 0, picture_id=5, tl0picidx=1)) + frame],
        [*vpx.Vp8Encoder._packetize(frame, 5)[:1], *vpx.Vp8Encoder._packetize(frame, 6)[1:]],
    ):
        with pytest.raises(frame_transform.UnsupportedCodecError):
            frame_transform._transform_vp8(RTCEncodedFrame(payloads, 0, 0), bytes)


def test_opus_frames_encoded_together_are_sent_one_by_one():
    pending: deque[RTCEncodedFrame] = deque()
    encoded = RTCEncodedFrame([b"a", b"b", b"c"], 1000, 7)
    first = frame_transform._transform_opus(encoded, lambda frame: frame.upper(), pending)
    assert first is encoded and first.payloads == [b"A"] and first.timestamp == 1000
    # The encoder's audio level (7) is measured on the plaintext: no frame keeps it.
    assert first.audio_level is None
    assert [(f.payloads, f.timestamp, f.audio_level) for f in pending] == [
        ([b"B"], 1000 + OPUS_SAMPLES_PER_FRAME, None),
        ([b"C"], 1000 + 2 * OPUS_SAMPLES_PER_FRAME, None),
    ]
    pending.clear()
    encoded = RTCEncodedFrame([b"a", b"b"], 1000, 0)
    first = frame_transform._transform_opus(encoded, lambda f: None if f == b"a" else f, pending)
    assert first is not None and first.payloads == [b"b"] and not pending
    assert frame_transform._transform_opus(encoded, lambda frame: None, pending) is None


@pytest.mark.slow
async def test_private_attributes_exist_on_live_instances(loopback):
    def check(side):
        receiver = side.receivers["video"]
        jitter_buffer = getattr(receiver, frame_transform.RECEIVER_JITTER_BUFFER, None)
        assert isinstance(jitter_buffer, JitterBuffer), (
            f"{frame_transform.RECEIVER_JITTER_BUFFER} is gone: {REREAD}"
        )
        decoder_error = getattr(receiver, frame_transform.RECEIVER_DECODER_ERROR, None)
        assert hasattr(decoder_error, "set"), (
            f"{frame_transform.RECEIVER_DECODER_ERROR} is gone: {REREAD}"
        )
        # What LateDelivery uses to queue a held frame as the receiver itself would.
        for name, has in (
            (frame_transform.RECEIVER_CODECS, "get"),
            (frame_transform.RECEIVER_DECODER_QUEUE, "put"),
            (frame_transform.RECEIVER_TIMESTAMP_MAPPER, "map"),
        ):
            assert hasattr(getattr(receiver, name, None), has), f"{name} is gone: {REREAD}"
        assert hasattr(receiver, frame_transform.RECEIVER_DECODER_THREAD), (
            f"{frame_transform.RECEIVER_DECODER_THREAD} is gone: {REREAD}"
        )

    await loopback.connect([PatternTrack()], [], prepare=check)


MAGIC = b"XFRM"


class Reversing:
    """A reversible transform that makes frames undecodable until undone, and records them."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.produced: list[bytes] = []

    def protect(self, frame: bytes) -> bytes:
        self.seen.append(frame)
        out = MAGIC + struct.pack("!I", len(self.produced)) + frame[::-1]
        self.produced.append(out)
        return out

    def unprotect(self, frame: bytes) -> bytes | None:
        self.seen.append(frame)
        if not frame.startswith(MAGIC):
            return None
        return frame[8:][::-1]


@pytest.mark.slow
async def test_transforms_see_whole_frames_at_the_right_boundaries(loopback):
    senders = {"audio": Reversing(), "video": Reversing()}
    receivers = {"audio": Reversing(), "video": Reversing()}

    def prepare(side):
        if side.senders["audio"].track is not None:
            for kind in ("audio", "video"):
                install_sender_transform(side.senders[kind], senders[kind].protect)
        else:
            for kind in ("audio", "video"):
                install_receiver_transform(side.receivers[kind], receivers[kind].unprotect)

    _, answerer = await loopback.connect([ToneTrack(440), PatternTrack()], [], prepare=prepare)
    await wait_for(lambda: len(answerer.received.pattern_numbers) >= 10)

    # The sender saw whole VP8 frames: the first is a keyframe with the VP8 start code.
    first_video = senders["video"].seen[0]
    assert first_video[0] & 1 == 0 and first_video[3:6] == b"\x9d\x01\x2a"
    # Every frame the receiver reassembled is exactly one frame a sender produced.
    for kind in ("audio", "video"):
        assert receivers[kind].seen, kind
        assert set(receivers[kind].seen) <= set(senders[kind].produced), kind
    # Undone at the right boundary, video decodes to increasing frame numbers.
    numbers = answerer.received.pattern_numbers
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    # Every RTP payload carries the transformed bytes, never the encoder's own.
    audio_payloads = [packet.payload for packet in answerer.wire["audio"]]
    assert audio_payloads and all(p.startswith(MAGIC) for p in audio_payloads)
    video_starts = [
        vpx.vp8_depayload(packet.payload)
        for packet in answerer.wire["video"]
        if packet.payload_type == answerer.wire["video"][0].payload_type
        and vpx.VpxPayloadDescriptor.parse(packet.payload)[0].partition_start
    ]
    assert video_starts and all(p.startswith(MAGIC) for p in video_starts)


@pytest.mark.slow
async def test_held_frames_reach_the_decoder_when_delivered_late(loopback):
    # A receiver holds the first 25 audio frames (their key "has not come"), then passes them
    # on through LateDelivery: the decoder gets every one of them, late, and then the rest.
    held: list[tuple[bytes, int]] = []
    deliveries: list[LateDelivery] = []

    def holding(frame: bytes, timestamp: int) -> bytes | None:
        if len(held) < 25:
            held.append((frame, timestamp))
            return None
        return frame

    def prepare(side):
        if side.senders["audio"].track is None:
            deliveries.append(install_holding_receiver_transform(side.receivers["audio"], holding))

    _, answerer = await loopback.connect([ToneTrack(440)], [], prepare=prepare)
    await wait_for(lambda: len(held) == 25)
    assert answerer.received.audio_frames == 0
    [late] = deliveries
    assert all(late(frame, timestamp) for frame, timestamp in held)
    await wait_for(lambda: answerer.received.audio_frames >= 25 + 10)
    # Nothing is queued for a receiver that has not decoded a frame yet.
    assert not LateDelivery(RTCRtpReceiver("audio", answerer.receivers["audio"].transport))(
        held[0][0], held[0][1]
    )


@pytest.mark.slow
async def test_dropping_frames_sends_nothing_and_decodes_nothing(loopback):
    dropped: Counter[tuple[str, str]] = Counter()

    def dropping(role: str, kind: str) -> Callable[[bytes], None]:
        def drop(frame: bytes) -> None:
            dropped[role, kind] += 1

        return drop

    def prepare(side):
        for kind in ("audio", "video"):
            if side.senders[kind].track is not None:
                install_sender_transform(side.senders[kind], dropping(side.role, kind))
            install_receiver_transform(side.receivers[kind], lambda frame: None)

    offerer, answerer = await loopback.connect(
        [ToneTrack(440), PatternTrack()], [ToneTrack(660), PatternTrack()], prepare=prepare
    )
    # A second of each side's encoded audio, and 20 video frames, all dropped: had any of it
    # gone out, it would have crossed the loopback by now.
    await wait_for(
        lambda: all(
            dropped[side.role, "audio"] >= 50 and dropped[side.role, "video"] >= 20
            for side in (offerer, answerer)
        )
    )
    for side in (offerer, answerer):
        assert side.wire["audio"] == [] and side.wire["video"] == []
        assert side.received.audio_frames == 0 and side.received.video_frames == 0


@pytest.mark.slow
async def test_receiver_drop_reaches_no_decoder_and_requests_keyframes(loopback):
    # The sender's encoder makes keyframes of its own now and then (a new target bitrate restarts
    # it), so counting keyframes alone cannot show the requests work. The PLIs can: nothing
    # reaches the refusing receiver's decoder to fail, so without request_keyframe it sends none.
    plis: list[RtcpPsfbPacket] = []
    keyframes_after_a_pli = 0
    video_sender = Reversing()
    senders: list[RTCRtpSender] = []

    def count_keyframes(frame: bytes) -> bytes:
        nonlocal keyframes_after_a_pli
        keyframes_after_a_pli += bool(plis) and frame[0] & 1 == 0
        return video_sender.protect(frame)

    def count_plis(sender: RTCRtpSender) -> None:
        handle_rtcp_packet = sender._handle_rtcp_packet

        async def observe_rtcp_packet(packet: AnyRtcpPacket) -> None:
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_PLI:
                plis.append(packet)
            await handle_rtcp_packet(packet)

        sender._handle_rtcp_packet = observe_rtcp_packet  # type: ignore[method-assign]

    def prepare(side):
        if side.senders["video"].track is not None:
            senders.append(side.senders["video"])
            install_sender_transform(side.senders["video"], count_keyframes)
            count_plis(side.senders["video"])
        else:
            receiver = side.receivers["video"]

            def refuse(frame: bytes) -> None:
                request_keyframe(receiver)
                return None

            install_receiver_transform(receiver, refuse)

    _, answerer = await loopback.connect([PatternTrack()], [], prepare=prepare)
    # The sender got the receiver's PLIs for its own stream and answered them with keyframes.
    await wait_for(lambda: len(plis) >= 3 and keyframes_after_a_pli >= 3)
    assert {pli.media_ssrc for pli in plis} == {senders[0]._ssrc}
    assert answerer.received.video_frames == 0


@pytest.mark.slow
async def test_a_second_transform_is_refused(loopback):
    errors = []

    def prepare(side):
        for install, target in (
            (install_sender_transform, side.senders["audio"]),
            (install_receiver_transform, side.receivers["audio"]),
        ):
            install(target, bytes)
            with pytest.raises(TransformAlreadyInstalledError) as info:
                install(target, bytes)
            errors.append(info.value)

    await loopback.connect([ToneTrack()], [], prepare=prepare)
    assert len(errors) == 4


@pytest.mark.slow
async def test_retransmissions_carry_transformed_payloads(loopback):
    def prepare(side):
        if side.senders["video"].track is not None:
            install_sender_transform(side.senders["video"], Reversing().protect)

    offerer, answerer = await loopback.connect([PatternTrack()], [], prepare=prepare)
    await wait_for(lambda: len(answerer.wire["video"]) >= 5)
    video = answerer.wire["video"]
    original = next(
        p for p in video if vpx.VpxPayloadDescriptor.parse(p.payload)[0].partition_start
    )
    # What a NACK from the receiver triggers (RTCRtpSender._handle_rtcp_packet).
    await offerer.senders["video"]._retransmit(original.sequence_number)
    await wait_for(lambda: any(p.payload_type != original.payload_type for p in video))
    rtx = next(p for p in video if p.payload_type != original.payload_type)
    assert rtx.payload[2:] == original.payload
    assert vpx.vp8_depayload(rtx.payload[2:]).startswith(MAGIC)


# -- what an audio sender shows in clear: its encoder and the audio level


def test_sender_makes_its_encoder_only_when_it_has_none():
    next_frame = source_of(RTCRtpSender._next_encoded_frame)
    assert "if self.__encoder is None:" in next_frame, (
        f"RTCRtpSender no longer keeps an encoder it was given ({SENDER_ENCODER}): {REREAD}"
    )
    assert "self.__encoder.encode" in next_frame, (
        f"RTCRtpSender no longer encodes with {SENDER_ENCODER}: {REREAD}"
    )


def test_opus_encoder_is_configured_through_its_codec_context():
    encoder = OpusEncoder()
    assert encoder.codec.name == "libopus" and "application" in encoder.codec.options, (
        f"aiortc's OpusEncoder changed how it configures libopus: {REREAD}"
    )


def test_a_constant_bitrate_encoder_makes_one_size_for_any_audio():
    encoder = frame_transform._ConstantBitrateOpusEncoder(AUDIO_BITRATE)
    noise = random.Random(0)
    loud = [array("h", (noise.randint(-20000, 20000) for _ in range(960))) for _ in range(25)]
    silent = [array("h", bytes(1920)) for _ in range(25)]
    sizes = set()
    for index, samples in enumerate(loud + silent + loud):
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(samples.tobytes())
        frame.pts, frame.sample_rate = index * 960, 48000
        frame.time_base = fractions.Fraction(1, 48000)
        sizes |= {len(payload) for payload in encoder.encode(frame)[0]}
    assert sizes == {AUDIO_BITRATE // 8 // 50}


def test_the_audio_level_travels_only_in_the_encoded_frame():
    run_rtp = source_of(RTCRtpSender._run_rtp)
    assert "packet.extensions.audio_level = (False, -enc_frame.audio_level)" in run_rtp, (
        f"RTCRtpSender no longer takes the audio level from RTCEncodedFrame: {REREAD}"
    )
    assert run_rtp.count("extensions.audio_level") == 1, (
        f"RTCRtpSender sets the audio level from a second place: {REREAD}"
    )


def test_transport_hands_every_rtp_packet_to_handle_rtp_data():
    recv_next = source_of(RTCDtlsTransport._recv_next)
    assert "data = self._rx_srtp.unprotect(data)" in recv_next, REREAD
    assert "await self._handle_rtp_data(data, arrival_time_ms=arrival_time_ms)" in recv_next, (
        f"RTCDtlsTransport no longer passes each RTP packet to _handle_rtp_data: {REREAD}"
    )
    assert list(inspect.signature(RTCDtlsTransport._handle_rtp_data).parameters) == [
        "self",
        "data",
        "arrival_time_ms",
    ]


async def test_a_started_sender_keeps_its_encoder(loopback):
    offerer, _ = await loopback.connect([ToneTrack()], [])
    sender = offerer.senders["audio"]
    await wait_for(lambda: getattr(sender, SENDER_ENCODER) is not None)
    with pytest.raises(EncoderAlreadyChosenError):
        install_constant_bitrate_opus(sender, AUDIO_BITRATE)


async def test_transformed_audio_carries_no_level_even_where_one_was_negotiated(loopback):
    # Plain aiortc on both sides negotiates ssrc-audio-level; only the offerer's audio goes
    # through a frame transform, whose frames carry no level: none crosses the wire.
    taps = {"offerer": RawTap(), "answerer": RawTap()}
    level_id = next(e.id for e in HEADER_EXTENSIONS["audio"] if e.uri == AUDIO_LEVEL)

    def prepare(side):
        taps[side.role].install(side.pc)
        if side.role == "offerer":
            install_sender_transform(side.senders["audio"], Reversing().protect)

    await loopback.connect([ToneTrack(440)], [ToneTrack(660)], prepare=prepare)
    await wait_for(lambda: all(len(tap.of_kind("audio")) >= 25 for tap in taps.values()))
    transformed, control = taps["answerer"].of_kind("audio"), taps["offerer"].of_kind("audio")
    assert all(key != level_id for packet in transformed for key, _ in packet.extensions)
    assert all(level_id in dict(packet.extensions) for packet in control)
