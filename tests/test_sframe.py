import json
import random
import tracemalloc
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.errors import CryptoError, LocalError, RemoteError
from crypto.sframe import (
    AuthenticationError,
    CipherSuite,
    CounterExhaustedError,
    MalformedHeaderError,
    ReceiveContext,
    ReplayError,
    SendContext,
    SFrameError,
    SFrameHeader,
    SFrameUsageError,
    UnknownKeyError,
    derive_key_salt,
    make_aead,
    ratchet_base_key,
    sender_key_kid,
)

VECTORS = json.loads((Path(__file__).parent / "vectors/sframe/test-vectors.json").read_text())
SUITES = list(CipherSuite)
KEY = bytes(range(16))
OTHER_KEY = bytes(range(100, 132))


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def pair(
    suite: CipherSuite, kid: int = 7, replay_window: int = 128
) -> tuple[SendContext, ReceiveContext]:
    sender = SendContext(suite)
    sender.add_key(kid, KEY)
    receiver = ReceiveContext(suite, replay_window=replay_window)
    receiver.add_key(kid, KEY)
    return sender, receiver


# --- the official RFC 9605 vectors, both directions -----------------------------


@pytest.mark.parametrize("case", VECTORS["header"], ids=lambda c: f"{c['kid']}-{c['ctr']}")
def test_header_vectors(case):
    header = SFrameHeader(case["kid"], case["ctr"])
    assert bytes(header).hex() == case["encoded"]
    assert SFrameHeader.parse(h(case["encoded"]) + b"payload") == (
        header,
        len(case["encoded"]) // 2,
    )


@pytest.mark.parametrize("case", VECTORS["aes_ctr_hmac"], ids=lambda c: str(c["cipher_suite"]))
def test_aes_ctr_hmac_vectors(case):
    suite = CipherSuite(case["cipher_suite"])
    assert h(case["key"]) == h(case["enc_key"]) + h(case["auth_key"])
    aead = make_aead(suite, h(case["key"]))
    assert aead.encrypt(h(case["nonce"]), h(case["pt"]), h(case["aad"])) == h(case["ct"])
    assert aead.decrypt(h(case["nonce"]), h(case["ct"]), h(case["aad"])) == h(case["pt"])


@pytest.mark.parametrize("suite", SUITES)
def test_make_aead_is_the_contexts_aead_and_raises_invalid_tag(suite):
    key, salt = derive_key_salt(suite, 7, KEY)
    aead = make_aead(suite, key)
    sender = SendContext(suite)
    sender.add_key(7, KEY)
    sframe_ciphertext = sender.protect(7, b"frame", b"meta")
    header, header_length = SFrameHeader.parse(sframe_ciphertext)
    nonce = (int.from_bytes(salt, "big") ^ header.ctr).to_bytes(12, "big")
    aad = sframe_ciphertext[:header_length] + b"meta"
    body = sframe_ciphertext[header_length:]
    assert aead.decrypt(nonce, body, aad) == b"frame"
    assert aead.encrypt(nonce, b"frame", aad) == body
    tampered = body[:-1] + bytes([body[-1] ^ 1])
    for forged in (tampered, body[: suite.nt - 1], b""):
        with pytest.raises(InvalidTag):
            aead.decrypt(nonce, forged, aad)
    with pytest.raises(SFrameUsageError, match="byte AEAD key"):
        make_aead(suite, key[:-1])


