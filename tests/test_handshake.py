import contextlib
import copy
import hashlib
import hmac
import json
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.errors import CryptoError, LocalError, RemoteError
from crypto.frame_crypto import KeyUpdate, SFrameReceiver, SFrameSender, apply_key_update
from crypto.handshake import (
    HANDLERS,
    CommitmentMismatch,
    Exchange,
    HandshakeDecryptionFailed,
    HandshakeResult,
    HandshakeState,
    Initiator,
    NoCommonSuite,
    Party,
    PeerCheck,
    Responder,
    handshake_keys,
    initiator_transcript_hash,
    render_sas,
    seal_auth,
    signed_content,
)
from crypto.identity import (
    BadSignature,
    IdentityKey,
    IdentityPublicKey,
    KnownPeers,
    PinnedIdentityMismatch,
    b64decode,
    b64encode,
)
from crypto.messages import (
    AUTH_SIZE,
    HANDSHAKE_MESSAGES,
    PROTOCOL_VERSION,
    Accept,
    Auth,
    Commit,
    Confirm,
    MalformedCallMessage,
    Reveal,
    UnexpectedCallMessage,
    decode_message,
    encode_message,
)
from crypto.sealed import (
    LABEL_PREFIX,
    Role,
    WrongCall,
    length_prefixed,
    rekey_signed_content,
)
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


HUB_IDENTITIES = [(IdentityKey(identity_seed(f"hub {k}")), f"peer {k}") for k in range(50)]


def test_a_mitm_choosing_its_identities_after_both_ephemerals_cannot_change_either_sas():
    # The attack on a SAS derived under T: the hub, between alice (initiator) and bob
    # (responder), fixes its ephemerals, sees both honest ones, and only then picks the
    # identity key and name it signs with on each leg, from a pool, until the two SAS match.
    # Here every leg replays the same randomness (so the same four ephemerals) under 50 hub
    # identities and names: whatever it picks, each leg has one SAS, so there is nothing to
    # search, and the two legs' SAS differ.
    alice_sas, bob_sas, transcripts = set(), set(), set()
    for hub, name in HUB_IDENTITIES:
        alice, hub_responder = pair(bob=hub, bob_name=name, seed="am")
        hub_initiator, bob = pair(alice=hub, alice_name=name, seed="mb")
        alice_result, _ = run(alice, hub_responder)
        _, bob_result = run(hub_initiator, bob)
        assert (alice_result.peer_identity, bob_result.peer_identity) == (hub.public_key,) * 2
        alice_sas.add(alice_result.sas)
        bob_sas.add(bob_result.sas)
        transcripts.add(alice_result.transcript_hash)
    # The hub's choices did reach T (and so the call's keys): a pool of 50 candidates per leg
    # to search if the SAS were derived under T.
    assert len(transcripts) == len(HUB_IDENTITIES)
    assert len(alice_sas) == len(bob_sas) == 1
    assert alice_sas != bob_sas


def test_a_hub_that_makes_both_peers_initiators_cannot_choose_their_sas():
    # The hub decides who initiates: it can make both peers initiators and answer each as a
    # responder, so it learns both identities before it signs anything (what it does learn,
    # see docs/explanation/protocol.md) and picks its own identity on each leg last. With each
    # leg's ephemerals fixed, its pick changes neither SAS.
    alice_sas, bob_sas = set(), set()
    for hub, name in HUB_IDENTITIES:
        alice, hub_for_alice = pair(bob=hub, bob_name=name, seed="ai")
        bob, hub_for_bob = pair(alice=BOB, alice_name="bob", bob=hub, bob_name=name, seed="bi")
        alice_result, hub_a = run(alice, hub_for_alice)
        bob_result, hub_b = run(bob, hub_for_bob)
        assert (hub_a.peer_name, hub_b.peer_name) == ("alice", "bob")
        alice_sas.add(alice_result.sas)
        bob_sas.add(bob_result.sas)
    assert len(alice_sas) == len(bob_sas) == 1
    assert alice_sas != bob_sas


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


