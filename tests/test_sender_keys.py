"""Sender keys (crypto/sender_keys.py): the RFC 9605 section 5.1 ratchet and KID layout, and a
key object whose base key stays inside."""

import copy
import hashlib
import pickle
import re

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.errors import LocalError
from crypto.frame_crypto import SFrameReceiver, SFrameSender
from crypto.identity import IdentityKey, IdentityPublicKey
from crypto.sender_keys import (
    MAX_GENERATION,
    MAX_HELD_FRAMES,
    MAX_OLD_STEPS,
    MAX_RATCHET_STEPS,
    MAX_STEP,
    RATCHET_BITS,
    HoldingFrameTransform,
    ReleasedFrame,
    SenderKey,
    SenderKeyReceiver,
    SenderKeyRejected,
    group_security_code,
)
from crypto.sframe import (
    AuthenticationError,
    CipherSuite,
    ReplayError,
    SFrameError,
    SFrameHeader,
    SFrameUsageError,
    UnknownKeyError,
    sender_key_kid,
)

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


# -- receiving: SenderKeyReceiver -------------------------------------------------------------


class Sender:
    """A group member's sending side as a call builds it: one SFrameSender, its two kinds."""

    def __init__(self, key: SenderKey) -> None:
        self.sframe = SFrameSender(key.suite)
        self.key = key
        self.sframe.use_key(key.media_key())
        self.audio, self.video = self.sframe.transform("audio"), self.sframe.transform("video")

    def switch(self, key: SenderKey) -> None:
        self.key = key
        self.sframe.use_key(key.media_key())

    def send(self, kind: str, frame: bytes) -> bytes:
        protected = (self.audio if kind == "audio" else self.video)(frame)
        assert protected is not None
        return protected


def receiver_of(
    *keys: SenderKey,
) -> tuple[SenderKeyReceiver, dict[str, HoldingFrameTransform], list[SFrameError]]:
    receiver, failures = SenderKeyReceiver(GCM), list[SFrameError]()
    transforms = {kind: receiver.transform(kind, failures.append) for kind in ("audio", "video")}
    for key in keys:
        receiver.add_key(key)
    return receiver, transforms, failures


def counts(receiver: SenderKeyReceiver, kind: str, *names: str) -> tuple[int, ...]:
    counters = receiver.counters[kind]
    return tuple(getattr(counters, name) for name in names)


def test_frames_of_an_sframe_sender_under_a_sender_key_decrypt_with_their_kind_bound():
    key = SenderKey(GCM, 2, 0, KEY)
    sender = Sender(key)
    receiver, transforms, failures = receiver_of(key)
    assert transforms["audio"](sender.send("audio", b"a0")) == b"a0"
    assert transforms["video"](sender.send("video", b"v0")) == b"v0"
    moved = sender.send("audio", b"a1")
    assert transforms["video"](moved) is None  # the kind is authenticated metadata
    assert [type(error) for error in failures] == [AuthenticationError]
    audio = receiver.counters["audio"]
    assert (audio.frames, audio.failed, audio.generations) == (1, 0, {2})
    assert receiver.counters["video"].unauthenticated == 1
    assert audio.as_dict()["generations"] == [2] and audio.as_dict()["held"] == 0


def test_a_replayed_frame_fails_as_a_replay():
    key = SenderKey(GCM, 0, 0, KEY)
    _, transforms, failures = receiver_of(key)
    frame = Sender(key).send("audio", b"once")
    assert transforms["audio"](frame) == b"once"
    assert transforms["audio"](frame) is None
    assert [type(error) for error in failures] == [ReplayError]


def test_the_receiver_follows_the_ratchet_and_keeps_recent_steps_for_late_frames():
    key = SenderKey(GCM, 0, 0, KEY)
    sender = Sender(key)
    receiver, transforms, failures = receiver_of(key)
    late = [sender.send("audio", b"step 0")]
    for step in range(1, 7):
        sender.switch(sender.key.ratcheted())
        late.append(sender.send("audio", b"step %d" % step))
        assert transforms["video"](sender.send("video", b"v%d" % step)) == b"v%d" % step
    # The audio frames arrive late, after video moved on: the newest MAX_OLD_STEPS + 1 steps'
    # keys are still there, the older ones are not.
    kept = MAX_OLD_STEPS + 1
    assert [transforms["audio"](frame) for frame in late[-kept:]] == [
        b"step %d" % step for step in range(7 - kept, 7)
    ]
    assert transforms["audio"](late[0]) is None
    assert [type(error) for error in failures] == [UnknownKeyError]
    assert receiver.kids == {sender_key_kid(0, step, RATCHET_BITS) for step in range(2, 7)}
    assert receiver.counters["audio"].generations == {0}


