"""blindhub calls against plain aiortc calls through the same hub, measured in the same run.

Run: ``python -m tests.bench.call`` (``--quick`` for a fast smoke run, ``--pairs N`` and
``--window S`` to change the repeats, ``--profile CALLS`` to time each per-frame step in calls).

The baseline is the same two-peer call with the EXPERIMENT-ONLY ``plain`` layers: the same
hub, the same aiortc offer/answer and the same tone and pattern media, but no key agreement,
no sealing and no SFrame. Calls run in pairs, one of each kind, and the order inside a pair
alternates (plain first, then blindhub first), so drifting background load hits both alike.
Each figure is the median with its spread (interquartile range, and min..max); the CPU ratio
is also taken pair by pair, which cancels load that changes between pairs.

1. Setup: from the joining peer's start to the first audio frame the other side decodes
   (for blindhub: the first decrypted one). Target: at most 10 ms more than plain.
2. CPU seconds per call second, both peers in this process, over a window of steady media.
   Target: at most 1.02x plain. Also the CPU blindhub adds in the event loop's thread alone
   (where SRTP, the frame transforms and SFrame run, away from the encoders' and decoders'
   noise), pair by pair, as a share of the plain call's whole CPU (target: at most 0.015).
   With ``--profile``, more blindhub calls run with each per-frame step blindhub adds timed
   where it runs (wall time of each step, so that no system call disturbs the caches it
   measures): the frame adapters, inside them SFrame's protect and unprotect, and inside those
   pyca's AES-GCM; as a share of the plain call's CPU, next to the same SFrame work in a hot
   loop.
3. Bytes SFrame adds per frame, audio and video.
"""

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from aiortc.jitterbuffer import JitterBuffer

import client.call
import client.frame_transform
import crypto.frame_crypto
import crypto.sframe
from client.call import Call, CallConfig, CallStats
from client.experiment.layers import Layers
from client.media import PatternTrack, ToneTrack
from client.session import Verify
from crypto.identity import IdentityKey, KnownPeers
from signaling.hub import Hub
from signaling.server import HubServer

SETUP_TARGET_MS = 10.0
CPU_TARGET_RATIO = 1.02
LOOP_TARGET_SHARE = 0.015
PLAIN, E2E = Layers.PLAIN, Layers.VERIFIED


@dataclass
class Sample:
    setup_seconds: float
    cpu_per_call_second: float
    # The event loop's thread alone: SRTP, the frame transforms and SFrame run there; the
    # encoders and decoders (most of the CPU, and most of its noise) run in other threads.
    loop_cpu_per_call_second: float
    window_seconds: float
    stats: list[CallStats]
    # Per kind, over both peers' whole call: (frames protected, their plaintext bytes).
    protected: dict[str, tuple[int, int]]


def call_config(url: str, room: str, name: str, tone: float):
    return CallConfig(
        room=room,
        hub_url=url,
        name=name,
        identity=IdentityKey.generate(os.urandom),
        known_peers=KnownPeers(),
        tracks=[ToneTrack(tone), PatternTrack()],
        verify=Verify.TOFU,
    )


async def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the call did not carry media in time")
        await asyncio.sleep(0.001)


async def one_call(
    url: str,
    room: str,
    layers: Layers,
    window: float,
    hub: Hub,
) -> Sample:
    # The control is plain aiortc (the experiment's PLAIN assembly); E2E is the product.
    alice = Call(call_config(url, room, "alice", 440), layers.parts())
    bob = Call(call_config(url, room, "bob", 660), layers.parts())
    alice_task = asyncio.create_task(alice.run())
    await wait_until(lambda: hub.room_size(room) == 1)
    start = time.monotonic()
    bob_task = asyncio.create_task(bob.run())
    await wait_until(lambda: alice.received.audio_frames > 0)
    setup = time.monotonic() - start
    await wait_until(lambda: bob.received.video_frames > 0 and alice.received.video_frames > 0)
    cpu_start, loop_start, wall_start = time.process_time(), time.thread_time(), time.monotonic()
    await asyncio.sleep(window)
    wall = time.monotonic() - wall_start
    cpu = (time.process_time() - cpu_start) / wall
    loop_cpu = (time.thread_time() - loop_start) / wall
    alice.hangup()
    stats = await asyncio.gather(alice_task, bob_task)
    protected = {}
    for kind in ("audio", "video"):
        counters = [call.frames.counters(kind)[0] for call in (alice, bob)]
        protected[kind] = (
            sum(c.frames for c in counters),
            sum(c.plaintext_bytes for c in counters),
        )
    return Sample(setup, cpu, loop_cpu, wall, list(stats), protected)


