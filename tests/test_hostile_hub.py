"""The hostile hub's capabilities, each on its own: tamper and pass-through in the routing core
(no sockets), keyswap and the sealed-SDP alteration over a real hub with real key agreement
machines and sealed channels, the keyswap's SFrame relay frame by frame, and the record log."""

import asyncio
import itertools
import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from client.experiment.hostile_hub import (
    Capability,
    HostileHub,
    SFrameRelay,
    TamperPlan,
    altered,
    parse_capabilities,
)
from client.experiment.media_mitm import Direction, MediaTamper
from client.hub_connection import HubConnection, Relayed
from crypto.frame_crypto import MediaKey, SFrameReceiver, SFrameSender
from crypto.handshake import HandshakeResult, HandshakeState, Initiator, PeerCheck, Responder
from crypto.identity import IdentityKey, KnownPeers, PinnedIdentityMismatch, UnknownPeer, b64encode
from crypto.sealed import DecryptionFailed, Role, SealedChannel, SealedReplay
from crypto.sframe import CipherSuite
from signaling.hub import Delivery
from signaling.protocol import JsonText, PeerId, RelayFrom
from tests.conftest import wait_for

SUITES = (CipherSuite.AES_128_GCM_SHA256_128, CipherSuite.AES_256_GCM_SHA512_128)
TIMEOUT = 10.0
SECRET = bytes(range(32))


def counter_ids() -> Callable[[], PeerId]:
    numbers = itertools.count(1)
    return lambda: PeerId(f"peer{next(numbers)}")


def joined_pair(hub: HostileHub) -> tuple[PeerId, PeerId]:
    first, second = hub.connect(0.0), hub.connect(0.0)
    for peer in (first, second):
        hub.handle(peer, '{"type":"join","room":"r"}', 0.0)
    return first, second


def relay(hub: HostileHub, sender: PeerId, to: PeerId, payload: Any) -> list[Delivery]:
    text = json.dumps({"type": "relay", "to": to, "payload": payload})
    return hub.handle(sender, text, 0.0)


def payloads(deliveries: list[Delivery]) -> list[Any]:
    result = []
    for delivery in deliveries:
        assert isinstance(delivery.message, RelayFrom)
        result.append(json.loads(delivery.message.payload))
    return result


def sealed_pair() -> tuple[SealedChannel, SealedChannel]:
    alice, bob = IdentityKey.generate(os.urandom), IdentityKey.generate(os.urandom)
    transcript = os.urandom(32)
    return (
        SealedChannel(
            Role.INITIATOR,
            "call-1",
            SECRET,
            os.urandom,
            identity=alice,
            peer_identity=bob.public_key,
            transcript_hash=transcript,
        ),
        SealedChannel(
            Role.RESPONDER,
            "call-1",
            SECRET,
            os.urandom,
            identity=bob,
            peer_identity=alice.public_key,
            transcript_hash=transcript,
        ),
    )


def test_parse_capabilities():
    assert parse_capabilities("record+tamper") == {Capability.RECORD, Capability.TAMPER}
    assert parse_capabilities("keyswap") == {Capability.KEYSWAP}
    with pytest.raises(ValueError, match="unknown capability in 'record\\+listen'"):
        parse_capabilities("record+listen")


def test_without_tamper_relays_are_forwarded_byte_for_byte():
    hub = HostileHub({Capability.RECORD}, new_peer_id=counter_ids())
    first, second = joined_pair(hub)
    text = '{"type":"relay","to":"peer2","payload":{"b": 1,  "a":[1.50]}}'
    assert hub.handle(first, text, 0.0) == [
        Delivery(second, RelayFrom(first, JsonText('{"b": 1,  "a":[1.50]}')), "r")
    ]


def in_the_call(hub: HostileHub, first: PeerId, second: PeerId) -> tuple[SealedChannel, ...]:
    """A sealed pair past the setup: the sender's decision and offer crossed the hub, which
    spares the setup's sealed messages, untouched."""
    sender, receiver = sealed_pair()
    for content in ({"type": "confirmed"}, {"type": "offer", "sdp": "v=0"}):
        message = sender.seal(content)
        assert payloads(relay(hub, first, second, message)) == [message]
        receiver.open(message)
    return sender, receiver


