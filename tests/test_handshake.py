import contextlib
import copy
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.errors import CryptoError, LocalError, RemoteError
from crypto.frame_crypto import KeyUpdate, SFrameReceiver, SFrameSender, apply_key_update
from crypto.handshake import (
    HANDLERS,
    CommitmentMismatch,
    HandshakeResult,
    HandshakeState,
    Initiator,
    NoCommonSuite,
    PeerCheck,
    Responder,
    Transcript,
    key_schedule,
    render_sas,
    signed_content,
)
from crypto.identity import (
    BadSignature,
    IdentityKey,
    KnownPeers,
    PinnedIdentityMismatch,
    b64decode,
    b64encode,
)
from crypto.messages import (
    HANDSHAKE_MESSAGES,
    Accept,
    Commit,
    Confirm,
    MalformedCallMessage,
    Reveal,
    UnexpectedCallMessage,
    decode_message,
    encode_message,
)
from crypto.sealed import LABEL_PREFIX, Role, WrongCall, length_prefixed
from crypto.sframe import CipherSuite
from tests.vectors.make_handshake_vectors import (
    VECTORS_PATH,
    build_vectors,
    identity_seed,
    render,
    seeded_random,
)

GCM = CipherSuite.AES_128_GCM_SHA256_128
CTR80 = CipherSuite.AES_128_CTR_HMAC_SHA256_80
ALICE = IdentityKey(identity_seed("alice"))
BOB = IdentityKey(identity_seed("bob"))
MALLORY = IdentityKey(identity_seed("mallory"))


def pair(
    call_id: str = "call-1",
    seed: str = "s",
    alice: IdentityKey = ALICE,
    bob: IdentityKey = BOB,
    alice_check: PeerCheck | None = None,
    bob_check: PeerCheck | None = None,
    alice_name: str = "alice",
    bob_name: str = "bob",
) -> tuple[Initiator, Responder]:
    initiator = Initiator(
        alice,
        call_id,
        [GCM, CTR80],
        seeded_random(seed + "/i"),
        name=alice_name,
        peer_check=alice_check,
    )
    responder = Responder(
        bob, call_id, [CTR80, GCM], seeded_random(seed + "/r"), name=bob_name, peer_check=bob_check
    )
    return initiator, responder


Tamper = Callable[[str, dict[str, Any]], dict[str, Any]]


def run(
    initiator: Initiator, responder: Responder, tamper: Tamper | None = None
) -> tuple[HandshakeResult, HandshakeResult]:
    """Drive the four messages, passing each through ``tamper(name, message)`` if given."""

    def relay(name: str, message: dict[str, Any]) -> dict[str, Any]:
        # Every message crosses the hub as JSON text.
        message = decode_message(encode_message(message))
        return tamper(name, message) if tamper else message

    [accept] = responder.receive(relay("commit", initiator.start()))
    [reveal] = initiator.receive(relay("accept", accept))
    [confirm] = responder.receive(relay("reveal", reveal))
    assert initiator.receive(relay("confirm", confirm)) == []
    return initiator.result, responder.result


def test_full_handshake_gives_both_sides_the_same_keys_and_sas():
    mine, theirs = run(*pair())
    assert mine.sas == theirs.sas
    assert mine.transcript_hash == theirs.transcript_hash
    assert mine.suite == theirs.suite == GCM  # the initiator's preference wins
    send, receive = mine.initial_keys.switch_send, mine.initial_keys.install_receive
    assert send is not None and receive is not None
    assert (send, receive) == (theirs.initial_keys.install_receive, theirs.initial_keys.switch_send)
    assert (send.epoch, receive.epoch) == (0, 0) and {send.kid, receive.kid} == {0, 1}
    # 32-byte, distinct base keys: tests/vectors/handshake.json, checked below.
    assert mine.peer_identity == BOB.public_key and theirs.peer_identity == ALICE.public_key
    assert (mine.peer_name, theirs.peer_name) == ("bob", "alice")
    groups = mine.sas.split(" ")
    assert len(groups) == 3 and all(len(g) == 5 and g.isdigit() for g in groups)


