"""Each typed call message: parse(encode()) is the identity, and each bad field its error."""

import json
from typing import Any

import pytest

from crypto.identity import IdentityKey, b64encode
from crypto.messages import (
    AUTH_PLAINTEXT_SIZE,
    AUTH_SIZE,
    HANDSHAKE_MESSAGES,
    INNER_MESSAGES,
    Accept,
    App,
    Auth,
    Commit,
    Confirm,
    MalformedCallMessage,
    Rekey,
    RekeyAck,
    RekeyDone,
    Reveal,
    Sealed,
    SenderKeyAck,
    SenderKeyMessage,
    UnexpectedCallMessage,
    decode_message,
    encode_message,
)
from crypto.sender_keys import SenderKey
from crypto.sframe import CipherSuite
from tests.vectors.make_handshake_vectors import VECTORS_PATH, identity_seed

GCM, CTR80 = CipherSuite.AES_128_GCM_SHA256_128, CipherSuite.AES_128_CTR_HMAC_SHA256_80
ALICE = IdentityKey(identity_seed("alice")).public_key
B32, B64 = bytes(range(32)), bytes(range(64))

AUTH = bytes(AUTH_SIZE)
ENVELOPED = [
    Commit("call-1", (GCM, CTR80), B32, B32),
    Accept("call-1", GCM, B32, B32),
    Reveal("call-1", B32, AUTH),
    Confirm("call-1", AUTH),
    Sealed(3, 7, b"ciphertext"),
]
INNER = [
    App({"type": "offer", "sdp": "v=0"}),
    Rekey(1, B32, B64),
    RekeyAck(1, B32, B64),
    RekeyDone(1),
    SenderKeyMessage(SenderKey(GCM, 2, 3, B32)),
    SenderKeyAck((2 << 8) | 3),
]
MESSAGES: list[Any] = [*ENVELOPED, *INNER]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda message: type(message).__name__)
def test_parse_of_encode_is_the_message_through_json_text(message):
    wire = decode_message(encode_message(message.encode()))
    assert type(message).parse(wire) == message


def test_the_registries_name_every_type_by_its_wire_name():
    assert {name: cls.TYPE for name, cls in HANDSHAKE_MESSAGES.items()} == {
        "commit": "commit",
        "accept": "accept",
        "reveal": "reveal",
        "confirm": "confirm",
    }
    assert sorted(INNER_MESSAGES) == [
        "app",
        "rekey",
        "rekey-ack",
        "rekey-done",
        "sender-key",
        "sender-key-ack",
    ]


def test_encode_is_todays_wire_object():
    assert Commit("c", (GCM,), B32, B32).encode() == {
        "v": 2,
        "type": "commit",
        "call_id": "c",
        "suites": [4],
        "nonce": b64encode(B32),
        "commitment": b64encode(B32),
    }
    assert Sealed(0, 1, b"x").encode() == {
        "v": 2,
        "type": "sealed",
        "epoch": 0,
        "seq": 1,
        "ciphertext": b64encode(b"x"),
    }
    assert RekeyAck(2, B32, B64).encode() == {
        "kind": "rekey-ack",
        "epoch": 2,
        "ephemeral": b64encode(B32),
        "signature": b64encode(B64),
    }
    assert SenderKeyMessage(SenderKey(GCM, 2, 3, B32)).encode() == {
        "kind": "sender-key",
        "suite": 4,
        "generation": 2,
        "step": 3,
        "base_key": b64encode(B32),
    }
    assert SenderKeyAck(515).encode() == {"kind": "sender-key-ack", "kid": 515}


def test_the_published_vectors_parse_and_encode_back_exactly():
    vectors = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    for name, wire in vectors["messages"].items():
        assert HANDSHAKE_MESSAGES[name].parse(wire).encode() == wire
    for wire in (vectors["sealed"]["message"], *vectors["rekey"]["messages"].values()):
        assert Sealed.parse(wire).encode() == wire


