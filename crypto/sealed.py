"""After the handshake: epochs of keys, sealed signalling and rekeying.

A call's keys live in numbered epochs. Each epoch has one secret from which both
directions' SFrame base keys and signalling sealing keys are derived. The handshake
(crypto/handshake.py) produces epoch 0; a rekey produces epoch n+1 from a fresh X25519
exchange mixed with epoch n's secret, which gives forward secrecy (old epochs cannot be
recomputed once erased) and post-compromise healing (a thief of epoch n who only
listens cannot follow into epoch n+1). See docs/protocol.md.

Every signalling message after the handshake goes through a ``SealedChannel``:
ChaCha20-Poly1305 under the sending direction's key of the current epoch, with the
sequence number as nonce and (call id, direction, epoch, sequence number) as associated
data. The hub can neither read nor rewrite it, and replay, reordering and dropping are
each detected with their own error.

This module also holds the JSON message format shared with the handshake.
"""

import enum
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from crypto.errors import LocalError, RemoteError
from crypto.identity import b64decode, b64encode

PROTOCOL_VERSION = 1
# A message is a JSON object carried as a hub payload; SDP with candidates is a few KiB.
MAX_MESSAGE_SIZE = 64 * 1024
MAX_SEALED_CONTENT_SIZE = 32 * 1024
MAX_CALL_ID_LENGTH = 128
# JSON numbers are exact up to 2^53 in every implementation; both stay far below it.
MAX_SEQUENCE = 2**48
MAX_EPOCH = 2**31
KEY_SIZE = 32
X25519_KEY_SIZE = 32

LABEL_PREFIX = b"blindhub-v1 "
# SFrame KIDs: 2 * epoch + 0 for the handshake initiator's frames, + 1 for the
# responder's, so the two senders never share a KID and epochs 0-3 fit the one-byte header.
KIDS_PER_EPOCH = 2


class MalformedMessage(RemoteError):
    """A message is not valid JSON of the expected shape, version and sizes."""


class UnexpectedMessage(RemoteError):
    """A well-formed message that this state machine does not accept now."""


class WrongCall(RemoteError):
    """A message names a different call id: it belongs to another call."""


class DecryptionFailed(RemoteError):
    """A sealed message does not authenticate under any key this channel holds."""


class SealedReplay(RemoteError):
    """A sealed message that was already delivered (or from an erased epoch) came again."""


class SealedGap(RemoteError):
    """A sealed message arrived before an earlier one: at least one message is missing."""


class SealedReorder(RemoteError):
    """A sealed message arrived after a later one of the same sender."""


class Role(enum.Enum):
    """The party's role in the handshake; it names the two directions of every key."""

    INITIATOR = "initiator"
    RESPONDER = "responder"

    @property
    def peer(self) -> "Role":
        return Role.RESPONDER if self is Role.INITIATOR else Role.INITIATOR

    @property
    def kid_offset(self) -> int:
        return 0 if self is Role.INITIATOR else 1

    @property
    def wire_byte(self) -> bytes:
        return b"I" if self is Role.INITIATOR else b"R"


# -- the JSON message format -------------------------------------------------------------