def test_fresh_randomness_gives_a_fresh_sas_and_keys():
    first, _ = run(*pair(seed="a"))
    second, _ = run(*pair(seed="b"))
    assert first.sas != second.sas and first.initial_keys != second.initial_keys


def test_reprs_hide_every_secret():
    mine, _ = run(*pair())
    text = repr(mine) + repr(mine.channel) + repr(mine.channel.keys)
    for secret in (mine.channel.keys.seal_send, mine.channel.keys.seal_receive):
        assert secret.hex() not in text and b64encode(secret) not in text
    # A media key shows its epoch and KID and nothing else.
    assert "KeyUpdate(install_receive=MediaKey(epoch=0, kid=1), " in text
    assert "switch_send=MediaKey(epoch=0, kid=0))" in text
    assert mine.sas in text  # not secret: it is read aloud


def test_mitm_with_its_own_keys_gets_two_different_sas():
    # Mallory answers Alice as a responder and calls Bob as an initiator.
    # It can claim the peers' real names: what it cannot do is sign with their keys.
    alice, mallory_responder = pair(alice=ALICE, bob=MALLORY, seed="am")
    mallory_initiator, bob = pair(alice=MALLORY, bob=BOB, seed="mb")
    alice_result, _mallory_a = run(alice, mallory_responder)
    _mallory_b, bob_result = run(mallory_initiator, bob)
    assert alice_result.sas != bob_result.sas
    assert alice_result.peer_identity == MALLORY.public_key
    assert (alice_result.peer_name, bob_result.peer_name) == ("bob", "alice")


def test_mitm_is_stopped_before_any_key_by_a_pinned_peer():
    alice_pins, bob_pins = KnownPeers(), KnownPeers()
    alice_pins.check("bob", BOB.public_key)
    bob_pins.check("alice", ALICE.public_key)
    alice, mallory_responder = pair(bob=MALLORY, seed="am", alice_check=alice_pins.check)
    with pytest.raises(PinnedIdentityMismatch):
        run(alice, mallory_responder)
    assert alice.state is HandshakeState.FAILED
    with pytest.raises(LocalError):
        alice.result  # noqa: B018
    mallory_initiator, bob = pair(alice=MALLORY, seed="mb", bob_check=bob_pins.check)
    with pytest.raises(PinnedIdentityMismatch):
        run(mallory_initiator, bob)
    assert bob.state is HandshakeState.FAILED


def test_pin_on_first_sight_through_the_handshake():
    alice_pins, bob_pins = KnownPeers(), KnownPeers()
    run(*pair(alice_check=alice_pins.check, bob_check=bob_pins.check))
    assert [(pin.name, pin.public_key) for pin in alice_pins] == [("bob", BOB.public_key)]
    assert [(pin.name, pin.public_key) for pin in bob_pins] == [("alice", ALICE.public_key)]


def recording_pins() -> tuple[list[tuple[str, Any]], PeerCheck]:
    seen: list[tuple[str, Any]] = []
    return seen, lambda name, key: seen.append((name, key))


@pytest.mark.parametrize(
    ("message", "error"), [("commit", CommitmentMismatch), ("accept", BadSignature)]
)
def test_a_hub_that_renames_a_peer_gets_nothing_pinned_under_the_new_name(message, error):
    # The attack the signed names close: the hub calls bob "eve" (or alice "eve") so that a
    # trust-on-first-use peer would pin bob's real key under a name of the hub's choosing.
    def rename(name, relayed):
        if name == message:
            relayed["name"] = "eve"
        return relayed

    alice_seen, alice_check = recording_pins()
    bob_seen, bob_check = recording_pins()
    initiator, responder = pair(alice_check=alice_check, bob_check=bob_check)
    with pytest.raises(error):
        run(initiator, responder, rename)
    assert responder.state is HandshakeState.FAILED
    assert alice_seen == [] and bob_seen == []


