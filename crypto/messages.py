"""The call's JSON messages, typed: the key agreement's four and the sealed channel's.

Each message is a frozen dataclass with ``parse(obj) -> Self``, which checks the envelope
(a JSON object of at most ``MAX_MESSAGE_SIZE`` bytes, version, type) and exactly the
listed fields and raises ``MalformedCallMessage`` (or ``UnexpectedCallMessage`` for a
well-formed message of another type) for anything else, and ``encode() -> dict``, the
wire JSON object. docs/reference/key-agreement.md (the key agreement messages, sealed messages
and rekey) is the specification.

    key agreement   {"v": 2, "type": "commit" | "accept" | "reveal" | "confirm",
                     "call_id": ..., <fields>}
    sealed          {"v": 2, "type": "sealed", "epoch": n, "seq": s, "ciphertext": b64}
    sealed inner    {"kind": "app" | "rekey" | "rekey-ack" | "rekey-done"
                             | "sender-key" | "sender-key-ack", <fields>}
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from crypto import strict_json
from crypto.errors import RemoteError
from crypto.identity import MAX_PEER_NAME_LENGTH, IdentityPublicKey, b64decode, b64encode
from crypto.names import check_normalized
from crypto.sender_keys import MAX_GENERATION, MAX_STEP, RATCHET_BITS, STEP_MASK, SenderKey
from crypto.sframe import CipherSuite

PROTOCOL_VERSION = 2
# A message is a JSON object carried as a hub payload; SDP with candidates is a few KiB.
MAX_MESSAGE_SIZE = 64 * 1024
MAX_CALL_ID_LENGTH = 128
# JSON numbers are exact up to 2^53 in every implementation; both stay far below it.
MAX_SEQUENCE = 2**48
MAX_EPOCH = 2**31
NONCE_SIZE = 32
HASH_SIZE = 32
SIGNATURE_SIZE = 64
X25519_KEY_SIZE = 32
IDENTITY_KEY_SIZE = 32
# The encrypted identity of ``reveal`` and ``confirm``: identity key, signature, name length
# and the name padded to its longest UTF-8 form, so every one has the same size whatever
# the name; plus the AES-GCM tag.
NAME_FIELD_SIZE = 2 + 4 * MAX_PEER_NAME_LENGTH
AUTH_PLAINTEXT_SIZE = IDENTITY_KEY_SIZE + SIGNATURE_SIZE + NAME_FIELD_SIZE
AUTH_TAG_SIZE = 16
AUTH_SIZE = AUTH_PLAINTEXT_SIZE + AUTH_TAG_SIZE


class MalformedCallMessage(RemoteError):
    """A call message is not strict JSON of the expected shape, version and sizes."""


class UnexpectedCallMessage(RemoteError):
    """A well-formed call message that this state machine does not accept now."""


# -- the JSON envelope --------------------------------------------------------------------


def encode_message(message: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a message (sorted keys, no spaces), for carrying or hashing.

    NaN and the infinities raise ``ValueError``: they are not JSON.
    """
    return strict_json.dumps(message)


def decode_message(data: bytes | str) -> dict[str, Any]:
    """A message from its JSON text; ``MalformedCallMessage`` for anything else.

    The text is strict JSON (``crypto.strict_json``): duplicate names, NaN, infinities
    (however spelled, ``1e400`` included) and deep nesting are malformed.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogatepass")
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_MESSAGE_SIZE:
        raise MalformedCallMessage(f"a message is JSON text of at most {MAX_MESSAGE_SIZE} bytes")
    try:
        message = strict_json.loads(data)
    except strict_json.StrictJsonError as error:
        raise MalformedCallMessage(f"a message is strict JSON: {error}") from error
    if not isinstance(message, dict):
        raise MalformedCallMessage("a message is a JSON object")
    return message


FieldParser = Callable[[Any], Any]


def message_type(message: object) -> str:
    """Check the envelope (object, size, version) and return the message's type."""
    if not isinstance(message, Mapping):
        raise MalformedCallMessage("a message is a JSON object")
    try:
        size = len(encode_message(message))
    except (TypeError, ValueError, RecursionError) as error:
        raise MalformedCallMessage("a message is made of JSON values") from error
    if size > MAX_MESSAGE_SIZE:
        raise MalformedCallMessage(f"a message is at most {MAX_MESSAGE_SIZE} bytes")
    if message.get("v") != PROTOCOL_VERSION or type(message.get("v")) is not int:
        raise MalformedCallMessage(
            f"unsupported protocol version; this is version {PROTOCOL_VERSION}"
        )
    kind = message.get("type")
    if not isinstance(kind, str):
        raise MalformedCallMessage("a message has a string type")
    return kind