def test_tamper_injects_a_replay_and_an_altered_copy_after_each_sealed_message_of_the_call():
    hub = HostileHub({Capability.TAMPER}, new_peer_id=counter_ids())
    first, second = joined_pair(hub)
    sender, receiver = in_the_call(hub, first, second)
    assert (hub.tampered.replayed, hub.tampered.altered) == (0, 0)
    message = sender.seal({"type": "note", "text": "in the call"})

    genuine, replay, forged = payloads(relay(hub, first, second, message))
    assert genuine == replay == message
    assert forged != message and set(forged) == set(message)

    # The recipient's channel takes the genuine one and rejects both copies, unchanged by them.
    assert receiver.open(genuine).content == {"type": "note", "text": "in the call"}
    with pytest.raises(SealedReplay):
        receiver.open(replay)
    with pytest.raises(DecryptionFailed):
        receiver.open(forged)
    assert receiver.open(sender.seal({"type": "bye"})).content == {"type": "bye"}
    assert (hub.tampered.replayed, hub.tampered.altered, hub.tampered.dropped) == (1, 1, 0)

    # Clear messages get no copies.
    assert payloads(relay(hub, first, second, {"type": "hello", "name": "a"})) == [
        {"type": "hello", "name": "a"}
    ]


def test_tamper_drops_the_chosen_types_and_can_inject_only_one_kind_of_copy():
    plan = TamperPlan(replay=False, drop_types=frozenset({"hello"}))
    hub = HostileHub({Capability.TAMPER}, tamper=plan, new_peer_id=counter_ids())
    first, second = joined_pair(hub)
    assert relay(hub, first, second, {"type": "hello", "name": "a"}) == []
    message = in_the_call(hub, first, second)[0].seal({"type": "bye"})
    assert len(payloads(relay(hub, first, second, message))) == 2
    assert (hub.tampered.replayed, hub.tampered.altered, hub.tampered.dropped) == (0, 1, 1)


def test_altered_flips_one_ciphertext_bit_only():
    sender, receiver = sealed_pair()
    message = sender.seal({"type": "bye"})
    forged = altered(message)
    assert forged is not None
    assert {k: v for k, v in forged.items() if k != "ciphertext"} == {
        k: v for k, v in message.items() if k != "ciphertext"
    }
    with pytest.raises(DecryptionFailed):
        receiver.open(forged)


@pytest.mark.parametrize("ciphertext", ["", "!!", "AA=="])
def test_tamper_forwards_a_sealed_message_it_cannot_alter_with_only_its_replay(ciphertext):
    hub = HostileHub({Capability.TAMPER}, new_peer_id=counter_ids())
    first, second = joined_pair(hub)
    message = {"v": 2, "type": "sealed", "epoch": 0, "seq": 2, "ciphertext": ciphertext}
    assert altered(message) is None
    assert payloads(relay(hub, first, second, message)) == [message, message]
    assert (hub.tampered.replayed, hub.tampered.altered, hub.tampered.dropped) == (1, 0, 0)


def test_a_hub_in_the_media_path_must_be_served():
    hub = HostileHub({Capability.DTLS_MITM}, new_peer_id=counter_ids())
    first, second = joined_pair(hub)
    with pytest.raises(RuntimeError, match="use serve"):
        relay(hub, first, second, {"type": "hello"})


# -- over a real hub


class Pair:
    """Two hub connections in one room: ``first`` joined first."""

    def __init__(self, first: HubConnection, second: HubConnection, ids: tuple[PeerId, PeerId]):
        self.first, self.second = first, second
        self.first_id, self.second_id = ids

    async def send(self, from_first: bool, payload: Any) -> None:
        if from_first:
            await self.first.relay(self.second_id, payload)
        else:
            await self.second.relay(self.first_id, payload)

    async def receive(self, at_first: bool) -> Any:
        connection = self.first if at_first else self.second
        while True:
            event = await asyncio.wait_for(connection.next_event(), TIMEOUT)
            if isinstance(event, Relayed):
                return event.payload


@pytest.fixture
async def hostile() -> AsyncIterator[Callable[..., Any]]:
    hubs: list[HostileHub] = []
    connections: list[HubConnection] = []

    async def start(*capabilities: Capability) -> tuple[HostileHub, Pair]:
        hub = HostileHub(capabilities)
        hubs.append(hub)
        server = await hub.serve()
        first = await HubConnection.connect(server.url)
        second = await HubConnection.connect(server.url)
        connections.extend((first, second))
        welcome_first = await first.join("r")
        welcome_second = await second.join("r")
        return hub, Pair(first, second, (welcome_first.peer_id, welcome_second.peer_id))

    yield start
    for connection in connections:
        await connection.close()
    for hub in hubs:
        await hub.close()


