"""The hub's routing core: rooms, peers, limits and counters, with no I/O.

Text frames go in (``handle(peer, text, now)``), deliveries come out (who gets
which message). Time is a parameter and peer ids come from an injected
generator, so the core is deterministic under test. The asyncio server in
``signaling.server`` feeds it and writes its deliveries to sockets.
"""

import collections
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from signaling.protocol import (
    CodedError,
    ErrorCode,
    ErrorMessage,
    HubMessage,
    Join,
    JsonText,
    Leave,
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

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_peers_per_room", "max_rooms", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.rate_per_second <= 0 or self.rate_burst < 1:
            raise ValueError("the message rate and burst must be positive")
        timeouts = (self.ping_interval, self.ping_timeout, self.close_timeout, self.join_timeout)
        if min(timeouts) <= 0:
            raise ValueError("the ping interval and the close and join timeouts must be positive")
        # A relayed frame is at most a few bytes longer than the frame that carried it,
        # so this bound lets one full-size message through to a reader that keeps up.
        if self.max_buffered_bytes < 2 * self.max_message_bytes:
            raise ValueError("max_buffered_bytes must be at least twice max_message_bytes")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message for one peer; ``room`` is the recipient's room, if any."""

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


@dataclass(slots=True)
class _Peer:
    room: str | None
    tokens: float
    refilled_at: float
    # When the peer last was in no room: connected, or left one. None while in a room.
    roomless_since: float | None
    throttled: bool = False


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
    ) -> None:
        self.limits = limits or Limits()
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

    def join_deadline(self, peer: PeerId) -> float | None:
        """When ``peer``, in no room, must be closed (``join-timeout``); None while in a room.

        A connection that never joins would otherwise hold one of ``max_connections``
        slots for as long as it answers pings.
        """
        since = self._peers[peer].roomless_since
        return None if since is None else since + self.limits.join_timeout

    def connect(self, now: float) -> PeerId:
        """Admit a new connection, or raise ``Refused`` (``hub-full``)."""
        if len(self._peers) >= self.limits.max_connections:
            self._count_error(ErrorCode.HUB_FULL, peer=None)
            raise Refused(ErrorCode.HUB_FULL, "the hub has reached its connection limit")
        peer = self._new_peer_id()
        if peer in self._peers:
            raise RuntimeError("the peer id generator repeated an id")
        self._peers[peer] = _Peer(
            room=None, tokens=self.limits.rate_burst, refilled_at=now, roomless_since=now
        )
        self.metrics.connections_total += 1
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
            self._spend_token(state, now)
            message = parse_client_message(text)
            if isinstance(message, Join):
                return self._join(peer, state, message.room)
            if isinstance(message, RelayTo):
                return self._relay(peer, state, message.to, message.payload)
            assert isinstance(message, Leave)
            if state.room is None:
                raise Refused(ErrorCode.NOT_JOINED, "leave before join")
            state.roomless_since = now
            return self._leave(peer)
        except CodedError as error:
            # A flood is logged once, when it starts, not once per refused frame.
            flood_continues = error.code is ErrorCode.RATE_LIMITED and state.throttled
            state.throttled = state.throttled or error.code is ErrorCode.RATE_LIMITED
            self._count_error(error.code, peer=peer, log=not flood_continues)
            return [Delivery(peer, ErrorMessage(error.code, error.message), state.room)]

    def _spend_token(self, state: _Peer, now: float) -> None:
        # Token bucket: refill at the configured rate up to the burst size.
        elapsed = max(0.0, now - state.refilled_at)
        state.tokens = min(
            float(self.limits.rate_burst), state.tokens + elapsed * self.limits.rate_per_second
        )
        state.refilled_at = now
        if state.tokens < 1.0:
            raise Refused(ErrorCode.RATE_LIMITED, "too many messages; slow down")
        state.tokens -= 1.0
        state.throttled = False

    def _join(self, peer: PeerId, state: _Peer, room: str) -> list[Delivery]:
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
        welcome = Delivery(peer, Welcome(peer, room, others), room)
        return [welcome, *(Delivery(other, PeerJoined(peer), room) for other in others)]

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
        self._logger.info("leave", extra={"fields": {"peer": peer, "room": room}})
        return [Delivery(other, PeerLeft(peer), room) for other in members]

    def _count_error(self, code: ErrorCode, *, peer: PeerId | None, log: bool = True) -> None:
        self.metrics.errors_total[code] += 1
        if log:
            self._logger.info("error", extra={"fields": {"peer": peer, "code": str(code)}})
