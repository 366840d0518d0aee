from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.errors import LocalError, RemoteError
from crypto.frame_crypto import (
    KeyUpdate,
    MediaKey,
    SFrameReceiver,
    SFrameSender,
    apply_key_update,
)
from crypto.identity import BadSignature, IdentityKey, b64decode, b64encode
from crypto.messages import (
    App,
    MalformedCallMessage,
    Rekey,
    RekeyAck,
    RekeyDone,
    SenderKeyAck,
    SenderKeyMessage,
    UnexpectedCallMessage,
    decode_message,
    encode_message,
)
from crypto.sealed import (
    INNER_HANDLERS,
    MAX_SEALED_CONTENT_SIZE,
    REKEY_TRANSITIONS,
    DecryptionFailed,
    Received,
    RekeyState,
    Role,
    SealedChannel,
    SealedGap,
    SealedReorder,
    SealedReplay,
    derive_epoch_keys,
    hkdf_expand,
    rekey_signed_content,
    x25519_shared_secret,
)
from crypto.sender_keys import SenderKey
from crypto.sframe import CipherSuite
from tests.vectors.make_handshake_vectors import identity_seed, seeded_random

SECRET = bytes(range(32))
TRANSCRIPT = bytes(range(100, 132))  # the key agreement's transcript hash T
ALICE = IdentityKey(identity_seed("alice"))
BOB = IdentityKey(identity_seed("bob"))
MALLORY = IdentityKey(identity_seed("mallory"))


def channel(
    role: Role,
    identity: IdentityKey,
    peer: IdentityKey,
    random_label: str,
    call_id: str = "call-1",
    secret: bytes = SECRET,
) -> SealedChannel:
    return SealedChannel(
        role,
        call_id,
        secret,
        seeded_random(random_label),
        identity=identity,
        peer_identity=peer.public_key,
        transcript_hash=TRANSCRIPT,
    )


def channels(call_id: str = "call-1", secret: bytes = SECRET) -> tuple[SealedChannel, ...]:
    alice = channel(Role.INITIATOR, ALICE, BOB, call_id + "/a", call_id, secret)
    bob = channel(Role.RESPONDER, BOB, ALICE, call_id + "/b", call_id, secret)
    return alice, bob


def relay(message: dict[str, Any]) -> dict[str, Any]:
    return decode_message(encode_message(message))


def rekey(requester: SealedChannel, accepter: SealedChannel) -> tuple[Received, ...]:
    """Run one rekey; return each side's Received in order."""
    start = relay(requester.start_rekey())
    on_rekey = accepter.open(start)
    [ack] = on_rekey.replies
    on_ack = requester.open(relay(ack))
    [done] = on_ack.replies
    on_done = accepter.open(relay(done))
    return on_rekey, on_ack, on_done


def test_round_trip_both_directions():
    alice, bob = channels()
    for index in range(5):
        content = {"type": "candidate", "index": index, "text": "héllo"}
        assert bob.open(relay(alice.seal(content))).content == content
        assert alice.open(relay(bob.seal(content))) == Received(content=content)


def test_the_hub_sees_no_plaintext():
    alice, _ = channels()
    message = alice.seal({"sdp": "a=fingerprint:sha-256 AB:CD"})
    assert "fingerprint" not in encode_message(message).decode()
    assert set(message) == {"v", "type", "epoch", "seq", "ciphertext"}


def test_replay_is_detected():
    alice, bob = channels()
    first = alice.seal({"n": 0})
    bob.open(first)
    with pytest.raises(SealedReplay):
        bob.open(first)
    assert bob.open(alice.seal({"n": 1})).content == {"n": 1}  # nothing else broke


def test_drop_is_detected_as_a_gap():
    alice, bob = channels()
    alice.seal({"n": 0})  # the hub drops it
    with pytest.raises(SealedGap, match="0 is missing"):
        bob.open(alice.seal({"n": 1}))


def test_reorder_is_detected():
    alice, bob = channels()
    first, second = alice.seal({"n": 0}), alice.seal({"n": 1})
    with pytest.raises(SealedGap):
        bob.open(second)
    with pytest.raises(SealedReorder, match="after message 1"):
        bob.open(first)