def parse_fields(message: Mapping[str, Any], fields: Mapping[str, FieldParser]) -> dict[str, Any]:
    """Exactly the envelope and these fields, each through its parser."""
    expected = {"v", "type", *fields}
    if set(message) != expected:
        raise MalformedCallMessage(
            f"a {message['type']!r} message has exactly the fields {sorted(expected)}"
        )
    parsed = {}
    for name, parse in fields.items():
        try:
            parsed[name] = parse(message[name])
        except (TypeError, ValueError) as error:
            raise MalformedCallMessage(f"field {name!r}: {error}") from error
    return parsed


def _envelope_fields(obj: object, kind: str, fields: Mapping[str, FieldParser]) -> dict[str, Any]:
    found = message_type(obj)
    if found != kind:
        raise UnexpectedCallMessage(f"expected a {kind!r} message, got {found!r}")
    assert isinstance(obj, Mapping)  # message_type checked it
    return parse_fields(obj, fields)


def _envelope(kind: str, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": kind, **fields}


# -- field parsers ------------------------------------------------------------------------


def bytes_field(size: int) -> FieldParser:
    def parse(value: Any) -> bytes:
        data = b64decode(value)
        if len(data) != size:
            raise ValueError(f"is {size} bytes")
        return data

    return parse


def int_field(low: int, high: int) -> FieldParser:
    def parse(value: Any) -> int:
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"is an integer from {low} to {high}")
        return value

    return parse


def check_call_id(call_id: Any) -> None:
    if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_CALL_ID_LENGTH:
        raise ValueError(f"a call id is 1 to {MAX_CALL_ID_LENGTH} characters")
    try:
        call_id.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError("a call id is encodable as UTF-8") from error


def call_id_field(value: Any) -> str:
    check_call_id(value)
    result: str = value
    return result


