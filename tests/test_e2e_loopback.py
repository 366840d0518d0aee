"""SFrame on every sender and receiver of a real aiortc call (two peer connections, no hub).

Opus and VP8 both ways. What each side decodes is the other's tone and pattern; what crossed
the wire is SFrame under the sender's KID and nothing of the encoded plaintext.
"""

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
import pytest
from aiortc import RTCRtpReceiver
from aiortc.codecs import get_decoder
from aiortc.codecs.vpx import VpxPayloadDescriptor, vp8_depayload
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from client.analysis import dominant_frequency, left_channel, tone_correlation
from client.frame_crypto import SFrameReceiver, SFrameSender
from client.frame_transform import (
    install_receiver_transform,
    install_sender_transform,
    request_keyframe,
)
from client.media import PatternTrack, ToneTrack, read_pattern_number
from crypto.sframe import SFrameError, SFrameHeader
from tests.conftest import LoopbackCalls, LoopbackSide

pytestmark = pytest.mark.slow

OFFERER_KEY = bytes(range(16))
ANSWERER_KEY = bytes(range(100, 116))
# One KID and base key per peer, as the key agreement gives them.
KIDS = {"offerer": 0x10, "answerer": 0x21}
TONES = {"offerer": 440.0, "answerer": 660.0}
OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2)
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000)


@dataclass
class Protection:
    """One side's SFrame contexts, plus the encoded plaintext frames its senders saw."""

    sender: SFrameSender = field(default_factory=SFrameSender)
    receiver: SFrameReceiver = field(default_factory=SFrameReceiver)
    plaintext: dict[str, list[bytes]] = field(default_factory=dict)


def recording(transform: Callable[[bytes], bytes | None], plaintext: list[bytes]):
    def record(frame: bytes) -> bytes | None:
        plaintext.append(frame)
        return transform(frame)

    return record


def keyframe_requester(receiver: RTCRtpReceiver) -> Callable[[SFrameError], None]:
    def on_failure(error: SFrameError) -> None:
        request_keyframe(receiver)

    return on_failure


def protect(keys: dict[str, bytes | None], receive_keys: dict[str, bytes]):
    """A loopback ``prepare`` giving each side SFrame transforms with the given keys.

    ``keys[name]`` is that side's sending key (None: no key); ``receive_keys[name]`` is the key
    that side's receiver uses for the other side's KID.
    """
    protections: dict[str, Protection] = {}

    def prepare(side):
        name = "offerer" if not protections else "answerer"
        peer = "answerer" if name == "offerer" else "offerer"
        protection = protections[name] = Protection()
        sending_key = keys[name]
        if sending_key is not None:
            protection.sender.use_key(KIDS[name], sending_key)
        protection.receiver.add_key(KIDS[peer], receive_keys[name])
        for kind in ("audio", "video"):
            plaintext = protection.plaintext.setdefault(kind, [])
            install_sender_transform(
                side.senders[kind], recording(protection.sender.transform(kind), plaintext)
            )
            rtp_receiver = side.receivers[kind]
            install_receiver_transform(
                rtp_receiver,
                protection.receiver.transform(kind, keyframe_requester(rtp_receiver)),
            )

    return prepare, protections


async def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out waiting for media"
        await asyncio.sleep(0.05)


def wire_frames(packets, kind: str) -> list[bytes]:
    """The encoded frames as a receiver reassembles them from the RTP it got (no RTX)."""
    media = [p for p in packets if p.payload_type == packets[0].payload_type]
    frames: dict[int, list[RtpPacket]] = {}
    for packet in media:
        frames.setdefault(packet.timestamp, []).append(packet)
    result = []
    for group in frames.values():
        group.sort(key=lambda p: p.sequence_number)
        if kind == "video" and not VpxPayloadDescriptor.parse(group[0].payload)[0].partition_start:
            continue  # the frame's first packet was not captured
        depayload = vp8_depayload if kind == "video" else bytes
        result.append(b"".join(depayload(p.payload) for p in group))
    return result


async def start_protected_call(
    loopback: LoopbackCalls, keys: dict[str, bytes | None], receive_keys: dict[str, bytes]
) -> tuple[LoopbackSide, LoopbackSide, dict[str, Protection]]:
    prepare, protections = protect(keys, receive_keys)
    offerer, answerer = await loopback.connect(
        [ToneTrack(TONES["offerer"]), PatternTrack()],
        [ToneTrack(TONES["answerer"]), PatternTrack()],
        prepare=prepare,
    )
    return offerer, answerer, protections