def encode_message(message: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a message (sorted keys, no spaces), for carrying or hashing.

    NaN and the infinities raise ``ValueError``: they are not JSON.
    """
    return json.dumps(message, sort_keys=True, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )


class _AmbiguousJson(ValueError):
    pass


def _reject_duplicate_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _AmbiguousJson("duplicate name in a JSON object")
    return result


def _reject_constant(name: str) -> None:
    raise _AmbiguousJson(f"{name} is not JSON")


# Strict JSON (RFC 8259 without its interoperability gaps): Python's json accepts NaN and
# Infinity, and keeps the last of duplicate names where other parsers keep the first.
# The hub client applies the same rule to relayed payloads (signaling.protocol).
_STRICT_DECODER = json.JSONDecoder(
    object_pairs_hook=_reject_duplicate_names, parse_constant=_reject_constant, strict=True
)


def decode_message(data: bytes | str) -> dict[str, Any]:
    """A message from its JSON text; ``MalformedMessage`` for anything else.

    Duplicate names in any object and NaN or infinities anywhere are malformed.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogatepass")
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_MESSAGE_SIZE:
        raise MalformedMessage(f"a message is JSON text of at most {MAX_MESSAGE_SIZE} bytes")
    try:
        message = _STRICT_DECODER.decode(bytes(data).decode("utf-8"))
    except _AmbiguousJson as error:
        raise MalformedMessage(f"a message is strict JSON: {error}") from error
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise MalformedMessage("a message is UTF-8 JSON") from error
    if not isinstance(message, dict):
        raise MalformedMessage("a message is a JSON object")
    return message


FieldParser = Callable[[Any], Any]


def message_type(message: Any) -> str:
    """Check the envelope (object, size, version) and return the message's type."""
    if not isinstance(message, Mapping):
        raise MalformedMessage("a message is a JSON object")
    try:
        size = len(encode_message(message))
    except (TypeError, ValueError, RecursionError) as error:
        raise MalformedMessage("a message is made of JSON values") from error
    if size > MAX_MESSAGE_SIZE:
        raise MalformedMessage(f"a message is at most {MAX_MESSAGE_SIZE} bytes")
    if message.get("v") != PROTOCOL_VERSION or type(message.get("v")) is not int:
        raise MalformedMessage(f"unsupported protocol version; this is version {PROTOCOL_VERSION}")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise MalformedMessage("a message has a string type")
    return kind


def parse_fields(message: Mapping[str, Any], fields: Mapping[str, FieldParser]) -> dict[str, Any]:
    """Exactly the envelope and these fields, each through its parser."""
    expected = {"v", "type", *fields}
    if set(message) != expected:
        raise MalformedMessage(
            f"a {message['type']!r} message has exactly the fields {sorted(expected)}"
        )
    parsed = {}
    for name, parse in fields.items():
        try:
            parsed[name] = parse(message[name])
        except (TypeError, ValueError) as error:
            raise MalformedMessage(f"field {name!r}: {error}") from error
    return parsed


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


def call_id_field(value: Any) -> str:
    check_call_id(value)
    result: str = value
    return result


def check_call_id(call_id: Any) -> None:
    if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_CALL_ID_LENGTH:
        raise ValueError(f"a call id is 1 to {MAX_CALL_ID_LENGTH} characters")
    try:
        call_id.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError("a call id is encodable as UTF-8") from error


def length_prefixed(*parts: bytes) -> bytes:
    """Unambiguous concatenation: each part preceded by its 4-byte big-endian length."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


# -- the key schedule of an epoch --------------------------------------------------------


def hkdf_extract(salt: bytes, input_key_material: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 5869 section 2.2: HMAC keyed by the salt)."""
    return hmac.new(salt, input_key_material, hashlib.sha256).digest()


def hkdf_expand(pseudorandom_key: bytes, label: str, context: bytes = b"") -> bytes:
    """HKDF-Expand with SHA-256 to 32 bytes; info is ``blindhub-v1 <label>`` and context."""
    info = LABEL_PREFIX + label.encode("ascii") + context
    return HKDFExpand(hashes.SHA256(), KEY_SIZE, info).derive(pseudorandom_key)


@dataclass(frozen=True)
class MediaKey:
    """One sender's SFrame key of one epoch: its KID and 32-byte base key."""

    epoch: int
    kid: int
    base_key: bytes = field(repr=False)


@dataclass(frozen=True)
class EpochKeys:
    """Every key of one epoch, seen from one party: what it sends with and receives with."""

    epoch: int
    send: MediaKey
    receive: MediaKey
    seal_send: bytes = field(repr=False)
    seal_receive: bytes = field(repr=False)


def derive_epoch_keys(epoch_secret: bytes, epoch: int, role: Role) -> EpochKeys:
    """Both directions' SFrame base keys and sealing keys, from ``role``'s point of view."""

    def media(sender: Role) -> MediaKey:
        base_key = hkdf_expand(epoch_secret, f"sframe {sender.value}")
        return MediaKey(epoch, KIDS_PER_EPOCH * epoch + sender.kid_offset, base_key)

    return EpochKeys(
        epoch=epoch,
        send=media(role),
        receive=media(role.peer),
        seal_send=hkdf_expand(epoch_secret, f"seal {role.value}"),
        seal_receive=hkdf_expand(epoch_secret, f"seal {role.peer.value}"),
    )


def next_epoch_secret(
    epoch_secret: bytes, new_epoch: int, shared_secret: bytes, requester: bytes, accepter: bytes
) -> bytes:
    """Epoch n+1: the fresh X25519 secret extracted under epoch n's secret as salt."""
    pseudorandom_key = hkdf_extract(epoch_secret, shared_secret)
    context = new_epoch.to_bytes(4, "big") + requester + accepter
    return hkdf_expand(pseudorandom_key, "epoch", context)


def x25519_shared_secret(private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 secret; an all-zero result (a small-order peer key) is the peer's fault."""
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:
        raise MalformedMessage("the peer's ephemeral key is a small-order point") from error


def x25519_public_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes_raw()


# -- the sealed channel ------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """What one opened sealed message means for the caller.

    ``content``: the application's message, or None for the channel's own (rekey) messages.
    ``replies``: wire messages to send to the peer now, in order.
    ``install_receive``: a new epoch's receive key; accept frames under it from now on and
    keep the previous one for a short grace window for frames in flight.
    ``switch_send``: encrypt every frame from now on under this key (the peer holds it).
    """

    content: dict[str, Any] | None = None
    replies: list[dict[str, Any]] = field(default_factory=list)
    install_receive: MediaKey | None = None
    switch_send: MediaKey | None = None


@dataclass
class _PendingRekey:
    """A rekey this side asked for and the peer has not acknowledged yet."""

    epoch: int
    private_key: X25519PrivateKey = field(repr=False)
    public_key: bytes


class SealedChannel:
    """Sealed signalling in both directions, and the epochs of the call's keys.

    One instance per call and party; ``crypto.handshake`` creates it. An error from
    ``open`` leaves the channel as it was (a forged or replayed message changes nothing),
    with one exception: an authentic message that arrives early (``SealedGap``) is
    remembered as the highest sequence number seen, so the missing one, if it comes
    later, is a ``SealedReorder``. The call should still be ended, since the hub is
    misbehaving.
    """

    def __init__(
        self,
        role: Role,
        call_id: str,
        epoch_secret: bytes,
        random_bytes: Callable[[int], bytes],
    ) -> None:
        check_call_id(call_id)
        self.role = role
        self.call_id = call_id
        self._random_bytes = random_bytes
        self._secret = epoch_secret
        self._keys = derive_epoch_keys(epoch_secret, 0, role)
        self._send_key = self._keys.seal_send
        self._send_epoch = 0
        self._send_sequence = 0
        self._receive_key = self._keys.seal_receive
        self._receive_epoch = 0
        self._receive_sequence = 0
        self._highest_seen = -1
        self._pending_rekey: _PendingRekey | None = None
        # After acknowledging a rekey: the new epoch's keys, until the peer's first
        # message under them (a "rekey-done") arrives.
        self._awaiting_done: EpochKeys | None = None

    def __repr__(self) -> str:
        return f"SealedChannel({self.role.value}, call_id={self.call_id!r}, epoch={self.epoch})"

    @property
    def epoch(self) -> int:
        """The newest epoch whose keys this side has derived."""
        return self._keys.epoch

    @property
    def keys(self) -> EpochKeys:
        """The newest epoch's keys (see ``Received`` for when to start using them)."""
        return self._keys

    @property
    def rekey_in_progress(self) -> bool:
        return self._pending_rekey is not None or self._awaiting_done is not None

    # -- sending

    def seal(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """The wire message carrying ``content``, an application JSON object."""
        if not isinstance(content, Mapping):
            raise LocalError("sealed content is a JSON object")
        return self._seal_inner({"kind": "app", "content": dict(content)})

    def start_rekey(self) -> dict[str, Any]:
        """Ask the peer for a new epoch; the keys arrive in a later ``Received``."""
        if self.rekey_in_progress:
            raise LocalError("a rekey is already in progress")
        if self.epoch + 1 > MAX_EPOCH:
            raise LocalError("no epochs left in this call")
        private_key = X25519PrivateKey.from_private_bytes(self._random_bytes(X25519_KEY_SIZE))
        self._pending_rekey = _PendingRekey(
            self.epoch + 1, private_key, x25519_public_bytes(private_key)
        )
        return self._seal_inner(
            {
                "kind": "rekey",
                "epoch": self._pending_rekey.epoch,
                "ephemeral": b64encode(self._pending_rekey.public_key),
            }
        )

    def _seal_inner(self, inner: dict[str, Any]) -> dict[str, Any]:
        try:
            plaintext = encode_message(inner)
        except (TypeError, ValueError, RecursionError) as error:
            raise LocalError("sealed content is made of JSON values") from error
        if len(plaintext) > MAX_SEALED_CONTENT_SIZE:
            raise LocalError(f"sealed content is at most {MAX_SEALED_CONTENT_SIZE} bytes")
        if self._send_sequence >= MAX_SEQUENCE:
            raise LocalError("no sequence numbers left in this call")
        sequence = self._send_sequence
        associated = self._associated_data(self.role, self._send_epoch, sequence)
        ciphertext = ChaCha20Poly1305(self._send_key).encrypt(
            _nonce(sequence), plaintext, associated
        )
        self._send_sequence += 1
        return {
            "v": PROTOCOL_VERSION,
            "type": "sealed",
            "epoch": self._send_epoch,
            "seq": sequence,
            "ciphertext": b64encode(ciphertext),
        }

    def _associated_data(self, sender: Role, epoch: int, sequence: int) -> bytes:
        return (
            LABEL_PREFIX
            + b"sealed"
            + length_prefixed(self.call_id.encode("utf-8"))
            + sender.wire_byte
            + epoch.to_bytes(4, "big")
            + sequence.to_bytes(8, "big")
        )

    # -- receiving

    def open(self, message: Any) -> Received:
        """Authenticate, order-check and interpret one sealed wire message."""
        kind = message_type(message)
        if kind != "sealed":
            raise UnexpectedMessage(f"after the handshake only sealed messages come; got {kind!r}")
        fields = parse_fields(
            message,
            {
                "epoch": int_field(0, MAX_EPOCH),
                "seq": int_field(0, MAX_SEQUENCE),
                "ciphertext": lambda value: b64decode(value),
            },
        )
        epoch, sequence = fields["epoch"], fields["seq"]
        if epoch < self._receive_epoch:
            raise SealedReplay(f"message from epoch {epoch}, whose keys are erased")
        if epoch == self._receive_epoch:
            key = self._receive_key
        elif self._awaiting_done is not None and epoch == self._awaiting_done.epoch:
            key = self._awaiting_done.seal_receive
        else:
            raise DecryptionFailed(f"no key for epoch {epoch}")
        associated = self._associated_data(self.role.peer, epoch, sequence)
        try:
            plaintext = ChaCha20Poly1305(key).decrypt(
                _nonce(sequence), fields["ciphertext"], associated
            )
        except InvalidTag as error:
            raise DecryptionFailed("sealed message does not authenticate") from error
        self._check_sequence(sequence)
        inner = decode_message(plaintext)
        received = self._interpret(inner, epoch)
        self._receive_sequence += 1
        return received

    def _check_sequence(self, sequence: int) -> None:
        expected = self._receive_sequence
        if sequence < expected:
            raise SealedReplay(f"sealed message {sequence} was already delivered")
        if sequence > expected:
            self._highest_seen = max(self._highest_seen, sequence)
            raise SealedGap(f"sealed message {sequence} arrived while {expected} is missing")
        if self._highest_seen > sequence:
            raise SealedReorder(
                f"sealed message {sequence} arrived after message {self._highest_seen}"
            )

    def _interpret(self, inner: dict[str, Any], epoch: int) -> Received:
        kind = inner.get("kind")
        opens_new_epoch = self._awaiting_done is not None and epoch == self._awaiting_done.epoch
        if opens_new_epoch and kind != "rekey-done":
            raise UnexpectedMessage("the first message of a new epoch is 'rekey-done'")
        handlers = {
            "app": self._on_app,
            "rekey": self._on_rekey,
            "rekey-ack": self._on_rekey_ack,
            "rekey-done": self._on_rekey_done,
        }
        if not isinstance(kind, str) or kind not in handlers:
            raise MalformedMessage("unknown sealed message kind")
        return handlers[kind](inner)

    def _on_app(self, inner: dict[str, Any]) -> Received:
        content = inner.get("content")
        if set(inner) != {"kind", "content"} or not isinstance(content, dict):
            raise MalformedMessage("an application message carries one JSON object")
        return Received(content=content)

    def _rekey_fields(self, inner: dict[str, Any], with_ephemeral: bool) -> tuple[int, bytes]:
        expected = {"kind", "epoch", "ephemeral"} if with_ephemeral else {"kind", "epoch"}
        epoch = inner.get("epoch")
        if set(inner) != expected or type(epoch) is not int:
            raise MalformedMessage(f"a {inner['kind']!r} message has fields {sorted(expected)}")
        if not with_ephemeral:
            return epoch, b""
        try:
            return epoch, bytes_field(X25519_KEY_SIZE)(inner["ephemeral"])
        except ValueError as error:
            raise MalformedMessage("a rekey ephemeral is a 32-byte X25519 key") from error

    def _on_rekey(self, inner: dict[str, Any]) -> Received:
        epoch, peer_public = self._rekey_fields(inner, with_ephemeral=True)
        if self._awaiting_done is not None or epoch != self.epoch + 1:
            raise UnexpectedMessage(f"a rekey to epoch {epoch} is not expected now")
        if self._pending_rekey is not None:
            # Both asked at once: the handshake initiator's request wins, the other is dropped.
            if self.role is Role.INITIATOR:
                return Received()
            self._pending_rekey = None
        private_key = X25519PrivateKey.from_private_bytes(self._random_bytes(X25519_KEY_SIZE))
        public_key = x25519_public_bytes(private_key)
        shared = x25519_shared_secret(private_key, peer_public)
        ack = self._seal_inner(
            {"kind": "rekey-ack", "epoch": epoch, "ephemeral": b64encode(public_key)}
        )
        new_keys = self._advance(epoch, shared, requester=peer_public, accepter=public_key)
        # The peer reads our messages under the new key once it has our ack; its own
        # messages switch after its "rekey-done", and so do our frames.
        self._send_key, self._send_epoch = new_keys.seal_send, epoch
        self._awaiting_done = new_keys
        return Received(replies=[ack], install_receive=new_keys.receive)

    def _on_rekey_ack(self, inner: dict[str, Any]) -> Received:
        epoch, peer_public = self._rekey_fields(inner, with_ephemeral=True)
        pending = self._pending_rekey
        if pending is None or epoch != pending.epoch:
            raise UnexpectedMessage(f"no rekey to epoch {epoch} was requested")
        shared = x25519_shared_secret(pending.private_key, peer_public)
        new_keys = self._advance(epoch, shared, requester=pending.public_key, accepter=peer_public)
        self._pending_rekey = None
        # The ack was the peer's last message under the old epoch.
        self._receive_key, self._receive_epoch = new_keys.seal_receive, epoch
        self._send_key, self._send_epoch = new_keys.seal_send, epoch
        done = self._seal_inner({"kind": "rekey-done", "epoch": epoch})
        return Received(replies=[done], install_receive=new_keys.receive, switch_send=new_keys.send)

    def _on_rekey_done(self, inner: dict[str, Any]) -> Received:
        epoch, _ = self._rekey_fields(inner, with_ephemeral=False)
        new_keys = self._awaiting_done
        if new_keys is None or epoch != new_keys.epoch:
            raise UnexpectedMessage(f"no rekey to epoch {epoch} awaits completion")
        self._receive_key, self._receive_epoch = new_keys.seal_receive, epoch
        self._awaiting_done = None
        return Received(switch_send=new_keys.send)

    def _advance(self, epoch: int, shared: bytes, requester: bytes, accepter: bytes) -> EpochKeys:
        self._secret = next_epoch_secret(self._secret, epoch, shared, requester, accepter)
        self._keys = derive_epoch_keys(self._secret, epoch, self.role)
        return self._keys


def _nonce(sequence: int) -> bytes:
    # Each (key, sequence) pair is used once: keys are per direction and epoch, and the
    # sequence number only grows.
    return bytes(4) + sequence.to_bytes(8, "big")