def test_only_an_authentic_early_message_is_remembered_after_an_error():
    alice, bob = channels()
    first = alice.seal({"n": 0})
    with pytest.raises(DecryptionFailed):
        bob.open(dict(first, seq=5))  # forged: not remembered
    assert bob.open(first).content == {"n": 0}
    second, third = alice.seal({"n": 1}), alice.seal({"n": 2})
    with pytest.raises(SealedGap):
        bob.open(third)  # authentic: remembered, as the SealedChannel docstring says
    with pytest.raises(SealedReorder):
        bob.open(second)


@pytest.mark.parametrize("field", ["epoch", "seq", "ciphertext"])
def test_tampering_any_field_fails_authentication(field):
    alice, bob = channels()
    genuine = alice.seal({"n": 0})
    message = dict(genuine)
    if field == "ciphertext":
        data = bytearray(b64decode(message["ciphertext"]))
        data[3] ^= 0x80
        message["ciphertext"] = b64encode(bytes(data))
    else:
        message[field] += 1
    with pytest.raises(DecryptionFailed):
        bob.open(message)
    assert bob.open(genuine).content == {"n": 0}  # the forgery changed nothing


def test_a_forged_message_does_not_advance_the_channel():
    alice, bob = channels()
    genuine = alice.seal({"n": 0})
    forged = dict(genuine, ciphertext=b64encode(bytes(40)))
    with pytest.raises(DecryptionFailed):
        bob.open(forged)
    assert bob.open(genuine).content == {"n": 0}


def test_messages_are_bound_to_their_direction_and_call():
    alice, bob = channels()
    with pytest.raises(DecryptionFailed):
        alice.open(alice.seal({"reflected": True}))
    other_alice, _ = channels(call_id="call-2")
    with pytest.raises(DecryptionFailed):
        bob.open(other_alice.seal({"from": "another call"}))


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"v": 2, "type": "commit"}, UnexpectedCallMessage),
        ({"v": 1, "type": "sealed"}, MalformedCallMessage),
        ({"v": 2, "type": "sealed", "epoch": 0, "seq": 0}, MalformedCallMessage),
        ({"v": 2, "type": "sealed", "epoch": -1, "seq": 0, "ciphertext": ""}, MalformedCallMessage),
        (
            {"v": 2, "type": "sealed", "epoch": 0, "seq": True, "ciphertext": ""},
            MalformedCallMessage,
        ),
        (
            {"v": 2, "type": "sealed", "epoch": 0, "seq": 0, "ciphertext": "A="},
            MalformedCallMessage,
        ),
        ({"v": 2, "type": "sealed", "epoch": 7, "seq": 0, "ciphertext": ""}, DecryptionFailed),
        ({"v": 2, "type": "sealed", "epoch": 0, "seq": 0, "ciphertext": ""}, DecryptionFailed),
        ([], MalformedCallMessage),
    ],
)
def test_malformed_sealed_messages(message, error):
    _, bob = channels()
    with pytest.raises(error):
        bob.open(message)


