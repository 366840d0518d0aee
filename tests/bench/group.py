"""Group calls through a routing hub: ``python -m tests.bench.group [--quick] [--runs N]``.

1. Forwarding cost. ``blindhub hub --route-media`` runs in its own process; the bench reads its
   CPU time from ``/proc/PID/stat`` and its forwarded frames from ``/metrics`` before and after
   a measured window, and divides: hub CPU per forwarded frame. The members are lightweight
   synthetic peers in two load-generator processes (``--load``, below): each speaks the hub's
   protocol (join, answer the ``media-offer`` with aiortc and max-bundle), publishes frames
   encoded once at start (Opus at the project's 32 kbit/s, VP8 320x240 at aiortc's 500 kbit/s)
   as ``av.Packet`` from a paced track, so nothing is encoded per frame, and drops what it
   receives before any decoder. The SFrame variant protects every frame with ``SFrameSender``
   under a ``SenderKey``'s media key; the plain variant sends the same frames unprotected. The
   ratio SFrame / plain of the hub's CPU per forwarded frame should be 1.0 within noise: the
   hub does no crypto (it only carries 10 to 17 more bytes per frame).
2. Capacity. The same at N = 2, 4, 8 members, audio only and audio with video: the hub's CPU
   per forwarded frame, its share of one core, the forwarded rate against the rate the members
   publish (a shortfall means the hub or the load generator did not keep up), the load
   generators' CPU, and the whole machine's. From the cost per frame the bench estimates the
   largest N the hub forwards at 80% of one core.
3. Join and leave, real ``GroupCall`` members (tone and test pattern, in this process, through
   an in-process routing hub): three members stay, and a fourth joins and leaves ``--cycles``
   times (10), alternately hanging up (its sealed goodbye comes first) and vanishing (its
   connection dropped: the members learn it from the hub alone). Measured: from the joiner's
   join to its first decrypted audio frame of each member; from the hub's leave announcement
   to each remaining sender's first frame under a fresh key; and every stayer's frames lost
   to key timing (failed, expired, overflowed). Targets (issue 11): leave to fresh key at
   most 1 s, zero losses.

Measurements alternate their order from run to run, so that the machine's drifting load hits
both variants alike; figures are medians over the runs, with min..max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import math
import os
import statistics
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import av
import numpy
from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from websockets.asyncio.client import ClientConnection, connect

from client.call import CallConfig, prefer_supported_codecs
from client.frame_transform import install_receiver_transform, install_sender_transform
from client.group_call import GroupCall, GroupStats, attach_tracks
from client.media import (
    PATTERN_HEIGHT,
    PATTERN_WIDTH,
    SAMPLE_RATE,
    VIDEO_CLOCK_RATE,
    VIDEO_FPS,
    PatternTrack,
    ToneTrack,
    draw_pattern,
)
from client.rtp_policy import AUDIO_BITRATE
from client.session import Verify
from crypto.frame_crypto import SFrameSender
from crypto.identity import IdentityKey, KnownPeers
from crypto.sender_keys import SenderKey
from crypto.sframe import CipherSuite
from signaling.hub import Limits
from signaling.media_server import MediaServer
from signaling.protocol import PeerId
from signaling.server import HubServer

KINDS_CHOICES = {"audio": ("audio",), "audio+video": ("audio", "video")}
FRAMES_PER_SECOND = {"audio": 50, "video": VIDEO_FPS}  # Opus frames of 20 ms; 30 fps video
AUDIO_FRAME_SAMPLES = SAMPLE_RATE // FRAMES_PER_SECOND["audio"]
VIDEO_BITRATE = 500_000  # aiortc's VP8 starting rate
ENCODED_AUDIO_FRAMES = 50  # one second of tone, sent in a loop
ENCODED_VIDEO_FRAMES = 60  # two seconds of the test pattern, sent in a loop
SIZES = (2, 4, 8)
WINDOW_SECONDS = 8.0
WARMUP_SECONDS = 2.0
CORE_BUDGET = 0.8  # of one core: the capacity criterion of the issue
LOAD_PROCESSES = 2
CHURN_CYCLES = 10
LEAVE_TARGET_SECONDS = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOSS_REASONS = ("failed", "expired", "overflowed")
SUITE = CipherSuite.AES_128_GCM_SHA256_128  # blindhub's default suite


# -- pure helpers: /proc and /metrics


def process_cpu_seconds(stat: str, ticks_per_second: int = CLOCK_TICKS) -> float:
    """User plus system CPU seconds from the text of ``/proc/PID/stat``."""
    # The command name (field 2) may hold spaces and parentheses; the fields after its last
    # closing parenthesis are numbers, utime and stime the 12th and 13th of them.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_second


def machine_ticks(proc_stat: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all cores from the text of ``/proc/stat``."""
    line = next(line for line in proc_stat.splitlines() if line.startswith("cpu "))
    values = [int(value) for value in line.split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle and iowait
    # guest and guest_nice (fields 9 and 10) are already counted in user and nice.
    total = sum(values[:8])
    return total - idle, total


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, by name with its labels as written
    (``blindhub_media_frames_forwarded_total{kind="audio"}``)."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def read_text(path: str) -> str:
    with open(path) as file:
        return file.read()


def cpu_of(pids: Sequence[int]) -> float:
    return sum(process_cpu_seconds(read_text(f"/proc/{pid}/stat")) for pid in pids)


async def fetch_metrics(hub_url: str) -> dict[str, float]:
    url = hub_url.replace("ws://", "http://", 1) + "/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    return parse_metrics(await asyncio.to_thread(get))


def media_counter(metrics: dict[str, float], name: str, kind: str) -> float:
    return metrics.get(f'blindhub_media_{name}_total{{kind="{kind}"}}', 0.0)


# -- the synthetic members (the load generator)


def encode_audio(frames: int) -> list[bytes]:
    """``frames`` Opus frames of a 440 Hz tone, constant bitrate as blindhub sends it."""
    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate = AUDIO_BITRATE
    codec.format = "s16"
    codec.layout = "stereo"
    codec.sample_rate = SAMPLE_RATE
    codec.time_base = fractions.Fraction(1, SAMPLE_RATE)
    codec.options = {"application": "voip", "vbr": "off"}
    encoded: list[bytes] = []
    for index in range(frames + 2):  # and two more for the encoder's delay
        n = numpy.arange(index * AUDIO_FRAME_SAMPLES, (index + 1) * AUDIO_FRAME_SAMPLES)
        tone = (8000 * numpy.sin(2 * math.pi * 440 * n / SAMPLE_RATE)).astype(numpy.int16)
        frame = av.AudioFrame.from_ndarray(
            numpy.repeat(tone, 2).reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate = SAMPLE_RATE
        frame.pts = index * AUDIO_FRAME_SAMPLES
        encoded += [bytes(packet) for packet in codec.encode(frame)]
    return encoded[:frames]


def encode_video(frames: int) -> list[bytes]:
    """``frames`` VP8 frames of the test pattern, encoded as aiortc's encoder would."""
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height = PATTERN_WIDTH, PATTERN_HEIGHT
    codec.pix_fmt = "yuv420p"
    codec.bit_rate = VIDEO_BITRATE
    codec.time_base = fractions.Fraction(1, VIDEO_FPS)
    codec.options = {"deadline": "realtime", "lag-in-frames": "0", "cpu-used": "-6"}
    encoded: list[bytes] = []
    for index in range(frames):
        luma = numpy.asarray(draw_pattern(index))
        frame = av.VideoFrame.from_ndarray(luma, format="gray").reformat(format="yuv420p")
        frame.pts = index
        encoded.append(b"".join(bytes(packet) for packet in codec.encode(frame)))
    return encoded


class PacketTrack(MediaStreamTrack):
    """Pre-encoded frames in a loop, as ``av.Packet`` at their real-time pace: the sender packs
    them and encodes nothing."""

    def __init__(self, kind: str, frames: list[bytes]) -> None:
        super().__init__()
        self.kind = kind
        self._frames = frames
        self._clock_rate = SAMPLE_RATE if kind == "audio" else VIDEO_CLOCK_RATE
        self._period = 1 / FRAMES_PER_SECOND[kind]
        self._time_base = fractions.Fraction(1, self._clock_rate)
        self._index = 0
        self._start: float | None = None

    async def recv(self) -> av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        # The pace of the load: frame i leaves i periods after the first.
        delay = self._start + self._index * self._period - now
        if delay > 0:
            await asyncio.sleep(delay)
        packet = av.Packet(self._frames[self._index % len(self._frames)])
        packet.pts = round(self._index * self._period * self._clock_rate)
        packet.time_base = self._time_base
        self._index += 1
        return packet


@dataclass
class SyntheticMember:
    connection: ClientConnection
    pc: RTCPeerConnection
    reader: asyncio.Task[None] | None = None


async def synthetic_member(
    url: str, room: str, kinds: Sequence[str], sframe: bool, media: dict[str, list[bytes]]
) -> SyntheticMember:
    """Join ``room``, answer the hub's offer, publish ``kinds``; received frames are dropped."""
    connection = await connect(url, compression=None, max_size=None)
    await connection.send(json.dumps({"type": "join", "room": room}))
    while (message := json.loads(await connection.recv()))["type"] != "media-offer":
        if message["type"] == "error":
            raise RuntimeError(f"the hub refused a member: {message}")
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
    await pc.setRemoteDescription(RTCSessionDescription(message["sdp"], "offer"))
    tracks = [PacketTrack(kind, media[kind]) for kind in kinds]
    # The member's own transceivers, chosen exactly as a real member's are.
    attach_tracks(pc, tracks)
    prefer_supported_codecs(pc)
    sender = SFrameSender(SUITE)
    sender.use_key(SenderKey.fresh(SUITE, 0).media_key())
    for transceiver in pc.getTransceivers():
        if transceiver.direction == "sendonly":
            if sframe:
                install_sender_transform(transceiver.sender, sender.transform(transceiver.kind))
        else:
            install_receiver_transform(transceiver.receiver, lambda frame: None)
    await pc.setLocalDescription(await pc.createAnswer())
    answer = {"type": "media-answer", "sdp": pc.localDescription.sdp}
    await connection.send(json.dumps(answer))
    member = SyntheticMember(connection, pc)

    async def read() -> None:
        # media-tracks, peer-joined and peer-left: the load needs none of them.
        with contextlib.suppress(Exception):
            async for _ in connection:
                pass

    member.reader = asyncio.create_task(read())
    return member


async def load_generator(
    url: str, room: str, members: int, kinds: Sequence[str], sframe: bool
) -> None:
    """The ``--load`` process: ``members`` synthetic members; prints ``ready`` once each has
    its media connected, then runs until its standard input closes."""
    media = {
        "audio": encode_audio(ENCODED_AUDIO_FRAMES),
        "video": encode_video(ENCODED_VIDEO_FRAMES),
    }
    joined = [await synthetic_member(url, room, kinds, sframe, media) for _ in range(members)]
    deadline = time.monotonic() + 60
    while not all(member.pc.connectionState == "connected" for member in joined):
        if time.monotonic() > deadline:
            raise TimeoutError("media did not connect")
        await asyncio.sleep(0.05)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for member in joined:
        await member.pc.close()
        await member.connection.close()


# -- the forwarding measurement


@dataclass(frozen=True)
class Forwarding:
    """One measured window of a hub forwarding ``members`` synthetic members' media."""

    members: int
    kinds: str
    sframe: bool
    wall: float
    hub_cpu: float
    load_cpu: float
    machine_busy: float  # of all cores, everything on the machine included
    forwarded: dict[str, float]
    bytes_forwarded: dict[str, float]
    dropped: float

    @property
    def frames(self) -> float:
        return sum(self.forwarded.values())

    @property
    def us_per_frame(self) -> float:
        return self.hub_cpu / self.frames * 1e6

    @property
    def hub_cores(self) -> float:
        return self.hub_cpu / self.wall

    @property
    def load_cores(self) -> float:
        return self.load_cpu / self.wall

    @property
    def published_rate(self) -> float:
        """Frames per second the hub would forward if every published frame got through."""
        n = self.members
        return n * (n - 1) * sum(FRAMES_PER_SECOND[kind] for kind in KINDS_CHOICES[self.kinds])

    @property
    def delivered(self) -> float:
        return self.frames / self.wall / self.published_rate

    @property
    def bytes_per_frame(self) -> float:
        return sum(self.bytes_forwarded.values()) / self.frames


@asynccontextmanager
async def line_process(command: list[str], first_line: str) -> AsyncIterator[tuple[str, int]]:
    """A subprocess whose first output line starts with ``first_line``: (that line, pid).
    It is ended by closing its standard input, then terminated."""
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 90)).decode()
        if not line.startswith(first_line):
            raise RuntimeError(f"{command[2:4]} did not start: {line!r}")
        yield line.strip(), process.pid
    finally:
        assert process.stdin is not None
        process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()


