"""The group call: this member's side of a call of N through a media-routing hub, sans-I/O.

A ``GroupSession`` composes one routed ``CallSession`` (client/session.py) per remote peer and
owns this member's sender key (crypto/sender_keys.py): the one SFrame key every frame we send
is encrypted under, which each other member gets over its pairwise sealed channel. Like the
call session it never touches a socket or a clock: the driver (client/group_call.py) feeds it
events, each with ``now``, and carries out the actions it returns, in order.

Events: ``welcome`` (we joined; the peers already there), ``peer_joined``, ``peer_left``,
``receive`` (a payload a peer relayed), ``sas_answer`` (per peer), ``hangup``, ``hub_failed``
and ``handle_timer`` once ``now`` reaches ``next_deadline``.

Actions: ``Send`` a payload to a peer, ``AskSas`` about a peer, ``UseSendKey`` (encrypt every
frame from now on under this key), ``AddReceiveKey`` / ``RetireReceiveGenerations`` (a
member's receiver), ``MemberJoined`` / ``MemberLeft`` / ``MemberFailed``, ``RosterChanged``,
``SecurityCode`` and, last, ``Ended``.

Who gets a key. The member already in the room starts the key agreement toward the newcomer,
as in a two-party call, with the same pin check, ``--verify`` and SAS question per pair. A
peer becomes a member when its pairwise session is keyed (both accepted each other); only then
does it get our sender key. A peer whose pairwise session fails before that (a refused or
changed key, a declined SAS, ``--verify pinned`` and no pin, a setup that never completes, a
protocol error) is dropped alone (``MemberFailed``) and never gets a key; the call goes on with
the others. The hub decides who is in the room, so it can invent or hide peers: an invented
one never completes its key agreement, a hidden one is missing from some members' rosters, and
the security code (over every member's identity key and current sender-key generation) then
differs between the screens.

The sender-key schedule (RFC 9605 section 5.1: KID = generation and ratchet step):

- our first key is generation 0, step 0, used at once (nobody holds it, and nobody can be
  given it before the first member is keyed);
- join (a member became keyed): the current key, and the pending one if a leave's is
  waiting, each ratchet one step, so the joiner cannot compute any key used before it
  joined; the joiner gets both; we send under the ratcheted current key at once. The other
  members need no message, since they follow the ratchet from the step they hold, and the
  joiner, which cannot read anything older, holds our frames until its key arrives instead
  of dropping them, so waiting for its acknowledgement would gain nothing;
- leave (the hub's ``peer-left``, or the pairwise session of a member ended): a pending
  fresh random key of the next generation, which every remaining member gets and the leaver
  cannot compute;
- switch to the pending key once every member it was given to has acknowledged it, or
  ``switch_bound`` after the first leave not yet in use, whichever comes first. Receivers hold
  frames under a key they do not have yet (``SenderKeyReceiver``), so the bound costs a slow
  member only a short hold, and it keeps a leaver's access under a second when a member is
  slow or gone;
- a member that does not acknowledge a key within ``rekey_timeout`` (the hub withholding it)
  is dropped like one that left.

Each member's key we receive is added to its receiver and acknowledged; when a member moves to
a new generation its older ones are retired ``grace_seconds`` later (frames in flight: the
member switched at most ``switch_bound`` after making the key, which we got before it could
switch unless the hub delayed it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from client import session as pair
from client.session import (
    CallError,
    CallFailed,
    CallSession,
    PinStatus,
    ProtectionState,
    SessionConfig,
)
from crypto.identity import IdentityPublicKey
from crypto.sender_keys import SenderKey, group_security_code
from crypto.sframe import CipherSuite
from signaling.protocol import PeerId

logger = logging.getLogger("blindhub.group")

# How long a leave's fresh sender key may wait for the members' acknowledgements before we send
# under it anyway (see the module docstring): well under the second a leaver may keep reading.
SWITCH_BOUND = 0.5


# -- what the user is shown


@dataclass(frozen=True)
class RosterEntry:
    """A member we share keys with: its signed name, fingerprint and pin status."""

    peer: PeerId
    name: str
    fingerprint: str
    status: PinStatus


# -- actions


@dataclass(frozen=True)
class Send:
    """Relay ``payload`` (a JSON object) to ``peer``."""

    peer: PeerId
    payload: dict[str, Any]


@dataclass(frozen=True)
class AskSas:
    """Ask the user whether ``peer`` reads the same SAS; answer with ``sas_answer``."""

    peer: PeerId
    protection: ProtectionState


@dataclass(frozen=True)
class UseSendKey:
    """Encrypt every frame we send from now on under ``key`` (``key.media_key()``)."""

    key: SenderKey


@dataclass(frozen=True)
class AddReceiveKey:
    """Give ``peer``'s receiver its sender key ``key`` (it releases the frames it held)."""

    peer: PeerId
    key: SenderKey