def test_the_pin_check_gets_the_name_the_peer_signed():
    # A key agreement with Mallory's own key is pinned under the name Mallory signed.
    alice_seen, alice_check = recording_pins()
    alice, mallory = pair(bob=MALLORY, bob_name="mallory", alice_check=alice_check)
    run(alice, mallory)
    assert alice_seen == [("mallory", MALLORY.public_key)]


@pytest.mark.parametrize(
    "bad_name", ["", "x" * 257, "bob\nalice", "tab\there", "\x00", "\u202ebob", "\ud800"]
)
def test_malformed_names_are_rejected(bad_name):
    def rename(name, message):
        if name == "commit":
            message["name"] = bad_name
        return message

    with pytest.raises(MalformedCallMessage, match="'name'"):
        run(*pair(), rename)
    with pytest.raises(LocalError, match="own name"):
        Initiator(ALICE, "c", [GCM], seeded_random("x"), name=bad_name)
    with pytest.raises(LocalError, match="own name"):
        Responder(BOB, "c", [GCM], seeded_random("x"), name=bad_name)


@pytest.mark.parametrize("good_name", ["b", "x" * 256, "Zoë Ångström", "bob@home 2", "名前"])
def test_printable_names_up_to_256_characters_are_accepted(good_name):
    mine, theirs = run(*pair(alice_name=good_name, bob_name=good_name))
    assert mine.peer_name == theirs.peer_name == good_name


def test_mitm_changing_its_ephemeral_after_seeing_the_other_is_caught_by_the_commitment():
    mallory, bob = pair(alice=MALLORY, seed="grind")
    commit = mallory.start()
    [accept] = bob.receive(commit)
    [honest_reveal] = mallory.receive(accept)
    # Mallory now knows Bob's ephemeral and picks another of her own (to steer the SAS),
    # signing a transcript that is valid for it.
    other = X25519PrivateKey.from_private_bytes(bytes(range(32))).public_key().public_bytes_raw()
    transcript = Transcript(
        offered=(GCM, CTR80),
        chosen=GCM,
        call_id="call-1",
        initiator_nonce=b64decode(commit["nonce"]),
        responder_nonce=b64decode(accept["nonce"]),
        initiator_ephemeral=other,
        responder_ephemeral=b64decode(accept["ephemeral"]),
        initiator_identity=MALLORY.public_key,
        responder_identity=BOB.public_key,
        initiator_name="alice",
        responder_name="bob",
    )
    forged = dict(honest_reveal)
    forged["ephemeral"] = b64encode(other)
    forged["signature"] = b64encode(MALLORY.sign(signed_content(Role.INITIATOR, transcript.hash())))
    with pytest.raises(CommitmentMismatch):
        bob.receive(forged)
    assert bob.state is HandshakeState.FAILED


def test_relaying_identities_but_swapping_ephemerals_breaks_the_signatures():
    # A MITM that keeps the real identity keys cannot sign; its swap is a bad signature.
    def swap(name, message):
        if name == "accept":
            message["ephemeral"] = b64encode(bytes(range(1, 33)))
        return message

    initiator, responder = pair()
    with pytest.raises(BadSignature):
        run(initiator, responder, swap)
    assert responder.state is HandshakeState.FAILED


def _flip(field: str, value: Any) -> Any:
    if field == "name":
        return "eve"
    if isinstance(value, str):
        try:
            data = bytearray(b64decode(value))
        except ValueError:
            return value + "x"  # the call id
        data[0] ^= 0x01
        return b64encode(bytes(data))
    if isinstance(value, list):
        return list(reversed(value))
    if value == 1:  # version
        return 2
    return int(CTR80) if value == int(GCM) else int(GCM)  # a suite


