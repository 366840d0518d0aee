"""The call session as a sans-I/O machine: two sessions in memory, a hub made of a list.

Every path of a call's protocol (setup, pins, SAS, the offer and answer, rekey, bye, refusals and
timeouts) runs here in milliseconds, with no socket, no event loop and no peer connection: the
pair plays the driver, answering MakeOffer and AnswerOffer with stand-in SDP.
"""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from client.exit_codes import ExitCode
from client.session import (
    SUITES,
    Action,
    AnswerOffer,
    ApplyAnswer,
    AskSas,
    CallFailed,
    CallSession,
    CallWithSelf,
    Ended,
    IdentityMismatch,
    InstallKeys,
    MakeOffer,
    MediaStarted,
    Protected,
    RetireReceiveKeys,
    Send,
    SessionConfig,
    SessionState,
    VerificationRefused,
    Verify,
    WrongPeer,
)
from crypto.handshake import Responder
from crypto.identity import IdentityKey, KnownPeers
from tests.vectors.make_handshake_vectors import seeded_random

OFFER, ANSWER = "v=0 offer", "v=0 answer"
Tamper = Callable[[str, dict[str, Any]], list[dict[str, Any]]]


@dataclass
class Side:
    """One session and everything it asked its driver to do."""

    session: CallSession
    actions: list[Action] = field(default_factory=list)

    def of(self, kind: type) -> list[Any]:
        return [action for action in self.actions if isinstance(action, kind)]

    @property
    def ended(self) -> Ended | None:
        ended = self.of(Ended)
        assert len(ended) <= 1
        return ended[0] if ended else None


class Pair:
    """Two sessions whose Send actions are relayed to each other through ``tamper`` (the hub:
    by default it carries each payload once, as JSON text, unchanged)."""

    def __init__(
        self,
        *,
        alice: dict[str, Any] | None = None,
        bob: dict[str, Any] | None = None,
        tamper: Tamper | None = None,
    ) -> None:
        self.now = 0.0
        self.tamper = tamper or (lambda sender, payload: [payload])
        self.configs = {
            "alice": session_config(**({"name": "alice"} | (alice or {}))),
            "bob": session_config(**({"name": "bob"} | (bob or {}))),
        }
        self.sides = {
            "alice": Side(CallSession(self.configs["alice"], initiator=True, now=self.now)),
            "bob": Side(CallSession(self.configs["bob"], initiator=False, now=self.now)),
        }
        self.in_flight: list[tuple[str, dict[str, Any]]] = []
        self.sas_answers: dict[str, bool] = {}
        self.media_flows = True

    @property
    def alice(self) -> Side:
        return self.sides["alice"]

    @property
    def bob(self) -> Side:
        return self.sides["bob"]

    def start(self) -> None:
        for name in ("alice", "bob"):
            self.take(name, self.sides[name].session.start(self.now))
        self.run()

    def take(self, name: str, actions: list[Action]) -> None:
        """Record ``name``'s actions and play its driver: relay sends, answer SDP requests,
        and (while ``media_flows``) deliver a frame under each new send key to the peer."""
        side = self.sides[name]
        recipient = "bob" if name == "alice" else "alice"
        for action in actions:
            side.actions.append(action)
            sends_under = isinstance(action, InstallKeys) and action.update.switch_send
            if sends_under and self.media_flows:
                peer = self.sides[recipient].session
                self.take(recipient, peer.receive_key_used(sends_under.kid, self.now))
            if isinstance(action, Send):
                wire = json.loads(json.dumps(action.payload))  # through the hub as JSON text
                for payload in self.tamper(name, wire):
                    self.in_flight.append((recipient, payload))
            elif isinstance(action, MakeOffer):
                self.take(name, side.session.offer_ready(OFFER, self.now))
            elif isinstance(action, AnswerOffer):
                assert action.sdp == OFFER
                self.take(name, side.session.answer_ready(ANSWER, self.now))
            elif isinstance(action, AskSas) and name in self.sas_answers:
                self.take(name, side.session.sas_answer(self.sas_answers[name], self.now))

    def run(self) -> None:
        while self.in_flight:
            recipient, payload = self.in_flight.pop(0)
            self.take(recipient, self.sides[recipient].session.receive(payload, self.now))

    def at(self, now: float) -> None:
        """Let time pass to ``now`` and fire the timers that are due."""
        self.now = now
        for name, side in self.sides.items():
            deadline = side.session.next_deadline
            if deadline is not None and deadline <= now:
                self.take(name, side.session.handle_timer(now))
        self.run()


