"""Whole calls through a real hub on a free port, real aiortc on loopback."""

import asyncio
import json
import os
import signal
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

import av
import pytest
from aiortc import RTCPeerConnection
from aiortc.rtp import RtpPacket

from client.call import (
    Call,
    CallConfig,
    CallParts,
    CallPhase,
    FrameProtection,
    SFrameProtection,
)
from client.experiment.analysis import dominant_frequency, tone_correlation
from client.experiment.layers import Layers
from client.frame_transform import FrameTransform, install_packet_observer
from client.hub_connection import HubConnection, Relayed
from client.identity_store import load_known_peers, open_identity, save_known_peers
from client.media import PatternTrack, ToneTrack, read_pattern_number
from client.session import SUITES, CallFailed, IdentityMismatch, VerificationRefused, Verify
from crypto.handshake import Initiator
from crypto.identity import IdentityKey, KnownPeers
from crypto.sframe import SFrameHeader
from signaling.hub import Delivery, Hub
from signaling.protocol import JsonText, PeerId, PeerJoined, RelayFrom
from signaling.server import HubServer
from tests.conftest import (
    VP8,
    decode_all,
    decoded_audio,
    plaintext_runs_on_the_wire,
    wait_for,
    wire_frames,
)

pytestmark = pytest.mark.slow


def config(hub, name, tone, **options) -> CallConfig:
    defaults = dict(
        room="room1",
        hub_url=hub.url,
        name=name,
        identity=IdentityKey.generate(os.urandom),
        known_peers=KnownPeers(),
        tracks=[ToneTrack(tone), PatternTrack()],
        verify=Verify.TOFU,
        duration=2.5,
        setup_timeout=20,
    )
    return CallConfig(**(defaults | options))


async def in_the_room(hub: HubServer, peers: int = 1, room: str = "room1") -> None:
    """Wait until ``room`` holds ``peers`` peers: the first one in initiates."""
    await wait_for(lambda: hub.hub.room_size(room) == peers)


async def run_pair(
    hub: HubServer,
    first: CallConfig,
    second: CallConfig,
    first_parts: CallParts | None = None,
    second_parts: CallParts | None = None,
):
    alice, bob = Call(first, first_parts), Call(second, second_parts)
    alice_task = asyncio.create_task(alice.run())
    await in_the_room(hub)  # alice is in the room first, so she initiates
    results = await asyncio.gather(alice_task, bob.run(), return_exceptions=True)
    return alice, bob, results


async def test_a_full_call_both_ways(hub):
    alice, bob, results = await run_pair(hub, config(hub, "alice", 440), config(hub, "bob", 660))
    for result in results:
        assert not isinstance(result, BaseException), result
    for call, heard in ((alice, 660), (bob, 440)):
        received = call.received
        assert abs(dominant_frequency(received.samples, received.sample_rate) - heard) < 5
        numbers = received.pattern_numbers
        assert len(numbers) >= 10 and numbers == sorted(numbers)
        stats = call.stats
        assert stats.protection is not None and stats.protection.end_to_end_encrypted
        assert stats.protection.pin == "NEW" and stats.protection.sas
        for kind in (stats.audio, stats.video):
            assert kind.sent > 0 and kind.decrypted > 0 and kind.failed == 0
            assert kind.sframe_bytes_added > 0
        assert stats.setup_seconds is not None
    assert alice.stats.protection.sas == bob.stats.protection.sas
    # Both hung up at their duration or on the other's bye.
    assert {alice.stats.ended_by, bob.stats.ended_by} <= {"duration", "peer-bye", "peer-left"}


@dataclass
class Wiretap:
    """What one peer's receivers got on the wire, and what its encoders made before SFrame."""

    wire: dict[str, list[RtpPacket]] = field(default_factory=lambda: {"audio": [], "video": []})
    plaintext: dict[str, list[bytes]] = field(default_factory=lambda: {"audio": [], "video": []})

    def parts(self) -> CallParts:
        """The product's call, with this tap on its receivers and on its encoders' output."""
        return CallParts(
            frames=lambda: _Observed(SFrameProtection(), self.plaintext),
            prepare_connection=self._tap,
        )

    def _tap(self, pc: RTCPeerConnection) -> None:
        for transceiver in pc.getTransceivers():
            install_packet_observer(transceiver.receiver, self.wire[transceiver.kind].append)