@pytest.mark.parametrize("case", VECTORS["sframe"], ids=lambda c: str(c["cipher_suite"]))
def test_sframe_vectors(case):
    suite = CipherSuite(case["cipher_suite"])
    kid, ctr, base_key = case["kid"], case["ctr"], h(case["base_key"])
    context = kid.to_bytes(8, "big") + suite.to_bytes(2, "big")
    assert h(case["sframe_key_label"]) == b"SFrame 1.0 Secret key " + context
    assert h(case["sframe_salt_label"]) == b"SFrame 1.0 Secret salt " + context
    key, salt = derive_key_salt(suite, kid, base_key)
    assert (key.hex(), salt.hex()) == (case["sframe_key"], case["sframe_salt"])
    nonce = (int.from_bytes(salt, "big") ^ ctr).to_bytes(suite.nn, "big")
    assert nonce.hex() == case["nonce"]
    assert bytes(SFrameHeader(kid, ctr)) + h(case["metadata"]) == h(case["aad"])

    sender = SendContext(suite)
    sender.add_key(kid, base_key, next_counter=ctr)
    assert sender.protect(kid, h(case["pt"]), h(case["metadata"])).hex() == case["ct"]
    receiver = ReceiveContext(suite)
    receiver.add_key(kid, base_key)
    assert receiver.unprotect(h(case["ct"]), h(case["metadata"])) == h(case["pt"])


def test_suite_constants_match_rfc_table():
    table = {suite: (suite.nh, suite.nk, suite.nn, suite.nt) for suite in CipherSuite}
    assert table == {
        CipherSuite.AES_128_CTR_HMAC_SHA256_80: (32, 48, 12, 10),
        CipherSuite.AES_128_CTR_HMAC_SHA256_64: (32, 48, 12, 8),
        CipherSuite.AES_128_CTR_HMAC_SHA256_32: (32, 48, 12, 4),
        CipherSuite.AES_128_GCM_SHA256_128: (32, 16, 12, 16),
        CipherSuite.AES_256_GCM_SHA512_128: (64, 32, 12, 16),
    }


# --- header -----------------------------------------------------------------------


@given(st.binary(max_size=20))
@settings(max_examples=300)
def test_header_parser_only_raises_malformed(data):
    try:
        header, length = SFrameHeader.parse(data)
    except MalformedHeaderError:
        return
    assert bytes(header) == data[:length]


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
@settings(max_examples=200)
def test_header_round_trip_and_every_truncation_rejected(kid, ctr):
    encoded = bytes(SFrameHeader(kid, ctr))
    assert SFrameHeader.parse(encoded) == (SFrameHeader(kid, ctr), len(encoded))
    for cut in range(len(encoded)):
        with pytest.raises(MalformedHeaderError):
            SFrameHeader.parse(encoded[:cut])


@pytest.mark.parametrize("suite", [CipherSuite.AES_128_GCM_SHA256_128])
@given(kid=st.integers(0, 2**64 - 1), ctr=st.integers(0, 2**64 - 1))
@settings(max_examples=200)
def test_sent_header_is_the_canonical_header(suite, kid, ctr):
    sender = SendContext(suite)
    sender.add_key(kid, KEY, next_counter=ctr)
    for offset in range(min(3, 2**64 - ctr)):  # also across a CTR length boundary
        ciphertext = sender.protect(kid, b"frame")
        expected = bytes(SFrameHeader(kid, ctr + offset))
        assert ciphertext[: len(expected)] == expected


@pytest.mark.parametrize("boundary", [7, 255, 2**16 - 1, 2**56 - 1])
def test_sent_header_grows_at_ctr_length_boundaries(boundary):
    sender = SendContext(CipherSuite.AES_128_GCM_SHA256_128)
    sender.add_key(9, KEY, next_counter=boundary)
    before, after = sender.protect(9, b""), sender.protect(9, b"")
    assert SFrameHeader.parse(before)[0] == SFrameHeader(9, boundary)
    assert SFrameHeader.parse(after) == (SFrameHeader(9, boundary + 1), len(before) - 16 + 1)


@pytest.mark.parametrize(
    "encoded",
    [
        "80" + "05",  # extended KID holding a value that fits in the config byte
        "08" + "07",  # same for CTR
        "90" + "0009",  # two-byte KID with a leading zero
        "09" + "0009",  # two-byte CTR with a leading zero
    ],
)
def test_non_minimal_header_rejected(encoded):
    with pytest.raises(MalformedHeaderError, match="not minimally encoded"):
        SFrameHeader.parse(h(encoded))