def name_field(value: Any) -> str:
    """A peer's name: what it is pinned under, so 1 to 256 printable characters, normalised
    (crypto/names.py): a look-alike spelling is refused, never pinned as another peer."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PEER_NAME_LENGTH:
        raise ValueError(f"is 1 to {MAX_PEER_NAME_LENGTH} characters")
    if not value.isprintable():
        # No control characters, line breaks or lone surrogates: the name is shown to users.
        raise ValueError("is printable")
    check_normalized(value)
    return value


def suite_field(value: Any) -> CipherSuite:
    if type(value) is not int:
        raise ValueError("is a registered SFrame cipher suite code")
    try:
        return CipherSuite(value)
    except ValueError:
        raise ValueError("is a registered SFrame cipher suite code") from None


def suites_field(value: Any) -> tuple[CipherSuite, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= len(CipherSuite):
        raise ValueError(f"is a list of 1 to {len(CipherSuite)} suite codes")
    suites = tuple(suite_field(code) for code in value)
    if len(set(suites)) != len(suites):
        raise ValueError("lists each suite once")
    return suites


def identity_field(value: Any) -> IdentityPublicKey:
    return IdentityPublicKey(bytes_field(IDENTITY_KEY_SIZE)(value))


# -- the key agreement --------------------------------------------------------------------


@dataclass(frozen=True)
class Commit:
    """Initiator to responder: the offer, and a commitment to its ephemeral (nothing of who
    it is: that travels encrypted in ``reveal``)."""

    TYPE: ClassVar[str] = "commit"
    call_id: str
    suites: tuple[CipherSuite, ...]
    nonce: bytes
    commitment: bytes

    @classmethod
    def parse(cls, obj: object) -> Self:
        return cls(
            **_envelope_fields(
                obj,
                cls.TYPE,
                {
                    "call_id": call_id_field,
                    "suites": suites_field,
                    "nonce": bytes_field(NONCE_SIZE),
                    "commitment": bytes_field(HASH_SIZE),
                },
            )
        )

    def encode(self) -> dict[str, Any]:
        return _envelope(
            self.TYPE,
            call_id=self.call_id,
            suites=[int(suite) for suite in self.suites],
            nonce=b64encode(self.nonce),
            commitment=b64encode(self.commitment),
        )


@dataclass(frozen=True)
class Accept:
    """Responder to initiator: the chosen suite and its ephemeral (its identity comes last,
    in ``confirm``, once the initiator has authenticated)."""

    TYPE: ClassVar[str] = "accept"
    call_id: str
    suite: CipherSuite
    nonce: bytes
    ephemeral: bytes

    @classmethod
    def parse(cls, obj: object) -> Self:
        return cls(
            **_envelope_fields(
                obj,
                cls.TYPE,
                {
                    "call_id": call_id_field,
                    "suite": suite_field,
                    "nonce": bytes_field(NONCE_SIZE),
                    "ephemeral": bytes_field(X25519_KEY_SIZE),
                },
            )
        )

    def encode(self) -> dict[str, Any]:
        return _envelope(
            self.TYPE,
            call_id=self.call_id,
            suite=int(self.suite),
            nonce=b64encode(self.nonce),
            ephemeral=b64encode(self.ephemeral),
        )


@dataclass(frozen=True)
class Reveal:
    """Initiator to responder: the committed ephemeral, and its identity, name and signature
    encrypted under the initiator's handshake key (``auth``)."""

    TYPE: ClassVar[str] = "reveal"
    call_id: str
    ephemeral: bytes
    auth: bytes

    @classmethod
    def parse(cls, obj: object) -> Self:
        return cls(
            **_envelope_fields(
                obj,
                cls.TYPE,
                {
                    "call_id": call_id_field,
                    "ephemeral": bytes_field(X25519_KEY_SIZE),
                    "auth": bytes_field(AUTH_SIZE),
                },
            )
        )

    def encode(self) -> dict[str, Any]:
        return _envelope(
            self.TYPE,
            call_id=self.call_id,
            ephemeral=b64encode(self.ephemeral),
            auth=b64encode(self.auth),
        )


@dataclass(frozen=True)
class Confirm:
    """Responder to initiator: its identity, name and signature, encrypted under the
    responder's handshake key (``auth``)."""

    TYPE: ClassVar[str] = "confirm"
    call_id: str
    auth: bytes

    @classmethod
    def parse(cls, obj: object) -> Self:
        return cls(
            **_envelope_fields(
                obj,
                cls.TYPE,
                {"call_id": call_id_field, "auth": bytes_field(AUTH_SIZE)},
            )
        )

    def encode(self) -> dict[str, Any]:
        return _envelope(self.TYPE, call_id=self.call_id, auth=b64encode(self.auth))


