"""The dtls-mitm capability against real aiortc calls on loopback.

Two plain aiortc peers exchange their offer and answer through a `MediaMitm`, as a hostile hub
relaying SDP would. Against plain WebRTC the MITM must keep the call working and recover its
audio and video (the experiment's control); against peers that SFrame-encrypt every frame the
call must still work while the MITM recovers nothing but SFrame headers.
"""

import logging
import os
import re
import struct
import wave
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import av
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.experiment.analysis import dominant_frequency, middle_second, tone_correlation
from client.experiment.hostile_hub import SFrameRelay
from client.experiment.media_mitm import (
    Direction,
    InterceptionStateError,
    MediaMitm,
    MediaTamper,
    RelayTransform,
    SdpRejected,
    TamperCounts,
    decode_opus,
    decode_vp8,
    is_vp8_keyframe,
    media_kinds,
    write_wav,
)
from client.frame_transform import install_receiver_transform, install_sender_transform
from client.media import PatternTrack, ToneTrack, read_pattern_number
from crypto.frame_crypto import MediaKey, SFrameReceiver, SFrameSender, apply_key_update
from crypto.handshake import HandshakeResult
from crypto.identity import IdentityKey
from crypto.sframe import SFrameHeader
from tests.conftest import LoopbackCalls, LoopbackSide, Prepare, wait_for
from tests.test_hostile_hub import agree

OFFERER_TONE = 440.0
ANSWERER_TONE = 660.0
SAMPLE_RATE = 48000
# Enough received audio for a dominant-frequency estimate with margin, and some video.
WANTED_SAMPLES = SAMPLE_RATE
WANTED_VIDEO_FRAMES = 10
CALL_TIMEOUT = 30.0  # generous: two shared cores, several engineers

slow = pytest.mark.slow


@dataclass
class ThroughMitm:
    """The SDP path of a hostile hub that puts a ``MediaMitm`` in the call: each side gets the
    MITM's description instead of the other side's. Keeps all four descriptions."""

    mitm: MediaMitm
    offer_sdp: str = ""
    mitm_offer_sdp: str = ""
    answer_sdp: str = ""
    mitm_answer_sdp: str = ""

    async def offer(self, sdp: str) -> str:
        self.offer_sdp = sdp
        self.mitm_offer_sdp = await self.mitm.intercept_offer(sdp)
        return self.mitm_offer_sdp

    async def answer(self, sdp: str) -> str:
        self.answer_sdp = sdp
        self.mitm_answer_sdp = await self.mitm.intercept_answer(sdp)
        # The hub passes the answer on late: once the answerer's video reaches the MITM, which
        # has no leg toward the offerer yet, so that leg must start from a keyframe requested
        # late.
        await wait_for(
            lambda: self.mitm.intercepted(Direction.ANSWERER_TO_OFFERER, "video") != [],
            CALL_TIMEOUT,
        )
        return self.mitm_answer_sdp


@dataclass
class MitmCall:
    offerer: LoopbackSide
    answerer: LoopbackSide
    sdp: ThroughMitm


class CallsThroughMitm:
    """Loopback calls (the offerer sends a tone and the pattern, the answerer another tone and
    the pattern) whose offer and answer go through a ``MediaMitm``."""

    def __init__(self, loopback: LoopbackCalls) -> None:
        self.mitm: MediaMitm | None = None
        self._loopback = loopback

    async def connect(
        self, prepare: Prepare | None = None, relay_transform: RelayTransform | None = None
    ) -> MitmCall:
        self.mitm = MediaMitm(relay_transform=relay_transform)
        sdp = ThroughMitm(self.mitm)
        offerer, answerer = await self._loopback.connect(
            [ToneTrack(OFFERER_TONE), PatternTrack()],
            [ToneTrack(ANSWERER_TONE), PatternTrack()],
            prepare,
            sdp,
        )
        return MitmCall(offerer, answerer, sdp)

    async def run_until_both_received(self, call: MitmCall) -> None:
        await wait_for(
            lambda: all(
                len(side.received.samples) >= WANTED_SAMPLES
                and side.received.video_frames >= WANTED_VIDEO_FRAMES
                for side in (call.offerer, call.answerer)
            ),
            CALL_TIMEOUT,
        )

    async def close(self) -> None:
        if self.mitm is not None:
            await self.mitm.close()


@pytest.fixture
async def calls(loopback: LoopbackCalls) -> AsyncIterator[CallsThroughMitm]:
    # Torn down before ``loopback``: the MITM closes before the peers, as a hub would go first.
    calls = CallsThroughMitm(loopback)
    yield calls
    await calls.close()


