"""The hub's routing core: rooms, peers, limits and counters, with no I/O.

Text frames go in (``handle(peer, text, now)``), deliveries come out (who gets
which message). Time is a parameter and peer ids come from an injected
generator, so the core is deterministic under test. The asyncio server in
``signaling.server`` feeds it and writes its deliveries to sockets.
"""

import collections
import logging
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from signaling.pacing import check_window
from signaling.protocol import (
    CodedError,
    ErrorCode,
    ErrorMessage,
    HubMessage,
    Join,
    JsonText,
    Leave,
    MediaAnswer,
    MediaMode,
    PeerId,
    PeerJoined,
    PeerLeft,
    Refused,
    RelayFrom,
    RelayTo,
    Welcome,
    parse_client_message,
)

KIB = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Every limit of the hub; each one is a ``blindhub hub`` flag."""

    max_message_bytes: int = 64 * KIB
    max_peers_per_room: int = 2
    max_rooms: int = 10_000
    max_connections: int = 10_000
    rate_per_second: float = 50.0
    rate_burst: int = 200
    max_buffered_bytes: int = 256 * KIB
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    close_timeout: float = 5.0
    join_timeout: float = 10.0
    batch_window: float = 0.0002

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_peers_per_room", "max_rooms", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.rate_per_second <= 0 or self.rate_burst < 1:
            raise ValueError("the message rate and burst must be positive")
        timeouts = (self.ping_interval, self.ping_timeout, self.close_timeout, self.join_timeout)
        if min(timeouts) <= 0:
            raise ValueError("the ping interval and the close and join timeouts must be positive")
        check_window(self.batch_window)
        # A relayed frame is at most a few bytes longer than the frame that carried it,
        # so this bound lets one full-size message through to a reader that keeps up.
        if self.max_buffered_bytes < 2 * self.max_message_bytes:
            raise ValueError("max_buffered_bytes must be at least twice max_message_bytes")


class Delivery(msgspec.Struct, frozen=True, gc=False):
    """One message for one peer; ``room`` is the recipient's room, if any.

    A msgspec struct, like the messages (signaling.protocol says why): one is made for every
    relayed message."""

    recipient: PeerId
    message: HubMessage
    room: str | None


@dataclass
class Metrics:
    """Monotonic counters (the gauges are read from the hub itself)."""

    connections_total: int = 0
    messages_relayed_total: int = 0
    errors_total: collections.Counter[ErrorCode] = field(default_factory=collections.Counter)
    closes_total: collections.Counter[int] = field(default_factory=collections.Counter)


class Rate(Protocol):
    """A token bucket's refill rate and size (``Limits`` is one)."""

    @property
    def rate_per_second(self) -> float: ...
    @property
    def rate_burst(self) -> int: ...


@dataclass(slots=True)
class TokenBucket:
    """A budget that refills at ``rate_per_second`` up to ``rate_burst`` tokens: one
    connection's message rate, or one subscriber's retransmissions."""

    tokens: float
    refilled_at: float
    # Refusing a flood now; it is logged once, when it starts, not once per refused frame.
    throttled: bool = False

    @classmethod
    def full(cls, rate: Rate, now: float) -> "TokenBucket":
        return cls(tokens=rate.rate_burst, refilled_at=now)

    def take(self, rate: Rate, now: float, wanted: int = 1) -> int:
        """Take up to ``wanted`` whole tokens; returns how many were taken."""
        elapsed = now - self.refilled_at
        if elapsed > 0.0:  # (a clock that went back refills nothing)
            tokens = self.tokens + elapsed * rate.rate_per_second
            self.tokens = tokens if tokens < rate.rate_burst else float(rate.rate_burst)
        self.refilled_at = now
        taken = wanted if self.tokens >= wanted else int(self.tokens)
        self.tokens -= taken
        return taken

    def spend(self, limits: Limits, now: float) -> None:
        """Take one token, or raise ``Refused`` (``rate-limited``)."""
        if not self.take(limits, now):
            raise Refused(ErrorCode.RATE_LIMITED, "too many messages; slow down")
        self.throttled = False

    def ready(self, rate: Rate, now: float) -> bool:
        """Whether a token is there to spend now (none is spent)."""
        elapsed = max(0.0, now - self.refilled_at)
        return self.tokens + elapsed * rate.rate_per_second >= 1.0

    def worth_logging(self, code: ErrorCode) -> bool:
        """Whether an error with ``code`` should be logged (a continuing flood is not)."""
        flood_continues = code is ErrorCode.RATE_LIMITED and self.throttled
        self.throttled = self.throttled or code is ErrorCode.RATE_LIMITED
        return not flood_continues


