"""The authenticated call key agreement: two sans-I/O state machines.

Four JSON messages, relayed by the (untrusted) hub::

    Initiator                                            Responder
    commit   {call_id, suites, nonce_i, name_i, H(e_i, id_i, name_i)}  -->
         <--  accept  {call_id, suite, nonce_r, e_r, id_r, name_r}
    reveal   {call_id, e_i, id_i, sig_i(transcript)}                   -->
         <--  confirm {call_id, sig_r(transcript)}

- ZRTP-style hash commitment (RFC 6189 section 4.4.1.1): the initiator reveals its
  ephemeral last, so it commits to it first; a man in the middle must fix both of its
  ephemerals before learning the honest parties' ones, and gets one SAS guess per call.
- SIGMA-style authentication (Krawczyk 2003, as in TLS 1.3 and IKEv2): each side signs
  the transcript hash (version, offered and chosen suites, call id, both nonces, both
  ephemerals, both identity keys, both names) with its Ed25519 identity key under a role
  label, and verifies the peer's signature, then the caller's pin check, before deriving
  any key. Each party's name travels in the key agreement and is signed, so the pin check
  gets a (name, key) pair the peer vouched for, never a name the hub chose.
- HKDF (RFC 5869, SHA-256): Extract(salt=transcript hash, X25519 secret), then Expand
  with distinct labels into the SAS and epoch 0's secret, from which crypto/sealed.py
  derives both directions' SFrame base keys, KIDs and sealing keys.

The machines are table-driven: ``HANDLERS`` maps each (state, message type) pair that is
accepted to its handler; every other pair is ``UnexpectedCallMessage``. The messages are
the typed ones of crypto/messages.py. Any error moves the machine to FAILED for good and
no key is ever exposed. docs/reference/key-agreement.md is the specification;
docs/explanation/protocol.md says why.
"""

import enum
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from crypto.errors import LocalError, RemoteError
from crypto.frame_crypto import KeyUpdate
from crypto.identity import IdentityKey, IdentityPublicKey
from crypto.messages import (
    HANDSHAKE_MESSAGES,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    X25519_KEY_SIZE,
    Accept,
    Commit,
    Confirm,
    HandshakeMessage,
    MalformedCallMessage,
    Reveal,
    UnexpectedCallMessage,
    check_call_id,
    message_type,
    name_field,
)
from crypto.sealed import (
    LABEL_PREFIX,
    Role,
    SealedChannel,
    WrongCall,
    hkdf_expand,
    hkdf_extract,
    length_prefixed,
    x25519_public_bytes,
    x25519_shared_secret,
)
from crypto.sframe import CipherSuite

# 15 decimal digits: log2(10^15) = 49.8 bits, so one MITM attempt succeeds with p = 10^-15.
SAS_DIGITS = 15
SAS_GROUP = 5

# Called with the peer's authenticated (name, identity key); it raises to abort.
PeerCheck = Callable[[str, IdentityPublicKey], object]
RandomBytes = Callable[[int], bytes]
Reply = dict[str, Any]


class CommitmentMismatch(RemoteError):
    """The initiator's revealed ephemeral and identity do not match its commitment."""


class NoCommonSuite(RemoteError):
    """The initiator offered no SFrame cipher suite this responder supports."""


class HandshakeState(enum.Enum):
    START = "start"
    AWAIT_COMMIT = "await-commit"
    AWAIT_ACCEPT = "await-accept"
    AWAIT_REVEAL = "await-reveal"
    AWAIT_CONFIRM = "await-confirm"
    DONE = "done"
    FAILED = "failed"


def commitment(
    call_id: str, nonce: bytes, ephemeral: bytes, identity: IdentityPublicKey, name: str
) -> bytes:
    """The initiator's hash commitment to its ephemeral, and to who it is (key and name)."""
    body = length_prefixed(
        call_id.encode("utf-8"), nonce, ephemeral, identity.raw, name.encode("utf-8")
    )
    return hashlib.sha256(LABEL_PREFIX + b"commit" + body).digest()


