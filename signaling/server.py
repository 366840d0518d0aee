"""The hub server: the routing core behind websocket connections.

The layer is thin: it admits connections, feeds each text message to ``Hub.handle`` and
writes the resulting deliveries, through `signaling.connections`, which runs websockets'
sans-I/O protocol and bounds what each client may cost: writes never wait, and a recipient
whose unsent bytes would exceed ``Limits.max_buffered_bytes`` is closed (1008,
``slow-reader``) instead, so one client that stops reading can neither grow the hub's memory
nor stall the peer that sends to it.

``blindhub hub`` runs on uvloop's event loop (``new_event_loop``) where uvloop exists.
"""

import asyncio
import contextlib
import json
import logging
import ssl
import sys
import time
from collections.abc import Callable
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol, Self, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.frames import CloseCode

from signaling.connections import Connection, WebSocketServer
from signaling.hub import Delivery, Hub, Limits, Metrics
from signaling.protocol import (
    CLOSE_HOME_LOST,
    CLOSE_JOIN_TIMEOUT,
    CodedError,
    ErrorCode,
    Leave,
    PeerId,
    Refused,
    RelayFrom,
    Welcome,
    parse_client_message,
    parse_hub_message,
)

if TYPE_CHECKING:
    # Only a hub started with a cluster loads the Redis client, and only a hub that routes
    # media loads aiortc.
    from signaling.cluster_redis import ClusterLink
    from signaling.media_placement import Home, RoomPlacement
    from signaling.media_server import MediaServer

# A connection's queued messages in a cluster: past this many, the hub stops reading it.
_MAX_QUEUED_MESSAGES: Final = 16

# uvloop cuts the hub's CPU per relayed message by about a sixth and raises its throughput
# (docs/benchmarks/hub.md); it is a dependency everywhere but on Windows, where it does
# not exist.
if sys.platform == "win32":
    new_event_loop = asyncio.new_event_loop
else:
    import uvloop

    new_event_loop = uvloop.new_event_loop


class RoutingCore(Protocol):
    """What the server drives: `signaling.hub.Hub`, or a component that wraps one.

    ``handle`` and ``disconnect`` return the deliveries due now; a component that delivers
    later (the interception experiment's hostile hub) writes them through `HubServer.deliver`.
    """

    @property
    def limits(self) -> Limits: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def connection_count(self) -> int: ...
    @property
    def room_count(self) -> int: ...
    def room_size(self, room: str) -> int: ...
    def join_deadline(self, peer: PeerId) -> float | None: ...
    def connect(self, now: float) -> PeerId: ...
    def disconnect(self, peer: PeerId) -> list[Delivery]: ...
    def handle(self, peer: PeerId, text: str, now: float) -> list[Delivery]: ...


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per log line: time, event, a fault's traceback, ``constant`` fields
    (the node id of a hub in a cluster) and the event's fields."""

    def __init__(self, constant: dict[str, str] | None = None) -> None:
        super().__init__()
        self._constant = constant or {}

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        line = {"time": round(record.created, 6), "event": record.getMessage()}
        # A fault's traceback, in the line (one line per event, still).
        if record.exc_info is not None:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps({**line, **self._constant, **fields})


class MetadataRecorder:
    """Writes one JSON line per delivery: what a hub operator could keep.

    The payload is embedded as its exact JSON text, so the log shows it byte for
    byte as it passed through the hub.
    """

    def __init__(self, sink: TextIO, clock: Callable[[], float] = time.time) -> None:
        self._sink = sink
        self._clock = clock

    def record(self, delivery: Delivery, frame: str) -> None:
        message = delivery.message
        header = {
            "time": round(self._clock(), 6),
            "room": delivery.room,
            "from": message.sender if isinstance(message, RelayFrom) else None,
            "to": delivery.recipient,
            "type": message.TYPE,
            "size": len(frame.encode()),
        }
        line = json.dumps(header, separators=(",", ":"))
        if isinstance(message, RelayFrom):
            line = f'{line[:-1]},"payload":{message.payload}}}'
        self._sink.write(line + "\n")


