"""Peer names: one normal form, and the look-alike test.

A name is what a peer signs in the key agreement and what its pin is filed under, so two
strings a person cannot tell apart must never be two different peers:

- ``normalize_name``: Unicode NFKC, whitespace runs made one space and trimmed, and only
  characters a person can see and tell apart: those of Unicode UTS #39 Identifier_Status
  Allowed (the letters, digits and marks of the scripts in use today, and the hyphen,
  apostrophe, period and the few other signs names are written with) and the space, with
  every mark on a letter or digit where it shows, and at least one letter or digit. Anything
  else (a blank Braille pattern, an enclosing circle, an object replacement character, a
  control or invisible character) is refused by name. Names are normalised before they are
  signed, and a peer's signed name that is not in this form is refused (crypto/messages.py
  ``name_field``), so every name compared or pinned is normal. The name keeps its case.
- ``looks_alike``: two names look alike when they have the same confusable skeleton of
  UTS #39 (section 4), as ICU computes it from the Unicode Consortium's confusables data,
  with case ignored: ``bob`` spelt with a Cyrillic o (U+043E), ``"paypaI"`` and ``"Bob"``
  look like ``"bob"``, ``"paypal"`` and ``"bob"``. ``KnownPeers`` refuses a new name that
  looks like a pinned one as it refuses a changed key.

The data and the skeleton come from ICU (the ``pyicu-wheels`` package bundles it), the
reference implementation of UTS #39, rather than from a table kept by hand here.
"""

import unicodedata

import icu

from crypto.errors import LocalError

MAX_NAME_LENGTH = 256

# Control, format (bidi overrides, zero-width joiners), surrogates, private use, unassigned,
# and the line and paragraph separators: none of these is shown as itself.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_SPOOF_CHECKER = icu.SpoofChecker()
# ICU 75 and later know this property; an older ICU fails here, at import, not open.
_ALLOWED = icu.UnicodeSet("[:Identifier_Status=Allowed:]")
_ALLOWED.freeze()
# UTS #39 section 5.4: more nonspacing marks than this on one letter are not told apart.
_MAX_MARKS_ON_A_LETTER = 4
_DOT_ABOVE = "\u0307"


class InvalidName(LocalError):
    """A name that cannot be shown faithfully, or is not in its normal form."""


def normalize_name(text: str) -> str:
    """``text`` in the normal form every signed and pinned name has; ``InvalidName`` if it
    holds a character that people cannot see or tell apart, has no letter or digit, or is
    empty or too long."""
    if not isinstance(text, str):
        raise InvalidName("a name is text")
    normal = unicodedata.normalize("NFKC", text)
    for char in normal:
        if unicodedata.category(char) in _REFUSED_CATEGORIES or _is_invisible(char):
            raise InvalidName(f"a name has no control or invisible characters ({_named(char)})")
    normal = " ".join(normal.split())
    if not 0 < len(normal) <= MAX_NAME_LENGTH:
        raise InvalidName(f"a name is 1 to {MAX_NAME_LENGTH} characters, not only spaces")
    for char in normal:
        if char != " " and not _ALLOWED.contains(char):
            raise InvalidName(
                "a name holds only spaces and the letters, digits, marks and punctuation of "
                "names that people can tell apart (Unicode UTS #39 Identifier_Status Allowed), "
                f"not {_named(char)}"
            )
    _check_marks(normal)
    if not any(unicodedata.category(char)[0] in "LN" for char in normal):
        raise InvalidName("a name has at least one letter or digit")
    return normal


def check_normalized(name: str) -> str:
    """``name`` itself if it is normal; ``InvalidName`` otherwise (a peer's signed name is
    refused, never silently normalised: the peer signed exactly these characters)."""
    normal = normalize_name(name)
    if normal != name:
        raise InvalidName(f"the name {name!r} is not normalised (it would be {normal!r})")
    return name


def skeleton(name: str) -> str:
    """The UTS #39 confusable skeleton: names with the same skeleton look alike."""
    result: str = _SPOOF_CHECKER.getSkeleton(0, name)
    return result


def looks_alike(one: str, other: str) -> bool:
    """Whether a person could take ``one`` for ``other``: the same skeleton, case ignored."""
    return not _look_alike_keys(one).isdisjoint(_look_alike_keys(other))


def _look_alike_keys(name: str) -> frozenset[str]:
    # Skeletons are case-sensitive, and no one key ignores case and keeps the look-alikes:
    # a capital I is the capital of an i ("BILL" is "bill") and looks like an l ("paypaI" is
    # "paypal"). So two keys: the skeleton of the folded name, and the skeleton of the folded
    # skeleton (which also catches both at once, "PaypaI"); names sharing either look alike.
    return frozenset({skeleton(name.casefold()), skeleton(skeleton(name).casefold())})


def _check_marks(name: str) -> None:
    # The checks UTS #39 section 5.4 gives for marks, on the decomposed name (an e with an
    # acute is an e and a mark): a mark shows only on a letter or digit, the same mark twice
    # is drawn once, many pile into a smudge, and i and j hide a dot above in their own.
    base = ""
    marks: list[str] = []
    for char in unicodedata.normalize("NFD", name):
        category = unicodedata.category(char)
        if not category.startswith("M"):
            base, marks = (char if category[0] in "LN" else ""), []
            continue
        if not base:
            raise InvalidName(f"a mark goes on a letter, and {_named(char)} has no letter or digit")
        if category == "Mn":
            if char in marks:
                raise InvalidName(f"a name has no letter with {_named(char)} twice")
            marks.append(char)
            if len(marks) > _MAX_MARKS_ON_A_LETTER:
                raise InvalidName(
                    f"a name has no letter with more than {_MAX_MARKS_ON_A_LETTER} marks ({base!r})"
                )
        if char == _DOT_ABOVE and icu.Char.hasBinaryProperty(base, icu.UProperty.SOFT_DOTTED):
            raise InvalidName(f"a name has no {_named(char)} on the dotted {base!r}")


def _named(char: str) -> str:
    return f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}"


def _is_invisible(char: str) -> bool:
    # Default_Ignorable_Code_Point: Hangul fillers, variation selectors, the combining grapheme
    # joiner and others that are rendered as nothing but are not all of category Cf.
    invisible: bool = icu.Char.hasBinaryProperty(char, icu.UProperty.DEFAULT_IGNORABLE_CODE_POINT)
    return invisible