@dataclass(frozen=True)
class RetireReceiveGenerations:
    """The grace window is over: erase ``peer``'s keys of generations below ``below``."""

    peer: PeerId
    below: int


@dataclass(frozen=True)
class MemberJoined:
    """``peer`` is accepted and keyed: it gets our sender key; make its receiver."""

    peer: PeerId
    protection: ProtectionState


@dataclass(frozen=True)
class MemberLeft:
    """A member is gone: drop its receiver. ``reason`` as for ``client.session.Ended``;
    ``error`` set when its pairwise session failed in the call."""

    peer: PeerId
    reason: str
    error: CallError | None = None


@dataclass(frozen=True)
class MemberFailed:
    """``peer`` never became a member (refused, declined, timed out, left during setup): it
    got no key."""

    peer: PeerId
    error: CallError


@dataclass(frozen=True)
class RosterChanged:
    """The members we share keys with, sorted by name."""

    roster: tuple[RosterEntry, ...]


@dataclass(frozen=True)
class SecurityCode:
    """The group security code changed: show it (the same on every screen exactly when every
    member sees the same members and sender-key generations)."""

    code: str


@dataclass(frozen=True)
class Ended:
    """The group call is over: ``reason`` is what ``hangup`` was told, or "hub-lost" (with
    ``error``) when the hub, which carries the media, went away."""

    reason: str
    error: CallError | None = None


Action = (
    Send
    | AskSas
    | UseSendKey
    | AddReceiveKey
    | RetireReceiveGenerations
    | MemberJoined
    | MemberLeft
    | MemberFailed
    | RosterChanged
    | SecurityCode
    | Ended
)


@dataclass
class _Peer:
    """One remote peer's pairwise session and where it stands in our key schedule."""

    session: CallSession
    protection: ProtectionState | None = None
    member: bool = False  # keyed: it has (or is being sent) our sender key
    generation: int | None = None  # the newest generation of its sender key we hold
    awaited_kid: int | None = None  # the newest of our keys it has not acknowledged
    ack_deadline: float | None = None  # for its oldest unacknowledged key