def test_seal_rejects_what_is_not_a_small_json_object():
    alice, _ = channels()
    with pytest.raises(LocalError):
        alice.seal(["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(LocalError):
        alice.seal({"bytes": b"\x00"})
    with pytest.raises(LocalError):
        alice.seal({"sdp": "x" * MAX_SEALED_CONTENT_SIZE})


def test_rekey_gives_both_sides_matching_new_keys_in_a_safe_order():
    alice, bob = channels()
    epoch0 = alice.keys
    on_rekey, on_ack, on_done = rekey(alice, bob)
    # Bob installs Alice's new receive key first; only after that does Alice switch her
    # frames; Bob switches his only after Alice's rekey-done shows she holds his key.
    assert on_rekey.keys.install_receive is not None and on_rekey.keys.switch_send is None
    assert on_ack.keys.switch_send == on_rekey.keys.install_receive
    assert on_done.keys == KeyUpdate(switch_send=on_ack.keys.install_receive)
    assert on_done.replies == [] and on_done.content is None
    assert alice.keys.send == bob.keys.receive and alice.keys.receive == bob.keys.send
    assert (alice.keys.send.kid, alice.keys.receive.kid) == (2, 3)
    assert alice.epoch == bob.epoch == 1
    # (That epoch 1's base keys differ from epoch 0's: tests/vectors/handshake.json.)
    assert alice.keys.send != epoch0.send
    assert not alice.rekey_in_progress and not bob.rekey_in_progress
    for sender, receiver in ((alice, bob), (bob, alice)):
        assert receiver.open(relay(sender.seal({"after": "rekey"}))).content == {"after": "rekey"}


def test_repeated_rekeys_by_either_side():
    alice, bob = channels()
    for round_number in range(4):
        requester, accepter = (alice, bob) if round_number % 2 == 0 else (bob, alice)
        rekey(requester, accepter)
    assert alice.epoch == bob.epoch == 4
    assert alice.keys.send.kid == 8 and bob.keys.send.kid == 9
    assert alice.keys.send == bob.keys.receive


def test_signalling_continues_while_a_rekey_is_in_flight():
    alice, bob = channels()
    start = alice.start_rekey()
    candidate_before_ack = alice.seal({"candidate": 1})  # still under epoch 0
    [ack] = bob.open(start).replies
    bob_message = bob.seal({"answer": "sdp"})  # under epoch 1: Alice reads it after the ack
    assert bob.open(candidate_before_ack).content == {"candidate": 1}
    [done] = alice.open(ack).replies
    assert alice.open(bob_message).content == {"answer": "sdp"}
    bob.open(done)
    assert bob.open(alice.seal({"candidate": 2})).content == {"candidate": 2}


def test_simultaneous_rekeys_resolve_to_the_initiators():
    alice, bob = channels()
    alice_start, bob_start = alice.start_rekey(), bob.start_rekey()
    assert alice.open(bob_start) == Received()  # the initiator ignores the responder's
    [ack] = bob.open(alice_start).replies  # the responder yields and answers
    [done] = alice.open(ack).replies
    bob.open(done)
    assert alice.keys.send == bob.keys.receive and alice.epoch == bob.epoch == 1


def test_a_second_rekey_while_one_is_pending_is_a_local_error():
    alice, _ = channels()
    alice.start_rekey()
    with pytest.raises(LocalError, match="in progress"):
        alice.start_rekey()


def test_old_epoch_messages_are_refused_after_the_rekey():
    alice, bob = channels()
    old = alice.seal({"n": 0})
    bob.open(old)
    rekey(alice, bob)
    with pytest.raises(SealedReplay, match="erased"):
        bob.open(old)


def test_a_passive_thief_of_epoch_keys_is_locked_out_by_a_rekey():
    # The thief holds everything Bob held in epoch 0 and sees every message Bob sees.
    alice, bob = channels()
    thief = channel(Role.RESPONDER, MALLORY, ALICE, "thief")
    before = alice.seal({"secret": "before"})
    assert bob.open(before).content == thief.open(before).content == {"secret": "before"}
    start = alice.start_rekey()
    thief.open(start)  # the thief can only answer with its own ephemeral, never sent
    [ack] = bob.open(start).replies
    [done] = alice.open(ack).replies
    bob.open(done)
    after = alice.seal({"secret": "after"})
    assert bob.open(after).content == {"secret": "after"}
    for message in (done, after):
        with pytest.raises(DecryptionFailed):
            thief.open(message)


def _inner_of(message: dict[str, Any], sender: Role, secret: bytes = SECRET) -> dict[str, Any]:
    """The plaintext of an epoch-0 sealed message, opened as a holder of the secret can."""
    key = derive_epoch_keys(secret, 0, sender).seal_send
    sequence = message["seq"]
    call_id = b"call-1"
    associated = (
        b"blindhub-v2 sealed"
        + len(call_id).to_bytes(4, "big")
        + call_id
        + sender.wire_byte
        + bytes(4)
        + sequence.to_bytes(8, "big")
    )
    nonce = bytes(4) + sequence.to_bytes(8, "big")
    return decode_message(AESGCM(key).decrypt(nonce, b64decode(message["ciphertext"]), associated))


def _sealed_at(sender: SealedChannel, sequence: int, inner: dict[str, Any]) -> dict[str, Any]:
    # The thief can seal under any sequence number: it holds the sealing key.
    sender._send_sequence = sequence
    return sender._seal_inner(inner)


def test_an_active_thief_of_epoch_keys_cannot_run_a_rekey_leg_and_is_locked_out():
    # The thief holds epoch 0's secret, so both sealing keys, and sits in the hub: it can
    # seal anything to either side. It lacks the identity keys, so it signs with its own.
    alice, bob = channels()
    as_bob = channel(Role.RESPONDER, MALLORY, ALICE, "thief/b")
    as_alice = channel(Role.INITIATOR, MALLORY, BOB, "thief/a")
    # Leg one: a request to Bob, as if from Alice, for an epoch the thief would share.
    with pytest.raises(BadSignature):
        bob.open(as_alice.start_rekey())
    assert bob.rekey_state is RekeyState.IDLE and bob.epoch == 0
    # Leg two: Alice's genuine request, answered as if by Bob.
    request = alice.start_rekey()
    [forged_ack] = as_bob.open(request).replies
    with pytest.raises(BadSignature):
        alice.open(forged_ack)
    assert alice.rekey_state is RekeyState.REQUESTED and alice.epoch == 0
    # Alice's genuine signature does not carry over to the thief's own ephemeral.
    genuine = _inner_of(request, Role.INITIATOR)
    thief_key = X25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    swapped = dict(genuine, ephemeral=b64encode(thief_key.public_bytes_raw()))
    with pytest.raises(BadSignature):
        bob.open(_sealed_at(as_alice, 0, swapped))
    # Nor to an ack: the kind is signed.
    fresh_thief = channel(Role.RESPONDER, MALLORY, ALICE, "thief/c")
    with pytest.raises(BadSignature):
        alice.open(_sealed_at(fresh_thief, 0, dict(genuine, kind="rekey-ack")))
    # The honest rekey goes through; everything after it is closed to the thief.
    [ack] = bob.open(request).replies
    [done] = alice.open(ack).replies
    bob.open(done)
    after = alice.seal({"secret": "after"})
    assert bob.open(after).content == {"secret": "after"}
    for message in (done, after):
        with pytest.raises(DecryptionFailed):
            as_bob.open(message)
    with pytest.raises(SealedReplay, match="erased"):
        bob.open(_sealed_at(as_alice, 5, {"kind": "app", "content": {"forged": True}}))


def test_rekey_signatures_are_bound_to_the_call_its_key_agreement_and_the_kind():
    alice, bob = channels()
    request = relay(alice.start_rekey())
    # The same identities and secret under another key agreement (another transcript T).
    other_agreement = SealedChannel(
        Role.RESPONDER,
        "call-1",
        SECRET,
        seeded_random("y"),
        identity=BOB,
        peer_identity=ALICE.public_key,
        transcript_hash=bytes(32),
    )
    with pytest.raises(BadSignature):
        other_agreement.open(request)
    # Bob's genuine ack, presented to Bob's peer as Bob's request: the kind is signed.
    [ack] = bob.open(request).replies
    inner_ack = _inner_of(ack, Role.RESPONDER)
    _, fresh_bob = channels()
    fresh_alice = channel(Role.INITIATOR, ALICE, BOB, "z")
    with pytest.raises(BadSignature):
        fresh_alice.open(_sealed_at(fresh_bob, 0, dict(inner_ack, kind="rekey")))
    # Alice's request reflected to Alice: verified with Bob's key, under Bob's role.
    genuine = _inner_of(request, Role.INITIATOR)
    with pytest.raises(BadSignature):
        fresh_alice.open(_sealed_at(fresh_bob, 0, genuine))


def test_epoch_keys_are_distinct_per_direction_and_role_symmetric():
    initiator = derive_epoch_keys(SECRET, 0, Role.INITIATOR)
    responder = derive_epoch_keys(SECRET, 0, Role.RESPONDER)
    assert initiator.send == responder.receive and initiator.seal_send == responder.seal_receive
    base_keys = [hkdf_expand(SECRET, f"sframe {role}") for role in ("initiator", "responder")]
    assert initiator.send == MediaKey(0, 0, base_keys[0])
    assert initiator.receive == MediaKey(0, 1, base_keys[1])
    assert len({*base_keys, initiator.seal_send, initiator.seal_receive}) == 4


# -- a misbehaving (authenticated) peer ----------------------------------------------------


def _peer_sends(sender: SealedChannel, inner: dict[str, Any]) -> dict[str, Any]:
    # Only the authenticated peer could produce these: the hub cannot seal.
    return sender._seal_inner(inner)


SIG = b64encode(bytes(64))
# Alice's genuine signature of a request whose ephemeral is a small-order point.
ALICE_SIGNS_ZERO = b64encode(
    ALICE.sign(rekey_signed_content("rekey", Role.INITIATOR, "call-1", TRANSCRIPT, 1, bytes(32)))
)


@pytest.mark.parametrize(
    ("inner", "error"),
    [
        (
            {"kind": "rekey-ack", "epoch": 1, "ephemeral": b64encode(bytes(32)), "signature": SIG},
            UnexpectedCallMessage,
        ),
        ({"kind": "rekey-done", "epoch": 1}, UnexpectedCallMessage),
        (
            {
                "kind": "rekey",
                "epoch": 5,
                "ephemeral": b64encode(bytes(range(32))),
                "signature": SIG,
            },
            UnexpectedCallMessage,
        ),
        (
            {
                "kind": "rekey",
                "epoch": 1,
                "ephemeral": b64encode(bytes(32)),
                "signature": ALICE_SIGNS_ZERO,
            },
            MalformedCallMessage,
        ),
        (
            {
                "kind": "rekey",
                "epoch": 1,
                "ephemeral": b64encode(bytes(range(32))),
                "signature": SIG,
            },
            BadSignature,
        ),
        ({"kind": "rekey", "epoch": 1, "ephemeral": "AA", "signature": SIG}, MalformedCallMessage),
        (
            {"kind": "rekey", "epoch": 1, "ephemeral": b64encode(bytes(32)), "signature": "AA"},
            MalformedCallMessage,
        ),
        ({"kind": "rekey", "epoch": 1, "ephemeral": b64encode(bytes(32))}, MalformedCallMessage),
        (
            {"kind": "rekey", "epoch": "1", "ephemeral": "AA", "signature": SIG},
            MalformedCallMessage,
        ),
        ({"kind": "hello"}, MalformedCallMessage),
        ({"kind": "app", "content": [1]}, MalformedCallMessage),
        ({"kind": "app", "content": {}, "extra": 1}, MalformedCallMessage),
    ],
)
def test_misbehaving_peer_messages(inner, error):
    alice, bob = channels()
    with pytest.raises(error):
        bob.open(_peer_sends(alice, inner))


def test_the_first_message_of_a_new_epoch_must_be_rekey_done():
    alice, bob = channels()
    start = alice.start_rekey()
    [ack] = bob.open(start).replies
    alice.open(ack)  # Alice is now in epoch 1; she skips her rekey-done
    alice._send_sequence -= 1
    with pytest.raises(UnexpectedCallMessage, match="rekey-done"):
        bob.open(alice.seal({"too": "early"}))


def _peer_seals_text(sender: SealedChannel, plaintext: bytes) -> dict[str, Any]:
    """A sealed message whose inner JSON text is exactly ``plaintext`` (see the sealed format
    in docs/reference/key-agreement.md)."""
    sequence = sender._send_sequence
    sender._send_sequence += 1
    call_id = sender.call_id.encode()
    associated = (
        b"blindhub-v2 sealed"
        + len(call_id).to_bytes(4, "big")
        + call_id
        + b"I"
        + bytes(4)
        + sequence.to_bytes(8, "big")
    )
    nonce = bytes(4) + sequence.to_bytes(8, "big")
    ciphertext = AESGCM(sender.keys.seal_send).encrypt(nonce, plaintext, associated)
    return {
        "v": 2,
        "type": "sealed",
        "epoch": 0,
        "seq": sequence,
        "ciphertext": b64encode(ciphertext),
    }


AMBIGUOUS_JSON = [
    b'{"kind":"app","kind":"rekey","content":{}}',
    b'{"kind":"app","content":{"sdp":"a","sdp":"b"}}',
    b'{"kind":"app","content":{"n":NaN}}',
    b'{"kind":"app","content":{"n":[Infinity]}}',
    b'{"kind":"app","content":{"n":-Infinity}}',
]


@pytest.mark.parametrize("text", AMBIGUOUS_JSON)
def test_decode_message_refuses_duplicate_names_and_non_finite_numbers(text):
    with pytest.raises(MalformedCallMessage, match="strict JSON"):
        decode_message(text)


@pytest.mark.parametrize("text", AMBIGUOUS_JSON)
def test_an_authenticated_peer_cannot_send_ambiguous_json_either(text):
    alice, bob = channels()
    with pytest.raises(MalformedCallMessage, match="strict JSON"):
        bob.open(_peer_seals_text(alice, text))


def test_the_raw_sealing_helper_follows_the_spec():
    alice, bob = channels()
    assert bob.open(_peer_seals_text(alice, b'{"kind":"app","content":{"a":1}}')).content == {
        "a": 1
    }


def test_seal_refuses_non_finite_numbers():
    alice, _ = channels()
    with pytest.raises(LocalError):
        alice.seal({"n": float("nan")})
    with pytest.raises(LocalError):
        alice.seal({"n": [float("inf")]})


def test_small_order_ephemeral_is_rejected():
    private_key = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    with pytest.raises(MalformedCallMessage, match="small-order"):
        x25519_shared_secret(private_key, bytes(32))


# -- property tests ------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(JSON)
def test_open_raises_only_typed_errors_on_arbitrary_json(value):
    _, bob = channels()
    with pytest.raises(RemoteError):
        bob.open(value)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=-2, max_value=2**49),
    st.integers(min_value=-2, max_value=2**49),
    st.binary(max_size=80),
)
def test_open_raises_only_typed_errors_on_sealed_shaped_messages(epoch, sequence, ciphertext):
    _, bob = channels()
    message = {
        "v": 2,
        "type": "sealed",
        "epoch": epoch,
        "seq": sequence,
        "ciphertext": b64encode(ciphertext),
    }
    with pytest.raises((MalformedCallMessage, DecryptionFailed)):
        bob.open(message)


