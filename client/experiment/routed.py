"""The routed cells of the interception experiment (issue 12): a group call through a hub that
routes every packet, honest and hostile.

Each cell runs one real three-party group call (``client.group_call.GroupCall``: alice at
440 Hz, bob at 550 Hz, carol at 660 Hz, each with the numbered test pattern) through a real
routing hub (``signaling.media_server.MediaServer``, recording what it forwards with the
operator's ``MediaRecorder``), composed here into a hostile one where the cell says so: a
`HostileMediaServer` that adds frames of its own making to a member's stream (``inject``),
forwards one member's frames in place of another's (``splice``), forwards old frames again and
out of order (``replay``), or takes the keys of a member who leaves (``leave``). The honest
hub's code is unchanged: the hostile one subclasses it, and only here.

The hub's recovery is measured from what it keeps, its recording files, read exactly (FFmpeg's
parsers off) and fed to Opus and VP8 decoders, as an operator or a contractor would; the cell
also plays each file with PyAV's default demuxer and decoders, as a player would. The first
routed cell is the control: the same hub and peers with the frames in the clear (an
experiment-only composition, ``Layers.PLAIN.group_parts()``). If the hub's recording of the
control does not give back every member's tone and picture, the routed cells prove nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fractions
import json
import os
import time
from array import array
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import msgspec

from client.call import CallConfig
from client.experiment.analysis import middle_second, tone_correlation
from client.experiment.layers import CellScenario, Layers
from client.experiment.media_mitm import (
    RecoveredAudio,
    RecoveredVideo,
    decode_opus,
    decode_vp8,
)
from client.group_call import GroupCall, GroupStats
from client.media import SAMPLE_RATE, PatternTrack, ToneTrack, read_pattern_number
from client.session import CallError, Verify
from crypto.identity import IdentityKey, KnownPeers
from crypto.sender_keys import SenderKeyReceiver
from signaling.hub import Delivery, Limits
from signaling.media_routing import MediaRouter
from signaling.media_server import MediaServer
from signaling.protocol import MediaTracks, PeerId, PeerJoined, PeerLeft, RelayFrom, Welcome
from signaling.recording import MediaRecorder
from signaling.server import HubServer

ALICE, BOB, CAROL = "alice", "bob", "carol"
MEMBERS = (ALICE, BOB, CAROL)
GROUP_TONES = {ALICE: 440.0, BOB: 550.0, CAROL: 660.0}
RECOVERED = 0.9
NOTHING = 0.1
SETUP_TIMEOUT = 30.0
HEARD_SAMPLES = 30_000  # what each member must have heard of every other before the attack
# After the attack stops, long enough for a frame the receivers hold for a key to expire (the
# group call holds one at most 1 s) and for the last attacked frames to arrive.
SETTLE_SECONDS = 1.5
# Opus's "silence" frame (RFC 6716: a 20 ms CELT frame of digital silence), as Discord's SFU
# makes one: what a hub injects when it wants receivers to play something of its own.
OPUS_SILENCE = bytes((0xF8, 0xFF, 0xFE))
EXACT_FRAMES = {"fflags": "+noparse+nofillin"}
FRAME_INTERVAL = {"audio": 960, "video": 3000}  # RTP ticks between frames (48 kHz, 90 kHz)
KINDS = ("audio", "video")


class RoutedAttack(enum.Enum):
    RECORD = "record"
    INJECT = "inject"
    SPLICE = "splice"
    REPLAY = "replay+reorder"
    LEAVE = "leave-collusion"
    GHOST = "ghost"
    SPLIT = "roster-split"


@dataclass(frozen=True)
class RoutedScenario(CellScenario):
    """One routed cell: the members' frame protection and what the routing hub does."""

    layers: Layers
    attack: RoutedAttack

    @property
    def attack_name(self) -> str:
        return f"routed-{self.attack.value}"


ROUTED_SCENARIOS: tuple[RoutedScenario, ...] = (
    RoutedScenario(Layers.PLAIN, RoutedAttack.RECORD),
    RoutedScenario(Layers.VERIFIED, RoutedAttack.RECORD),
    RoutedScenario(Layers.VERIFIED, RoutedAttack.INJECT),
    RoutedScenario(Layers.VERIFIED, RoutedAttack.SPLICE),
    RoutedScenario(Layers.VERIFIED, RoutedAttack.REPLAY),
    RoutedScenario(Layers.VERIFIED, RoutedAttack.LEAVE),
    RoutedScenario(Layers.VERIFIED, RoutedAttack.GHOST),
    RoutedScenario(Layers.SEALED, RoutedAttack.GHOST),
    RoutedScenario(Layers.VERIFIED, RoutedAttack.SPLIT),
)
GHOST = "ghost"
# Who the hub keeps out of whose view, by order of joining (alice 0, bob 1, carol 2, the ghost
# 3), both ways: the ghost is shown to alice and bob but not to carol; in the split, bob and
# carol never learn of each other.
HIDDEN: dict[RoutedAttack, frozenset[frozenset[int]]] = {
    RoutedAttack.GHOST: frozenset({frozenset({2, 3})}),
    RoutedAttack.SPLIT: frozenset({frozenset({1, 2})}),
}


# -- the hostile routing hub


