"""The group session as a sans-I/O machine: 2 to 6 members in memory, a hub made of queues.

A routed pair first (client/session.py's routed mode), then whole rooms: ``Room`` plays the hub
(it announces joins and leaves and carries each relay, in order per sender and recipient, as
JSON text) and every member's driver (it answers the SAS, encrypts a frame under the member's
send key with the real ``SFrameSender`` and decrypts it with the real ``SenderKeyReceiver``
of every other member). Time is a number: the switch bound, the grace windows and the timeouts
are asserted to the exact second, and nothing sleeps.
"""

import json
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from client import session as pair_session
from client.group_session import (
    SWITCH_BOUND,
    Action,
    AddReceiveKey,
    AskSas,
    Ended,
    GroupSession,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    RetireReceiveGenerations,
    RosterChanged,
    SecurityCode,
    Send,
    UseSendKey,
)
from client.session import (
    CallFailed,
    CallSession,
    CallWithSelf,
    Keyed,
    Protected,
    SenderKeyAcked,
    SenderKeyArrived,
    SessionState,
    VerificationRefused,
    Verify,
)
from crypto.errors import LocalError
from crypto.frame_crypto import SFrameSender
from crypto.sender_keys import SenderKey, SenderKeyReceiver, group_security_code
from crypto.sframe import CipherSuite
from signaling.protocol import PeerId
from tests.test_session import Pair, session_config

SUITE = CipherSuite.AES_128_GCM_SHA256_128

# -- the routed pair


def routed_pair(**options: Any) -> Pair:
    pair = Pair(
        alice={"routed": True} | options.get("alice", {}),
        bob={"routed": True} | options.get("bob", {}),
        tamper=options.get("tamper"),
    )
    pair.start()
    return pair


def test_a_routed_pair_is_keyed_after_the_decisions_with_no_description_and_no_media_key():
    pair = routed_pair()
    for side in (pair.alice, pair.bob):
        assert side.session.state is SessionState.IN_CALL
        kinds = [
            type(action) for action in side.actions if not isinstance(action, pair_session.Send)
        ]
        assert kinds == [Protected, Keyed]
        # No setup timer left, and no rekey ever: sender keys change with the membership.
        assert side.session.next_deadline is None
        assert side.session.rekey(pair.now) == []
    assert pair.alice.of(Protected)[0].protection.sas == pair.bob.of(Protected)[0].protection.sas


def test_a_routed_pair_carries_sender_keys_and_acks_sealed():
    pair = routed_pair()
    key = SenderKey.fresh(SUITE, 3)
    pair.take("alice", pair.alice.session.send_sender_key(key, pair.now))
    assert pair.in_flight[-1][1]["type"] == "sealed"
    pair.run()
    assert pair.bob.of(SenderKeyArrived) == [SenderKeyArrived(key)]
    pair.take("bob", pair.bob.session.ack_sender_key(key.kid, pair.now))
    pair.run()
    assert pair.alice.of(SenderKeyAcked) == [SenderKeyAcked(key.kid)]


def test_sender_keys_wait_for_the_decisions_and_go_only_through_a_routed_session():
    pair = routed_pair(bob={"verify": Verify.PROMPT})
    key = SenderKey.fresh(SUITE, 0)
    assert pair.bob.session.state is SessionState.AWAIT_SAS
    assert pair.bob.session.send_sender_key(key, pair.now) == []
    assert pair.alice.session.send_sender_key(key, pair.now) == []  # awaits bob's decision
    two_party = CallSession(session_config("carol"), initiator=True, now=0.0)
    with pytest.raises(LocalError, match="only through a routed session"):
        two_party.send_sender_key(key, 0.0)


@pytest.mark.parametrize("accepted", [True, False])
def test_the_sas_in_a_routed_pair_decides_as_in_a_two_party_call(accepted):
    pair = routed_pair(bob={"verify": Verify.PROMPT})
    pair.take("bob", pair.bob.session.sas_answer(accepted, pair.now))
    pair.run()
    if accepted:
        assert pair.alice.of(Keyed) == pair.bob.of(Keyed) == [Keyed()]
    else:
        for side in (pair.alice, pair.bob):
            ended = side.ended
            assert ended is not None and isinstance(ended.error, VerificationRefused)
            assert side.of(Keyed) == []