async def forwarding(members: int, kinds: str, sframe: bool, window: float) -> Forwarding:
    hub_command = [sys.executable, "-m", "client.cli", "hub", "--route-media", "--port", "0"]
    async with contextlib.AsyncExitStack() as stack:
        line, hub_pid = await stack.enter_async_context(
            line_process([*hub_command, "--quiet"], "listening on ")
        )
        url = line.removeprefix("listening on ")
        shares = [members // LOAD_PROCESSES + (i < members % LOAD_PROCESSES) for i in range(2)]
        load_pids = []
        for share in filter(None, shares):
            load = [sys.executable, "-m", "tests.bench.group", "--load", url, "--members"]
            load += [str(share), "--kinds", kinds] + (["--sframe"] if sframe else [])
            _, pid = await stack.enter_async_context(line_process(load, "ready"))
            load_pids.append(pid)
        # Generous: on the shared machine the members' connections can take a while.
        deadline = time.monotonic() + 90
        while (await fetch_metrics(url)).get("blindhub_media_subscribers", 0) < members:
            if time.monotonic() > deadline:
                raise TimeoutError("not every member's media reached the hub")
            await asyncio.sleep(0.1)
        # Sleeps that shape the measurement: a warm-up, then the window. No order depends on them.
        await asyncio.sleep(WARMUP_SECONDS)
        before = await fetch_metrics(url)
        hub_cpu, load_cpu = cpu_of([hub_pid]), cpu_of(load_pids)
        busy, total = machine_ticks(read_text("/proc/stat"))
        started = time.monotonic()
        await asyncio.sleep(window)
        wall = time.monotonic() - started
        hub_cpu, load_cpu = cpu_of([hub_pid]) - hub_cpu, cpu_of(load_pids) - load_cpu
        busy_after, total_after = machine_ticks(read_text("/proc/stat"))
        after = await fetch_metrics(url)

    def delta(name: str, kind: str) -> float:
        return media_counter(after, name, kind) - media_counter(before, name, kind)

    return Forwarding(
        members=members,
        kinds=kinds,
        sframe=sframe,
        wall=wall,
        hub_cpu=hub_cpu,
        load_cpu=load_cpu,
        machine_busy=(busy_after - busy) / (total_after - total),
        forwarded={kind: delta("frames_forwarded", kind) for kind in KINDS_CHOICES[kinds]},
        bytes_forwarded={kind: delta("bytes_forwarded", kind) for kind in KINDS_CHOICES[kinds]},
        dropped=sum(delta("frames_dropped", kind) for kind in KINDS_CHOICES[kinds]),
    )


def spread(values: Sequence[float], digits: int = 2) -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def forwarding_report(results: list[Forwarding]) -> None:
    print("\n1-2. Hub CPU per forwarded frame (us), SFrame against plain, medians (min..max)")
    header = (
        f"{'kinds':<12}{'N':>3}{'plain us/frame':>22}{'SFrame us/frame':>22}{'ratio':>20}"
        f"{'hub cores':>20}{'delivered':>10}{'load cores':>12}{'machine':>9}{'B/frame':>16}"
    )
    print(header)
    for kinds in KINDS_CHOICES:
        for members in sorted({r.members for r in results}):
            plain = [
                r for r in results if (r.kinds, r.members, r.sframe) == (kinds, members, False)
            ]
            sframe = [
                r for r in results if (r.kinds, r.members, r.sframe) == (kinds, members, True)
            ]
            if not plain or not sframe:
                continue
            # Ratios run by run (the two variants of one run measured back to back).
            ratios = [s.us_per_frame / p.us_per_frame for p, s in zip(plain, sframe, strict=True)]
            both = plain + sframe
            sizes = f"{statistics.median(r.bytes_per_frame for r in plain):.0f}/"
            sizes += f"{statistics.median(r.bytes_per_frame for r in sframe):.0f}"
            print(
                f"{kinds:<12}{members:>3}"
                f"{spread([r.us_per_frame for r in plain], 1):>22}"
                f"{spread([r.us_per_frame for r in sframe], 1):>22}"
                f"{spread(ratios):>20}"
                f"{spread([r.hub_cores for r in both]):>20}"
                f"{statistics.median(r.delivered for r in both):>10.3f}"
                f"{statistics.median(r.load_cores for r in both):>12.2f}"
                f"{statistics.median(r.machine_busy for r in both):>9.2f}"
                f"{sizes:>16}"
            )
    print(
        "(hub cores: the hub's CPU over the window, in cores; delivered: forwarded frames over "
        "what the members published times N-1; load cores: the two load generators' CPU; "
        "machine: share of all cores busy, other work included; B/frame: plain/SFrame)"
    )
    print(f"\n   Capacity: the largest N the hub forwards at {CORE_BUDGET:.0%} of one core")
    for kinds in KINDS_CHOICES:
        measured = [r for r in results if r.kinds == kinds]
        if not measured:
            continue
        largest = max(r.members for r in measured)
        at_largest = [r for r in measured if r.members == largest]
        cost = statistics.median(r.us_per_frame for r in at_largest) / 1e6
        per_member_pair = sum(FRAMES_PER_SECOND[kind] for kind in KINDS_CHOICES[kinds])
        n = 2
        while cost * (n + 1) * n * per_member_pair <= CORE_BUDGET:
            n += 1
        within = sorted(
            {
                r.members
                for r in measured
                if statistics.median(x.hub_cores for x in measured if x.members == r.members)
                <= CORE_BUDGET
            }
        )
        print(
            f"   {kinds:<12} measured within {CORE_BUDGET:.0%}: N = {within or 'none'}; "
            f"estimated from the cost per frame at N = {largest} ({cost * 1e6:.0f} us): N = {n}"
        )


# -- join and leave with real group calls


NAMES = ("alice", "bob", "carol")
TONES = (440, 550, 660, 770)


def member_config(url: str, name: str, tone: float) -> CallConfig:
    return CallConfig(
        room="churn",
        hub_url=url,
        name=name,
        identity=IdentityKey.generate(os.urandom),
        known_peers=KnownPeers(),
        tracks=[ToneTrack(tone), PatternTrack()],
        verify=Verify.TOFU,
        setup_timeout=30,
    )


async def wait_until(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the group call did not get there in time")
        await asyncio.sleep(0.005)


def heard(stats: GroupStats, peer: PeerId) -> bool:
    member = stats.members.get(peer)
    return member is not None and member.first_audio_seconds is not None


def peer_named(stats: GroupStats, name: str) -> PeerId | None:
    return next((PeerId(p) for p, m in stats.members.items() if m.name == name), None)


def fresh_key_after(stats: GroupStats, generation: int) -> float | None:
    """When (seconds after the join) we first sent under a generation above ``generation``."""
    return next((c.seconds for c in stats.key_changes if c.generation > generation), None)


def current_generation(stats: GroupStats) -> int:
    return stats.key_changes[-1].generation if stats.key_changes else 0


@dataclass
class Churn:
    cycles: int = 0
    join_seconds: list[float] = field(default_factory=list)  # joiner: join -> each member
    leave_seconds: dict[str, list[float]] = field(default_factory=dict)  # how -> each stayer
    losses: dict[str, int] = field(default_factory=dict)  # stayer -> frames lost
    by_reason: dict[str, int] = field(default_factory=dict)  # over all stayers
    held: int = 0
    released: int = 0
    before_join: int = 0


async def churn(cycles: int) -> Churn:
    """Three members stay; a fourth joins and leaves ``cycles`` times."""
    server = HubServer(media=MediaServer(Limits(max_peers_per_room=8)))
    await server.start()
    result = Churn(leave_seconds={"hangs up": [], "vanishes": []})
    stayers = [
        GroupCall(member_config(server.url, name, tone))
        for name, tone in zip(NAMES, TONES[: len(NAMES)], strict=True)
    ]
    tasks = [asyncio.create_task(call.run()) for call in stayers]
    try:
        await wait_until(
            lambda: all(
                sum(m.first_audio_seconds is not None for m in c.stats.members.values()) == 2
                for c in stayers
            )
        )
        for cycle in range(cycles):
            await churn_cycle(server.url, stayers, cycle, result)
            result.cycles += 1
            print(f"churn cycle {cycle + 1}/{cycles}: done", file=sys.stderr, flush=True)
    finally:
        for call in stayers:
            call.hangup("done")
        summaries = await asyncio.gather(*tasks)
        await server.close()
    for call, summary in zip(stayers, summaries, strict=True):
        counters = [getattr(m, k) for m in summary.members.values() for k in ("audio", "video")]
        result.losses[call.config.name] = sum(c.get(r, 0) for c in counters for r in LOSS_REASONS)
        for reason in (*LOSS_REASONS, "unauthenticated", "unknown_key", "replayed"):
            result.by_reason[reason] = result.by_reason.get(reason, 0) + sum(
                c.get(reason, 0) for c in counters
            )
        result.held += sum(c.get("held", 0) for c in counters)
        result.released += sum(c.get("released", 0) for c in counters)
        result.before_join += sum(c.get("before_join", 0) for c in counters)
    return result


async def churn_cycle(url: str, stayers: list[GroupCall], cycle: int, result: Churn) -> None:
    """Guest number ``cycle`` joins, is heard by all and hears all, then leaves: even cycles
    hang up (a sealed goodbye to each member comes before the hub's word), odd ones vanish
    (the task is cancelled: no goodbye, the members learn it from the hub alone)."""
    name = f"guest{cycle}"
    joiner = GroupCall(member_config(url, name, TONES[3]))
    task = asyncio.create_task(joiner.run())
    await wait_until(lambda: all(peer_named(c.stats, name) for c in stayers))
    guest = [peer_named(c.stats, name) or PeerId("") for c in stayers]
    pairs = list(zip(stayers, guest, strict=True))
    await wait_until(
        lambda: (
            all(heard(c.stats, p) for c, p in pairs)
            and sum(heard(joiner.stats, PeerId(p)) for p in joiner.stats.members) == len(stayers)
        )
    )
    result.join_seconds += [
        m.first_audio_seconds
        for m in joiner.stats.members.values()
        if m.first_audio_seconds is not None
    ]
    generations = [current_generation(c.stats) for c in stayers]
    how = "hangs up" if cycle % 2 == 0 else "vanishes"
    if how == "hangs up":
        joiner.hangup("leaving")
        await task
    else:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    after = list(zip(stayers, guest, generations, strict=True))
    await wait_until(
        lambda: all(
            p in c.stats.leaves_announced and fresh_key_after(c.stats, g) is not None
            for c, p, g in after
        )
    )
    for call, peer, generation in after:
        fresh = fresh_key_after(call.stats, generation)
        assert fresh is not None
        result.leave_seconds[how].append(fresh - call.stats.leaves_announced[peer])


def churn_report(result: Churn) -> None:
    print(
        f"\n3. Join and leave: a fourth member joins and leaves {result.cycles} times, "
        "three members stay (real group calls, tone and pattern)"
    )
    joins = result.join_seconds
    print(
        "   join -> first decrypted audio of each member, ms: "
        f"{spread([s * 1e3 for s in joins], 0)} over {len(joins)}"
    )
    for how, values in result.leave_seconds.items():
        if values:
            print(
                f"   leave ({how}) -> each stayer's fresh key, ms after the hub's announcement: "
                f"{spread([s * 1e3 for s in values], 0)} over {len(values)}; "
                f"target at most {LEAVE_TARGET_SECONDS * 1e3:.0f}: "
                f"{'met' if max(values) <= LEAVE_TARGET_SECONDS else 'MISSED'}"
            )
    total = sum(result.losses.values())
    print(
        f"   frames lost to key timing at the members that stayed (failed, expired, "
        f"overflowed): {total} {result.losses}; target 0: {'met' if total == 0 else 'MISSED'}"
    )
    print(f"   by reason: {result.by_reason}")
    print(
        f"   held for a key then decrypted: {result.released} of {result.held} held; "
        f"dropped as sent before a join: {result.before_join}"
    )


async def main(quick: bool, runs: int, sizes: Sequence[int], window: float, cycles: int) -> None:
    results: list[Forwarding] = []
    configurations = [(k, n) for k in KINDS_CHOICES for n in sizes]
    for run in range(runs):
        for kinds, members in configurations:
            # Alternate which variant goes first, so that drifting load hits both alike.
            for sframe in (False, True) if run % 2 == 0 else (True, False):
                results.append(await forwarding(members, kinds, sframe, window))
                print(
                    f"run {run + 1}/{runs} {kinds} N={members} "
                    f"{'SFrame' if sframe else 'plain'}: {results[-1].us_per_frame:.1f} us/frame",
                    file=sys.stderr,
                    flush=True,
                )
    forwarding_report(results)
    churn_report(await churn(cycles))
    if quick:
        print("(--quick: a smoke run, not a measurement)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--runs", type=int, help="repeat each forwarding measurement (3)")
    parser.add_argument("--sizes", help="members per room, comma-separated (2,4,8)")
    parser.add_argument("--window", type=float, help=f"measured seconds ({WINDOW_SECONDS})")
    parser.add_argument("--cycles", type=int, help=f"joins and leaves ({CHURN_CYCLES})")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--members", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kinds", choices=KINDS_CHOICES, help=argparse.SUPPRESS)
    parser.add_argument("--sframe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load is not None:
        kinds = KINDS_CHOICES[args.kinds]
        asyncio.run(load_generator(args.load, "bench", args.members, kinds, args.sframe))
    else:
        sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else list(SIZES)
        asyncio.run(
            main(
                args.quick,
                args.runs or (1 if args.quick else 3),
                sizes[:2] if args.quick and not args.sizes else sizes,
                args.window or (2.0 if args.quick else WINDOW_SECONDS),
                args.cycles or (2 if args.quick else CHURN_CYCLES),
            )
        )