class FrameAttack:
    """What a hostile routing hub does to the frames it routes, while ``armed``: the base
    forwards every frame honestly. ``target`` is the publisher attacked."""

    def __init__(self) -> None:
        self.armed = False
        self.target: PeerId | None = None
        # (subscriber, kind, what) -> frames; what: "silence", "keyframe", "bit-flip", ...
        self.counts: dict[tuple[PeerId, str, str], int] = defaultdict(int)
        self.hidden: Callable[[PeerId, PeerId], bool] = lambda recipient, subject: False

    def frame(
        self,
        server: HostileMediaServer,
        publisher: PeerId,
        kind: str,
        frame: bytes,
        timestamp: int,
        forward: Callable[[bytes, int], None],
    ) -> None:
        forward(frame, timestamp)

    def routes(
        self, publisher: PeerId, routes: tuple[tuple[PeerId, int], ...]
    ) -> tuple[tuple[PeerId, int], ...]:
        """No frames of a member to those the hub hides it from."""
        return tuple(route for route in routes if not self.hidden(route[0], publisher))

    def total(self, what: str) -> int:
        return sum(count for (_, _, done), count in self.counts.items() if done == what)

    def toward(self, subscriber: PeerId, kind: str) -> int:
        return sum(n for (sub, k, _), n in self.counts.items() if (sub, k) == (subscriber, kind))


class _AttackRouter(MediaRouter):
    """The honest router, except that the attack may take subscribers off a publisher's routes."""

    def __init__(self, attack: FrameAttack, max_peers: int, join_timeout: float) -> None:
        super().__init__(max_peers, join_timeout)
        self._attack = attack

    def routes(self, publisher: PeerId) -> tuple[tuple[PeerId, int], ...]:
        return self._attack.routes(publisher, super().routes(publisher))


class HostileMediaServer(MediaServer):
    """The honest ``MediaServer`` (connections, slots, recording) with ``attack`` on its frames."""

    def __init__(self, limits: Limits, *, recorder: MediaRecorder, attack: FrameAttack) -> None:
        super().__init__(limits, recorder=recorder)
        self.attack = attack
        self.router = _AttackRouter(attack, limits.max_peers_per_room, limits.join_timeout)

    def _frame_sink(self, publisher: PeerId, room: str, kind: str) -> Callable[[bytes, int], None]:
        forward = super()._frame_sink(publisher, room, kind)
        attack = self.attack

        def hostile(frame: bytes, timestamp: int) -> None:
            attack.frame(self, publisher, kind, frame, timestamp, forward)

        return hostile

    def put(
        self, subscriber: PeerId, publisher: PeerId, kind: str, frame: bytes, timestamp: int
    ) -> bool:
        """Send ``frame`` to ``subscriber`` on the slot where it receives ``publisher``."""
        for routed, slot in MediaRouter.routes(self.router, publisher):
            if routed == subscriber:
                self._connections[subscriber].slots[slot][kind].put(frame, timestamp)
                return True
        return False

    def subscribers(self, publisher: PeerId) -> list[PeerId]:
        return [subscriber for subscriber, _ in MediaRouter.routes(self.router, publisher)]


class HidingHubServer(HubServer):
    """The honest websockets server of a routing hub, except that it keeps members out of each
    other's view (``hide``: pairs of join positions, 0 for the first member to join): it drops
    the ``peer-joined``, ``peer-left`` and relays between a hidden pair, takes each out of the
    other's ``welcome`` and ``media-tracks``, and (through ``FrameAttack.hidden``) its media off
    the other's routes. The routing core and the media server stay the honest ones."""

    def __init__(self, media: HostileMediaServer, hide: frozenset[frozenset[int]]) -> None:
        super().__init__(media=media)
        self.joined: list[PeerId] = []  # in the order they joined
        self.dropped: dict[str, int] = defaultdict(int)  # by message type
        self._hide = hide
        media.attack.hidden = self.hidden

    def hidden(self, recipient: PeerId, subject: PeerId) -> bool:
        if recipient not in self.joined or subject not in self.joined:
            return False
        pair = frozenset({self.joined.index(recipient), self.joined.index(subject)})
        return pair in self._hide

    def deliver(self, deliveries: list[Delivery]) -> None:
        kept = [shown for shown in map(self._shown, deliveries) if shown is not None]
        super().deliver(kept)

    def _shown(self, delivery: Delivery) -> Delivery | None:
        message, recipient = delivery.message, delivery.recipient
        if isinstance(message, Welcome):
            self.joined.append(recipient)
            peers = tuple(peer for peer in message.peers if not self.hidden(recipient, peer))
            self.dropped["welcome-peers"] += len(message.peers) - len(peers)
            return msgspec.structs.replace(
                delivery, message=msgspec.structs.replace(message, peers=peers)
            )
        if isinstance(message, MediaTracks):
            tracks = tuple(t for t in message.tracks if not self.hidden(recipient, t.peer_id))
            return msgspec.structs.replace(delivery, message=MediaTracks(tracks))
        subject = (
            message.peer_id
            if isinstance(message, PeerJoined | PeerLeft)
            else message.sender
            if isinstance(message, RelayFrom)
            else None
        )
        if subject is not None and self.hidden(recipient, subject):
            self.dropped[message.TYPE] += 1
            return None
        return delivery


def _vp8_keyframe() -> bytes:
    """A VP8 keyframe of the hub's own making (a grey picture), as an SFU could send one."""
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 320, 240, "yuv420p"
    encoder.time_base = fractions.Fraction(1, 30)
    picture = av.VideoFrame(320, 240, "yuv420p")
    for plane in picture.planes:
        plane.update(bytes([128]) * plane.buffer_size)
    picture.pts = 0
    packets = [*encoder.encode(picture), *encoder.encode(None)]
    return bytes(packets[0])


def _flip_bit(frame: bytes) -> bytes:
    """``frame`` with one bit of its last byte (the authentication tag) changed."""
    return frame[:-1] + bytes((frame[-1] ^ 0x01,))