# -- the dispatch table and the rekey state ------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
INNER_SAMPLES: dict[type, dict[str, Any]] = {
    App: {"kind": "app", "content": {"n": 1}},
    Rekey: {"kind": "rekey", "epoch": 1, "ephemeral": b64encode(bytes(range(32)))},
    RekeyAck: {"kind": "rekey-ack", "epoch": 1, "ephemeral": b64encode(bytes(range(32)))},
    RekeyDone: {"kind": "rekey-done", "epoch": 1},
    SenderKeyMessage: {
        "kind": "sender-key",
        "suite": 4,
        "generation": 0,
        "step": 0,
        "base_key": b64encode(bytes(32)),
    },
    SenderKeyAck: {"kind": "sender-key-ack", "kid": 0},
}


def bob_in(state: RekeyState) -> tuple[SealedChannel, SealedChannel]:
    """Alice and a Bob in ``state``, Alice still sending under epoch 0."""
    alice, bob = channels()
    if state is RekeyState.REQUESTED:
        bob.start_rekey()
    elif state is RekeyState.AWAITING_DONE:
        bob.open(alice.start_rekey())
    assert bob.rekey_state is state
    return alice, bob


def test_the_dispatch_table_is_exactly_the_documented_one():
    in_every_state = {
        (state, kind) for state in RekeyState for kind in (App, SenderKeyMessage, SenderKeyAck)
    }
    assert set(INNER_HANDLERS) == in_every_state | {
        (RekeyState.IDLE, Rekey),
        (RekeyState.REQUESTED, Rekey),
        (RekeyState.REQUESTED, RekeyAck),
        (RekeyState.AWAITING_DONE, RekeyDone),
    }


