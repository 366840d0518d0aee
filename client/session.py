"""The call session: this peer's protocol with one remote participant, as a sans-I/O machine.

A ``CallSession`` never touches a socket, a clock or a peer connection. Its driver
(client/call.py) feeds it events, each with the current time ``now``:

- ``start``: the remote participant is known (the initiator sends its commit);
- ``receive``: a payload that participant relayed through the hub;
- ``offer_ready`` / ``answer_ready``: the local session description the driver made;
- ``sas_answer``: what the user said about the SAS;
- ``rekey``, ``hangup``, ``peer_left``, ``hub_failed``, ``abort``: the driver's and the hub's
  news;
- ``receive_key_used``: the first frame under a new receive key authenticated (the frame
  protection's ``on_first_use``), so the peer has switched and older keys can be retired;
- ``handle_timer``: ``now`` has reached ``next_deadline`` (the setup timeout, a rekey that is
  due or overdue, a receive key whose grace window is over);
- routed mode only: ``send_sender_key`` and ``ack_sender_key``, our group sender key and the
  acknowledgement of the peer's (client/group_session.py decides when).

Each returns the actions the driver carries out, in order: ``Send`` a payload to the
participant, ``InstallKeys`` (epoch 0 and every rekey take this one path), ``RetireReceiveKeys``
after the grace window, ``AskSas``, ``Protected`` (the call is keyed: show with whom),
``MakeOffer``, ``AnswerOffer``, ``ApplyAnswer``, ``MediaStarted`` and, last, ``Ended``; in routed
mode ``Keyed``, ``SenderKeyArrived`` and ``SenderKeyAcked`` instead of the keys and the SDP.

The flow (docs/explanation/architecture.md, "A call, step by step"; the argument in
docs/explanation/protocol.md): the key agreement (crypto/handshake.py) with the pin check
inside it; the SAS question where the user has not verified the peer; the keys; each side's
sealed decision ("confirmed" or "declined"), so that neither races the other's SAS question;
the SDP offer and answer as sealed messages; in the call, a sealed rekey every
``rekey_interval`` and the bye. The setup timeout covers the network's phases only, never a
person's decision. One session serves one remote participant, so a peer in a room of N holds
N-1 sessions.

Routed mode (``SessionConfig.routed``, a group call through a hub that routes the media): the
same key agreement, pin check, SAS and sealed decisions, then straight to the call. Media goes
to the hub, not to this peer, so there is no SDP here and no pairwise media key: each member
sends under its own sender key (crypto/sender_keys.py), handed to the peer over this session's
sealed channel. The states, with what moves between them in each mode:

    state          peer to peer                           routed
    KEY_AGREEMENT  -> AWAIT_SAS (AskSas) or AWAIT_PEER    the same
                   (Protected, InstallKeys)               (Protected, no keys)
    AWAIT_SAS      -> AWAIT_PEER on sas_answer(True)      the same
    AWAIT_PEER     -> NEGOTIATING on the peer's           -> IN_CALL on the peer's "confirmed"
                   "confirmed" (MakeOffer)                (Keyed)
    NEGOTIATING    -> IN_CALL (MediaStarted)              never entered
    IN_CALL        sealed rekeys, the bye                 sender keys and their acks
                                                          (SenderKeyArrived, SenderKeyAcked), the
                                                          bye; a pairwise rekey is refused
    any            -> ENDED (Ended)                       the same; a failure in the call also
                                                          sends the bye (see ``_fail``)

The setup timeout, the refusals, the error classes and the experiment hooks are the same in
both modes. Each mode refuses the other's messages from the peer: a sender key in a peer-to-peer
call, a pairwise rekey in a routed one.

The experiment's weaker peers (client/experiment/) are subclasses that override the hooks marked
"experiment hook"; this module builds only the product session, which always agrees keys with
its real identity, checks the pin and seals every message.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from client.exit_codes import ExitCode
from crypto.errors import CryptoError, LocalError
from crypto.frame_crypto import KeyUpdate
from crypto.handshake import HandshakeResult, HandshakeState, Initiator, Responder
from crypto.identity import (
    IdentityKey,
    IdentityPublicKey,
    KnownPeers,
    PinnedIdentityMismatch,
    UnknownPeer,
)
from crypto.sealed import Received, SealedChannel, SealedGap, SealedReorder, SealedReplay
from crypto.sender_keys import SenderKey
from crypto.sframe import CipherSuite

logger = logging.getLogger("blindhub.session")

SUITES = (CipherSuite.AES_128_GCM_SHA256_128, CipherSuite.AES_256_GCM_SHA512_128)
DEFAULT_GRACE_SECONDS = 2.0
DEFAULT_SETUP_TIMEOUT = 30.0
DEFAULT_REKEY_INTERVAL = 60.0
DEFAULT_REKEY_TIMEOUT = 10.0
# Receive keys alive at once: the current epoch's and, until the peer has switched and the
# grace window is over, the one before.
MAX_RECEIVE_KEYS = 2
REQUESTER_REKEY_FACTOR = 1.5
CALL_ID_BYTES = 16


class Verify(enum.Enum):
    """How the peer's identity is accepted (``--verify``)."""

    PROMPT = "prompt"  # pin on first use, and the user confirms the SAS unless already verified
    TOFU = "tofu"  # pin on first use; a changed key is refused
    PINNED = "pinned"  # only peers already pinned