def reseal_reveal(
    reveal: dict[str, Any],
    commit: dict[str, Any],
    accept: dict[str, Any],
    ephemeral: X25519PrivateKey,
    signer: IdentityKey,
    name: str,
    identity: IdentityPublicKey | None = None,
) -> dict[str, Any]:
    """A reveal as a dishonest initiator that knows ``ephemeral``'s private key would send
    it: any name, ``signer``'s signature and (unless another ``identity`` is claimed)
    public key, under the right handshake key."""
    exchange = Exchange(
        offered=tuple(CipherSuite(code) for code in commit["suites"]),
        chosen=CipherSuite(accept["suite"]),
        call_id=commit["call_id"],
        initiator_nonce=b64decode(commit["nonce"]),
        responder_nonce=b64decode(accept["nonce"]),
        initiator_ephemeral=ephemeral.public_key().public_bytes_raw(),
        responder_ephemeral=b64decode(accept["ephemeral"]),
    )
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(exchange.responder_ephemeral))
    keys = handshake_keys(shared, exchange.hash())
    me = Party(signer.public_key, name)
    signature = signer.sign(signed_content(Role.INITIATOR, initiator_transcript_hash(exchange, me)))
    claimed = signer.public_key if identity is None else identity
    auth = seal_auth(keys, Role.INITIATOR, Auth(claimed, name, signature))
    return dict(
        reveal,
        ephemeral=b64encode(exchange.initiator_ephemeral),
        auth=b64encode(auth),
    )