class InjectFrames(FrameAttack):
    """Frames of the hub's own making into ``target``'s streams at every subscriber: an Opus
    silence frame or a VP8 keyframe, and a copy of the target's frame with one bit changed,
    each every ``every`` frames. Each goes just before the target's frame, half a frame
    earlier in RTP time, so that no receiver merges it with a frame of the target's."""

    every = 5

    def __init__(self) -> None:
        super().__init__()
        self._made = {"audio": OPUS_SILENCE, "video": _vp8_keyframe()}
        self._seen: dict[str, int] = defaultdict(int)

    def frame(
        self,
        server: HostileMediaServer,
        publisher: PeerId,
        kind: str,
        frame: bytes,
        timestamp: int,
        forward: Callable[[bytes, int], None],
    ) -> None:
        if self.armed and publisher == self.target:
            self._seen[kind] += 1
            if self._seen[kind] % self.every == 0:
                turn = self._seen[kind] // self.every
                what = "bit-flip" if turn % 2 else ("silence" if kind == "audio" else "keyframe")
                made = _flip_bit(frame) if what == "bit-flip" else self._made[kind]
                earlier = (timestamp - FRAME_INTERVAL[kind] // 2) % 2**32
                for subscriber in server.subscribers(publisher):
                    if server.put(subscriber, publisher, kind, made, earlier):
                        self.counts[subscriber, kind, what] += 1
        forward(frame, timestamp)


class SpliceFrames(FrameAttack):
    """At ``victim`` (a subscriber), ``source``'s frames go on the slot of ``target`` in place
    of ``target``'s own (the hub rewrites the SSRC: the receiver sees them on that slot)."""

    def __init__(self) -> None:
        super().__init__()
        self.source: PeerId | None = None
        self.victim: PeerId | None = None

    def routes(
        self, publisher: PeerId, routes: tuple[tuple[PeerId, int], ...]
    ) -> tuple[tuple[PeerId, int], ...]:
        if self.armed and publisher == self.target:
            return tuple(route for route in routes if route[0] != self.victim)
        return routes

    def frame(
        self,
        server: HostileMediaServer,
        publisher: PeerId,
        kind: str,
        frame: bytes,
        timestamp: int,
        forward: Callable[[bytes, int], None],
    ) -> None:
        forward(frame, timestamp)
        if self.armed and publisher == self.source:
            assert self.target is not None and self.victim is not None
            if server.put(self.victim, self.target, kind, frame, timestamp):
                self.counts[self.victim, kind, "spliced"] += 1


class ReplayAndReorder(FrameAttack):
    """In ``target``'s streams at every subscriber: every ``every`` frames, a frame already
    forwarded ``back`` frames ago again (a replay), and, in between, two frames swapped (a
    reorder well inside the receivers' replay window).

    The swapped and replayed frames go straight to the subscribers' slots, not into the hub's
    recording: the recording is not what this cell measures."""

    every = 10
    back = 5

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[str, int] = defaultdict(int)
        self._history: dict[str, deque[tuple[bytes, int]]] = defaultdict(
            lambda: deque(maxlen=self.back)
        )
        self._held: dict[str, tuple[bytes, int]] = {}

    def frame(
        self,
        server: HostileMediaServer,
        publisher: PeerId,
        kind: str,
        frame: bytes,
        timestamp: int,
        forward: Callable[[bytes, int], None],
    ) -> None:
        if publisher != self.target:
            forward(frame, timestamp)
            return
        history = self._history[kind]
        held = self._held.pop(kind, None)
        if held is not None:
            forward(frame, timestamp)  # the later frame first ...
            for subscriber in server.subscribers(publisher):  # ... then the one held back
                if server.put(subscriber, publisher, kind, *held):
                    self.counts[subscriber, kind, "reordered"] += 1
            history.extend((held, (frame, timestamp)))
            return
        self._seen[kind] += 1
        turn = self._seen[kind] % self.every
        if self.armed and turn == self.every // 2:
            self._held[kind] = (frame, timestamp)
            return
        forward(frame, timestamp)
        if self.armed and turn == 0 and len(history) == self.back:
            old, old_timestamp = history[0]
            for subscriber in server.subscribers(publisher):
                if server.put(subscriber, publisher, kind, old, old_timestamp):
                    self.counts[subscriber, kind, "replayed"] += 1
        history.append((frame, timestamp))


ATTACKS: dict[RoutedAttack, Callable[[], FrameAttack]] = {
    RoutedAttack.RECORD: FrameAttack,
    RoutedAttack.INJECT: InjectFrames,
    RoutedAttack.SPLICE: SpliceFrames,
    RoutedAttack.REPLAY: ReplayAndReorder,
    RoutedAttack.LEAVE: FrameAttack,
    RoutedAttack.GHOST: FrameAttack,
    RoutedAttack.SPLIT: FrameAttack,
}


# -- what the hub recovers from its recording


@dataclass
class HubStream:
    """What the hub got from one member's recorded streams."""

    audio: RecoveredAudio = field(repr=False)
    video: RecoveredVideo = field(repr=False)
    correlation: float
    pattern_number: int | None  # read from the last picture it decoded, if any
    frames: dict[str, int]  # recorded frames per kind
    player: dict[str, dict[str, float]]  # PyAV's default demuxer and decoders, per kind
    files: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "audio_correlation": round(self.correlation, 4),
            "audio_seconds": round(self.audio.seconds, 2),
            "video_frames_decoded": self.video.frames_decoded,
            "pattern_number": self.pattern_number,
            "recorded_frames": self.frames,
            "player": self.player,
            "files": [path.name for path in self.files],
        }