def session_config(name: str, **options: Any) -> SessionConfig:
    defaults: dict[str, Any] = dict(
        name=name,
        identity=IdentityKey.generate(os.urandom),
        known_peers=KnownPeers(),
        verify=Verify.TOFU,
        setup_timeout=10.0,
        grace_seconds=2.0,
    )
    return SessionConfig(**(defaults | options))


def connected() -> Pair:
    pair = Pair()
    pair.start()
    return pair


def test_a_call_is_set_up_keyed_before_any_description_and_both_see_one_sas():
    pair = connected()
    for side, peer in ((pair.alice, "bob"), (pair.bob, "alice")):
        assert side.session.state is SessionState.IN_CALL
        assert side.session.peer_name == peer
        kinds = [type(action) for action in side.actions if not isinstance(action, Send)]
        # Keys first, then the descriptions: nothing can start unkeyed.
        if side is pair.alice:
            assert kinds == [Protected, InstallKeys, MakeOffer, ApplyAnswer, MediaStarted]
        else:
            assert kinds == [Protected, InstallKeys, AnswerOffer, MediaStarted]
        assert side.of(ApplyAnswer) == ([ApplyAnswer(ANSWER)] if side is pair.alice else [])
        protection = side.of(Protected)[0].protection
        assert protection.end_to_end_encrypted and protection.pin == "NEW"
        assert protection.peer_fingerprint is not None
        # No setup timer left in the call: the next deadline is the first rekey.
        assert side.session.next_deadline == (60.0 if side is pair.alice else 90.0)
    assert pair.alice.of(Protected)[0].protection.sas == pair.bob.of(Protected)[0].protection.sas
    # Epoch 0: each installs the other's send key as its receive key.
    alice_keys, bob_keys = pair.alice.of(InstallKeys)[0].update, pair.bob.of(InstallKeys)[0].update
    assert alice_keys.switch_send.kid == bob_keys.install_receive.kid == 0
    assert bob_keys.switch_send.kid == alice_keys.install_receive.kid == 1
    # Both pinned each other under the signed names.
    for name, peer in (("alice", "bob"), ("bob", "alice")):
        pin = pair.configs[name].known_peers.get(peer)
        assert pin is not None and not pin.verified


def test_a_hub_that_makes_both_peers_initiate_learns_both_identities_but_not_a_matching_sas():
    # The hub decides who initiates (the first in the room): it can tell both they were
    # first and answer each as a responder. It then learns each one's name and key from its
    # reveal, at the price of a call that fails verification, and picks its own identity on
    # each leg last. With each side's randomness replayed, that pick changes neither SAS, and
    # the two SAS differ.
    identities = {name: IdentityKey.generate(os.urandom) for name in ("alice", "bob")}
    shown: dict[str, set[str | None]] = {"alice": set(), "bob": set()}
    for k in range(10):
        hub = IdentityKey(hashlib.sha256(f"hub {k}".encode()).digest())
        for name, identity in identities.items():
            config = session_config(name, identity=identity, random_bytes=seeded_random(name))
            session = CallSession(config, initiator=True, now=0.0)
            [commit] = session.start(0.0)
            assert isinstance(commit, Send)
            hub_random = seeded_random(f"hub {name}")
            call_id = commit.payload["call_id"]
            leg = Responder(hub, call_id, SUITES, hub_random, name=f"peer {k}")
            [accept] = leg.receive(commit.payload)
            [reveal] = session.receive(accept, 0.0)
            assert isinstance(reveal, Send)
            [confirm] = leg.receive(reveal.payload)
            protected = [a for a in session.receive(confirm, 0.0) if isinstance(a, Protected)]
            assert (leg.result.peer_name, leg.result.peer_identity) == (name, identity.public_key)
            assert protected[0].protection.peer_name == f"peer {k}"
            shown[name].add(protected[0].protection.sas)
    assert len(shown["alice"]) == len(shown["bob"]) == 1 and None not in shown["alice"]
    assert shown["alice"] != shown["bob"]


