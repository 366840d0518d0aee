"""After the handshake: epochs of keys, sealed signalling and rekeying.

A call's keys live in numbered epochs. Each epoch has one secret from which both
directions' SFrame base keys and signalling sealing keys are derived. The handshake
(crypto/handshake.py) produces epoch 0; a rekey produces epoch n+1 from a fresh X25519
exchange mixed with epoch n's secret, which gives forward secrecy (old epochs cannot be
recomputed once erased) and post-compromise healing: each rekey message is also signed
with the sender's identity key, over the call and both fresh keys, so a thief of epoch
n's secret without the identity keys cannot run either leg, even as an active hub, and
is locked out of epoch n+1. See docs/explanation/protocol.md.

Every signalling message after the handshake goes through a ``SealedChannel``:
AES-256-GCM under the sending direction's key of the current epoch, with the
sequence number as nonce and (call id, direction, epoch, sequence number) as associated
data. The hub can neither read nor rewrite it, and replay, reordering and dropping are
each detected with their own error.

The messages themselves are typed in crypto/messages.py.
"""

import enum
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from crypto.errors import LocalError, RemoteError
from crypto.frame_crypto import KeyUpdate, MediaKey
from crypto.identity import IdentityKey, IdentityPublicKey
from crypto.messages import (
    INNER_MESSAGES,
    MAX_EPOCH,
    MAX_SEQUENCE,
    X25519_KEY_SIZE,
    App,
    InnerMessage,
    MalformedCallMessage,
    Rekey,
    RekeyAck,
    RekeyDone,
    Sealed,
    SenderKeyAck,
    SenderKeyMessage,
    UnexpectedCallMessage,
    check_call_id,
    decode_message,
    encode_message,
)
from crypto.sender_keys import SenderKey

MAX_SEALED_CONTENT_SIZE = 32 * 1024
KEY_SIZE = 32

LABEL_PREFIX = b"blindhub-v2 "
# SFrame KIDs: 2 * epoch + 0 for the handshake initiator's frames, + 1 for the
# responder's, so the two senders never share a KID and epochs 0-3 fit the one-byte header.
KIDS_PER_EPOCH = 2


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


def length_prefixed(*parts: bytes) -> bytes:
    """Unambiguous concatenation: each part preceded by its 4-byte big-endian length."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


# -- the key schedule of an epoch --------------------------------------------------------


def hkdf_extract(salt: bytes, input_key_material: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 5869 section 2.2: HMAC keyed by the salt)."""
    return hmac.new(salt, input_key_material, hashlib.sha256).digest()


def hkdf_expand(pseudorandom_key: bytes, label: str, context: bytes = b"") -> bytes:
    """HKDF-Expand with SHA-256 to 32 bytes; info is ``blindhub-v2 <label>`` and context.

    (One HMAC-SHA-256 of info and 0x01 under the key, which WebCrypto's HMAC computes.)"""
    info = LABEL_PREFIX + label.encode("ascii") + context
    return HKDFExpand(hashes.SHA256(), KEY_SIZE, info).derive(pseudorandom_key)


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


def rekey_signed_content(
    kind: str,
    signer: Role,
    call_id: str,
    transcript_hash: bytes,
    epoch: int,
    *ephemerals: bytes,
) -> bytes:
    """What a ``rekey`` or ``rekey-ack`` signs: its kind and the signer's role (so neither
    can be reflected nor passed off as the other), the call and its key agreement (the
    transcript hash T, which covers both identities), the new epoch, and the rekey
    ephemerals known so far (the requester's; the requester's and the accepter's)."""
    return (
        LABEL_PREFIX
        + kind.encode("ascii")
        + b" "
        + signer.value.encode("ascii")
        + length_prefixed(
            call_id.encode("utf-8"), transcript_hash, epoch.to_bytes(4, "big"), *ephemerals
        )
    )