def recorded_frames(path: Path) -> list[bytes]:
    """Every frame of a recording file, exactly as the hub forwarded it."""
    with av.open(str(path), options=EXACT_FRAMES) as container:
        return [bytes(packet) for packet in container.demux() if packet.size]


def play(path: Path, kind: str) -> dict[str, float]:
    """What PyAV's default demuxer and decoders make of a recording, as a player would open it:
    frames decoded, packets the decoder refused, and seconds of audio."""
    decoded = refused = 0
    seconds = 0.0
    with av.open(str(path)) as container:
        stream = container.streams.audio[0] if kind == "audio" else container.streams.video[0]
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                refused += 1
                continue
            for decoded_frame in frames:
                decoded += 1
                if isinstance(decoded_frame, av.AudioFrame):
                    seconds += decoded_frame.samples / decoded_frame.sample_rate
    return {"decoded": decoded, "refused": refused, "audio_seconds": round(seconds, 2)}


def hub_recovery(directory: Path, room: str, names: dict[PeerId, str]) -> dict[str, HubStream]:
    """Decode every member's recorded streams; by member name."""
    recovered = {}
    for peer, name in names.items():
        files = {kind: directory / f"{room}.{peer}.{kind}.mkv" for kind in KINDS}
        if not all(path.exists() for path in files.values()):
            continue
        frames = {kind: recorded_frames(path) for kind, path in files.items()}
        audio, video = decode_opus(frames["audio"]), decode_vp8(frames["video"])
        recovered[name] = HubStream(
            audio=audio,
            video=video,
            correlation=_correlation(audio.samples, GROUP_TONES[name]),
            pattern_number=None
            if video.last_frame is None
            else read_pattern_number(video.last_frame),
            frames={kind: len(f) for kind, f in frames.items()},
            player={kind: play(path, kind) for kind, path in files.items()},
            files=list(files.values()),
        )
    return recovered


def _correlation(samples: array[int], tone: float) -> float:
    if len(samples) < SAMPLE_RATE // 2:
        return 0.0
    return tone_correlation(middle_second(samples, SAMPLE_RATE), SAMPLE_RATE, tone)


# -- a cell's outcome


