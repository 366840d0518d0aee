import copy
import pickle

import pytest

from crypto.frame_crypto import KeyUpdate, MediaKey, SFrameReceiver, SFrameSender, apply_key_update
from crypto.sframe import AuthenticationError, SFrameError, SFrameHeader, UnknownKeyError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def pair(kid: int = 4):
    sender, receiver = SFrameSender(), SFrameReceiver()
    sender.use_key(MediaKey(0, kid, KEY))
    receiver.add_key(MediaKey(0, kid, KEY))
    return sender, receiver


def test_frames_round_trip_and_count_the_bytes_sframe_adds():
    sender, receiver = pair()
    protect, unprotect = sender.transform("audio"), receiver.transform("audio")
    frame = b"opus frame" * 10
    protected = protect(frame)
    assert protected is not None and SFrameHeader.parse(protected)[0].kid == 4
    assert unprotect(protected) == frame
    added = len(protected) - len(frame)
    assert sender.counters["audio"].as_dict() == {
        "frames": 1,
        "failed": 0,
        "replayed": 0,
        "unauthenticated": 0,
        "unknown_key": 0,
        "malformed": 0,
        "dropped_without_key": 0,
        "plaintext_bytes": 100,
        "ciphertext_bytes": 100 + added,
        "bytes_added": added,
    }
    # One header byte (KID 4 and CTR 0 fit in its config byte) and the 16-byte GCM tag.
    assert receiver.counters["audio"].bytes_added == added == 1 + 16


def test_no_key_means_no_frame():
    protect = SFrameSender().transform("video")
    assert protect(b"frame") is None and protect(b"frame") is None


def test_audio_and_video_share_one_counter_space():
    sender, _ = pair()
    audio, video = sender.transform("audio"), sender.transform("video")
    counters = [SFrameHeader.parse(t(b"x") or b"")[0].ctr for t in (audio, video, audio)]
    assert counters == [0, 1, 2]


def test_a_frame_moved_to_the_other_stream_is_dropped_and_reported():
    sender, receiver = pair()
    failures: list[SFrameError] = []
    protected = sender.transform("audio")(b"audio frame")
    assert protected is not None
    assert receiver.transform("video", failures.append)(protected) is None
    assert [type(error) for error in failures] == [AuthenticationError]
    assert (receiver.counters["video"].failed, receiver.counters["video"].unauthenticated) == (1, 1)
    assert receiver.transform("audio")(protected) == b"audio frame"


def test_a_replayed_frame_is_dropped():
    sender, receiver = pair()
    protected = sender.transform("audio")(b"frame")
    unprotect = receiver.transform("audio")
    assert protected is not None and unprotect(protected) == b"frame"
    assert unprotect(protected) is None
    assert (receiver.counters["audio"].failed, receiver.counters["audio"].replayed) == (1, 1)


def test_failures_are_counted_by_reason_and_failed_is_their_total():
    sender, receiver = pair()
    protect, unprotect = sender.transform("audio"), receiver.transform("audio")
    first, second = protect(b"first"), protect(b"second")
    assert first is not None and second is not None
    altered = first[:-1] + bytes([first[-1] ^ 1])
    stranger = SFrameSender()
    stranger.use_key(MediaKey(0, 9, OTHER_KEY))
    unknown = stranger.transform("audio")(b"from a stranger")
    assert unknown is not None
    inputs = [altered, first, first, second, first, unknown, b"", second]
    assert [unprotect(frame) for frame in inputs] == [
        None,
        b"first",
        None,
        b"second",
        None,
        None,
        None,
        None,
    ]
    counters = receiver.counters["audio"]
    # An altered frame does not move the window, so the genuine one is still accepted after it.
    assert (counters.unauthenticated, counters.replayed, counters.unknown_key) == (1, 3, 1)
    assert (counters.malformed, counters.failed, counters.frames) == (1, 6, 2)