@pytest.mark.parametrize(
    ("state", "kind"),
    [(s, k) for s in RekeyState for k in INNER_SAMPLES if (s, k) not in INNER_HANDLERS],
    ids=str,
)
def test_every_pair_not_in_the_dispatch_table_is_refused(state, kind):
    alice, bob = bob_in(state)
    with pytest.raises(UnexpectedCallMessage, match=f"not accepted in rekey state {state.value}"):
        bob.open(_peer_sends(alice, INNER_SAMPLES[kind]))
    assert bob.rekey_state is state  # refused, nothing changed


def _documented_transitions() -> set[tuple[RekeyState, RekeyState]]:
    text = (ROOT / "docs" / "reference" / "key-agreement.md").read_text(encoding="utf-8")
    table = text.split("| state | event | next state | the state carries |")[1].split("\n\n")[0]
    rows = [line.split("|")[1:-1] for line in table.strip().splitlines()[1:]]
    return {(RekeyState(row[0].strip()), RekeyState(row[2].strip())) for row in rows}


def test_the_rekey_transitions_are_the_documented_table():
    documented = _documented_transitions()
    assert {(a, b) for a, b in documented if a is not b} == REKEY_TRANSITIONS
    # The one documented self-loop: the initiator ignores a colliding request.
    assert {(a, b) for a, b in documented if a is b} == {(RekeyState.REQUESTED,) * 2}