@dataclass(frozen=True)
class Transcript:
    """Everything both parties must agree on; its hash is what each side signs."""

    offered: tuple[CipherSuite, ...]
    chosen: CipherSuite
    call_id: str
    initiator_nonce: bytes
    responder_nonce: bytes
    initiator_ephemeral: bytes
    responder_ephemeral: bytes
    initiator_identity: IdentityPublicKey
    responder_identity: IdentityPublicKey
    initiator_name: str
    responder_name: str

    def hash(self) -> bytes:
        body = length_prefixed(
            PROTOCOL_VERSION.to_bytes(2, "big"),
            bytes(self.offered),
            bytes([self.chosen]),
            self.call_id.encode("utf-8"),
            self.initiator_nonce,
            self.responder_nonce,
            self.initiator_ephemeral,
            self.responder_ephemeral,
            self.initiator_identity.raw,
            self.responder_identity.raw,
            self.initiator_name.encode("utf-8"),
            self.responder_name.encode("utf-8"),
        )
        return hashlib.sha256(LABEL_PREFIX + b"transcript" + body).digest()


def signed_content(signer: Role, transcript_hash: bytes) -> bytes:
    """What ``signer`` signs: a role label (so no signature can be reflected) and the hash."""
    return LABEL_PREFIX + b"signature " + signer.value.encode("ascii") + transcript_hash


def render_sas(sas_key: bytes) -> str:
    """15 decimal digits in groups of five, from the SAS key (bias below 2^-200)."""
    digits = f"{int.from_bytes(sas_key, 'big') % 10**SAS_DIGITS:0{SAS_DIGITS}d}"
    return " ".join(digits[i : i + SAS_GROUP] for i in range(0, SAS_DIGITS, SAS_GROUP))


@dataclass(frozen=True)
class KeySchedule:
    """The handshake's outputs before they are split into a result."""

    sas: str
    epoch_secret: bytes = field(repr=False)


def key_schedule(shared_secret: bytes, transcript_hash: bytes) -> KeySchedule:
    pseudorandom_key = hkdf_extract(transcript_hash, shared_secret)
    return KeySchedule(
        sas=render_sas(hkdf_expand(pseudorandom_key, "sas")),
        epoch_secret=hkdf_expand(pseudorandom_key, "epoch", (0).to_bytes(4, "big")),
    )


@dataclass(frozen=True)
class HandshakeResult:
    """The call's keys once the handshake succeeded. The repr hides every secret.

    The client installs ``initial_keys`` (epoch 0's send and receive keys) with
    ``crypto.frame_crypto.apply_key_update``, exactly as it installs each rekey's
    ``Received.keys``; shows ``sas`` to the user and sends every further signalling
    message through ``channel``. ``peer_name`` and ``peer_identity`` are what the peer
    signed: the only name to pin or show.
    """

    role: Role
    call_id: str
    suite: CipherSuite
    initial_keys: KeyUpdate
    sas: str
    peer_identity: IdentityPublicKey
    peer_name: str
    transcript_hash: bytes
    channel: SealedChannel


def _local_suites(suites: Sequence[CipherSuite]) -> tuple[CipherSuite, ...]:
    try:
        return tuple(CipherSuite(suite) for suite in suites)
    except ValueError as error:
        raise LocalError("suites are RFC 9605 cipher suite codes") from error


