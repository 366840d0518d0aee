"""Group calls through a real routing hub (``blindhub hub --route-media``) with real calls:
every member a ``GroupCall`` with its own tone and the numbered test pattern, every frame
SFrame-encrypted under its sender's key, the hub forwarding and recording what it forwards."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import pytest
from aiortc import RTCBundlePolicy, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from client.call import CallConfig
from client.exit_codes import ExitCode
from client.experiment.analysis import dominant_frequency, tone_correlation
from client.frame_transform import FrameTransform
from client.group_call import GroupCall, GroupCallbacks, GroupParts, GroupStats
from client.hub_connection import HubConnection
from client.media import PatternTrack, ToneTrack, read_pattern_number
from client.session import CallError, VerificationRefused, Verify
from crypto.frame_crypto import FrameCounters, SFrameSender
from crypto.identity import IdentityKey, KnownPeers
from crypto.sender_keys import SenderKeyCounters
from signaling.hub import Limits
from signaling.media_server import MediaServer
from signaling.protocol import MediaOffer, PeerId
from signaling.recording import MediaRecorder
from signaling.server import HubServer
from tests.conftest import VP8, decode_all, decoded_audio, plaintext_runs_on_the_wire, wait_for
from tests.test_call import blindhub

pytestmark = pytest.mark.slow

NAMES = ("alice", "bob", "carol", "dave")
TONES = {"alice": 440, "bob": 550, "carol": 660, "dave": 770, "erin": 880}
# Enough audio for a dominant-frequency estimate (16,384 samples) with margin.
AUDIO_SAMPLES = 30_000


@pytest.fixture
async def start_routed_hub() -> AsyncIterator[Callable[..., Awaitable[HubServer]]]:
    """Start real routing hubs: ``await start_routed_hub(record=DIR)``; all closed after."""
    servers: list[HubServer] = []

    async def start(record: Path | None = None, **limits: Any) -> HubServer:
        # The recorder keeps the test's clock, so that arrivals compare with its own times.
        recorder = None if record is None else MediaRecorder(record, clock=time.monotonic)
        media = MediaServer(Limits(max_peers_per_room=8, **limits), recorder=recorder)
        server = HubServer(media=media)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def member(hub: HubServer, name: str, **options: Any) -> CallConfig:
    defaults: dict[str, Any] = dict(
        room="group",
        hub_url=hub.url,
        name=name,
        identity=IdentityKey.generate(os.urandom),
        known_peers=KnownPeers(),
        tracks=[ToneTrack(TONES[name]), PatternTrack()],
        verify=Verify.TOFU,
        setup_timeout=20,
    )
    return CallConfig(**(defaults | options))


def heard_everyone(call: GroupCall, others: int, samples: int = AUDIO_SAMPLES) -> bool:
    return len(call.received) == others and all(
        len(media.samples) >= samples and media.pattern_numbers for media in call.received.values()
    )


async def run_group(
    calls: Sequence[GroupCall], samples: int = AUDIO_SAMPLES
) -> tuple[list[GroupStats], set[str | None]]:
    """Run every call until each heard every other, then hang all up; return the statistics
    and the security codes shown at that moment (hanging up changes them: members leave)."""
    tasks = [asyncio.create_task(call.run()) for call in calls]
    return await hear_each_other(calls, tasks, samples)


async def hear_each_other(
    calls: Sequence[GroupCall],
    tasks: Sequence[asyncio.Task[GroupStats]],
    samples: int = AUDIO_SAMPLES,
) -> tuple[list[GroupStats], set[str | None]]:
    """`run_group` for calls already running as ``tasks``."""
    try:
        await wait_for(
            lambda: all(heard_everyone(call, len(calls) - 1, samples) for call in calls), timeout=60
        )
        codes = {call.stats.security_code for call in calls}
    finally:
        for call in calls:
            call.hangup("done")
    return list(await asyncio.gather(*tasks)), codes


@pytest.mark.parametrize("size", [3, 4])
async def test_every_member_hears_every_other_on_its_own_track(start_routed_hub, size):
    hub = await start_routed_hub()
    calls = [GroupCall(member(hub, name)) for name in NAMES[:size]]
    stats, codes = await run_group(calls)
    assert len(codes) == 1 and None not in codes
    for call, summary in zip(calls, stats, strict=True):
        assert len(summary.members) == size - 1
        for peer, media in call.received.items():
            name = summary.members[peer].name
            assert name is not None
            heard = dominant_frequency(media.samples, media.sample_rate)
            assert abs(heard - TONES[name]) < 5, (call.config.name, name, heard)
            assert media.pattern_numbers
            assert summary.members[peer].audio["failed"] == 0, str(summary.members[peer].audio)


# Without FFmpeg's parsers, which drop what does not parse as Opus (all of it is ciphertext).
EXACT_FRAMES = {"fflags": "+noparse+nofillin"}


def recorded(directory: Path, peer: str, kind: str) -> list[tuple[float, bytes]]:
    """(arrival, frame) of every frame the hub forwarded from ``peer``'s ``kind`` stream."""
    [part] = directory.glob(f"group.{peer}.{kind}.mkv")
    arrivals = [json.loads(line)["arrival"] for line in part.with_suffix(".jsonl").open()]
    with av.open(str(part), options=EXACT_FRAMES) as container:
        frames = [bytes(packet) for packet in container.demux() if packet.size]
    assert len(frames) == len(arrivals)
    return list(zip(arrivals, frames, strict=True))