def test_asking_whether_a_key_authenticates_a_frame_changes_nothing():
    mine, theirs = SenderKey(GCM, 0, 0, KEY), SenderKey(GCM, 0, 0, bytes(32))
    receiver, transforms, failures = receiver_of(mine)
    sender = Sender(mine)
    frame = sender.send("audio", b"mine")
    before = receiver.counters["audio"].as_dict()
    assert receiver.authenticates("audio", frame)
    # Not one of ours, a generation not held, the next step (not followed), another kind:
    for other, kind in (
        (Sender(theirs).send("audio", b"not mine"), "audio"),
        (Sender(SenderKey(GCM, 5, 0, KEY)).send("audio", b"later"), "audio"),
        (Sender(mine.ratcheted()).send("audio", b"next step"), "audio"),
        (frame, "video"),
        (b"\x01", "audio"),
    ):
        assert not receiver.authenticates(kind, other)
    assert receiver.counters["audio"].as_dict() == before and failures == []
    # ... and the frame asked about is still taken once, then refused as a replay.
    assert transforms["audio"](frame) == b"mine"
    assert receiver.authenticates("audio", frame)  # asking is not taking
    assert transforms["audio"](frame) is None and len(failures) == 1
    assert not SenderKeyReceiver(GCM).authenticates("audio", frame)


def test_a_frame_under_a_step_the_receiver_skipped_still_decrypts():
    # The sender ratcheted twice (two joins) and sent under both steps; a video frame under the
    # second overtook the audio under the first.
    key = SenderKey(GCM, 0, 0, KEY)
    sender = Sender(key)
    _, transforms, failures = receiver_of(key)
    sender.switch(key.ratcheted())
    skipped = sender.send("audio", b"under step 1")
    sender.switch(sender.key.ratcheted())
    assert transforms["video"](sender.send("video", b"under step 2")) == b"under step 2"
    assert transforms["audio"](skipped) == b"under step 1"
    assert failures == []


def test_the_receiver_follows_up_to_max_ratchet_steps_ahead_and_no_further():
    key = SenderKey(GCM, 0, 0, KEY)
    far = key
    for _ in range(MAX_RATCHET_STEPS):
        far = far.ratcheted()
    _, transforms, failures = receiver_of(key)
    assert transforms["audio"](Sender(far).send("audio", b"far")) == b"far"
    beyond = far.ratcheted()
    for _ in range(MAX_RATCHET_STEPS):
        beyond = beyond.ratcheted()
    assert transforms["audio"](Sender(beyond).send("audio", b"beyond")) is None
    assert [type(error) for error in failures] == [UnknownKeyError]


def test_a_forged_frame_under_the_next_step_does_not_make_the_receiver_ratchet():
    key = SenderKey(GCM, 0, 0, KEY)
    receiver, transforms, failures = receiver_of(key)
    forged = Sender(SenderKey(GCM, 0, 1, OTHER_KEY)).send("audio", b"forged")
    assert transforms["audio"](forged) is None
    assert [type(error) for error in failures] == [AuthenticationError]
    assert receiver.kids == {key.kid}
    genuine = Sender(key.ratcheted())
    assert transforms["audio"](genuine.send("audio", b"genuine")) == b"genuine"
    assert transforms["video"](genuine.send("video", b"video")) == b"video"
    assert receiver.kids == {key.kid, key.ratcheted().kid}


def plain(released: list[ReleasedFrame]) -> list[tuple[str, bytes]]:
    return [(frame.kind, frame.plaintext) for frame in released]


def test_a_held_frame_comes_back_with_the_tag_it_was_given():
    old, new = SenderKey(GCM, 0, 0, KEY), SenderKey(GCM, 1, 0, KEY)
    sender, receiver = Sender(old), SenderKeyReceiver(GCM)
    receiver.add_key(old)
    sender.switch(new)
    assert receiver.transform("audio")(sender.send("audio", b"late"), ("slot 2", 960)) is None
    assert receiver.add_key(new) == [ReleasedFrame("audio", b"late", ("slot 2", 960))]