async def agree_through(
    pair: Pair,
    alice: IdentityKey,
    bob: IdentityKey,
    *,
    alice_check: PeerCheck | None = None,
    bob_check: PeerCheck | None = None,
) -> tuple[HandshakeResult, HandshakeResult]:
    """The call's key agreement between two real machines whose messages cross the hub.

    Each side answers whatever reaches it, in any order: a keyswapping hub finishes its leg
    with the initiator only after its leg with the responder."""
    initiator = Initiator(alice, "call-1", SUITES, os.urandom, name="alice", peer_check=alice_check)
    responder = Responder(bob, "call-1", SUITES, os.urandom, name="bob", peer_check=bob_check)

    async def drive(machine: Initiator | Responder, first: bool) -> None:
        while machine.state is not HandshakeState.DONE:
            for message in machine.receive(await pair.receive(at_first=first)):
                await pair.send(first, message)

    await pair.send(True, initiator.start())
    await asyncio.gather(drive(initiator, True), drive(responder, False))
    return initiator.result, responder.result


async def test_keyswap_agrees_its_own_keys_with_each_peer_and_reseals_between_them(hostile):
    hub, pair = await hostile(Capability.KEYSWAP)
    alice, bob = IdentityKey.generate(os.urandom), IdentityKey.generate(os.urandom)
    alice_result, bob_result = await agree_through(pair, alice, bob)

    # Each peer completed a key agreement, but with the hub: neither sees the other's key.
    assert alice_result.peer_identity != bob.public_key
    assert bob_result.peer_identity != alice.public_key
    # The names are signed, so the hub signs the peers' real names with its own keys.
    assert (alice_result.peer_name, bob_result.peer_name) == ("bob", "alice")
    # The SAS is what gives it away: the two peers are shown different values, each the one
    # the hub's leg with that peer produced.
    assert alice_result.sas != bob_result.sas
    attack = hub.attack("r")
    assert attack.sas_by_peer == {pair.first_id: alice_result.sas, pair.second_id: bob_result.sas}

    # It unseals what one peer sends and reseals it for the other.
    await pair.send(True, alice_result.channel.seal({"type": "note", "text": "hello bob"}))
    received = bob_result.channel.open(await pair.receive(at_first=False))
    assert received.content == {"type": "note", "text": "hello bob"}

    # A rekey is answered by the hub on that leg alone; the peer gets its new keys all the same,
    # and what it seals under them still reaches the other peer.
    await pair.send(False, bob_result.channel.start_rekey())
    ack = bob_result.channel.open(await pair.receive(at_first=False))
    assert ack.keys.install_receive is not None and ack.keys.switch_send is not None
    for reply in ack.replies:
        await pair.send(False, reply)
    assert bob_result.channel.epoch == 1
    await pair.send(False, bob_result.channel.seal({"type": "note", "text": "hello alice"}))
    received = alice_result.channel.open(await pair.receive(at_first=True))
    assert received.content == {"type": "note", "text": "hello alice"}
    assert alice_result.channel.epoch == 0

    # An offer whose SDP the hub cannot use makes the attack fail on that message: it is
    # dropped (the peers see a call that does not start), never passed on half-rewritten.
    await pair.send(True, alice_result.channel.seal({"type": "offer", "sdp": "v=0"}))
    await wait_for(lambda: attack.events[-1] == "attack-failed: SdpRejected", TIMEOUT)
    # What alice sends next is the next thing bob gets: the offer did not go on before it.
    await pair.send(True, alice_result.channel.seal({"type": "note", "text": "after"}))
    received = bob_result.channel.open(await pair.receive(at_first=False))
    assert received.content == {"type": "note", "text": "after"}