def fingerprints(sdp: str) -> set[str]:
    return set(re.findall(r"^a=fingerprint:(.+)$", sdp, re.MULTILINE))


def assert_both_peers_hear_and_see_each_other(call: MitmCall) -> None:
    heard_by_answerer = dominant_frequency(call.answerer.received.samples, SAMPLE_RATE)
    heard_by_offerer = dominant_frequency(call.offerer.received.samples, SAMPLE_RATE)
    assert abs(heard_by_answerer - OFFERER_TONE) < 5
    assert abs(heard_by_offerer - ANSWERER_TONE) < 5
    assert call.offerer.received.pattern_numbers and call.answerer.received.pattern_numbers


def assert_every_frame_authenticated(receivers: Iterable[SFrameReceiver]) -> None:
    for receiver in receivers:
        assert [c.frames > 0 and c.failed == 0 for c in receiver.counters.values()] == [True] * 2


@slow
async def test_plain_call_through_mitm_works_and_the_mitm_recovers_it(calls, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="aiortc.rtcrtpreceiver")
    call = await calls.connect()
    mitm = calls.mitm
    assert mitm is not None
    await calls.run_until_both_received(call)

    # Each peer ran DTLS with the MITM, not with the other peer.
    sdp = call.sdp
    assert fingerprints(sdp.mitm_offer_sdp).isdisjoint(fingerprints(sdp.offer_sdp))
    assert fingerprints(sdp.mitm_answer_sdp).isdisjoint(fingerprints(sdp.answer_sdp))
    assert mitm.connection_states == ("connected", "connected")

    # The call works: each side hears the other's tone and decodes the other's pattern.
    heard_by_answerer = dominant_frequency(call.answerer.received.samples, SAMPLE_RATE)
    heard_by_offerer = dominant_frequency(call.offerer.received.samples, SAMPLE_RATE)
    assert abs(heard_by_answerer - OFFERER_TONE) < 5
    assert abs(heard_by_offerer - ANSWERER_TONE) < 5
    for peer in (call.offerer, call.answerer):
        numbers = peer.received.pattern_numbers
        assert numbers and numbers == sorted(numbers)
    # The answerer's first frames found no leg to go to; the offerer's decoder still started, from
    # the keyframe the MITM requested when that leg came up.
    assert call.offerer.received.pattern_numbers[0] > 0
    assert not all(f.forwarded for f in mitm.frames if f.direction is Direction.ANSWERER_TO_OFFERER)
    # ... and never saw a frame it could not decode: no trace of the MITM there.
    assert not [r for r in caplog.records if "failed to decode" in r.getMessage()]

    # The MITM recovers both directions' audio and video.
    recovered = {}
    for direction, tone in (
        (Direction.OFFERER_TO_ANSWERER, OFFERER_TONE),
        (Direction.ANSWERER_TO_OFFERER, ANSWERER_TONE),
    ):
        audio = mitm.recovered_audio(direction)
        assert audio.frames_failed == 0
        assert audio.seconds >= 1
        assert tone_correlation(middle_second(audio.samples, SAMPLE_RATE), SAMPLE_RATE, tone) >= 0.9
        assert abs(dominant_frequency(audio.samples, SAMPLE_RATE) - tone) < 5
        video = mitm.recovered_video(direction)
        assert video.frames_decoded >= WANTED_VIDEO_FRAMES
        assert video.last_frame is not None
        assert read_pattern_number(video.last_frame) is not None
        recovered[direction] = audio

    # What it forwarded is what SRTP gave it: each Opus frame is one RTP payload, and only the
    # last few payloads can still sit in the jitter buffer.
    assert any(frame.forwarded for frame in mitm.frames)
    for direction in Direction:
        payloads = [
            p.payload for p in mitm.packets if p.direction is direction and p.kind == "audio"
        ]
        frames = mitm.intercepted(direction, "audio")
        assert set(frames) <= set(payloads)
        assert 0 <= len(payloads) - len(frames) <= 8

    wav_path = tmp_path / "offerer.wav"
    audio = recovered[Direction.OFFERER_TO_ANSWERER]
    write_wav(wav_path, audio)
    with wave.open(str(wav_path)) as wav:
        assert (wav.getnchannels(), wav.getframerate()) == (1, SAMPLE_RATE)
        assert wav.getnframes() == len(audio.samples)
        assert struct.unpack(f"<{len(audio.samples)}h", wav.readframes(wav.getnframes())) == tuple(
            audio.samples
        )


