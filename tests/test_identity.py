import hashlib
import json

import nacl.pwhash
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.errors import CryptoError, LocalError, RemoteError
from crypto.identity import (
    BadSignature,
    CorruptKeyFile,
    IdentityKey,
    IdentityPublicKey,
    KnownPeers,
    MalformedIdentityKey,
    PinnedIdentityMismatch,
    UnknownPeer,
    WrongPassphrase,
    b64decode,
    b64encode,
    decode_identity_file,
    encode_identity_file,
    is_passphrase_protected,
    safety_number,
)
from tests.vectors.make_handshake_vectors import seeded_random

FAST_ARGON2 = {
    "opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN,
    "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN,
}


ALICE = IdentityKey(bytes(range(32)))
BOB = IdentityKey(bytes(range(32, 64)))
MALLORY = IdentityKey(bytes(range(64, 96)))


def test_sign_verify_and_tamper():
    signature = ALICE.sign(b"transcript")
    ALICE.public_key.verify(b"transcript", signature)
    with pytest.raises(BadSignature):
        ALICE.public_key.verify(b"transcripT", signature)
    with pytest.raises(BadSignature):
        BOB.public_key.verify(b"transcript", signature)
    with pytest.raises(BadSignature):
        ALICE.public_key.verify(b"transcript", signature[:-1])
    assert issubclass(BadSignature, RemoteError)


def test_public_key_size_is_checked():
    with pytest.raises(MalformedIdentityKey):
        IdentityPublicKey(b"\x00" * 31)


def test_reprs_hide_the_seed():
    text = repr(ALICE) + repr(ALICE.public_key)
    assert ALICE.public_key.fingerprint() in text
    assert ALICE.seed().hex() not in text and b64encode(ALICE.seed()) not in text


def test_fingerprint_is_openssh_style():
    fingerprint = ALICE.public_key.fingerprint()
    assert fingerprint.startswith("SHA256:") and len(fingerprint) == 7 + 43
    assert fingerprint != BOB.public_key.fingerprint()


def test_safety_number_shape_and_order_independence():
    number = safety_number(ALICE.public_key, BOB.public_key)
    assert number == safety_number(BOB.public_key, ALICE.public_key)
    groups = number.split(" ")
    assert len(groups) == 14 and all(len(g) == 5 and g.isdigit() for g in groups)
    # Each party contributes 7 groups (116 bits); changing one key changes its half only.
    other = safety_number(ALICE.public_key, MALLORY.public_key).split(" ")
    assert len(set(groups) & set(other)) >= 7
    assert number != " ".join(other)


def test_safety_number_digits_are_uniform():
    # 2,000 groups of 5 digits from 286 keys: the leading digit should be ~uniform.
    counts = [0] * 10
    for index in range(143):
        a = IdentityKey(hashlib.sha256(b"a%d" % index).digest()).public_key
        b = IdentityKey(hashlib.sha256(b"b%d" % index).digest()).public_key
        for group in safety_number(a, b).split(" "):
            counts[int(group[0])] += 1
    expected = sum(counts) / 10
    chi_square = sum((count - expected) ** 2 / expected for count in counts)
    assert chi_square < 27.9  # p = 0.001 for 9 degrees of freedom


def test_key_file_round_trip_plain():
    data = encode_identity_file(ALICE, None, seeded_random("plain"))
    assert not is_passphrase_protected(data)
    assert decode_identity_file(data, None).public_key == ALICE.public_key


def test_key_file_round_trip_with_passphrase():
    data = encode_identity_file(ALICE, b"correct horse", seeded_random("pw"), **FAST_ARGON2)
    assert is_passphrase_protected(data)
    assert b64encode(ALICE.seed()) not in data.decode()
    assert decode_identity_file(data, b"correct horse").public_key == ALICE.public_key
    with pytest.raises(WrongPassphrase):
        decode_identity_file(data, b"battery staple")
    with pytest.raises(WrongPassphrase):
        decode_identity_file(data, None)


def test_key_file_with_swapped_public_key_is_corrupt():
    document = json.loads(encode_identity_file(ALICE, None, seeded_random("x")))
    document["public_key"] = b64encode(BOB.public_key.raw)
    with pytest.raises(CorruptKeyFile, match="does not match"):
        decode_identity_file(json.dumps(document).encode(), None)