# (message, field) -> (error, the party that raises it)
FLIPS = {
    ("commit", "suites"): (BadSignature, "responder"),
    ("commit", "nonce"): (CommitmentMismatch, "responder"),
    ("commit", "name"): (CommitmentMismatch, "responder"),
    ("commit", "commitment"): (CommitmentMismatch, "responder"),
    ("accept", "suite"): (BadSignature, "responder"),
    ("accept", "nonce"): (BadSignature, "responder"),
    ("accept", "ephemeral"): (BadSignature, "responder"),
    ("accept", "identity"): (BadSignature, "responder"),
    ("accept", "name"): (BadSignature, "responder"),
    ("reveal", "ephemeral"): (CommitmentMismatch, "responder"),
    ("reveal", "identity"): (CommitmentMismatch, "responder"),
    ("reveal", "signature"): (BadSignature, "responder"),
    ("confirm", "signature"): (BadSignature, "initiator"),
}
RECEIVER = {"commit": "responder", "accept": "initiator", "reveal": "responder"}
RECEIVER["confirm"] = "initiator"
for _name, _receiver in RECEIVER.items():
    FLIPS[(_name, "v")] = (MalformedCallMessage, _receiver)
    FLIPS[(_name, "type")] = (UnexpectedCallMessage, _receiver)
    FLIPS[(_name, "call_id")] = (WrongCall, _receiver)


@pytest.mark.parametrize(("name", "field"), sorted(FLIPS))
def test_flipping_any_field_of_any_message_is_rejected(name, field):
    error, raiser = FLIPS[(name, field)]

    def tamper(message_name, message):
        if message_name == name:
            message[field] = (
                {"commit": "accept"}.get(message["type"], "commit")
                if field == "type"
                else _flip(field, message[field])
            )
        return message

    initiator, responder = pair()
    with pytest.raises(error):
        run(initiator, responder, tamper)
    failed = initiator if raiser == "initiator" else responder
    assert failed.state is HandshakeState.FAILED
    with pytest.raises(LocalError):
        failed.result  # noqa: B018
    with pytest.raises(LocalError, match="failed"):
        failed.receive({"v": 1})


def test_every_field_of_every_message_is_covered():
    messages = build_vectors()["messages"]
    assert {(name, field) for name, message in messages.items() for field in message} == set(FLIPS)


@pytest.mark.parametrize("name", ["commit", "accept", "reveal", "confirm"])
def test_extra_or_missing_fields_are_malformed(name):
    def add(message_name, message):
        if message_name == name:
            message["extra"] = 1
        return message

    def drop(message_name, message):
        if message_name == name:
            del message["call_id"]
        return message

    for tamper in (add, drop):
        with pytest.raises(MalformedCallMessage):
            run(*pair(), tamper)


def test_a_message_from_another_call_is_rejected():
    old_initiator, _old_responder = pair(call_id="call-old", seed="old")
    old_commit = old_initiator.start()
    _, responder = pair(call_id="call-new")
    with pytest.raises(WrongCall):
        responder.receive(old_commit)


def test_replaying_a_recorded_handshake_under_the_same_call_id_fails():
    # The hub replays Alice's commit and reveal from an earlier call with the same id.
    recorded = {}

    def record(name, message):
        recorded[name] = copy.deepcopy(message)
        return message

    run(*pair(seed="earlier"), record)
    _, bob = pair(seed="later")
    bob.receive(recorded["commit"])  # the commit alone proves nothing
    with pytest.raises(BadSignature):
        bob.receive(recorded["reveal"])  # it signed the earlier call's nonces


def test_no_common_suite():
    initiator = Initiator(ALICE, "c", [GCM], seeded_random("x"), name="alice")
    responder = Responder(BOB, "c", [CTR80], seeded_random("y"), name="bob")
    with pytest.raises(NoCommonSuite):
        responder.receive(initiator.start())