# Config bytes with the KID inline and the CTR extended, followed by up to 9 bytes.
_USUAL_HEADERS = st.builds(
    lambda config, rest: bytes([config]) + rest,
    st.sampled_from([config for config in range(0x80) if config & 0x08]),
    st.binary(max_size=9),
)


@given(st.binary(max_size=12) | _USUAL_HEADERS)
@settings(max_examples=300)
def test_receiver_reads_headers_as_the_parser_does(data):
    # ReceiveContext parses the usual header (inline KID, extended CTR) itself: it must
    # reject exactly what SFrameHeader.parse rejects, and read the KID that it reads.
    receiver = ReceiveContext(CipherSuite.AES_128_GCM_SHA256_128)
    receiver.add_key(3, KEY)
    try:
        header, _ = SFrameHeader.parse(data)
    except MalformedHeaderError:
        expected: type[SFrameError] = MalformedHeaderError
    else:
        expected = AuthenticationError if header.kid == 3 else UnknownKeyError
    with pytest.raises(SFrameError) as failure:
        receiver.unprotect(data)
    assert type(failure.value) is expected


@pytest.mark.parametrize("values", [(-1, 0), (0, -1), (2**64, 0), (0, 2**64)])
def test_header_values_out_of_range(values):
    with pytest.raises(SFrameUsageError):
        SFrameHeader(*values)


# --- round trips and tampering -------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
@given(size=st.integers(0, 64 * 1024), seed=st.integers(0, 2**32), metadata=st.binary(max_size=32))
@settings(max_examples=15, deadline=None)
def test_round_trip_every_suite(suite, size, seed, metadata):
    plaintext = random.Random(seed).randbytes(size)
    sender, receiver = pair(suite, kid=seed % 300)
    for _ in range(2):
        ciphertext = sender.protect(seed % 300, plaintext, metadata)
        _, header_length = SFrameHeader.parse(ciphertext)
        assert len(ciphertext) == header_length + size + suite.nt
        assert receiver.unprotect(ciphertext, metadata) == plaintext


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("kid", [3, 0x1234])
def test_every_single_bit_flip_is_rejected(suite, kid):
    sender, receiver = pair(suite, kid=kid)
    sender.add_key(kid + 1, OTHER_KEY)
    for _ in range(300):  # an extended CTR
        sender.protect(kid, b"")
    plaintext, metadata = b"an encoded media frame", b"rtp metadata"
    ciphertext = sender.protect(kid, plaintext, metadata)
    rejected: dict[type, int] = {}
    for bit in range(len(ciphertext) * 8):
        tampered = bytearray(ciphertext)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SFrameError) as failure:
            receiver.unprotect(bytes(tampered), metadata)
        rejected[type(failure.value)] = rejected.get(type(failure.value), 0) + 1
    for bit in range(len(metadata) * 8):
        tampered = bytearray(metadata)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(AuthenticationError):
            receiver.unprotect(ciphertext, bytes(tampered))
    with pytest.raises(AuthenticationError):
        receiver.unprotect(ciphertext, metadata + b"x")
    assert rejected[AuthenticationError] >= (len(plaintext) + suite.nt) * 8
    # Nothing above changed the receiver's state: the genuine frame still decrypts, once.
    assert receiver.unprotect(ciphertext, metadata) == plaintext
    with pytest.raises(ReplayError):
        receiver.unprotect(ciphertext, metadata)


@pytest.mark.parametrize("suite", SUITES)
def test_truncated_ciphertext_rejected(suite):
    sender, receiver = pair(suite)
    ciphertext = sender.protect(7, b"frame")
    for cut in range(1, len(ciphertext)):
        with pytest.raises(AuthenticationError):
            receiver.unprotect(ciphertext[:cut])
    with pytest.raises(MalformedHeaderError):
        receiver.unprotect(b"")


def test_wrong_key_and_unknown_kid():
    sender, _ = pair(CipherSuite.AES_128_GCM_SHA256_128)
    ciphertext = sender.protect(7, b"frame")
    receiver = ReceiveContext(CipherSuite.AES_128_GCM_SHA256_128)
    with pytest.raises(UnknownKeyError, match="no key for KID 7"):
        receiver.unprotect(ciphertext)
    receiver.add_key(7, OTHER_KEY)
    with pytest.raises(AuthenticationError):
        receiver.unprotect(ciphertext)
    receiver.remove_key(7)
    receiver.add_key(7, KEY)
    assert receiver.unprotect(ciphertext) == b"frame"