class _Observed:
    """A frame protection that keeps each encoded frame before it protects it."""

    def __init__(self, inner: FrameProtection, plaintext: dict[str, list[bytes]]) -> None:
        self._inner = inner
        self._plaintext = plaintext
        self.install, self.retire, self.counters = inner.install, inner.retire, inner.counters

    @property
    def send_kid(self) -> int | None:
        return self._inner.send_kid

    def transforms(self, kind: str, on_failure: Any) -> tuple[FrameTransform, FrameTransform]:
        transforms = self._inner.transforms(kind, on_failure)
        assert transforms is not None
        protect, unprotect = transforms

        def keep_then_protect(frame: bytes) -> bytes | None:
            self._plaintext[kind].append(bytes(frame))
            return protect(frame)

        return keep_then_protect, unprotect


async def test_on_the_wire_only_sframe_under_the_senders_kid_and_nothing_decodable(hub):
    taps = {"alice": Wiretap(), "bob": Wiretap()}
    alice, bob, results = await run_pair(
        hub,
        config(hub, "alice", 440),
        config(hub, "bob", 660),
        taps["alice"].parts(),
        taps["bob"].parts(),
    )
    assert not any(isinstance(result, BaseException) for result in results), results
    calls = {"alice": alice, "bob": bob}
    for name, sender_name, tone in (("alice", "bob", 660), ("bob", "alice", 440)):
        wire, sent = taps[name].wire, taps[sender_name].plaintext
        kid = calls[sender_name].frames.send_kid
        assert kid is not None
        # Every audio RTP payload, and every video frame as reassembled after the VP8 payload
        # descriptors, begins with an SFrame header carrying the sender's KID.
        audio_payloads = [packet.payload for packet in wire["audio"]]
        video_frames = wire_frames(wire["video"], "video")
        assert len(audio_payloads) >= 50 and len(video_frames) >= 20
        for frame in audio_payloads + video_frames:
            assert SFrameHeader.parse(frame)[0].kid == kid

        # No 16-byte run of any encoded plaintext frame appears in any RTP payload.
        plaintext = sent["audio"] + sent["video"]
        assert len(plaintext) >= 70
        assert plaintext_runs_on_the_wire(plaintext, wire["audio"] + wire["video"]) == []

        # Decoders given the encoded plaintext hear the tone and read the pattern (the
        # control) ...
        assert tone_correlation(decoded_audio(sent["audio"]), 48000, tone) > 0.8
        assert any(read_pattern_number(f) is not None for f in decode_all(VP8, sent["video"]))
        # ... but given what crossed the wire, an Opus decoder hears no tone (at most noise)
        # and a VP8 decoder shows no pattern frame number at all.
        wire_audio = decoded_audio(wire_frames(wire["audio"], "audio"))
        assert tone_correlation(wire_audio or [0.0], 48000, tone) < 0.1
        numbers = map(read_pattern_number, decode_all(VP8, video_frames))
        assert [number for number in numbers if number is not None] == []


async def test_a_changed_identity_for_a_pinned_name_refuses_before_media(hub):
    pinned = KnownPeers()
    pinned.check("alice", IdentityKey.generate(os.urandom).public_key)
    alice_tap = Wiretap()
    alice, bob, (alice_result, bob_result) = await run_pair(
        hub,
        config(hub, "alice", 440),
        config(hub, "bob", 660, known_peers=pinned),
        alice_tap.parts(),
    )
    assert isinstance(bob_result, IdentityMismatch)
    assert isinstance(alice_result, CallFailed)
    for call in (alice, bob):
        assert call.received.audio_frames == call.received.video_frames == 0
        assert call.stats.protection is None  # refused before any key was used
        assert call.frames.send_kid is None
    # Not one packet from bob reached alice.
    assert alice_tap.wire == {"audio": [], "video": []}