def test_each_mode_refuses_the_others_messages_from_an_authenticated_peer():
    pair = routed_pair()
    channel = pair.alice.session._channel
    assert channel is not None
    pair.take("bob", pair.bob.session.receive(channel.start_rekey(), pair.now))
    ended = pair.bob.ended
    assert ended is not None and "pairwise rekey in a routed call" in str(ended.error)
    pair = Pair()
    pair.start()
    channel = pair.alice.session._channel
    assert channel is not None
    forged = channel.seal_sender_key(SenderKey.fresh(SUITE, 0))
    pair.take("bob", pair.bob.session.receive(forged, pair.now))
    ended = pair.bob.ended
    assert ended is not None and "group sender key in a two-party call" in str(ended.error)


def test_a_routed_pair_that_fails_in_the_call_says_bye_so_the_peer_drops_it_too():
    dropping = {"next": False}

    def drop_one(sender: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        if dropping["next"]:
            dropping["next"] = False
            return []
        return [payload]

    pair = routed_pair(tamper=drop_one)
    dropping["next"] = True
    pair.take("alice", pair.alice.session.send_sender_key(SenderKey.fresh(SUITE, 0), pair.now))
    pair.take("alice", pair.alice.session.send_sender_key(SenderKey.fresh(SUITE, 1), pair.now))
    pair.run()
    ended = pair.bob.ended
    assert ended is not None and ended.reason == "signalling-lost"
    assert pair.alice.ended == pair_session.Ended("peer-bye")
    # In a two-party call nothing changes: the failing side just ends.
    pair = Pair(tamper=drop_one)
    pair.start()
    sent = len(pair.bob.of(pair_session.Send))
    dropping["next"] = True
    pair.take("alice", pair.alice.session.rekey(pair.now))
    pair.take("alice", pair.alice.session.hangup("done", pair.now))
    pair.run()
    assert pair.bob.ended is not None and pair.bob.ended.reason == "signalling-lost"
    assert len(pair.bob.of(pair_session.Send)) == sent


# -- the room

Tamper = Callable[[str, str, dict[str, Any]], list[dict[str, Any]]]


@dataclass
class Member:
    """One member: its group session, its driver's frame protection and what it was asked."""

    name: str
    group: GroupSession
    timed: list[tuple[float, Action]] = field(default_factory=list)
    sas_answers: dict[str, bool] = field(default_factory=dict)
    sender: SFrameSender = field(default_factory=lambda: SFrameSender(SUITE))
    receivers: dict[str, SenderKeyReceiver] = field(default_factory=dict)
    decrypted: dict[str, set[bytes]] = field(default_factory=dict)  # by sender

    @property
    def actions(self) -> list[Action]:
        return [action for _, action in self.timed]

    def of(self, kind: type) -> list[Any]:
        return [action for action in self.actions if isinstance(action, kind)]

    def when(self, kind: type) -> list[tuple[float, Any]]:
        return [(now, action) for now, action in self.timed if isinstance(action, kind)]

    @property
    def roster(self) -> list[str]:
        return [entry.peer for entry in self.group.roster]

    def sent_to(self, peer: str) -> list[Send]:
        return [action for action in self.of(Send) if action.peer == peer]


class Room:
    """The hub and every member's driver (see the module docstring).

    Relays wait in one queue per (sender, recipient) and leave it in order; ``shuffle`` picks
    which queue goes next at random and lets up to ``step`` seconds pass between deliveries.
    ``tamper`` sees each relay; ``hidden`` pairs are never told of each other. With ``frames``,
    every member sends one frame after each delivery to the members it gives its key to."""

    def __init__(self, *, shuffle: int | None = None, step: float = 0.0, frames: bool = False):
        self.now = 0.0
        self.members: dict[str, Member] = {}
        self.queues: dict[tuple[str, str], deque[dict[str, Any]]] = {}
        self.tamper: Tamper = lambda sender, recipient, payload: [payload]
        self.hidden: set[frozenset[str]] = set()
        self.random = random.Random(shuffle) if shuffle is not None else None
        self.step = step
        self.frames = frames
        self.expected: dict[tuple[str, str], set[bytes]] = {}  # (receiver, sender) -> frames
        self.frame_number = 0
        self.unattributed = 0  # frames to a member with no receiver for the sender
        self.finished: list[tuple[str, str, SenderKeyReceiver]] = []  # dropped receivers

    def __getitem__(self, name: str) -> Member:
        return self.members[name]

    def sees(self, a: str, b: str) -> bool:
        return frozenset({a, b}) not in self.hidden

    def join(self, name: str, *, sas: dict[str, bool] | None = None, **options: Any) -> Member:
        config = session_config(name, setup_timeout=10.0, **options)
        member = Member(name, GroupSession(config, now=self.now), sas_answers=sas or {})
        peers = [peer for peer in self.members if self.sees(peer, name)]
        self.members[name] = member
        for peer in peers:  # each driver's receiver for the slot the hub gives the newcomer
            member.receivers[peer] = SenderKeyReceiver(SUITE)
            self[peer].receivers[name] = SenderKeyReceiver(SUITE)
        self.take(name, member.group.welcome([PeerId(p) for p in peers], self.now))
        for peer in peers:
            self.take(peer, self[peer].group.peer_joined(PeerId(name), self.now))
        return member

    def fake_join(self, ghost: str) -> None:
        """The hub tells everyone of a peer that is not there."""
        for name, member in self.members.items():
            self.take(name, member.group.peer_joined(PeerId(ghost), self.now))

    def leave(self, name: str) -> None:
        # The hub forwards what the leaver sent before it closed, then announces the leave.
        for (sender, recipient), queue in list(self.queues.items()):
            while sender == name and queue and recipient in self.members:
                self.deliver(sender, recipient, queue.popleft())
        leaver = self.members.pop(name)
        for peer in list(leaver.receivers):
            self.drop_receiver(leaver, peer)
        self.queues = {pair: q for pair, q in self.queues.items() if name not in pair}
        for peer, member in list(self.members.items()):
            if self.sees(peer, name):
                self.take(peer, member.group.peer_left(PeerId(name), self.now))

    # -- the drivers

    def take(self, name: str, actions: list[Action]) -> None:
        member = self.members[name]
        for action in actions:
            member.timed.append((self.now, action))
            match action:
                case Send(peer, payload):
                    wire = json.loads(json.dumps(payload))  # through the hub as JSON text
                    for relayed in self.tamper(name, peer, wire):
                        if peer in self.members:
                            self.queues.setdefault((name, peer), deque()).append(relayed)
                case AskSas(peer, _) if peer in member.sas_answers:
                    answer = member.sas_answers[peer]
                    self.take(name, member.group.sas_answer(peer, answer, self.now))
                case UseSendKey(key):
                    member.sender.use_key(key.media_key())
                case AddReceiveKey(peer, key):
                    for released in member.receivers[peer].add_key(key):
                        member.decrypted.setdefault(peer, set()).add(released.plaintext)
                case RetireReceiveGenerations(peer, below):
                    member.receivers[peer].retire_generations_below(below)
                case MemberLeft(peer) | MemberFailed(peer):
                    self.drop_receiver(member, peer)

    def drop_receiver(self, member: Member, peer: str) -> None:
        receiver = member.receivers.pop(peer, None)
        if receiver is not None:
            self.finished.append((member.name, peer, receiver))

    def deliver(self, sender: str, recipient: str, payload: dict[str, Any]) -> None:
        group = self[recipient].group
        self.take(recipient, group.receive(PeerId(sender), payload, self.now))

    def run(self) -> None:
        """Deliver every relay (and what it causes), firing the timers as time passes."""
        while True:
            ready = [pair for pair, queue in self.queues.items() if queue]
            if not ready:
                return
            if self.random is not None:
                self.at(self.now + self.random.choice([0.0, 0.0, self.step]), run=False)
                ready = [pair for pair, queue in self.queues.items() if queue]
                if not ready:
                    continue
            sender, recipient = self.random.choice(ready) if self.random else ready[0]
            self.deliver(sender, recipient, self.queues[sender, recipient].popleft())
            if self.frames:
                self.send_frames()

    def at(self, now: float, *, run: bool = True) -> None:
        """Let time pass to ``now``, firing every timer due by then in order."""
        while True:
            due = [
                (deadline, name)
                for name, member in self.members.items()
                if (deadline := member.group.next_deadline) is not None and deadline <= now
            ]
            if not due:
                break
            deadline, name = min(due)
            self.now = max(self.now, deadline)
            self.take(name, self[name].group.handle_timer(self.now))
            if run:
                self.run()
        self.now = max(self.now, now)
        if run:
            self.run()

    def send_frames(self) -> None:
        """Every keyed member sends a frame to every member it gives its key to; each must
        decrypt there now or once its key arrives, and never fail."""
        for name, member in self.members.items():
            if member.sender.kid is None:
                continue
            self.frame_number += 1
            plaintext = f"{name} frame {self.frame_number}".encode()
            frame = member.sender.transform("audio")(plaintext)
            assert frame is not None
            for peer in member.roster:
                receiver = self[peer].receivers.get(name) if peer in self.members else None
                if receiver is None:
                    self.unattributed += 1
                    continue
                self.expected.setdefault((peer, name), set()).add(plaintext)
                decrypted = receiver.transform("audio")(frame)
                if decrypted is not None:
                    self[peer].decrypted.setdefault(name, set()).add(decrypted)

    def check_frames(self) -> int:
        """Every frame sent reached its members, none failed or came too early; how many."""
        receivers = [
            (name, peer, receiver)
            for name, member in self.members.items()
            for peer, receiver in member.receivers.items()
        ]
        for name, peer, receiver in [*receivers, *self.finished]:
            counters = receiver.counters.get("audio")
            if counters is not None:
                assert (counters.failed, counters.before_join) == (0, 0), (name, peer, counters)
                assert counters.expired == counters.overflowed == 0
        for (name, peer), frames in self.expected.items():
            if name in self.members:
                missing = frames - self[name].decrypted.get(peer, set())
                assert not missing, (name, peer, sorted(missing)[:3])
        assert self.unattributed == 0
        return sum(len(frames) for frames in self.expected.values())

    def codes(self) -> dict[str, str]:
        return {name: member.group.security_code for name, member in self.members.items()}


def room_of(*names: str, **options: Any) -> Room:
    room = Room(**options)
    for name in names:
        room.join(name)
        room.run()
    return room


def holds_keys_of_everyone(room: Room) -> None:
    for name, member in room.members.items():
        others = sorted(set(room.members) - {name})
        assert member.roster == others
        for peer in others:
            [*_, newest] = [a.key for a in member.of(AddReceiveKey) if a.peer == peer]
            # The newest key this member holds for the peer is the one the peer sends under.
            assert newest.generation == room[peer].group.send_key.generation
            assert room[peer].group.pending_key is None


@pytest.mark.parametrize("size", [3, 4])
def test_every_member_holds_every_others_key_and_shows_one_code(size):
    names = ["alice", "bob", "carol", "dave"][:size]
    room = room_of(*names, frames=True)
    holds_keys_of_everyone(room)
    assert len(set(room.codes().values())) == 1
    for name, member in room.members.items():
        assert member.group.security_code == member.of(SecurityCode)[-1].code
        [*_, shown] = member.of(RosterChanged)
        assert [(e.name, e.status.value) for e in shown.roster] == [
            (peer, "NEW") for peer in names if peer != name
        ]
        assert [e.fingerprint for e in shown.roster] == [
            room[peer].group.config.identity.public_key.fingerprint()
            for peer in names
            if peer != name
        ]
    room.send_frames()
    assert room.check_frames() > 0


def test_the_member_already_there_starts_each_key_agreement():
    room = room_of("alice", "bob")
    room.join("carol")
    # The newcomer only answers: its first relays to each member come after theirs.
    assert [s.payload["type"] for s in room["alice"].sent_to("carol")][:1] == ["commit"]
    assert room["carol"].actions[0] == UseSendKey(room["carol"].group.send_key)
    room.run()
    assert room["carol"].roster == ["alice", "bob"]


def test_a_joiner_gets_a_ratchet_step_made_for_it_and_the_others_no_message():
    room = room_of("alice", "bob", "carol", frames=True)
    before = {name: member.group.send_key for name, member in room.members.items()}
    old_frames: dict[str, bytes] = {}
    for name, member in room.members.items():
        frame = member.sender.transform("audio")(b"before dave")
        assert frame is not None
        old_frames[name] = frame
    sent_before = {name: len(member.of(Send)) for name, member in room.members.items()}
    room.join("dave")
    room.run()
    for name, key in before.items():
        sends = room[name].of(Send)[sent_before[name] :]
        # Only to dave: the old members follow the ratchet.
        assert {send.peer for send in sends} == {"dave"}
        [given] = [a.key for a in room["dave"].of(AddReceiveKey) if a.peer == name]
        assert (given.generation, given.step) == (key.generation, key.step + 1)
        assert room[name].group.send_key == given
        # What was sent before dave joined stays closed to him.
        receiver = room["dave"].receivers[name]
        assert receiver.transform("audio")(old_frames[name]) is None
        assert receiver.counters["audio"].before_join == 1
        receiver.counters["audio"].before_join = 0
    room.send_frames()
    room.check_frames()
    holds_keys_of_everyone(room)
    assert len(set(room.codes().values())) == 1


def test_a_leave_moves_everyone_to_a_fresh_generation_once_all_acked():
    room = room_of("alice", "bob", "carol", "dave", frames=True)
    codes = room.codes()
    room.at(10.0)
    room.leave("dave")
    room.run()
    for member in room.members.values():
        switches = [(t, a.key) for t, a in member.when(UseSendKey) if t == 10.0]
        [(_, key)] = switches
        assert (key.generation, key.step) == (1, 0)
        [left] = member.of(MemberLeft)
        assert left == MemberLeft(PeerId("dave"), "peer-left")
        # Old generations are retired after the grace window.
        assert member.group.next_deadline == 12.0
    room.at(12.0)
    for member in room.members.values():
        retired = [(t, a.peer, a.below) for t, a in member.when(RetireReceiveGenerations)]
        assert sorted(retired) == sorted((12.0, peer, 1) for peer in member.roster)
    holds_keys_of_everyone(room)
    assert len(set(room.codes().values())) == 1
    assert set(room.codes().values()).isdisjoint(codes.values())
    room.send_frames()
    room.check_frames()


def test_a_leave_switches_at_the_bound_when_a_member_does_not_ack():
    room = room_of("alice", "bob", "carol", "dave", frames=True)
    room.at(10.0)
    held: list[tuple[str, str, dict[str, Any]]] = []

    def hold_carol_to_alice(sender: str, recipient: str, payload: dict[str, Any]):
        if (sender, recipient) == ("carol", "alice"):
            held.append((sender, recipient, payload))
            return []
        return [payload]

    room.tamper = hold_carol_to_alice
    room.leave("dave")
    room.run()
    switched = {
        name: [t for t, a in member.when(UseSendKey) if a.key.generation == 1]
        for name, member in room.members.items()
    }
    # Alice waits for carol's ack, carol for alice's (alice never got carol's key): the bound.
    assert switched == {"alice": [], "bob": [10.0], "carol": []}
    room.at(10.0 + SWITCH_BOUND - 0.01)
    assert switched["alice"] == [] and room["alice"].group.pending_key is not None
    room.at(11.0)
    for name in ("alice", "carol"):
        assert [t for t, a in room[name].when(UseSendKey) if a.key.generation == 1] == [10.5]
    # Alice's frames under the new key wait at carol... no: carol has it; carol's wait at
    # alice until the hub lets carol's key through, and are released then.
    room.send_frames()
    room.tamper = lambda sender, recipient, payload: [payload]
    for sender, recipient, payload in held:
        room.queues.setdefault((sender, recipient), deque()).append(payload)
    room.run()
    assert room["alice"].receivers["carol"].counters["audio"].released > 0
    room.check_frames()
    holds_keys_of_everyone(room)
    assert len(set(room.codes().values())) == 1


def test_a_joiner_during_a_leave_gets_both_keys_ratcheted_and_waits_for_no_switch():
    room = room_of("alice", "bob", "carol", frames=True)
    room.at(3.0)
    held: list[tuple[str, dict[str, Any]]] = []

    def hold_bob_to_alice(sender: str, recipient: str, payload: dict[str, Any]):
        if (sender, recipient) == ("bob", "alice"):
            held.append((sender, payload))
            return []
        return [payload]

    room.tamper = hold_bob_to_alice
    room.leave("carol")  # alice's fresh key waits for bob's ack, which the hub withholds
    room.run()
    old, pending = room["alice"].group.send_key, room["alice"].group.pending_key
    assert pending is not None and (old.generation, pending.generation) == (0, 1)
    room.join("dave")
    room.run()
    given = [
        (a.key.generation, a.key.step) for a in room["dave"].of(AddReceiveKey) if a.peer == "alice"
    ]
    assert given == [(0, old.step + 1), (1, 1)]
    # Alice sends under the ratcheted current key at once; the fresh one still waits.
    assert room["alice"].group.send_key.kid == (0 << 8) | (old.step + 1)
    room.at(3.0 + SWITCH_BOUND)
    assert room["alice"].group.send_key.kid == (1 << 8) | 1
    room.send_frames()
    room.tamper = lambda sender, recipient, payload: [payload]
    room.queues[("bob", "alice")] = deque(payload for _, payload in held)
    room.run()
    room.check_frames()
    holds_keys_of_everyone(room)


def test_a_sender_key_that_does_not_fit_is_dropped_unacknowledged():
    room = room_of("alice", "bob")
    channel = room["bob"].group.sessions[PeerId("alice")]._channel
    assert channel is not None
    acks = len(room["alice"].sent_to("bob"))
    for key in (
        SenderKey.fresh(CipherSuite.AES_256_GCM_SHA512_128, 5),  # another suite
        SenderKey.fresh(SUITE, 0),  # a second key for a generation alice holds
    ):
        room.deliver("bob", "alice", channel.seal_sender_key(key))
    assert len(room["alice"].of(AddReceiveKey)) == 1
    assert len(room["alice"].sent_to("bob")) == acks
    assert room["alice"].roster == ["bob"]


@pytest.mark.parametrize("seed", range(6))
def test_ten_joins_and_leaves_in_a_four_party_call_never_fail_a_frame(seed):
    room = room_of("m0", "m1", "m2", "m3", shuffle=seed, step=0.2, frames=True)
    rng = random.Random(1000 + seed)
    joined = 4
    for change in range(10):
        present = sorted(room.members)
        if change % 2 == 0 or len(present) <= 2:
            room.join(f"m{joined}")
            joined += 1
        else:
            room.leave(rng.choice(present))
        # Some changes come while the last one is still being keyed.
        for _ in range(rng.randrange(0, 12)):
            if not any(room.queues.values()):
                break
            sender, recipient = rng.choice([p for p, q in room.queues.items() if q])
            room.deliver(sender, recipient, room.queues[sender, recipient].popleft())
            room.send_frames()
    room.run()
    room.at(room.now + 5.0)  # every grace window over
    room.send_frames()
    assert room.check_frames() > 500
    holds_keys_of_everyone(room)
    assert len(set(room.codes().values())) == 1
    for member in room.members.values():
        # Only those who left during their key agreement were not admitted.
        assert {str(a.error) for a in member.of(MemberFailed)} <= {"the peer left during setup"}
        assert member.group.detections == {}
        assert member.group.next_deadline is None


# -- a hostile hub


def test_a_peer_the_hub_invents_gets_no_key_and_stalls_no_switch():
    room = room_of("alice", "bob", "carol", "dave")
    room.at(1.0)
    room.fake_join("ghost")
    room.at(2.0)
    room.leave("dave")  # a fresh key while the ghost is still "joining"
    room.run()
    for member in room.members.values():
        assert [t for t, a in member.when(UseSendKey) if a.key.generation == 1] == [2.0]
    room.at(11.0)  # the ghost's setup timeout, 10 s after it was announced
    for member in room.members.values():
        [failed] = member.of(MemberFailed)
        assert failed.peer == "ghost" and isinstance(failed.error, CallFailed)
        assert "not set up in time" in str(failed.error)
        assert [s.payload["type"] for s in member.sent_to("ghost")] == ["commit"]
        assert "ghost" not in member.roster
    assert len(set(room.codes().values())) == 1


def test_a_member_the_hub_hides_from_another_makes_the_codes_differ():
    room = Room()
    room.hidden.add(frozenset({"bob", "carol"}))
    for name in ("alice", "bob", "carol"):
        room.join(name)
        room.run()
    assert room["alice"].roster == ["bob", "carol"]
    assert room["bob"].roster == ["alice"] and room["carol"].roster == ["alice"]
    codes = room.codes()
    assert len(set(codes.values())) == 3
    # The same three, honestly introduced, agree.
    honest = room_of("alice", "bob", "carol")
    assert len(set(honest.codes().values())) == 1


def test_a_member_whose_key_the_hub_withholds_still_counts_in_the_code():
    # The hub hides carol from bob and lets nothing of carol's reach alice after her
    # decision: alice is keyed with carol (carol holds alice's key) but lacks carol's key.
    room = room_of("alice", "bob")
    room.hidden.add(frozenset({"bob", "carol"}))
    sealed: list[dict[str, Any]] = []

    def withhold_carols_key_from_alice(sender: str, recipient: str, payload: dict[str, Any]):
        if (sender, recipient) == ("carol", "alice") and payload["type"] == "sealed":
            sealed.append(payload)
            return sealed[:1] if len(sealed) == 1 else []
        return [payload]

    room.tamper = withhold_carols_key_from_alice
    room.join("carol")
    room.run()
    assert room["alice"].roster == ["bob", "carol"] and room["bob"].roster == ["alice"]
    assert [a.peer for a in room["carol"].of(AddReceiveKey)] == ["alice"]
    assert not [a for a in room["alice"].of(AddReceiveKey) if a.peer == "carol"]
    # Alice's screen lists carol, bob's does not: the codes they read aloud must differ.
    codes = room.codes()
    assert codes["alice"] != codes["bob"]
    assert room["alice"].of(SecurityCode)[-1].code == codes["alice"]
    # Carol's key, once it arrives, changes alice's code; the three views still differ.
    room.tamper = lambda sender, recipient, payload: [payload]
    room.queues[("carol", "alice")] = deque(sealed[1:])
    room.run()
    assert [a.peer for a in room["alice"].of(AddReceiveKey)] == ["bob", "carol"]
    assert room.codes()["alice"] != codes["alice"]
    assert len(set(room.codes().values())) == 3


def test_relays_the_hub_injects_cost_no_security_code_each(monkeypatch):
    # The code costs 5,200 hashes (milliseconds): computed on every event, each garbage relay
    # the hub sends would cost that much of the loop that also decrypts the media.
    room = room_of("alice", "bob", "carol")
    computed: list[object] = []

    def counted(members: Any) -> str:
        computed.append(members)
        return group_security_code(members)

    monkeypatch.setattr("client.group_session.group_security_code", counted)
    alice = room["alice"].group
    shown = alice.security_code
    garbage = {"v": 2, "type": "sealed", "epoch": 0, "seq": 10**6, "ciphertext": "AAAA"}
    for _ in range(100):
        assert alice.receive(PeerId("bob"), garbage, room.now) == []
        assert alice.handle_timer(room.now) == []
    assert alice.detections == {"alteration-rejected": 100}
    assert alice.security_code == shown and len(computed) <= 1
    # A change is still shown at once.
    room.leave("carol")
    room.run()
    assert alice.security_code != shown
    assert alice.security_code == room["alice"].of(SecurityCode)[-1].code


def test_a_relay_the_hub_drops_ends_that_pair_alone():
    room = room_of("alice", "bob", "carol", "dave")
    room.at(5.0)

    def drop_alices_key_to_bob(sender: str, recipient: str, payload: dict[str, Any]):
        return [] if (sender, recipient) == ("alice", "bob") else [payload]

    room.tamper = drop_alices_key_to_bob
    room.leave("dave")
    room.run()
    room.tamper = lambda sender, recipient, payload: [payload]
    # Alice switches at the bound, then gives bob up when his ack has not come in time.
    assert [t for t, a in room["alice"].when(UseSendKey) if a.key.generation == 1] == []
    room.at(5.0 + SWITCH_BOUND)
    assert [t for t, a in room["alice"].when(UseSendKey) if a.key.generation == 1] == [5.5]
    room.at(15.0)
    [left] = room["alice"].of(MemberLeft)[1:]
    assert left.peer == "bob" and isinstance(left.error, CallFailed)
    assert "not acknowledged within 10 s" in str(left.error)
    # Her bye reaches bob after the lost key: he drops her too, with a typed reason.
    [left] = room["bob"].of(MemberLeft)[1:]
    assert (left.peer, left.reason, type(left.error)) == ("alice", "signalling-lost", CallFailed)
    assert room["bob"].group.detections == {"signalling-lost": 1}
    # Carol goes on with both; alice moved to a key bob never gets.
    assert room["carol"].roster == ["alice", "bob"]
    assert room["alice"].roster == ["carol"] and room["bob"].roster == ["carol"]
    assert room["alice"].group.send_key.generation == 2


def test_relays_the_hub_reorders_end_that_pair_alone():
    room = room_of("alice", "bob", "carol")
    held: list[dict[str, Any]] = []

    def swap_alices_first_sealed_relays_to_dave(sender, recipient, payload):
        if (sender, recipient) != ("alice", "dave") or payload["type"] != "sealed":
            return [payload]
        held.append(payload)
        return held[::-1] if len(held) == 2 else []

    room.tamper = swap_alices_first_sealed_relays_to_dave
    room.join("dave")
    room.run()
    # Her sender key came before her decision: dave refuses the pair.
    [failed] = room["dave"].of(MemberFailed)
    assert failed.peer == "alice" and isinstance(failed.error, CallFailed)
    assert "was rejected" in str(failed.error)
    assert not [a for a in room["dave"].of(AddReceiveKey) if a.peer == "alice"]
    # Alice, keyed with him, gives him up when no ack comes; the others go on with both.
    room.at(room.now + 10.0)
    [left] = room["alice"].of(MemberLeft)
    assert left.peer == "dave" and "not acknowledged" in str(left.error)
    assert room["dave"].roster == ["bob", "carol"] and room["alice"].roster == ["bob", "carol"]
    assert room["bob"].roster == ["alice", "carol", "dave"]


def test_verify_pinned_refuses_an_unpinned_member_alone():
    room = room_of("alice", "bob", "carol")
    pins = session_config("x").known_peers
    for name in ("alice", "bob"):
        pins.check(name, room[name].group.config.identity.public_key)
    room.join("dave", verify=Verify.PINNED, known_peers=pins)
    room.run()
    [failed] = room["dave"].of(MemberFailed)
    assert failed.peer == "carol" and isinstance(failed.error, VerificationRefused)
    assert "not pinned" in str(failed.error)
    assert room["dave"].roster == ["alice", "bob"]
    assert room["dave"].group.detections == {"identity-refused": 1}
    # Carol waits for an answer that never comes, then drops dave alone; no key either way.
    room.at(10.0)
    [failed] = room["carol"].of(MemberFailed)
    assert failed.peer == "dave" and "not set up in time" in str(failed.error)
    assert not [a for a in room["carol"].of(AddReceiveKey) if a.peer == "dave"]
    assert not [a for a in room["dave"].of(AddReceiveKey) if a.peer == "carol"]
    assert room["alice"].roster == ["bob", "carol", "dave"]


def test_one_identity_is_one_member():
    room = room_of("alice", "bob")
    room.join("bob2", identity=room["bob"].group.config.identity)
    room.run()
    [failed] = room["alice"].of(MemberFailed)
    assert failed.peer == "bob2" and "identity key is already in the call, as bob" in str(
        failed.error
    )
    assert room["alice"].roster == ["bob"]
    # Alice's bye tells bob2 at once; bob2 and bob refuse each other as a call with oneself.
    assert room["bob2"].of(MemberLeft) == [MemberLeft(PeerId("alice"), "peer-bye")]
    [failed] = room["bob2"].of(MemberFailed)
    assert failed.peer == "bob" and isinstance(failed.error, CallWithSelf)


def test_a_declined_sas_drops_that_pair_alone():
    room = room_of("alice", "bob")
    room.join("carol", verify=Verify.PROMPT, sas={"alice": True, "bob": False})
    room.run()
    asked = [a.peer for a in room["carol"].of(AskSas)]
    assert sorted(asked) == ["alice", "bob"]
    assert room["carol"].roster == ["alice"]
    [failed] = room["carol"].of(MemberFailed)
    assert failed.peer == "bob" and isinstance(failed.error, VerificationRefused)
    [failed] = room["bob"].of(MemberFailed)
    assert failed.peer == "carol" and "did not confirm the SAS" in str(failed.error)
    assert room["alice"].roster == ["bob", "carol"]
    assert [e.status.value for e in room["carol"].group.roster] == ["VERIFIED"]


def test_a_member_asked_the_sas_is_not_a_member_until_it_answers():
    room = room_of("alice")
    room.join("bob", verify=Verify.PROMPT)
    room.run()
    assert room["bob"].of(AskSas) and room["bob"].roster == [] and room["alice"].roster == []
    assert room["bob"].group.next_deadline is None  # people read digits for as long as needed
    room.take("bob", room["bob"].group.sas_answer(PeerId("alice"), True, room.now))
    room.run()
    assert room["alice"].roster == ["bob"] and room["bob"].roster == ["alice"]
    assert [type(a) for a in room["bob"].actions if isinstance(a, MemberJoined | RosterChanged)]


def test_hangup_says_bye_to_every_member_and_the_hub_closing_ends_the_call():
    room = room_of("alice", "bob", "carol")
    room.take("alice", room["alice"].group.hangup("done", room.now))
    assert [s.peer for s in room["alice"].of(Send)[-2:]] == ["bob", "carol"]
    assert room["alice"].actions[-1] == Ended("done")
    assert room["alice"].group.hangup("again", room.now) == []
    room.run()
    for name in ("bob", "carol"):
        [left] = room[name].of(MemberLeft)
        assert left == MemberLeft(PeerId("alice"), "peer-bye")
    [ended] = room["bob"].group.hub_failed("closed (1006)", room.now, closed=True)
    assert isinstance(ended, Ended) and ended.reason == "hub-lost"
    assert isinstance(ended.error, CallFailed) and room["bob"].group.ended
    assert room["carol"].group.hub_failed("bad frame", room.now, closed=False) == []
