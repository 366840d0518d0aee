"""The authenticated, identity-hiding call key agreement: two sans-I/O state machines.

Four JSON messages, relayed by the (untrusted) hub::

    Initiator                                               Responder
    commit  {call_id, suites, nonce_i, C = H(call_id, nonce_i, E_i)}  -->
         <--  accept  {call_id, suite, nonce_r, E_r}
    reveal  {call_id, E_i, AES-GCM_k_i(ID_i, name_i, sig_i(T_i))}     -->
         <--  confirm {call_id, AES-GCM_k_r(ID_r, name_r, sig_r(T))}

- ZRTP-style hash commitment (RFC 6189 section 4.4.1.1): the initiator reveals its
  ephemeral last, so it commits to it first; a man in the middle must fix both of its
  ephemerals before learning the honest parties' ones. The SAS depends on nothing else
  (the exchange hash X and the X25519 secret: not the identities, which a man in the
  middle picks last), so it gets one SAS guess per call.
- SIGMA-R ordering (Krawczyk 2003, the four-message variant, as in IKEv2; SIGMA-I, TLS 1.3
  and Noise XX have the other order, where the responder shows its identity first): the identities
  travel encrypted under handshake keys from the ephemeral X25519 secret, so a passive hub
  learns neither; the initiator authenticates first, so an active hub posing as the
  responder learns the initiator's identity (and the hub decides who initiates), and the
  responder reveals its own only after it has verified the initiator's signature and run
  its ``peer_check``.
- Each side signs, under a role label, a transcript hash covering the version, offered and
  chosen suites, call id, both nonces, both ephemerals and its own identity key and name
  (the initiator: all it knows yet, ``T_i``; the responder: both parties', ``T``). Each
  party's name is signed, so the pin check gets a (name, key) pair the peer vouched for.
- HKDF (RFC 5869, SHA-256): the handshake keys and the SAS from Extract(salt = exchange
  hash X, X25519 secret); epoch 0's secret from Extract(salt = T, X25519 secret), from which
  crypto/sealed.py derives both directions' SFrame base keys, KIDs and sealing keys. The SAS
  is under X, not T: X holds nothing a man in the middle can choose after seeing an honest
  ephemeral, while T holds its identity keys and names (see ``derive_sas``).

Only primitives WebCrypto has: X25519, Ed25519, SHA-256, HMAC/HKDF-SHA-256, AES-GCM.

The machines are table-driven: ``HANDLERS`` maps each (state, message type) pair that is
accepted to its handler; every other pair is ``UnexpectedCallMessage``. The messages are
the typed ones of crypto/messages.py. Any error moves the machine to FAILED for good and
no key is ever exposed. docs/explanation/protocol.md gives the argument,
docs/reference/key-agreement.md the exact formats.
"""