class GroupSession:
    """This member's group call (see the module docstring)."""

    def __init__(
        self, config: SessionConfig, *, now: float, switch_bound: float = SWITCH_BOUND
    ) -> None:
        self.config = dataclasses.replace(config, routed=True)
        self.switch_bound = switch_bound
        self._past_detections: Counter[str] = Counter()  # of the sessions that ended
        self._peers: dict[PeerId, _Peer] = {}
        self._suite = self.config.suites[0]
        self._current = SenderKey.fresh(self._suite, 0, random_bytes=self.config.random_bytes)
        self._pending: SenderKey | None = None  # a leave's fresh key, until the switch
        self._pending_since = now  # the first leave not yet in use
        self._awaiting: set[PeerId] = set()  # whose acks the pending key waits for
        self._retirements: list[tuple[float, PeerId, int]] = []
        self._ended = False
        self._code: tuple[frozenset[tuple[bytes, int | None]], str] | None = None
        self._shown_roster = self.roster
        self._shown_code = self.security_code

    def __repr__(self) -> str:
        return f"GroupSession(members={len(self.roster)}, send_kid={self._current.kid})"

    # -- what the driver and the user can read

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def suite(self) -> CipherSuite:
        """The SFrame suite of every sender key in the call, ours and the members' (the first of
        ``SessionConfig.suites``): a member's receiver is made for it."""
        return self._suite

    @property
    def send_key(self) -> SenderKey:
        """The key our frames go under now."""
        return self._current

    @property
    def pending_key(self) -> SenderKey | None:
        """A leave's fresh key, which we switch to once its members acknowledged it (or at
        the bound)."""
        return self._pending

    @property
    def detections(self) -> Counter[str]:
        """What the pairwise sessions caught the hub doing, those that ended included."""
        live = (state.session.detections for state in self._peers.values())
        return sum(live, Counter(self._past_detections))

    @property
    def sessions(self) -> Mapping[PeerId, CallSession]:
        """The pairwise session of every peer still there, member or not yet."""
        return {peer: state.session for peer, state in self._peers.items()}

    @property
    def roster(self) -> tuple[RosterEntry, ...]:
        entries = []
        for peer, state in self._peers.items():
            if state.member:
                assert state.protection is not None and state.protection.pin is not None
                identity = state.session.peer_identity
                assert identity is not None
                name = state.protection.peer_name
                status = PinStatus(state.protection.pin)
                entries.append(RosterEntry(peer, name, identity.fingerprint(), status))
        return tuple(sorted(entries, key=lambda entry: (entry.name, entry.peer)))

    @property
    def security_code(self) -> str:
        """Over ourselves and every member of the roster, each with the newest generation of
        its key (ours: the newest we made; a member's whose key has not reached us: None). A
        member holds our key from the moment it is on the roster, so it counts from then on,
        key or not: a code over fewer members than the roster shows would match the screen of
        someone who does not see that member at all."""
        newest = self._pending or self._current
        members: list[tuple[IdentityPublicKey, int | None]] = [
            (self.config.identity.public_key, newest.generation)
        ]
        for state in self._peers.values():
            identity = state.session.peer_identity
            if state.member and identity is not None:
                members.append((identity, state.generation))
        # Computed again only when what it covers changed: it costs 5,200 hashes, and every
        # event asks for it, a relay the hub injects included.
        covered = frozenset((identity.raw, generation) for identity, generation in members)
        if self._code is None or self._code[0] != covered:
            self._code = (covered, group_security_code(members))
        return self._code[1]

    @property
    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must be called next, if at all."""
        if self._ended:
            return None
        deadlines = [deadline for deadline, _, _ in self._retirements]
        for state in self._peers.values():
            deadlines += [
                d for d in (state.session.next_deadline, state.ack_deadline) if d is not None
            ]
        if self._pending is not None:
            deadlines.append(self._pending_since + self.switch_bound)
        return min(deadlines, default=None)

    # -- events

    def present(self, peer: PeerId) -> bool:
        """Whether ``peer`` is in the room as far as this session knows (member or in its key
        agreement): the hub's slot map and leaves name anyone, and only these are kept."""
        return self._live(peer) is not None

    def welcome(self, peers: Sequence[PeerId], now: float) -> list[Action]:
        """We joined the room, where ``peers`` already are: each of them starts the key
        agreement with us."""
        actions: list[Action] = [UseSendKey(self._current)]
        for peer in peers:
            actions += self._add_peer(peer, initiator=False, now=now)
        return self._after(actions, now)

    def peer_joined(self, peer: PeerId, now: float) -> list[Action]:
        """A newcomer: we were here first, so we start the key agreement."""
        return self._after(self._add_peer(peer, initiator=True, now=now), now)

    def peer_left(self, peer: PeerId, now: float) -> list[Action]:
        state = self._live(peer)
        if state is None:
            return []
        return self._after(self._take(peer, state.session.peer_left(now), now), now)

    def receive(self, peer: PeerId, payload: object, now: float) -> list[Action]:
        """A payload ``peer`` relayed through the hub."""
        state = self._live(peer)
        if state is None:
            logger.debug("dropped a relay from %s, which has no session", peer)
            return []
        return self._after(self._take(peer, state.session.receive(payload, now), now), now)

    def sas_answer(self, peer: PeerId, accepted: bool, now: float) -> list[Action]:
        state = self._live(peer)
        if state is None:
            return []
        return self._after(self._take(peer, state.session.sas_answer(accepted, now), now), now)

    def hangup(self, reason: str, now: float) -> list[Action]:
        """End the call: a bye to every member; sessions still in setup are abandoned."""
        if self._ended:
            return []
        actions: list[Action] = []
        for peer, state in self._peers.items():
            for action in state.session.hangup(reason, now):
                if isinstance(action, pair.Send):
                    actions.append(Send(peer, action.payload))
        return [*actions, *self._end(reason)]

    def hub_failed(self, detail: str, now: float, *, closed: bool) -> list[Action]:
        """The hub connection closed, or sent something this peer refused. The hub carries the
        media of a group call: once it is gone the call is over. A bad message alone belongs
        to no pair, and each pair's own checks catch what it did to that pair."""
        if self._ended:
            return []
        if not closed:
            logger.warning("ignored a bad message from the hub: %s", detail)
            return []
        for state in self._peers.values():
            state.session.hub_failed(detail, now, closed=True)
        return self._end("hub-lost", CallFailed(f"the hub connection was lost: {detail}"))

    def handle_timer(self, now: float) -> list[Action]:
        if self._ended:
            return []
        actions: list[Action] = []
        for peer, state in list(self._peers.items()):
            deadline = state.session.next_deadline
            if deadline is not None and deadline <= now:
                actions += self._take(peer, state.session.handle_timer(now), now)
        for peer, state in list(self._peers.items()):
            if state.ack_deadline is not None and state.ack_deadline <= now:
                timeout = self.config.rekey_timeout
                error = CallFailed(f"our sender key was not acknowledged within {timeout:g} s")
                actions += self._take(peer, state.session.abort(error, now), now)
        due = [(peer, below) for deadline, peer, below in self._retirements if deadline <= now]
        self._retirements = [item for item in self._retirements if item[0] > now]
        actions += [RetireReceiveGenerations(peer, below) for peer, below in due]
        return self._after(actions, now)

    # -- the pairwise sessions

    def _live(self, peer: PeerId) -> _Peer | None:
        return None if self._ended else self._peers.get(peer)

    def _add_peer(self, peer: PeerId, *, initiator: bool, now: float) -> list[Action]:
        if self._ended:
            return []
        if peer in self._peers:
            logger.warning("the hub announced %s again; its session goes on", peer)
            return []
        session = CallSession(self.config, initiator=initiator, now=now)
        self._peers[peer] = _Peer(session)
        return self._take(peer, session.start(now), now)

    def _take(self, peer: PeerId, actions: Iterable[pair.Action], now: float) -> list[Action]:
        """Turn one pairwise session's actions into the group's."""
        out: list[Action] = []
        state = self._peers[peer]
        for action in actions:
            match action:
                case pair.Send(payload):
                    out.append(Send(peer, payload))
                case pair.AskSas(protection):
                    out.append(AskSas(peer, protection))
                case pair.Protected(protection):
                    state.protection = protection
                case pair.Keyed():
                    out += self._joined(peer, state, now)
                case pair.SenderKeyArrived(key):
                    out += self._key_arrived(peer, state, key, now)
                case pair.SenderKeyAcked(kid):
                    self._acked(peer, state, kid)
                case pair.Ended(reason, error):
                    out += self._gone(peer, state, reason, error, now)
                case _:
                    # A routed session never emits the two-party call's keys or SDP.
                    raise AssertionError(f"a routed session asked for {action!r}")
        return out

    def _joined(self, peer: PeerId, state: _Peer, now: float) -> list[Action]:
        assert state.protection is not None
        identity = state.session.peer_identity
        for other in self._peers.values():
            if other.member and other.session.peer_identity == identity:
                # One identity, one member: the roster and the security code list each key
                # once. (Two devices of one person: the second waits for the first to leave.)
                assert other.protection is not None
                error = CallFailed(
                    f"{state.protection.peer_name}'s identity key is already in the call, as "
                    f"{other.protection.peer_name}"
                )
                return self._take(peer, state.session.abort(error, now), now)
        state.member = True
        logger.info("%s joined (%s)", state.protection.peer_name, peer)
        self._current = self._current.ratcheted()
        actions: list[Action] = [MemberJoined(peer, state.protection), UseSendKey(self._current)]
        actions += self._give_key(peer, state, self._current, now)
        if self._pending is not None:
            self._pending = self._pending.ratcheted()
            actions += self._give_key(peer, state, self._pending, now)
        return actions

    def _give_key(self, peer: PeerId, state: _Peer, key: SenderKey, now: float) -> list[Action]:
        state.awaited_kid = key.kid
        if state.ack_deadline is None:
            state.ack_deadline = now + self.config.rekey_timeout
        return self._take(peer, state.session.send_sender_key(key, now), now)

    def _key_arrived(self, peer: PeerId, state: _Peer, key: SenderKey, now: float) -> list[Action]:
        if key.suite is not self._suite or (
            state.generation is not None and key.generation <= state.generation
        ):
            # Authentic, yet not what an honest member sends: every member's keys are of the
            # group's suite, one key per generation, each generation newer (a receiver refuses
            # anything else: crypto.sender_keys.SenderKeyRejected). Unacknowledged, it ends
            # the pair at the member's side if it insists.
            logger.warning("dropped a sender key from %s that does not fit: %r", peer, key)
            return []
        if state.generation is not None:
            deadline = now + self.config.grace_seconds
            self._retirements.append((deadline, peer, key.generation))
        state.generation = key.generation
        ack = state.session.ack_sender_key(key.kid, now)
        return [AddReceiveKey(peer, key), *self._take(peer, ack, now)]

    def _acked(self, peer: PeerId, state: _Peer, kid: int) -> None:
        if kid != state.awaited_kid:
            return  # an older key's ack: the newer one's is still due
        state.awaited_kid = state.ack_deadline = None
        self._awaiting.discard(peer)

    def _gone(
        self, peer: PeerId, state: _Peer, reason: str, error: CallError | None, now: float
    ) -> list[Action]:
        del self._peers[peer]
        self._past_detections.update(state.session.detections)
        self._awaiting.discard(peer)
        self._retirements = [item for item in self._retirements if item[1] != peer]
        if not state.member:
            assert error is not None  # a session ends in setup only by failing
            logger.warning("%s was not admitted: %s", peer, error)
            return [MemberFailed(peer, error)]
        logger.info("%s left (%s): %s", peer, reason, error or "")
        return [MemberLeft(peer, reason, error), *self._fresh_key(now)]

    def _fresh_key(self, now: float) -> list[Action]:
        """A member that held our key is gone: a fresh generation for everyone else."""
        if self._pending is None:
            self._pending_since = now
        generation = (self._pending or self._current).generation + 1
        self._pending = SenderKey.fresh(
            self._suite, generation, random_bytes=self.config.random_bytes
        )
        self._awaiting = set()
        actions: list[Action] = []
        for peer, state in list(self._peers.items()):
            if state.member:
                self._awaiting.add(peer)
                actions += self._give_key(peer, state, self._pending, now)
        return actions

    # -- after every event

    def _after(self, actions: list[Action], now: float) -> list[Action]:
        """The switch, if it is due, and what the user must be shown anew."""
        if self._ended:
            return actions
        pending = self._pending
        if pending is not None and (
            not self._awaiting or now >= self._pending_since + self.switch_bound
        ):
            if self._awaiting:
                logger.info("sending under %r without acks from %s", pending, self._awaiting)
            self._current, self._pending = pending, None
            self._awaiting = set()
            actions.append(UseSendKey(pending))
        roster, code = self.roster, self.security_code
        if roster != self._shown_roster:
            self._shown_roster = roster
            actions.append(RosterChanged(roster))
        if code != self._shown_code:
            self._shown_code = code
            actions.append(SecurityCode(code))
        return actions

    def _end(self, reason: str, error: CallError | None = None) -> list[Action]:
        self._ended = True
        for state in self._peers.values():
            self._past_detections.update(state.session.detections)
        self._peers.clear()
        self._pending = None
        self._retirements = []
        return [Ended(reason, error)]