def test_suite_binds_the_key():
    # The KID and suite are in the key-derivation labels: same base key, other suite, no decrypt.
    sender = SendContext(CipherSuite.AES_128_CTR_HMAC_SHA256_80)
    sender.add_key(1, KEY)
    receiver = ReceiveContext(CipherSuite.AES_128_CTR_HMAC_SHA256_64)
    receiver.add_key(1, KEY)
    with pytest.raises(AuthenticationError):
        receiver.unprotect(sender.protect(1, b"frame"))


# --- replay window ---------------------------------------------------------------------


def frames(sender: SendContext, count: int, kid: int = 7) -> list[bytes]:
    return [sender.protect(kid, f"frame {i}".encode()) for i in range(count)]


def test_duplicate_rejected():
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128)
    first = sender.protect(7, b"frame")
    receiver.unprotect(first)
    with pytest.raises(ReplayError, match="already accepted"):
        receiver.unprotect(first)


def test_older_than_window_rejected():
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128, replay_window=128)
    sent = frames(sender, 200)
    receiver.unprotect(sent[150])
    with pytest.raises(ReplayError, match="older than the replay window"):
        receiver.unprotect(sent[22])  # 150 - 22 = 128: just outside
    assert receiver.unprotect(sent[23]) == b"frame 23"  # 127 behind: just inside


def test_out_of_order_inside_window_accepted_once():
    sender, receiver = pair(CipherSuite.AES_128_CTR_HMAC_SHA256_80)
    sent = frames(sender, 64)
    order = list(range(64))
    random.Random(5).shuffle(order)
    assert [receiver.unprotect(sent[i]) for i in order] == [f"frame {i}".encode() for i in order]
    for i in order:
        with pytest.raises(ReplayError):
            receiver.unprotect(sent[i])


def test_a_counter_jump_costs_no_memory_and_keeps_the_window():
    # The sender picks the CTR: a jump to 2**63 must not shift the window bitmap by 2**63 bits.
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128)
    first = sender.protect(7, b"first")
    receiver.unprotect(first)
    jumped = SendContext(CipherSuite.AES_128_GCM_SHA256_128)
    jumped.add_key(7, KEY, next_counter=2**63 - 5)
    sent = [jumped.protect(7, f"frame {i}".encode()) for i in range(6)]
    tracemalloc.start()
    try:
        assert receiver.unprotect(sent[5]) == b"frame 5"  # CTR 2**63
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert receiver.unprotect(sent[0]) == b"frame 0"  # 5 behind, inside the window
    with pytest.raises(ReplayError, match="already accepted"):
        receiver.unprotect(sent[5])
    with pytest.raises(ReplayError, match="older than the replay window"):
        receiver.unprotect(first)


def test_windows_are_per_kid():
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128)
    sender.add_key(8, OTHER_KEY)
    receiver.add_key(8, OTHER_KEY)
    for _ in range(300):
        receiver.unprotect(sender.protect(7, b"x"))
    assert receiver.unprotect(sender.protect(8, b"y")) == b"y"  # CTR 0 under KID 8


def test_forged_frame_does_not_advance_window():
    sender, receiver = pair(CipherSuite.AES_128_CTR_HMAC_SHA256_32)
    genuine = sender.protect(7, b"frame")
    forged = bytes(SFrameHeader(7, 10_000)) + bytes(30)
    with pytest.raises(AuthenticationError):
        receiver.unprotect(forged)
    assert receiver.unprotect(genuine) == b"frame"


# --- the sender's counter ------------------------------------------------------------