class _Handshake:
    role: Role

    def __init__(
        self,
        identity: IdentityKey,
        name: str,
        call_id: str,
        random_bytes: RandomBytes,
        peer_check: PeerCheck | None,
    ) -> None:
        try:
            check_call_id(call_id)
        except ValueError as error:
            raise LocalError(str(error)) from error
        try:
            name_field(name)
        except ValueError as error:
            raise LocalError(f"our own name {error}") from error
        self._identity = identity
        self.name = name
        self.call_id = call_id
        self._random_bytes = random_bytes
        self._peer_check = peer_check
        self.state = HandshakeState.START
        self._result: HandshakeResult | None = None
        self._ephemeral_private: X25519PrivateKey | None = None
        self._ephemeral_public = b""
        self._nonce = b""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(call_id={self.call_id!r}, state={self.state.value})"

    @property
    def result(self) -> HandshakeResult:
        if self.state is not HandshakeState.DONE or self._result is None:
            raise LocalError(f"the handshake is not complete (state {self.state.value})")
        return self._result

    def receive(self, message: object) -> list[Reply]:
        """Process one message from the peer; return the messages to send back, in order.

        Any ``Exception`` (the peer's message refused, the ``peer_check`` refusing, or
        anything unforeseen) moves the machine to FAILED for good, with its ephemeral
        erased and no result, and propagates. A ``BaseException`` that is not an
        ``Exception`` (an interrupt, a cancellation) is not the handshake's failure: it
        propagates and the machine stays in the state it was in, still without a result.
        """
        if self.state is HandshakeState.FAILED:
            raise LocalError("the handshake failed; start a new one")
        try:
            kind = message_type(message)
            message_class = HANDSHAKE_MESSAGES.get(kind)
            handler = None if message_class is None else HANDLERS.get((self.state, message_class))
            if message_class is None or handler is None:
                raise UnexpectedCallMessage(f"got {kind!r} in state {self.state.value}")
            parsed = message_class.parse(message)
            if parsed.call_id != self.call_id:
                raise WrongCall("message belongs to another call")
            return handler(self, parsed)
        except Exception:
            self._fail()
            raise

    def _fail(self) -> None:
        self.state = HandshakeState.FAILED
        self._ephemeral_private = None

    def _new_ephemeral(self) -> None:
        private_bytes = self._random_bytes(X25519_KEY_SIZE)
        self._ephemeral_private = X25519PrivateKey.from_private_bytes(private_bytes)
        self._ephemeral_public = x25519_public_bytes(self._ephemeral_private)
        self._nonce = self._random_bytes(NONCE_SIZE)

    def _authenticate_peer(
        self, peer_name: str, peer: IdentityPublicKey, signature: bytes, transcript_hash: bytes
    ) -> None:
        peer.verify(signed_content(self.role.peer, transcript_hash), signature)
        # Only now is (peer_name, peer) vouched for by the peer, so only now may it be pinned.
        if self._peer_check is not None:
            self._peer_check(peer_name, peer)

    def _finish(
        self,
        transcript: Transcript,
        peer_ephemeral: bytes,
        peer_name: str,
        peer: IdentityPublicKey,
    ) -> None:
        assert self._ephemeral_private is not None
        shared = x25519_shared_secret(self._ephemeral_private, peer_ephemeral)
        transcript_hash = transcript.hash()
        schedule = key_schedule(shared, transcript_hash)
        channel = SealedChannel(self.role, self.call_id, schedule.epoch_secret, self._random_bytes)
        keys = channel.keys
        self._result = HandshakeResult(
            role=self.role,
            call_id=self.call_id,
            suite=transcript.chosen,
            initial_keys=KeyUpdate(install_receive=keys.receive, switch_send=keys.send),
            sas=schedule.sas,
            peer_identity=peer,
            peer_name=peer_name,
            transcript_hash=transcript_hash,
            channel=channel,
        )
        self._ephemeral_private = None
        self.state = HandshakeState.DONE


class Initiator(_Handshake):
    """The calling side: ``start()``, then ``receive()`` the accept and the confirm."""

    role = Role.INITIATOR

    def __init__(
        self,
        identity: IdentityKey,
        call_id: str,
        suites: Sequence[CipherSuite],
        random_bytes: RandomBytes,
        *,
        name: str,
        peer_check: PeerCheck | None = None,
    ) -> None:
        """``name``: ours, sent in the commit and signed by both sides. ``suites``: offered
        in order of preference. ``peer_check``: called with the peer's authenticated name
        and identity key before any key exists; it raises to abort (e.g.
        ``known_peers.check``)."""
        super().__init__(identity, name, call_id, random_bytes, peer_check)
        self.suites = _local_suites(suites)
        if not suites or len(set(self.suites)) != len(self.suites):
            raise LocalError("offer at least one suite, each once")
        self._transcript: Transcript | None = None

    def start(self) -> Reply:
        """The first message, ``commit``."""
        if self.state is not HandshakeState.START:
            raise LocalError("start() is called once")
        self._new_ephemeral()
        self.state = HandshakeState.AWAIT_ACCEPT
        return Commit(
            call_id=self.call_id,
            suites=self.suites,
            nonce=self._nonce,
            name=self.name,
            commitment=commitment(
                self.call_id,
                self._nonce,
                self._ephemeral_public,
                self._identity.public_key,
                self.name,
            ),
        ).encode()

    def _on_accept(self, accept: Accept) -> list[Reply]:
        if accept.suite not in self.suites:
            raise MalformedCallMessage("the responder chose a suite that was not offered")
        self._transcript = Transcript(
            offered=self.suites,
            chosen=accept.suite,
            call_id=self.call_id,
            initiator_nonce=self._nonce,
            responder_nonce=accept.nonce,
            initiator_ephemeral=self._ephemeral_public,
            responder_ephemeral=accept.ephemeral,
            initiator_identity=self._identity.public_key,
            responder_identity=accept.identity,
            initiator_name=self.name,
            responder_name=accept.name,
        )
        signature = self._identity.sign(signed_content(self.role, self._transcript.hash()))
        self.state = HandshakeState.AWAIT_CONFIRM
        reveal = Reveal(self.call_id, self._ephemeral_public, self._identity.public_key, signature)
        return [reveal.encode()]

    def _on_confirm(self, confirm: Confirm) -> list[Reply]:
        transcript = self._transcript
        assert transcript is not None
        name, peer = transcript.responder_name, transcript.responder_identity
        self._authenticate_peer(name, peer, confirm.signature, transcript.hash())
        self._finish(transcript, transcript.responder_ephemeral, name, peer)
        return []