def peer_named(call: GroupCall, name: str) -> PeerId:
    return PeerId(next(peer for peer, m in call.stats.members.items() if m.name == name))


def key_failures(stats: GroupStats) -> dict[str, int]:
    """Frames lost for a reason of keys or tampering, by member and kind (held ones that came
    through are not losses)."""
    return {
        f"{member.name} {kind}": sum(
            getattr(member, kind).get(reason, 0) for reason in ("failed", "expired", "overflowed")
        )
        for member in stats.members.values()
        for kind in ("audio", "video")
    }


def samples_from(call: GroupCall, name: str) -> int:
    peer = peer_named(call, name)
    return len(call.received[peer].samples) if peer in call.received else 0


async def test_churn_a_joiner_reads_nothing_from_before_and_a_leaver_nothing_after(
    start_routed_hub, tmp_path
):
    hub = await start_routed_hub(record=tmp_path)
    alice, bob, carol = (GroupCall(member(hub, name)) for name in ("alice", "bob", "carol"))
    tasks = {call.config.name: asyncio.create_task(call.run()) for call in (alice, bob, carol)}
    await wait_for(lambda: all(heard_everyone(c, 2) for c in (alice, bob, carol)), timeout=60)
    dave = GroupCall(member(hub, "dave"))
    dave_joined = time.monotonic()
    tasks["dave"] = asyncio.create_task(dave.run())
    await wait_for(lambda: all(heard_everyone(c, 3) for c in (alice, bob, carol, dave)), 60)
    # What bob holds when he leaves: his receivers, keys inside.
    bob_holds = {bob.stats.members[peer].name: r for peer, r in bob.receivers.items()}
    bob_id = peer_named(alice, "bob")
    bob.hangup("leaving")
    await tasks.pop("bob")
    stayed = (alice, carol, dave)
    await wait_for(lambda: all(bob_id in call.stats.leaves_announced for call in stayed))
    announced = time.monotonic()  # at most one poll (10 ms) after the last announcement
    # Three more seconds of alice's media at carol and dave, and of carol's at alice.
    heard = [(carol, "alice"), (dave, "alice"), (alice, "carol")]
    marks = [samples_from(call, name) for call, name in heard]
    await wait_for(
        lambda: all(
            samples_from(call, name) >= mark + 3 * 48_000
            for (call, name), mark in zip(heard, marks, strict=True)
        ),
        timeout=30,
    )
    dave_holds = {dave.stats.members[peer].name: r for peer, r in dave.receivers.items()}
    # Erin joins and gets the slot bob had at each of the others: bob's last frames, still in
    # that slot's buffer, must not count against her.
    erin = GroupCall(member(hub, "erin"))
    tasks["erin"] = asyncio.create_task(erin.run())
    await wait_for(
        lambda: (
            heard_everyone(erin, 3)
            and all(samples_from(call, "erin") >= AUDIO_SAMPLES for call in stayed)
        ),
        timeout=60,
    )
    for call in (*stayed, erin):
        call.hangup("done")
    stats = {name: await task for name, task in tasks.items()}
    await hub.close()  # and so its recordings

    # The members that stayed lost no frame to a key's timing, through the joins and the leave.
    for name in ("alice", "carol", "dave", "erin"):
        assert set(key_failures(stats[name]).values()) == {0}, (name, key_failures(stats[name]))
    # Every sender that stayed moved to a fresh generation within a second of the hub's
    # announcement (or before it: bob's sealed bye may come first).
    for name in ("alice", "carol", "dave"):
        summary = stats[name]
        left_at = summary.leaves_announced[bob_id]
        fresh = [change for change in summary.key_changes if change.generation > 0]
        assert fresh and fresh[0].seconds - left_at <= 1.0, (name, summary.key_changes, left_at)
    # The joiner's keys: nothing the others sent before dave joined decrypts under them ...
    for name, publisher in (
        ("alice", peer_named(carol, "alice")),
        ("carol", peer_named(alice, "carol")),
    ):
        before = [frame for at, frame in recorded(tmp_path, publisher, "audio") if at < dave_joined]
        assert len(before) > 20
        unprotect = dave_holds[name].transform("audio")
        assert [unprotect(frame) for frame in before] == [None] * len(before)
        # ... while what they sent after it did.
        assert stats["dave"].members[publisher].audio["frames"] > 50
    # The leaver's keys: nothing sent more than 1 s after the hub announced the leave.
    for name, publisher in (
        ("alice", peer_named(carol, "alice")),
        ("carol", peer_named(alice, "carol")),
        ("dave", peer_named(alice, "dave")),
    ):
        after = [
            frame for at, frame in recorded(tmp_path, publisher, "audio") if at > announced + 1
        ]
        assert len(after) > 50
        unprotect = bob_holds[name].transform("audio")
        assert [unprotect(frame) for frame in after] == [None] * len(after)


