"""The media-routing core of ``blindhub hub --route-media``: who receives whose media, with no I/O.

Each member of a routed room publishes one audio and one video stream (mids "0" and "1" of its
connection to the hub) and receives the others' streams on pre-allocated slots: slot k is the
audio mid ``2 + 2k`` and the video mid ``3 + 2k``, for k = 0 .. max_peers_per_room - 2. Slots
are allocated lowest free first when a member's media starts and freed when it leaves, so joins
and leaves never renegotiate SDP.

Events go in (``join``, ``answer``, ``answer_applied``, ``answer_failed``, ``leave``,
``keyframe_wanted``), commands come out for the asyncio edge (``signaling.media_server``) to
carry out; ``retransmissions_wanted`` answers how many packets a subscriber's NACKs may have
sent again. Time is a parameter. The hot path, ``routes(publisher)``, returns a cached tuple.
The core never sees a frame's contents: the edge counts what it forwarded through ``forwarded``.
"""

import collections
import enum
from dataclasses import dataclass, field
from typing import Final

from signaling.hub import TokenBucket
from signaling.protocol import (
    MEDIA_KINDS,
    ErrorCode,
    MediaTrack,
    MediaTracks,
    PeerId,
    Refused,
)

ROUTED_MAX_PEERS_PER_ROOM: Final = 8
"""The default ``--max-peers-per-room`` of a routed hub: 7 slots x 2 kinds = 16 transceivers per
connection, and N * (N - 1) forwarded streams per kind (56 at N = 8)."""

PLI_INTERVAL: Final = 0.2
"""At most one keyframe request (PLI) per publisher's video stream per 200 ms, as Signal's SFU:
a keyframe costs several times a normal frame, and every subscriber that lost one asks at once."""

RTX_RATE: Final = 100.0
"""Retransmissions (answers to NACKs) the hub sends one subscriber connection per second,
sustained, over all its slots. A 2 Mbit/s VP8 stream is about 200 packets/s, so 5% loss on it
needs 10/s, and 5% on all 7 such streams of a full routed room 70/s: 100/s repairs that with
headroom. A member that NACKs everything gets no more than 100 packets/s (about 1 Mbit/s) of
the hub's upstream and CPU, instead of a sender's whole history per NACK packet."""

RTX_BURST: Final = 256
"""Retransmissions a subscriber connection may ask for at once: two senders' whole histories
(aiortc keeps 128 packets each), so a short outage on a busy leg (150 ms of 7 streams of
2 Mbit/s is about 200 packets) is repaired in one go."""


@dataclass(frozen=True, slots=True)
class RetransmitBudget:
    """The token bucket of each subscriber connection's retransmissions."""

    rate_per_second: float = RTX_RATE
    rate_burst: int = RTX_BURST

    def __post_init__(self) -> None:
        if self.rate_per_second <= 0 or self.rate_burst < 1:
            raise ValueError("the retransmission rate and burst must be positive")


PUBLISH_MIDS: Final = {"audio": "0", "video": "1"}
"""The mids of what a member publishes (the hub's recvonly transceivers)."""


def slot_mid(slot: int, kind: str) -> str:
    """The mid of slot ``slot``'s transceiver of ``kind`` in a member's connection."""
    return str(2 + 2 * slot + MEDIA_KINDS.index(kind))


@dataclass(frozen=True, slots=True)
class SendOffer:
    """Make ``peer``'s connection to the hub and send it a media-offer."""

    peer: PeerId
    room: str
    session: int


@dataclass(frozen=True, slots=True)
class ApplyAnswer:
    """Apply ``peer``'s media-answer; report ``answer_applied`` or ``answer_failed``."""

    peer: PeerId
    session: int
    sdp: str


@dataclass(frozen=True, slots=True)
class SendTracks:
    """Send ``peer`` its current media-tracks."""

    peer: PeerId
    room: str
    tracks: MediaTracks


@dataclass(frozen=True, slots=True)
class SlotChanged:
    """``subscriber``'s slot now carries ``publisher``'s streams (None: nobody's)."""

    subscriber: PeerId
    slot: int
    publisher: PeerId | None


@dataclass(frozen=True, slots=True)
class RequestKeyframe:
    """Send a PLI to ``publisher``'s video stream (already throttled)."""

    publisher: PeerId


@dataclass(frozen=True, slots=True)
class CloseMedia:
    """Close ``peer``'s connection to the hub (media session ``session``)."""

    peer: PeerId
    session: int


MediaCommand = SendOffer | ApplyAnswer | SendTracks | SlotChanged | RequestKeyframe | CloseMedia