class AlteringHub(Hub):
    """Relays everything, but flips a bit of the encrypted identity in every message of the
    given types (in protocol version 1 it renamed the sender: names travelled in clear)."""

    def __init__(self, message_types: frozenset[str]) -> None:
        super().__init__()
        self.message_types = message_types
        self.altered: list[str] = []

    def handle(self, peer: PeerId, text: str, now: float) -> list[Delivery]:
        return [self._altered(delivery) for delivery in super().handle(peer, text, now)]

    def _altered(self, delivery: Delivery) -> Delivery:
        relayed = delivery.message
        if not isinstance(relayed, RelayFrom):
            return delivery
        message = json.loads(relayed.payload)
        if message.get("type") not in self.message_types:
            return delivery
        self.altered.append(message["type"])
        auth = message["auth"]
        flipped = auth[:40] + ("B" if auth[40] == "A" else "A") + auth[41:]
        payload = JsonText(json.dumps({**message, "auth": flipped}))
        return Delivery(delivery.recipient, RelayFrom(relayed.sender, payload), delivery.room)


@pytest.mark.parametrize(("altered", "refuses"), [("reveal", "bob"), ("confirm", "alice")])
async def test_a_hub_that_alters_an_encrypted_identity_gets_nothing_pinned(altered, refuses):
    # The names and keys travel encrypted and authenticated: the hub can neither read nor
    # change them (in version 1 it could rename a peer, so that the other side would pin the
    # real key under a name the hub chose). Whoever receives the altered one refuses it, and
    # the call command saves no pin of a call that failed during setup.
    hub = AlteringHub(frozenset({altered}))
    alice_pins, bob_pins = KnownPeers(), KnownPeers()
    async with HubServer(hub) as server:
        alice, bob, (alice_result, bob_result) = await run_pair(
            server,
            config(server, "alice", 440, known_peers=alice_pins),
            config(server, "bob", 660, known_peers=bob_pins),
        )
    assert hub.altered == [altered]
    refusing = alice_result if refuses == "alice" else bob_result
    assert isinstance(refusing, CallFailed) and "does not open" in str(refusing)
    assert isinstance(alice_result, CallFailed) and isinstance(bob_result, CallFailed)
    assert list(alice_pins) == [] and list(bob_pins) == []
    # The refusing side never derived a key. Bob, when his confirm is altered, has his (he
    # sent it), but no media flows and his new pin is dropped with the failed call.
    assert (alice if refuses == "alice" else bob).stats.protection is None
    for call in (alice, bob):
        assert call.received.audio_frames == 0


async def test_verify_pinned_refuses_an_unknown_peer(hub):
    _, bob, (alice_result, bob_result) = await run_pair(
        hub, config(hub, "alice", 440), config(hub, "bob", 660, verify=Verify.PINNED)
    )
    assert isinstance(bob_result, VerificationRefused)
    assert isinstance(alice_result, CallFailed)
    assert bob.received.audio_frames == 0


async def test_verify_pinned_accepts_the_pinned_peer(hub):
    alice_identity = IdentityKey.generate(os.urandom)
    pinned = KnownPeers()
    pinned.check("alice", alice_identity.public_key)
    _, bob, results = await run_pair(
        hub,
        config(hub, "alice", 440, identity=alice_identity, duration=1.5),
        config(hub, "bob", 660, verify=Verify.PINNED, known_peers=pinned, duration=1.5),
    )
    assert not any(isinstance(result, BaseException) for result in results), results
    assert bob.stats.protection is not None and bob.stats.protection.pin == "PINNED"


async def test_rekeys_every_interval_lose_no_frame(hub):
    alice, bob, results = await run_pair(
        hub,
        config(hub, "alice", 440, rekey_interval=0.8, duration=3.0),
        config(hub, "bob", 660, rekey_interval=0.8),
    )
    assert not any(isinstance(result, BaseException) for result in results), results
    # The initiator's rekeys come every 0.8 s; the bye may overtake the last one's done.
    assert alice.stats.rekeys >= 2 and bob.stats.rekeys in (
        alice.stats.rekeys - 1,
        alice.stats.rekeys,
    )
    for call, role in ((alice, 0), (bob, 1)):
        # Epoch n's KIDs: 2n for the initiator, 2n + 1 for the responder.
        assert call.frames.send_kid == 2 * call.stats.rekeys + role
        for kind in (call.stats.audio, call.stats.video):
            assert kind.failed == 0 and kind.decrypted > 0
        numbers = call.received.pattern_numbers
        assert numbers == sorted(numbers) and len(numbers) >= 30