@pytest.mark.parametrize(("message", "failed"), [("reveal", "responder"), ("confirm", "initiator")])
def test_a_hub_that_alters_an_encrypted_identity_gets_nothing_pinned_by_the_receiver(
    message, failed
):
    # In v1 the hub could rewrite a clear name (to get bob's key pinned under "eve"); now the
    # identity and name are encrypted and authenticated: any change fails to open.
    def alter(name, relayed):
        if name == message:
            data = bytearray(b64decode(relayed["auth"]))
            data[len(data) // 2] ^= 0x01
            relayed["auth"] = b64encode(bytes(data))
        return relayed

    alice_seen, alice_check = recording_pins()
    bob_seen, bob_check = recording_pins()
    initiator, responder = pair(alice_check=alice_check, bob_check=bob_check)
    with pytest.raises(HandshakeDecryptionFailed):
        run(initiator, responder, alter)
    machine = responder if failed == "responder" else initiator
    assert machine.state is HandshakeState.FAILED
    assert (alice_seen if failed == "initiator" else bob_seen) == []


def test_the_pin_check_gets_the_name_the_peer_signed():
    # A key agreement with Mallory's own key is pinned under the name Mallory signed.
    alice_seen, alice_check = recording_pins()
    alice, mallory = pair(bob=MALLORY, bob_name="mallory", alice_check=alice_check)
    run(alice, mallory)
    assert alice_seen == [("mallory", MALLORY.public_key)]


@pytest.mark.parametrize(
    "bad_name", ["", "x" * 257, "bob\nalice", "tab\there", "\x00", "\u202ebob"]
)
def test_malformed_names_are_rejected(bad_name):
    # Only the peer itself can put a name in its encrypted identity: an authenticated but
    # misbehaving initiator, here, with a valid signature over its bad name.
    recorded = {}

    def lie(name, message):
        recorded[name] = message
        if name == "reveal":
            ephemeral = X25519PrivateKey.from_private_bytes(seeded_random("s/i")(32))
            return reseal_reveal(
                message, recorded["commit"], recorded["accept"], ephemeral, ALICE, bad_name
            )
        return message

    with pytest.raises(MalformedCallMessage, match="'name'"):
        run(*pair(), lie)
    with pytest.raises(LocalError, match="own name"):
        Initiator(ALICE, "c", [GCM], seeded_random("x"), name=bad_name)
    with pytest.raises(LocalError, match="own name"):
        Responder(BOB, "c", [GCM], seeded_random("x"), name=bad_name)
    with pytest.raises(LocalError, match="own name"):
        Initiator(ALICE, "c", [GCM], seeded_random("x"), name="\ud800")


# 256 characters of 4 bytes each in UTF-8 (a CJK ideograph of Extension B): the longest name.
BIGGEST_NAME = "\U00020000" * 256


@pytest.mark.parametrize(
    "good_name", ["b", "x" * 256, "Zoë Ångström", "Bob Smith 2", "名前", BIGGEST_NAME]
)
def test_printable_names_up_to_256_characters_are_accepted(good_name):
    mine, theirs = run(*pair(alice_name=good_name, bob_name=good_name))
    assert mine.peer_name == theirs.peer_name == good_name


# -- what the hub learns --------------------------------------------------------------------


def _relayed_text(tamper_run: Callable[[Tamper], object]) -> list[str]:
    seen: list[str] = []

    def record(name, message):
        seen.append(encode_message(message).decode())
        return message

    tamper_run(record)
    return seen


def _traces(key: IdentityKey, name: str) -> list[str]:
    raw = key.public_key.raw
    return [name, b64encode(raw), raw.hex(), b64encode(hashlib.sha256(raw).digest())]


def test_a_passive_hub_learns_neither_name_nor_identity_key():
    wire = _relayed_text(
        lambda record: run(*pair(alice_name="alice-q7", bob_name="bob-z3"), record)
    )
    assert len(wire) == 4
    for trace in _traces(ALICE, "alice-q7") + _traces(BOB, "bob-z3"):
        assert all(trace not in text for text in wire)


def test_the_encrypted_identities_have_one_size_whatever_the_name():
    sizes = set()
    for name in ("b", "x" * 256, BIGGEST_NAME):
        initiator, responder = pair(alice_name=name, bob_name=name)
        wire = _relayed_text(partial(run, initiator, responder))
        sizes.add(tuple(len(text) for text in wire))
    assert len(sizes) == 1


def test_an_active_hub_posing_as_responder_learns_the_initiators_identity_only():
    # The SIGMA-I trade: the initiator authenticates first, to whoever answered.
    alice, mallory = pair(bob=MALLORY, bob_name="mallory")
    mine, theirs = run(alice, mallory)
    assert (theirs.peer_identity, theirs.peer_name) == (ALICE.public_key, "alice")
    assert mine.sas == theirs.sas  # an honest call with Mallory, who showed her own key


def test_a_responder_that_refuses_the_initiator_reveals_nothing_of_itself():
    # An active hub posing as the initiator must sign first with a key of its own; a
    # responder whose pin check refuses it (e.g. it only takes calls from pinned contacts)
    # never sends its identity.
    def only_alice(name, key):
        if key != ALICE.public_key:
            raise PinnedIdentityMismatch(name, ALICE.public_key, key)

    mallory, bob = pair(alice=MALLORY, alice_name="alice", bob_check=only_alice)
    sent_by_bob: list[str] = []

    def record(name, message):
        if name in ("accept", "confirm"):
            sent_by_bob.append(encode_message(message).decode())
        return message

    with pytest.raises(PinnedIdentityMismatch):
        run(mallory, bob, record)
    assert bob.state is HandshakeState.FAILED
    assert len(sent_by_bob) == 1  # the accept: suite, nonce and ephemeral only
    for trace in _traces(BOB, "bob"):
        assert trace not in sent_by_bob[0]


def test_mitm_changing_its_ephemeral_after_seeing_the_other_is_caught_by_the_commitment():
    mallory, bob = pair(alice=MALLORY, seed="grind")
    commit = mallory.start()
    [accept] = bob.receive(commit)
    [honest_reveal] = mallory.receive(accept)
    # Mallory now knows Bob's ephemeral and picks another of her own (to steer the SAS),
    # with a reveal that is valid for it in every other respect.
    other = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    forged = reseal_reveal(honest_reveal, commit, accept, other, MALLORY, "alice")
    with pytest.raises(CommitmentMismatch):
        bob.receive(forged)
    assert bob.state is HandshakeState.FAILED


def test_swapping_an_ephemeral_breaks_the_encrypted_identity():
    # A MITM that swaps an ephemeral but cannot compute the new handshake keys cannot
    # produce an identity that opens.
    def swap(name, message):
        if name == "accept":
            message["ephemeral"] = b64encode(bytes(range(1, 33)))
        return message

    initiator, responder = pair()
    with pytest.raises(HandshakeDecryptionFailed):
        run(initiator, responder, swap)
    assert responder.state is HandshakeState.FAILED


def test_a_signature_that_does_not_cover_the_transcript_is_refused():
    # An initiator (honest about its ephemeral) that signs another transcript: the
    # encrypted identity opens, the signature does not verify.
    recorded = {}

    def resign(name, message):
        recorded[name] = message
        if name == "reveal":
            ephemeral = X25519PrivateKey.from_private_bytes(seeded_random("s/i")(32))
            # Alice's key and name, Mallory's signature.
            return reseal_reveal(
                message,
                recorded["commit"],
                recorded["accept"],
                ephemeral,
                MALLORY,
                "alice",
                identity=ALICE.public_key,
            )
        return message

    with pytest.raises(BadSignature):
        run(*pair(), resign)


def _flip(field: str, value: Any) -> Any:
    if field == "v":
        return PROTOCOL_VERSION - 1
    if isinstance(value, str):
        try:
            data = bytearray(b64decode(value))
        except ValueError:
            return value + "x"  # the call id
        data[0] ^= 0x01
        return b64encode(bytes(data))
    if isinstance(value, list):
        return list(reversed(value))
    return int(CTR80) if value == int(GCM) else int(GCM)  # a suite


# (message, field) -> (error, the party that raises it). Whatever changes the exchange
# (suites, nonces, ephemerals) gives the two sides different handshake keys, so the
# initiator's encrypted identity no longer opens.
FLIPS = {
    ("commit", "suites"): (HandshakeDecryptionFailed, "responder"),
    ("commit", "nonce"): (CommitmentMismatch, "responder"),
    ("commit", "commitment"): (CommitmentMismatch, "responder"),
    ("accept", "suite"): (HandshakeDecryptionFailed, "responder"),
    ("accept", "nonce"): (HandshakeDecryptionFailed, "responder"),
    ("accept", "ephemeral"): (HandshakeDecryptionFailed, "responder"),
    ("reveal", "ephemeral"): (CommitmentMismatch, "responder"),
    ("reveal", "auth"): (HandshakeDecryptionFailed, "responder"),
    ("confirm", "auth"): (HandshakeDecryptionFailed, "initiator"),
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
        failed.receive({"v": PROTOCOL_VERSION})


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
    with pytest.raises(HandshakeDecryptionFailed):
        bob.receive(recorded["reveal"])  # encrypted for the earlier call's ephemeral


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
    st.binary(min_size=32, max_size=32).map(b64encode)  # nonce, ephemeral, commitment
    | st.binary(min_size=AUTH_SIZE, max_size=AUTH_SIZE).map(b64encode)  # an identity
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
    messages, call_id = vectors["messages"], vectors["inputs"]["call_id"]
    alice_random, bob_random = seeded_random("alice"), seeded_random("bob")
    alice_ephemeral = X25519PrivateKey.from_private_bytes(alice_random(32))
    bob_ephemeral = X25519PrivateKey.from_private_bytes(bob_random(32))
    e_i = alice_ephemeral.public_key().public_bytes_raw()
    e_r = bob_ephemeral.public_key().public_bytes_raw()
    n_i, n_r = alice_random(32), bob_random(32)
    assert (n_i, n_r) == (
        b64decode(messages["commit"]["nonce"]),
        b64decode(messages["accept"]["nonce"]),
    )
    assert b64decode(messages["reveal"]["ephemeral"]) == e_i
    assert b64decode(messages["accept"]["ephemeral"]) == e_r
    committed = length_prefixed(call_id.encode(), n_i, e_i)
    assert hashlib.sha256(b"blindhub-v2 commit" + committed).digest() == b64decode(
        messages["commit"]["commitment"]
    )
    exchange_parts = [
        (2).to_bytes(2, "big"),
        bytes([int(GCM), int(CTR80)]),
        bytes([int(GCM)]),
        call_id.encode(),
        n_i,
        n_r,
        e_i,
        e_r,
    ]
    exchange_hash = hashlib.sha256(
        b"blindhub-v2 exchange" + length_prefixed(*exchange_parts)
    ).digest()
    shared = alice_ephemeral.exchange(bob_ephemeral.public_key())
    handshake_prk = hmac.new(exchange_hash, shared, hashlib.sha256).digest()

    def expand(prk: bytes, info: bytes) -> bytes:  # HKDF-Expand to 32 bytes: one HMAC
        return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()

    def open_identity(sender: bytes, message: dict[str, Any]) -> tuple[bytes, str, bytes]:
        key = expand(handshake_prk, b"blindhub-v2 auth " + sender)
        plaintext = AESGCM(key).decrypt(
            bytes(12), b64decode(message["auth"]), b"blindhub-v2 auth " + sender
        )
        assert len(plaintext) == 32 + 64 + 2 + 1024
        length = int.from_bytes(plaintext[96:98], "big")
        assert not any(plaintext[98 + length :])
        return plaintext[:32], plaintext[98 : 98 + length].decode(), plaintext[32:96]

    names = (vectors["inputs"]["initiator_name"], vectors["inputs"]["responder_name"])
    id_i, name_i, sig_i = open_identity(b"initiator", messages["reveal"])
    id_r, name_r, sig_r = open_identity(b"responder", messages["confirm"])
    assert (id_i, id_r) == (ALICE.public_key.raw, BOB.public_key.raw)
    assert (name_i, name_r) == names
    initiator_part = [id_i, name_i.encode()]
    t_i = hashlib.sha256(
        b"blindhub-v2 transcript initiator" + length_prefixed(*exchange_parts, *initiator_part)
    ).digest()
    ALICE.public_key.verify(b"blindhub-v2 signature initiator" + t_i, sig_i)
    transcript = hashlib.sha256(
        b"blindhub-v2 transcript"
        + length_prefixed(*exchange_parts, *initiator_part, id_r, name_r.encode())
    ).digest()
    assert transcript.hex() == vectors["transcript_hash"]
    BOB.public_key.verify(b"blindhub-v2 signature responder" + transcript, sig_r)
    # The SAS is under X (the handshake keys' PRK), the call's keys under T.
    assert render_sas(expand(handshake_prk, b"blindhub-v2 sas")) == vectors["sas"]
    prk = hmac.new(transcript, shared, hashlib.sha256).digest()
    epoch0 = expand(prk, b"blindhub-v2 epoch" + bytes(4))
    assert (
        expand(epoch0, b"blindhub-v2 seal initiator").hex() == vectors["epoch0"]["seal_initiator"]
    )
    # The sealed message opens with the published key and the documented nonce and AAD.
    sealed = vectors["sealed"]["message"]
    associated = (
        b"blindhub-v2 sealed" + length_prefixed(call_id.encode()) + b"I" + bytes(4) + bytes(8)
    )
    plaintext = AESGCM(bytes.fromhex(vectors["epoch0"]["seal_initiator"])).decrypt(
        bytes(12), b64decode(sealed["ciphertext"]), associated
    )
    assert json.loads(plaintext) == {"kind": "app", "content": vectors["sealed"]["content"]}
    # The rekey legs are signed by the identity keys over the call, T, the epoch and the
    # ephemerals; each travels sealed under the sender's sealing key (request and ack in
    # epoch 0, the done in epoch 1).
    rekey = vectors["rekey"]["messages"]

    def inner(message: dict[str, Any], sender: bytes, epoch: dict[str, Any]) -> Any:
        seal_key = epoch["seal_initiator" if sender == b"I" else "seal_responder"]
        aad = (
            b"blindhub-v2 sealed"
            + length_prefixed(call_id.encode())
            + sender
            + message["epoch"].to_bytes(4, "big")
            + message["seq"].to_bytes(8, "big")
        )
        nonce = bytes(4) + message["seq"].to_bytes(8, "big")
        return json.loads(
            AESGCM(bytes.fromhex(seal_key)).decrypt(nonce, b64decode(message["ciphertext"]), aad)
        )

    request = inner(rekey["rekey"], b"I", vectors["epoch0"])
    ack = inner(rekey["rekey-ack"], b"R", vectors["epoch0"])
    assert inner(rekey["rekey-done"], b"I", vectors["rekey"]["epoch1"]) == {
        "kind": "rekey-done",
        "epoch": 1,
    }
    a_new, b_new = b64decode(request["ephemeral"]), b64decode(ack["ephemeral"])
    context = [call_id.encode(), transcript, (1).to_bytes(4, "big")]
    ALICE.public_key.verify(
        b"blindhub-v2 rekey initiator" + length_prefixed(*context, a_new),
        b64decode(request["signature"]),
    )
    BOB.public_key.verify(
        b"blindhub-v2 rekey-ack responder" + length_prefixed(*context, a_new, b_new),
        b64decode(ack["signature"]),
    )
    assert rekey_signed_content("rekey", Role.INITIATOR, call_id, transcript, 1, a_new) == (
        b"blindhub-v2 rekey initiator" + length_prefixed(*context, a_new)
    )
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
    assert LABEL_PREFIX == b"blindhub-v2 "


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