def tracks_of(path: Path) -> dict[str, list[bytes]]:
    """Every track of a member's ``--record`` file, by title ("bob audio"), as its frames."""
    with av.open(str(path), options=EXACT_FRAMES) as container:
        titles = {stream.index: stream.metadata.get("title", "") for stream in container.streams}
        frames: dict[str, list[bytes]] = {title: [] for title in titles.values()}
        for packet in container.demux():
            if packet.size:
                frames[titles[packet.stream.index]].append(bytes(packet))
    return frames


async def test_the_hubs_recording_holds_nothing_a_decoder_can_use(start_routed_hub, tmp_path):
    hub_files, alice_file = tmp_path / "hub", tmp_path / "alice.mkv"
    hub_files.mkdir()
    hub = await start_routed_hub(record=hub_files)
    calls = [
        GroupCall(member(hub, "alice", record_path=str(alice_file))),
        *(GroupCall(member(hub, name)) for name in ("bob", "carol")),
    ]
    await run_group(calls, samples=2 * 48_000)
    await hub.close()
    # What alice decrypted, kept by --record with a titled track per member: the plaintext.
    plaintext = tracks_of(alice_file)
    assert sorted(plaintext) == ["bob audio", "bob video", "carol audio", "carol video"]
    for name in ("bob", "carol"):
        peer = peer_named(calls[0], name)
        sent_audio, sent_video = plaintext[f"{name} audio"], plaintext[f"{name} video"]
        assert len(sent_audio) >= 50 and len(sent_video) >= 20
        # The control: decoders given the plaintext hear the tone and read the pattern ...
        assert tone_correlation(decoded_audio(sent_audio), 48000, TONES[name]) > 0.8
        assert any(read_pattern_number(f) is not None for f in decode_all(VP8, sent_video))
        # ... while the hub's recording of the same streams holds no 16-byte run of them, and
        # gives an Opus decoder no tone and a VP8 decoder no pattern.
        hub_audio = [frame for _, frame in recorded(hub_files, peer, "audio")]
        hub_video = [frame for _, frame in recorded(hub_files, peer, "video")]
        assert len(hub_audio) >= len(sent_audio) and len(hub_video) >= len(sent_video)
        as_packets = [SimpleNamespace(payload=frame) for frame in hub_audio + hub_video]
        assert plaintext_runs_on_the_wire(sent_audio + sent_video, as_packets) == []
        heard = decoded_audio(hub_audio)
        assert tone_correlation(heard or [0.0], 48000, TONES[name]) < 0.1
        numbers = map(read_pattern_number, decode_all(VP8, hub_video))
        assert [number for number in numbers if number is not None] == []