class _State(enum.Enum):
    AWAITING_ANSWER = enum.auto()
    APPLYING = enum.auto()
    CONNECTED = enum.auto()


@dataclass(slots=True)
class _Member:
    room: str
    session: int
    answer_due: float
    state: _State
    slots: list[PeerId | None]
    retransmissions: TokenBucket


@dataclass
class MediaCounters:
    """Monotonic counters for ``/metrics``, frames and bytes by kind."""

    frames_received: collections.Counter[str] = field(default_factory=collections.Counter)
    frames_forwarded: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes_forwarded: collections.Counter[str] = field(default_factory=collections.Counter)
    frames_dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    plis_forwarded: int = 0
    plis_throttled: int = 0
    retransmissions_granted: int = 0
    retransmissions_refused: int = 0


class MediaRouter:
    """The members of routed rooms, their slots, the PLI throttle and the retransmission
    budgets."""

    def __init__(
        self,
        max_peers_per_room: int,
        answer_timeout: float,
        *,
        pli_interval: float = PLI_INTERVAL,
        retransmit_budget: RetransmitBudget = RetransmitBudget(),
    ) -> None:
        if max_peers_per_room < 2:
            raise ValueError("a routed room needs at least 2 peers")
        self.slots = max_peers_per_room - 1
        self.counters = MediaCounters()
        self._answer_timeout = answer_timeout
        self._pli_interval = pli_interval
        self._retransmit_budget = retransmit_budget
        self._members: dict[PeerId, _Member] = {}
        # Members whose media is connected, by room, in the order they connected.
        self._connected: dict[str, dict[PeerId, None]] = {}
        # publisher -> ((subscriber, slot), ...): read once per forwarded frame.
        self._routes: dict[PeerId, tuple[tuple[PeerId, int], ...]] = {}
        self._last_pli: dict[PeerId, float] = {}
        self._sessions = 0

    @property
    def subscriber_count(self) -> int:
        """Members whose media is connected (each one a subscriber and a publisher)."""
        return sum(len(members) for members in self._connected.values())

    def session_of(self, peer: PeerId) -> int | None:
        member = self._members.get(peer)
        return None if member is None else member.session

    def slots_of(self, peer: PeerId) -> tuple[PeerId | None, ...]:
        return tuple(self._members[peer].slots)

    def answer_deadline(self, peer: PeerId) -> float | None:
        """When ``peer`` must have answered its media-offer; None once its answer applied or
        for a peer that is not a member."""
        member = self._members.get(peer)
        if member is None or member.state is _State.CONNECTED:
            return None
        return member.answer_due

    def routes(self, publisher: PeerId) -> tuple[tuple[PeerId, int], ...]:
        """Every (subscriber, slot) that gets ``publisher``'s frames."""
        return self._routes.get(publisher, ())

    def join(self, peer: PeerId, room: str, now: float) -> list[MediaCommand]:
        if peer in self._members:
            raise RuntimeError(f"{peer} joined twice without leaving")
        self._sessions += 1
        self._members[peer] = _Member(
            room=room,
            session=self._sessions,
            answer_due=now + self._answer_timeout,
            state=_State.AWAITING_ANSWER,
            slots=[None] * self.slots,
            retransmissions=TokenBucket.full(self._retransmit_budget, now),
        )
        return [SendOffer(peer, room, self._sessions)]

    def answer(self, peer: PeerId, sdp: str) -> list[MediaCommand]:
        """A media-answer from ``peer``, or ``Refused`` (``unexpected-media``): none is
        expected (a second answer, or one while the previous is being applied)."""
        member = self._members.get(peer)
        if member is None or member.state is not _State.AWAITING_ANSWER:
            raise Refused(ErrorCode.UNEXPECTED_MEDIA, "no media-offer is waiting for an answer")
        member.state = _State.APPLYING
        return [ApplyAnswer(peer, member.session, sdp)]

    def answer_failed(self, peer: PeerId, session: int) -> None:
        """The answer could not be applied: ``peer`` may answer again until its deadline."""
        member = self._member_in_session(peer, session)
        if member is not None and member.state is _State.APPLYING:
            member.state = _State.AWAITING_ANSWER

    def answer_applied(self, peer: PeerId, session: int, now: float) -> list[MediaCommand]:
        """``peer``'s media is set up: it publishes to, and subscribes to, every other member
        of its room whose media is."""
        member = self._member_in_session(peer, session)
        if member is None or member.state is not _State.APPLYING:
            return []
        member.state = _State.CONNECTED
        connected = self._connected.setdefault(member.room, {})
        others = list(connected)
        connected[peer] = None
        commands: list[MediaCommand] = []
        for other in others:
            commands += self._assign(other, peer)
        for other in others:
            commands += self._assign(peer, other)
        for subscriber in [*others, peer]:
            commands.append(self._tracks(subscriber))
        # Every publisher with a new subscriber is asked for a keyframe, so that subscriber
        # can decode at once instead of waiting for the next one.
        for publisher in [peer, *others]:
            commands += self._keyframe(publisher, now)
        return commands

    def leave(self, peer: PeerId) -> list[MediaCommand]:
        """``peer`` left its room (or disconnected): close its media, free its slots."""
        member = self._members.pop(peer, None)
        if member is None:
            return []
        commands: list[MediaCommand] = [CloseMedia(peer, member.session)]
        self._last_pli.pop(peer, None)
        if member.state is not _State.CONNECTED:
            return commands
        connected = self._connected[member.room]
        del connected[peer]
        if not connected:
            del self._connected[member.room]
        self._routes.pop(peer, None)
        for publisher in member.slots:
            if publisher is not None:
                self._rebuild_routes(publisher)
        for subscriber in connected:
            slots = self._members[subscriber].slots
            slot = slots.index(peer)
            slots[slot] = None
            commands += [SlotChanged(subscriber, slot, None), self._tracks(subscriber)]
        return commands

    def keyframe_wanted(self, subscriber: PeerId, slot: int, now: float) -> list[MediaCommand]:
        """``subscriber`` asked for a keyframe (a PLI) on ``slot``: ask that slot's
        publisher, at most once per ``pli_interval``."""
        member = self._members.get(subscriber)
        if member is None or not 0 <= slot < self.slots:
            return []
        publisher = member.slots[slot]
        return [] if publisher is None else self._keyframe(publisher, now)

    def retransmissions_wanted(self, subscriber: PeerId, wanted: int, now: float) -> int:
        """``subscriber`` asked (with NACKs) for ``wanted`` packets again: how many of them to
        retransmit, within its connection's ``RetransmitBudget``; the rest are refused."""
        member = self._members.get(subscriber)
        granted = 0
        if member is not None:
            granted = member.retransmissions.take(self._retransmit_budget, now, wanted)
        self.counters.retransmissions_granted += granted
        self.counters.retransmissions_refused += wanted - granted
        return granted

    def forwarded(self, kind: str, size: int, copies: int) -> None:
        """Count one received frame of ``size`` bytes, forwarded to ``copies`` subscribers."""
        counters = self.counters
        counters.frames_received[kind] += 1
        counters.frames_forwarded[kind] += copies
        counters.bytes_forwarded[kind] += size * copies

    def _member_in_session(self, peer: PeerId, session: int) -> _Member | None:
        member = self._members.get(peer)
        # A result for an earlier membership of the same connection (it left and joined
        # again while its answer was being applied) is stale.
        return member if member is not None and member.session == session else None

    def _assign(self, subscriber: PeerId, publisher: PeerId) -> list[MediaCommand]:
        slots = self._members[subscriber].slots
        # The hub admits at most max_peers_per_room members, so a free slot always exists.
        slot = slots.index(None)
        slots[slot] = publisher
        self._rebuild_routes(publisher)
        return [SlotChanged(subscriber, slot, publisher)]

    def _rebuild_routes(self, publisher: PeerId) -> None:
        member = self._members.get(publisher)
        if member is None or member.state is not _State.CONNECTED:
            self._routes.pop(publisher, None)
            return
        self._routes[publisher] = tuple(
            (subscriber, self._members[subscriber].slots.index(publisher))
            for subscriber in self._connected[member.room]
            if publisher in self._members[subscriber].slots
        )

    def _tracks(self, subscriber: PeerId) -> SendTracks:
        member = self._members[subscriber]
        tracks = tuple(
            MediaTrack(slot_mid(slot, kind), kind, publisher)
            for slot, publisher in enumerate(member.slots)
            if publisher is not None
            for kind in MEDIA_KINDS
        )
        return SendTracks(subscriber, member.room, MediaTracks(tracks))

    def _keyframe(self, publisher: PeerId, now: float) -> list[MediaCommand]:
        last = self._last_pli.get(publisher)
        if last is not None and now - last < self._pli_interval:
            self.counters.plis_throttled += 1
            return []
        self._last_pli[publisher] = now
        self.counters.plis_forwarded += 1
        return [RequestKeyframe(publisher)]