class Responder(_Handshake):
    """The called side: ``receive()`` the commit, then the reveal."""

    role = Role.RESPONDER

    def __init__(
        self,
        identity: IdentityKey,
        call_id: str,
        suites: Sequence[CipherSuite],
        random_bytes: RandomBytes,
        *,
        name: str,
        peer_check: PeerCheck | None = None,
    ) -> None:
        """``name``: ours, sent in the accept. ``suites``: the ones this side supports; the
        initiator's preference decides. ``peer_check``: as for ``Initiator``."""
        super().__init__(identity, name, call_id, random_bytes, peer_check)
        self.suites = frozenset(_local_suites(suites))
        if not self.suites:
            raise LocalError("support at least one suite")
        self.state = HandshakeState.AWAIT_COMMIT
        self._offered: tuple[CipherSuite, ...] = ()
        self._chosen: CipherSuite | None = None
        self._peer_nonce = b""
        self._peer_name = ""
        self._peer_commitment = b""

    def _on_commit(self, commit: Commit) -> list[Reply]:
        chosen = next((suite for suite in commit.suites if suite in self.suites), None)
        if chosen is None:
            raise NoCommonSuite("no offered SFrame cipher suite is supported here")
        self._offered, self._chosen = commit.suites, chosen
        self._peer_nonce, self._peer_commitment = commit.nonce, commit.commitment
        self._peer_name = commit.name
        self._new_ephemeral()
        self.state = HandshakeState.AWAIT_REVEAL
        accept = Accept(
            call_id=self.call_id,
            suite=chosen,
            nonce=self._nonce,
            ephemeral=self._ephemeral_public,
            identity=self._identity.public_key,
            name=self.name,
        )
        return [accept.encode()]

    def _on_reveal(self, reveal: Reveal) -> list[Reply]:
        peer = reveal.identity
        expected = commitment(
            self.call_id, self._peer_nonce, reveal.ephemeral, peer, self._peer_name
        )
        if expected != self._peer_commitment:
            raise CommitmentMismatch(
                "the commit does not match the revealed ephemeral and identity and its name"
            )
        assert self._chosen is not None
        transcript = Transcript(
            offered=self._offered,
            chosen=self._chosen,
            call_id=self.call_id,
            initiator_nonce=self._peer_nonce,
            responder_nonce=self._nonce,
            initiator_ephemeral=reveal.ephemeral,
            responder_ephemeral=self._ephemeral_public,
            initiator_identity=peer,
            responder_identity=self._identity.public_key,
            initiator_name=self._peer_name,
            responder_name=self.name,
        )
        transcript_hash = transcript.hash()
        self._authenticate_peer(self._peer_name, peer, reveal.signature, transcript_hash)
        signature = self._identity.sign(signed_content(self.role, transcript_hash))
        self._finish(transcript, reveal.ephemeral, self._peer_name, peer)
        return [Confirm(self.call_id, signature).encode()]


_Handler = Callable[[Any, Any], list[Reply]]

# The only (state, message type) pairs either machine accepts; each state belongs to one
# role, and every pair not listed is ``UnexpectedCallMessage``.
HANDLERS: Mapping[tuple[HandshakeState, type[HandshakeMessage]], _Handler] = {
    (HandshakeState.AWAIT_COMMIT, Commit): Responder._on_commit,
    (HandshakeState.AWAIT_ACCEPT, Accept): Initiator._on_accept,
    (HandshakeState.AWAIT_REVEAL, Reveal): Responder._on_reveal,
    (HandshakeState.AWAIT_CONFIRM, Confirm): Initiator._on_confirm,
}
