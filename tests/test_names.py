"""Peer names: the normal form every signed and pinned name has, and the look-alike test."""

import os

import pytest

from crypto.identity import (
    ConfusableName,
    CorruptKeyFile,
    IdentityKey,
    IdentityPublicKey,
    KnownPeers,
    Pin,
    PinnedIdentityMismatch,
)
from crypto.messages import name_field
from crypto.names import InvalidName, check_normalized, normalize_name, skeleton

CYRILLIC_O = "\u043e"


@pytest.mark.parametrize(
    ("typed", "normal"),
    [
        ("bob", "bob"),
        ("  bob  ", "bob"),
        ("bob   smith", "bob smith"),
        ("bob\u00a0smith", "bob smith"),  # a no-break space is a space
        ("\uff42\uff4f\uff42", "bob"),  # fullwidth letters (NFKC)
        ("e\u0301", "\u00e9"),  # composed
        ("\u2460", "1"),  # circled digit one
    ],
)
def test_names_are_normalised(typed, normal):
    assert normalize_name(typed) == normal
    assert check_normalized(normal) == normal


@pytest.mark.parametrize(
    "refused",
    [
        "",
        "   ",
        "bob\n",
        "bo\tb",
        "b\u200bob",  # zero-width space
        "bob\u200d",  # zero-width joiner
        "\u202ebob",  # right-to-left override
        "b\u00adob",  # soft hyphen
        "bob\u3164",  # Hangul filler, invisible but a letter
        "bo\ufe0fb",  # variation selector
        "bob\ue000",  # private use
        "x" * 257,
    ],
)
def test_names_with_characters_not_shown_as_themselves_are_refused(refused):
    with pytest.raises(InvalidName):
        normalize_name(refused)


@pytest.mark.parametrize("unnormal", ["bob ", " bob", "bob  smith", "\uff42ob", "e\u0301"])
def test_a_name_on_the_wire_must_already_be_normal(unnormal):
    with pytest.raises(ValueError, match="not normalised"):
        name_field(unnormal)


def test_look_alikes_share_a_skeleton_and_different_names_do_not():
    assert skeleton(f"b{CYRILLIC_O}b") == skeleton("bob")
    assert skeleton("paypaI") == skeleton("paypal")
    assert skeleton("rn") == skeleton("m")
    assert skeleton("bob") != skeleton("rob")


def key() -> IdentityPublicKey:
    return IdentityKey.generate(os.urandom).public_key


def test_a_look_alike_of_a_pinned_name_is_refused_with_both_fingerprints():
    peers = KnownPeers()
    bob, hub = key(), key()
    peers.check("bob", bob)
    with pytest.raises(ConfusableName) as refused:
        peers.check(f"b{CYRILLIC_O}b", hub)
    assert isinstance(refused.value, PinnedIdentityMismatch)
    assert refused.value.pinned_name == "bob" and refused.value.pinned == bob
    assert bob.fingerprint() in str(refused.value) and hub.fingerprint() in str(refused.value)
    with pytest.raises(InvalidName):
        peers.check("bob ", hub)
    assert [pin.name for pin in peers] == ["bob"]
    peers.check("carol", hub)  # a genuinely new name is pinned
    assert [pin.name for pin in peers] == ["bob", "carol"]


def test_a_pin_file_with_a_name_not_in_normal_form_is_refused():
    data = (
        KnownPeers()
        .encode()
        .replace(
            b'"peers": []',
            b'"peers": [{"name": "bob ", "public_key": "' + b"A" * 43 + b'", "verified": false}]',
        )
    )
    with pytest.raises(CorruptKeyFile, match="not normalised"):
        KnownPeers.decode(data)


def test_changes_replay_onto_pins_changed_meanwhile():
    bob, carol, dave = key(), key(), key()
    before = KnownPeers()
    before.check("bob", bob)
    before.check("carol", carol)
    mine = before.copy()
    mine.remove("bob")
    mine.mark_verified("carol")
    mine.check("dave", dave)
    changes = mine.changes_since(before)
    assert [pin.name for pin in changes.removed] == ["bob"]
    assert [pin.name for pin in changes.verified] == ["carol"]
    assert [pin.name for pin in changes.added] == ["dave"]
    # Meanwhile: carol forgotten and pinned anew to another key, erin pinned.
    now = KnownPeers()
    now.check("bob", bob)
    now.check("carol", other_carol := key())
    now.check("erin", key())
    assert now.apply(changes) == []
    assert {pin.name: pin.verified for pin in now} == {"carol": False, "dave": False, "erin": False}
    assert now.get("carol") == Pin("carol", other_carol)  # a verification is for one key only
    assert not mine.changes_since(mine.copy())