def render_metrics(hub: RoutingCore, buffered_bytes: int, extra: list[str] | None = None) -> str:
    """The hub's gauges and counters in the Prometheus text format (``extra``: more lines)."""
    metrics = hub.metrics
    lines = [
        "# HELP blindhub_connections Open websocket connections.",
        "# TYPE blindhub_connections gauge",
        f"blindhub_connections {hub.connection_count}",
        "# HELP blindhub_rooms Rooms with at least one peer.",
        "# TYPE blindhub_rooms gauge",
        f"blindhub_rooms {hub.room_count}",
        "# HELP blindhub_buffered_bytes Bytes written to clients and not yet sent.",
        "# TYPE blindhub_buffered_bytes gauge",
        f"blindhub_buffered_bytes {buffered_bytes}",
        "# HELP blindhub_connections_total Connections admitted.",
        "# TYPE blindhub_connections_total counter",
        f"blindhub_connections_total {metrics.connections_total}",
        "# HELP blindhub_messages_relayed_total Relay requests accepted.",
        "# TYPE blindhub_messages_relayed_total counter",
        f"blindhub_messages_relayed_total {metrics.messages_relayed_total}",
        "# HELP blindhub_errors_total Error messages sent, by code.",
        "# TYPE blindhub_errors_total counter",
        *(
            f'blindhub_errors_total{{code="{code}"}} {metrics.errors_total[code]}'
            for code in ErrorCode
        ),
        "# HELP blindhub_closes_total Closed connections, by the close code the hub sent.",
        "# TYPE blindhub_closes_total counter",
        *(
            f'blindhub_closes_total{{code="{code}"}} {count}'
            for code, count in sorted(metrics.closes_total.items())
        ),
        *(extra or []),
    ]
    return "\n".join(lines) + "\n"