async def test_the_call_survives_the_hub_being_stopped_after_setup(start_hub):
    hub = await start_hub()
    phases: list[CallPhase] = []
    alice = Call(config(hub, "alice", 440, duration=3.5, on_phase=phases.append))
    bob = Call(config(hub, "bob", 660))
    alice_task = asyncio.create_task(alice.run())
    await in_the_room(hub)
    bob_task = asyncio.create_task(bob.run())
    await wait_for(lambda: alice.received.audio_frames > 10 and bob.received.audio_frames > 10)
    await hub.close()
    heard = alice.received.audio_frames, bob.received.audio_frames
    # Media keeps flowing both ways with the hub gone (alice's duration ends the call later).
    await wait_for(
        lambda: (
            alice.received.audio_frames - heard[0] >= 20
            and bob.received.audio_frames - heard[1] >= 20
        )
    )
    alice_stats, bob_stats = await asyncio.gather(alice_task, bob_task)
    assert alice_stats.hub_lost and bob_stats.hub_lost
    # Bob's duration (2.5 s) ends first; his bye cannot cross the missing hub, but closing his
    # connection ends alice's side too, before her own duration.
    assert (bob_stats.ended_by, alice_stats.ended_by) == ("duration", "connection-closed")
    # Alice was told at once that the hub went away (no rekeys from then on).
    assert phases[-2:] == [CallPhase.MEDIA, CallPhase.HUB_LOST]


@pytest.mark.parametrize(
    ("layers", "encrypted"),
    [
        (Layers.PLAIN, False),
        (Layers.SFRAME, True),
        (Layers.SEALED, True),
    ],
)
async def test_experiment_only_layers(hub, layers, encrypted):
    alice, bob, results = await run_pair(
        hub,
        config(hub, "alice", 440, duration=1.5),
        config(hub, "bob", 660, duration=1.5),
        layers.parts(),
        layers.parts(),
    )
    assert not any(isinstance(result, BaseException) for result in results), results
    for call, heard in ((alice, 660), (bob, 440)):
        protection = call.stats.protection
        assert protection is not None and protection.end_to_end_encrypted is encrypted
        # The SAS is shown from SEALED on (real identities), though only VERIFIED compares it.
        assert (protection.sas is not None) is layers.seals_signalling
        assert protection.pin != "VERIFIED"
        assert abs(dominant_frequency(call.received.samples, 48000) - heard) < 5
        assert (call.stats.audio.sframe_bytes_added > 0) is encrypted
    assert alice.stats.protection.sas == bob.stats.protection.sas  # an honest hub
    assert alice.stats.detections == bob.stats.detections == {}
    # Below SEALED nothing identifies the peer, so no pin is made.
    assert len(bob.config.known_peers) == 0


async def blindhub(*arguments: str, environment: dict[str, str] | None = None):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client.cli",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if environment is None else os.environ | environment,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, stdout.decode(), stderr.decode()


async def test_the_call_command_completes_and_writes_stats(hub, tmp_path):
    def command(name: str, send: str, *extra: str):
        return blindhub(
            "call", "room1", "--hub", hub.url, "--name", name, "--send", send,
            "--verify", "tofu", "--duration", "2", "--home", str(tmp_path / name), *extra,
        )  # fmt: skip

    alice = asyncio.create_task(
        command(
            "alice", "tone:440,pattern", "--stats-json", str(tmp_path / "a.json"),
            "--rekey-interval", "1",
        )
    )  # fmt: skip
    await in_the_room(hub)  # alice joins first
    bob = await command("bob", "tone:660", "--record", str(tmp_path / "bob.wav"))
    code, out, err = await alice
    assert (code, bob[0]) == (0, 0), (err, bob[2])
    assert "end-to-end encrypted" in out and "SAS to read aloud" in out and "NEW bob SHA256:" in out
    stats = json.loads((tmp_path / "a.json").read_text())
    assert stats["audio"]["decrypted"] > 0 and stats["audio"]["failed"] == 0
    assert stats["protection"]["layers"] == "verified"
    # Alice, the initiator, started a rekey every second (bob's default interval is longer).
    assert stats["rekeys"] >= 1 and "rekeys completed:" in out
    # Bob recorded alice's tone, and both pinned each other.
    samples = array("h")
    with av.open(str(tmp_path / "bob.wav")) as recording:
        stream = recording.streams.audio[0]
        channels, rate = stream.channels, stream.rate
        for frame in recording.decode(stream):
            samples.frombytes(bytes(frame.planes[0])[: frame.samples * 2 * channels])
    assert abs(dominant_frequency(samples[::channels], rate) - 440) < 5
    code, out, _ = await blindhub("contacts", "--home", str(tmp_path / "bob"))
    assert code == 0 and out.startswith("alice\tSHA256:") and out.rstrip().endswith("pinned")