class GarbageMember:
    """A participant of the routed room that speaks the hub's protocol but not blindhub's: it
    publishes plain Opus and VP8 (no SFrame) and never answers a key agreement."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pc = RTCPeerConnection(RTCConfiguration(bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))

    async def join(self) -> None:
        self.hub = await HubConnection.connect(self.url)
        await self.hub.join("group")
        while not isinstance(event := await self.hub.next_event(), MediaOffer):
            pass
        await self.pc.setRemoteDescription(RTCSessionDescription(event.sdp, "offer"))
        for transceiver, track in zip(
            self.pc.getTransceivers(), (ToneTrack(300), PatternTrack()), strict=False
        ):
            transceiver.sender.replaceTrack(track)
            transceiver.direction = "sendonly"
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await self.hub.send_media_answer(self.pc.localDescription.sdp)

    async def close(self) -> None:
        await self.pc.close()
        await self.hub.close()


async def test_a_garbage_member_and_one_that_leaves_mid_handshake_disturb_nobody(
    start_routed_hub,
):
    hub = await start_routed_hub()
    garbage = GarbageMember(hub.url)
    await garbage.join()
    # One more member hangs up while its key agreements run.
    quitter = GroupCall(member(hub, "dave"))
    quitter_task = asyncio.create_task(quitter.run())
    calls = [GroupCall(member(hub, name)) for name in ("alice", "bob", "carol")]
    tasks = [asyncio.create_task(call.run()) for call in calls]
    await wait_for(lambda: any(call.stats.members for call in calls) or quitter.session is not None)
    quitter.hangup("gone")
    await asyncio.gather(quitter_task, return_exceptions=True)
    try:
        stats, codes = await hear_each_other(calls, tasks)
    finally:
        await garbage.close()
    assert len(codes) == 1
    for summary in stats:
        # Only the three that agreed keys are members; none of their frames failed.
        named = {m.name: m for m in summary.members.values() if m.name}
        assert len(named) == 2 and "dave" not in named
        for m in named.values():
            assert (m.audio["failed"], m.video["failed"]) == (0, 0)
        # The garbage member's frames were never decoded: never decrypted, all refused.
        unnamed = [m for m in summary.members.values() if not m.name]
        assert all(m.audio.get("frames", 0) == 0 and m.video.get("frames", 0) == 0 for m in unnamed)


class ClearVideoSender(SFrameSender):
    """A keyed member's sender whose video leaves in clear, as the encoder made it (audio is
    encrypted as usual, so its receivers hold its keys): what a broken or hostile client can
    send, and the case a browser with its camera's transform removed does not produce
    (Chromium 150 then puts no video packet on the wire at all)."""

    def transform(self, kind: str) -> FrameTransform:
        if kind != "video":
            return super().transform(kind)
        counters = self.counters.setdefault(kind, FrameCounters())

        def clear(frame: bytes) -> bytes:
            counters.frames += 1
            return frame

        return clear


async def test_a_members_video_in_clear_is_refused_and_never_decoded(start_routed_hub):
    """bob is keyed and his audio decrypts, but his VP8 frames cross the hub unencrypted. Each
    one reaches alice's receiver for bob, which refuses it (it parses as an SFrame header with
    some KID, and no key of bob's authenticates it): alice decodes no picture from bob, and
    counts every frame of his video as refused, none decrypted."""
    hub = await start_routed_hub()
    alice = GroupCall(member(hub, "alice"))
    bob = GroupCall(member(hub, "bob"), parts=GroupParts(sender=ClearVideoSender))
    tasks = [asyncio.create_task(call.run()) for call in (alice, bob)]

    def bob_video_at_alice() -> SenderKeyCounters:
        receiver = alice.receivers.get(peer_named(alice, "bob"))
        return (receiver.counters.get("video") if receiver else None) or SenderKeyCounters()

    def refused(counters: SenderKeyCounters) -> int:
        return counters.failed + counters.held + counters.before_join

    try:
        await wait_for(lambda: any(m.name == "bob" for m in alice.stats.members.values()), 30)
        # Clear VP8 frames reached alice's transform: about 2 s of bob's video, with the
        # keyframes alice asks for on each failure among them.
        await wait_for(lambda: refused(bob_video_at_alice()) >= 40, timeout=30)
        await wait_for(lambda: samples_from(alice, "bob") >= AUDIO_SAMPLES, timeout=30)
    finally:
        for call in (alice, bob):
            call.hangup("done")
        summaries = await asyncio.gather(*tasks)
    from_bob = alice.received[peer_named(alice, "bob")]
    # bob is a keyed member: his encrypted audio plays ...
    assert abs(dominant_frequency(from_bob.samples, from_bob.sample_rate) - TONES["bob"]) <= 5
    # ... but no frame of his clear video reached a decoder, and each one is counted.
    assert (from_bob.video_frames, from_bob.pattern_numbers) == (0, [])
    video = summaries[0].members[peer_named(alice, "bob")].video
    assert video["frames"] == video["released"] == 0, video
    assert video["received"] == video["failed"] + video["held"] + video["before_join"], video
    # Every frame held ended its wait, in the call or with it.
    assert video["held"] == video["released"] + video["expired"] + video["overflowed"], video
    assert video["failed"] > 0, video
    # The control: the same decoders read alice's encrypted pattern at bob.
    assert bob.received[peer_named(bob, "alice")].pattern_numbers
    assert bob.stats.sent["video"]["frames"] >= video["received"]


async def test_the_call_command_in_a_routed_room_shows_roster_code_and_members(
    start_routed_hub, tmp_path
):
    hub = await start_routed_hub()
    shown_by: dict[str, list[str]] = {"bob": [], "carol": []}
    bob, carol = (
        GroupCall(
            member(hub, name, duration=duration), GroupCallbacks(on_security_code=codes.append)
        )
        for (name, codes), duration in zip(shown_by.items(), (None, 8), strict=True)
    )
    calls = [bob, carol]

    async def bob_leaves_after_a_second_of_alice() -> None:
        # While alice (4 s) and carol go on.
        await wait_for(lambda: any(m.name == "alice" for m in bob.stats.members.values()), 30)
        await wait_for(lambda: samples_from(bob, "alice") >= 48_000, 30)
        bob.hangup("leaving")

    leaving = asyncio.create_task(bob_leaves_after_a_second_of_alice())
    tasks = [asyncio.create_task(call.run()) for call in calls]
    code, out, err = await blindhub(
        "call", "group", "--hub", hub.url, "--name", "alice", "--send", "tone:440,pattern",
        "--verify", "tofu", "--duration", "4", "--home", str(tmp_path / "alice"),
        "--stats-json", str(tmp_path / "alice.json"), "--record", str(tmp_path / "alice.mkv"),
    )  # fmt: skip
    stats = await asyncio.gather(*tasks)
    await leaving
    assert code == 0, err
    # A line for each member that joined, the roster with statuses, and the code, which is the
    # one bob and carol showed.
    assert out.count("joined: end-to-end encrypted") == 2
    assert "NEW bob SHA256:" in out and "NEW carol SHA256:" in out
    shown = [line.split(": ", 1)[1].split(" (")[0] for line in out.splitlines() if "code:" in line]
    assert set(shown) & set(shown_by["bob"]) & set(shown_by["carol"])
    assert [s.ended_by for s in stats] == ["leaving", "duration"]
    assert "left: bob (" in out
    summary = json.loads((tmp_path / "alice.json").read_text())
    members = {m["name"]: m for m in summary["members"].values()}
    assert sorted(members) == ["bob", "carol"]
    for name, m in members.items():
        assert m["status"] == "NEW" and m["fingerprint"].startswith("SHA256:")
        assert m["audio"]["frames"] > 20 and m["audio"]["failed"] == 0, name
    assert members["bob"]["left"] and not members["carol"]["left"]
    assert sorted(tracks_of(tmp_path / "alice.mkv")) == [
        "bob audio", "bob video", "carol audio", "carol video"
    ]  # fmt: skip


async def test_a_group_call_records_only_to_matroska(start_routed_hub, tmp_path):
    hub = await start_routed_hub()
    code, _, err = await blindhub(
        "call", "group", "--hub", hub.url, "--name", "alice", "--verify", "tofu",
        "--home", str(tmp_path / "alice"), "--record", str(tmp_path / "alice.wav"),
    )  # fmt: skip
    assert code == ExitCode.LOCAL_PROBLEM and "records to .mkv" in err


async def test_verify_pinned_keeps_an_unpinned_member_out_and_the_call_goes_on(
    start_routed_hub,
):
    hub = await start_routed_hub()
    bob_identity = IdentityKey.generate(os.urandom)
    alice_pins = KnownPeers()
    alice_pins.check("bob", bob_identity.public_key)
    failed: list[CallError] = []
    alice = GroupCall(
        member(hub, "alice", known_peers=alice_pins, verify=Verify.PINNED),
        GroupCallbacks(on_member_failed=lambda _peer, error: failed.append(error)),
    )
    bob = GroupCall(member(hub, "bob", identity=bob_identity))
    mallory = GroupCall(member(hub, "carol"))  # a stranger to alice
    tasks = [asyncio.create_task(call.run()) for call in (alice, bob, mallory)]
    try:
        await wait_for(
            lambda: (
                heard_everyone(alice, 1)
                and heard_everyone(bob, 2)
                and heard_everyone(mallory, 1)
                and bool(failed)
            ),
            timeout=60,
        )
    finally:
        for call in (alice, bob, mallory):
            call.hangup("done")
        stats = await asyncio.gather(*tasks)
    assert [type(error) for error in failed] == [VerificationRefused]
    alice_sees = {m.name for m in stats[0].members.values() if m.name}
    assert alice_sees == {"bob"}
    # Mallory got no key from alice, so nothing of alice's ever decrypted at mallory.
    at_mallory = {m.name: m for m in stats[2].members.values() if m.name}
    assert set(at_mallory) == {"bob"}
    assert all(m.audio.get("frames", 0) == 0 for m in stats[2].members.values() if not m.name)