def test_only_sealed_messages_follow_the_key_agreement():
    seen: list[str] = []

    def record(sender: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        seen.append(payload["type"])
        return [payload]

    pair = Pair(tamper=record)
    pair.start()
    assert seen[:4] == ["commit", "accept", "reveal", "confirm"]
    # Each side's decision ("confirmed"), the offer and the answer.
    assert set(seen[4:]) == {"sealed"} and len(seen) == 8


@pytest.mark.parametrize("accepted", [True, False])
def test_verify_prompt_asks_for_the_sas_and_each_side_waits_for_the_other_decision(accepted):
    pair = Pair(alice={"setup_timeout": 5000.0}, bob={"verify": Verify.PROMPT})
    pair.start()
    bob = pair.bob.session
    assert bob.state is SessionState.AWAIT_SAS and len(pair.bob.of(AskSas)) == 1
    assert pair.bob.of(InstallKeys) == []  # no key before the user says yes
    # People read digits aloud for as long as they like: no deadline while asking.
    assert bob.next_deadline is None
    pair.at(1000.0)
    assert bob.state is SessionState.AWAIT_SAS
    # Alice accepted bob at once and said so; she waits for his decision, with no timeout
    # either, and makes no offer before it.
    assert pair.alice.session.state is SessionState.AWAIT_PEER
    assert pair.alice.of(MakeOffer) == [] and pair.alice.session.next_deadline is None
    pair.take("bob", bob.sas_answer(accepted, pair.now))
    pair.run()
    pins = pair.configs["bob"].known_peers
    if accepted:
        assert pair.bob.of(AnswerOffer) == [AnswerOffer(OFFER)] and not bob.ended
        pin = pins.get("alice")
        assert pin is not None and pin.verified
    else:
        ended = pair.bob.ended
        assert ended is not None and isinstance(ended.error, VerificationRefused)
        assert pins.get("alice") is None  # a rejected SAS pins nothing
        assert pair.bob.of(InstallKeys) == []
        # Alice hears of it at once, from bob's sealed "declined".
        ended = pair.alice.ended
        assert ended is not None and isinstance(ended.error, VerificationRefused)
        assert "bob did not confirm the SAS" in str(ended.error)


def test_a_verified_peer_is_not_asked_about_again():
    alice_identity = IdentityKey.generate(os.urandom)
    bob_pins = KnownPeers()
    bob_pins.check("alice", alice_identity.public_key)
    bob_pins.mark_verified("alice")
    pair = Pair(
        alice={"identity": alice_identity}, bob={"verify": Verify.PROMPT, "known_peers": bob_pins}
    )
    pair.start()
    assert pair.bob.of(AskSas) == [] and pair.bob.session.state is SessionState.IN_CALL
    assert pair.bob.of(Protected)[0].protection.pin == "VERIFIED"


def test_verify_pinned_refuses_an_unknown_peer_before_any_key():
    pair = Pair(bob={"verify": Verify.PINNED})
    pair.start()
    ended = pair.bob.ended
    assert ended is not None and isinstance(ended.error, VerificationRefused)
    assert "not pinned" in str(ended.error)
    assert pair.bob.session.detections == {"identity-refused": 1}
    assert pair.bob.of(InstallKeys) == [] and pair.bob.of(Protected) == []
    assert len(pair.configs["bob"].known_peers) == 0


def test_a_changed_key_for_a_pinned_name_is_refused_before_any_key():
    pins = KnownPeers()
    pins.check("alice", IdentityKey.generate(os.urandom).public_key)
    pair = Pair(bob={"known_peers": pins})
    pair.start()
    ended = pair.bob.ended
    assert ended is not None and isinstance(ended.error, IdentityMismatch)
    assert pair.bob.session.detections == {"identity-refused": 1}
    assert pair.bob.of(InstallKeys) == []
    # Alice, whose confirm never comes, is still waiting: her setup timer ends it.
    assert pair.alice.session.state is SessionState.KEY_AGREEMENT
    pair.at(10.0)
    ended = pair.alice.ended
    assert ended is not None and isinstance(ended.error, CallFailed)
    assert "not set up in time" in str(ended.error)
    # Neither side pinned anything new: bob kept the key he had for alice.
    assert list(pins) == [pins.get("alice")] and len(pair.configs["alice"].known_peers) == 0


def test_hanging_up_during_setup_pins_nothing():
    pair = Pair(bob={"verify": Verify.PROMPT})
    pair.start()
    assert pair.configs["bob"].known_peers.get("alice") is not None  # pinned by the handshake
    pair.take("bob", pair.bob.session.hangup("ctrl-c", pair.now))
    ended = pair.bob.ended
    assert ended is not None and isinstance(ended.error, CallFailed)
    assert "before the call was set up" in str(ended.error)
    assert pair.configs["bob"].known_peers.get("alice") is None
    assert pair.bob.of(Send)[-1].payload["type"] == "confirm"  # no bye during setup


def test_a_hub_that_alters_the_initiators_identity_gets_nothing_pinned():
    # The name and key travel encrypted: a hub that changes them (in version 1 it could
    # rename the initiator in its commit) makes the identity fail to open.
    def alter(sender: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        if payload["type"] != "reveal":
            return [payload]
        auth = payload["auth"]
        return [{**payload, "auth": ("B" if auth[0] == "A" else "A") + auth[1:]}]

    pair = Pair(tamper=alter)
    pair.start()
    ended = pair.bob.ended
    assert ended is not None and isinstance(ended.error, CallFailed)
    assert "does not open" in str(ended.error)
    assert len(pair.configs["bob"].known_peers) == 0


def test_an_altered_sealed_offer_is_detected_and_fails_the_call():
    def alter(sender: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        if payload["type"] != "sealed":
            return [payload]
        ciphertext = payload["ciphertext"]
        flipped = ("B" if ciphertext[0] == "A" else "A") + ciphertext[1:]
        return [{**payload, "ciphertext": flipped}]

    pair = Pair(tamper=alter)
    pair.start()
    ended = pair.bob.ended
    assert ended is not None and isinstance(ended.error, CallFailed)
    assert "sealed setup message was rejected" in str(ended.error)
    assert pair.bob.session.detections == {"sdp-tampered": 1}
    assert pair.bob.of(AnswerOffer) == []


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ([1, 2], "not an object"),
        ({"type": "offer", "sdp": "v=0"}, "expected 'commit' from the peer, got 'offer'"),
        ({"type": "commit"}, "commit carries no call id"),
        ({"type": "commit", "call_id": "x", "v": 2}, "key agreement failed"),
    ],
)
def test_garbage_in_the_key_agreement_fails_the_call_with_a_reason(payload, reason):
    bob = CallSession(session_config("bob"), initiator=False, now=0.0)
    actions = bob.receive(payload, 0.0)
    assert len(actions) == 1 and isinstance(actions[0], Ended)
    assert isinstance(actions[0].error, CallFailed) and reason in str(actions[0].error)
    assert bob.state is SessionState.ENDED
    assert bob.receive(payload, 0.0) == []  # an ended session does nothing more


def test_the_setup_timer_runs_from_the_start_and_again_after_the_sas():
    pair = Pair(alice={"setup_timeout": 500.0}, bob={"verify": Verify.PROMPT, "setup_timeout": 5.0})
    assert pair.bob.session.next_deadline == 5.0
    pair.start()
    pair.at(100.0)  # the SAS took 100 s: no timer ran meanwhile
    pair.take("bob", pair.bob.session.sas_answer(True, pair.now))
    pair.run()
    assert pair.bob.session.state is SessionState.IN_CALL
    assert pair.bob.ended is None


def test_the_peer_leaving_during_setup_or_in_the_call():
    pair = Pair(bob={"verify": Verify.PROMPT})
    pair.start()
    actions = pair.bob.session.peer_left(pair.now)
    assert isinstance(actions[0], Ended) and "left during setup" in str(actions[0].error)
    pair = connected()
    assert pair.bob.session.peer_left(pair.now) == [Ended("peer-left")]


def test_a_bye_ends_both_sides():
    pair = connected()
    pair.take("alice", pair.alice.session.hangup("duration", pair.now))
    assert pair.alice.ended == Ended("duration")
    assert pair.alice.of(Send)[-1].payload["type"] == "sealed"
    pair.run()
    assert pair.bob.ended == Ended("peer-bye")
    assert pair.alice.session.hangup("again", pair.now) == []


def test_a_rekey_installs_new_keys_on_both_sides_and_retires_the_old_after_the_grace():
    pair = connected()
    pair.at(5.0)
    pair.take("alice", pair.alice.session.rekey(pair.now))
    pair.run()
    for side, own, peer in ((pair.alice, 2, 3), (pair.bob, 3, 2)):
        updates = [action.update for action in side.of(InstallKeys)]
        sends = [u.switch_send.kid for u in updates if u.switch_send is not None]
        receives = [u.install_receive.kid for u in updates if u.install_receive is not None]
        # Epoch 0 was KIDs 0 (alice) and 1 (bob); epoch 1 is 2 and 3.
        assert sends == [own - 2, own] and receives == [peer - 2, peer]
        assert side.session.rekeys == 1
        assert side.of(RetireReceiveKeys) == []
        assert side.session.next_deadline == 7.0
    pair.at(7.0)
    assert pair.alice.of(RetireReceiveKeys) == [RetireReceiveKeys(frozenset({1}))]
    assert pair.bob.of(RetireReceiveKeys) == [RetireReceiveKeys(frozenset({0}))]
    # The next rekey is an interval after this one, bob's turn; alice started this one.
    assert pair.alice.session.next_deadline == 95.0
    assert pair.bob.session.next_deadline == 65.0


def test_a_second_rekey_while_one_is_under_way_is_not_started():
    pair = connected()
    first = pair.alice.session.rekey(pair.now)
    assert len(first) == 1
    assert pair.alice.session.rekey(pair.now) == []


def test_replayed_and_forged_messages_in_the_call_are_counted_and_change_nothing():
    sent: list[dict[str, Any]] = []

    def keep(sender: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        if sender == "alice" and payload["type"] == "sealed":
            sent.append(payload)
        return [payload]

    pair = Pair(tamper=keep)
    pair.start()
    offer = sent[1]  # after her decision
    bob = pair.bob.session
    assert bob.receive(offer, pair.now) == []
    forged = {**offer, "seq": 7}
    assert bob.receive(forged, pair.now) == []
    assert bob.detections == {"replay-rejected": 1, "alteration-rejected": 1}
    assert bob.state is SessionState.IN_CALL
    # The channel is as it was: a real message still opens.
    pair.take("alice", pair.alice.session.hangup("done", pair.now))
    pair.run()
    assert pair.bob.ended == Ended("peer-bye")


def test_the_hub_failing_ends_setup_but_not_the_call():
    pair = Pair(bob={"verify": Verify.PROMPT})
    pair.start()
    actions = pair.bob.session.hub_failed("closed (1006)", pair.now, closed=True)
    assert isinstance(actions[0], Ended) and "hub failed during setup" in str(actions[0].error)
    pair = connected()
    assert pair.bob.session.hub_failed("closed (1006)", pair.now, closed=True) == []
    assert pair.bob.session.state is SessionState.IN_CALL


def test_descriptions_are_only_taken_when_asked_for():
    pair = connected()
    assert pair.alice.session.offer_ready(OFFER, pair.now) == []
    assert pair.bob.session.answer_ready(ANSWER, pair.now) == []
    fresh = CallSession(session_config("carol"), initiator=False, now=0.0)
    assert fresh.answer_ready(ANSWER, 0.0) == [] and fresh.rekey(0.0) == []


def test_rekeys_come_every_interval_the_two_sides_taking_turns():
    pair = Pair(alice={"rekey_interval": 10.0}, bob={"rekey_interval": 10.0})
    pair.start()
    # The initiator starts the first; the responder waits half as long again.
    assert (pair.alice.session.next_deadline, pair.bob.session.next_deadline) == (10.0, 15.0)
    pair.at(10.0)
    assert pair.alice.session.rekeys == pair.bob.session.rekeys == 1
    pair.at(12.0)  # each retires the other's old key
    # Now bob's turn: alice, who started the last one, waits longer.
    assert (pair.alice.session.next_deadline, pair.bob.session.next_deadline) == (25.0, 20.0)
    pair.at(20.0)
    assert pair.alice.session.rekeys == pair.bob.session.rekeys == 2
    assert (pair.alice.session.next_deadline, pair.bob.session.next_deadline) == (22.0, 22.0)
    pair.at(22.0)
    assert (pair.alice.session.next_deadline, pair.bob.session.next_deadline) == (30.0, 35.0)
    for side, role in ((pair.alice, 0), (pair.bob, 1)):
        sends = [a.update.switch_send.kid for a in side.of(InstallKeys) if a.update.switch_send]
        assert sends == [role, 2 + role, 4 + role]


@pytest.mark.parametrize("withheld", ["rekey", "ack"])
def test_a_rekey_the_hub_withholds_ends_the_call_at_its_deadline(withheld):
    holding = {"on": False}
    held: list[dict[str, Any]] = []

    def withhold(sender: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        from_requester = sender == "alice"
        if holding["on"] and from_requester == (withheld == "rekey"):
            held.append(payload)
            return []
        return [payload]

    pair = Pair(tamper=withhold)
    pair.start()
    holding["on"] = True
    pair.at(5.0)
    pair.take("alice", pair.alice.session.rekey(pair.now))
    pair.run()
    assert len(held) == 1 and pair.alice.session.next_deadline == 15.0
    pair.at(15.0)
    for side in (pair.alice, pair.bob) if withheld == "ack" else (pair.alice,):
        ended = side.ended
        assert ended is not None and ended.reason == "rekey-stalled"
        assert isinstance(ended.error, CallFailed) and "did not complete within 10 s" in str(
            ended.error
        )


def test_a_sealed_message_the_hub_drops_in_the_call_ends_it_at_the_next_one():
    dropping = {"next": False}

    def drop_one(sender: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        if dropping["next"]:
            dropping["next"] = False
            return []
        return [payload]

    pair = Pair(tamper=drop_one)
    pair.start()
    dropping["next"] = True
    pair.take("alice", pair.alice.session.rekey(pair.now))  # dropped
    pair.take("alice", pair.alice.session.hangup("duration", pair.now))
    pair.run()
    ended = pair.bob.ended
    assert ended is not None and ended.reason == "signalling-lost"
    assert pair.bob.session.detections == {"signalling-lost": 1}


@pytest.mark.parametrize("content", [{"type": "offer", "sdp": "v=0"}, {"type": "bye"}, [1]])
def test_anything_but_a_decision_after_the_key_agreement_fails_the_call(content):
    pair = Pair(bob={"verify": Verify.PROMPT})
    pair.start()
    # Alice's channel seals what the hub could not: an authentic message out of turn.
    assert pair.alice.session._channel is not None
    forged = pair.alice.session._channel.seal(
        {"content": content} if isinstance(content, list) else content
    )
    actions = pair.bob.session.receive(forged, pair.now)
    ended = actions[-1]
    assert isinstance(ended, Ended) and isinstance(ended.error, CallFailed)
    assert "expected the peer's decision" in str(ended.error)


# -- whom you are talking to: names, status, --peer, yourself


def pinned(name: str, identity: IdentityKey, *, verified: bool = False) -> KnownPeers:
    pins = KnownPeers()
    pins.check(name, identity.public_key)
    if verified:
        pins.mark_verified(name)
    return pins


@pytest.mark.parametrize(
    ("before", "verify", "status"),
    [
        (None, Verify.TOFU, "NEW"),
        ("pinned", Verify.TOFU, "PINNED"),
        ("verified", Verify.TOFU, "VERIFIED"),
        (None, Verify.PROMPT, "VERIFIED"),  # the SAS compared in this call
        ("pinned", Verify.PROMPT, "VERIFIED"),
        ("verified", Verify.PROMPT, "VERIFIED"),  # not asked, and still shown
        ("pinned", Verify.PINNED, "PINNED"),
    ],
)
def test_every_call_shows_the_signed_name_fingerprint_and_one_status_word(before, verify, status):
    alice = IdentityKey.generate(os.urandom)
    pins = KnownPeers() if before is None else pinned("alice", alice, verified=before == "verified")
    pair = Pair(alice={"identity": alice}, bob={"verify": verify, "known_peers": pins})
    pair.sas_answers["bob"] = True
    pair.start()
    assert pair.bob.session.state is SessionState.IN_CALL
    [protected] = pair.bob.of(Protected)
    assert protected.protection.pin == status
    # Shown before anything is keyed or negotiated, whatever the mode.
    assert pair.bob.actions.index(protected) < pair.bob.actions.index(pair.bob.of(InstallKeys)[0])
    shown = protected.protection.describe()
    assert f"{status} alice {alice.public_key.fingerprint()}" in shown


@pytest.mark.parametrize("look_alike", ["b\u043eb", "Bob"])
def test_a_look_alike_of_a_pinned_name_is_refused_as_a_changed_key_with_both_fingerprints(
    look_alike,
):
    # The hub answers with its own key, under "bob" spelt with a Cyrillic o, or capitalised.
    real_bob, hub = IdentityKey.generate(os.urandom), IdentityKey.generate(os.urandom)
    pins = pinned("bob", real_bob)
    pair = Pair(alice={"name": look_alike, "identity": hub}, bob={"known_peers": pins})
    pair.start()
    ended = pair.bob.ended
    assert ended is not None and isinstance(ended.error, IdentityMismatch)
    message = str(ended.error)
    assert "looks like the pinned 'bob'" in message
    assert real_bob.public_key.fingerprint() in message and hub.public_key.fingerprint() in message
    assert ended.error.exit_code == ExitCode.IDENTITY_MISMATCH
    assert pair.bob.of(InstallKeys) == [] and pair.bob.of(Protected) == []
    assert list(pins) == [pins.get("bob")]  # nothing pinned under the look-alike
    assert pair.bob.session.detections == {"identity-refused": 1}


@pytest.mark.parametrize(
    ("signed", "refusal"),
    [
        ("bob ", "is not normalised (it would be 'bob')"),
        ("bob\u2800", "not U+2800 BRAILLE PATTERN BLANK"),  # drawn as a blank
        ("Bob \u0301", "U+0301 COMBINING ACUTE ACCENT has no letter or digit"),
    ],
)
def test_a_name_not_in_normal_form_is_refused_on_receipt(monkeypatch, signed, refusal):
    # A peer that signs such a name (as only a modified client would: ours refuses to sign it).
    monkeypatch.setattr("crypto.handshake.name_field", lambda name: name)
    pins = pinned("bob", IdentityKey.generate(os.urandom))
    pair = Pair(alice={"name": signed}, bob={"known_peers": pins})
    pair.start()
    ended = pair.bob.ended
    assert ended is not None and isinstance(ended.error, CallFailed)
    assert refusal in str(ended.error)
    assert pair.bob.of(InstallKeys) == [] and list(pins) == [pins.get("bob")]


def test_a_genuinely_new_name_is_pinned_beside_a_pinned_one():
    pins = pinned("bob", IdentityKey.generate(os.urandom))
    pair = Pair(alice={"name": "carol"}, bob={"known_peers": pins})
    pair.start()
    assert pair.bob.session.state is SessionState.IN_CALL
    assert pair.bob.of(Protected)[0].protection.pin == "NEW"
    assert [pin.name for pin in pins] == ["bob", "carol"]


def test_peer_name_given_and_signed_the_call_goes_on():
    alice = IdentityKey.generate(os.urandom)
    pair = Pair(
        alice={"identity": alice}, bob={"peer": "alice", "known_peers": pinned("alice", alice)}
    )
    pair.start()
    assert pair.bob.session.state is SessionState.IN_CALL
    assert pair.bob.of(Protected)[0].protection.pin == "PINNED"


def test_a_peer_signing_another_name_than_peer_is_refused_before_any_key():
    pair = Pair(bob={"peer": "carol"})
    pair.start()
    ended = pair.bob.ended
    assert ended is not None and isinstance(ended.error, WrongPeer)
    assert ended.error.exit_code == ExitCode.WRONG_PEER and int(ExitCode.WRONG_PEER) == 11
    assert "not 'carol' as asked with --peer" in str(ended.error)
    assert pair.bob.of(InstallKeys) == [] and pair.bob.of(Protected) == []
    assert len(pair.configs["bob"].known_peers) == 0
    # The initiator checks too, when the responder's confirm comes.
    pair = Pair(alice={"peer": "carol"})
    pair.start()
    ended = pair.alice.ended
    assert ended is not None and isinstance(ended.error, WrongPeer)
    assert pair.alice.of(InstallKeys) == [] and len(pair.configs["alice"].known_peers) == 0


def test_peer_with_a_pin_whose_key_differs_is_refused_before_any_key():
    pins = pinned("alice", IdentityKey.generate(os.urandom))
    pair = Pair(bob={"peer": "alice", "known_peers": pins})
    pair.start()
    ended = pair.bob.ended
    assert ended is not None and isinstance(ended.error, IdentityMismatch)
    assert pair.bob.of(InstallKeys) == []


def test_a_call_with_ourselves_is_refused():
    # The hub spliced two of our own calls: both ends hold one identity.
    me = IdentityKey.generate(os.urandom)
    pair = Pair(alice={"identity": me}, bob={"identity": me})
    pair.start()
    ended = pair.bob.ended
    assert ended is not None and isinstance(ended.error, CallWithSelf)
    assert ended.error.exit_code == ExitCode.WRONG_PEER
    assert me.public_key.fingerprint() in str(ended.error)
    assert pair.bob.of(InstallKeys) == [] and len(pair.configs["bob"].known_peers) == 0


def test_an_old_receive_key_stays_until_the_peer_has_switched_however_late_the_hub_lets_it():
    holding = {"on": False}
    held: list[dict[str, Any]] = []

    def withhold_acks(sender: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        if holding["on"] and sender == "bob":
            held.append(payload)
            return []
        return [payload]

    pair = Pair(tamper=withhold_acks)
    pair.start()
    holding["on"] = True
    pair.at(5.0)
    pair.take("alice", pair.alice.session.rekey(pair.now))
    pair.run()
    # Bob holds alice's new key; alice, without the ack, still sends under her old one, KID 0,
    # for longer than the grace window: bob must keep it.
    pair.at(9.0)
    assert pair.bob.of(RetireReceiveKeys) == []
    holding["on"] = False
    pair.in_flight += [("alice", payload) for payload in held]
    pair.run()  # the ack at last: alice switches, and her first new frame reaches bob
    pair.at(11.0)
    assert pair.bob.of(RetireReceiveKeys) == [RetireReceiveKeys(frozenset({0}))]
    assert pair.alice.of(RetireReceiveKeys) == [RetireReceiveKeys(frozenset({1}))]


def test_receive_keys_the_peer_never_used_are_bounded():
    pair = connected()
    pair.media_flows = False  # the peer sends no frame at all
    for second in (5.0, 6.0, 7.0):
        pair.at(second)
        pair.take("alice", pair.alice.session.rekey(pair.now))
        pair.run()
    # Epochs 0 to 3: bob's KIDs 1, 3, 5, 7; alice keeps the newest two.
    assert pair.alice.of(RetireReceiveKeys) == [
        RetireReceiveKeys(frozenset({1})),
        RetireReceiveKeys(frozenset({3})),
    ]


def test_with_the_hub_gone_the_call_stays_in_its_epoch_instead_of_ending_at_a_rekey_deadline():
    pair = Pair(alice={"rekey_interval": 10.0}, bob={"rekey_interval": 10.0})
    pair.start()
    pair.at(10.0)
    assert pair.alice.session.rekeys == 1
    # The hub goes away just as alice's next rekey is under way: it can never complete.
    pair.tamper = lambda sender, payload: []
    pair.at(25.0)
    assert pair.alice.session.next_deadline == 35.0  # the rekey's deadline
    for side in (pair.alice, pair.bob):
        assert side.session.hub_failed("closed (1006)", pair.now, closed=True) == []
        assert side.session.next_deadline is None or side.session.next_deadline < 25.0
    pair.at(1000.0)
    for side in (pair.alice, pair.bob):
        assert side.ended is None and side.session.state is SessionState.IN_CALL
        assert side.session.rekey(pair.now) == []
    # A bad message from a hub still there changes nothing about the rekeys.
    pair = Pair(alice={"rekey_interval": 10.0})
    pair.start()
    assert pair.alice.session.hub_failed("bad frame", pair.now, closed=False) == []
    assert pair.alice.session.next_deadline == 10.0