async def test_the_call_command_has_no_option_to_weaken_a_call(tmp_path, unused_tcp_port):
    # Only the interception experiment drops layers, in code (CallParts): never the product.
    code, _, err = await blindhub(
        "call", "room1", "--hub", f"ws://127.0.0.1:{unused_tcp_port}", "--name", "alice",
        "--home", str(tmp_path), "--experiment-only-layers", "plain",
    )  # fmt: skip
    assert code == 2 and "unrecognized arguments: --experiment-only-layers plain" in err


@pytest.mark.parametrize("interval", ["0", "-5", "nan", "soon"])
async def test_rekeys_cannot_be_switched_off_from_the_command_line(tmp_path, interval):
    code, _, err = await blindhub(
        "call", "room1", "--hub", "ws://127.0.0.1:9", "--name", "alice", "--home", str(tmp_path),
        "--rekey-interval", interval,
    )  # fmt: skip
    assert code == 2 and "argument --rekey-interval: must be 1 to 86400 seconds" in err


async def test_a_name_that_cannot_be_signed_is_a_usage_error(tmp_path):
    code, _, err = await blindhub(
        "call", "room1", "--hub", "ws://127.0.0.1:9", "--name", "al\nice", "--home", str(tmp_path)
    )  # fmt: skip
    assert code == 2 and "argument --name: a name has no control or invisible characters" in err
    # Signed exactly as typed, so a name not in normal form is refused, with the form to use.
    code, _, err = await blindhub(
        "call", "room1", "--hub", "ws://127.0.0.1:9", "--name", "bob ", "--home", str(tmp_path)
    )  # fmt: skip
    assert code == 2 and "use 'bob'" in err


async def test_the_call_command_shows_whom_and_the_status_in_every_mode(hub, tmp_path):
    # Bob verified alice earlier: in prompt mode he is not asked, and still sees whom he talks to.
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    alice = open_identity(alice_home, environ={})
    pins = KnownPeers()
    pins.check("alice", alice.public_key)
    pins.mark_verified("alice")
    save_known_peers(bob_home, pins, loaded=KnownPeers())

    def command(name: str, *extra: str):
        return blindhub(
            "call", "room1", "--hub", hub.url, "--name", name, "--duration", "1",
            "--home", str(tmp_path / name), *extra,
        )  # fmt: skip

    alice_call = asyncio.create_task(command("alice", "--verify", "tofu"))
    await in_the_room(hub)
    bob_code, bob_out, bob_err = await command("bob", "--verify", "prompt", "--peer", " alice")
    code, out, err = await alice_call
    assert (code, bob_code) == (0, 0), (err, bob_err)
    assert f"VERIFIED alice {alice.public_key.fingerprint()}" in bob_out
    assert "Does the peer read the same SAS" not in bob_out
    bob_key = open_identity(bob_home, environ={}).public_key
    assert f"NEW bob {bob_key.fingerprint()}" in out


async def test_the_call_command_refuses_another_peer_than_asked_exit_11(hub, tmp_path):
    alice_command = blindhub(
        "call", "room1", "--hub", hub.url, "--name", "alice", "--verify", "tofu",
        "--peer", "carol", "--duration", "1", "--home", str(tmp_path / "alice"),
    )  # fmt: skip
    alice = asyncio.create_task(alice_command)
    await in_the_room(hub)  # alice initiates, and checks bob's signed name on his confirm
    bob = Call(config(hub, "bob", 660, setup_timeout=20))
    with pytest.raises(CallFailed, match="left during setup"):
        await bob.run()
    code, out, err = await alice
    assert code == 11 and "not 'carol' as asked with --peer" in err, err
    assert "end-to-end encrypted" not in out
    assert load_known_peers(tmp_path / "alice").get("bob") is None


