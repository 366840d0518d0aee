"""The hub wire format: JSON text frames, one object per frame, with a ``type`` field.

Parsing is strict and total: every text either becomes one message dataclass or
raises ``MalformedHubMessage`` with a machine-readable ``ErrorCode``. Relay payloads
are never interpreted: the parser only checks that they are well-formed JSON and
keeps their exact text, so the hub forwards them byte for byte (no re-encoding,
hence no size amplification and no silent change of numbers or duplicate keys).

A relay frame in the usual layout is checked by a fast path (a pattern for the envelope and
msgspec's C decoder for the payload) that accepts only what the strict scanner accepts, with
the same result; everything else, every error included, goes through the strict scanner.
"""

import json
import math
import re
import sys
from dataclasses import dataclass
from enum import StrEnum
from json.encoder import encode_basestring_ascii
from typing import ClassVar, Final, NewType

import msgspec

PeerId = NewType("PeerId", str)
JsonText = NewType("JsonText", str)
"""The exact text of one well-formed JSON value."""

NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""Rooms and peer ids: 1 to 64 letters, digits, ``-`` and ``_``."""

_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")


# The reasons the hub gives with the close codes it closes a connection with
# (docs/reference/hub-protocol.md, close codes).
CLOSE_SLOW_READER: Final = "slow-reader"
CLOSE_BINARY_FRAME: Final = "binary-frame"
CLOSE_JOIN_TIMEOUT: Final = "join-timeout"
CLOSE_HOME_LOST: Final = "home-lost"


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` message (and the reason of some hub closes)."""

    INVALID_JSON = "invalid-json"
    NOT_AN_OBJECT = "not-an-object"
    UNKNOWN_TYPE = "unknown-type"
    INVALID_FIELD = "invalid-field"
    INVALID_ROOM = "invalid-room"
    NOT_JOINED = "not-joined"
    ALREADY_JOINED = "already-joined"
    ROOM_FULL = "room-full"
    TOO_MANY_ROOMS = "too-many-rooms"
    UNKNOWN_PEER = "unknown-peer"
    RATE_LIMITED = "rate-limited"
    HUB_FULL = "hub-full"
    CLUSTER_UNAVAILABLE = "cluster-unavailable"
    INVALID_SDP = "invalid-sdp"
    UNEXPECTED_MEDIA = "unexpected-media"


class SignalingError(Exception):
    """Base class of every error of the signalling layer, hub and client side. Each subclass
    also derives from the builtin it is a case of (``ValueError`` for bad input), so callers
    that only know the builtin still catch it, as PyNaCl's errors do."""


