"""Peer names: the normal form every signed and pinned name has, and the look-alike test."""

import os
import re

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
from crypto.names import InvalidName, check_normalized, looks_alike, normalize_name, skeleton

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
        ("Bob", "Bob"),  # kept as typed: case is compared, never changed
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


REAL_NAMES = [
    "Jos\u00e9",
    "\u674e\u5c0f\u9f8d",  # Chinese
    "Zo\u00eb",
    "O'Brien",
    "Mary O\u2019Neil",
    "Anne-Marie",
    "Dr. Smith",
    "Nguy\u1ec5n V\u0103n An",  # two marks on one letter
    "\u0395\u03bb\u03ad\u03bd\u03b7",  # Greek
    "\u041e\u043b\u0435\u0433",  # Cyrillic
    "\u0645\u062d\u0645\u062f",  # Arabic
    "\u0930\u093e\u092e",  # Devanagari, a spacing mark
    "\uae40\ubbfc\uc900",  # Hangul
    "\u3055\u304f\u3089",  # Hiragana
    "\u05e9\u05e8\u05d4",  # Hebrew
    "S\u00f8ren \u0141ukasz \u00de\u00f3r\u00f0ur Ay\u015fe",
]


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_names_in_many_scripts_are_accepted_as_they_are(name):
    assert normalize_name(name) == name
    assert check_normalized(name) == name
    assert name_field(name) == name


@pytest.mark.parametrize(
    ("refused", "character"),
    [
        # Shown as a blank although it is not a space, so "bob" and "bob\u2800" look the same.
        ("bob\u2800", "U+2800 BRAILLE PATTERN BLANK"),
        ("bob\u2800smith", "U+2800 BRAILLE PATTERN BLANK"),
        ("\u2800", "U+2800 BRAILLE PATTERN BLANK"),
        # Enclosing marks draw over their neighbours.
        ("bob\u20dd", "U+20DD COMBINING ENCLOSING CIRCLE"),
        ("bob\u0489", "U+0489 COMBINING CYRILLIC MILLIONS SIGN"),
        ("bob\ufffc", "U+FFFC OBJECT REPLACEMENT CHARACTER"),
        ("\u0299oy", "U+0299 LATIN LETTER SMALL CAPITAL B"),  # not used in any language's names
        ("bob\U0001d159", "U+1D159 MUSICAL SYMBOL NULL NOTEHEAD"),
        ("bob, smith", "U+002C COMMA"),
        ("bob@home", "U+0040 COMMERCIAL AT"),
        ("\U0001f600", "U+1F600 GRINNING FACE"),  # emoji: many look alike, few have names
    ],
)
def test_characters_people_cannot_see_or_tell_apart_are_refused_by_name(refused, character):
    with pytest.raises(InvalidName, match=re.escape(character)):
        normalize_name(refused)
    with pytest.raises(ValueError, match=re.escape(character)):
        name_field(refused)


@pytest.mark.parametrize(
    ("refused", "reason"),
    [
        ("bob \u0301", "U+0301 COMBINING ACUTE ACCENT has no letter or digit"),
        ("\u0301bob", "U+0301 COMBINING ACUTE ACCENT has no letter or digit"),
        ("O'\u0301Brien", "U+0301 COMBINING ACUTE ACCENT has no letter or digit"),
        # The same mark twice is drawn once; \u00e9 holds one acute already.
        ("bo\u0301\u0301b", "U+0301 COMBINING ACUTE ACCENT twice"),
        ("jos\u00e9\u0301", "U+0301 COMBINING ACUTE ACCENT twice"),
        ("bo\u0300\u0301\u0302\u0303\u0304b", "more than 4 marks"),
        # The dot above on i or j is hidden by the dot they already have.
        ("bi\u0307ll", "U+0307 COMBINING DOT ABOVE on the dotted"),
    ],
)
def test_marks_must_show_on_a_letter_or_digit(refused, reason):
    with pytest.raises(InvalidName, match=re.escape(reason)):
        normalize_name(refused)


@pytest.mark.parametrize("refused", ["-", "'.", "- . -", "\u00b7"])
def test_a_name_has_a_letter_or_digit(refused):
    with pytest.raises(InvalidName, match="at least one letter or digit"):
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


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("bob", f"b{CYRILLIC_O}b"),
        ("paypal", "paypaI"),  # a capital I looks like an l ...
        ("bill", "BILL"),  # ... and is the capital of an i
        ("paypal", "PaypaI"),  # case and a look-alike letter at once
        ("bob", "Bob"),  # the same name to anyone who hears it
        ("bob", "\u0412\u041e\u0412"),  # Cyrillic capitals, the skeleton of BOB
        ("Jos\u00e9", "JOS\u00c9"),
        ("bob smith", "Bob Smith"),
    ],
)
def test_look_alikes_ignore_case(one, other):
    assert looks_alike(one, other) and looks_alike(other, one)


@pytest.mark.parametrize(
    ("one", "other"),
    [("bob", "rob"), ("Jose", "Jos\u00e9"), ("anna", "ann\u0105"), ("bob", "bob smith")],
)
def test_different_names_do_not_look_alike(one, other):
    assert not looks_alike(one, other)


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


@pytest.mark.parametrize(
    ("pinned", "presented"), [("bob", "Bob"), ("Bob", "bob"), ("bill", "BILL")]
)
def test_a_name_differing_from_a_pinned_one_only_in_case_is_a_look_alike(pinned, presented):
    peers = KnownPeers()
    bob, hub = key(), key()
    peers.check(pinned, bob)
    with pytest.raises(ConfusableName) as refused:
        peers.check(presented, hub)
    assert refused.value.pinned_name == pinned and refused.value.pinned == bob
    assert bob.fingerprint() in str(refused.value) and hub.fingerprint() in str(refused.value)
    assert [pin.name for pin in peers] == [pinned]  # pinned as typed, nothing added


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