# The key agreement gives each peer one sending KID and base key, for audio and video alike.
SFRAME_KIDS = {"offerer": 1, "answerer": 2}
SFRAME_BASE_KEYS = {1: bytes(range(16)), 2: bytes(range(100, 116))}


@dataclass
class SFramePeers:
    """A prepare hook giving both peers the client's SFrame transforms, and those transforms."""

    receivers: dict[str, SFrameReceiver] = field(default_factory=dict)

    def __call__(self, side: LoopbackSide) -> None:
        role = side.role
        other = "answerer" if role == "offerer" else "offerer"
        sender = SFrameSender()
        sender.use_key(MediaKey(0, SFRAME_KIDS[role], SFRAME_BASE_KEYS[SFRAME_KIDS[role]]))
        receiver = self.receivers[role] = SFrameReceiver()
        receiver.add_key(MediaKey(0, SFRAME_KIDS[other], SFRAME_BASE_KEYS[SFRAME_KIDS[other]]))
        for kind in ("audio", "video"):
            install_sender_transform(side.senders[kind], sender.transform(kind))
            install_receiver_transform(side.receivers[kind], receiver.transform(kind))


@slow
async def test_sframe_call_through_mitm_works_and_the_mitm_recovers_nothing(calls):
    sframe = SFramePeers()
    call = await calls.connect(prepare=sframe)
    mitm = calls.mitm
    assert mitm is not None
    await calls.run_until_both_received(call)

    assert_both_peers_hear_and_see_each_other(call)
    # Every frame the MITM relayed still authenticated at the peer.
    assert_every_frame_authenticated(sframe.receivers.values())

    for direction, tone, sender in (
        (Direction.OFFERER_TO_ANSWERER, OFFERER_TONE, "offerer"),
        (Direction.ANSWERER_TO_OFFERER, ANSWERER_TONE, "answerer"),
    ):
        # Its decoders get nothing usable from what SRTP gave it.
        audio = mitm.recovered_audio(direction)
        correlation = (
            tone_correlation(middle_second(audio.samples, SAMPLE_RATE), SAMPLE_RATE, tone)
            if audio.samples
            else 0
        )
        assert correlation < 0.1
        assert mitm.recovered_video(direction).frames_decoded == 0

        # What it can read: the SFrame headers, a KID per sender and counters that only grow.
        for kind in ("audio", "video"):
            frames = mitm.intercepted(direction, kind)
            assert len(frames) >= WANTED_VIDEO_FRAMES
            headers = [SFrameHeader.parse(frame) for frame in frames]
            assert {header.kid for header, _ in headers} == {SFRAME_KIDS[sender]}
            counters = [header.ctr for header, _ in headers]
            assert counters == sorted(set(counters))
            # Every frame is header + ciphertext + the suite's 16-byte tag, nothing in clear.
            assert all(
                len(frame) > length + 16 for frame, (_, length) in zip(frames, headers, strict=True)
            )


@dataclass
class KeyedPeers:
    """A prepare hook keying each peer's SFrame from its own key agreement (with the hub)."""

    results: dict[str, HandshakeResult]
    receivers: dict[str, SFrameReceiver] = field(default_factory=dict)

    def __call__(self, side: LoopbackSide) -> None:
        result = self.results[side.role]
        sender = SFrameSender(result.suite)
        receiver = self.receivers[side.role] = SFrameReceiver(result.suite)
        apply_key_update(result.initial_keys, sender, receiver)
        for kind in ("audio", "video"):
            install_sender_transform(side.senders[kind], sender.transform(kind))
            install_receiver_transform(side.receivers[kind], receiver.transform(kind))