def test_a_chosen_suite_that_was_not_offered_is_rejected():
    def downgrade(name, message):
        if name == "accept":
            message["suite"] = int(CipherSuite.AES_128_CTR_HMAC_SHA256_32)
        return message

    with pytest.raises(MalformedCallMessage, match="not offered"):
        run(*pair(), downgrade)


def test_api_misuse_is_a_local_error():
    initiator, _ = pair()
    initiator.start()
    with pytest.raises(LocalError):
        initiator.start()
    with pytest.raises(LocalError):
        Initiator(ALICE, "", [GCM], seeded_random("x"), name="alice")
    with pytest.raises(LocalError):
        Initiator(ALICE, "c", [], seeded_random("x"), name="alice")
    with pytest.raises(LocalError):
        Responder(BOB, "c", [], seeded_random("x"), name="bob")
    with pytest.raises(LocalError):
        Responder(BOB, "c", [9], seeded_random("x"), name="bob")  # type: ignore[list-item]


def test_messages_after_completion_are_unexpected():
    initiator, responder = pair()
    run(initiator, responder)
    with pytest.raises(UnexpectedCallMessage):
        responder.receive(initiator.result.channel.seal({"x": 1}))


def test_render_sas():
    assert render_sas(bytes(32)) == "00000 00000 00000"
    assert render_sas((10**15 + 123).to_bytes(32, "big")) == "00000 00000 00123"


# -- property tests: parsers raise only typed errors --------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_decode_message_raises_only_malformed(data):
    with contextlib.suppress(MalformedCallMessage):
        decode_message(data)


@settings(max_examples=150, deadline=None)
@given(JSON)
def test_state_machines_raise_only_typed_errors_on_arbitrary_json(value):
    initiator, responder = pair()
    initiator.start()
    for machine in (initiator, responder):
        with pytest.raises(RemoteError):
            machine.receive(value)


MESSAGE_FIELDS = {name: {field for message, field in FLIPS if message == name} for name in RECEIVER}
# Every field of every message, plus one no message has: on a message that lacks it, an extra.
ANY_FIELD = sorted({field for _, field in FLIPS} | {"x"})
SUITE_CODES = [int(suite) for suite in CipherSuite]
WELL_FORMED = (
    st.binary(min_size=32, max_size=32).map(b64encode)  # nonce, ephemeral, identity, commitment
    | st.binary(min_size=64, max_size=64).map(b64encode)  # signature
    | st.sampled_from(SUITE_CODES)
    | st.lists(st.sampled_from(SUITE_CODES), min_size=1, max_size=5)
    | st.sampled_from(["alice", "bob", "mallory", "call-1", "call-2", 1, 2])
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(RECEIVER)), st.sampled_from(ANY_FIELD), JSON | WELL_FORMED)
def test_any_change_to_any_message_raises_a_typed_error(name, field, value):
    changed: list[bool] = []

    def tamper(message_name, message):
        assert set(message) == MESSAGE_FIELDS[message_name]  # the field lists are complete
        if message_name == name:
            before = json.dumps(message, sort_keys=True)
            message[field] = value
            changed.append(json.dumps(message, sort_keys=True) != before)
        return message

    try:
        run(*pair(), tamper)
    except CryptoError:
        raised = True
    else:
        raised = False
    assert changed and raised == changed[0]


# -- published vectors --------------------------------------------------------------------


def test_vectors_file_is_reproduced_byte_for_byte():
    assert render(build_vectors()) == VECTORS_PATH.read_text(encoding="utf-8")


