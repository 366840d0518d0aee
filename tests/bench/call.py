"""blindhub calls against plain aiortc calls through the same hub, measured in the same run.

Run: ``python -m tests.bench.call`` (add ``--quick`` for a fast smoke run).

The baseline is the same two-peer call with the EXPERIMENT-ONLY ``plain`` layers: the same
hub, the same aiortc offer/answer and the same tone and pattern media, but no key agreement,
no sealing and no SFrame. Runs alternate between the two so background load hits both alike;
medians are reported.

1. Setup: from the joining peer's start to the first audio frame the other side decodes
   (for blindhub: the first decrypted one). Target: at most 10 ms more than plain.
2. CPU seconds per call second, both peers in this process, over a window of steady media.
   Target: at most 1.03x plain.
3. Bytes SFrame adds per frame, audio and video.
"""

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass

from client.call import Call, CallConfig, CallStats, ExperimentOnlyLayers, Verify
from client.media import PatternTrack, ToneTrack
from crypto.identity import IdentityKey, KnownPeers
from signaling.hub import Hub
from signaling.server import HubServer

SETUP_TARGET_MS = 10.0
CPU_TARGET_RATIO = 1.03


@dataclass
class Sample:
    setup_seconds: float
    cpu_per_call_second: float
    stats: list[CallStats]


def call_config(url: str, room: str, name: str, tone: float, layers: ExperimentOnlyLayers):
    return CallConfig(
        room=room,
        hub_url=url,
        name=name,
        identity=IdentityKey.generate(os.urandom),
        known_peers=KnownPeers(),
        tracks=[ToneTrack(tone), PatternTrack()],
        verify=Verify.TOFU,
        experiment_only_layers=layers,
    )


async def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the call did not carry media in time")
        await asyncio.sleep(0.001)


async def one_call(url: str, room: str, layers: ExperimentOnlyLayers, window: float) -> Sample:
    alice = Call(call_config(url, room, "alice", 440, layers))
    bob = Call(call_config(url, room, "bob", 660, layers))
    alice_task = asyncio.create_task(alice.run())
    await wait_until(lambda: alice._hub is not None and alice._hub.room is not None)
    start = time.monotonic()
    bob_task = asyncio.create_task(bob.run())
    await wait_until(lambda: alice.received.audio_frames > 0)
    setup = time.monotonic() - start
    await wait_until(lambda: bob.received.video_frames > 0 and alice.received.video_frames > 0)
    cpu_start, wall_start = time.process_time(), time.monotonic()
    await asyncio.sleep(window)
    cpu = (time.process_time() - cpu_start) / (time.monotonic() - wall_start)
    alice.hangup()
    stats = await asyncio.gather(alice_task, bob_task)
    return Sample(setup, cpu, list(stats))


def per_frame(stats: list[CallStats], kind: str) -> float:
    added = sum(getattr(s, kind).sframe_bytes_added for s in stats)
    frames = sum(getattr(s, kind).sent for s in stats)
    return added / frames if frames else float("nan")


async def main(repeats: int, window: float) -> int:
    server = HubServer(Hub())
    await server.start()
    samples: dict[ExperimentOnlyLayers, list[Sample]] = {
        ExperimentOnlyLayers.PLAIN: [],
        ExperimentOnlyLayers.VERIFIED: [],
    }
    try:
        for repeat in range(repeats):
            for layers in samples:
                room = f"bench-{layers.value}-{repeat}"
                samples[layers].append(await one_call(server.url, room, layers, window))
    finally:
        await server.close()
    plain, e2e = samples[ExperimentOnlyLayers.PLAIN], samples[ExperimentOnlyLayers.VERIFIED]
    setup_plain = statistics.median(s.setup_seconds for s in plain) * 1000
    setup_e2e = statistics.median(s.setup_seconds for s in e2e) * 1000
    cpu_plain = statistics.median(s.cpu_per_call_second for s in plain)
    cpu_e2e = statistics.median(s.cpu_per_call_second for s in e2e)
    all_stats = [stats for sample in e2e for stats in sample.stats]
    print(f"calls: {repeats} of each kind, {window:.0f} s media window, medians")
    print(
        f"setup, join to first decoded audio: plain {setup_plain:.1f} ms, "
        f"blindhub {setup_e2e:.1f} ms, +{setup_e2e - setup_plain:.1f} ms "
        f"(ratio {setup_e2e / setup_plain:.2f}x; target <= +{SETUP_TARGET_MS:.0f} ms)"
    )
    print(
        f"CPU s per call s (both peers): plain {cpu_plain:.3f}, blindhub {cpu_e2e:.3f}, "
        f"ratio {cpu_e2e / cpu_plain:.3f}x (target <= {CPU_TARGET_RATIO}x)"
    )
    print(
        f"SFrame bytes added per frame: audio {per_frame(all_stats, 'audio'):.1f}, "
        f"video {per_frame(all_stats, 'video'):.1f}"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 calls of each kind, 2 s windows")
    options = parser.parse_args()
    repeats, window = (2, 2.0) if options.quick else (5, 5.0)
    sys.exit(asyncio.run(main(repeats, window)))