class HubServer:
    """A running hub: ``async with HubServer(hub) as server: ... server.url``.

    Each text message is handled as it arrives (`received`), in the event loop's read
    callback of its connection (`signaling.connections`).

    With ``cluster``, the hub is one process of a cluster: its routing core is
    ``cluster.core`` (``hub`` must be None), and each connection's messages wait in a queue
    of its own for the cluster operations they require, one at a time, so they keep their
    order (`_serve`).

    With ``media``, the hub routes media (``blindhub hub --route-media``): its routing core is
    ``media.hub`` (``hub`` and ``cluster`` must be None). With ``placement`` too, it is one of
    several routing hubs that place their rooms through Redis: a join first waits for its room's
    placement, and one whose room lives on another process is served there: every message of
    the member is passed to that process and back (``_forward``).
    """

    def __init__(
        self,
        hub: RoutingCore | None = None,
        *,
        cluster: "ClusterLink | None" = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        metadata: MetadataRecorder | None = None,
        logger: logging.Logger | None = None,
        media: "MediaServer | None" = None,
        placement: "RoomPlacement | None" = None,
    ) -> None:
        if sum(x is not None for x in (hub, cluster, media)) > 1:
            raise ValueError("a cluster or a media server brings its own routing core")
        if placement is not None and placement.media is not media:
            raise ValueError("a placement places the rooms of the media server it was made for")
        self.cluster = cluster
        self.media = media
        self.placement = placement
        self.hub: RoutingCore
        if cluster is not None:
            self.hub = cluster.core
        elif media is not None:
            self.hub = media.hub
        else:
            self.hub = hub or Hub()
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self._metadata = metadata
        self._logger = logger or logging.getLogger("blindhub.hub")
        self._websockets = WebSocketServer(
            self, self.hub.limits, self._logger.getChild("websockets")
        )
        self._connections: dict[PeerId, Connection] = {}
        self._peers: dict[Connection, PeerId] = {}
        # A cluster or a placement makes a connection's messages wait for Redis or for
        # another process: they are queued, and served by a task per connection.
        self._queued = cluster is not None or placement is not None
        self._inboxes: dict[Connection, _Inbox] = {}
        self._serving: set[asyncio.Task[None]] = set()
        self._now: Callable[[], float] = time.monotonic  # the event loop's clock, once started

    @property
    def address(self) -> tuple[str, int]:
        """The host and port it listens on."""
        return self._websockets.address

    @property
    def url(self) -> str:
        host, port = self.address
        scheme = "wss" if self._ssl_context else "ws"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def buffered_bytes(self) -> int:
        """Bytes written to clients that the kernel has not accepted yet, in total."""
        return self._websockets.buffered_bytes()

    async def start(self) -> None:
        if self.cluster is not None:
            await self.cluster.start(self.deliver, self._close_peer)
        if self.media is not None:
            self.media.start(self.deliver)
        self._now = asyncio.get_running_loop().time
        await self._websockets.start(self._host, self._port, self._ssl_context)
        if self.placement is not None:
            await self.placement.start(self.url, self._close_peer)

    async def close(self) -> None:
        """Stop accepting, close every connection with 1001 and wait for them."""
        await self._websockets.close()
        if self._serving:
            await asyncio.wait(self._serving)
        if self.cluster is not None:
            await self.cluster.close()
        if self.placement is not None:
            await self.placement.close()
        if self.media is not None:
            await self.media.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def deliver(self, deliveries: list[Delivery]) -> None:
        """Write deliveries without waiting; close recipients that stopped reading."""
        for delivery in deliveries:
            connection = self._connections.get(delivery.recipient)
            if connection is None:
                continue  # it disconnected; its disconnect tells the room
            frame = delivery.message.encode()
            if connection.send(frame) and self._metadata is not None:
                self._metadata.record(delivery, frame)

    def _close_peer(self, peer: PeerId, code: CloseCode, reason: str) -> None:
        """The cluster's word to close ``peer`` (its stream overflowed: ``slow-reader``)."""
        connection = self._connections.get(peer)
        if connection is not None:
            connection.close(code, reason)

    # What the connections tell the hub (signaling.connections.Handler)

    def respond(self, path: str) -> tuple[HTTPStatus, str] | None:
        if path == "/healthz":
            return HTTPStatus.OK, "ok\n"
        if path == "/metrics":
            extra = self._websockets.pacer.metric_lines()
            for part in (self.cluster, self.media, self.placement):
                if part is not None:
                    extra += part.metric_lines()
            return HTTPStatus.OK, render_metrics(self.hub, self.buffered_bytes(), extra)
        return None

    def opened(self, connection: Connection) -> None:
        try:
            peer = self.hub.connect(self._now())
        except Refused as refusal:
            self.hub.metrics.closes_total[CloseCode.TRY_AGAIN_LATER] += 1
            connection.close(CloseCode.TRY_AGAIN_LATER, refusal.code)
            return
        self._connections[peer] = connection
        self._peers[connection] = peer
        self._log("connect", peer=peer, remote=connection.remote)
        if self._queued:
            inbox = self._inboxes[connection] = _Inbox(connection)
            task = asyncio.create_task(self._serve(connection, peer, inbox))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
        else:
            self._expect_join(connection, peer)

    def received(self, connection: Connection, text: str) -> None:
        peer = self._peers.get(connection)
        if peer is None:
            return  # refused (hub-full) and closing
        if self._queued:
            self._inboxes[connection].put(text)
            return
        self.deliver(self.hub.handle(peer, text, self._now()))
        self._expect_join(connection, peer)

    def closed(self, connection: Connection) -> None:
        if self._queued:
            inbox = self._inboxes.pop(connection, None)
            if inbox is not None:
                inbox.put(None)  # _serve ends and disconnects it
            return
        peer = self._peers.get(connection)
        if peer is not None:
            self._disconnect(connection, peer)

    def _expect_join(self, connection: Connection, peer: PeerId) -> None:
        """Close ``connection`` at its join deadline, if it has one now."""
        deadline = self.hub.join_deadline(peer)
        if deadline is not None or connection.deadline is not None:  # (a member: neither)
            connection.close_at(deadline, CloseCode.POLICY_VIOLATION, CLOSE_JOIN_TIMEOUT)

    def _disconnect(self, connection: Connection, peer: PeerId) -> None:
        del self._peers[connection]
        del self._connections[peer]
        self.deliver(self.hub.disconnect(peer))
        code = connection.close_code
        self.hub.metrics.closes_total[CloseCode.ABNORMAL_CLOSURE if code is None else code] += 1
        self._log("disconnect", peer=peer, code=int(code or CloseCode.ABNORMAL_CLOSURE))

    async def _serve(self, connection: Connection, peer: PeerId, inbox: "_Inbox") -> None:
        """Handle ``peer``'s messages in order, each once the cluster operations of the one
        before are done, until its connection is gone."""
        loop = asyncio.get_running_loop()
        try:
            while (frame := await self._next_message(connection, peer, inbox)) is not None:
                if self.placement is not None:
                    screened = await self.placement.screen(peer, frame, loop.time())
                    if isinstance(screened, list):
                        self.deliver(screened)
                        continue
                    if screened is not None:
                        if await self._forward(connection, peer, screened, frame, inbox):
                            break
                        continue
                self.deliver(self.hub.handle(peer, frame, loop.time()))
                if self.cluster is not None:
                    self.deliver(await self.cluster.run(peer))
        except Exception:
            # A fault of the hub's own: logged, and the member closed as websockets closes a
            # connection whose handler failed, not left open without a peer.
            self._logger.exception("connection-failed", extra={"fields": {"peer": peer}})
            connection.close(CloseCode.INTERNAL_ERROR)
        finally:
            self._inboxes.pop(connection, None)
            self._disconnect(connection, peer)
            if self.cluster is not None:
                await self.cluster.run(peer)

    async def _next_message(
        self, connection: Connection, peer: PeerId, inbox: "_Inbox"
    ) -> str | None:
        """The next message of ``peer``; None once its connection is gone. Only while it waits
        for one does its join deadline run."""
        if inbox:
            return await inbox.take()
        self._expect_join(connection, peer)
        message = await inbox.take()
        connection.close_at(None, CloseCode.POLICY_VIOLATION, CLOSE_JOIN_TIMEOUT)
        return message

    async def _forward(
        self,
        connection: Connection,
        peer: PeerId,
        home: "Home",
        join: str,
        inbox: "_Inbox",
    ) -> bool:
        """Serve ``peer``'s ``join`` from the room's home process, on a websocket of its own:
        every message passes both ways unchanged until the peer leaves (False: it is in no
        room here again) or either side closes (True). The home closing it closes the client
        with the same code and reason."""
        assert self.placement is not None
        placement, limits = self.placement, self.hub.limits
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limits.close_timeout):
                upstream = await connect(
                    home.url,
                    compression=None,
                    max_size=None,  # the home is one of the cluster's processes, trusted
                    ping_interval=limits.ping_interval,
                    ping_timeout=limits.ping_timeout,
                    close_timeout=limits.close_timeout,
                )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI):
            self.deliver(placement.unreachable(peer, home, loop.time()))
            return False
        placement.forwarded_total += 1
        placement.forwarding += 1
        self._log("forward", peer=peer, home=home.url)
        try:
            return await self._forward_member(connection, upstream, join, inbox)
        finally:
            placement.forwarding -= 1
            await upstream.close()
            placement.media.hub.served_elsewhere(peer, loop.time())

    async def _forward_member(
        self,
        connection: Connection,
        upstream: ClientConnection,
        join: str,
        inbox: "_Inbox",
    ) -> bool:
        try:
            await upstream.send(join)
            answer = await upstream.recv()
        except ConnectionClosed:
            self._close_as_home_did(connection, upstream)
            return True
        if isinstance(answer, str):
            connection.send(answer)
        if not _is_welcome(answer):
            return False  # the home refused the join (room-full, ...): in no room, here
        left = asyncio.Event()
        pump = asyncio.create_task(self._forward_messages(inbox, upstream, left))
        with contextlib.suppress(ConnectionClosed):
            async for frame in upstream:
                if isinstance(frame, str):
                    connection.send(frame)
        if left.is_set():
            await pump
            return False
        self._close_as_home_did(connection, upstream)
        await pump
        return True

    @staticmethod
    def _close_as_home_did(connection: Connection, upstream: ClientConnection) -> None:
        received = upstream.protocol.close_rcvd
        if received is None:  # the home went away without a word
            connection.close(CloseCode.SERVICE_RESTART, CLOSE_HOME_LOST)
        elif received.code == CloseCode.NO_STATUS_RCVD:
            # An empty close frame, which no frame may spell as 1005: one alike.
            connection.close(None)
        else:
            connection.close(received.code, received.reason)

    @staticmethod
    async def _forward_messages(
        inbox: "_Inbox",
        upstream: ClientConnection,
        left: asyncio.Event,
    ) -> None:
        """Pass the client's messages to the home until it leaves its room (``left`` is set)
        or either side closes; then close the websocket to the home."""
        try:
            while (message := await inbox.take()) is not None:
                await upstream.send(message)
                if _is_leave(message):
                    left.set()
                    return
        except ConnectionClosed:
            return
        finally:
            await upstream.close()

    def _log(self, event: str, **fields: object) -> None:
        self._logger.info(event, extra={"fields": fields})


class _Inbox:
    """One connection's messages waiting for `HubServer._serve`, in order; None: the
    connection is gone. Past ``_MAX_QUEUED_MESSAGES`` the connection is held (not read) until
    a quarter are left. (Lighter than an asyncio.Queue, which costs an idle connection in a
    cluster 2.5 KiB.)"""

    __slots__ = ("_connection", "_messages", "_waiter")

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._messages: list[str | None] = []  # short: held at _MAX_QUEUED_MESSAGES
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._messages)

    def put(self, message: str | None) -> None:
        self._messages.append(message)
        if len(self._messages) >= _MAX_QUEUED_MESSAGES:
            self._connection.hold()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> str | None:
        while not self._messages:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._messages.pop(0)
        if len(self._messages) <= _MAX_QUEUED_MESSAGES // 4:
            self._connection.release()
        return message


def _is_welcome(frame: str | bytes) -> bool:
    try:
        return isinstance(frame, str) and isinstance(parse_hub_message(frame), Welcome)
    except CodedError:
        return False


def _is_leave(frame: str) -> bool:
    try:
        return isinstance(parse_client_message(frame), Leave)
    except CodedError:
        return False