def test_frames_under_a_generation_not_yet_received_are_held_and_released_in_order():
    old, new = SenderKey(GCM, 0, 0, KEY), SenderKey(GCM, 1, 0, OTHER_KEY)
    sender = Sender(old)
    receiver, transforms, failures = receiver_of(old)
    assert transforms["audio"](sender.send("audio", b"old")) == b"old"
    sender.switch(new)  # the sender switched before this receiver got the key (bound expired)
    frames = [("audio", b"a1"), ("video", b"v1"), ("audio", b"a2"), ("video", b"v2")]
    assert [transforms[kind](sender.send(kind, data)) for kind, data in frames] == [None] * 4
    assert counts(receiver, "audio", "held", "failed") == (2, 0)
    assert plain(receiver.add_key(new)) == frames
    assert failures == []
    assert counts(receiver, "audio", "held", "released", "frames", "failed") == (2, 2, 3, 0)
    assert receiver.counters["video"].generations == {1}
    assert receiver.counters["audio"].generations == {0, 1}
    assert transforms["audio"](sender.send("audio", b"a3")) == b"a3"  # and on from there


def test_frames_before_any_key_are_held_too():
    key = SenderKey(GCM, 0, 0, KEY)
    sender = Sender(key)
    receiver, transforms, failures = receiver_of()
    assert transforms["video"](sender.send("video", b"first")) is None
    assert plain(receiver.add_key(key)) == [("video", b"first")]
    assert failures == []


def test_held_frames_are_bounded_oldest_first_and_expire_when_told():
    receiver, transforms, failures = receiver_of(SenderKey(GCM, 0, 0, KEY))
    new = SenderKey(GCM, 1, 0, OTHER_KEY)
    sender = Sender(new)
    sent = [b"%d" % index for index in range(MAX_HELD_FRAMES + 3)]
    for data in sent:
        assert transforms["audio"](sender.send("audio", data)) is None
    assert counts(receiver, "audio", "held", "overflowed") == (MAX_HELD_FRAMES + 3, 3)
    assert plain(receiver.add_key(new)) == [("audio", data) for data in sent[3:]]
    newer = Sender(SenderKey(GCM, 2, 0, KEY))
    transforms["audio"](newer.send("audio", b"x"))
    transforms["video"](newer.send("video", b"y"))
    assert receiver.expire_held("audio") == 1 and receiver.expire_held("audio") == 0
    assert receiver.expire_held("screen") == 0
    assert counts(receiver, "audio", "expired", "failed") == (1, 0)
    assert plain(receiver.add_key(SenderKey(GCM, 2, 0, KEY))) == [("video", b"y")]
    assert failures == []


def test_a_joiner_drops_what_was_sent_before_it_joined_without_failures():
    # The member was at generation 1, step 3; the joiner got step 4 (the ratchet on its join).
    before = SenderKey(GCM, 1, 3, KEY)
    joined = before.ratcheted()
    earlier_generation = Sender(SenderKey(GCM, 0, 9, OTHER_KEY))
    sender = Sender(before)
    receiver, transforms, failures = receiver_of()
    in_flight = sender.send("audio", b"sent before the join")
    assert transforms["audio"](in_flight) is None  # no key yet: held
    assert plain(receiver.add_key(joined)) == []  # ... and now known to be from before the join
    assert transforms["audio"](sender.send("audio", b"still before")) is None
    assert transforms["audio"](earlier_generation.send("audio", b"long before")) is None
    sender.switch(joined)
    assert transforms["audio"](sender.send("audio", b"after")) == b"after"
    assert counts(receiver, "audio", "before_join", "failed", "frames") == (3, 0, 1)
    assert failures == []


def test_retired_generations_fail_as_unknown_keys():
    old, new = SenderKey(GCM, 0, 0, KEY), SenderKey(GCM, 1, 0, OTHER_KEY)
    receiver, transforms, failures = receiver_of(old, new)
    late_old = Sender(old.ratcheted()).send("audio", b"late")
    receiver.retire_generations_below(1)
    assert receiver.kids == {new.kid}
    assert transforms["audio"](Sender(old).send("audio", b"old")) is None
    assert transforms["audio"](late_old) is None
    assert [type(error) for error in failures] == [UnknownKeyError, UnknownKeyError]
    with pytest.raises(SenderKeyRejected):
        receiver.add_key(SenderKey(GCM, 0, 5, KEY))


def test_keys_that_do_not_fit_are_rejected_and_the_same_key_again_is_nothing():
    key = SenderKey(GCM, 3, 0, KEY)
    receiver, _, _ = receiver_of(key)
    assert plain(receiver.add_key(key)) == []
    for wrong in (
        SenderKey(GCM, 3, 0, OTHER_KEY),
        SenderKey(GCM, 3, 1, KEY),
        SenderKey(GCM, 2, 0, KEY),
        SenderKey(CipherSuite.AES_128_CTR_HMAC_SHA256_80, 4, 0, KEY),
    ):
        with pytest.raises(SenderKeyRejected):
            receiver.add_key(wrong)
    assert receiver.kids == {key.kid}