# -- how a call can fail, each with the call command's exit status


class CallError(Exception):
    """A call that did not complete; ``exit_code`` is the command's exit status."""

    exit_code = ExitCode.CALL_FAILED


class HubUnreachable(CallError):
    """The hub could not be reached or refused to let us join."""

    exit_code = ExitCode.HUB_UNREACHABLE


class VerificationRefused(CallError):
    """The user declined the SAS, or ``--verify pinned`` met a peer not pinned."""

    exit_code = ExitCode.VERIFICATION_REFUSED


class IdentityMismatch(CallError):
    """The peer's identity key differs from the one pinned for its name."""

    exit_code = ExitCode.IDENTITY_MISMATCH


class CallFailed(CallError):
    """The setup failed (peer left, protocol error, timeout) or the connection failed."""

    exit_code = ExitCode.CALL_FAILED


class WrongPeer(CallError):
    """The peer signed another name than the one the user meant to call (``--peer``)."""

    exit_code = ExitCode.WRONG_PEER


class CallWithSelf(WrongPeer):
    """The peer signed with our own identity key: the hub spliced two of our own calls."""


# -- what the user is shown


class PinStatus(enum.Enum):
    """The one word every call shows next to the peer's signed name and fingerprint."""

    NEW = "NEW"  # pinned during this call: nothing vouches for the key but this call's SAS
    PINNED = "PINNED"  # pinned in an earlier call, never verified
    VERIFIED = "VERIFIED"  # the SAS or safety number was compared, in this call or earlier


STATUS_MEANING = {
    PinStatus.NEW.value: "first seen in this call; compare the SAS",
    PinStatus.PINNED.value: "the key pinned earlier, never verified",
    PinStatus.VERIFIED.value: "the key verified by comparing the SAS or safety number",
}


@dataclass(frozen=True)
class ProtectionState:
    """What the user is shown: is this call end-to-end encrypted, and with whom.

    ``layers`` is "verified" for every product call; only the experiment's weaker sessions
    name another (and say so in ``describe``).
    """

    end_to_end_encrypted: bool
    suite: str | None
    peer_name: str
    peer_fingerprint: str | None = None
    pin: str | None = None  # a PinStatus value; None when identities are not checked
    sas: str | None = None
    layers: str = "verified"

    def describe(self) -> str:
        if not self.end_to_end_encrypted:
            return f"NOT end-to-end encrypted (experiment layers: {self.layers})"
        lines = [f"end-to-end encrypted ({self.suite}) with {self.peer_name}"]
        if self.layers != "verified":
            lines.append(f"  identity NOT verified (experiment layers: {self.layers})")
            if self.sas is not None:
                lines.append(f"  SAS (nobody compares it at this layer): {self.sas}")
        else:
            meaning = STATUS_MEANING.get(self.pin or "", "")
            lines.append(f"  {self.pin} {self.peer_name} {self.peer_fingerprint} ({meaning})")
            lines.append(f"  SAS to read aloud: {self.sas}")
        return "\n".join(lines)


# -- actions


@dataclass(frozen=True)
class Send:
    """Relay ``payload`` (a JSON object) to the remote participant."""

    payload: dict[str, Any]