def test_vectors_recomputed_from_first_principles():
    # Recompute from the file's inputs with primitives only, not the state machines.
    vectors = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    messages = vectors["messages"]
    alice_random, bob_random = seeded_random("alice"), seeded_random("bob")
    alice_ephemeral = X25519PrivateKey.from_private_bytes(alice_random(32))
    bob_ephemeral = X25519PrivateKey.from_private_bytes(bob_random(32))
    assert alice_random(32) == b64decode(messages["commit"]["nonce"])
    assert bob_random(32) == b64decode(messages["accept"]["nonce"])
    names = (vectors["inputs"]["initiator_name"], vectors["inputs"]["responder_name"])
    assert (messages["commit"]["name"], messages["accept"]["name"]) == names
    committed = length_prefixed(
        vectors["inputs"]["call_id"].encode(),
        b64decode(messages["commit"]["nonce"]),
        alice_ephemeral.public_key().public_bytes_raw(),
        ALICE.public_key.raw,
        names[0].encode(),
    )
    assert hashlib.sha256(LABEL_PREFIX + b"commit" + committed).digest() == b64decode(
        messages["commit"]["commitment"]
    )
    transcript = Transcript(
        offered=(GCM, CTR80),
        chosen=GCM,
        call_id=vectors["inputs"]["call_id"],
        initiator_nonce=b64decode(messages["commit"]["nonce"]),
        responder_nonce=b64decode(messages["accept"]["nonce"]),
        initiator_ephemeral=alice_ephemeral.public_key().public_bytes_raw(),
        responder_ephemeral=bob_ephemeral.public_key().public_bytes_raw(),
        initiator_identity=ALICE.public_key,
        responder_identity=BOB.public_key,
        initiator_name=names[0],
        responder_name=names[1],
    )
    assert transcript.hash().hex() == vectors["transcript_hash"]
    shared = alice_ephemeral.exchange(bob_ephemeral.public_key())
    assert key_schedule(shared, transcript.hash()).sas == vectors["sas"]
    BOB.public_key.verify(
        signed_content(Role.RESPONDER, transcript.hash()),
        b64decode(messages["confirm"]["signature"]),
    )
    # The sealed message opens with the published key and the documented nonce and AAD.
    sealed = vectors["sealed"]["message"]
    associated = (
        LABEL_PREFIX
        + b"sealed"
        + length_prefixed(b"call-4f1e2d")
        + b"I"
        + (0).to_bytes(4, "big")
        + (0).to_bytes(8, "big")
    )
    plaintext = ChaCha20Poly1305(bytes.fromhex(vectors["epoch0"]["seal_initiator"])).decrypt(
        bytes(12), b64decode(sealed["ciphertext"]), associated
    )
    assert json.loads(plaintext) == {"kind": "app", "content": vectors["sealed"]["content"]}
    # Each epoch's two SFrame base keys are 32 bytes and distinct.
    for epoch in (vectors["epoch0"], vectors["rekey"]["epoch1"]):
        base_keys = {
            bytes.fromhex(epoch[f"sframe_{who}"]["base_key"]) for who in ("initiator", "responder")
        }
        assert len(base_keys) == 2 and {len(key) for key in base_keys} == {32}
    assert (
        vectors["epoch0"]["sframe_initiator"]["base_key"]
        != vectors["rekey"]["epoch1"]["sframe_initiator"]["base_key"]
    )


# -- the dispatch table, failures and interruptions ----------------------------------------


def recorded_messages() -> dict[str, dict[str, Any]]:
    recorded = {}

    def record(name, message):
        recorded[name] = copy.deepcopy(message)
        return message

    run(*pair(seed="table"), record)
    return recorded


def machine_in(state: HandshakeState) -> Initiator | Responder:
    """A machine of the role that has ``state``, driven there with real messages."""
    initiator, responder = pair(seed="table")
    if state is HandshakeState.START:
        return initiator
    commit = initiator.start()
    if state is HandshakeState.AWAIT_ACCEPT:
        return initiator
    if state is HandshakeState.AWAIT_COMMIT:
        return responder
    [accept] = responder.receive(commit)
    if state is HandshakeState.AWAIT_REVEAL:
        return responder
    [reveal] = initiator.receive(accept)
    if state is HandshakeState.AWAIT_CONFIRM:
        return initiator
    responder.receive(reveal)
    assert state is HandshakeState.DONE
    return responder