def test_garbage_fails_closed_as_malformed_and_a_late_transform_has_every_key():
    key = SenderKey(GCM, 0, 0, KEY)
    receiver, transforms, failures = receiver_of(key)
    for garbage in (b"", b"\x9f", b"\x0f\x00"):
        assert transforms["audio"](garbage) is None
    assert receiver.counters["audio"].malformed == 3 and len(failures) == 3
    screen = receiver.transform("screen")
    frame = SFrameSender(GCM)
    frame.use_key(key.media_key())
    assert screen(frame.transform("screen")(b"shared") or b"") == b"shared"


def test_the_receivers_repr_names_no_key():
    receiver, _, _ = receiver_of(SenderKey(GCM, 1, 2, KEY))
    assert repr(receiver) == "SenderKeyReceiver(suite=AES_128_GCM_SHA256_128, kids=[258], held=0)"


def test_a_receiver_is_never_pickled_even_before_its_first_transform():
    # Keys may arrive before the first frame: then no AEAD object stands in pickle's way, and
    # the base keys would go out in the clear.
    receiver = SenderKeyReceiver(GCM)
    receiver.add_key(SenderKey(GCM, 1, 2, KEY))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(receiver)


# -- the group security code --------------------------------------------------------------------


def identity(name: str) -> IdentityPublicKey:
    return IdentityKey(hashlib.sha256(name.encode()).digest()).public_key


ALICE, BOB, CAROL, MALLORY = (identity(name) for name in ("alice", "bob", "carol", "mallory"))


def test_the_group_code_is_thirty_digits_in_six_groups_and_ignores_order():
    code = group_security_code([(ALICE, 0), (BOB, 2), (CAROL, 1)])
    assert re.fullmatch(r"\d{5}( \d{5}){5}", code)
    assert group_security_code([(CAROL, 1), (ALICE, 0), (BOB, 2)]) == code
    assert group_security_code(iter([(BOB, 2), (CAROL, 1), (ALICE, 0)])) == code


def test_the_group_code_follows_its_definition():
    members = sorted([(ALICE, 0), (BOB, 2)], key=lambda member: member[0].raw)
    first = digest = hashlib.sha256(
        b"blindhub-v2 group security code"
        + (2).to_bytes(4, "big")
        + b"".join(key.raw + g.to_bytes(8, "big") for key, g in members)
    ).digest()
    for _ in range(5200):
        digest = hashlib.sha256(digest + first).digest()
    digits = f"{int.from_bytes(digest, 'big') % 10**30:030d}"
    expected = " ".join(digits[i : i + 5] for i in range(0, 30, 5))
    assert group_security_code([(BOB, 2), (ALICE, 0)]) == expected


def test_the_group_code_differs_when_a_member_or_a_generation_differs():
    views = [
        [(ALICE, 0), (BOB, 0), (CAROL, 0)],
        [(ALICE, 0), (BOB, 0)],  # the hub hid Carol
        [(ALICE, 0), (BOB, 0), (CAROL, 0), (MALLORY, 0)],  # the hub added Mallory
        [(ALICE, 0), (BOB, 0), (MALLORY, 0)],  # Mallory instead of Carol
        [(ALICE, 0), (BOB, 1), (CAROL, 0)],  # Bob's generation is another one
        [(ALICE, 1), (BOB, 0), (CAROL, 0)],
        [(ALICE, 0)],
        [],
    ]
    codes = [group_security_code(view) for view in views]
    assert len(set(codes)) == len(codes)


def test_a_member_whose_key_we_lack_counts_with_a_generation_no_key_has():
    without_key = group_security_code([(ALICE, 0), (BOB, None)])
    assert without_key not in {
        group_security_code([(ALICE, 0)]),
        *(group_security_code([(ALICE, 0), (BOB, g)]) for g in (0, 1, MAX_GENERATION)),
    }
    first = digest = hashlib.sha256(
        b"blindhub-v2 group security code"
        + (1).to_bytes(4, "big")
        + BOB.raw
        + (2**64 - 1).to_bytes(8, "big")
    ).digest()
    for _ in range(5200):
        digest = hashlib.sha256(digest + first).digest()
    digits = f"{int.from_bytes(digest, 'big') % 10**30:030d}"
    assert group_security_code([(BOB, None)]) == " ".join(
        digits[i : i + 5] for i in range(0, 30, 5)
    )


def test_a_member_listed_twice_or_a_bad_generation_is_refused():
    with pytest.raises(LocalError):
        group_security_code([(ALICE, 0), (ALICE, 1)])
    for generation in (-1, MAX_GENERATION + 1, 2**64 - 1, True):
        with pytest.raises(LocalError):
            group_security_code([(ALICE, generation)])
