"""Peer names: one normal form, and the look-alike test.

A name is what a peer signs in the key agreement and what its pin is filed under, so two
strings a person cannot tell apart must never be two different peers:

- ``normalize_name``: Unicode NFKC, whitespace runs made one space and trimmed, and no
  control, format, private-use, unassigned or default-ignorable (invisible) character. Names
  are normalised before they are signed, and a peer's signed name that is not in this form is
  refused (crypto/messages.py ``name_field``), so every name compared or pinned is normal.
- ``skeleton``: the confusable skeleton of Unicode UTS #39 (section 4), as ICU computes it from
  the Unicode Consortium's confusables data: ``bob`` spelt with a Cyrillic o (U+043E), or
  ``"paypaI"``, has the skeleton of ``"bob"`` or ``"paypal"``. Two different names with one
  skeleton look alike, and ``KnownPeers`` refuses the second as it refuses a changed key.

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


class InvalidName(LocalError):
    """A name that cannot be shown faithfully, or is not in its normal form."""


def normalize_name(text: str) -> str:
    """``text`` in the normal form every signed and pinned name has; ``InvalidName`` if it
    holds a character that is not shown as itself, or is empty or too long."""
    if not isinstance(text, str):
        raise InvalidName("a name is text")
    normal = unicodedata.normalize("NFKC", text)
    for char in normal:
        if unicodedata.category(char) in _REFUSED_CATEGORIES or _is_invisible(char):
            raise InvalidName(
                f"a name has no control or invisible characters (U+{ord(char):04X} "
                f"{unicodedata.name(char, 'unnamed')})"
            )
    normal = " ".join(normal.split())
    if not 0 < len(normal) <= MAX_NAME_LENGTH:
        raise InvalidName(f"a name is 1 to {MAX_NAME_LENGTH} characters, not only spaces")
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


def _is_invisible(char: str) -> bool:
    # Default_Ignorable_Code_Point: Hangul fillers, variation selectors, the combining grapheme
    # joiner and others that are rendered as nothing but are not all of category Cf.
    invisible: bool = icu.Char.hasBinaryProperty(char, icu.UProperty.DEFAULT_IGNORABLE_CODE_POINT)
    return invisible