# (message class, field, bad value, error text)
BAD_FIELDS = [
    (Commit, "call_id", "", "field 'call_id': a call id is 1 to 128"),
    (Commit, "call_id", "x" * 129, "field 'call_id'"),
    (Commit, "suites", [], "field 'suites': is a list of 1 to 5"),
    (Commit, "suites", [4, 4], "field 'suites': lists each suite once"),
    (Commit, "suites", [9], "field 'suites': is a registered SFrame cipher suite code"),
    (Commit, "suites", [True], "field 'suites': is a registered"),
    (Commit, "nonce", b64encode(bytes(31)), "field 'nonce': is 32 bytes"),
    (Commit, "nonce", "not base64!", "field 'nonce': not"),
    (Commit, "commitment", b64encode(bytes(33)), "field 'commitment': is 32 bytes"),
    (Accept, "call_id", None, "field 'call_id': a call id"),
    (Reveal, "call_id", "\ud800", "field 'call_id': a call id is encodable as UTF-8"),
    (Accept, "suite", 0, "field 'suite': is a registered"),
    (Accept, "suite", "4", "field 'suite': is a registered"),
    (Accept, "nonce", 5, "field 'nonce'"),
    (Accept, "ephemeral", b64encode(bytes(16)), "field 'ephemeral': is 32 bytes"),
    (Reveal, "ephemeral", None, "field 'ephemeral'"),
    (Reveal, "auth", b64encode(bytes(AUTH_SIZE - 1)), f"field 'auth': is {AUTH_SIZE} bytes"),
    (Confirm, "auth", [], "field 'auth'"),
    (Confirm, "call_id", 1, "field 'call_id': a call id"),
    (Sealed, "epoch", -1, "field 'epoch': is an integer from 0 to 2147483648"),
    (Sealed, "epoch", True, "field 'epoch': is an integer"),
    (Sealed, "seq", 2**48 + 1, "field 'seq': is an integer from 0 to 281474976710656"),
    (Sealed, "ciphertext", "A=", "field 'ciphertext'"),
    (App, "content", [1], "an application message carries one JSON object"),
    (Rekey, "epoch", "1", "the epoch of a 'rekey' message is an integer"),
    (Rekey, "ephemeral", "AA", "a rekey ephemeral is a 32-byte X25519 key"),
    (RekeyAck, "epoch", 1.0, "the epoch of a 'rekey-ack' message is an integer"),
    (RekeyAck, "ephemeral", b64encode(bytes(31)), "a rekey ephemeral is a 32-byte"),
    (Rekey, "signature", b64encode(bytes(63)), "a rekey signature is a 64-byte"),
    (RekeyAck, "signature", 64, "a rekey signature is a 64-byte"),
    (RekeyDone, "epoch", None, "the epoch of a 'rekey-done' message is an integer"),
    (SenderKeyMessage, "suite", 6, "field 'suite' of a 'sender-key' message: is a registered"),
    (SenderKeyMessage, "suite", True, "field 'suite' of a 'sender-key' message"),
    (SenderKeyMessage, "generation", -1, "field 'generation' of a 'sender-key' message: is an"),
    (SenderKeyMessage, "generation", 2**31 + 1, "field 'generation' of a 'sender-key' message"),
    (SenderKeyMessage, "generation", 1.0, "field 'generation' of a 'sender-key' message"),
    (SenderKeyMessage, "step", 2**31 + 1, "field 'step' of a 'sender-key' message: is an"),
    (SenderKeyMessage, "step", "3", "field 'step' of a 'sender-key' message"),
    (SenderKeyMessage, "base_key", "not base64!", "field 'base_key' of a 'sender-key' message: n"),
    (
        SenderKeyMessage,
        "base_key",
        b64encode(B64),
        "field 'base_key' of a 'sender-key' message: is 32",
    ),
    (SenderKeyMessage, "base_key", b64encode(bytes(16)), "field 'base_key' of a 'sender-key'"),
    (SenderKeyAck, "kid", -1, "field 'kid' of a 'sender-key-ack' message: is an integer"),
    (SenderKeyAck, "kid", 2**39 + 256, "field 'kid' of a 'sender-key-ack' message"),
    (SenderKeyAck, "kid", None, "field 'kid' of a 'sender-key-ack' message"),
]


def _valid(cls: type) -> Any:
    return next(message for message in MESSAGES if type(message) is cls)