class CodedError(SignalingError):
    """An error that carries a documented machine-readable ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class MalformedHubMessage(CodedError, ValueError):
    """A frame that is not a well-formed message of the wire format."""


class Refused(CodedError):
    """A well-formed request that the hub will not carry out."""


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range (not finite)")
    return value


# NaN and Infinity are accepted by Python's json by default but are not JSON, and a number
# too large for a double (1e400) becomes infinity: each is refused. The hub's scanner lets
# duplicate names inside a payload through: it forwards the text, never the value, and the
# receiving client reads it with the strict decoder (client.hub_connection.decode_payload).
_DECODER: Final = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_finite_float, strict=True
)


def _scan_value(text: str, index: int) -> tuple[object, int]:
    """Decode one JSON value starting exactly at ``index``; return it and its end."""
    try:
        return _DECODER.raw_decode(text, index)
    except RecursionError:
        raise MalformedHubMessage(ErrorCode.INVALID_JSON, "nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, over-long integers, NaN
        raise MalformedHubMessage(ErrorCode.INVALID_JSON, str(error)) from None


def _skip_whitespace(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _expect(text: str, index: int, token: str) -> int:
    if text.startswith(token, index):
        return index + len(token)
    raise MalformedHubMessage(ErrorCode.INVALID_JSON, f"expected {token!r} at offset {index}")


@dataclass(frozen=True, slots=True)
class Field:
    """One member of a message object: its decoded value and its exact text."""

    value: object
    text: JsonText


def split_object(text: str) -> dict[str, Field]:
    """Split a JSON object into its members, keeping each value's exact text.

    Raises ``MalformedHubMessage``: ``invalid-json`` for anything that is not one JSON
    value, ``not-an-object`` for a valid non-object, ``invalid-field`` for a
    duplicated member name (which one would count is ambiguous, so neither does).
    """
    index = _skip_whitespace(text, 0)
    if not text.startswith("{", index):
        json_value_end = _skip_whitespace(text, _scan_value(text, index)[1])
        if json_value_end != len(text):
            raise MalformedHubMessage(ErrorCode.INVALID_JSON, "extra data after the JSON value")
        raise MalformedHubMessage(ErrorCode.NOT_AN_OBJECT, "a message must be a JSON object")
    fields: dict[str, Field] = {}
    index = _skip_whitespace(text, index + 1)
    if text.startswith("}", index):
        index += 1
    else:
        while True:
            if not text.startswith('"', index):
                raise MalformedHubMessage(
                    ErrorCode.INVALID_JSON, f"expected a name at offset {index}"
                )
            name, index = _scan_value(text, index)
            assert isinstance(name, str)
            index = _skip_whitespace(text, _expect(text, _skip_whitespace(text, index), ":"))
            start = index
            value, index = _scan_value(text, index)
            if name in fields:
                raise MalformedHubMessage(ErrorCode.INVALID_FIELD, f"duplicate field {name!r}")
            fields[name] = Field(value, JsonText(text[start:index]))
            index = _skip_whitespace(text, index)
            if text.startswith(",", index):
                index = _skip_whitespace(text, index + 1)
                continue
            index = _expect(text, index, "}")
            break
    if _skip_whitespace(text, index) != len(text):
        raise MalformedHubMessage(ErrorCode.INVALID_JSON, "extra data after the JSON object")
    return fields


def _check_members(fields: dict[str, Field], message_type: str, expected: frozenset[str]) -> None:
    missing = sorted(expected - fields.keys())
    if missing:
        raise MalformedHubMessage(
            ErrorCode.INVALID_FIELD, f"{message_type}: missing field {missing[0]!r}"
        )
    unexpected = sorted(fields.keys() - expected)
    if unexpected:
        raise MalformedHubMessage(
            ErrorCode.INVALID_FIELD, f"{message_type}: unexpected field {unexpected[0]!r}"
        )


def _string(fields: dict[str, Field], name: str) -> str:
    value = fields[name].value
    if not isinstance(value, str):
        raise MalformedHubMessage(ErrorCode.INVALID_FIELD, f"field {name!r} must be a string")
    return value


def _room(fields: dict[str, Field]) -> str:
    room = _string(fields, "room")
    if NAME_PATTERN.fullmatch(room) is None:
        raise MalformedHubMessage(
            ErrorCode.INVALID_ROOM, "a room is 1 to 64 letters, digits, '-' and '_'"
        )
    return room


def _peer_id(value: object, what: str) -> PeerId:
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise MalformedHubMessage(ErrorCode.INVALID_FIELD, f"{what} must be a peer id")
    return PeerId(value)


def _message_type(fields: dict[str, Field]) -> str:
    if "type" not in fields:
        raise MalformedHubMessage(ErrorCode.INVALID_FIELD, "missing field 'type'")
    return _string(fields, "type")


# The messages are msgspec structs: frozen and compared by value like frozen dataclasses, but
# made in a fifth of the time, and the hub makes a few for every relay. They hold only
# strings, numbers, enums and tuples of those, never a cycle, so the garbage collector need
# not track them (gc=False).

# Client to hub.


class Join(msgspec.Struct, frozen=True, gc=False):
    room: str

    def encode(self) -> str:
        return json.dumps({"type": "join", "room": self.room}, separators=(",", ":"))


class RelayTo(msgspec.Struct, frozen=True, gc=False):
    to: str
    payload: JsonText

    def encode(self) -> str:
        return f'{{"type":"relay","to":{json.dumps(self.to)},"payload":{self.payload}}}'


class Leave(msgspec.Struct, frozen=True, gc=False):
    def encode(self) -> str:
        return '{"type":"leave"}'


class MediaAnswer(msgspec.Struct, frozen=True, gc=False):
    """The client's SDP answer to the hub's ``media-offer`` (routed rooms only)."""

    sdp: str

    def encode(self) -> str:
        return json.dumps({"type": "media-answer", "sdp": self.sdp}, separators=(",", ":"))


ClientMessage = Join | RelayTo | Leave | MediaAnswer

_JOIN_FIELDS: Final = frozenset({"type", "room"})
_RELAY_TO_FIELDS: Final = frozenset({"type", "to", "payload"})
_LEAVE_FIELDS: Final = frozenset({"type"})
_SDP_FIELDS: Final = frozenset({"type", "sdp"})


# A relay as RelayTo.encode writes it (JSON whitespace allowed between tokens): the "to"
# string, with no escape and no control character, so that its text is its value, and the
# payload's text, everything up to the last "}" (what follows it may only be whitespace).
_WS = r"[ \t\n\r]*"
_RELAY: Final = re.compile(
    rf'{_WS}\{{{_WS}"type"{_WS}:{_WS}"relay"{_WS},{_WS}"to"{_WS}:{_WS}"([^"\\\x00-\x1f]*)"'
    rf'{_WS},{_WS}"payload"{_WS}:{_WS}(.*)\}}{_WS}\Z',
    re.DOTALL,
)
_JSON_WHITESPACE: Final = " \t\n\r"
_PAYLOAD_DECODER: Final = msgspec.json.Decoder()
# msgspec refuses integers of more than 4,300 digits whatever the interpreter's limit; the
# strict scanner refuses those over sys.get_int_max_str_digits() (4,300 unless configured, 0
# for none). The fast path runs only while its limit is no stricter than the scanner's.
_MSGSPEC_MAX_INT_DIGITS: Final = 4300
# The strict scanner refuses nesting only near the interpreter's recursion limit (1,000 by
# default, less the frames below it). A payload with more openings than this, even inside
# strings, goes to the strict scanner, so the fast path never decides a depth.
_FAST_MAX_OPENINGS: Final = 64


def _fast_relay(text: str) -> RelayTo | None:
    """The ``RelayTo`` of a relay frame in the usual layout, or None to use the strict scanner.

    Returns a message only if the strict scanner would return the same one: the envelope
    then has exactly the members type, to and payload, and msgspec accepts the payload as one
    JSON value (it refuses NaN, infinities, out-of-range numbers, over-long integers, bad
    escapes, control characters and trailing data, and also lone surrogates, which the
    strict scanner accepts: those take the strict path).
    """
    relay = _RELAY.match(text)
    if relay is None:
        return None
    to, payload = relay.groups()
    if payload and payload[-1] in _JSON_WHITESPACE:
        payload = payload.rstrip(_JSON_WHITESPACE)
    if payload.count("[") + payload.count("{") > _FAST_MAX_OPENINGS:
        return None
    if 0 < sys.get_int_max_str_digits() < _MSGSPEC_MAX_INT_DIGITS:
        return None
    try:
        _PAYLOAD_DECODER.decode(payload)
    except (ValueError, RecursionError):  # msgspec.DecodeError, UnicodeEncodeError
        return None
    return RelayTo(to, JsonText(payload))


def parse_client_message(text: str) -> ClientMessage:
    """Parse a frame a client sent to the hub, or raise ``MalformedHubMessage``."""
    return _fast_relay(text) or parse_client_message_strictly(text)


def parse_client_message_strictly(text: str) -> ClientMessage:
    """``parse_client_message`` through the strict scanner alone: the reference that its
    fast path must agree with."""
    fields = split_object(text)
    message_type = _message_type(fields)
    if message_type == "join":
        _check_members(fields, message_type, _JOIN_FIELDS)
        return Join(_room(fields))
    if message_type == "relay":
        _check_members(fields, message_type, _RELAY_TO_FIELDS)
        # Any string: a name that is not a peer here is answered with unknown-peer.
        return RelayTo(_string(fields, "to"), fields["payload"].text)
    if message_type == "leave":
        _check_members(fields, message_type, _LEAVE_FIELDS)
        return Leave()
    if message_type == "media-answer":
        _check_members(fields, message_type, _SDP_FIELDS)
        return MediaAnswer(_string(fields, "sdp"))
    raise MalformedHubMessage(
        ErrorCode.UNKNOWN_TYPE, "type must be join, relay, leave or media-answer"
    )


# Hub to client.


class MediaMode(StrEnum):
    """How media flows in a room: straight between the peers, or through the hub."""

    PEER_TO_PEER = "peer-to-peer"
    ROUTED = "routed"


class Welcome(msgspec.Struct, frozen=True, gc=False):
    TYPE: ClassVar[str] = "welcome"
    peer_id: PeerId
    room: str
    peers: tuple[PeerId, ...]
    media: MediaMode = MediaMode.PEER_TO_PEER

    def encode(self) -> str:
        message = {"type": "welcome", "peer_id": self.peer_id, "room": self.room}
        return json.dumps(
            {**message, "peers": list(self.peers), "media": self.media}, separators=(",", ":")
        )


class PeerJoined(msgspec.Struct, frozen=True, gc=False):
    TYPE: ClassVar[str] = "peer-joined"
    peer_id: PeerId

    def encode(self) -> str:
        return json.dumps({"type": "peer-joined", "peer_id": self.peer_id}, separators=(",", ":"))


class PeerLeft(msgspec.Struct, frozen=True, gc=False):
    TYPE: ClassVar[str] = "peer-left"
    peer_id: PeerId

    def encode(self) -> str:
        return json.dumps({"type": "peer-left", "peer_id": self.peer_id}, separators=(",", ":"))


class RelayFrom(msgspec.Struct, frozen=True, gc=False):
    TYPE: ClassVar[str] = "relay"
    sender: PeerId
    payload: JsonText

    def encode(self) -> str:
        # What json.dumps writes for a string, without its dispatch: this is every relay.
        sender = encode_basestring_ascii(self.sender)
        return f'{{"type":"relay","from":{sender},"payload":{self.payload}}}'


class ErrorMessage(msgspec.Struct, frozen=True, gc=False):
    TYPE: ClassVar[str] = "error"
    code: ErrorCode
    message: str

    def encode(self) -> str:
        return json.dumps(
            {"type": "error", "code": self.code, "message": self.message}, separators=(",", ":")
        )


MEDIA_KINDS: Final = ("audio", "video")


class MediaOffer(msgspec.Struct, frozen=True, gc=False):
    """The hub's SDP offer for a member of a routed room, sent right after ``welcome``."""

    TYPE: ClassVar[str] = "media-offer"
    sdp: str

    def encode(self) -> str:
        return json.dumps({"type": "media-offer", "sdp": self.sdp}, separators=(",", ":"))