@dataclass(frozen=True)
class Auth:
    """The plaintext of a ``reveal``'s or ``confirm``'s ``auth``: who the sender is, and its
    signature of the transcript. A fixed-size binary layout, so its ciphertext says nothing
    about the name::

        identity key (32) | signature (64) | name length in bytes (2, big-endian)
        | name (UTF-8) | zero bytes up to NAME_FIELD_SIZE
    """

    identity: IdentityPublicKey
    name: str
    signature: bytes

    @classmethod
    def parse(cls, data: bytes) -> Self:
        if len(data) != AUTH_PLAINTEXT_SIZE:
            raise MalformedCallMessage(f"an identity plaintext is {AUTH_PLAINTEXT_SIZE} bytes")
        identity = IdentityPublicKey(data[:IDENTITY_KEY_SIZE])
        signature = data[IDENTITY_KEY_SIZE : IDENTITY_KEY_SIZE + SIGNATURE_SIZE]
        name_field_bytes = data[IDENTITY_KEY_SIZE + SIGNATURE_SIZE :]
        length = int.from_bytes(name_field_bytes[:2], "big")
        encoded, padding = name_field_bytes[2 : 2 + length], name_field_bytes[2 + length :]
        if length > NAME_FIELD_SIZE - 2 or any(padding):
            raise MalformedCallMessage("an identity plaintext pads its name with zero bytes")
        try:
            name = name_field(encoded.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise MalformedCallMessage(f"field 'name': {error}") from error
        return cls(identity, name, signature)

    def encode(self) -> bytes:
        encoded = self.name.encode("utf-8")
        name = len(encoded).to_bytes(2, "big") + encoded
        return self.identity.raw + self.signature + name.ljust(NAME_FIELD_SIZE, b"\0")


HandshakeMessage = Commit | Accept | Reveal | Confirm
HANDSHAKE_MESSAGES: Mapping[str, type[HandshakeMessage]] = {
    cls.TYPE: cls for cls in (Commit, Accept, Reveal, Confirm)
}


# -- the sealed channel -------------------------------------------------------------------


@dataclass(frozen=True)
class Sealed:
    """A sealed message on the wire: its epoch, sequence number and AEAD ciphertext."""

    TYPE: ClassVar[str] = "sealed"
    epoch: int
    seq: int
    ciphertext: bytes

    @classmethod
    def parse(cls, obj: object) -> Self:
        return cls(
            **_envelope_fields(
                obj,
                cls.TYPE,
                {
                    "epoch": int_field(0, MAX_EPOCH),
                    "seq": int_field(0, MAX_SEQUENCE),
                    "ciphertext": b64decode,
                },
            )
        )

    def encode(self) -> dict[str, Any]:
        return _envelope(
            self.TYPE, epoch=self.epoch, seq=self.seq, ciphertext=b64encode(self.ciphertext)
        )


def _inner_fields(obj: object, kind: str, names: frozenset[str]) -> Mapping[str, Any]:
    """A sealed plaintext object of ``kind`` with exactly ``kind`` and ``names``."""
    if not isinstance(obj, Mapping):
        raise MalformedCallMessage("a sealed plaintext is a JSON object")
    found = obj.get("kind")
    if found != kind:
        raise UnexpectedCallMessage(f"expected a {kind!r} sealed message, got {found!r}")
    expected = {"kind", *names}
    if set(obj) != expected:
        raise MalformedCallMessage(f"a {kind!r} message has fields {sorted(expected)}")
    return obj


def _inner_epoch(kind: str, value: Any) -> int:
    # Not range-checked here: any epoch but the next one is unexpected, whatever its value.
    if type(value) is not int:
        raise MalformedCallMessage(f"the epoch of a {kind!r} message is an integer")
    return value


def _inner_ephemeral(value: Any) -> bytes:
    try:
        ephemeral: bytes = bytes_field(X25519_KEY_SIZE)(value)
    except ValueError as error:
        raise MalformedCallMessage("a rekey ephemeral is a 32-byte X25519 key") from error
    return ephemeral


def _inner_signature(value: Any) -> bytes:
    try:
        signature: bytes = bytes_field(SIGNATURE_SIZE)(value)
    except ValueError as error:
        raise MalformedCallMessage("a rekey signature is a 64-byte Ed25519 signature") from error
    return signature


@dataclass(frozen=True)
class App:
    """The application's message (SDP, candidates, bye): one JSON object."""

    KIND: ClassVar[str] = "app"
    content: dict[str, Any]

    @classmethod
    def parse(cls, obj: object) -> Self:
        content = _inner_fields(obj, cls.KIND, frozenset({"content"}))["content"]
        if not isinstance(content, dict):
            raise MalformedCallMessage("an application message carries one JSON object")
        return cls(content)

    def encode(self) -> dict[str, Any]:
        return {"kind": self.KIND, "content": self.content}


_REKEY_FIELDS = frozenset({"epoch", "ephemeral", "signature"})


@dataclass(frozen=True)
class Rekey:
    """A request for epoch ``epoch``: the requester's fresh X25519 public key, signed with
    its identity key (crypto/sealed.py, ``rekey_signed_content``)."""

    KIND: ClassVar[str] = "rekey"
    epoch: int
    ephemeral: bytes
    signature: bytes

    @classmethod
    def parse(cls, obj: object) -> Self:
        fields = _inner_fields(obj, cls.KIND, _REKEY_FIELDS)
        return cls(
            _inner_epoch(cls.KIND, fields["epoch"]),
            _inner_ephemeral(fields["ephemeral"]),
            _inner_signature(fields["signature"]),
        )

    def encode(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "epoch": self.epoch,
            "ephemeral": b64encode(self.ephemeral),
            "signature": b64encode(self.signature),
        }


@dataclass(frozen=True)
class RekeyAck:
    """The accepter's answer: its fresh X25519 public key, signed with its identity key over
    both ephemerals (the last message of epoch n)."""

    KIND: ClassVar[str] = "rekey-ack"
    epoch: int
    ephemeral: bytes
    signature: bytes

    @classmethod
    def parse(cls, obj: object) -> Self:
        fields = _inner_fields(obj, cls.KIND, _REKEY_FIELDS)
        return cls(
            _inner_epoch(cls.KIND, fields["epoch"]),
            _inner_ephemeral(fields["ephemeral"]),
            _inner_signature(fields["signature"]),
        )

    def encode(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "epoch": self.epoch,
            "ephemeral": b64encode(self.ephemeral),
            "signature": b64encode(self.signature),
        }


@dataclass(frozen=True)
class RekeyDone:
    """The requester's first message of the new epoch: it holds the new keys."""

    KIND: ClassVar[str] = "rekey-done"
    epoch: int

    @classmethod
    def parse(cls, obj: object) -> Self:
        fields = _inner_fields(obj, cls.KIND, frozenset({"epoch"}))
        return cls(_inner_epoch(cls.KIND, fields["epoch"]))

    def encode(self) -> dict[str, Any]:
        return {"kind": self.KIND, "epoch": self.epoch}


def _inner_parsed(obj: object, kind: str, parsers: Mapping[str, FieldParser]) -> dict[str, Any]:
    """A sealed plaintext object of ``kind`` with exactly ``parsers``' fields, each parsed."""
    fields = _inner_fields(obj, kind, frozenset(parsers))
    parsed = {}
    for name, parse in parsers.items():
        try:
            parsed[name] = parse(fields[name])
        except (TypeError, ValueError) as error:
            raise MalformedCallMessage(f"field {name!r} of a {kind!r} message: {error}") from error
    return parsed


# The largest KID of a sender key (crypto/sender_keys.py), well inside JSON's exact integers.
MAX_SENDER_KEY_KID = (MAX_GENERATION << RATCHET_BITS) | STEP_MASK


@dataclass(frozen=True)
class SenderKeyMessage:
    """The sender's SFrame key for group frames (crypto/sender_keys.py): suite, generation,
    ratchet step and base key. Only ever sent sealed: its encoding holds the base key."""

    KIND: ClassVar[str] = "sender-key"
    key: SenderKey

    @classmethod
    def parse(cls, obj: object) -> Self:
        fields = _inner_parsed(
            obj,
            cls.KIND,
            {
                "suite": suite_field,
                "generation": int_field(0, MAX_GENERATION),
                "step": int_field(0, MAX_STEP),
                "base_key": b64decode,
            },
        )
        suite, base_key = fields["suite"], fields["base_key"]
        if len(base_key) != suite.nh:
            raise MalformedCallMessage(
                f"field 'base_key' of a {cls.KIND!r} message: is {suite.nh} bytes for its suite"
            )
        return cls(SenderKey(suite, fields["generation"], fields["step"], base_key))

    def encode(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "suite": int(self.key.suite),
            "generation": self.key.generation,
            "step": self.key.step,
            "base_key": b64encode(self.key._sealable_base_key()),
        }


@dataclass(frozen=True)
class SenderKeyAck:
    """The receiver of a ``sender-key`` holds it: the sender may switch to it (its KID)."""

    KIND: ClassVar[str] = "sender-key-ack"
    kid: int

    @classmethod
    def parse(cls, obj: object) -> Self:
        return cls(**_inner_parsed(obj, cls.KIND, {"kid": int_field(0, MAX_SENDER_KEY_KID)}))

    def encode(self) -> dict[str, Any]:
        return {"kind": self.KIND, "kid": self.kid}


InnerMessage = App | Rekey | RekeyAck | RekeyDone | SenderKeyMessage | SenderKeyAck
INNER_MESSAGES: Mapping[str, type[InnerMessage]] = {
    cls.KIND: cls for cls in (App, Rekey, RekeyAck, RekeyDone, SenderKeyMessage, SenderKeyAck)
}