def test_counter_exhaustion_refuses_instead_of_wrapping():
    sender = SendContext(CipherSuite.AES_128_GCM_SHA256_128)
    sender.add_key(1, KEY, next_counter=2**64 - 1)
    last = sender.protect(1, b"last")
    assert SFrameHeader.parse(last)[0].ctr == 2**64 - 1
    with pytest.raises(CounterExhaustedError):
        sender.protect(1, b"one too many")
    with pytest.raises(CounterExhaustedError):
        sender.protect(1, b"still refused")


def test_counter_is_never_reused_for_a_key():
    sender = SendContext(CipherSuite.AES_128_GCM_SHA256_128)
    sender.add_key(1, KEY)
    used = [SFrameHeader.parse(sender.protect(1, b""))[0].ctr for _ in range(5)]
    assert used == [0, 1, 2, 3, 4]
    sender.remove_key(1)
    sender.add_key(1, KEY)  # same key again: resumes, even when asked to restart
    assert sender.next_counter(1) == 5
    sender.remove_key(1)
    sender.add_key(1, KEY, next_counter=2)
    assert sender.next_counter(1) == 5
    sender.remove_key(1)
    sender.add_key(1, OTHER_KEY)  # a different key starts at zero
    assert sender.next_counter(1) == 0


def test_send_context_misuse_is_local():
    sender = SendContext(CipherSuite.AES_128_GCM_SHA256_128)
    with pytest.raises(SFrameUsageError):
        sender.protect(1, b"no key")
    with pytest.raises(SFrameUsageError):
        sender.add_key(1, b"short")
    sender.add_key(1, KEY)
    with pytest.raises(SFrameUsageError):
        sender.add_key(1, OTHER_KEY)
    with pytest.raises(SFrameUsageError):
        sender.remove_key(2)
    with pytest.raises(SFrameUsageError):
        SendContext(9)  # type: ignore[arg-type]
    with pytest.raises(SFrameUsageError):
        ReceiveContext(CipherSuite.AES_128_GCM_SHA256_128, replay_window=0)


# --- sender keys (section 5.1) ----------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
def test_ratchet_matches_hkdf_definition(suite):
    # base_key[i+1] = HKDF-Expand(HKDF-Extract("", base_key[i]), "SFrame 1.0 Ratchet", Nh),
    # computed here with pyca's one-shot HKDF, an independent path to the same function.
    expected = HKDF(suite.hash_algorithm(), suite.nh, None, b"SFrame 1.0 Ratchet").derive(KEY)
    assert ratchet_base_key(suite, KEY) == expected
    assert len(expected) == suite.nh


def test_sender_key_kid_layout():
    assert sender_key_kid(0, 0, 8) == 0
    assert sender_key_kid(3, 5, 8) == 0x305
    assert sender_key_kid(3, 0x105, 8) == 0x305  # only the low R bits of the step
    assert sender_key_kid(2**56 - 1, 255, 8) == 2**64 - 1
    with pytest.raises(SFrameUsageError):
        sender_key_kid(2**56, 0, 8)
    with pytest.raises(SFrameUsageError):
        sender_key_kid(0, 0, 0)


def test_error_hierarchy():
    remote = [MalformedHeaderError, UnknownKeyError, AuthenticationError, ReplayError]
    local = [CounterExhaustedError, SFrameUsageError]
    for error in remote + local:
        assert issubclass(error, SFrameError) and issubclass(error, CryptoError)
        assert issubclass(error, ValueError)
    assert all(issubclass(error, RemoteError) for error in remote)
    assert all(issubclass(error, LocalError) for error in local)
    assert len(set(remote + local)) == 6


@pytest.mark.parametrize("suite", SUITES)
def test_reprs_hold_no_key_material(suite):
    sender, receiver = pair(suite)
    key, salt = derive_key_salt(suite, 7, KEY)
    objects = [sender, receiver, make_aead(suite, key)]
    objects += list(sender._keys.values()) + list(receiver._keys.values())
    secrets = [KEY, key, salt, key[:16], ratchet_base_key(suite, KEY)]
    for thing in objects:
        text = repr(thing) + str(thing)
        for secret in secrets:
            assert secret.hex() not in text and repr(secret) not in text
            assert secret.hex()[:8] not in text