class MediaTrack(msgspec.Struct, frozen=True, gc=False):
    """One receiving transceiver of a member (its ``mid``) and whose media it carries."""

    mid: str
    kind: str
    peer_id: PeerId


class MediaTracks(msgspec.Struct, frozen=True, gc=False):
    """The full current map of a member's receiving slots in use (a hint: the hub is not
    trusted to name who sent a frame)."""

    TYPE: ClassVar[str] = "media-tracks"
    tracks: tuple[MediaTrack, ...]

    def encode(self) -> str:
        tracks = [
            {"mid": track.mid, "kind": track.kind, "peer_id": track.peer_id}
            for track in self.tracks
        ]
        return json.dumps({"type": "media-tracks", "tracks": tracks}, separators=(",", ":"))


HubMessage = Welcome | PeerJoined | PeerLeft | RelayFrom | ErrorMessage | MediaOffer | MediaTracks

_WELCOME_FIELDS: Final = frozenset({"type", "peer_id", "room", "peers", "media"})
_MEDIA_TRACKS_FIELDS: Final = frozenset({"type", "tracks"})
_TRACK_FIELDS: Final = frozenset({"mid", "kind", "peer_id"})
# A mid is what aiortc and browsers write: a short run of letters and digits.
_MID_PATTERN: Final = re.compile(r"[A-Za-z0-9]{1,16}")
_PEER_FIELDS: Final = frozenset({"type", "peer_id"})
_RELAY_FROM_FIELDS: Final = frozenset({"type", "from", "payload"})
_ERROR_FIELDS: Final = frozenset({"type", "code", "message"})