def test_each_legal_rekey_transition():
    idle, requested, awaiting = RekeyState
    alice, bob = channels()
    start = alice.start_rekey()
    assert alice.rekey_state is requested  # idle -> requested
    [ack] = bob.open(start).replies
    assert bob.rekey_state is awaiting  # idle -> awaiting-done
    [done] = alice.open(ack).replies
    assert alice.rekey_state is idle  # requested -> idle
    bob.open(done)
    assert bob.rekey_state is idle  # awaiting-done -> idle
    # Both at once: the responder goes requested -> awaiting-done, the initiator stays.
    alice_start, bob_start = alice.start_rekey(), bob.start_rekey()
    assert alice.open(bob_start) == Received() and alice.rekey_state is requested
    bob.open(alice_start)
    assert bob.rekey_state is awaiting


def test_each_illegal_rekey_transition_is_refused_and_changes_nothing():
    for state in (RekeyState.REQUESTED, RekeyState.AWAITING_DONE):
        # requested -> requested and awaiting-done -> requested: one rekey at a time.
        _, bob = bob_in(state)
        with pytest.raises(LocalError, match="in progress"):
            bob.start_rekey()
        assert bob.rekey_state is state
    # awaiting-done -> awaiting-done: a second request before the first completes.
    for epoch in (1, 2):
        alice, bob = bob_in(RekeyState.AWAITING_DONE)
        second = INNER_SAMPLES[Rekey] | {"epoch": epoch}
        with pytest.raises(UnexpectedCallMessage):
            bob.open(_peer_sends(alice, second))
        assert bob.rekey_state is RekeyState.AWAITING_DONE
    # idle -> idle by a rekey-done or rekey-ack nobody asked for: refused.
    for kind in (RekeyDone, RekeyAck):
        alice, bob = bob_in(RekeyState.IDLE)
        with pytest.raises(UnexpectedCallMessage):
            bob.open(_peer_sends(alice, INNER_SAMPLES[kind]))
        assert bob.rekey_state is RekeyState.IDLE
    assert (RekeyState.AWAITING_DONE, RekeyState.REQUESTED) not in REKEY_TRANSITIONS


