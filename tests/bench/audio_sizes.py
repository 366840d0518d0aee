"""What audio on the wire shows of speech: blindhub against plain aiortc, measured in one run.

Run: ``python -m tests.bench.audio_sizes`` (``--seconds S`` of media for each, 8 by default;
``--quick`` for a smoke run of 2 s).

One peer sends a ``BurstTrack`` (a second of a speech-like voiced signal, then a second of a
quiet room's noise floor, and so on) to the other: once in a blindhub call through a hub on
this machine, once between two plain aiortc peer connections. The receiver's transports are
tapped after SRTP, where an RTP packet's header, extensions and size are what crossed the wire.
For each, by phase (frames within 3 of a change of phase left out): the RTP payload sizes (for
blindhub also without the SFrame header) as min/median/max and distinct sizes, the whole RTP
packet's, and the audio level extension (RFC 6464, -dBov: 0 loudest, 127 silent) where one
crossed. Last, what the constant bitrate costs: the same source through Opus at the same rate
with variable bitrate, and at aiortc's own 96 kbit/s, by phase (encoders alone, no call).
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import os
import statistics
import sys

import av
from aiortc.codecs import HEADER_EXTENSIONS
from aiortc.codecs.opus import OpusEncoder

from client.call import Call, CallConfig, CallParts
from client.media import AUDIO_FRAME_SAMPLES, SAMPLE_RATE, BurstTrack, burst_samples
from client.rtp_policy import AUDIO_BITRATE, AUDIO_LEVEL
from client.session import Verify
from crypto.identity import IdentityKey, KnownPeers
from signaling.hub import Hub
from signaling.server import HubServer
from tests.conftest import LoopbackCalls, wait_for
from tests.rtp_wire import (
    RawTap,
    WirePacket,
    describe,
    sframe_body_size,
    sizes_by_phase,
    steady_phase,
)

AUDIO_LEVEL_ID = next(ext.id for ext in HEADER_EXTENSIONS["audio"] if ext.uri == AUDIO_LEVEL)
FRAMES_PER_SECOND = SAMPLE_RATE // AUDIO_FRAME_SAMPLES


async def blindhub_wire(seconds: float) -> RawTap:
    """What a blindhub peer receives from one sending a ``BurstTrack`` for ``seconds``."""
    tap = RawTap()
    async with HubServer(Hub()) as hub:
        sender, receiver = (
            CallConfig(
                room="sizes",
                hub_url=hub.url,
                name=name,
                identity=IdentityKey.generate(os.urandom),
                known_peers=KnownPeers(),
                tracks=tracks,
                verify=Verify.TOFU,
                duration=seconds,
                setup_timeout=20,
            )
            for name, tracks in (("alice", [BurstTrack()]), ("bob", []))
        )
        first = asyncio.create_task(Call(sender).run())
        await wait_for(lambda: hub.hub.room_size("sizes") == 1)
        await asyncio.gather(first, Call(receiver, CallParts(prepare_connection=tap.install)).run())
    return tap


async def plain_wire(seconds: float) -> RawTap:
    """The same between two plain aiortc peer connections (no blindhub code on either side)."""
    tap = RawTap()
    calls = LoopbackCalls()
    try:
        await calls.connect(
            [BurstTrack()],
            [],
            prepare=lambda side: tap.install(side.pc) if side.role == "answerer" else None,
        )
        frames = seconds * FRAMES_PER_SECOND
        await wait_for(lambda: len(tap.of_kind("audio")) >= frames, timeout=seconds + 20)
    finally:
        await calls.close()
    return tap


def audio_levels(audio: list[WirePacket]) -> dict[str, list[int]]:
    """The audio level each packet carried in clear (none: no entry), by phase."""

    def level(packet: WirePacket) -> int:
        values = [value for key, value in packet.extensions if key == AUDIO_LEVEL_ID]
        return values[0][0] & 0x7F if values else -1

    return {
        phase: [value for value in values if value >= 0]
        for phase, values in sizes_by_phase(audio, level).items()
    }


def encoded_sizes(bitrate: int, vbr: str, seconds: float) -> dict[str, list[int]]:
    """Opus frame sizes of ``seconds`` of a ``BurstTrack`` by phase (libopus ``vbr`` on/off)."""
    encoder = OpusEncoder()
    encoder.codec.bit_rate = bitrate
    encoder.codec.options = {**encoder.codec.options, "vbr": vbr}
    sizes: dict[str, list[int]] = {"voiced": [], "quiet": []}
    for index in range(int(seconds * FRAMES_PER_SECOND)):
        first = index * AUDIO_FRAME_SAMPLES
        frame = av.AudioFrame(format="s16", layout="mono", samples=AUDIO_FRAME_SAMPLES)
        frame.planes[0].update(burst_samples(first, AUDIO_FRAME_SAMPLES).tobytes())
        frame.pts, frame.sample_rate = first, SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        payloads, _ = encoder.encode(frame)
        phase = steady_phase(first)
        if phase is not None:
            sizes[phase] += [len(payload) for payload in payloads]
    return sizes


def report(name: str, phases: dict[str, list[int]]) -> None:
    for phase, values in phases.items():
        print(f"  {name:<28} {phase:<7} {describe(values) if values else 'none'}")


async def main(seconds: float) -> None:
    print(f"{seconds:g} s of BurstTrack audio each; Opus CBR at {AUDIO_BITRATE} bit/s in blindhub")
    for title, measure in (("blindhub", blindhub_wire), ("plain aiortc", plain_wire)):
        audio = (await measure(seconds)).of_kind("audio")
        extension_ids = sorted({key for packet in audio for key, _ in packet.extensions})
        print(f"{title}: {len(audio)} audio packets, header extension ids {extension_ids}")
        report("RTP payload bytes", sizes_by_phase(audio, lambda packet: len(packet.payload)))
        if title == "blindhub":
            report("without the SFrame header", sizes_by_phase(audio, sframe_body_size))
        packets = sizes_by_phase(audio, lambda packet: packet.size)
        report("RTP packet bytes", packets)
        every = packets["voiced"] + packets["quiet"]
        print(f"  RTP packets: {statistics.mean(every) * 8 * FRAMES_PER_SECOND / 1000:.1f} kbit/s")
        report("audio level (-dBov)", audio_levels(audio))
    print("Opus alone, mean bytes a frame:")
    for bitrate, vbr in ((AUDIO_BITRATE, "off"), (AUDIO_BITRATE, "on"), (96_000, "on")):
        sizes = encoded_sizes(bitrate, vbr, seconds)
        means = ", ".join(f"{p} {statistics.mean(v):.1f}" for p, v in sizes.items())
        print(f"  {bitrate} bit/s, vbr {vbr:<3}: {means}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s each")
    arguments = parser.parse_args()
    asyncio.run(main(2.0 if arguments.quick else arguments.seconds))
    sys.exit(0)