import enum
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.errors import LocalError, RemoteError
from crypto.frame_crypto import KeyUpdate
from crypto.identity import IdentityKey, IdentityPublicKey, decimal_groups
from crypto.messages import (
    HANDSHAKE_MESSAGES,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    X25519_KEY_SIZE,
    Accept,
    Auth,
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
    """The initiator's revealed ephemeral does not match its commitment."""


class HandshakeDecryptionFailed(RemoteError):
    """A ``reveal``'s or ``confirm``'s encrypted identity does not open under the key this
    side derived: the peer's ephemeral, nonce, suite or the message itself was changed."""


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


def commitment(call_id: str, nonce: bytes, ephemeral: bytes) -> bytes:
    """The initiator's hash commitment to its ephemeral. Not to its identity: a hub could
    test guessed (key, name) pairs against a hash of them once the ephemeral is revealed."""
    body = length_prefixed(call_id.encode("utf-8"), nonce, ephemeral)
    return hashlib.sha256(LABEL_PREFIX + b"commit" + body).digest()


@dataclass(frozen=True)
class Exchange:
    """What both sides know once both ephemerals are out: the unauthenticated part of the
    transcript, and the salt of the handshake keys."""

    offered: tuple[CipherSuite, ...]
    chosen: CipherSuite
    call_id: str
    initiator_nonce: bytes
    responder_nonce: bytes
    initiator_ephemeral: bytes
    responder_ephemeral: bytes

    def parts(self) -> tuple[bytes, ...]:
        return (
            PROTOCOL_VERSION.to_bytes(2, "big"),
            bytes(self.offered),
            bytes([self.chosen]),
            self.call_id.encode("utf-8"),
            self.initiator_nonce,
            self.responder_nonce,
            self.initiator_ephemeral,
            self.responder_ephemeral,
        )

    def hash(self) -> bytes:
        return hashlib.sha256(LABEL_PREFIX + b"exchange" + length_prefixed(*self.parts())).digest()


@dataclass(frozen=True)
class Party:
    """Who one side is: its identity key and the name it signs."""

    identity: IdentityPublicKey
    name: str

    def parts(self) -> tuple[bytes, bytes]:
        return self.identity.raw, self.name.encode("utf-8")


def initiator_transcript_hash(exchange: Exchange, initiator: Party) -> bytes:
    """T_i, what the initiator signs: the exchange and its own identity and name (it has
    not yet seen the responder's; the responder's signature of T covers both)."""
    body = length_prefixed(*exchange.parts(), *initiator.parts())
    return hashlib.sha256(LABEL_PREFIX + b"transcript initiator" + body).digest()


def transcript_hash(exchange: Exchange, initiator: Party, responder: Party) -> bytes:
    """T, what the responder signs and the call's keys are derived under: everything."""
    body = length_prefixed(*exchange.parts(), *initiator.parts(), *responder.parts())
    return hashlib.sha256(LABEL_PREFIX + b"transcript" + body).digest()


def signed_content(signer: Role, transcript: bytes) -> bytes:
    """What ``signer`` signs: a role label (so no signature can be reflected) and the hash."""
    return LABEL_PREFIX + b"signature " + signer.value.encode("ascii") + transcript


@dataclass(frozen=True)
class HandshakeKeys:
    """The keys that encrypt each side's identity: one per direction, each used once."""

    initiator: bytes = field(repr=False)
    responder: bytes = field(repr=False)

    def of(self, sender: Role) -> bytes:
        return self.initiator if sender is Role.INITIATOR else self.responder


def handshake_keys(shared_secret: bytes, exchange_hash: bytes) -> HandshakeKeys:
    pseudorandom_key = hkdf_extract(exchange_hash, shared_secret)
    return HandshakeKeys(
        initiator=hkdf_expand(pseudorandom_key, "auth initiator"),
        responder=hkdf_expand(pseudorandom_key, "auth responder"),
    )


# Each handshake key encrypts exactly one message, so a fixed nonce never repeats under it.
AUTH_NONCE = bytes(12)


def _auth_associated_data(sender: Role) -> bytes:
    return LABEL_PREFIX + b"auth " + sender.value.encode("ascii")


def seal_auth(keys: HandshakeKeys, sender: Role, auth: Auth) -> bytes:
    """``sender``'s identity, name and signature under its handshake key (AES-256-GCM)."""
    return AESGCM(keys.of(sender)).encrypt(AUTH_NONCE, auth.encode(), _auth_associated_data(sender))


def open_auth(keys: HandshakeKeys, sender: Role, ciphertext: bytes) -> Auth:
    try:
        plaintext = AESGCM(keys.of(sender)).decrypt(
            AUTH_NONCE, ciphertext, _auth_associated_data(sender)
        )
    except InvalidTag as error:
        raise HandshakeDecryptionFailed(
            f"the {sender.value}'s identity does not open under this handshake's key"
        ) from error
    return Auth.parse(plaintext)


def render_sas(sas_key: bytes) -> str:
    """15 decimal digits in groups of five, from the SAS key (bias below 2^-200)."""
    return decimal_groups(sas_key, SAS_DIGITS, SAS_GROUP)


def derive_sas(shared_secret: bytes, exchange_hash: bytes) -> str:
    """The SAS, under the exchange hash X: from the same pseudorandom key as the handshake
    keys, never under the transcript hash T.

    The SAS must not depend on anything a man in the middle can still choose once it has
    seen an honest party's ephemeral. Under T, which holds both identity keys and names, a
    hub running one leg with each peer chose its own identity on each leg last and searched
    a pool of keys until the two SAS matched. X holds only what each side's counterpart had
    fixed before that ephemeral was known (ZRTP's rule), so each leg's SAS is one fresh
    random value to the hub; the identities are bound by the signatures and by T, under
    which ``epoch0_secret`` derives the call's keys.
    """
    return render_sas(hkdf_expand(hkdf_extract(exchange_hash, shared_secret), "sas"))


def epoch0_secret(shared_secret: bytes, transcript: bytes) -> bytes:
    """Epoch 0's secret, under the full transcript hash T (both identities and names)."""
    return hkdf_expand(hkdf_extract(transcript, shared_secret), "epoch", (0).to_bytes(4, "big"))


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

    @property
    def _me(self) -> Party:
        return Party(self._identity.public_key, self.name)

    def receive(self, message: object) -> list[Reply]:
        """Process one message from the peer; return the messages to send back, in order.

        Any ``Exception`` (the peer's message refused, the ``peer_check`` refusing, or
        anything unforeseen) moves the machine to FAILED for good, with its secrets
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
        self._erase()

    def _erase(self) -> None:
        self._ephemeral_private = None

    def _new_ephemeral(self) -> None:
        private_bytes = self._random_bytes(X25519_KEY_SIZE)
        self._ephemeral_private = X25519PrivateKey.from_private_bytes(private_bytes)
        self._ephemeral_public = x25519_public_bytes(self._ephemeral_private)
        self._nonce = self._random_bytes(NONCE_SIZE)

    def _shared_secret(self, peer_ephemeral: bytes) -> bytes:
        assert self._ephemeral_private is not None
        return x25519_shared_secret(self._ephemeral_private, peer_ephemeral)

    def _authenticate_peer(self, auth: Auth, transcript: bytes) -> Party:
        """The peer's signature of ``transcript``, then the caller's pin check."""
        auth.identity.verify(signed_content(self.role.peer, transcript), auth.signature)
        peer = Party(auth.identity, auth.name)
        # Only now is (name, key) vouched for by the peer, so only now may it be pinned.
        if self._peer_check is not None:
            self._peer_check(peer.name, peer.identity)
        return peer

    def _finish(self, exchange: Exchange, shared: bytes, transcript: bytes, peer: Party) -> None:
        channel = SealedChannel(
            self.role,
            self.call_id,
            epoch0_secret(shared, transcript),
            self._random_bytes,
            identity=self._identity,
            peer_identity=peer.identity,
            transcript_hash=transcript,
        )
        keys = channel.keys
        self._result = HandshakeResult(
            role=self.role,
            call_id=self.call_id,
            suite=exchange.chosen,
            initial_keys=KeyUpdate(install_receive=keys.receive, switch_send=keys.send),
            sas=derive_sas(shared, exchange.hash()),
            peer_identity=peer.identity,
            peer_name=peer.name,
            transcript_hash=transcript,
            channel=channel,
        )
        self._erase()
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
        """``name``: ours, sent encrypted in the reveal and signed by both sides. ``suites``:
        offered in order of preference. ``peer_check``: called with the peer's
        authenticated name and identity key before any call key exists; it raises to abort
        (e.g. ``known_peers.check``)."""
        super().__init__(identity, name, call_id, random_bytes, peer_check)
        self.suites = _local_suites(suites)
        if not suites or len(set(self.suites)) != len(self.suites):
            raise LocalError("offer at least one suite, each once")
        self._exchange: Exchange | None = None
        self._shared = b""
        self._keys: HandshakeKeys | None = None

    def _erase(self) -> None:
        super()._erase()
        self._shared, self._keys = b"", None

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
            commitment=commitment(self.call_id, self._nonce, self._ephemeral_public),
        ).encode()

    def _on_accept(self, accept: Accept) -> list[Reply]:
        if accept.suite not in self.suites:
            raise MalformedCallMessage("the responder chose a suite that was not offered")
        exchange = Exchange(
            offered=self.suites,
            chosen=accept.suite,
            call_id=self.call_id,
            initiator_nonce=self._nonce,
            responder_nonce=accept.nonce,
            initiator_ephemeral=self._ephemeral_public,
            responder_ephemeral=accept.ephemeral,
        )
        shared = self._shared_secret(accept.ephemeral)
        keys = handshake_keys(shared, exchange.hash())
        signature = self._identity.sign(
            signed_content(self.role, initiator_transcript_hash(exchange, self._me))
        )
        auth = seal_auth(keys, self.role, Auth(self._identity.public_key, self.name, signature))
        self._exchange, self._shared, self._keys = exchange, shared, keys
        self.state = HandshakeState.AWAIT_CONFIRM
        return [Reveal(self.call_id, self._ephemeral_public, auth).encode()]

    def _on_confirm(self, confirm: Confirm) -> list[Reply]:
        exchange, keys = self._exchange, self._keys
        assert exchange is not None and keys is not None
        auth = open_auth(keys, self.role.peer, confirm.auth)
        transcript = transcript_hash(exchange, self._me, Party(auth.identity, auth.name))
        peer = self._authenticate_peer(auth, transcript)
        self._finish(exchange, self._shared, transcript, peer)
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
        """``name``: ours, sent encrypted in the confirm. ``suites``: the ones this side
        supports; the initiator's preference decides. ``peer_check``: as for ``Initiator``;
        it runs before this side's identity leaves, so refusing there reveals nothing."""
        super().__init__(identity, name, call_id, random_bytes, peer_check)
        self.suites = frozenset(_local_suites(suites))
        if not self.suites:
            raise LocalError("support at least one suite")
        self.state = HandshakeState.AWAIT_COMMIT
        self._commit: Commit | None = None
        self._chosen: CipherSuite | None = None

    def _on_commit(self, commit: Commit) -> list[Reply]:
        chosen = next((suite for suite in commit.suites if suite in self.suites), None)
        if chosen is None:
            raise NoCommonSuite("no offered SFrame cipher suite is supported here")
        self._commit, self._chosen = commit, chosen
        self._new_ephemeral()
        self.state = HandshakeState.AWAIT_REVEAL
        return [Accept(self.call_id, chosen, self._nonce, self._ephemeral_public).encode()]

    def _on_reveal(self, reveal: Reveal) -> list[Reply]:
        commit, chosen = self._commit, self._chosen
        assert commit is not None and chosen is not None
        if commitment(self.call_id, commit.nonce, reveal.ephemeral) != commit.commitment:
            raise CommitmentMismatch("the commit does not match the revealed ephemeral")
        exchange = Exchange(
            offered=commit.suites,
            chosen=chosen,
            call_id=self.call_id,
            initiator_nonce=commit.nonce,
            responder_nonce=self._nonce,
            initiator_ephemeral=reveal.ephemeral,
            responder_ephemeral=self._ephemeral_public,
        )
        shared = self._shared_secret(reveal.ephemeral)
        keys = handshake_keys(shared, exchange.hash())
        auth = open_auth(keys, self.role.peer, reveal.auth)
        peer = self._authenticate_peer(
            auth, initiator_transcript_hash(exchange, Party(auth.identity, auth.name))
        )
        # The initiator has proved who it is (and the pin check let it through): only now
        # does our own identity leave, encrypted, with our signature of everything.
        transcript = transcript_hash(exchange, peer, self._me)
        signature = self._identity.sign(signed_content(self.role, transcript))
        confirm = seal_auth(keys, self.role, Auth(self._identity.public_key, self.name, signature))
        self._finish(exchange, shared, transcript, peer)
        return [Confirm(self.call_id, confirm).encode()]


_Handler = Callable[[Any, Any], list[Reply]]

# The only (state, message type) pairs either machine accepts; each state belongs to one
# role, and every pair not listed is ``UnexpectedCallMessage``.
HANDLERS: Mapping[tuple[HandshakeState, type[HandshakeMessage]], _Handler] = {
    (HandshakeState.AWAIT_COMMIT, Commit): Responder._on_commit,
    (HandshakeState.AWAIT_ACCEPT, Accept): Initiator._on_accept,
    (HandshakeState.AWAIT_REVEAL, Reveal): Responder._on_reveal,
    (HandshakeState.AWAIT_CONFIRM, Confirm): Initiator._on_confirm,
}