async def test_keyswap_is_refused_by_peers_that_pinned_each_other(hostile):
    hub, pair = await hostile(Capability.KEYSWAP)
    alice, bob = IdentityKey.generate(os.urandom), IdentityKey.generate(os.urandom)
    alice_pins, bob_pins = KnownPeers(), KnownPeers()
    alice_pins.check("bob", bob.public_key)
    bob_pins.check("alice", alice.public_key)
    initiator = Initiator(
        alice, "call-1", SUITES, os.urandom, name="alice", peer_check=pinned_only(alice_pins)
    )
    responder = Responder(
        bob, "call-1", SUITES, os.urandom, name="bob", peer_check=pinned_only(bob_pins)
    )
    sent_by_bob: list[Any] = []
    await pair.send(True, initiator.start())
    for message in initiator.receive(await pair.receive(at_first=True)):  # the hub's accept
        await pair.send(True, message)
    # Alice authenticated first, to the hub; the hub calls Bob under her name, with its key.
    for message in responder.receive(await pair.receive(at_first=False)):
        sent_by_bob.append(message)
        await pair.send(False, message)
    with pytest.raises(PinnedIdentityMismatch):
        responder.receive(await pair.receive(at_first=False))
    # Bob refused before his identity left: the hub never learns who he is. When he leaves,
    # it answers Alice under a name of its choosing, which her pins refuse too.
    await pair.second.close()
    with pytest.raises(UnknownPeer):
        initiator.receive(await pair.receive(at_first=True))
    assert [message["type"] for message in sent_by_bob] == ["accept"]
    assert b64encode(bob.public_key.raw) not in json.dumps(sent_by_bob)
    assert hub.attack("r").mitm is None


def pinned_only(pins: KnownPeers) -> PeerCheck:
    """A pin check that refuses any name not pinned yet (the product's ``--verify pinned``)."""

    def check(name: str, key: Any) -> None:
        if pins.get(name) is None:
            raise UnknownPeer(f"{name} is not pinned")
        pins.check(name, key)

    return check


async def test_dtls_mitm_alters_the_sealed_sdp_each_way_and_nothing_else(hostile):
    hub, pair = await hostile(Capability.DTLS_MITM)
    alice_channel, bob_channel = sealed_pair()
    await pair.send(True, {"type": "hello", "name": "alice"})
    assert await pair.receive(at_first=False) == {"type": "hello", "name": "alice"}
    # Each side's decision passes; what comes next, the SDP, is altered.
    for from_alice, sender, receiver in (
        (True, alice_channel, bob_channel),
        (False, bob_channel, alice_channel),
    ):
        await pair.send(from_alice, sender.seal({"type": "confirmed"}))
        receiver.open(await pair.receive(at_first=not from_alice))
    await pair.send(True, alice_channel.seal({"type": "offer", "sdp": "v=0"}))
    with pytest.raises(DecryptionFailed):
        bob_channel.open(await pair.receive(at_first=False))
    await pair.send(False, bob_channel.seal({"type": "answer", "sdp": "v=0"}))
    with pytest.raises(DecryptionFailed):
        alice_channel.open(await pair.receive(at_first=True))
    # Later sealed messages pass unchanged (alice's channel still misses message 1).
    bye = bob_channel.seal({"type": "bye"})
    await pair.send(False, bye)
    assert await pair.receive(at_first=True) == bye
    assert hub.attack("r").events == ["sealed-sdp-altered"] * 2


async def test_sealed_messages_the_hub_cannot_alter_pass_and_later_relays_still_flow(hostile):
    hub, pair = await hostile(Capability.DTLS_MITM, Capability.TAMPER)
    empty = {"v": 2, "type": "sealed", "epoch": 0, "seq": 2, "ciphertext": ""}
    garbled = {**empty, "ciphertext": "!!"}
    for message in (empty, garbled, {"type": "hello", "name": "alice"}):
        await pair.send(True, message)
    received = [await pair.receive(at_first=False) for _ in range(5)]
    # Each unalterable sealed message arrives as sent, with its replay and no altered copy.
    assert received == [empty, empty, garbled, garbled, {"type": "hello", "name": "alice"}]
    assert hub.attack("r").events == []


async def test_an_error_in_the_attack_costs_one_message_never_the_later_ones(hostile):
    hub, pair = await hostile(Capability.KEYSWAP)
    # A commit whose suites are not a list breaks the hub's own key agreement with bob.
    await pair.send(True, {"type": "commit", "suites": 5})
    await pair.send(True, {"type": "hello", "name": "alice"})
    assert await pair.receive(at_first=False) == {"type": "hello", "name": "alice"}
    [event] = hub.attack("r").events
    assert event.startswith("attack-")


async def test_record_keeps_every_delivery_with_its_exact_payload(hostile):
    hub, pair = await hostile(Capability.RECORD)
    await pair.send(True, {"type": "hello", "name": "alice"})
    await pair.receive(at_first=False)
    lines = hub.metadata()
    assert [line["type"] for line in lines] == ["welcome", "welcome", "peer-joined", "relay"]
    assert lines[-1]["payload"] == {"type": "hello", "name": "alice"}
    assert lines[-1]["from"] == pair.first_id and lines[-1]["to"] == pair.second_id


