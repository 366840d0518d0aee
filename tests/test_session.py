"""The call session as a sans-I/O machine: two sessions in memory, a hub made of a list.

Every path of a call's protocol (setup, pins, SAS, the offer and answer, rekey, bye, refusals and
timeouts) runs here in milliseconds, with no socket, no event loop and no peer connection: the
pair plays the driver, answering MakeOffer and AnswerOffer with stand-in SDP.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from client.session import (
    Action,
    AnswerOffer,
    ApplyAnswer,
    AskSas,
    CallFailed,
    CallSession,
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
)
from crypto.identity import IdentityKey, KnownPeers

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
            "alice": session_config("alice", **(alice or {})),
            "bob": session_config("bob", **(bob or {})),
        }
        self.sides = {
            "alice": Side(CallSession(self.configs["alice"], initiator=True, now=self.now)),
            "bob": Side(CallSession(self.configs["bob"], initiator=False, now=self.now)),
        }
        self.in_flight: list[tuple[str, dict[str, Any]]] = []
        self.sas_answers: dict[str, bool] = {}

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
        """Record ``name``'s actions and play its driver: relay sends, answer SDP requests."""
        side = self.sides[name]
        for action in actions:
            side.actions.append(action)
            if isinstance(action, Send):
                recipient = "bob" if name == "alice" else "alice"
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
        assert protection.end_to_end_encrypted and protection.pin == "pinned"
        assert protection.peer_fingerprint is not None
        assert side.session.next_deadline is None  # no setup timer left in the call
    assert pair.alice.of(Protected)[0].protection.sas == pair.bob.of(Protected)[0].protection.sas
    # Epoch 0: each installs the other's send key as its receive key.
    alice_keys, bob_keys = pair.alice.of(InstallKeys)[0].update, pair.bob.of(InstallKeys)[0].update
    assert alice_keys.switch_send.kid == bob_keys.install_receive.kid == 0
    assert bob_keys.switch_send.kid == alice_keys.install_receive.kid == 1
    # Both pinned each other under the signed names.
    for name, peer in (("alice", "bob"), ("bob", "alice")):
        pin = pair.configs[name].known_peers.get(peer)
        assert pin is not None and not pin.verified


def test_only_sealed_messages_follow_the_key_agreement():
    seen: list[str] = []

    def record(sender: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        seen.append(payload["type"])
        return [payload]

    pair = Pair(tamper=record)
    pair.start()
    assert seen[:4] == ["commit", "accept", "reveal", "confirm"]
    assert set(seen[4:]) == {"sealed"} and len(seen) == 6  # the offer and the answer


@pytest.mark.parametrize("accepted", [True, False])
def test_verify_prompt_asks_for_the_sas_with_no_timeout_and_holds_the_offer(accepted):
    pair = Pair(alice={"setup_timeout": 5000.0}, bob={"verify": Verify.PROMPT})
    pair.start()
    bob = pair.bob.session
    assert bob.state is SessionState.AWAIT_SAS and len(pair.bob.of(AskSas)) == 1
    assert pair.bob.of(InstallKeys) == []  # no key before the user says yes
    # People read digits aloud for as long as they like: no deadline while asking.
    assert bob.next_deadline is None
    pair.at(1000.0)
    assert bob.state is SessionState.AWAIT_SAS
    # Alice, keyed already, sent her offer: bob holds it until he answers.
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
    assert pair.bob.of(Protected)[0].protection.pin == "verified"


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
    assert pair.alice.session.next_deadline is None


def test_a_second_rekey_while_one_is_under_way_is_not_started():
    pair = connected()
    first = pair.alice.session.rekey(pair.now)
    assert len(first) == 1
    assert pair.alice.session.rekey(pair.now) == []


def test_replayed_and_forged_messages_in_the_call_are_counted_and_change_nothing():
    sent: list[dict[str, Any]] = []

    def keep(sender: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        sent.append(payload)
        return [payload]

    pair = Pair(tamper=keep)
    pair.start()
    offer = sent[4]
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
    actions = pair.bob.session.hub_failed("closed (1006)", pair.now)
    assert isinstance(actions[0], Ended) and "hub failed during setup" in str(actions[0].error)
    pair = connected()
    assert pair.bob.session.hub_failed("closed (1006)", pair.now) == []
    assert pair.bob.session.state is SessionState.IN_CALL


def test_descriptions_are_only_taken_when_asked_for():
    pair = connected()
    assert pair.alice.session.offer_ready(OFFER, pair.now) == []
    assert pair.bob.session.answer_ready(ANSWER, pair.now) == []
    fresh = CallSession(session_config("carol"), initiator=False, now=0.0)
    assert fresh.answer_ready(ANSWER, 0.0) == [] and fresh.rekey(0.0) == []