async def test_sframe_call_both_ways(loopback):
    offerer, answerer, protections = await start_protected_call(
        loopback,
        {"offerer": OFFERER_KEY, "answerer": ANSWERER_KEY},
        {"offerer": ANSWERER_KEY, "answerer": OFFERER_KEY},
    )
    sides = {"offerer": offerer, "answerer": answerer}
    await wait_for(
        lambda: all(
            len(side.received.samples) >= 48000 and len(side.received.pattern_numbers) >= 10
            for side in sides.values()
        )
    )
    for name, side in sides.items():
        peer = "answerer" if name == "offerer" else "offerer"
        received = side.received
        # What each side decoded is the other side's tone and pattern.
        assert abs(dominant_frequency(received.samples, received.sample_rate) - TONES[peer]) < 5
        numbers = received.pattern_numbers
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers) >= 10
        # Every frame decrypted; none failed.
        for kind in ("audio", "video"):
            counters = protections[name].receiver.counters[kind]
            assert counters.frames > 0 and counters.failed == 0, (name, kind)

        # On the wire: every encoded frame starts with an SFrame header under the sender's KID.
        for kind in ("audio", "video"):
            frames = wire_frames(side.wire[kind], kind)
            assert len(frames) >= 10
            kids = {SFrameHeader.parse(frame)[0].kid for frame in frames}
            assert kids == {KIDS[peer]}, (name, kind)

        # No 16-byte run of any encoded plaintext frame appears in any RTP payload.
        windows = {
            packet.payload[i : i + 16]
            for packets in side.wire.values()
            for packet in packets
            for i in range(len(packet.payload) - 15)
        }
        plaintext = [frame for frames in protections[peer].plaintext.values() for frame in frames]
        assert len(plaintext) >= 20
        leaked = [
            frame[i : i + 16]
            for frame in plaintext
            for i in range(0, len(frame) - 15, 16)
            if frame[i : i + 16] in windows
        ]
        assert leaked == []


def decode_all(codec: RTCRtpCodecParameters, frames: list[bytes]) -> list[Any]:
    decoder = get_decoder(codec)
    decoded = []
    for timestamp, frame in enumerate(frames):
        try:
            decoded += decoder.decode(JitterFrame(frame, timestamp * 960))
        except av.FFmpegError:  # a frame the decoder rejects decoded nothing
            continue
    return decoded


def decoded_audio(frames: list[bytes]) -> list[int]:
    samples: list[int] = []
    for frame in decode_all(OPUS, frames):
        channels = len(frame.layout.channels)
        samples += left_channel(bytes(frame.planes[0])[: frame.samples * channels * 2], channels)
    return samples[4800:]  # past the decoder's start-up


async def test_a_third_party_with_the_rtp_but_no_keys_recovers_nothing(loopback):
    _, answerer, protections = await start_protected_call(
        loopback,
        {"offerer": OFFERER_KEY, "answerer": ANSWERER_KEY},
        {"offerer": ANSWERER_KEY, "answerer": OFFERER_KEY},
    )
    await wait_for(
        lambda: (
            len(answerer.received.samples) >= 48000 and len(answerer.received.pattern_numbers) >= 10
        )
    )
    # The peer with the keys hears the tone clearly ...
    heard = answerer.received.samples[-24000:]
    assert tone_correlation(heard, 48000, TONES["offerer"]) > 0.8
    # ... and so do decoders given the encoded plaintext frames (the control) ...
    plaintext = protections["offerer"].plaintext
    assert tone_correlation(decoded_audio(plaintext["audio"]), 48000, TONES["offerer"]) > 0.8
    assert any(read_pattern_number(f) is not None for f in decode_all(VP8, plaintext["video"]))

    # ... but an Opus decoder fed what crossed the wire hears no tone (at most noise) ...
    wire_audio = decoded_audio(wire_frames(answerer.wire["audio"], "audio"))
    assert tone_correlation(wire_audio or [0.0], 48000, TONES["offerer"]) < 0.1
    # ... and a VP8 decoder fed the wire frames shows no pattern frame number at all.
    video = decode_all(VP8, wire_frames(answerer.wire["video"], "video"))
    assert [number for number in map(read_pattern_number, video) if number is not None] == []


async def test_a_wrong_key_drops_every_frame_and_counts_failures(loopback):
    wrong_key = os.urandom(16)
    offerer, answerer, protections = await start_protected_call(
        loopback,
        {"offerer": OFFERER_KEY, "answerer": ANSWERER_KEY},
        {"offerer": ANSWERER_KEY, "answerer": wrong_key},
    )
    counters = protections["answerer"].receiver.counters
    await wait_for(lambda: counters["audio"].failed >= 25 and counters["video"].failed >= 10)
    # The other direction works, so the call itself is up.
    await wait_for(lambda: len(offerer.received.pattern_numbers) >= 5)
    for kind in ("audio", "video"):
        assert counters[kind].frames == 0
    assert answerer.received.audio_frames == 0 and answerer.received.video_frames == 0


async def test_no_key_means_nothing_is_sent(loopback):
    offerer, answerer, protections = await start_protected_call(
        loopback,
        {"offerer": None, "answerer": ANSWERER_KEY},
        {"offerer": ANSWERER_KEY, "answerer": OFFERER_KEY},
    )
    counters = protections["offerer"].sender.counters
    await wait_for(lambda: len(offerer.received.pattern_numbers) >= 5)
    await wait_for(lambda: counters["video"].dropped_without_key >= 10)
    assert counters["audio"].dropped_without_key >= 10
    assert answerer.wire["audio"] == [] and answerer.wire["video"] == []
    assert answerer.received.audio_frames == 0 and answerer.received.video_frames == 0