def _welcome(fields: dict[str, Field]) -> Welcome:
    peers = fields["peers"].value
    if not isinstance(peers, list):
        raise MalformedHubMessage(ErrorCode.INVALID_FIELD, "field 'peers' must be a list")
    try:
        media = MediaMode(_string(fields, "media"))
    except ValueError:
        raise MalformedHubMessage(
            ErrorCode.INVALID_FIELD, "field 'media' must be peer-to-peer or routed"
        ) from None
    return Welcome(
        _peer_id(fields["peer_id"].value, "peer_id"),
        _room(fields),
        tuple(_peer_id(peer, "every entry of peers") for peer in peers),
        media,
    )


def _media_track(value: object) -> MediaTrack:
    if not isinstance(value, dict):
        raise MalformedHubMessage(ErrorCode.INVALID_FIELD, "every track must be an object")
    missing = sorted(_TRACK_FIELDS - value.keys())
    unexpected = sorted(value.keys() - _TRACK_FIELDS)
    if missing or unexpected:
        raise MalformedHubMessage(
            ErrorCode.INVALID_FIELD, "a track has exactly the fields mid, kind and peer_id"
        )
    mid, kind = value["mid"], value["kind"]
    if not isinstance(mid, str) or _MID_PATTERN.fullmatch(mid) is None:
        raise MalformedHubMessage(ErrorCode.INVALID_FIELD, "a track's mid must be a mid")
    if kind not in MEDIA_KINDS:
        raise MalformedHubMessage(ErrorCode.INVALID_FIELD, "a track's kind is audio or video")
    return MediaTrack(mid, kind, _peer_id(value["peer_id"], "a track's peer_id"))