@slow
async def test_a_mitm_holding_both_legs_keys_reencrypts_and_recovers_the_sframe_call(calls):
    # The keyswap: each peer agreed its keys with the hub, which holds both legs' keys.
    offerer, answerer, hub_a, hub_b = (IdentityKey.generate(os.urandom) for _ in range(4))
    offerer_result, hub_toward_offerer = agree(offerer, hub_a)
    hub_toward_answerer, answerer_result = agree(hub_b, answerer)
    peers = KeyedPeers({"offerer": offerer_result, "answerer": answerer_result})
    relay = SFrameRelay(hub_toward_offerer, hub_toward_answerer)
    call = await calls.connect(prepare=peers, relay_transform=relay)
    mitm = calls.mitm
    assert mitm is not None
    await calls.run_until_both_received(call)

    # The call works: every frame the MITM sealed again authenticated at the peer.
    assert_both_peers_hear_and_see_each_other(call)
    assert_every_frame_authenticated(peers.receivers.values())

    for direction, tone, source in (
        (Direction.OFFERER_TO_ANSWERER, OFFERER_TONE, offerer_result),
        (Direction.ANSWERER_TO_OFFERER, ANSWERER_TONE, answerer_result),
    ):
        # On the wire toward the MITM: SFrame under the source's key only.
        wire = [p.payload for p in mitm.packets if p.direction is direction and p.kind == "audio"]
        send_key = source.initial_keys.switch_send
        assert send_key is not None
        assert {SFrameHeader.parse(payload)[0].kid for payload in wire} == {send_key.kid}
        # What it recorded is the plaintext: it recovers the audio and the video.
        audio = mitm.recovered_audio(direction)
        assert tone_correlation(middle_second(audio.samples, SAMPLE_RATE), SAMPLE_RATE, tone) >= 0.9
        video = mitm.recovered_video(direction)
        assert video.frames_decoded >= WANTED_VIDEO_FRAMES
        assert video.last_frame is not None and read_pattern_number(video.last_frame) is not None


# -- the tamper capability on relayed media (no aiortc: the transform frame by frame)


def tampered_stream(tamper: MediaTamper, frames: int) -> tuple[list[bytes], SFrameReceiver]:
    """``frames`` SFrame audio frames from one peer, through the tamper toward the other."""
    sender, receiver = SFrameSender(), SFrameReceiver()
    sender.use_key(MediaKey(0, 3, bytes(range(32))))
    receiver.add_key(MediaKey(0, 3, bytes(range(32))))
    protect = sender.transform("audio")
    sent: list[bytes] = []
    for number in range(frames):
        frame = protect(f"frame {number}".encode())
        assert frame is not None
        opened = tamper.open(Direction.OFFERER_TO_ANSWERER, "audio", frame)
        assert opened == frame
        sent += tamper.seal(Direction.OFFERER_TO_ANSWERER, "audio", opened)
    return sent, receiver


def test_media_tamper_replays_alters_and_drops_one_frame_in_every_period_after_the_first():
    tamper = MediaTamper(period=20)
    sent, _ = tampered_stream(tamper, 100)
    # Frames 20..99 are four periods: in each, one replayed, one altered, one dropped.
    assert tamper.counts(Direction.OFFERER_TO_ANSWERER, "audio") == TamperCounts(4, 4, 4)
    assert tamper.counts(Direction.ANSWERER_TO_OFFERER, "audio") == TamperCounts()
    assert len(sent) == 100 - 4 + 4
    # The first period goes through untouched; the replayed copy of frame 20 follows frame 21.
    assert sent[20] == sent[22] != sent[21]
    assert len(set(sent)) == 100 - 4


def test_every_frame_the_tamper_replays_or_alters_is_rejected_by_sframe_and_counted():
    tamper = MediaTamper(period=20)
    sent, receiver = tampered_stream(tamper, 200)
    unprotect = receiver.transform("audio")
    opened = [unprotect(frame) for frame in sent]
    counters = receiver.counters["audio"]
    did = tamper.counts(Direction.OFFERER_TO_ANSWERER, "audio")
    assert (counters.replayed, counters.unauthenticated) == (did.replayed, did.altered) == (9, 9)
    assert counters.failed == did.replayed + did.altered
    # Everything else decrypts, in order: only the dropped and the altered frames are missing.
    assert counters.frames == 200 - did.dropped - did.altered
    kept = [frame for frame in opened if frame is not None]
    assert kept == sorted(kept, key=lambda plain: int(plain.split()[1]))


@pytest.mark.parametrize("within", [0, 20, 21, 22, 23, 27, 61, 200])
def test_media_tamper_counts_what_it_did_to_the_frames_a_peer_received(within):
    # A peer that hung up after ``within`` frames rejected exactly what `counts` says for them.
    tamper = MediaTamper(period=20)
    sent, receiver = tampered_stream(tamper, 100)
    unprotect = receiver.transform("audio")
    for frame in sent[:within]:
        unprotect(frame)
    counters = receiver.counters["audio"]
    did = tamper.counts(Direction.OFFERER_TO_ANSWERER, "audio", within)
    assert (counters.replayed, counters.unauthenticated) == (did.replayed, did.altered)


