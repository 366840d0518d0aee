"""Sender keys (crypto/sender_keys.py): the RFC 9605 section 5.1 ratchet and KID layout, and a
key object whose base key stays inside."""

import copy
import hashlib
import pickle

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.frame_crypto import SFrameReceiver, SFrameSender
from crypto.sender_keys import MAX_GENERATION, MAX_STEP, RATCHET_BITS, SenderKey
from crypto.sframe import CipherSuite, SFrameHeader, SFrameUsageError

GCM = CipherSuite.AES_128_GCM_SHA256_128
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def counting_random(size: int) -> bytes:
    return hashlib.sha512(b"sender key %d" % size).digest()[:size]


def rfc_ratchet(suite: CipherSuite, base_key: bytes) -> bytes:
    """Section 5.1's formula through pyca's one-shot HKDF (Extract with no salt, then Expand),
    an implementation path independent of crypto.sframe's."""
    algorithm = {32: hashes.SHA256(), 64: hashes.SHA512()}[suite.nh]
    return HKDF(algorithm, suite.nh, salt=None, info=b"SFrame 1.0 Ratchet").derive(base_key)


# -- the ratchet and the KID -------------------------------------------------------------------


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_ratcheted_keys_follow_the_rfc_formula_and_step_the_kid(suite):
    key = SenderKey.fresh(suite, 3, random_bytes=counting_random)
    expected_base = counting_random(suite.nh)
    assert (key.suite, key.generation, key.step, key.kid) == (suite, 3, 0, 3 << 8)
    for step in range(1, 4):
        key = key.ratcheted()
        expected_base = rfc_ratchet(suite, expected_base)
        assert key == SenderKey(suite, 3, step, expected_base)
        assert (key.generation, key.step, key.kid) == (3, step, (3 << 8) | step)


def test_the_kid_carries_the_low_ratchet_bits_of_the_step():
    assert RATCHET_BITS == 8
    assert SenderKey(GCM, 0, 5, KEY).kid == 5
    assert SenderKey(GCM, 0, 256 + 5, KEY).kid == 5
    assert SenderKey(GCM, 2, 300, KEY).kid == (2 << 8) | 44
    assert SenderKey(GCM, MAX_GENERATION, MAX_STEP, KEY).kid == (MAX_GENERATION << 8)


def test_fresh_keys_are_random_and_ratcheting_is_deterministic():
    first, second = SenderKey.fresh(GCM, 0), SenderKey.fresh(GCM, 0)
    assert first != second
    assert first.ratcheted() == first.ratcheted() != second.ratcheted()


@pytest.mark.parametrize(
    ("generation", "step", "base_key"),
    [
        (-1, 0, KEY),
        (MAX_GENERATION + 1, 0, KEY),
        (0, -1, KEY),
        (0, MAX_STEP + 1, KEY),
        (True, 0, KEY),
        (0, 0, KEY[:16]),
        (0, 0, KEY + KEY),
    ],
)
def test_out_of_range_keys_are_refused(generation, step, base_key):
    with pytest.raises(SFrameUsageError):
        SenderKey(GCM, generation, step, base_key)


def test_the_last_step_does_not_ratchet_and_an_unknown_suite_is_refused():
    with pytest.raises(SFrameUsageError):
        SenderKey(GCM, 0, MAX_STEP, KEY).ratcheted()
    with pytest.raises(SFrameUsageError):
        SenderKey(9, 0, 0, KEY)  # type: ignore[arg-type]


# -- sending under a sender key -------------------------------------------------------------


def test_the_media_key_sends_under_the_kid_and_base_key():
    key = SenderKey(GCM, 1, 2, KEY).ratcheted()
    sender, receiver = SFrameSender(GCM), SFrameReceiver(GCM)
    sender.use_key(key.media_key())
    receiver.add_key(key.media_key())
    protected = sender.transform("audio")(b"frame")
    assert protected is not None
    assert SFrameHeader.parse(protected)[0].kid == key.kid == (1 << 8) | 3
    assert receiver.transform("audio")(protected) == b"frame"
    assert (key.media_key().epoch, key.media_key().kid) == (1, key.kid)


# -- the base key stays inside ---------------------------------------------------------------


def test_no_public_way_reads_a_sender_keys_base_key():
    key = SenderKey(GCM, 2, 7, KEY)
    assert not hasattr(key, "base_key") and not hasattr(key, "__dict__")
    public = [getattr(key, name) for name in dir(key) if not name.startswith("_")]
    assert all(not isinstance(value, bytes | bytearray | memoryview) for value in public)
    assert repr(key) == "SenderKey(suite=AES_128_GCM_SHA256_128, generation=2, step=7, kid=519)"
    assert KEY.hex() not in repr(key)
    with pytest.raises(AttributeError):
        key.step = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        pickle.dumps(key)
    assert copy.copy(key) is key and copy.deepcopy(key) is key


def test_sender_keys_are_equal_by_suite_generation_step_and_base_key():
    key = SenderKey(GCM, 0, 4, KEY)
    assert key == SenderKey(GCM, 0, 4, bytearray(KEY))  # type: ignore[arg-type]
    assert key != SenderKey(GCM, 0, 4, OTHER_KEY)
    assert key != SenderKey(GCM, 1, 4, KEY)
    assert key != SenderKey(GCM, 0, 5, KEY)
    assert key != SenderKey(CipherSuite.AES_128_CTR_HMAC_SHA256_80, 0, 4, KEY)
    assert len({key, SenderKey(GCM, 0, 4, KEY)}) == 1
    assert key != key.media_key()
