"""What a relay on the media path reads of a call's audio: no loudness, no voice activity.

Each test reads the packets one peer's transports got, after SRTP, whose headers, extensions
and sizes are exactly what crossed the wire (tests/rtp_wire.py), and each claim has a control:
two plain aiortc peers, whose packets show what the claim rules out.
"""

import statistics

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.codecs import HEADER_EXTENSIONS

from client.call import CallParts
from client.media import BurstTrack, PatternTrack
from client.rtp_policy import ABS_SEND_TIME, AUDIO_BITRATE, AUDIO_LEVEL, MID
from client.rtp_policy import strip_header_extensions as strip
from crypto.frame_crypto import DEFAULT_SUITE
from tests.bench.audio_sizes import audio_levels, blindhub_wire, plain_wire
from tests.rtp_wire import RawTap, WirePacket, describe, sframe_body_size, sizes_by_phase
from tests.test_call import config, run_pair

pytestmark = pytest.mark.slow

AIORTC_IDS = {ext.uri: ext.id for kind in ("audio", "video") for ext in HEADER_EXTENSIONS[kind]}
SECONDS = 6.0  # three voiced and three quiet phases
OPUS_FRAME_BYTES = AUDIO_BITRATE // 8 * 20 // 1000


async def test_aiortcs_offer_keeps_only_mid_and_abs_send_time_and_aiortc_applies_it():
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio")
        pc.addTransceiver("video")
        offer = await pc.createOffer()
        assert AUDIO_LEVEL in offer.sdp  # what aiortc would negotiate
        await pc.setLocalDescription(RTCSessionDescription(strip(offer.sdp), offer.type))
        sdp = pc.localDescription.sdp
    finally:
        await pc.close()
    uris = [line.split()[1] for line in sdp.splitlines() if line.startswith("a=extmap:")]
    assert uris == [MID, MID, ABS_SEND_TIME]


async def test_no_header_extension_on_the_wire_reveals_content(hub):
    taps = {"alice": RawTap(), "bob": RawTap()}
    _, _, results = await run_pair(
        hub,
        config(hub, "alice", 440, tracks=[BurstTrack(), PatternTrack()]),
        config(hub, "bob", 660, tracks=[BurstTrack(), PatternTrack()]),
        *(CallParts(prepare_connection=tap.install) for tap in taps.values()),
    )
    assert not any(isinstance(result, BaseException) for result in results), results
    for tap in taps.values():
        audio, video = tap.of_kind("audio"), tap.of_kind("video")
        assert len(audio) >= 50 and len(video) >= 20
        # Audio carries the MID alone; video also the send time. No audio level, under the id
        # aiortc gives it or any other.
        assert {key for packet in audio for key, _ in packet.extensions} == {AIORTC_IDS[MID]}
        assert {key for packet in video for key, _ in packet.extensions} <= {
            AIORTC_IDS[MID],
            AIORTC_IDS[ABS_SEND_TIME],
        }
        assert all(len(packet.extensions) == 1 for packet in audio)


async def test_audio_frame_sizes_are_the_same_for_speech_and_silence():
    audio = (await blindhub_wire(SECONDS)).of_kind("audio")
    sizes = sizes_by_phase(audio, sframe_body_size)
    print({phase: describe(values) for phase, values in sizes.items()})
    assert len(sizes["voiced"]) >= 100 and len(sizes["quiet"]) >= 100
    # One size for every frame, whatever was said: the constant-bitrate Opus frame and the
    # SFrame tag. The SFrame header before it grows with the counter alone (1 to 3 bytes in
    # the first 65536 frames), whoever speaks.
    assert set(sizes["voiced"]) == set(sizes["quiet"]) == {OPUS_FRAME_BYTES + DEFAULT_SUITE.nt}


async def test_plain_aiortc_shows_the_loudness_and_the_voice_activity():
    # The control for both: between plain aiortc peers, the same source puts the level of each
    # 20 ms in clear, loud while voiced (near 0 -dBov) and faint while quiet (near -66 dBov),
    # and variable-bitrate Opus makes voiced frames larger than quiet ones, so much that a
    # relay tells the phases apart from sizes alone.
    audio = (await plain_wire(SECONDS)).of_kind("audio")
    assert AIORTC_IDS[AUDIO_LEVEL] in {key for packet in audio for key, _ in packet.extensions}
    levels = audio_levels(audio)
    assert statistics.median(levels["voiced"]) + 30 < min(levels["quiet"])
    sizes = sizes_by_phase(audio, payload_size)
    print({phase: describe(values) for phase, values in sizes.items()})
    assert set(sizes["voiced"]) != set(sizes["quiet"])
    assert max(sizes["quiet"]) < min(sizes["voiced"])


def payload_size(packet: WirePacket) -> int:
    return len(packet.payload)