def x25519_shared_secret(private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 secret; an all-zero result (a small-order peer key) is the peer's fault."""
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:
        raise MalformedCallMessage("the peer's ephemeral key is a small-order point") from error


def x25519_public_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes_raw()


# -- the sealed channel ------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """What one opened sealed message means for the caller.

    ``content``: the application's message, or None for the channel's own (rekey) messages.
    ``replies``: wire messages to send to the peer now, in order.
    ``keys``: what to install in the SFrame sender and receiver now (``apply_key_update``),
    the same kind of object as the handshake's ``initial_keys``.
    ``sender_key``: the peer's group sender key (crypto/sender_keys.py), to add to its
    ``SenderKeyReceiver`` and acknowledge; ``sender_key_ack``: the KID of one of our sender
    keys that the peer now holds.
    """

    content: dict[str, Any] | None = None
    replies: list[dict[str, Any]] = field(default_factory=list)
    keys: KeyUpdate = field(default_factory=KeyUpdate)
    sender_key: SenderKey | None = None
    sender_key_ack: int | None = None


class RekeyState(enum.Enum):
    """Where this side is in a rekey; docs/reference/key-agreement.md (Rekey) has the table."""

    IDLE = "idle"
    REQUESTED = "requested"  # our ``rekey`` is out; the peer's ``rekey-ack`` is due
    AWAITING_DONE = "awaiting-done"  # we acknowledged; the peer's ``rekey-done`` is due


# Every (from, to) move of the rekey state; ``_enter`` refuses any other.
REKEY_TRANSITIONS: frozenset[tuple[RekeyState, RekeyState]] = frozenset(
    {
        (RekeyState.IDLE, RekeyState.REQUESTED),  # start_rekey()
        (RekeyState.IDLE, RekeyState.AWAITING_DONE),  # the peer's rekey, acknowledged
        (RekeyState.REQUESTED, RekeyState.IDLE),  # the peer's rekey-ack; our rekey-done sent
        (RekeyState.REQUESTED, RekeyState.AWAITING_DONE),  # both asked; the responder yields
        (RekeyState.AWAITING_DONE, RekeyState.IDLE),  # the peer's rekey-done
    }
)


@dataclass(frozen=True)
class _Idle:
    state: ClassVar[RekeyState] = RekeyState.IDLE


@dataclass(frozen=True)
class _Requested:
    """Our request: the epoch asked for and our fresh X25519 key pair."""

    epoch: int
    private_key: X25519PrivateKey = field(repr=False)
    public_key: bytes
    state: ClassVar[RekeyState] = RekeyState.REQUESTED


@dataclass(frozen=True)
class _AwaitingDone:
    """The new epoch's keys, derived when we acknowledged, in use once its rekey-done comes."""

    keys: EpochKeys
    state: ClassVar[RekeyState] = RekeyState.AWAITING_DONE


_RekeyData = _Idle | _Requested | _AwaitingDone
_Handler = Callable[["SealedChannel", Any], Received]


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
        *,
        identity: IdentityKey,
        peer_identity: IdentityPublicKey,
        transcript_hash: bytes,
    ) -> None:
        """``identity`` signs our rekey messages, ``peer_identity`` verifies the peer's, both
        over ``transcript_hash``: the key agreement's, which names both parties."""
        check_call_id(call_id)
        self.role = role
        self.call_id = call_id
        self._identity = identity
        self.peer_identity = peer_identity
        self.transcript_hash = transcript_hash
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
        self._rekey: _RekeyData = _Idle()

    def __repr__(self) -> str:
        return (
            f"SealedChannel({self.role.value}, call_id={self.call_id!r}, epoch={self.epoch}, "
            f"rekey={self.rekey_state.value})"
        )

    @property
    def epoch(self) -> int:
        """The newest epoch whose keys this side has derived."""
        return self._keys.epoch

    @property
    def keys(self) -> EpochKeys:
        """The newest epoch's keys (see ``Received`` for when to start using them)."""
        return self._keys

    @property
    def rekey_state(self) -> RekeyState:
        return self._rekey.state

    @property
    def rekey_in_progress(self) -> bool:
        return self.rekey_state is not RekeyState.IDLE

    def _enter(self, data: _RekeyData) -> None:
        if (self.rekey_state, data.state) not in REKEY_TRANSITIONS:
            # Unreachable through the dispatch table; a bug here must not go on quietly.
            raise LocalError(f"no rekey transition {self.rekey_state.value} -> {data.state.value}")
        self._rekey = data

    # -- sending

    def seal(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """The wire message carrying ``content``, an application JSON object."""
        if not isinstance(content, Mapping):
            raise LocalError("sealed content is a JSON object")
        return self._seal(App(dict(content)))

    def seal_sender_key(self, key: SenderKey) -> dict[str, Any]:
        """The wire message giving the peer our group sender key ``key``; its base key exists
        outside this process only inside the sealed ciphertext."""
        if not isinstance(key, SenderKey):
            raise LocalError("a sender key is a crypto.sender_keys.SenderKey")
        return self._seal(SenderKeyMessage(key))

    def seal_sender_key_ack(self, kid: int) -> dict[str, Any]:
        """The wire message telling the peer we hold its sender key of KID ``kid``."""
        return self._seal(SenderKeyAck(kid))

    def start_rekey(self) -> dict[str, Any]:
        """Ask the peer for a new epoch; the keys arrive in a later ``Received``."""
        if self.rekey_in_progress:
            raise LocalError("a rekey is already in progress")
        if self.epoch + 1 > MAX_EPOCH:
            raise LocalError("no epochs left in this call")
        private_key = X25519PrivateKey.from_private_bytes(self._random_bytes(X25519_KEY_SIZE))
        request = _Requested(self.epoch + 1, private_key, x25519_public_bytes(private_key))
        signature = self._sign(Rekey.KIND, request.epoch, request.public_key)
        self._enter(request)
        return self._seal(Rekey(request.epoch, request.public_key, signature))

    def _sign(self, kind: str, epoch: int, *ephemerals: bytes) -> bytes:
        return self._identity.sign(
            rekey_signed_content(
                kind, self.role, self.call_id, self.transcript_hash, epoch, *ephemerals
            )
        )

    def _verify(self, kind: str, signature: bytes, epoch: int, *ephemerals: bytes) -> None:
        """The peer's signature (``BadSignature``): whoever holds only the epoch's secret,
        and so its sealing keys, cannot make one."""
        self.peer_identity.verify(
            rekey_signed_content(
                kind, self.role.peer, self.call_id, self.transcript_hash, epoch, *ephemerals
            ),
            signature,
        )

    def _seal(self, inner: InnerMessage) -> dict[str, Any]:
        return self._seal_inner(inner.encode())

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
        ciphertext = AESGCM(self._send_key).encrypt(_nonce(sequence), plaintext, associated)
        self._send_sequence += 1
        return Sealed(self._send_epoch, sequence, ciphertext).encode()

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

    def open(self, message: object) -> Received:
        """Authenticate, order-check and interpret one sealed wire message."""
        sealed = Sealed.parse(message)  # after the handshake only sealed messages come
        epoch, sequence = sealed.epoch, sealed.seq
        awaiting = self._rekey if isinstance(self._rekey, _AwaitingDone) else None
        if epoch < self._receive_epoch:
            raise SealedReplay(f"message from epoch {epoch}, whose keys are erased")
        if epoch == self._receive_epoch:
            key = self._receive_key
        elif awaiting is not None and epoch == awaiting.keys.epoch:
            key = awaiting.keys.seal_receive
        else:
            raise DecryptionFailed(f"no key for epoch {epoch}")
        associated = self._associated_data(self.role.peer, epoch, sequence)
        try:
            plaintext = AESGCM(key).decrypt(_nonce(sequence), sealed.ciphertext, associated)
        except InvalidTag as error:
            raise DecryptionFailed("sealed message does not authenticate") from error
        self._check_sequence(sequence)
        inner = decode_message(plaintext)
        if (
            awaiting is not None
            and epoch == awaiting.keys.epoch
            and inner.get("kind") != "rekey-done"
        ):
            raise UnexpectedCallMessage("the first message of a new epoch is 'rekey-done'")
        received = self._dispatch(inner)
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

    def _dispatch(self, inner: dict[str, Any]) -> Received:
        kind = inner.get("kind")
        message_class = INNER_MESSAGES.get(kind) if isinstance(kind, str) else None
        if message_class is None:
            raise MalformedCallMessage("unknown sealed message kind")
        handler = INNER_HANDLERS.get((self.rekey_state, message_class))
        if handler is None:
            raise UnexpectedCallMessage(
                f"a {kind!r} message is not accepted in rekey state {self.rekey_state.value}"
            )
        return handler(self, message_class.parse(inner))

    def _on_app(self, message: App) -> Received:
        return Received(content=message.content)

    def _on_sender_key(self, message: SenderKeyMessage) -> Received:
        return Received(sender_key=message.key)

    def _on_sender_key_ack(self, message: SenderKeyAck) -> Received:
        return Received(sender_key_ack=message.kid)

    def _on_rekey(self, message: Rekey) -> Received:
        if message.epoch != self.epoch + 1:
            raise UnexpectedCallMessage(f"a rekey to epoch {message.epoch} is not expected now")
        self._verify(Rekey.KIND, message.signature, message.epoch, message.ephemeral)
        private_key = X25519PrivateKey.from_private_bytes(self._random_bytes(X25519_KEY_SIZE))
        public_key = x25519_public_bytes(private_key)
        shared = x25519_shared_secret(private_key, message.ephemeral)
        signature = self._sign(RekeyAck.KIND, message.epoch, message.ephemeral, public_key)
        ack = self._seal(RekeyAck(message.epoch, public_key, signature))
        new_keys = self._advance(
            message.epoch, shared, requester=message.ephemeral, accepter=public_key
        )
        # The peer reads our messages under the new key once it has our ack; its own
        # messages switch after its "rekey-done", and so do our frames.
        self._send_key, self._send_epoch = new_keys.seal_send, message.epoch
        self._enter(_AwaitingDone(new_keys))
        return Received(replies=[ack], keys=KeyUpdate(install_receive=new_keys.receive))

    def _on_rekey_while_requested(self, message: Rekey) -> Received:
        # Both asked at once: the handshake initiator's request wins, the other is dropped.
        if message.epoch != self.epoch + 1:
            raise UnexpectedCallMessage(f"a rekey to epoch {message.epoch} is not expected now")
        if self.role is Role.INITIATOR:
            # Ignored, but only if genuine: a forged request is refused like any other.
            self._verify(Rekey.KIND, message.signature, message.epoch, message.ephemeral)
            return Received()
        return self._on_rekey(message)

    def _on_rekey_ack(self, message: RekeyAck) -> Received:
        pending = self._rekey
        assert isinstance(pending, _Requested)  # the dispatch table's promise
        if message.epoch != pending.epoch:
            raise UnexpectedCallMessage(f"no rekey to epoch {message.epoch} was requested")
        self._verify(
            RekeyAck.KIND, message.signature, message.epoch, pending.public_key, message.ephemeral
        )
        shared = x25519_shared_secret(pending.private_key, message.ephemeral)
        new_keys = self._advance(
            message.epoch, shared, requester=pending.public_key, accepter=message.ephemeral
        )
        self._enter(_Idle())
        # The ack was the peer's last message under the old epoch.
        self._receive_key, self._receive_epoch = new_keys.seal_receive, message.epoch
        self._send_key, self._send_epoch = new_keys.seal_send, message.epoch
        done = self._seal(RekeyDone(message.epoch))
        return Received(
            replies=[done],
            keys=KeyUpdate(install_receive=new_keys.receive, switch_send=new_keys.send),
        )

    def _on_rekey_done(self, message: RekeyDone) -> Received:
        awaiting = self._rekey
        assert isinstance(awaiting, _AwaitingDone)  # the dispatch table's promise
        if message.epoch != awaiting.keys.epoch:
            raise UnexpectedCallMessage(f"no rekey to epoch {message.epoch} awaits completion")
        self._receive_key, self._receive_epoch = awaiting.keys.seal_receive, message.epoch
        self._enter(_Idle())
        return Received(keys=KeyUpdate(switch_send=awaiting.keys.send))

    def _advance(self, epoch: int, shared: bytes, requester: bytes, accepter: bytes) -> EpochKeys:
        self._secret = next_epoch_secret(self._secret, epoch, shared, requester, accepter)
        self._keys = derive_epoch_keys(self._secret, epoch, self.role)
        return self._keys


# What each inner message does in each rekey state; a pair not listed is unexpected. The
# application's and the group sender keys' messages are accepted in every state: they do not
# touch the pairwise epochs.
INNER_HANDLERS: Mapping[tuple[RekeyState, type[InnerMessage]], _Handler] = {
    **{
        (state, kind): handler
        for state in RekeyState
        for kind, handler in (
            (App, SealedChannel._on_app),
            (SenderKeyMessage, SealedChannel._on_sender_key),
            (SenderKeyAck, SealedChannel._on_sender_key_ack),
        )
    },
    (RekeyState.IDLE, Rekey): SealedChannel._on_rekey,
    (RekeyState.REQUESTED, Rekey): SealedChannel._on_rekey_while_requested,
    (RekeyState.REQUESTED, RekeyAck): SealedChannel._on_rekey_ack,
    (RekeyState.AWAITING_DONE, RekeyDone): SealedChannel._on_rekey_done,
}


def _nonce(sequence: int) -> bytes:
    # Each (key, sequence) pair is used once: keys are per direction and epoch, and the
    # sequence number only grows.
    return bytes(4) + sequence.to_bytes(8, "big")