@dataclass
class MemberOutcome:
    """One member's side of a routed cell."""

    completed: bool
    outcome: str
    heard: dict[str, float]  # by the name of the member heard: correlation with its tone
    video_frames: dict[str, int]
    security_code: str | None
    roster: dict[str, str]  # name -> pin status, as the member saw it
    received: dict[str, dict[str, dict[str, Any]]]  # from -> kind -> receiver counters
    samples: dict[str, array[int]] = field(repr=False, default_factory=dict)
    detections: dict[str, int] = field(default_factory=dict)  # of its pairwise sessions
    # Frames on one member's slot that another's key authenticated: slot's name -> sender's.
    spliced: dict[str, dict[str, int]] = field(default_factory=dict)

    def rejected(self, name: str, kind: str) -> int:
        """Frames of ``name``'s ``kind`` this member never decoded: failed to decrypt, or held
        for a key that never came."""
        counters = self.received.get(name, {}).get(kind, {})
        return sum(counters.get(k, 0) for k in ("failed", "expired", "overflowed", "before_join"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "outcome": self.outcome,
            "heard_correlation": {name: round(value, 4) for name, value in self.heard.items()},
            "video_frames": self.video_frames,
            "security_code": self.security_code,
            "roster": self.roster,
            "received": self.received,
            "detections": self.detections,
            "spliced": self.spliced,
        }


@dataclass
class RoutedCell:
    """What one routed cell measured."""

    scenario: RoutedScenario
    members: dict[str, MemberOutcome]
    hub: dict[str, HubStream]
    attack: dict[str, Any]  # what the hostile hub did, in numbers
    seconds: float
    # Leave collusion: frames the leaver's keys decrypted among those sent more than 1 s after
    # the hub announced the leave, and what the hub made of them.
    after_leave: dict[str, Any] | None = None
    # Ghost participant: what the hub's own member got (rosters that show it, frames it
    # decrypted, what its keys open of what the hub recorded before it joined).
    ghost: dict[str, Any] | None = None

    @property
    def senders(self) -> list[str]:
        return [name for name in MEMBERS if name in self.hub]

    @property
    def peer_audio_correlation(self) -> float:
        """The worst any member heard any other member that stayed (0: someone heard no one)."""
        values = [
            value
            for member in self.members.values()
            for name, value in member.heard.items()
            if name in self.members
        ]
        return min(values) if values else 0.0

    @property
    def hub_audio_correlation(self) -> float:
        return max((stream.correlation for stream in self.hub.values()), default=0.0)

    @property
    def hub_audio_seconds(self) -> float:
        return sum(stream.audio.seconds for stream in self.hub.values())

    @property
    def hub_decoded_video_frames(self) -> int:
        return sum(stream.video.frames_decoded for stream in self.hub.values())

    @property
    def all_completed(self) -> bool:
        return all(member.completed for member in self.members.values())

    @property
    def detected(self) -> list[str]:
        found = set()
        for member in self.members.values():
            for name in member.received:
                for kind in KINDS:
                    counters = member.received[name].get(kind, {})
                    if counters.get("replayed"):
                        found.add("media-replay-rejected")
                    if counters.get("unauthenticated"):
                        found.add("media-alteration-rejected")
                    if counters.get("malformed") or counters.get("unknown_key"):
                        found.add("media-foreign-frame-rejected")
            found |= set(member.detections)
        if self.distinct_codes > 1:
            found.add("security-code-mismatch")
        return sorted(found)

    @property
    def distinct_codes(self) -> int:
        """How many different security codes the members in the call at its end were shown (one
        who left saw a roster that had changed): more than one is what comparing them exposes."""
        return len({m.security_code for m in self.members.values() if m.outcome == "duration"})

    def roster_of(self, name: str) -> set[str]:
        member = self.members.get(name)
        return set(member.roster) if member is not None else set()

    def attacked_all_rejected(self) -> bool:
        """Every member rejected, of the target's streams, exactly the frames the hub made or
        spliced toward it."""
        toward = self.attack.get("toward", {})
        return bool(toward) and all(
            self.members[name].rejected(self.attack["target"], kind) == count
            for name, kinds in toward.items()
            for kind, count in kinds.items()
        )

    def attacked_rejected_at_most(self) -> bool:
        """Every member rejected some of the target's frames of each kind, and no more than
        the hub made toward it (a frame lost on the way is neither)."""
        toward = self.attack.get("toward", {})
        return bool(toward) and all(
            0 < self.members[name].rejected(self.attack["target"], kind) <= count
            for name, kinds in toward.items()
            for kind, count in kinds.items()
        )

    def judge(self) -> tuple[bool, str]:
        attack = self.scenario.attack
        heard = self.peer_audio_correlation >= RECOVERED and self.all_completed
        nothing = self.hub_audio_correlation < NOTHING and self.hub_decoded_video_frames == 0
        if self.scenario.is_control:
            patterns = all(stream.pattern_number is not None for stream in self.hub.values())
            recovered = len(self.hub) == len(MEMBERS) and all(
                stream.correlation >= RECOVERED for stream in self.hub.values()
            )
            ok = heard and recovered and patterns
            return ok, (
                "CONTROL: the routing hub's recording plays back every member's tone and picture"
                if ok
                else "CONTROL FAILED: the routing hub did not recover plain frames; "
                "EXPERIMENT INVALID"
            )
        recorded = len(self.hub) == len(MEMBERS)
        if attack is RoutedAttack.RECORD:
            played = all(stream.player["video"]["decoded"] == 0 for stream in self.hub.values())
            return heard and recorded and nothing and played, (
                "PROTECTED: every member hears every other; the hub forwarded and recorded "
                "everything and its decoders recover no tone and no picture"
            )
        if attack is RoutedAttack.INJECT:
            made = self.attack["counts"]
            ok = heard and nothing and all(made.values()) and self.attacked_rejected_at_most()
            return ok, (
                "PROTECTED: the frames the hub made (silence, keyframe, one bit changed) were "
                "rejected and counted at every receiver, none decoded"
            )
        if attack is RoutedAttack.SPLICE:
            spliced = self.attack["counts"].get("spliced", 0) > 0
            # How much of the source's tone the victim heard on the target's track: none.
            wrong = self.attack["victim_heard_source_as_target"]
            # The victim told whose frames they really were, by the key that authenticates them.
            attributed = self.members[CAROL].spliced.get(ALICE, {}).get(BOB, 0)
            made = self.attack["counts"].get("spliced", 0)
            ok = spliced and self.attacked_all_rejected() and wrong < NOTHING and nothing
            ok = ok and 0 < attributed <= made
            return ok, (
                "PROTECTED: every frame the hub moved onto another member's slot was refused "
                "there, never played, and attributed to its true sender by its key"
            )
        if attack is RoutedAttack.REPLAY:
            counts = self.attack["counts"]
            ok = heard and nothing and counts.get("replayed", 0) > 0
            ok = ok and counts.get("reordered", 0) > 0 and self.replays_exact
            return ok, (
                "PROTECTED: every replayed frame rejected, every reordered one decrypted; "
                "counts exact"
            )
        if attack is RoutedAttack.GHOST:
            return self._judge_ghost(heard and nothing)
        if attack is RoutedAttack.SPLIT:
            split = (
                self.roster_of(ALICE) == {BOB, CAROL}
                and self.roster_of(BOB) == {ALICE}
                and self.roster_of(CAROL) == {ALICE}
            )
            ok = heard and nothing and split and self.distinct_codes == len(MEMBERS)
            return ok, (
                "DETECTED: the hub hid bob and carol from each other; the three members were "
                "shown three different security codes, which comparing them aloud exposes"
            )
        assert attack is RoutedAttack.LEAVE
        leave = self.after_leave or {}
        ok = (
            bool(leave)
            and leave["frames"] > 0
            and leave["decrypted"] == 0
            and leave["correlation"] < NOTHING
            and nothing
        )
        return ok, (
            "PROTECTED: with the keys of the member who left, the hub decrypts nothing sent "
            "more than 1 s after the leave was announced"
        )

    def _judge_ghost(self, protected: bool) -> tuple[bool, str]:
        ghost = self.ghost or {}
        before = ghost.get("before_join", {})
        # What the hub recorded before the ghost joined stays closed to the ghost's keys.
        untouched = before.get("frames", 0) > 0 and before.get("decrypted") == 0
        decrypted = ghost.get("decrypted", {})
        if self.scenario.layers is Layers.VERIFIED:
            refused = all(
                self.members[name].detections.get("identity-refused", 0) > 0
                for name in ghost.get("shown_to", ())
            )
            ok = protected and untouched and refused and bool(ghost.get("shown_to"))
            ok = ok and not ghost.get("on_rosters") and not any(decrypted.values())
            ok = ok and self.distinct_codes == 1
            return ok, (
                "REFUSED before any key: members with pinned identities refused the hub's own "
                "member; it decrypted nothing, no roster shows it, the security codes agree"
            )
        shown = ghost.get("on_rosters") == {name: "NEW" for name in ghost.get("shown_to", ())}
        ok = protected and untouched and shown and bool(ghost.get("shown_to"))
        ok = ok and not any(n for name, n in decrypted.items() if name not in ghost["shown_to"])
        ok = ok and self.distinct_codes > 1
        return ok, (
            "DETECTED, not prevented: the hub's member is NEW on the rosters of those it was "
            "shown to, whose security code then differs; it opens nothing of the others' or "
            "from before it joined"
        )

    @property
    def replays_exact(self) -> bool:
        """Every member counted as replayed exactly the frames the hub replayed toward it, and
        failed nothing else of the target's (the reordered frames all decrypted)."""
        toward = self.attack.get("replayed_toward", {})
        target = str(self.attack.get("target"))
        return bool(toward) and all(
            self.members[name].received[target][kind].get("replayed", 0) == count
            and self.members[name].rejected(target, kind) == count
            for name, kinds in toward.items()
            for kind, count in kinds.items()
        )

    def details(self) -> dict[str, Any]:
        """What only a routed cell reports (the runner's ``cell_report`` adds what every cell
        does)."""
        return {
            "members": {name: member.as_dict() for name, member in self.members.items()},
            "hub": {name: stream.as_dict() for name, stream in self.hub.items()},
            "hub_attack": self.attack,
            "after_leave": self.after_leave,
            "ghost": self.ghost,
            "security_codes_distinct": self.distinct_codes,
        }


# -- running


def _identities(layers: Layers) -> dict[str, tuple[IdentityKey, KnownPeers]]:
    keys = {name: IdentityKey.generate(os.urandom) for name in MEMBERS}
    known = {name: KnownPeers() for name in MEMBERS}
    if layers is Layers.VERIFIED:
        # The members met before: each pinned the others' real keys.
        for name in MEMBERS:
            for other in MEMBERS:
                if other != name:
                    known[name].check(other, keys[other].public_key)
    return {name: (keys[name], known[name]) for name in MEMBERS}


def _heard_everyone(call: GroupCall, visible: int) -> bool:
    """``call`` heard each of the ``visible`` other members (those the hub does not hide)."""
    received = call.received
    return len(received) == visible and all(
        len(media.samples) >= HEARD_SAMPLES and media.pattern_numbers for media in received.values()
    )


async def _until(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def _names(calls: dict[str, GroupCall]) -> dict[PeerId, str]:
    """Every member's peer id, from what the others saw (names are signed by their keys)."""
    names: dict[PeerId, str] = {}
    for call in calls.values():
        for peer, member in call.stats.members.items():
            if member.name is not None:
                names[PeerId(peer)] = member.name
    return names


def _member_outcome(
    call: GroupCall, result: GroupStats | BaseException, names: dict[PeerId, str]
) -> MemberOutcome:
    stats = call.stats
    completed = isinstance(result, GroupStats)
    heard, video, samples = {}, {}, {}
    for peer, media in call.received.items():
        name = names.get(peer, peer)
        heard[name] = _heard(media.samples, GROUP_TONES.get(name, 0.0))
        video[name] = media.video_frames
        samples[name] = media.samples
    return MemberOutcome(
        completed=completed,
        outcome=stats.ended_by if completed else type(result).__name__,
        heard=heard,
        video_frames=video,
        security_code=stats.security_code,
        roster={m.name or peer: str(m.status) for peer, m in stats.members.items() if not m.left},
        received={
            (m.name or peer): {"audio": dict(m.audio), "video": dict(m.video)}
            for peer, m in stats.members.items()
        },
        samples=samples,
        detections=dict(call.session.detections) if call.session is not None else {},
        spliced={
            names.get(PeerId(slot), slot): {
                names.get(PeerId(sender), sender): count for sender, count in by.items()
            }
            for slot, by in stats.spliced.items()
        },
    )


CORRELATION_WINDOW = SAMPLE_RATE // 10  # 100 ms: whole cycles of every member's tone


def _windows(samples: array[int]) -> list[list[int]]:
    part = middle_second(samples, SAMPLE_RATE)
    return [
        part[start : start + CORRELATION_WINDOW]
        for start in range(0, len(part) - CORRELATION_WINDOW + 1, CORRELATION_WINDOW)
    ]


def _heard(samples: array[int], tone: float) -> float:
    """How much of the steady part of what a member heard is ``tone``, in 100 ms windows
    weighted by their energy (as the two-party cells measure a peer; a rejected frame's gap is
    a click, not a lost tone)."""
    if len(samples) < SAMPLE_RATE // 2:
        return 0.0
    tonal = total = 0.0
    for window in _windows(samples):
        energy = float(sum(x * x for x in window))
        tonal += tone_correlation(window, SAMPLE_RATE, tone) ** 2 * energy
        total += energy
    return (tonal / total) ** 0.5 if total else 0.0


def _most_of(samples: array[int], tone: float) -> float:
    """The most any 100 ms of ``samples`` (anywhere in them) is ``tone``."""
    best = 0.0
    for start in range(0, len(samples) - CORRELATION_WINDOW + 1, CORRELATION_WINDOW):
        window = samples[start : start + CORRELATION_WINDOW]
        if any(window):
            best = max(best, tone_correlation(window, SAMPLE_RATE, tone))
    return best


async def run_routed_cell(
    scenario: RoutedScenario, seconds: float, directory: Path, room: str = "experiment"
) -> RoutedCell:
    """Run one real three-party call through a routing hub (hostile as the cell says), record
    what the hub forwarded in ``directory``, and measure it."""
    started = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    attack = ATTACKS[scenario.attack]()
    media = HostileMediaServer(
        Limits(max_peers_per_room=8),
        recorder=MediaRecorder(directory, clock=time.monotonic),
        attack=attack,
    )
    hide = HIDDEN.get(scenario.attack, frozenset())
    server = HidingHubServer(media, hide)
    await server.start()
    identities = _identities(scenario.layers)
    verify = Verify.PINNED if scenario.layers is Layers.VERIFIED else Verify.TOFU
    parts = scenario.layers.group_parts()

    def member(
        name: str,
        identity: IdentityKey,
        known: KnownPeers,
        tracks: list[Any],
        verify: Verify = verify,
    ) -> GroupCall:
        config = CallConfig(
            room=room,
            hub_url=server.url,
            name=name,
            identity=identity,
            known_peers=known,
            tracks=tracks,
            verify=verify,
            setup_timeout=SETUP_TIMEOUT,
        )
        return GroupCall(config, parts=parts)

    calls = {
        name: member(name, *identities[name], [ToneTrack(GROUP_TONES[name]), PatternTrack()])
        for name in MEMBERS
    }
    visible = {
        name: sum(1 for j in range(len(MEMBERS)) if j != i and frozenset({i, j}) not in hide)
        for i, name in enumerate(MEMBERS)
    }
    tasks: dict[str, asyncio.Task[GroupStats]] = {}
    results: dict[str, GroupStats | BaseException] = {}
    extra: dict[str, Any] = {}
    leaver: dict[str, Any] = {}
    ids: dict[str, PeerId] = {}
    ghost: _Ghost | None = None
    try:
        for name, call in calls.items():
            tasks[name] = asyncio.create_task(call.run())
            if hide:
                # One after the other, so that the hub tells the members apart by when they
                # joined. (Only here: a member that joins later gets a frame or two of the
                # others' under the key before its join, which the other cells would count.)
                await _until(lambda: len(server.joined) == len(tasks), SETUP_TIMEOUT)
        await _until(
            lambda: (
                all(_heard_everyone(c, visible[n]) for n, c in calls.items())
                or any(t.done() for t in tasks.values())
            ),
            SETUP_TIMEOUT,
        )
        names = _names(calls)
        ids = {name: peer for peer, name in names.items()}
        if scenario.attack is RoutedAttack.LEAVE:
            leaver = await _leave(calls, tasks, results, ids, seconds)
        elif scenario.attack is RoutedAttack.GHOST:
            # The hub's own member: its own identity key, which nobody pinned, no media, and
            # it accepts anyone (it wants the members' keys).
            key = IdentityKey.generate(os.urandom)
            ghost = _Ghost(member(GHOST, key, KnownPeers(), [], Verify.TOFU))
            ghost.task = asyncio.create_task(ghost.call.run())
            await _until(lambda: len(server.joined) > len(MEMBERS), SETUP_TIMEOUT)
            ghost.peer = server.joined[len(MEMBERS)]
            shown = [name for name in MEMBERS if not server.hidden(ids[name], ghost.peer)]
            with contextlib.suppress(TimeoutError):  # judged from the numbers either way
                await _until(lambda: all(ghost.settled(calls[n]) for n in shown), SETUP_TIMEOUT)
            await asyncio.sleep(seconds)
            ghost.receivers = dict(ghost.call.receivers)
            ghost.shown_to = shown
        else:
            attack.target = ids.get(ALICE)
            if isinstance(attack, SpliceFrames):
                attack.source, attack.victim = ids.get(BOB), ids.get(CAROL)
            attack.armed = True
            await asyncio.sleep(seconds)
            attack.armed = False
            if scenario.attack is not RoutedAttack.RECORD:
                await asyncio.sleep(SETTLE_SECONDS)
    finally:
        for call in calls.values():
            call.hangup("duration")
        if ghost is not None:
            ghost.call.hangup("duration")
            with contextlib.suppress(CallError):
                await ghost.task
        for name, task in tasks.items():
            if name not in results:
                try:
                    results[name] = await task
                except CallError as error:
                    results[name] = error
        await server.close()  # and so the recorder: the files are complete
    names = _names(calls)
    members = {name: _member_outcome(call, results[name], names) for name, call in calls.items()}
    recovered = hub_recovery(directory, room, names)
    by_name = {peer: names.get(peer, peer) for peer in names}
    summary = _attack_summary(attack, by_name)
    if isinstance(attack, SpliceFrames):
        victim = calls[CAROL].received
        alice = next((peer for peer, name in names.items() if name == ALICE), None)
        samples = victim[alice].samples if alice in victim else array("h")
        summary["victim_heard_source_as_target"] = round(_most_of(samples, GROUP_TONES[BOB]), 4)
    after_leave = _after_leave(directory, room, ids, leaver) if leaver else None
    extra.update(summary)
    if hide:
        extra["hidden"] = {
            "pairs": [
                sorted((*MEMBERS, GHOST)[position] for position in pair)
                for pair in sorted(hide, key=sorted)
            ],
            "dropped": dict(server.dropped),
        }
    return RoutedCell(
        scenario=scenario,
        members=members,
        hub=recovered,
        attack=extra,
        seconds=time.monotonic() - started,
        after_leave=after_leave,
        ghost=None if ghost is None else ghost.outcome(directory, room, ids, members),
    )


@dataclass
class _Ghost:
    """The member the hub adds to the room itself, and what it got."""

    call: GroupCall
    task: asyncio.Task[GroupStats] = field(init=False)
    peer: PeerId = field(init=False)
    joined: float = field(default_factory=time.monotonic)  # before it joined, in fact
    shown_to: list[str] = field(default_factory=list)
    receivers: dict[PeerId, SenderKeyReceiver] = field(default_factory=dict)

    def settled(self, member: GroupCall) -> bool:
        """``member`` let the ghost in, or refused it."""
        session = member.session
        return session is not None and (
            any(entry.peer == self.peer for entry in session.roster)
            or session.detections["identity-refused"] > 0
        )

    def outcome(
        self, directory: Path, room: str, ids: dict[str, PeerId], members: dict[str, MemberOutcome]
    ) -> dict[str, Any]:
        stats = self.call.stats.members
        # Frames it decrypted of each member's (a frame counts once decrypted, held first or not).
        decrypted = {
            name: stats[peer].audio.get("frames", 0) + stats[peer].video.get("frames", 0)
            if (peer := ids.get(name, PeerId(""))) in stats
            else 0
            for name in MEMBERS
        }
        heard = {
            name: round(_heard(self.call.received[ids[name]].samples, GROUP_TONES[name]), 4)
            for name in MEMBERS
            if ids.get(name) in self.call.received
        }
        return {
            "shown_to": self.shown_to,
            "on_rosters": {
                name: member.roster[GHOST]
                for name, member in members.items()
                if GHOST in member.roster
            },
            "decrypted": decrypted,
            "heard": heard,
            "before_join": self._before_join(directory, room, ids),
        }

    def _before_join(self, directory: Path, room: str, ids: dict[str, PeerId]) -> dict[str, int]:
        """What the ghost's keys open of every frame the hub recorded before it joined."""
        frames = decrypted = 0
        for name in MEMBERS:
            for kind in KINDS:
                path = directory / f"{room}.{ids.get(name)}.{kind}.mkv"
                if not path.exists():
                    continue
                sidecar = path.with_suffix(".jsonl").read_text().splitlines()
                arrivals = [json.loads(line)["arrival"] for line in sidecar]
                before = [
                    frame
                    for at, frame in zip(arrivals, recorded_frames(path), strict=True)
                    if at < self.joined
                ]
                frames += len(before)
                receiver = self.receivers.get(ids[name])
                if receiver is not None:
                    unprotect = receiver.transform(kind)
                    decrypted += sum(unprotect(frame) is not None for frame in before)
        return {"frames": frames, "decrypted": decrypted}


def _attack_summary(attack: FrameAttack, names: dict[PeerId, str]) -> dict[str, Any]:
    if not attack.counts:
        return {}
    toward: dict[str, dict[str, int]] = {}
    replayed: dict[str, dict[str, int]] = {}
    counts: dict[str, int] = defaultdict(int)
    for (subscriber, kind, what), count in attack.counts.items():
        name = names.get(subscriber, subscriber)
        counts[what] += count
        if what == "reordered":
            continue
        by_kind = toward.setdefault(name, {"audio": 0, "video": 0})
        by_kind[kind] += count
        if what == "replayed":
            replayed.setdefault(name, {"audio": 0, "video": 0})[kind] += count
    summary: dict[str, Any] = {
        "target": names.get(attack.target, attack.target) if attack.target else None,
        "counts": dict(counts),
        "toward": toward,
    }
    if replayed:
        summary["replayed_toward"] = replayed
    if isinstance(attack, SpliceFrames) and attack.source and attack.victim:
        summary["source"] = names.get(attack.source, attack.source)
        summary["victim"] = names.get(attack.victim, attack.victim)
    return summary


async def _leave(
    calls: dict[str, GroupCall],
    tasks: dict[str, asyncio.Task[GroupStats]],
    results: dict[str, GroupStats | BaseException],
    ids: dict[str, PeerId],
    seconds: float,
) -> dict[str, Any]:
    """Bob leaves and hands the hub every key he holds; the others talk on for ``seconds``
    more (at least 2.5 s, so that there is media sent more than 1 s after the leave)."""
    bob = calls[BOB]
    holds = {bob.stats.members[peer].name: receiver for peer, receiver in bob.receivers.items()}
    bob.hangup("leaving")
    try:
        results[BOB] = await tasks[BOB]
    except CallError as error:
        results[BOB] = error
    stayed = [calls[ALICE], calls[CAROL]]
    bob_id = ids[BOB]
    await _until(lambda: all(bob_id in c.stats.leaves_announced for c in stayed), SETUP_TIMEOUT)
    announced = time.monotonic()  # at most one poll (10 ms) after the last announcement
    await asyncio.sleep(max(seconds, 2.5))
    return {"receivers": holds, "announced": announced}


def _after_leave(
    directory: Path, room: str, ids: dict[str, PeerId], leaver: dict[str, Any]
) -> dict[str, Any]:
    """What the leaver's keys open of what the others sent more than 1 s after the hub
    announced the leave (the hub recorded it), decoded as the hub would."""
    since = leaver["announced"] + 1.0
    frames = decrypted = 0
    plaintexts: dict[str, list[bytes]] = {}
    for name in (ALICE, CAROL):
        receiver = leaver["receivers"].get(name)
        path = directory / f"{room}.{ids[name]}.audio.mkv"
        if receiver is None or not path.exists():
            continue
        sidecar = path.with_suffix(".jsonl").read_text().splitlines()
        arrivals = [json.loads(line)["arrival"] for line in sidecar]
        after = [
            frame for at, frame in zip(arrivals, recorded_frames(path), strict=True) if at > since
        ]
        unprotect = receiver.transform("audio")
        opened = [p for p in (unprotect(frame) for frame in after) if p is not None]
        frames += len(after)
        decrypted += len(opened)
        plaintexts[name] = opened
    correlations = [
        _correlation(decode_opus(opened).samples, GROUP_TONES[name])
        for name, opened in plaintexts.items()
    ]
    return {
        "frames": frames,
        "decrypted": decrypted,
        "correlation": round(max(correlations, default=0.0), 4),
        "members": sorted(plaintexts),
    }