# -- the keys a rekey yields ---------------------------------------------------------------


def test_a_rekeys_key_updates_go_through_the_one_apply_function():
    alice, bob = channels()
    frames = {}
    for name, channel in (("alice", alice), ("bob", bob)):
        keys = channel.keys
        sender, receiver = SFrameSender(), SFrameReceiver()
        initial = KeyUpdate(install_receive=keys.receive, switch_send=keys.send)
        assert apply_key_update(initial, sender, receiver) == frozenset()
        frames[name] = (sender, receiver)
    on_rekey, on_ack, on_done = rekey(alice, bob)
    assert apply_key_update(on_rekey.keys, *frames["bob"]) == {0}  # Alice's epoch-0 KID
    assert apply_key_update(on_ack.keys, *frames["alice"]) == {1}  # Bob's epoch-0 KID
    assert apply_key_update(on_done.keys, *frames["bob"]) == frozenset()
    for source, destination in (("alice", "bob"), ("bob", "alice")):
        protected = frames[source][0].transform("audio")(b"frame")
        assert protected is not None
        assert frames[destination][1].transform("audio")(protected) == b"frame"


# -- group sender keys through the sealed channel ---------------------------------------------


def test_a_sender_key_and_its_ack_cross_the_channel_in_every_rekey_state():
    key = SenderKey.fresh(CipherSuite.AES_128_GCM_SHA256_128, 3).ratcheted()
    for state in RekeyState:
        alice, bob = bob_in(state)
        received = bob.open(relay(alice.seal_sender_key(key)))
        assert received == Received(sender_key=key) and received.sender_key is not None
        assert received.sender_key.kid == key.kid == (3 << 8) | 1
        ack = alice.seal_sender_key_ack(key.kid)
        assert bob.open(relay(ack)) == Received(sender_key_ack=key.kid)
        assert bob.rekey_state is state  # sender keys do not touch the pairwise epochs


