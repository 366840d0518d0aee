"""The project's one strict JSON decoder: RFC 8259 without its interoperability gaps.

Python's ``json`` reads ``NaN`` and ``Infinity``, turns ``1e400`` into infinity, keeps the
last of two equal names where other parsers keep the first, and recurses until the
interpreter's stack limit. Each of these lets one text mean two things to two readers (a
signer and a verifier, a peer and the hub), so ``loads`` refuses them all with
``StrictJsonError``. Every JSON text a peer sends (key-agreement messages, sealed
plaintexts, relayed payloads) is read through here.
"""

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from crypto.errors import RemoteError

# Far deeper than any message of ours (the deepest is 3), far shallower than the stack.
MAX_DEPTH = 32

# What can change the nesting depth: a bracket outside a string, and the quotes and
# backslashes that decide where strings begin and end.
_SPECIAL = re.compile(r'["\\\[\]{}]')


class StrictJsonError(RemoteError):
    """A text that is not one strict JSON value: malformed, ambiguous or too deep."""


def _reject_duplicate_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise StrictJsonError("duplicate name in a JSON object")
    return result


def _reject_constant(name: str) -> None:
    raise StrictJsonError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJsonError(f"the number {text[:20]} is out of range (not finite)")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_reject_duplicate_names,
    parse_constant=_reject_constant,
    parse_float=_finite_float,
    strict=True,
)


def check_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse a text whose arrays and objects nest deeper than ``max_depth``.

    One pass over the text's special characters, each looked at once, so the work is linear
    whatever the text (a scan that retries a string at every quote is quadratic on an
    unterminated one). Brackets inside strings do not count. A backslash outside a string is
    not JSON: the decoder refuses it, before any bracket after it.
    """
    depth = 0
    in_string = False
    escaped_until = -1  # the position of the character a backslash escapes
    for match in _SPECIAL.finditer(text):
        position, char = match.start(), match.group()
        if position <= escaped_until:
            continue
        if in_string:
            if char == "\\":
                escaped_until = position + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise StrictJsonError(f"nested deeper than {max_depth}")
        elif char in "]}":
            depth -= 1


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """The value of one strict JSON text (UTF-8 if bytes); ``StrictJsonError`` otherwise."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as error:
            raise StrictJsonError("JSON text is UTF-8") from error
    check_depth(text, max_depth)
    try:
        return _DECODER.decode(text)
    except StrictJsonError:
        raise
    except ValueError as error:  # JSONDecodeError, and integers over Python's digit limit
        raise StrictJsonError(f"not JSON: {error}") from error


def dumps(value: Mapping[str, Any] | list[Any]) -> bytes:
    """Canonical UTF-8 JSON (sorted names, no spaces), for carrying or hashing.

    NaN and the infinities raise ``ValueError`` (they are not JSON): a local error, since
    the value is this process's own.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
