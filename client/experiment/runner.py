"""The interception experiment (issue 6): a hostile hub against real calls, layer by layer.

Each cell runs one real call between two peers in this process, ``alice`` (in the room first,
so she initiates and offers; she sends a 440 Hz tone and the test pattern) and ``bob`` (660 Hz
and the pattern), through a `client.experiment.hostile_hub.HostileHub` with the cell's
capabilities, with the peers assembled for the cell's `Layers` (client/experiment/layers.py).
It then measures, from the media itself, what the peers heard and what the hub recovered,
collects what the peers detected, and says whether the cell came out as the experiment claims.
`run_experiment` runs the matrix; `Report` renders it as a table, as JSON and as a figure
(client/experiment/figure.py).

The first cell is the control: plain WebRTC under the DTLS man in the middle. If the hub does
not recover that call, the set-up cannot tell protection from a broken attack, and the whole
experiment is invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.call import Call, CallConfig, CallStats
from client.experiment.analysis import middle_second, tone_correlation
from client.experiment.figure import FigureRow, SenderPanels, draw_figure, write_figure
from client.experiment.hostile_hub import HANDSHAKE_TYPES, Capability, HostileHub, RoomAttack
from client.experiment.layers import CellScenario, Layers
from client.experiment.media_mitm import (
    TAMPER_ACTIONS,
    Direction,
    Kind,
    MediaMitm,
    MediaTamper,
    RecoveredAudio,
    RecoveredVideo,
    write_wav,
)
from client.experiment.page import CellSection, Media, render, write_page
from client.experiment.routed import (
    GROUP_TONES,
    MEMBERS,
    ROUTED_SCENARIOS,
    RoutedCell,
    RoutedScenario,
    run_routed_cell,
)
from client.media import (
    SAMPLE_RATE,
    PatternTrack,
    ReceivedMedia,
    ToneTrack,
    tone_samples,
)
from client.session import CallError, Verify
from crypto.identity import IdentityKey, KnownPeers
from crypto.sframe import SFrameError, SFrameHeader

Progress = Callable[[str], None]

ALICE, BOB = "alice", "bob"
TONES = {ALICE: 440.0, BOB: 660.0}
DIRECTION_TONES = {
    Direction.OFFERER_TO_ANSWERER: TONES[ALICE],
    Direction.ANSWERER_TO_OFFERER: TONES[BOB],
}
RECOVERED = 0.9  # tone correlation at which audio counts as recovered (or heard)
NOTHING = 0.1  # tone correlation under which audio counts as not recovered
MIN_ANALYSED_SECONDS = 0.5
CORRELATION_WINDOW = SAMPLE_RATE // 10  # 100 ms: whole cycles of both tones
SETUP_TIMEOUT = 20.0
# Rekeys in every call, as in the product, but often enough that a few-second call has some:
# the hub's tamper then has sealed messages of the call to replay and alter.
REKEY_INTERVAL = 1.0
DEFAULT_SECONDS = 3.0

# What a logged payload may be: key agreement messages (names, nonces, public keys, a commitment,
# signatures), sealed, or the clear hello of the plain layer (the only one without a key agreement).
SEALED_FIELDS = frozenset({"v", "type", "epoch", "seq", "ciphertext"})
HELLO_FIELDS = frozenset({"type", "name"})
LEAK_PATTERNS = {
    "sdp": re.compile(r"\bsdp\b|v=0\\r\\n|m=(audio|video)"),
    "candidate": re.compile(r"candidate"),
    "dtls-fingerprint": re.compile(r"fingerprint:|sha-256 [0-9A-F]{2}:"),
    "ip-address": re.compile(r"(?<![\d.])\d{1,3}(\.\d{1,3}){3}(?![\d.])"),
}


@dataclass(frozen=True)
class Scenario(CellScenario):
    """One cell of the matrix: which protections the peers apply, what the hub does."""

    layers: Layers
    attack: frozenset[Capability]

    @property
    def attack_name(self) -> str:
        return "+".join(c.value for c in Capability if c in self.attack)


def _scenario(layers: Layers, *capabilities: Capability) -> Scenario:
    return Scenario(layers, frozenset(capabilities))


SCENARIOS: tuple[Scenario, ...] = (
    _scenario(Layers.PLAIN, Capability.DTLS_MITM),
    _scenario(Layers.SFRAME, Capability.DTLS_MITM),
    _scenario(Layers.SEALED, Capability.DTLS_MITM),
    _scenario(Layers.SFRAME, Capability.KEYSWAP),
    _scenario(Layers.SEALED, Capability.KEYSWAP),
    _scenario(Layers.VERIFIED, Capability.KEYSWAP),
    _scenario(Layers.VERIFIED, Capability.RECORD, Capability.TAMPER),
    _scenario(Layers.SFRAME, Capability.DTLS_MITM, Capability.TAMPER),
)
MEDIA_KINDS: tuple[Kind, ...] = ("audio", "video")


@dataclass
class PeerOutcome:
    """One peer's side of a cell."""

    completed: bool
    outcome: str  # how the call ended ("duration", "peer-bye", ...) or the error's class
    heard_correlation: float  # with the tone the other peer sent
    video_frames: int
    sas: str | None
    detections: dict[str, int]
    # Per kind: SFrame frames received (decrypted or not), and how many were rejected as
    # "replayed" and as "altered" (failed to authenticate).
    media: dict[str, dict[str, int]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "outcome": self.outcome,
            "heard_correlation": round(self.heard_correlation, 4),
            "video_frames": self.video_frames,
            "sas": self.sas,
            "detections": self.detections,
            "media": self.media,
        }