def test_the_dispatch_table_is_one_message_type_per_waiting_state():
    assert set(HANDLERS) == {
        (HandshakeState.AWAIT_COMMIT, Commit),
        (HandshakeState.AWAIT_ACCEPT, Accept),
        (HandshakeState.AWAIT_REVEAL, Reveal),
        (HandshakeState.AWAIT_CONFIRM, Confirm),
    }


@pytest.mark.parametrize(
    ("state", "name"),
    [
        (state, name)
        for state in HandshakeState
        if state is not HandshakeState.FAILED
        for name, cls in HANDSHAKE_MESSAGES.items()
        if (state, cls) not in HANDLERS
    ],
    ids=str,
)
def test_every_pair_not_in_the_dispatch_table_is_unexpected_and_final(state, name):
    machine = machine_in(state)
    with pytest.raises(UnexpectedCallMessage, match=f"got {name!r} in state {state.value}"):
        machine.receive(recorded_messages()[name])
    assert machine.state is HandshakeState.FAILED
    with pytest.raises(LocalError, match="failed"):
        machine.receive(recorded_messages()[name])


class _Unforeseen(Exception):
    pass


def _raising(error: BaseException) -> PeerCheck:
    def check(name, key):
        raise error

    return check


def test_an_unforeseen_error_in_the_peer_check_fails_the_handshake_without_keys():
    initiator, responder = pair(bob_check=_raising(_Unforeseen("pin store unreadable")))
    with pytest.raises(_Unforeseen):
        run(initiator, responder)
    assert responder.state is HandshakeState.FAILED
    with pytest.raises(LocalError):
        responder.result  # noqa: B018


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_an_interruption_is_not_a_failure_and_exposes_no_keys(interruption):
    # An interrupt or a cancellation says nothing about the peer: the machine is left in the
    # state it was in (the message unprocessed), not FAILED, and still holds no result.
    initiator, responder = pair(alice_check=_raising(interruption()))
    commit = initiator.start()
    [accept] = responder.receive(commit)
    [reveal] = initiator.receive(accept)
    [confirm] = responder.receive(reveal)
    with pytest.raises(interruption):
        initiator.receive(confirm)
    assert initiator.state is HandshakeState.AWAIT_CONFIRM
    with pytest.raises(LocalError, match="not complete"):
        initiator.result  # noqa: B018


# -- epoch 0's keys: the same object and path as every rekey's ------------------------------


def test_the_initial_keys_and_a_rekeys_keys_are_applied_by_the_same_function():
    mine, theirs = run(*pair())
    pairs = {}
    for name, result in (("mine", mine), ("theirs", theirs)):
        assert isinstance(result.initial_keys, KeyUpdate)
        sender, receiver = SFrameSender(result.suite), SFrameReceiver(result.suite)
        assert apply_key_update(result.initial_keys, sender, receiver) == frozenset()
        pairs[name] = (sender, receiver)
    frame = mine_frame = pairs["mine"][0].transform("video")(b"epoch 0")
    assert frame is not None and pairs["theirs"][1].transform("video")(frame) == b"epoch 0"
    on_rekey = theirs.channel.open(mine.channel.start_rekey())
    assert isinstance(on_rekey.keys, KeyUpdate)
    apply_key_update(on_rekey.keys, *pairs["theirs"])
    [ack] = on_rekey.replies
    on_ack = mine.channel.open(ack)
    apply_key_update(on_ack.keys, *pairs["mine"])
    frame = pairs["mine"][0].transform("video")(b"epoch 1")
    assert frame is not None and pairs["theirs"][1].transform("video")(frame) == b"epoch 1"
    assert mine_frame != frame


def test_a_handshake_result_has_no_raw_key_fields():
    mine, _ = run(*pair())
    for name in ("send_base_key", "recv_base_key", "send_kid", "recv_kid"):
        assert not hasattr(mine, name)
    for key in (mine.initial_keys.switch_send, mine.initial_keys.install_receive):
        assert key is not None and not hasattr(key, "base_key")