def per_frame(stats: Sequence[CallStats], kind: str) -> float:
    added = sum(getattr(s, kind).sframe_bytes_added for s in stats)
    frames = sum(getattr(s, kind).sent for s in stats)
    return added / frames if frames else float("nan")


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """``median [q1..q3] (min..max)``."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (
        f"{median * scale:.{digits}f} [IQR {q1 * scale:.{digits}f}..{q3 * scale:.{digits}f}]"
        f" (min..max {min(values) * scale:.{digits}f}..{max(values) * scale:.{digits}f})"
    )


@dataclass
class FrameTimer:
    """Wall time (``perf_counter_ns``: no system call, which would itself disturb the caches
    being measured) spent inside wrapped per-frame functions, by name, one sample per call."""

    samples: dict[str, list[int]] = field(default_factory=dict)

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        samples = self.samples.setdefault(name, [])

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return function(*args, **kwargs)
            finally:
                samples.append(time.perf_counter_ns() - start)

        return timed

    def seconds(self, *names: str) -> float:
        return sum(sum(self.samples.get(name, ())) for name in names) / 1e9

    def median_us(self, name: str) -> float:
        return statistics.median(self.samples.get(name) or [0]) / 1000

    @contextlib.contextmanager
    def timing_frames(self) -> Iterator[None]:
        """While open, the per-frame steps of new calls in this process are timed."""
        sframe, frame_transform = crypto.sframe, client.frame_transform
        install_receiver_transform = frame_transform.install_receiver_transform
        untimed_make_aead = sframe.make_aead

        def make_aead(suite: sframe.CipherSuite, key: bytes) -> sframe.Aead:
            return _TimedAead(untimed_make_aead(suite, key), self)

        def install_timed_receiver_transform(receiver: Any, transform: Any) -> None:
            # The adapter wraps the receiver's jitter buffer's add per instance: time that.
            install_receiver_transform(receiver, transform)
            jitter_buffer = getattr(receiver, frame_transform.RECEIVER_JITTER_BUFFER)
            jitter_buffer.add = self.wrap("receiver adapter", jitter_buffer.add)

        with (
            mock.patch.object(sframe, "make_aead", make_aead),
            mock.patch.object(
                sframe.SendContext, "protect", self.wrap("protect", sframe.SendContext.protect)
            ),
            mock.patch.object(
                sframe.ReceiveContext,
                "unprotect",
                self.wrap("unprotect", sframe.ReceiveContext.unprotect),
            ),
            mock.patch.object(
                frame_transform,
                "_transform_vp8",
                self.wrap("vp8 sender adapter", frame_transform._transform_vp8),
            ),
            mock.patch.object(
                frame_transform,
                "_transform_opus",
                self.wrap("opus sender adapter", frame_transform._transform_opus),
            ),
            mock.patch.object(
                JitterBuffer, "add", self.wrap("aiortc jitter buffer", JitterBuffer.add)
            ),
            # client.call imported the function by name: patch its name there.
            mock.patch.object(
                client.call, "install_receiver_transform", install_timed_receiver_transform
            ),
        ):
            yield


class _TimedAead:
    def __init__(self, aead: crypto.sframe.Aead, timer: FrameTimer) -> None:
        self.encrypt = timer.wrap("AES-GCM encrypt", aead.encrypt)
        self.decrypt = timer.wrap("AES-GCM decrypt", aead.decrypt)


def hot_loop_seconds(kind: str, size: int, frames: int = 5000) -> float:
    """Thread CPU seconds per protect + unprotect of one ``size``-byte frame, in a hot loop."""
    sender, receiver = crypto.frame_crypto.SFrameSender(), crypto.frame_crypto.SFrameReceiver()
    key = crypto.frame_crypto.MediaKey(0, 1, bytes(32))
    sender.use_key(key)
    receiver.add_key(key)
    protect, unprotect = sender.transform(kind), receiver.transform(kind)
    frame = os.urandom(size)
    start = time.thread_time()
    for _ in range(frames):
        protected = protect(frame)
        assert protected is not None
        unprotect(protected)
    return (time.thread_time() - start) / frames


async def profile_frames(
    server: HubServer, hub: Hub, calls: int, window: float, plain_cpu: float
) -> None:
    timer = FrameTimer()
    call_seconds = 0.0
    samples = []
    with timer.timing_frames():
        for index in range(calls):
            sample = await one_call(server.url, f"bench-profile-{index}", E2E, window, hub)
            call_seconds += statistics.mean(s.duration_seconds for s in sample.stats)
            samples.append(sample)

    def line(label: str, seconds: float, median_us: float | None = None) -> None:
        per_frame = f", {median_us:5.1f} us per frame (median)" if median_us is not None else ""
        print(
            f"  {label:44s} {seconds / call_seconds * 1000:5.2f} ms per call s "
            f"({seconds / call_seconds / plain_cpu:6.2%} of plain){per_frame}"
        )

    print(f"\nPer-frame steps inside {calls} more blindhub calls (wall time, both peers):")
    senders = ("vp8 sender adapter", "opus sender adapter")
    receiver = timer.seconds("receiver adapter") - timer.seconds("aiortc jitter buffer")
    sframe = timer.seconds("protect", "unprotect")
    aead = timer.seconds("AES-GCM encrypt", "AES-GCM decrypt")
    line("everything added (sender + receiver adapter)", timer.seconds(*senders) + receiver)
    for name in senders:
        line(f"  {name} (with its protect)", timer.seconds(name), timer.median_us(name))
    line("  receiver adapter (with its unprotect)", receiver)
    for name in ("protect", "unprotect"):
        line(f"    SFrame {name} (crypto/sframe.py)", timer.seconds(name), timer.median_us(name))
    for name in ("AES-GCM encrypt", "AES-GCM decrypt"):
        line(f"      {name} (pyca)", timer.seconds(name), timer.median_us(name))
    line("  adapter and counters beyond SFrame", timer.seconds(*senders) + receiver - sframe)
    line("  SFrame beyond AES-GCM", sframe - aead)
    for kind in ("audio", "video"):
        count = sum(s.protected[kind][0] for s in samples)
        size = round(sum(s.protected[kind][1] for s in samples) / max(count, 1))
        print(
            f"  hot loop, protect + unprotect of a {size}-byte {kind} frame: "
            f"{hot_loop_seconds(kind, size) * 1e6:.1f} us"
        )


def report(samples: dict[Layers, list[Sample]], window: float) -> None:
    plain, e2e = samples[PLAIN], samples[E2E]
    setup_plain = [s.setup_seconds for s in plain]
    setup_e2e = [s.setup_seconds for s in e2e]
    setup_extra = [b - a for a, b in zip(setup_plain, setup_e2e, strict=True)]
    cpu_plain = [s.cpu_per_call_second for s in plain]
    cpu_e2e = [s.cpu_per_call_second for s in e2e]
    cpu_ratio = [b / a for a, b in zip(cpu_plain, cpu_e2e, strict=True)]
    loop_extra = [
        (b.loop_cpu_per_call_second - a.loop_cpu_per_call_second) / statistics.median(cpu_plain)
        for a, b in zip(plain, e2e, strict=True)
    ]
    e2e_stats = [stats for sample in e2e for stats in sample.stats]
    print(
        f"{len(plain)} pairs of calls (plain, blindhub; order alternating), {window:.0f} s windows"
    )
    print("median [IQR q1..q3] (min..max)")
    print(f"setup, join to first decrypted audio, ms: plain {spread(setup_plain, 1000, 1)}")
    print(f"                                   blindhub {spread(setup_e2e, 1000, 1)}")
    print(
        f"  blindhub - plain, pair by pair, ms: {spread(setup_extra, 1000, 1)} "
        f"(target <= +{SETUP_TARGET_MS:.0f} ms)"
    )
    print(f"CPU s per call s (both peers): plain    {spread(cpu_plain)}")
    print(f"                               blindhub {spread(cpu_e2e)}")
    print(
        f"  ratio of medians {statistics.median(cpu_e2e) / statistics.median(cpu_plain):.3f}x; "
        f"pair by pair {spread(cpu_ratio)} (target <= {CPU_TARGET_RATIO}x)"
    )
    print(
        f"  added in the event loop's thread, pair by pair, share of plain: {spread(loop_extra)}"
        f" (target <= {LOOP_TARGET_SHARE})"
    )
    print(
        f"SFrame bytes added per frame: audio {per_frame(e2e_stats, 'audio'):.1f}, "
        f"video {per_frame(e2e_stats, 'video'):.1f}"
    )


async def main(pairs: int, window: float, profile: int) -> int:
    hub = Hub()
    server = HubServer(hub)
    await server.start()
    samples: dict[Layers, list[Sample]] = {PLAIN: [], E2E: []}
    try:
        for pair in range(pairs):
            for layers in (PLAIN, E2E) if pair % 2 == 0 else (E2E, PLAIN):
                room = f"bench-{layers.value}-{pair}"
                samples[layers].append(await one_call(server.url, room, layers, window, hub))
        report(samples, window)
        if profile:
            plain_cpu = statistics.median(s.cpu_per_call_second for s in samples[PLAIN])
            await profile_frames(server, hub, profile, window, plain_cpu)
    finally:
        await server.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 pairs of calls, 2 s windows")
    parser.add_argument("--pairs", type=int, default=12, help="pairs of calls (default 12)")
    parser.add_argument("--window", type=float, default=5.0, help="media window, s (default 5)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="CALLS",
        help="then time the per-frame steps inside this many more blindhub calls",
    )
    options = parser.parse_args()
    pairs, window = (2, 2.0) if options.quick else (options.pairs, options.window)
    sys.exit(asyncio.run(main(pairs, window, options.profile)))