def test_key_file_with_flipped_sealed_seed_is_rejected():
    document = json.loads(encode_identity_file(ALICE, b"pw", seeded_random("y"), **FAST_ARGON2))
    sealed = bytearray(b64decode(document["sealed_seed"]))
    sealed[-1] ^= 1
    document["sealed_seed"] = b64encode(bytes(sealed))
    with pytest.raises(WrongPassphrase):
        decode_identity_file(json.dumps(document).encode(), b"pw")


def test_key_file_with_huge_argon2_cost_is_corrupt_not_slow():
    document = json.loads(encode_identity_file(ALICE, b"pw", seeded_random("z"), **FAST_ARGON2))
    document["argon2id"]["memlimit"] = 1 << 40
    with pytest.raises(CorruptKeyFile, match="out of range"):
        decode_identity_file(json.dumps(document).encode(), b"pw")


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff", b"[]", b"{}", b'{"kind": "blindhub-identity", "version": 1}', b"x" * 5000],
)
def test_corrupt_key_files(data):
    with pytest.raises(CorruptKeyFile):
        decode_identity_file(data, None)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300) | st.recursive(st.none() | st.integers() | st.text(), st.lists))
def test_key_file_decoder_raises_only_typed_errors(value):
    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    with pytest.raises(CryptoError):
        decode_identity_file(data, b"pw")


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["kind", "version", "protection", "public_key", "seed", "argon2id"]),
        st.none()
        | st.integers()
        | st.text(max_size=50)
        | st.dictionaries(st.text(), st.integers()),
    )
)
def test_key_file_decoder_on_near_miss_documents(document):
    document.setdefault("kind", "blindhub-identity")
    document.setdefault("version", 1)
    with pytest.raises((CorruptKeyFile, WrongPassphrase)):
        decode_identity_file(json.dumps(document).encode(), b"pw")


def test_known_peers_pin_on_first_sight_then_hard_failure():
    peers = KnownPeers()
    pin = peers.check("bob", BOB.public_key)
    assert pin.public_key == BOB.public_key and not pin.verified
    assert peers.check("bob", BOB.public_key) == pin
    with pytest.raises(PinnedIdentityMismatch) as failure:
        peers.check("bob", MALLORY.public_key)
    message = str(failure.value)
    assert BOB.public_key.fingerprint() in message
    assert MALLORY.public_key.fingerprint() in message
    assert peers.get("bob") == pin  # never replaced silently


def test_known_peers_list_verify_remove_and_round_trip():
    peers = KnownPeers()
    peers.check("bob", BOB.public_key)
    peers.check("alice", ALICE.public_key)
    assert peers.mark_verified("bob").verified
    assert [pin.name for pin in peers] == ["alice", "bob"]
    restored = KnownPeers.decode(peers.encode())
    assert list(restored) == list(peers)
    restored.remove("bob")
    assert restored.check("bob", MALLORY.public_key).public_key == MALLORY.public_key
    with pytest.raises(UnknownPeer):
        restored.remove("carol")
    with pytest.raises(UnknownPeer):
        restored.mark_verified("carol")
    assert issubclass(UnknownPeer, LocalError)


@pytest.mark.parametrize(
    "data",
    [
        b"{}",
        b'{"kind": "blindhub-known-peers", "version": 1, "peers": 3}',
        b'{"kind": "blindhub-known-peers", "version": 1, "peers": [{"name": "x"}]}',
        b'{"kind": "blindhub-known-peers", "version": 1, "peers": '
        b'[{"name": "x", "public_key": "AA", "verified": false}]}',
    ],
)
def test_corrupt_known_peers_files(data):
    with pytest.raises(CorruptKeyFile):
        KnownPeers.decode(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_known_peers_decoder_raises_only_typed_errors(data):
    with pytest.raises(CorruptKeyFile):
        KnownPeers.decode(data)


@pytest.mark.parametrize("text", ["AA=", "A", "AB", "A+", "A/", " AA", 3])
def test_b64decode_is_strict(text):
    with pytest.raises(ValueError):
        b64decode(text)