def test_media_tamper_wraps_the_relay_s_own_transform_and_can_be_switched_off():
    class Dropping:
        def open(self, direction: Direction, kind: str, frame: bytes) -> bytes | None:
            return frame.upper()

        def seal(self, direction: Direction, kind: str, frame: bytes) -> list[bytes]:
            return [] if frame == b"DROP" else [frame + b"!"]

    tamper = MediaTamper(Dropping(), period=3, replay=False, alter=False, drop=False)
    direction = Direction.ANSWERER_TO_OFFERER
    assert tamper.open(direction, "video", b"frame") == b"FRAME"
    frames = [b"A", b"DROP", b"B", b"C", b"D", b"E", b"F"]
    assert [tamper.seal(direction, "video", f) for f in frames] == [
        [b"A!"],
        [],
        [b"B!"],
        [b"C!"],
        [b"D!"],
        [b"E!"],
        [b"F!"],
    ]
    assert tamper.counts(direction, "video") == TamperCounts()
    with pytest.raises(ValueError, match="period"):
        MediaTamper(period=2)


def test_decoders_recover_nothing_from_random_bytes():
    noise = [bytes((i * 37 + j * 11) % 256 for j in range(200)) for i in range(50)]
    # A VP8 frame needs a keyframe start code; SFrame ciphertext never has one by chance.
    assert decode_vp8(noise).frames_decoded == 0


def test_decoders_recover_encoded_media():
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = SAMPLE_RATE
    encoder.layout = "mono"
    encoder.format = "s16"
    packets = []
    for index in range(25):
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(struct.pack("<960h", *([1000, -1000] * 480)))
        frame.sample_rate = SAMPLE_RATE
        frame.pts = index * 960
        packets += [bytes(packet) for packet in encoder.encode(frame)]
    audio = decode_opus(packets)
    assert audio.frames_decoded == len(packets) and audio.frames_failed == 0
    assert len(audio.samples) == 960 * len(packets)


def test_is_vp8_keyframe_tells_the_first_frame_from_the_next():
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 64, "yuv420p"
    encoded = []
    for index in range(3):
        frame = av.VideoFrame(width=64, height=64, format="yuv420p")
        for plane in frame.planes:
            plane.update(bytes([100 + index]) * plane.buffer_size)
        frame.pts = index
        encoded += [bytes(packet) for packet in encoder.encode(frame)]
    encoded += [bytes(packet) for packet in encoder.encode(None)]
    assert [is_vp8_keyframe(frame) for frame in encoded] == [True] + [False] * (len(encoded) - 1)
    assert not is_vp8_keyframe(encoded[0][:9])


def test_media_kinds_reads_sections_in_order_and_rejects_others():
    sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=x\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
    assert media_kinds(sdp) == ["audio", "video"]
    with pytest.raises(SdpRejected, match="'application'"):
        media_kinds(sdp + "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n")
    with pytest.raises(SdpRejected, match="no media section"):
        media_kinds("v=0\r\n")


async def test_answer_before_offer_is_a_state_error():
    mitm = MediaMitm()
    try:
        with pytest.raises(InterceptionStateError, match="when new"):
            await mitm.intercept_answer("v=0\r\n")
    finally:
        await mitm.close()


async def test_offer_without_a_relayable_codec_is_rejected():
    peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    mitm = MediaMitm()
    try:
        transceiver = peer.addTransceiver("video")
        codecs = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences([c for c in codecs if c.mimeType == "video/H264"])
        await peer.setLocalDescription(await peer.createOffer())
        with pytest.raises(SdpRejected, match="offer rejected"):
            await mitm.intercept_offer(peer.localDescription.sdp)
    finally:
        await mitm.close()
        await peer.close()


async def real_offer_lines() -> list[str]:
    peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    peer.addTransceiver("audio")
    peer.addTransceiver("video")
    await peer.setLocalDescription(await peer.createOffer())
    lines: list[str] = peer.localDescription.sdp.splitlines()
    await peer.close()
    return lines


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
async def test_any_mangled_offer_or_answer_is_accepted_or_rejected_with_sdp_rejected(data):
    lines = await real_offer_lines()
    mangled = data.draw(st.lists(st.sampled_from(lines) | st.text(max_size=40), max_size=30))
    mitm = MediaMitm()
    try:
        await mitm.intercept_offer("\r\n".join(mangled) + "\r\n")
        await mitm.intercept_answer("\r\n".join(data.draw(st.permutations(lines))) + "\r\n")
    except SdpRejected:
        pass
    finally:
        await mitm.close()
