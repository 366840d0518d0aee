"""The routing core of one hub process in a cluster, with no I/O.

Several hub processes share rooms through a store (Redis, driven by
``signaling.cluster_redis``). This core decides everything a process can decide
alone, and turns the rest into operations (`JoinOp`, `RelayOp`, `LeaveOp`) that
the edge executes against the store, atomically, then feeds back
(`ClusterCore.joined`, `ClusterCore.relayed`, ...). It keeps:

- the local peers (rate limit, room, join deadline), as `signaling.hub.Hub` does;
- the local members of each room, so that a relay between two peers of this
  process, and its peer-joined and peer-left, never leave the process (and keep
  working while the store is unreachable);
- per local recipient, the last sequence number delivered from each sender: an
  event that arrives twice from the store (a retried write) is delivered once.

Every operation of one sender carries the sender's next sequence number. The
server runs a connection's operations one at a time, in the order its frames
arrived, so a recipient sees each sender's events in order.
"""

import collections
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final

from signaling.hub import (
    Delivery,
    Limits,
    Metrics,
    TokenBucket,
    admit,
    count_error,
    random_peer_id,
)
from signaling.protocol import (
    NAME_PATTERN,
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

FINAL_SEQ: Final = 2**53
"""The sequence number of a peer-left written for a peer whose process died: after all."""


@dataclass(frozen=True, slots=True)
class JoinOp:
    peer: PeerId
    room: str
    seq: int


@dataclass(frozen=True, slots=True)
class RelayOp:
    sender: PeerId
    recipient: str
    room: str
    payload: JsonText
    seq: int


@dataclass(frozen=True, slots=True)
class LeaveOp:
    peer: PeerId
    room: str
    seq: int


ClusterOp = JoinOp | RelayOp | LeaveOp


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a recipient's stream: ``kind`` is joined, left or relay."""

    kind: str
    sender: PeerId
    room: str
    seq: int
    payload: JsonText | None = None

    JOINED: ClassVar[str] = "j"
    LEFT: ClassVar[str] = "l"
    RELAY: ClassVar[str] = "r"


def parse_event(fields: Mapping[str, str], max_payload: int) -> Event | None:
    """The event a stream entry holds, or None for an entry no hub process writes.

    What another process wrote is checked as a frame from a client is: a malformed entry
    would otherwise stop the reader of every stream of this process, and a sequence number
    past the last one a peer can use would make its recipient drop everything later of that
    sender as a repeat."""
    kind, sender, room, seq = fields.get("k"), fields.get("f"), fields.get("r"), fields.get("s")
    payload = fields.get("d")
    if kind not in (Event.JOINED, Event.LEFT, Event.RELAY):
        return None
    if (payload is not None) != (kind == Event.RELAY):
        return None
    if payload is not None and len(payload) > max_payload:
        return None
    if sender is None or NAME_PATTERN.fullmatch(sender) is None:
        return None
    if room is None or NAME_PATTERN.fullmatch(room) is None:
        return None
    # At most 16 digits: FINAL_SEQ has 16, and int() of a long string costs.
    if seq is None or not (seq.isascii() and seq.isdigit()) or len(seq) > 16:
        return None
    number = int(seq)
    if number > FINAL_SEQ or (number == FINAL_SEQ and kind != Event.LEFT):
        return None
    return Event(kind, PeerId(sender), room, number, None if payload is None else JsonText(payload))


@dataclass
class ClusterMetrics:
    """The cluster's counters, next to the process's own `Metrics`."""

    relays_sent_total: int = 0
    relays_received_total: int = 0
    duplicates_dropped_total: int = 0
    redis_errors_total: int = 0
    nodes_reaped_total: int = 0
    stream_overflows_total: int = 0
    stream_entries_rejected_total: int = 0
    task_failures_total: int = 0
    stream_lag_seconds: float = 0.0
    stream_lag_seconds_sum: float = 0.0
    stream_lag_count: int = 0
    refused_unavailable_total: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass(slots=True)
class _Peer:
    room: str | None
    bucket: TokenBucket
    roomless_since: float | None
    seq: int = 0
    # A join sent to the store and not answered yet (the server waits for it).
    joining: bool = False
    # Per sender, the last sequence number delivered to this peer.
    heard: dict[PeerId, int] = field(default_factory=dict)


class ClusterCore:
    """One process's share of the cluster's rooms; `signaling.server.RoutingCore`."""

    def __init__(
        self,
        node: str,
        limits: Limits | None = None,
        *,
        new_peer_id: Callable[[], PeerId] = random_peer_id,
        logger: logging.Logger | None = None,
    ) -> None:
        self.node = node
        self.limits = limits or Limits()
        self.metrics = Metrics()
        self.cluster_metrics = ClusterMetrics()
        # Set by the edge: False while the store is unreachable.
        self.available = True
        self._new_peer_id = new_peer_id
        self._logger = logger or logging.getLogger("blindhub.hub")
        self._peers: dict[PeerId, _Peer] = {}
        self._local_rooms: dict[str, dict[PeerId, None]] = {}
        self._outbox: dict[PeerId, list[ClusterOp]] = {}

    # -- what the server reads

    @property
    def connection_count(self) -> int:
        return len(self._peers)

    @property
    def room_count(self) -> int:
        """Rooms with at least one peer of this process."""
        return len(self._local_rooms)

    def room_size(self, room: str) -> int:
        """Peers of this process in ``room``."""
        return len(self._local_rooms.get(room, ()))

    def room_of(self, peer: PeerId) -> str | None:
        return self._peers[peer].room

    def local_members(self) -> list[tuple[PeerId, str]]:
        """Every local peer in a room, with its room (to restore them in a fresh store)."""
        return [(peer, room) for room, members in self._local_rooms.items() for peer in members]

    def join_deadline(self, peer: PeerId) -> float | None:
        since = self._peers[peer].roomless_since
        return None if since is None else since + self.limits.join_timeout

    # -- the connection's life

    def connect(self, now: float) -> PeerId:
        peer = admit(self._peers, self.limits, self.metrics, self._logger, self._new_peer_id)
        self._peers[peer] = _Peer(
            room=None, bucket=TokenBucket.full(self.limits, now), roomless_since=now
        )
        return peer

    def disconnect(self, peer: PeerId) -> list[Delivery]:
        deliveries = self._leave(peer, self._peers[peer])
        del self._peers[peer]
        return deliveries

    def take_ops(self, peer: PeerId) -> list[ClusterOp]:
        """The store operations ``peer``'s last frame (or disconnect) requires, in order."""
        return self._outbox.pop(peer, [])

    def handle(self, peer: PeerId, text: str, now: float) -> list[Delivery]:
        state = self._peers[peer]
        try:
            state.bucket.spend(self.limits, now)
            message = parse_client_message(text)
            if isinstance(message, Join):
                return self._join(peer, state, message.room)
            if isinstance(message, RelayTo):
                return self._relay(peer, state, message.to, message.payload)
            assert isinstance(message, Leave)
            if state.room is None:
                raise Refused(ErrorCode.NOT_JOINED, "leave before join")
            state.roomless_since = now
            return self._leave(peer, state)
        except CodedError as error:
            return self._error(peer, state, error)

    # -- answers from the store

    def joined(self, op: JoinOp, others: list[tuple[PeerId, str]]) -> list[Delivery]:
        """The store admitted ``op.peer``; ``others`` are the members before it, oldest first,
        each with its node. The store told the remote ones; this tells the local ones."""
        state = self._peers.get(op.peer)
        if state is None:
            return []
        state.joining = False
        state.room = op.room
        state.roomless_since = None
        self._local_rooms.setdefault(op.room, {})[op.peer] = None
        self._logger.info("join", extra={"fields": {"peer": op.peer, "room": op.room}})
        welcome = Delivery(op.peer, Welcome(op.peer, op.room, tuple(p for p, _ in others)), op.room)
        local = [p for p, node in others if node == self.node and p in self._peers]
        return [welcome, *(Delivery(other, PeerJoined(op.peer), op.room) for other in local)]

    def refused(self, op: ClusterOp, code: ErrorCode) -> list[Delivery]:
        """The store refused ``op`` (or could not be reached: ``cluster-unavailable``)."""
        sender = op.sender if isinstance(op, RelayOp) else op.peer
        state = self._peers.get(sender)
        if state is None:
            return []
        if isinstance(op, JoinOp):
            state.joining = False
            if code is ErrorCode.CLUSTER_UNAVAILABLE:
                # The store may have run the join before its reply was lost: undone by a leave
                # (which changes nothing if it was not run), written before any later join of
                # the peer, so no seat is held by a peer that was told it has none.
                self._emit(sender, state, lambda seq: LeaveOp(sender, op.room, seq))
        messages = {
            ErrorCode.ROOM_FULL: "the room is full",
            ErrorCode.TOO_MANY_ROOMS: "the hub has reached its room limit",
            ErrorCode.UNKNOWN_PEER: "no such peer in this room",
            ErrorCode.CLUSTER_UNAVAILABLE: "the hub cannot reach its shared state; retry later",
        }
        return self._error(sender, state, Refused(code, messages[code]))

    def relayed(self, op: RelayOp) -> None:
        self.metrics.messages_relayed_total += 1
        self.cluster_metrics.relays_sent_total += 1

    def receive(self, recipient: PeerId, event: Event) -> list[Delivery]:
        """An event read from ``recipient``'s stream; duplicates and stale rooms are dropped."""
        state = self._peers.get(recipient)
        if state is None or state.room != event.room:
            return []  # it left that room (or the hub): the single process would not tell it
        if event.seq <= state.heard.get(event.sender, 0):
            self.cluster_metrics.duplicates_dropped_total += 1
            return []
        state.heard[event.sender] = event.seq
        message: HubMessage
        if event.kind == Event.RELAY:
            assert event.payload is not None
            self.cluster_metrics.relays_received_total += 1
            message = RelayFrom(event.sender, event.payload)
        elif event.kind == Event.JOINED:
            message = PeerJoined(event.sender)
        else:
            # After its peer-left nothing more of the sender can come (FINAL_SEQ is heard).
            state.heard[event.sender] = FINAL_SEQ
            message = PeerLeft(event.sender)
        return [Delivery(recipient, message, event.room)]

    # -- the decisions

    def _emit(self, peer: PeerId, state: _Peer, make: Callable[[int], ClusterOp]) -> None:
        state.seq += 1
        self._outbox.setdefault(peer, []).append(make(state.seq))

    def _refuse_unavailable(self, what: str) -> Refused:
        self.cluster_metrics.refused_unavailable_total[what] += 1
        return Refused(
            ErrorCode.CLUSTER_UNAVAILABLE, "the hub cannot reach its shared state; retry later"
        )

    def _join(self, peer: PeerId, state: _Peer, room: str) -> list[Delivery]:
        if state.room is not None or state.joining:
            raise Refused(ErrorCode.ALREADY_JOINED, "already in a room; leave first")
        if not self.available:
            raise self._refuse_unavailable("join")
        state.joining = True
        self._emit(peer, state, lambda seq: JoinOp(peer, room, seq))
        return []

    def _relay(
        self, peer: PeerId, state: _Peer, recipient: str, payload: JsonText
    ) -> list[Delivery]:
        room = state.room
        if room is None:
            raise Refused(ErrorCode.NOT_JOINED, "relay before join")
        if recipient == peer:
            raise Refused(ErrorCode.UNKNOWN_PEER, "no such peer in this room")
        if recipient in self._local_rooms[room]:
            self.metrics.messages_relayed_total += 1
            return [Delivery(PeerId(recipient), RelayFrom(peer, payload), room)]
        if not self.available:
            raise self._refuse_unavailable("relay")
        self._emit(peer, state, lambda seq: RelayOp(peer, recipient, room, payload, seq))
        return []

    def _leave(self, peer: PeerId, state: _Peer) -> list[Delivery]:
        room = state.room
        if room is None:
            return []
        members = self._local_rooms[room]
        del members[peer]
        if not members:
            del self._local_rooms[room]
        state.room = None
        state.heard.clear()
        # The store is told even while unreachable: the edge retries when it returns.
        self._emit(peer, state, lambda seq: LeaveOp(peer, room, seq))
        self._logger.info("leave", extra={"fields": {"peer": peer, "room": room}})
        return [Delivery(other, PeerLeft(peer), room) for other in members]

    def _error(self, peer: PeerId, state: _Peer, error: CodedError) -> list[Delivery]:
        log = state.bucket.worth_logging(error.code)
        count_error(self.metrics, self._logger, error.code, peer=peer, log=log)
        return [Delivery(peer, ErrorMessage(error.code, error.message), state.room)]