@dataclass(frozen=True)
class InstallKeys:
    """Give the frame protection these keys (epoch 0, then each rekey): accept frames under
    ``update``'s receive key from now on, send under its send key from now on."""

    suite: CipherSuite
    update: KeyUpdate


@dataclass(frozen=True)
class RetireReceiveKeys:
    """The grace window of these receive KIDs is over: erase them."""

    kids: frozenset[int]


@dataclass(frozen=True)
class AskSas:
    """Ask the user whether the peer reads the same SAS; answer with ``sas_answer``."""

    protection: ProtectionState


@dataclass(frozen=True)
class Protected:
    """The peer is accepted and the call keyed: show the user with whom."""

    protection: ProtectionState


@dataclass(frozen=True)
class MakeOffer:
    """Make (or finish) the local SDP offer, then call ``offer_ready``."""


@dataclass(frozen=True)
class AnswerOffer:
    """Apply the peer's offer, make the answer, then call ``answer_ready``."""

    sdp: str


@dataclass(frozen=True)
class ApplyAnswer:
    """Apply the peer's answer."""

    sdp: str


@dataclass(frozen=True)
class MediaStarted:
    """Both session descriptions are applied: media flows from now on."""


@dataclass(frozen=True)
class Keyed:
    """Routed mode: both sides accepted each other and the sealed channel is ready: the peer
    may get our sender key from now on (``send_sender_key``)."""


@dataclass(frozen=True)
class SenderKeyArrived:
    """Routed mode: the peer's sender key, authenticated by the sealed channel: decrypt the
    peer's frames under it, and acknowledge it (``ack_sender_key``)."""

    key: SenderKey


@dataclass(frozen=True)
class SenderKeyAcked:
    """Routed mode: the peer holds our sender key of KID ``kid``."""

    kid: int


@dataclass(frozen=True)
class Ended:
    """The session is over. ``error`` is set when the call failed, during setup or in the call
    (``reason`` then is "rekey-stalled", "signalling-lost" or the error's class name); else
    ``reason`` is "peer-bye", "peer-left" or what ``hangup`` was told."""

    reason: str
    error: CallError | None = None


Action = (
    Send
    | InstallKeys
    | RetireReceiveKeys
    | AskSas
    | Protected
    | MakeOffer
    | AnswerOffer
    | ApplyAnswer
    | MediaStarted
    | Keyed
    | SenderKeyArrived
    | SenderKeyAcked
    | Ended
)


class SessionState(enum.Enum):
    KEY_AGREEMENT = "key-agreement"
    AWAIT_SAS = "await-sas"  # no timeout: people are reading digits aloud
    AWAIT_PEER = "await-peer"  # we accepted the peer; it may still be reading the SAS
    NEGOTIATING = "negotiating"  # the sealed SDP offer and answer
    IN_CALL = "in-call"
    ENDED = "ended"


SETUP_STATES = frozenset(
    {
        SessionState.KEY_AGREEMENT,
        SessionState.AWAIT_SAS,
        SessionState.AWAIT_PEER,
        SessionState.NEGOTIATING,
    }
)
# Where the setup timeout runs: the network's phases, never while a person decides.
TIMED_STATES = frozenset({SessionState.KEY_AGREEMENT, SessionState.NEGOTIATING})


@dataclass(frozen=True)
class SessionConfig:
    name: str
    identity: IdentityKey = field(repr=False)
    known_peers: KnownPeers = field(repr=False)
    verify: Verify = Verify.PROMPT
    # The name the user means to call (``--peer``), normalised: any other is refused.
    peer: str | None = None
    setup_timeout: float = DEFAULT_SETUP_TIMEOUT
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    suites: Sequence[CipherSuite] = SUITES
    # A new epoch this often in the call (None: never): forward secrecy and healing happen
    # only when rekeys do. The side that started the last rekey (at first, the responder)
    # waits half as long again, so in an honest call the two take turns without colliding,
    # and either keeps them going if the other stops.
    rekey_interval: float | None = DEFAULT_REKEY_INTERVAL
    # A rekey that has not completed by then means the hub is withholding it: the call ends.
    rekey_timeout: float = DEFAULT_REKEY_TIMEOUT
    random_bytes: Callable[[int], bytes] = field(default=os.urandom, repr=False)
    # A group call through a media-routing hub (see the module docstring): no SDP, no pairwise
    # media keys or rekeys; sender keys over the sealed channel instead.
    routed: bool = False