def _media_tracks(fields: dict[str, Field]) -> MediaTracks:
    tracks = fields["tracks"].value
    if not isinstance(tracks, list):
        raise MalformedHubMessage(ErrorCode.INVALID_FIELD, "field 'tracks' must be a list")
    parsed = tuple(_media_track(track) for track in tracks)
    if len({track.mid for track in parsed}) != len(parsed):
        raise MalformedHubMessage(ErrorCode.INVALID_FIELD, "a mid appears twice in tracks")
    return MediaTracks(parsed)


def _error(fields: dict[str, Field]) -> ErrorMessage:
    try:
        code = ErrorCode(_string(fields, "code"))
    except ValueError:
        raise MalformedHubMessage(ErrorCode.INVALID_FIELD, "unknown error code") from None
    return ErrorMessage(code, _string(fields, "message"))


def parse_hub_message(text: str) -> HubMessage:
    """Parse a frame the hub sent to a client, or raise ``MalformedHubMessage``."""
    fields = split_object(text)
    message_type = _message_type(fields)
    if message_type == "welcome":
        _check_members(fields, message_type, _WELCOME_FIELDS)
        return _welcome(fields)
    if message_type in ("peer-joined", "peer-left"):
        _check_members(fields, message_type, _PEER_FIELDS)
        peer = _peer_id(fields["peer_id"].value, "peer_id")
        return PeerJoined(peer) if message_type == "peer-joined" else PeerLeft(peer)
    if message_type == "relay":
        _check_members(fields, message_type, _RELAY_FROM_FIELDS)
        return RelayFrom(_peer_id(fields["from"].value, "from"), fields["payload"].text)
    if message_type == "error":
        _check_members(fields, message_type, _ERROR_FIELDS)
        return _error(fields)
    if message_type == "media-offer":
        _check_members(fields, message_type, _SDP_FIELDS)
        return MediaOffer(_string(fields, "sdp"))
    if message_type == "media-tracks":
        _check_members(fields, message_type, _MEDIA_TRACKS_FIELDS)
        return _media_tracks(fields)
    raise MalformedHubMessage(ErrorCode.UNKNOWN_TYPE, "unknown hub message type")