@dataclass
class Cell:
    """What one cell measured; `cell_report` makes its entry in the JSON report."""

    scenario: Scenario
    peers: dict[str, PeerOutcome]
    hub_audio_correlation: float
    hub_audio_seconds: float
    hub_decoded_video_frames: int
    detected: list[str]
    sframe_headers: list[dict[str, Any]]
    metadata: dict[str, Any] | None
    hub_events: list[str]
    seconds: float
    # What the hub's media tamper did to the frames each peer received, per kind: "replayed",
    # "altered", "dropped" (empty without the tamper in the media path).
    media_tampered: dict[str, dict[str, dict[str, int]]]
    # For the figure and the files: alice's tone as sent and as bob heard it; what the hub's
    # decoders made of each direction, decoded once (empty without the hub in the media path);
    sent: array[int] = field(repr=False)
    heard: array[int] = field(repr=False)
    hub_recovered: dict[Direction, tuple[RecoveredAudio, RecoveredVideo]] = field(repr=False)
    mitm: MediaMitm | None = field(repr=False, default=None)
    # What each peer heard of the other, for the files and the page.
    heard_by: dict[str, array[int]] = field(repr=False, default_factory=dict)

    @property
    def recovered(self) -> array[int]:
        """Alice's tone as the hub recovered it."""
        from_alice = self.hub_recovered.get(Direction.OFFERER_TO_ANSWERER)
        return from_alice[0].samples if from_alice is not None else array("h")

    @property
    def recovered_video(self) -> RecoveredVideo | None:
        """What the hub's decoder made of alice's video (None: it was not in the media path)."""
        from_alice = self.hub_recovered.get(Direction.OFFERER_TO_ANSWERER)
        return from_alice[1] if from_alice is not None else None

    @property
    def peer_audio_correlation(self) -> float:
        return min(peer.heard_correlation for peer in self.peers.values())

    @property
    def rejected(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for peer in self.peers.values():
            for what, count in peer.detections.items():
                if what.endswith("-rejected"):
                    totals[what] = totals.get(what, 0) + count
        return totals

    @property
    def media_tampering_all_rejected(self) -> bool:
        """The peers rejected, per kind, exactly the frames the hub replayed or altered."""
        return bool(self.media_tampered) and all(
            self.peers[name].media[kind]["replayed"] == counts["replayed"]
            and self.peers[name].media[kind]["altered"] == counts["altered"]
            for name, kinds in self.media_tampered.items()
            for kind, counts in kinds.items()
        )

    def media_tampered_total(self, what: str) -> int:
        return sum(c[what] for kinds in self.media_tampered.values() for c in kinds.values())

    @property
    def sas_differs(self) -> bool:
        shown = [peer.sas for peer in self.peers.values()]
        return None not in shown and len(set(shown)) > 1

    @property
    def both_completed(self) -> bool:
        return all(peer.completed for peer in self.peers.values())

    @property
    def leaks(self) -> list[str]:
        return list(self.metadata["leaks"]) if self.metadata is not None else []

    def judge(self) -> tuple[bool, str]:
        """Whether the cell came out as the experiment claims, judged from its figures."""
        layers, attack = self.scenario.layers, self.scenario.attack
        heard = self.peer_audio_correlation >= RECOVERED and self.both_completed
        recovered = self.hub_audio_correlation >= RECOVERED
        nothing = self.hub_audio_correlation < NOTHING and self.hub_decoded_video_frames == 0
        if self.scenario.is_control:
            ok = heard and recovered and self.hub_decoded_video_frames > 0
            return ok, (
                "CONTROL: the hub recovers plain WebRTC (audio and video)"
                if ok
                else "CONTROL FAILED: the hub did not recover plain WebRTC; EXPERIMENT INVALID"
            )
        if Capability.KEYSWAP in attack and layers is Layers.SFRAME:
            return heard and recovered, (
                "INTERCEPTED: the hub holds the keys. E2EE without authenticated keys stops a "
                "passive or DTLS-level hub, not this one"
            )
        if Capability.KEYSWAP in attack and layers is Layers.SEALED:
            return heard and recovered and self.sas_differs, (
                "INTERCEPTED unless the SAS is compared: the peers were shown different SAS "
                "values (sas-mismatch), so reading them aloud exposes the hub"
            )
        if Capability.KEYSWAP in attack:
            refused = "identity-refused" in self.detected and not self.both_completed
            return refused and nothing and self.mitm is None, (
                "REFUSED before any media key existed: pinned identities; the hub recovers nothing"
            )
        if Capability.TAMPER in attack and self.mitm is not None:
            tampered = all(self.media_tampered_total(what) > 0 for what in ("replayed", "altered"))
            return heard and nothing and tampered and self.media_tampering_all_rejected, (
                "PROTECTED: the call works; every media frame the hub replayed or altered was "
                "rejected by SFrame and counted; the hub recovers nothing"
            )
        if Capability.TAMPER in attack:
            rejected = self.rejected
            ok = heard and bool(rejected) and all(rejected.values()) and not self.leaks
            ok = ok and {"replay-rejected", "alteration-rejected"} <= set(rejected)
            return ok, (
                "PROTECTED: the call works; replays and alterations rejected and counted; the "
                "log holds only public metadata and sealed payloads"
            )
        if layers is Layers.SFRAME:
            return heard and nothing, (
                "PROTECTED: the hub holds only SFrame ciphertext (it reads KIDs, counters, sizes)"
            )
        refused = "sdp-tampered" in self.detected and not self.both_completed
        return refused and nothing, (
            "DETECTED: the hub cannot read the sealed SDP; its rewrite was detected (sdp-tampered) "
            "and the call refused to run through it"
        )

    def details(self) -> dict[str, Any]:
        """What only a two-party cell reports (`cell_report` adds what every cell does)."""
        return {
            "rejected": self.rejected,
            "sas": {name: peer.sas for name, peer in self.peers.items()},
            "peers": {name: peer.as_dict() for name, peer in self.peers.items()},
            "sframe_headers": self.sframe_headers,
            "metadata_log": self.metadata,
            "hub_events": self.hub_events,
            "media_tampered": self.media_tampered,
        }


def cell_report(cell: Cell | RoutedCell) -> dict[str, Any]:
    """A cell's entry in the JSON report: what every cell reports, then its own details."""
    expected, verdict = cell.judge()
    return {
        "layers": cell.scenario.layers.value,
        "attack": cell.scenario.attack_name,
        "control": cell.scenario.is_control,
        "routed": isinstance(cell, RoutedCell),
        "peer_audio_correlation": round(cell.peer_audio_correlation, 4),
        "hub_audio_correlation": round(cell.hub_audio_correlation, 4),
        "hub_audio_seconds": round(cell.hub_audio_seconds, 2),
        "hub_decoded_video_frames": cell.hub_decoded_video_frames,
        "detected": cell.detected,
        "verdict": verdict,
        "as_expected": expected,
        **cell.details(),
        "seconds": round(cell.seconds, 2),
    }


TABLE_HEADER: tuple[str, ...] = (
    "#",
    "layers",
    "attack",
    "peers",
    "hub audio",
    "hub s",
    "hub video",
    "detected",
)


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """``rows`` under the table header, each column as wide as its widest value, a rule under
    the header and an empty line after."""
    rows = [TABLE_HEADER, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = [
        "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return [*lines, ""]


def table_row(number: str, cell: Cell | RoutedCell) -> tuple[str, ...]:
    """A cell's row of the table (text and HTML alike)."""
    return (
        number,
        cell.scenario.layers.value,
        cell.scenario.attack_name,
        f"{cell.peer_audio_correlation:.2f}",
        f"{cell.hub_audio_correlation:.2f}",
        f"{cell.hub_audio_seconds:.1f}",
        str(cell.hub_decoded_video_frames),
        ", ".join(cell.detected) or "-",
    )


@dataclass
class Report:
    cells: list[Cell]
    seconds: float
    # The routed cells (a group call through a hub that routes every packet), after the
    # two-party ones; numbered R1, R2, ...
    routed: list[RoutedCell] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        """The experiment is valid only if the control of every family of cells that ran shows
        the attack working: the two-party cells' (plain WebRTC under the DTLS man in the
        middle) and the routed cells' (the routing hub's recording of frames in the clear)."""
        if not self.cells and not self.routed:
            return False
        families = [
            [(cell.scenario.is_control, cell.judge()[0]) for cell in self.cells],
            [(cell.scenario.is_control, cell.judge()[0]) for cell in self.routed],
        ]
        return all(
            any(control for control, _ in family) and all(ok for control, ok in family if control)
            for family in families
            if family
        )

    @property
    def all_as_expected(self) -> bool:
        cells: list[Cell | RoutedCell] = [*self.cells, *self.routed]
        return all(cell.judge()[0] for cell in cells)

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "all_as_expected": self.all_as_expected,
            "seconds": round(self.seconds, 2),
            "cells": [cell_report(cell) for cell in self.cells]
            + [
                {"number": f"R{index}"} | cell_report(cell)
                for index, cell in enumerate(self.routed, 1)
            ],
        }

    def table(self) -> str:
        lines = aligned([table_row(str(index), cell) for index, cell in enumerate(self.cells, 1)])
        for index, cell in enumerate(self.cells, 1):
            expected, verdict = cell.judge()
            mark = "ok " if expected else "!! "
            lines.append(f"{mark}{index}. {cell.scenario.name}: {verdict}")
            sas = {name: peer.sas for name, peer in cell.peers.items() if peer.sas}
            if sas:
                lines.append("      SAS shown: " + ", ".join(f"{n} {s}" for n, s in sas.items()))
            for summary in cell.sframe_headers:
                lines.append(
                    f"      hub reads {summary['direction']} {summary['kind']}: KID "
                    f"{summary['kids']}, CTR {summary['first_ctr']}..{summary['last_ctr']}, "
                    f"{summary['frames']} frames of {summary['mean_bytes']} bytes on average"
                )
            if cell.media_tampered:
                counts = ", ".join(
                    f"{what} x{cell.media_tampered_total(what)}" for what in TAMPER_ACTIONS
                )
                lines.append(f"      hub tampered with the media the peers received: {counts}")
            if cell.rejected:
                counts = ", ".join(f"{what} x{count}" for what, count in cell.rejected.items())
                lines.append(f"      rejected: {counts}")
            if cell.metadata is not None:
                types = ", ".join(f"{t} x{n}" for t, n in cell.metadata["payload_types"].items())
                lines.append(
                    f"      metadata log: {cell.metadata['lines']} lines; payloads: {types}"
                )
                lines.append(f"      leaks found in it: {', '.join(cell.leaks) or 'none'}")
        if self.routed:
            lines += ["", *self._routed_table()]
        lines.append("")
        lines.append(
            "VALID: the control shows the attack works."
            if self.valid
            else "INVALID: the control failed, so nothing above proves protection."
        )
        return "\n".join(lines)

    def _routed_table(self) -> list[str]:
        lines = aligned([table_row(f"R{index}", cell) for index, cell in enumerate(self.routed, 1)])
        for index, cell in enumerate(self.routed, 1):
            expected, verdict = cell.judge()
            lines.append(f"{'ok ' if expected else '!! '}R{index}. {cell.scenario.name}: {verdict}")
            for name, stream in cell.hub.items():
                player = stream.player
                lines.append(
                    f"      hub's recording of {name}: {stream.frames['audio']} audio and "
                    f"{stream.frames['video']} video frames; tone {stream.correlation:.2f}, "
                    f"{stream.video.frames_decoded} pictures; a player decodes "
                    f"{player['audio']['audio_seconds']:.1f} s of audio and "
                    f"{player['video']['decoded']:.0f} pictures"
                )
            if cell.attack.get("counts"):
                counts = ", ".join(f"{what} x{n}" for what, n in cell.attack["counts"].items())
                lines.append(f"      hub did to {cell.attack['target']}'s frames: {counts}")
                for name, member in cell.members.items():
                    target = cell.attack["target"]
                    if name == target:
                        continue
                    rejected = {kind: member.rejected(target, kind) for kind in MEDIA_KINDS}
                    lines.append(
                        f"      {name} rejected of {target}'s: audio {rejected['audio']}, "
                        f"video {rejected['video']}"
                    )
            if cell.after_leave is not None:
                leave = cell.after_leave
                lines.append(
                    f"      the leaver's keys open {leave['decrypted']} of {leave['frames']} "
                    f"frames sent more than 1 s after the leave"
                )
            hidden = cell.attack.get("hidden")
            if hidden is not None:
                pairs = "; ".join(" and ".join(pair) for pair in hidden["pairs"])
                dropped = ", ".join(f"{what} x{n}" for what, n in hidden["dropped"].items())
                lines.append(f"      hub hid from each other: {pairs} (dropped {dropped})")
            if cell.ghost is not None:
                ghost = cell.ghost
                rosters = ", ".join(f"{n} {s}" for n, s in ghost["on_rosters"].items()) or "none"
                opened = ", ".join(f"{n} {c}" for n, c in ghost["decrypted"].items())
                before = ghost["before_join"]
                lines.append(
                    f"      ghost shown to {', '.join(ghost['shown_to'])}; on the rosters of: "
                    f"{rosters}; frames it decrypted: {opened}; its keys open "
                    f"{before['decrypted']} of the {before['frames']} recorded before it joined"
                )
            codes = {name: m.security_code for name, m in cell.members.items() if m.completed}
            if codes:
                lines.append(
                    "      security codes: " + ", ".join(f"{n} {c}" for n, c in codes.items())
                )
        return lines


# -- measuring


def correlation(samples: Sequence[int], tone: float) -> float:
    """How much of the steady part of ``samples`` is ``tone`` (one coherent second: what the
    hub recovered); 0 for too little audio."""
    if len(samples) < MIN_ANALYSED_SECONDS * SAMPLE_RATE:
        return 0.0
    return tone_correlation(middle_second(samples, SAMPLE_RATE), SAMPLE_RATE, tone)


def heard_correlation(samples: Sequence[int], tone: float) -> float:
    """How much of the steady part of what a peer heard is ``tone``, in 100 ms windows weighted
    by their energy; 0 for too little audio.

    A frame the peer rejected (a tampering hub's) joins the tone out of phase: a click, which
    one correlation over the whole second counts as losing the tone while a listener still
    hears it. Only the peers' side is measured so: on decoded ciphertext short windows find
    more chance tone (up to about 0.1) than one coherent second (about 0.03), so the hub's
    side keeps `correlation`, the stricter test of recovery.
    """
    if len(samples) < MIN_ANALYSED_SECONDS * SAMPLE_RATE:
        return 0.0
    part = middle_second(samples, SAMPLE_RATE)
    tonal = total = 0.0
    for start in range(0, len(part) - CORRELATION_WINDOW + 1, CORRELATION_WINDOW):
        window = part[start : start + CORRELATION_WINDOW]
        energy = math.fsum(x * x for x in window)
        tonal += tone_correlation(window, SAMPLE_RATE, tone) ** 2 * energy
        total += energy
    return math.sqrt(tonal / total) if total else 0.0


def sframe_header_summary(mitm: MediaMitm) -> list[dict[str, Any]]:
    """What a hub holding only SFrame ciphertext can still read: KIDs, counters, sizes."""
    summaries = []
    for direction in Direction:
        for kind in ("audio", "video"):
            frames = mitm.intercepted(direction, kind)
            headers = []
            for frame in frames:
                try:
                    headers.append(SFrameHeader.parse(frame)[0])
                except SFrameError:
                    continue
            if not headers:
                continue
            summaries.append(
                {
                    "direction": direction.value,
                    "kind": kind,
                    "frames": len(frames),
                    "kids": sorted({header.kid for header in headers}),
                    "first_ctr": headers[0].ctr,
                    "last_ctr": headers[-1].ctr,
                    "mean_bytes": round(sum(map(len, frames)) / len(frames)),
                }
            )
    return summaries


def check_metadata(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Classify every payload the hub logged and search the log for anything not public."""
    types: dict[str, int] = {}
    leaks: list[str] = []
    for line in lines:
        payload = line.get("payload")
        if payload is None:
            continue
        kind = payload.get("type") if isinstance(payload, dict) else None
        fields = set(payload) if isinstance(payload, dict) else set()
        if kind == "sealed" and fields == SEALED_FIELDS:
            label = "sealed"
        elif kind in HANDSHAKE_TYPES:
            label = f"key agreement ({kind})"
        elif kind == "hello" and fields == HELLO_FIELDS:
            label = "hello (name)"
        else:
            label = f"UNSEALED {kind}"
            leaks.append(f"an unsealed {kind!r} payload")
        types[label] = types.get(label, 0) + 1
    text = "\n".join(json.dumps(line) for line in lines)
    leaks += [name for name, pattern in LEAK_PATTERNS.items() if pattern.search(text)]
    return {"lines": len(lines), "payload_types": types, "leaks": leaks}


# -- running


def _peer_outcome(call: Call, result: CallStats | BaseException, other: str) -> PeerOutcome:
    stats = call.stats
    completed = isinstance(result, CallStats)
    outcome = stats.ended_by if completed else type(result).__name__
    received: ReceivedMedia = call.received
    return PeerOutcome(
        completed=completed,
        outcome=outcome,
        heard_correlation=heard_correlation(received.samples, TONES[other]),
        video_frames=received.video_frames,
        sas=stats.protection.sas if stats.protection is not None else None,
        detections=dict(stats.detections),
        media={
            kind: {
                "received": getattr(stats, kind).received,
                "replayed": getattr(stats, kind).replayed,
                "altered": getattr(stats, kind).unauthenticated,
            }
            for kind in MEDIA_KINDS
        },
    )


def _identities(layers: Layers) -> dict[str, tuple[IdentityKey, KnownPeers]]:
    keys = {name: IdentityKey.generate(os.urandom) for name in (ALICE, BOB)}
    known = {name: KnownPeers() for name in keys}
    if layers is Layers.VERIFIED:
        # The peers met before: each pinned the other's real key.
        known[ALICE].check(BOB, keys[BOB].public_key)
        known[BOB].check(ALICE, keys[ALICE].public_key)
    return {name: (keys[name], known[name]) for name in keys}


async def _until(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def run_cell(scenario: Scenario, seconds: float, room: str = "experiment") -> Cell:
    """Run one real call through a hostile hub and measure it."""
    started = time.monotonic()
    hub = HostileHub(scenario.attack)
    server = await hub.serve()
    identities = _identities(scenario.layers)
    verify = Verify.PINNED if scenario.layers is Layers.VERIFIED else Verify.TOFU
    calls = {
        name: Call(
            CallConfig(
                room=room,
                hub_url=server.url,
                name=name,
                identity=identities[name][0],
                known_peers=identities[name][1],
                tracks=[ToneTrack(TONES[name]), PatternTrack()],
                verify=verify,
                duration=seconds,
                setup_timeout=SETUP_TIMEOUT,
                rekey_interval=REKEY_INTERVAL,
            ),
            scenario.layers.parts(),
        )
        for name in (ALICE, BOB)
    }
    try:
        alice = asyncio.create_task(calls[ALICE].run())
        # Alice is in the room first, so she initiates and makes the offer.
        await _until(lambda: hub.room_count == 1 or alice.done(), SETUP_TIMEOUT)
        bob = asyncio.create_task(calls[BOB].run())
        results = list(await asyncio.gather(alice, bob, return_exceptions=True))
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, CallError):
                raise result
        return _measure(scenario, hub.attack(room), hub, calls, results, time.monotonic() - started)
    finally:
        await hub.close()


def _measure(
    scenario: Scenario,
    attack: RoomAttack,
    hub: HostileHub,
    calls: dict[str, Call],
    results: list[CallStats | BaseException],
    elapsed: float,
) -> Cell:
    peers = {
        ALICE: _peer_outcome(calls[ALICE], results[0], BOB),
        BOB: _peer_outcome(calls[BOB], results[1], ALICE),
    }
    mitm = attack.mitm
    hub_recovered = (
        {}
        if mitm is None
        else {d: (mitm.recovered_audio(d), mitm.recovered_video(d)) for d in Direction}
    )
    hub_correlation = hub_seconds = 0.0
    hub_video = 0
    for direction, (audio, video) in hub_recovered.items():
        hub_correlation = max(
            hub_correlation, correlation(audio.samples, DIRECTION_TONES[direction])
        )
        hub_seconds += audio.seconds
        hub_video += video.frames_decoded
    detected = sorted({what for peer in peers.values() for what in peer.detections})
    tamper = attack.media_tamper
    cell = Cell(
        scenario=scenario,
        peers=peers,
        hub_audio_correlation=hub_correlation,
        hub_audio_seconds=hub_seconds,
        hub_decoded_video_frames=hub_video,
        detected=detected,
        sframe_headers=(
            sframe_header_summary(mitm)
            if mitm is not None and scenario.layers.encrypts_frames and attack.relay is None
            else []
        ),
        metadata=check_metadata(hub.metadata()) if Capability.RECORD in scenario.attack else None,
        hub_events=list(attack.events),
        seconds=elapsed,
        media_tampered={} if tamper is None else _media_tampered(tamper, peers),
        sent=tone_samples(TONES[ALICE], 0, SAMPLE_RATE),
        heard=calls[BOB].received.samples,
        hub_recovered=hub_recovered,
        mitm=mitm,
        heard_by={name: call.received.samples for name, call in calls.items()},
    )
    if cell.sas_differs:
        cell.detected = sorted({*cell.detected, "sas-mismatch"})
    return cell


def _media_tampered(
    tamper: MediaTamper, peers: dict[str, PeerOutcome]
) -> dict[str, dict[str, dict[str, int]]]:
    """What the tamper did to the frames each peer received: the first ones of each stream
    toward it, as many as the peer received before it hung up (the rest were still in flight)."""
    toward = {ALICE: Direction.ANSWERER_TO_OFFERER, BOB: Direction.OFFERER_TO_ANSWERER}
    return {
        name: {
            kind: asdict(tamper.counts(toward[name], kind, peers[name].media[kind]["received"]))
            for kind in MEDIA_KINDS
        }
        for name in (ALICE, BOB)
    }


async def run_experiment(
    seconds: float = DEFAULT_SECONDS,
    scenarios: Sequence[Scenario] = SCENARIOS,
    progress: Progress | None = None,
    routed: Sequence[RoutedScenario] = ROUTED_SCENARIOS,
    recordings: Path | None = None,
) -> Report:
    """Run every cell in turn (one hub and two peers at a time, then one routing hub and three
    members at a time) and build the report. The routing hubs record into ``recordings``
    (one directory per routed cell; a temporary directory without it)."""
    started = time.monotonic()
    cells = []
    for index, scenario in enumerate(scenarios, 1):
        if progress is not None:
            progress(f"[{index}/{len(scenarios)}] {scenario.name} ...")
        cell = await run_cell(scenario, seconds)
        cells.append(cell)
        if progress is not None:
            outcome = "ok" if cell.judge()[0] else "NOT AS EXPECTED"
            progress(
                f"[{index}/{len(scenarios)}] {scenario.name}: "
                f"peers {cell.peer_audio_correlation:.2f}, hub {cell.hub_audio_correlation:.2f}, "
                f"detected {', '.join(cell.detected) or '-'} ({cell.seconds:.1f} s) {outcome}"
            )
    with contextlib.ExitStack() as stack:
        if recordings is None and routed:
            recordings = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        routed_cells = []
        for index, routed_scenario in enumerate(routed, 1):
            label = f"[R{index}/{len(routed)}] {routed_scenario.name}"
            if progress is not None:
                progress(f"{label} ...")
            assert recordings is not None
            directory = recordings / f"R{index}-{routed_scenario.attack.value}"
            routed_cell = await run_routed_cell(routed_scenario, seconds, directory)
            routed_cells.append(routed_cell)
            if progress is not None:
                outcome = "ok" if routed_cell.judge()[0] else "NOT AS EXPECTED"
                progress(
                    f"{label}: peers {routed_cell.peer_audio_correlation:.2f}, "
                    f"hub {routed_cell.hub_audio_correlation:.2f}, "
                    f"detected {', '.join(routed_cell.detected) or '-'} "
                    f"({routed_cell.seconds:.1f} s) {outcome}"
                )
    return Report(cells, time.monotonic() - started, routed_cells)


# -- writing


def _file_stem(index: int, cell: Cell) -> str:
    return f"cell{index}-{cell.scenario.layers.value}-{cell.scenario.attack_name}"


def write_outputs(report: Report, directory: Path) -> list[Path]:
    """report.json, the figure as PNG and SVG, and index.html with, per cell, WAV files of what
    each peer heard and of what the hub recovered, and PNG files of the hub's last picture of
    each stream it decoded; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def wav(name: str, samples: array[int], sample_rate: int = SAMPLE_RATE) -> str | None:
        if not samples:
            return None
        written.append(directory / name)
        write_wav(written[-1], RecoveredAudio(samples, sample_rate, 0, 0))
        return name

    def png(name: str, video: RecoveredVideo | None) -> str | None:
        if video is None or video.last_frame is None:
            return None
        written.append(directory / name)
        video.last_frame.to_image().save(written[-1])
        return name

    sections = []
    for index, cell in enumerate(report.cells, 1):
        stem = _file_stem(index, cell)
        section = _section(str(index), cell.scenario.name, cell)
        for name, other in ((ALICE, BOB), (BOB, ALICE)):
            heard = wav(f"{stem}-{name}-heard.wav", cell.heard_by.get(name, array("h")))
            if heard is not None:
                section.audio.append(Media(f"{name} heard {other} ({TONES[other]:g} Hz)", heard))
        for direction, (audio, video) in cell.hub_recovered.items():
            speaker = ALICE if direction is Direction.OFFERER_TO_ANSWERER else BOB
            stem_direction = f"{stem}-hub-{direction.value}"
            recovered = wav(f"{stem_direction}.wav", audio.samples, audio.sample_rate)
            if recovered is not None:
                section.audio.append(Media(f"the hub recovered {speaker}", recovered))
            picture = png(f"{stem_direction}.png", video)
            if picture is not None:
                section.pictures.append(Media(f"the hub's last picture of {speaker}", picture))
        if not cell.hub_recovered:
            section.no_picture = "the hub was not in the media path"
        sections.append(section)
    for index, routed_cell in enumerate(report.routed, 1):
        scenario = routed_cell.scenario
        stem = f"R{index}-{scenario.layers.value}-{scenario.attack_name}"
        section = _section(f"R{index}", scenario.name, routed_cell)
        for listener, member in routed_cell.members.items():
            for speaker, samples in member.samples.items():
                heard = wav(f"{stem}-{listener}-heard-{speaker}.wav", samples)
                if heard is not None and speaker in GROUP_TONES:
                    tone = f"{GROUP_TONES[speaker]:g} Hz"
                    section.audio.append(Media(f"{listener} heard {speaker} ({tone})", heard))
        for name, stream in sorted(
            routed_cell.hub.items(), key=lambda item: MEMBERS.index(item[0])
        ):
            recovered = wav(f"{stem}-hub-{name}.wav", stream.audio.samples)
            if recovered is not None:
                section.audio.append(
                    Media(f"the hub recovered {name} from its recording", recovered)
                )
            picture = png(f"{stem}-hub-{name}.png", stream.video)
            if picture is not None:
                section.pictures.append(Media(f"the hub's last picture of {name}", picture))
        sections.append(section)
    report_path = directory / "report.json"
    report_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    figure = draw_figure(figure_rows(report), report.valid)
    figures = write_figure(figure, directory)
    rows = [table_row(str(i), c) for i, c in enumerate(report.cells, 1)]
    rows += [table_row(f"R{i}", c) for i, c in enumerate(report.routed, 1)]
    page = render(report.valid, TABLE_HEADER, rows, sections, figures[0].name)
    return [report_path, *written, *figures, write_page(directory, page)]


def _section(number: str, title: str, cell: Cell | RoutedCell) -> CellSection:
    expected, verdict = cell.judge()
    return CellSection(number, title, verdict, expected)


def figure_rows(report: Report) -> list[FigureRow]:
    """The report's rows of the figure: per cell, alice's tone as sent, as bob heard it, as the
    hub recovered it, and the hub's last picture of her pattern (or its absence)."""
    rows = []
    for index, cell in enumerate(report.cells, 1):
        expected, verdict = cell.judge()
        video = cell.recovered_video
        if video is None:
            caption = "the hub was not in the media path"
        elif video.last_frame is None:
            caption = "the hub decoded no video"
        else:
            caption = f"the last of {video.frames_decoded} frames it decoded"
        rows.append(
            FigureRow(
                title=f"{index}. {cell.scenario.name}",
                measured=(
                    f"tone correlation: peers {cell.peer_audio_correlation:.2f}, "
                    f"hub {cell.hub_audio_correlation:.2f}",
                    f"video frames the hub decoded: {cell.hub_decoded_video_frames}",
                    f"detected: {', '.join(cell.detected) or 'nothing'}",
                ),
                verdict=verdict,
                as_expected=expected,
                sent=cell.sent,
                heard=cell.heard,
                recovered=cell.recovered,
                picture=None
                if video is None or video.last_frame is None
                else video.last_frame.to_image(),
                picture_caption=caption,
            )
        )
    for index, routed_cell in enumerate(report.routed, 1):
        rows.append(_routed_row(index, routed_cell))
    return rows


def _routed_row(index: int, cell: RoutedCell) -> FigureRow:
    """A routed cell's row: per member, its tone as sent, as another member heard it, as the hub
    recovered it from its recording, and the hub's last picture of its pattern."""
    expected, verdict = cell.judge()
    senders = []
    for name in MEMBERS:
        stream = cell.hub.get(name)
        listener = _listener(cell, name)
        video = stream.video if stream is not None else None
        senders.append(
            SenderPanels(
                name=name,
                sent=tone_samples(GROUP_TONES[name], 0, SAMPLE_RATE),
                listener=listener,
                heard=cell.members[listener].samples[name] if listener else array("h"),
                recovered=stream.audio.samples if stream is not None else array("h"),
                picture=None
                if video is None or video.last_frame is None
                else video.last_frame.to_image(),
            )
        )
    return FigureRow(
        title=f"R{index}. {cell.scenario.name}",
        measured=(
            "3 members, through a routing hub",
            f"tone correlation: members {cell.peer_audio_correlation:.2f}, "
            f"hub {cell.hub_audio_correlation:.2f}",
            f"video frames the hub decoded: {cell.hub_decoded_video_frames}",
            f"detected: {', '.join(cell.detected) or 'nothing'}",
        ),
        verdict=verdict,
        as_expected=expected,
        sent=senders[0].sent,
        heard=senders[0].heard,
        recovered=senders[0].recovered,
        picture=senders[0].picture,
        picture_caption="the hub's last picture of each member",
        senders=senders,
    )


def _listener(cell: RoutedCell, sender: str) -> str | None:
    """The member after ``sender`` (in the order they joined, round) that heard it, if any."""
    start = MEMBERS.index(sender)
    for step in range(1, len(MEMBERS)):
        name = MEMBERS[(start + step) % len(MEMBERS)]
        member = cell.members.get(name)
        if member is not None and len(member.samples.get(sender, ())) > 0:
            return name
    return None