class CallSession:
    """One remote participant's call, from this peer's side (see the module docstring)."""

    def __init__(self, config: SessionConfig, *, initiator: bool, now: float) -> None:
        self.config = config
        self.initiator = initiator
        self.state = SessionState.KEY_AGREEMENT
        self.peer_name: str | None = None
        self.protection: ProtectionState | None = None
        self.rekeys = 0
        # What the hub was caught doing, with how often: "sdp-tampered", "identity-refused",
        # "replay-rejected" and "alteration-rejected" (sealed signalling).
        self.detections: Counter[str] = Counter()
        self._handshake: Initiator | Responder | None = None
        self._result: HandshakeResult | None = None
        self._channel: SealedChannel | None = None
        self._new_pin: str | None = None  # a peer pinned during this call's key agreement
        self._peer_confirmed = False  # the peer's sealed "confirmed" came
        self._setup_deadline: float | None = now + config.setup_timeout
        self._next_rekey: float | None = None
        self._rekey_deadline: float | None = None
        self._requested_rekey = False  # whether this side started the rekey under way or last
        self._hub_gone = False  # nothing more can be sent to the peer
        self._receive_kids: tuple[int, ...] = ()  # the live receive keys, oldest first
        self._retirements: list[tuple[float, frozenset[int]]] = []

    def __repr__(self) -> str:
        return f"CallSession(peer={self.peer_name!r}, state={self.state.value})"

    @property
    def ended(self) -> bool:
        return self.state is SessionState.ENDED

    @property
    def peer_identity(self) -> IdentityPublicKey | None:
        """The identity key the peer signed the key agreement with, once it is done."""
        return None if self._result is None else self._result.peer_identity

    # -- events

    def start(self, now: float) -> list[Action]:
        """The remote participant is there: the initiator opens the key agreement."""
        if not self.initiator:
            return []
        call_id = self.config.random_bytes(CALL_ID_BYTES).hex()
        initiator = Initiator(
            self._agreement_identity(),
            call_id,
            self.config.suites,
            self.config.random_bytes,
            name=self.config.name,
            peer_check=self._peer_check(),
        )
        self._handshake = initiator
        return [Send(initiator.start())]

    def receive(self, payload: object, now: float) -> list[Action]:
        """A payload the remote participant relayed through the hub."""
        if self.state in (SessionState.AWAIT_SAS, SessionState.AWAIT_PEER):
            return self._on_decision(payload, now)
        if self.state is SessionState.KEY_AGREEMENT:
            return self._on_key_agreement(payload, now)
        if self.state is SessionState.NEGOTIATING:
            return self._on_negotiation(payload, now)
        if self.state is SessionState.IN_CALL:
            return self._on_call_message(payload, now)
        return []

    def sas_answer(self, accepted: bool, now: float) -> list[Action]:
        if self.state is not SessionState.AWAIT_SAS:
            return []
        assert self.protection is not None
        if not accepted:
            # A SAS that does not match may mean a man in the middle: nothing stays pinned,
            # and the peer hears of it at once rather than waiting for us.
            declined = Send(self._seal({"type": "declined"}))
            return [declined, *self._fail(VerificationRefused("the SAS was not confirmed"))]
        self.config.known_peers.mark_verified(self.protection.peer_name)
        self._new_pin = None
        self.protection = dataclasses.replace(self.protection, pin=PinStatus.VERIFIED.value)
        return self._accept(now)

    def offer_ready(self, sdp: str, now: float) -> list[Action]:
        """The initiator's local offer, asked for by ``MakeOffer``."""
        if self.state is not SessionState.NEGOTIATING or not self.initiator:
            return []
        return [Send(self._seal({"type": "offer", "sdp": sdp}))]

    def answer_ready(self, sdp: str, now: float) -> list[Action]:
        """The responder's local answer, asked for by ``AnswerOffer``."""
        if self.state is not SessionState.NEGOTIATING or self.initiator:
            return []
        return [Send(self._seal({"type": "answer", "sdp": sdp})), *self._media_started(now)]

    def rekey(self, now: float) -> list[Action]:
        """Start a new epoch now (in the call, once no rekey is under way)."""
        channel = self._channel
        if self.state is not SessionState.IN_CALL or channel is None or self._hub_gone:
            return []
        if channel.rekey_in_progress or self.config.routed:
            return []
        request = channel.start_rekey()
        self._rekey_deadline = now + self.config.rekey_timeout
        self._next_rekey = None
        self._requested_rekey = True
        return [Send(request)]

    def send_sender_key(self, key: SenderKey, now: float) -> list[Action]:
        """Routed mode, in the call: give the peer our sender key ``key``."""
        channel = self._routed_channel()
        return [] if channel is None else [Send(channel.seal_sender_key(key))]

    def ack_sender_key(self, kid: int, now: float) -> list[Action]:
        """Routed mode, in the call: tell the peer we hold its sender key of KID ``kid``."""
        channel = self._routed_channel()
        return [] if channel is None else [Send(channel.seal_sender_key_ack(kid))]

    def _routed_channel(self) -> SealedChannel | None:
        """The channel sender keys go through, once the session is keyed and can still send."""
        if not self.config.routed:
            raise LocalError("sender keys go only through a routed session")
        if self.state is not SessionState.IN_CALL or self._hub_gone:
            return None
        return self._channel

    def hangup(self, reason: str, now: float) -> list[Action]:
        """End the session: in the call with a bye to the peer; during setup, abandon it."""
        if self.state in SETUP_STATES:
            return self._fail(CallFailed("hung up before the call was set up"))
        if self.state is SessionState.ENDED:
            return []
        self.state = SessionState.ENDED
        return [Send(self._seal({"type": "bye"})), Ended(reason)]

    def peer_left(self, now: float) -> list[Action]:
        if self.state in SETUP_STATES:
            return self._fail(CallFailed("the peer left during setup"))
        return self._end("peer-left")

    def hub_failed(self, detail: str, now: float, *, closed: bool) -> list[Action]:
        """The hub connection closed, or sent something this peer refused. During setup the
        call cannot go on. In the call media is peer to peer and the session goes on; once the
        hub is gone no rekey can cross, so none is started and one under way is abandoned
        rather than ending the call at its deadline: the call stays in its current epoch."""
        if self.state in SETUP_STATES:
            return self._fail(CallFailed(f"the hub failed during setup: {detail}"))
        if closed:
            self._hub_gone = True
            self._next_rekey = self._rekey_deadline = None
        return []

    def receive_key_used(self, kid: int, now: float) -> list[Action]:
        """The first frame under receive KID ``kid`` authenticated. When that is the newest
        key, the peer has switched to it, so the older ones serve only frames still in flight:
        they are retired after the grace window. (A timer from the rekey alone would let a hub
        that delays the peer's switch past the window cut that direction of media.)"""
        kids = self._receive_kids
        if len(kids) < 2 or kid != kids[-1]:
            return []
        self._receive_kids = (kid,)
        self._retirements.append((now + self.config.grace_seconds, frozenset(kids[:-1])))
        return []

    def abort(self, error: CallError, now: float) -> list[Action]:
        """The driver could not carry out an action (e.g. aiortc refused the peer's SDP)."""
        return self._fail(error)

    @property
    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must be called next, if at all."""
        deadlines = [deadline for deadline, _ in self._retirements]
        if self.state in TIMED_STATES and self._setup_deadline is not None:
            deadlines.append(self._setup_deadline)
        if self.state is SessionState.IN_CALL:
            deadlines += [d for d in (self._rekey_deadline, self._next_rekey) if d is not None]
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        due = [kids for deadline, kids in self._retirements if deadline <= now]
        self._retirements = [(d, kids) for d, kids in self._retirements if d > now]
        actions += [RetireReceiveKeys(kids) for kids in due]
        if self.state in TIMED_STATES and self._setup_deadline is not None:
            if now >= self._setup_deadline:
                actions += self._fail(CallFailed("the call was not set up in time"))
        elif self.state is SessionState.IN_CALL:
            if self._rekey_deadline is not None and now >= self._rekey_deadline:
                timeout = self.config.rekey_timeout
                actions += self._fail(
                    CallFailed(f"a rekey did not complete within {timeout:g} s"), "rekey-stalled"
                )
            elif self._next_rekey is not None and now >= self._next_rekey:
                actions += self.rekey(now)
        return actions

    # -- the key agreement

    def _on_key_agreement(self, payload: object, now: float) -> list[Action]:
        if not isinstance(payload, dict):
            return self._fail(CallFailed("the peer sent a setup message that is not an object"))
        if self._handshake is None:
            if payload.get("type") != "commit":
                return self._fail(
                    CallFailed(f"expected 'commit' from the peer, got {payload.get('type')!r}")
                )
            if not isinstance(payload.get("call_id"), str):
                return self._fail(CallFailed("the peer's commit carries no call id"))
        try:
            if self._handshake is None:
                self._handshake = self._respond_to(payload["call_id"])
            replies = self._handshake.receive(payload)
        except CallError as error:  # _check_peer: not the peer the user meant
            self.detections["identity-refused"] += 1
            return self._fail(error)
        except PinnedIdentityMismatch as error:
            self.detections["identity-refused"] += 1
            return self._fail(IdentityMismatch(str(error)))
        except UnknownPeer as error:
            self.detections["identity-refused"] += 1
            return self._fail(VerificationRefused(str(error)))
        except CryptoError as error:
            return self._fail(CallFailed(f"key agreement failed: {error}"))
        actions: list[Action] = [Send(reply) for reply in replies]
        if self._handshake.state is HandshakeState.DONE:
            actions += self._agreed(self._handshake.result, now)
        return actions

    def _respond_to(self, call_id: str) -> Responder:
        return Responder(
            self._agreement_identity(),
            call_id,
            self.config.suites,
            self.config.random_bytes,
            name=self.config.name,
            peer_check=self._peer_check(),
        )

    def _agreed(self, result: HandshakeResult, now: float) -> list[Action]:
        self._result = result
        # Each name travels in the key agreement, signed by its owner: the hub cannot rename a
        # peer, so nothing is ever pinned or shown under a name the hub chose.
        self.peer_name = result.peer_name
        self._channel = self._signalling_channel(result)
        protection = self._protection_of(result)
        self.protection = protection
        if self._asks_sas(protection):
            self.state = SessionState.AWAIT_SAS
            return [AskSas(protection)]
        return self._accept(now)

    def _accept(self, now: float) -> list[Action]:
        """We accept the peer: key the call and tell the peer; negotiate the media once the
        peer has accepted us too."""
        assert self.protection is not None
        actions: list[Action] = [Protected(self.protection)]
        if not self.config.routed:
            actions += self._initial_keys()
        actions.append(Send(self._seal({"type": "confirmed"})))
        self.state = SessionState.AWAIT_PEER
        if self._peer_confirmed:
            actions += self._both_accepted(now)
        return actions

    def _on_decision(self, payload: object, now: float) -> list[Action]:
        """The peer's sealed decision about us: "confirmed" or "declined", and nothing else."""
        try:
            content = self._open_setup(payload)
        except CryptoError as error:
            self.detections["sdp-tampered"] += 1
            return self._fail(CallFailed(f"a sealed setup message was rejected: {error}"))
        decision = content.get("type") if isinstance(content, dict) else None
        if decision == "declined":
            return self._fail(VerificationRefused(f"{self.peer_name} did not confirm the SAS"))
        if decision != "confirmed" or self._peer_confirmed:
            return self._fail(CallFailed(f"expected the peer's decision, got {decision!r}"))
        self._peer_confirmed = True
        if self.state is SessionState.AWAIT_PEER:
            return self._both_accepted(now)
        return []

    def _both_accepted(self, now: float) -> list[Action]:
        if self.config.routed:
            # No media of ours flows through this session: the call starts now.
            self.state = SessionState.IN_CALL
            self._setup_deadline = None
            return [Keyed()]
        return self._negotiate(now)

    def _negotiate(self, now: float) -> list[Action]:
        """Both sides accepted each other: the sealed offer and answer, under the timeout."""
        self.state = SessionState.NEGOTIATING
        self._setup_deadline = now + self.config.setup_timeout
        return [MakeOffer()] if self.initiator else []

    def _initial_keys(self) -> list[Action]:
        assert self._result is not None
        return self._install(self._result.suite, self._result.initial_keys)

    def _install(self, suite: CipherSuite, update: KeyUpdate) -> list[Action]:
        actions: list[Action] = [InstallKeys(suite, update)]
        if update.install_receive is not None:
            self._receive_kids += (update.install_receive.kid,)
            if len(self._receive_kids) > MAX_RECEIVE_KEYS:
                # A newer epoch before the peer used the last one: the oldest serves nothing.
                stale = self._receive_kids[:-MAX_RECEIVE_KEYS]
                self._receive_kids = self._receive_kids[-MAX_RECEIVE_KEYS:]
                actions.append(RetireReceiveKeys(frozenset(stale)))
        return actions

    # -- the media negotiation

    def _on_negotiation(self, payload: object, now: float) -> list[Action]:
        try:
            content = self._open_setup(payload)
        except CryptoError as error:
            # The only sealed setup messages are the offer and the answer.
            self.detections["sdp-tampered"] += 1
            return self._fail(CallFailed(f"a sealed setup message was rejected: {error}"))
        if not isinstance(content, dict):
            return self._fail(CallFailed("the peer sent a setup message that is not an object"))
        expected = "answer" if self.initiator else "offer"
        if content.get("type") != expected:
            return self._fail(
                CallFailed(f"expected {expected!r} from the peer, got {content.get('type')!r}")
            )
        sdp = content.get("sdp")
        if not isinstance(sdp, str):
            return self._fail(CallFailed("the peer's session description is missing"))
        if not self.initiator:
            return [AnswerOffer(sdp)]
        return [ApplyAnswer(sdp), *self._media_started(now)]

    def _media_started(self, now: float) -> list[Action]:
        self.state = SessionState.IN_CALL
        self._setup_deadline = None
        # The initiator starts the first rekey: the responder waits as if it had started one.
        self._requested_rekey = not self.initiator
        self._schedule_rekey(now)
        return [MediaStarted()]

    # -- in the call

    def _on_call_message(self, payload: object, now: float) -> list[Action]:
        channel = self._channel
        if channel is None:
            return self._on_clear_call_message(payload)
        try:
            received = channel.open(payload)
        except (SealedGap, SealedReorder) as error:
            # An authentic message is missing: from now on the channel refuses every message
            # (a bye, a rekey), so the call cannot go on as the peers believe it does.
            self.detections["signalling-lost"] += 1
            return self._fail(CallFailed(f"a sealed message was lost: {error}"), "signalling-lost")
        except CryptoError as error:
            # A forged or replayed copy changes nothing (the channel is as it was): count it.
            replayed = isinstance(error, SealedReplay)
            self.detections["replay-rejected" if replayed else "alteration-rejected"] += 1
            logger.warning("dropped a sealed message that did not open: %s", error)
            return []
        actions = self._apply(received, now)
        self._track_rekey(channel, now)
        return actions

    def _schedule_rekey(self, now: float) -> None:
        interval = self.config.rekey_interval
        if self.config.routed:
            return  # sender keys change with the membership, not on a pairwise schedule
        if interval is not None and self._channel is not None and not self._hub_gone:
            factor = REQUESTER_REKEY_FACTOR if self._requested_rekey else 1.0
            self._next_rekey = now + interval * factor

    def _track_rekey(self, channel: SealedChannel, now: float) -> None:
        """A rekey under way has a deadline; a completed one restarts the interval."""
        if channel.rekey_in_progress:
            if self._rekey_deadline is None:  # the peer started this one
                self._rekey_deadline = now + self.config.rekey_timeout
                self._next_rekey = None
                self._requested_rekey = False
        elif self._rekey_deadline is not None:
            self._rekey_deadline = None
            self._schedule_rekey(now)

    def _apply(self, received: Received, now: float) -> list[Action]:
        assert self._result is not None
        update = received.keys
        new_keys = update.install_receive is not None or update.switch_send is not None
        pairwise_rekey = bool(received.replies) or new_keys
        group_keys = received.sender_key is not None or received.sender_key_ack is not None
        if self.config.routed and pairwise_rekey:
            return self._fail(CallFailed("the peer started a pairwise rekey in a routed call"))
        if not self.config.routed and group_keys:
            return self._fail(CallFailed("the peer sent a group sender key in a two-party call"))
        actions: list[Action] = [Send(reply) for reply in received.replies]
        if new_keys:
            actions += self._install(self._result.suite, update)
        if update.switch_send is not None:
            self.rekeys += 1
        if received.sender_key is not None:
            actions.append(SenderKeyArrived(received.sender_key))
        if received.sender_key_ack is not None:
            actions.append(SenderKeyAcked(received.sender_key_ack))
        if received.content is not None and received.content.get("type") == "bye":
            actions += self._end("peer-bye")
        return actions

    def _end(self, reason: str) -> list[Action]:
        if self.state is SessionState.ENDED:
            return []
        self.state = SessionState.ENDED
        return [Ended(reason)]

    def _fail(self, error: CallError, reason: str | None = None) -> list[Action]:
        if self.state is SessionState.ENDED:
            return []
        if self.state in SETUP_STATES and self._new_pin is not None:
            # Failed, refused or hung up before the peer was accepted: a key the user never
            # confirmed (perhaps the hub's, stalling until the user gives up) stays unpinned.
            self.config.known_peers.remove(self._new_pin)
            self._new_pin = None
        actions: list[Action] = []
        if self.config.routed and self.state is SessionState.IN_CALL and not self._hub_gone:
            # Only this pair ends, and the rest of the group call goes on: the bye makes the
            # peer drop us too (and move to a sender key we never get) instead of handing keys
            # to a member that no longer takes them. Our sending direction still works even
            # when what the peer sent was lost.
            actions.append(Send(self._seal({"type": "bye"})))
        self.state = SessionState.ENDED
        self._setup_deadline = None
        return [*actions, Ended(reason or type(error).__name__, error)]

    # -- pins and the SAS

    def _check_peer(self, name: str, key: IdentityPublicKey) -> None:
        """The handshake's pin check: ``name`` and ``key`` were just signed by the peer, and
        no key exists yet, so whatever this refuses never carries a media frame."""
        if key == self.config.identity.public_key:
            raise CallWithSelf(
                f"the peer {name!r} signed with our own identity key {key.fingerprint()}: "
                "the hub connected this call to another of our own"
            )
        if self.config.peer is not None and name != self.config.peer:
            raise WrongPeer(
                f"the peer is {name!r} ({key.fingerprint()}), not {self.config.peer!r} "
                "as asked with --peer"
            )
        known_peers = self.config.known_peers
        pinned_before = known_peers.get(name) is not None
        try:
            known_peers.check(name, key, pin_new=self.config.verify is not Verify.PINNED)
        except UnknownPeer:
            raise UnknownPeer(f"{name} is not pinned and --verify pinned is set") from None
        if not pinned_before:
            self._new_pin = name

    def _pin_status(self, name: str) -> PinStatus:
        if name == self._new_pin:
            return PinStatus.NEW
        pin = self.config.known_peers.get(name)
        assert pin is not None  # _check_peer pinned or found it
        return PinStatus.VERIFIED if pin.verified else PinStatus.PINNED

    # -- experiment hooks: the product's choices, which client/experiment/ overrides

    def _agreement_identity(self) -> IdentityKey:
        """The identity key the key agreement signs with: this peer's own."""
        return self.config.identity

    def _peer_check(self) -> Callable[[str, IdentityPublicKey], object] | None:
        """What the key agreement calls with the peer's authenticated name and key."""
        return self._check_peer

    def _signalling_channel(self, result: HandshakeResult) -> SealedChannel | None:
        """Where every message after the key agreement goes: the sealed channel."""
        return result.channel

    def _protection_of(self, result: HandshakeResult) -> ProtectionState:
        status = self._pin_status(result.peer_name)
        return ProtectionState(
            end_to_end_encrypted=True,
            suite=result.suite.name,
            peer_name=result.peer_name,
            peer_fingerprint=result.peer_identity.fingerprint(),
            pin=status.value,
            sas=result.sas,
        )

    def _asks_sas(self, protection: ProtectionState) -> bool:
        return self.config.verify is Verify.PROMPT and protection.pin != PinStatus.VERIFIED.value

    def _seal(self, content: dict[str, Any]) -> dict[str, Any]:
        assert self._channel is not None
        return self._channel.seal(content)

    def _open_setup(self, payload: object) -> object:
        assert self._channel is not None
        return self._channel.open(payload).content

    def _on_clear_call_message(self, payload: object) -> list[Action]:
        """Only a session without a sealed channel (the experiment's) gets here."""
        if isinstance(payload, dict) and payload.get("type") == "bye":
            return self._end("peer-bye")
        return []