class MediaSink(Protocol):
    """What a hub that routes media (``blindhub hub --route-media``) tells its media side.

    Called inside ``Hub.handle`` and ``Hub.disconnect``; each call must return at once (the
    media side does its I/O later). ``answered`` raises ``Refused`` (``unexpected-media``) for
    an answer it does not expect."""

    def joined(self, peer: PeerId, room: str, now: float) -> None: ...
    def left(self, peer: PeerId) -> None: ...
    def answered(self, peer: PeerId, sdp: str) -> None: ...
    def answer_deadline(self, peer: PeerId) -> float | None: ...


@dataclass(slots=True)
class _Peer:
    room: str | None
    bucket: TokenBucket
    # When the peer last was in no room: connected, or left one. None while in a room.
    roomless_since: float | None


def count_error(
    metrics: Metrics, logger: logging.Logger, code: ErrorCode, *, peer: PeerId | None, log: bool
) -> None:
    metrics.errors_total[code] += 1
    if log:
        logger.info("error", extra={"fields": {"peer": peer, "code": str(code)}})


def admit(
    peers: Collection[PeerId],
    limits: Limits,
    metrics: Metrics,
    logger: logging.Logger,
    new_peer_id: Callable[[], PeerId],
) -> PeerId:
    """A fresh id for a new connection, or ``Refused`` (``hub-full``) when ``peers``, the
    connections, are at ``max_connections``."""
    if len(peers) >= limits.max_connections:
        count_error(metrics, logger, ErrorCode.HUB_FULL, peer=None, log=True)
        raise Refused(ErrorCode.HUB_FULL, "the hub has reached its connection limit")
    peer = new_peer_id()
    if peer in peers:
        raise RuntimeError("the peer id generator repeated an id")
    metrics.connections_total += 1
    return peer


def random_peer_id() -> PeerId:
    """A fresh unguessable id (96 random bits) for one connection."""
    return PeerId(secrets.token_urlsafe(12))