async def test_a_protected_identity_is_unlocked_before_the_call(tmp_path, unused_tcp_port):
    home = str(tmp_path)
    unlocked = {"BLINDHUB_PASSPHRASE": "correct horse"}
    assert (await blindhub("id", "--home", home, "--protect", environment=unlocked))[0] == 0
    call = ("call", "room1", "--hub", f"ws://127.0.0.1:{unused_tcp_port}", "--name", "alice")
    # The right passphrase gets as far as the (absent) hub; a wrong one stops before it.
    code, _, err = await blindhub(*call, "--home", home, environment=unlocked)
    assert code == 3 and "cannot join" in err
    code, _, err = await blindhub(
        *call, "--home", home, environment={"BLINDHUB_PASSPHRASE": "wrong"}
    )
    assert code == 7 and "wrong passphrase" in err


async def test_an_unreachable_hub_exits_3(tmp_path, unused_tcp_port):
    code, _, err = await blindhub(
        "call", "room1", "--hub", f"ws://127.0.0.1:{unused_tcp_port}", "--name", "alice",
        "--home", str(tmp_path), "--duration", "1",
    )  # fmt: skip
    assert code == 3 and "cannot join" in err


async def test_id_and_contacts_commands(tmp_path):
    code, first, _ = await blindhub("id", "--home", str(tmp_path))
    code_again, second, _ = await blindhub("id", "--home", str(tmp_path))
    assert code == code_again == 0 and first == second and first.startswith("SHA256:")
    assert await blindhub("contacts", "--home", str(tmp_path)) == (0, "", "")
    code, _, err = await blindhub("contacts", "--home", str(tmp_path), "forget", "nobody")
    assert code == 8 and "nobody" in err


async def test_hanging_up_during_setup_abandons_the_call(hub):
    alone = Call(config(hub, "alice", 440))
    task = asyncio.create_task(alone.run())
    await in_the_room(hub)
    alone.hangup("ctrl-c")
    with pytest.raises(CallFailed, match="before the call was set up"):
        await task


@pytest.mark.parametrize("confirmed", [True, False])
async def test_verify_prompt_asks_to_confirm_the_sas(hub, confirmed):
    shown = []

    async def confirm(state):
        shown.append(state)
        return confirmed

    bob_peers = KnownPeers()
    _, bob, (_, bob_result) = await run_pair(
        hub,
        config(hub, "alice", 440, duration=1.0),
        config(hub, "bob", 660, verify=Verify.PROMPT, confirm_sas=confirm, known_peers=bob_peers),
    )
    assert len(shown) == 1 and shown[0].sas and shown[0].peer_name == "alice"
    if confirmed:
        assert not isinstance(bob_result, BaseException), bob_result
        pin = bob_peers.get("alice")
        assert pin is not None and pin.verified
    else:
        assert isinstance(bob_result, VerificationRefused)
        assert bob.received.audio_frames == 0
        assert bob_peers.get("alice") is None  # a rejected SAS pins nothing


async def test_a_sas_compared_for_longer_than_the_setup_timeout_still_completes(hub):
    # The setup timeout covers the network, not the people reading the SAS aloud.
    async def slow_confirm(state):
        # The duration under test: the people take longer than bob's setup timeout (1.5 s).
        await asyncio.sleep(2.5)
        return True

    bob_peers = KnownPeers()
    _, bob, results = await run_pair(
        hub,
        config(hub, "alice", 440, duration=1.0),
        config(
            hub, "bob", 660, verify=Verify.PROMPT, confirm_sas=slow_confirm,
            known_peers=bob_peers, setup_timeout=1.5, duration=1.0,
        ),
    )  # fmt: skip
    assert not any(isinstance(result, BaseException) for result in results), results
    assert bob.received.audio_frames > 0
    pin = bob_peers.get("alice")
    assert pin is not None and pin.verified


async def test_hanging_up_at_the_sas_prompt_pins_nothing(hub):
    # A hub that stalls until the user gives up must not get its key pinned under the name.
    asked = asyncio.Event()

    async def never_answer(state):
        asked.set()
        await asyncio.Event().wait()
        return True

    bob_peers = KnownPeers()
    alice = Call(config(hub, "alice", 440))
    bob = Call(
        config(
            hub, "bob", 660, verify=Verify.PROMPT, confirm_sas=never_answer,
            known_peers=bob_peers,
        )
    )  # fmt: skip
    alice_task = asyncio.create_task(alice.run())
    await in_the_room(hub)
    bob_task = asyncio.create_task(bob.run())
    await asyncio.wait_for(asked.wait(), 15)
    assert bob_peers.get("alice") is not None  # pinned by the handshake, not yet confirmed
    bob.hangup("ctrl-c")
    with pytest.raises(CallFailed, match="before the call was set up"):
        await bob_task
    assert bob_peers.get("alice") is None
    assert isinstance((await asyncio.gather(alice_task, return_exceptions=True))[0], CallFailed)