@pytest.mark.parametrize(
    ("cls", "field", "value", "error"),
    BAD_FIELDS,
    ids=[f"{c.__name__}-{f}" for c, f, *_ in BAD_FIELDS],
)
def test_each_bad_field_is_malformed_with_its_reason(cls, field, value, error):
    wire = _valid(cls).encode()
    wire[field] = value
    with pytest.raises(MalformedCallMessage) as refused:
        cls.parse(wire)
    assert str(refused.value).startswith(error)


def test_a_sender_keys_base_key_has_the_size_of_its_suites_hash():
    wide = SenderKey(CipherSuite.AES_256_GCM_SHA512_128, 0, 0, B64)
    assert SenderKeyMessage.parse(SenderKeyMessage(wide).encode()).key == wide
    narrow = SenderKeyMessage(SenderKey(GCM, 0, 0, B32)).encode() | {"suite": 5}
    with pytest.raises(MalformedCallMessage, match=r"'base_key' .* is 64 bytes for its suite"):
        SenderKeyMessage.parse(narrow)


def test_every_field_of_every_message_has_a_bad_value_above():
    fields = {(cls, field) for cls, field, *_ in BAD_FIELDS}
    for message in MESSAGES:
        names = set(message.encode()) - {"v", "type", "kind"}
        assert {(type(message), name) for name in names} <= fields


@pytest.mark.parametrize("message", MESSAGES, ids=lambda message: type(message).__name__)
def test_an_extra_or_missing_field_is_malformed(message):
    extra = message.encode() | {"extra": 1}
    missing = message.encode()
    del missing[next(name for name in missing if name not in ("v", "type", "kind"))]
    for wire in (extra, missing):
        with pytest.raises(MalformedCallMessage, match="fields"):
            type(message).parse(wire)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda message: type(message).__name__)
def test_a_well_formed_message_of_another_type_is_unexpected(message):
    other = next(
        m for m in MESSAGES if type(m) is not type(message) and (m in INNER) == (message in INNER)
    )
    with pytest.raises(UnexpectedCallMessage, match="expected a"):
        type(message).parse(other.encode())


@pytest.mark.parametrize("cls", [type(message) for message in MESSAGES])
@pytest.mark.parametrize("value", [[], "text", None, 1])
def test_what_is_not_an_object_is_malformed(cls, value):
    with pytest.raises(MalformedCallMessage, match="JSON object"):
        cls.parse(value)


@pytest.mark.parametrize("message", ENVELOPED, ids=lambda message: type(message).__name__)
def test_a_wrong_version_is_malformed(message):
    for version in (1, 3, "2", True, None):
        with pytest.raises(MalformedCallMessage, match="version"):
            type(message).parse(message.encode() | {"v": version})


# -- the encrypted identity's plaintext -----------------------------------------------------


# The last: 256 characters of 4 bytes each in UTF-8 (CJK Extension B), the longest name.
@pytest.mark.parametrize("name", ["b", "Zoë", "x" * 256, "\U00020000" * 256])
def test_an_identity_plaintext_has_one_size_and_round_trips(name):
    auth = Auth(ALICE, name, B64)
    assert len(auth.encode()) == AUTH_PLAINTEXT_SIZE
    assert Auth.parse(auth.encode()) == auth


def _plaintext(name: bytes, padding: bytes = b"") -> bytes:
    field = len(name).to_bytes(2, "big") + name + padding
    return ALICE.raw + B64 + field.ljust(AUTH_PLAINTEXT_SIZE - 96, b"\0")


@pytest.mark.parametrize(
    ("plaintext", "error"),
    [
        (_plaintext(b"alice")[:-1], "an identity plaintext is"),
        (_plaintext(b"alice", b"\x01"), "pads its name with zero bytes"),
        (ALICE.raw + B64 + (1100).to_bytes(2, "big") + bytes(1024), "pads its name"),
        (_plaintext(b""), "field 'name': is 1 to 256"),
        (_plaintext(b"\xff\xfe"), "field 'name'"),
        (_plaintext(b"a\nb"), "field 'name': is printable"),
        (_plaintext(b"x" * 257), "field 'name': is 1 to 256"),
    ],
)
def test_a_bad_identity_plaintext_is_malformed(plaintext, error):
    with pytest.raises(MalformedCallMessage, match=error):
        Auth.parse(plaintext)