def test_the_hub_sees_no_base_key_of_a_sender_key():
    alice, _ = channels()
    base_key = bytes(range(7, 39))
    message = alice.seal_sender_key(SenderKey(CipherSuite.AES_128_GCM_SHA256_128, 0, 0, base_key))
    wire = encode_message(message).decode()
    assert set(message) == {"v", "type", "epoch", "seq", "ciphertext"}
    assert b64encode(base_key) not in wire and base_key.hex() not in wire
    assert "sender-key" not in wire and '"generation"' not in wire


@pytest.mark.parametrize("field", ["epoch", "seq", "ciphertext"])
def test_a_tampered_sender_key_is_refused_and_changes_nothing(field):
    alice, bob = channels()
    key = SenderKey.fresh(CipherSuite.AES_128_GCM_SHA256_128, 0)
    genuine = alice.seal_sender_key(key)
    message = dict(genuine)
    if field == "ciphertext":
        data = bytearray(b64decode(message["ciphertext"]))
        data[-20] ^= 0x01
        message["ciphertext"] = b64encode(bytes(data))
    else:
        message[field] += 1
    with pytest.raises(DecryptionFailed):
        bob.open(message)
    assert bob.open(genuine).sender_key == key


GOOD_SENDER_KEY = {
    "kind": "sender-key",
    "suite": 4,
    "generation": 1,
    "step": 2,
    "base_key": b64encode(bytes(32)),
}


@pytest.mark.parametrize(
    "inner",
    [
        GOOD_SENDER_KEY | {"suite": 0},
        GOOD_SENDER_KEY | {"generation": -1},
        GOOD_SENDER_KEY | {"generation": 2**31 + 1},
        GOOD_SENDER_KEY | {"step": 1.5},
        GOOD_SENDER_KEY | {"base_key": b64encode(bytes(31))},
        GOOD_SENDER_KEY | {"base_key": b64encode(bytes(32)) + "="},
        GOOD_SENDER_KEY | {"suite": 5},  # a 32-byte base key for a SHA-512 suite
        GOOD_SENDER_KEY | {"extra": 1},
        {name: value for name, value in GOOD_SENDER_KEY.items() if name != "step"},
        {"kind": "sender-key-ack", "kid": -1},
        {"kind": "sender-key-ack", "kid": "515"},
        {"kind": "sender-key-ack", "kid": 2**39 + 256},
        {"kind": "sender-key-ack"},
        {"kind": "sender-key-ack", "kid": 1, "generation": 0},
    ],
)
def test_malformed_sender_key_messages_are_refused(inner):
    alice, bob = channels()
    with pytest.raises(MalformedCallMessage):
        bob.open(_peer_sends(alice, inner))


def test_seal_sender_key_takes_only_a_sender_key():
    alice, _ = channels()
    with pytest.raises(LocalError):
        alice.seal_sender_key(MediaKey(0, 0, bytes(32)))  # type: ignore[arg-type]