async def test_the_hub_closing_during_setup_fails_the_call(start_hub):
    server = await start_hub()
    alone = Call(config(server, "alice", 440))
    task = asyncio.create_task(alone.run())
    await in_the_room(server)
    await server.close()
    with pytest.raises(CallFailed, match="hub"):
        await task


@pytest.mark.parametrize(
    "sdp", ["garbage", "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\n", "v=0\r\nm=audio x\r\n"]
)
async def test_an_authenticated_peer_sending_garbage_sdp_fails_the_call(hub, sdp):
    mallory = await HubConnection.connect(hub.url)
    await mallory.join("room1")
    bob_peers = KnownPeers()
    bob = Call(config(hub, "bob", 660, known_peers=bob_peers))
    task = asyncio.create_task(bob.run())
    bob_id = None
    while bob_id is None:
        event = await mallory.next_event()
        if isinstance(event, PeerJoined):
            bob_id = event.peer_id
    initiator = Initiator(
        IdentityKey.generate(os.urandom), os.urandom(16).hex(), SUITES, os.urandom, name="mallory"
    )
    await mallory.relay(bob_id, initiator.start())
    while initiator.state.name != "DONE":
        event = await mallory.next_event()
        if isinstance(event, Relayed):
            for reply in initiator.receive(event.payload):
                await mallory.relay(bob_id, reply)
    channel = initiator.result.channel
    await mallory.relay(bob_id, channel.seal({"type": "confirmed"}))
    await mallory.relay(bob_id, channel.seal({"type": "offer", "sdp": sdp}))
    with pytest.raises(CallFailed, match="session description"):
        await task
    await mallory.close()
    assert bob.received.audio_frames == 0


async def test_sigint_at_the_sas_prompt_exits_promptly_and_pins_nothing(hub, tmp_path):
    def command(name: str, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "client.cli", "call", "room1", "--hub", hub.url,
            "--name", name, "--home", str(tmp_path / name), "--duration", "30", *extra,
        ]  # fmt: skip

    alice = await asyncio.create_subprocess_exec(
        *command("alice", "--verify", "tofu"), stdout=asyncio.subprocess.DEVNULL
    )
    await in_the_room(hub)  # alice joins first
    # bob's stdin is a pipe nobody writes to: the SAS question stays unanswered.
    bob = await asyncio.create_subprocess_exec(
        *command("bob"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert bob.stdout is not None and bob.stderr is not None
        shown = b""
        while b"Does the peer read the same SAS?" not in shown:
            chunk = await asyncio.wait_for(bob.stdout.read(1024), 30)
            assert chunk, shown
            shown += chunk
        bob.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(bob.wait(), 10)
        err = (await bob.stderr.read()).decode()
        assert code == 6 and "before the call was set up" in err, err
    finally:
        for process in (alice, bob):
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert await blindhub("contacts", "--home", str(tmp_path / "bob")) == (0, "", "")


async def test_a_recording_nobody_can_write_is_a_local_problem(tmp_path, unused_tcp_port):
    def call(record: str):
        return blindhub(
            "call", "room1", "--hub", f"ws://127.0.0.1:{unused_tcp_port}", "--name", "alice",
            "--home", str(tmp_path / "home"), "--record", record,
        )  # fmt: skip

    code, _, err = await call(str(tmp_path / "missing" / "call.wav"))
    assert code == 7 and "missing" in err, err
    code, _, err = await call(str(tmp_path / "call.ogg"))
    assert code == 7 and ".wav, .mkv or .mp4" in err, err
    # A good path is checked without being opened: an existing file is left as it was until
    # the call records (here the hub is absent, exit 3).
    existing = tmp_path / "existing.wav"
    existing.write_bytes(b"precious")
    code, _, err = await call(str(existing))
    assert code == 3 and existing.read_bytes() == b"precious", err