class Hub:
    """Rooms of peers that relay opaque payloads to each other."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        new_peer_id: Callable[[], PeerId] = random_peer_id,
        logger: logging.Logger | None = None,
        media: MediaSink | None = None,
    ) -> None:
        self.limits = limits or Limits()
        # With a media sink every room is routed: the hub terminates each member's media.
        self._media = media
        self._media_mode = MediaMode.PEER_TO_PEER if media is None else MediaMode.ROUTED
        self.metrics = Metrics()
        self._new_peer_id = new_peer_id
        self._logger = logger or logging.getLogger("blindhub.hub")
        self._peers: dict[PeerId, _Peer] = {}
        # Insertion-ordered member sets, so "peers" in a welcome lists the oldest first.
        self._rooms: dict[str, dict[PeerId, None]] = {}

    @property
    def connection_count(self) -> int:
        return len(self._peers)

    @property
    def room_count(self) -> int:
        return len(self._rooms)

    def room_of(self, peer: PeerId) -> str | None:
        return self._peers[peer].room

    def room_size(self, room: str) -> int:
        """How many peers are in ``room`` now; 0 for a room that does not exist."""
        return len(self._rooms.get(room, ()))

    def rooms(self) -> dict[str, tuple[PeerId, ...]]:
        """Every room with its members, oldest first."""
        return {room: tuple(members) for room, members in self._rooms.items()}

    def join_deadline(self, peer: PeerId) -> float | None:
        """When ``peer``, in no room, must be closed (``join-timeout``); None while in a room.

        A connection that never joins would otherwise hold one of ``max_connections``
        slots for as long as it answers pings.
        """
        since = self._peers[peer].roomless_since
        if since is not None:
            return since + self.limits.join_timeout
        # In a routed room, a member that never answers the media offer holds a slot of every
        # other member: it is closed as one that never joins.
        return None if self._media is None else self._media.answer_deadline(peer)

    def connect(self, now: float) -> PeerId:
        """Admit a new connection, or raise ``Refused`` (``hub-full``)."""
        peer = admit(self._peers, self.limits, self.metrics, self._logger, self._new_peer_id)
        self._peers[peer] = _Peer(
            room=None, bucket=TokenBucket.full(self.limits, now), roomless_since=now
        )
        return peer

    def disconnect(self, peer: PeerId) -> list[Delivery]:
        """Forget a closed connection; tell its room it left."""
        deliveries = self._leave(peer)
        del self._peers[peer]
        return deliveries

    def handle(self, peer: PeerId, text: str, now: float) -> list[Delivery]:
        """Process one text frame from ``peer``; errors become ``error`` deliveries."""
        state = self._peers[peer]
        try:
            state.bucket.spend(self.limits, now)
            message = parse_client_message(text)
            if isinstance(message, RelayTo):  # nearly every message
                return self._relay(peer, state, message.to, message.payload)
            if isinstance(message, Join):
                return self._join(peer, state, message.room, now)
            if isinstance(message, MediaAnswer):
                return self._media_answer(peer, state, message.sdp)
            assert isinstance(message, Leave)
            if state.room is None:
                raise Refused(ErrorCode.NOT_JOINED, "leave before join")
            state.roomless_since = now
            return self._leave(peer)
        except CodedError as error:
            log = state.bucket.worth_logging(error.code)
            count_error(self.metrics, self._logger, error.code, peer=peer, log=log)
            return [Delivery(peer, ErrorMessage(error.code, error.message), state.room)]

    def served_elsewhere(self, peer: PeerId, now: float) -> None:
        """``peer`` was a member of a room of another process until now (its frames were
        passed there): it is in no room here, with a join timeout from now."""
        self._peers[peer].roomless_since = now

    def may_send(self, peer: PeerId, now: float) -> bool:
        """Whether ``peer``'s next frame is within its rate (nothing is spent): the edge asks
        before it does work of its own for the frame, and leaves one that is not to `handle`."""
        return self._peers[peer].bucket.ready(self.limits, now)

    def charge(self, peer: PeerId, now: float) -> list[Delivery]:
        """Spend a token for a frame the edge carries out without this core (a join passed to
        the room's process in a cluster); the ``rate-limited`` error if none is left."""
        try:
            self._peers[peer].bucket.spend(self.limits, now)
        except CodedError as limited:
            return self._refused(peer, ErrorMessage(limited.code, limited.message))
        return []

    def refuse(self, peer: PeerId, error: ErrorMessage, now: float) -> list[Delivery]:
        """Answer a frame of ``peer`` that the edge refused before this core saw it (a join
        while the cluster's store is unreachable): it costs a token as any frame does."""
        return self.charge(peer, now) or self._refused(peer, error)

    def _refused(self, peer: PeerId, error: ErrorMessage) -> list[Delivery]:
        state = self._peers[peer]
        log = state.bucket.worth_logging(error.code)
        count_error(self.metrics, self._logger, error.code, peer=peer, log=log)
        return [Delivery(peer, error, state.room)]

    def _join(self, peer: PeerId, state: _Peer, room: str, now: float) -> list[Delivery]:
        if state.room is not None:
            raise Refused(ErrorCode.ALREADY_JOINED, "already in a room; leave first")
        members = self._rooms.get(room)
        if members is None:
            if len(self._rooms) >= self.limits.max_rooms:
                raise Refused(ErrorCode.TOO_MANY_ROOMS, "the hub has reached its room limit")
            members = self._rooms[room] = {}
        elif len(members) >= self.limits.max_peers_per_room:
            raise Refused(ErrorCode.ROOM_FULL, "the room is full")
        others = tuple(members)
        members[peer] = None
        state.room = room
        state.roomless_since = None
        self._logger.info("join", extra={"fields": {"peer": peer, "room": room}})
        welcome = Delivery(peer, Welcome(peer, room, others, self._media_mode), room)
        if self._media is not None:
            self._media.joined(peer, room, now)
        return [welcome, *(Delivery(other, PeerJoined(peer), room) for other in others)]

    def _media_answer(self, peer: PeerId, state: _Peer, sdp: str) -> list[Delivery]:
        if self._media is None:
            raise Refused(ErrorCode.UNEXPECTED_MEDIA, "this hub does not route media")
        if state.room is None:
            raise Refused(ErrorCode.NOT_JOINED, "media-answer before join")
        self._media.answered(peer, sdp)
        return []

    def _relay(
        self, peer: PeerId, state: _Peer, recipient: str, payload: JsonText
    ) -> list[Delivery]:
        if state.room is None:
            raise Refused(ErrorCode.NOT_JOINED, "relay before join")
        # Peers in other rooms are answered exactly like ids that do not exist.
        if recipient == peer or recipient not in self._rooms[state.room]:
            raise Refused(ErrorCode.UNKNOWN_PEER, "no such peer in this room")
        self.metrics.messages_relayed_total += 1
        return [Delivery(PeerId(recipient), RelayFrom(peer, payload), state.room)]

    def _leave(self, peer: PeerId) -> list[Delivery]:
        state = self._peers[peer]
        room = state.room
        if room is None:
            return []
        members = self._rooms[room]
        del members[peer]
        if not members:
            del self._rooms[room]
        state.room = None
        if self._media is not None:
            self._media.left(peer)
        self._logger.info("leave", extra={"fields": {"peer": peer, "room": room}})
        return [Delivery(other, PeerLeft(peer), room) for other in members]