def test_a_new_key_replaces_the_old_one_and_old_frames_need_the_old_receive_key():
    sender, receiver = pair(kid=0)
    protect, unprotect = sender.transform("audio"), receiver.transform("audio")
    old = protect(b"old")
    sender.use_key(MediaKey(1, 2, OTHER_KEY))
    assert sender.kid == 2
    new = protect(b"new")
    assert new is not None and SFrameHeader.parse(new)[0].kid == 2
    failures: list[SFrameError] = []
    assert receiver.transform("audio", failures.append)(new) is None
    assert isinstance(failures[0], UnknownKeyError)
    receiver.add_key(MediaKey(1, 2, OTHER_KEY))
    assert unprotect(new) == b"new" and unprotect(old or b"") == b"old"
    assert receiver.kids == {0, 2}
    receiver.remove_key(0)
    assert receiver.kids == {2}


# -- key objects: the base key stays inside ------------------------------------------------


def test_no_public_way_reads_a_media_keys_base_key():
    key = MediaKey(2, 4, KEY)
    assert not hasattr(key, "base_key") and not hasattr(key, "__dict__")
    public = [getattr(key, name) for name in dir(key) if not name.startswith("_")]
    assert all(not isinstance(value, bytes | bytearray | memoryview) for value in public)
    assert (key.epoch, key.kid) == (2, 4)
    assert repr(key) == "MediaKey(epoch=2, kid=4)" and KEY.hex() not in repr(key)
    with pytest.raises(AttributeError):
        key.kid = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        pickle.dumps(key)
    assert copy.deepcopy(key) is key


def test_media_keys_are_equal_by_epoch_kid_and_base_key():
    assert MediaKey(0, 4, KEY) == MediaKey(0, 4, bytes(KEY))
    assert MediaKey(0, 4, KEY) != MediaKey(0, 4, OTHER_KEY)
    assert MediaKey(0, 4, KEY) != MediaKey(1, 4, KEY)
    assert MediaKey(0, 4, KEY) != MediaKey(0, 5, KEY)
    assert len({MediaKey(0, 4, KEY), MediaKey(0, 4, KEY)}) == 1


def test_apply_key_update_installs_both_and_names_the_receive_kids_to_retire():
    sender, receiver = SFrameSender(), SFrameReceiver()
    first = KeyUpdate(install_receive=MediaKey(0, 1, KEY), switch_send=MediaKey(0, 0, KEY))
    assert apply_key_update(first, sender, receiver) == frozenset()
    assert (sender.kid, receiver.kids) == (0, frozenset({1}))
    assert apply_key_update(
        KeyUpdate(install_receive=MediaKey(1, 3, OTHER_KEY)), sender, receiver
    ) == {1}
    assert (sender.kid, receiver.kids) == (0, frozenset({1, 3}))
    assert (
        apply_key_update(KeyUpdate(switch_send=MediaKey(1, 2, OTHER_KEY)), sender, receiver)
        == set()
    )
    assert (sender.kid, receiver.kids) == (2, frozenset({1, 3}))
    assert apply_key_update(KeyUpdate(), sender, receiver) == frozenset()


def test_the_first_authenticated_frame_under_a_new_receive_key_is_reported_once():
    old, new = MediaKey(0, 1, bytes(range(32))), MediaKey(1, 3, bytes(range(1, 33)))
    sender, receiver = SFrameSender(), SFrameReceiver()
    used: list[int] = []
    apply_key_update(KeyUpdate(install_receive=old, switch_send=old), sender, receiver)
    apply_key_update(KeyUpdate(install_receive=new), sender, receiver, on_first_use=used.append)
    protect, unprotect = sender.transform("audio"), receiver.transform("audio")
    assert unprotect(protect(b"under the old key") or b"") == b"under the old key"
    assert used == []  # the peer has not switched yet
    sender.use_key(new)
    frame = protect(b"under the new key")
    assert frame is not None
    forged = frame[:-1] + bytes([frame[-1] ^ 1])
    assert unprotect(forged) is None and used == []  # only an authentic frame counts
    assert unprotect(frame) == b"under the new key" and used == [3]
    assert unprotect(protect(b"again") or b"") == b"again" and used == [3]