# -- the keyswap's frame relay


def agree(first: IdentityKey, second: IdentityKey) -> tuple[HandshakeResult, HandshakeResult]:
    initiator = Initiator(first, "call-1", SUITES, os.urandom, name="first")
    responder = Responder(second, "call-1", SUITES, os.urandom, name="second")
    [accept] = responder.receive(initiator.start())
    [reveal] = initiator.receive(accept)
    [confirm] = responder.receive(reveal)
    initiator.receive(confirm)
    return initiator.result, responder.result


def send_key(result: HandshakeResult) -> MediaKey:
    key = result.initial_keys.switch_send
    assert key is not None
    return key


def receive_key(result: HandshakeResult) -> MediaKey:
    key = result.initial_keys.install_receive
    assert key is not None
    return key


def test_sframe_relay_opens_each_leg_with_its_key_and_seals_for_the_other():
    alice, bob, hub_a, hub_b = (IdentityKey.generate(os.urandom) for _ in range(4))
    alice_leg, hub_toward_alice = agree(alice, hub_a)
    hub_toward_bob, bob_leg = agree(hub_b, bob)
    relay = SFrameRelay(hub_toward_alice, hub_toward_bob)

    def sender(result: HandshakeResult) -> SFrameSender:
        sender = SFrameSender(result.suite)
        sender.use_key(send_key(result))
        return sender

    def receiver(result: HandshakeResult) -> SFrameReceiver:
        receiver = SFrameReceiver(result.suite)
        receiver.add_key(receive_key(result))
        return receiver

    # One SFrame context per peer, as in a call (its counters span audio and video).
    legs = {"alice": alice_leg, "bob": bob_leg}
    senders = {name: sender(leg) for name, leg in legs.items()}
    receivers = {name: receiver(leg) for name, leg in legs.items()}
    for direction, source, destination in (
        (Direction.OFFERER_TO_ANSWERER, "alice", "bob"),
        (Direction.ANSWERER_TO_OFFERER, "bob", "alice"),
    ):
        for kind in ("audio", "video"):
            frame = f"{direction.value} {kind}".encode() * 10
            protected = senders[source].transform(kind)(frame)
            assert protected is not None
            opened = relay.open(direction, kind, protected)
            assert opened == frame
            [sealed] = relay.seal(direction, kind, opened)
            # Sealed for the destination: the key the hub agreed with the source does not open it.
            assert receiver(legs[source]).transform(kind)(sealed) is None
            assert receivers[destination].transform(kind)(sealed) == frame
    # A frame the hub holds no key for is not opened.
    assert relay.open(Direction.OFFERER_TO_ANSWERER, "audio", bytes(40)) is None


def test_media_tamper_around_the_keyswap_relay_reseals_then_tampers_and_the_peer_rejects_it():
    # keyswap+tamper: the hub opens and reseals each frame, then replays, alters and drops.
    alice, bob, hub_a, hub_b = (IdentityKey.generate(os.urandom) for _ in range(4))
    alice_leg, hub_toward_alice = agree(alice, hub_a)
    hub_toward_bob, bob_leg = agree(hub_b, bob)
    tamper = MediaTamper(
        SFrameRelay(hub_toward_alice, hub_toward_bob), period=TamperPlan().media_period
    )
    sender = SFrameSender(alice_leg.suite)
    sender.use_key(send_key(alice_leg))
    receiver = SFrameReceiver(bob_leg.suite)
    receiver.add_key(receive_key(bob_leg))
    direction = Direction.OFFERER_TO_ANSWERER
    protect, unprotect = sender.transform("video"), receiver.transform("video")
    decrypted = []
    for number in range(200):
        frame = protect(b"frame %d" % number)
        assert frame is not None
        opened = tamper.open(direction, "video", frame)
        assert opened == b"frame %d" % number
        decrypted += [unprotect(sent) for sent in tamper.seal(direction, "video", opened)]
    did = tamper.counts(direction, "video")
    assert did.replayed == did.altered == did.dropped == 200 // TamperPlan().media_period - 1
    counters = receiver.counters["video"]
    assert (counters.replayed, counters.unauthenticated) == (did.replayed, did.altered)
    assert counters.frames == 200 - did.dropped - did.altered
