"""The asyncio websockets server around the routing core.

The layer is thin: it admits connections, feeds each text frame to
``Hub.handle`` and writes the resulting deliveries. Writes never wait: a
recipient whose unsent bytes would exceed ``Limits.max_buffered_bytes`` is
closed (1008, ``slow-reader``) instead, so one client that stops reading can
neither grow the hub's memory nor stall the peer that sends to it.

Frames for one recipient are framed at once and written together at the end of
the event loop's turn: under load, one system call carries many relays.
``blindhub hub`` runs on uvloop's event loop (``new_event_loop``) where uvloop exists.
"""

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import sys
import time
from collections.abc import Callable
from http import HTTPStatus
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol, Self, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State

from signaling.hub import Delivery, Hub, Limits, Metrics
from signaling.protocol import (
    CLOSE_BINARY_FRAME,
    CLOSE_HOME_LOST,
    CLOSE_JOIN_TIMEOUT,
    CLOSE_SLOW_READER,
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

CLOSE_PING_TIMEOUT: Final = "keepalive ping timeout"  # the reason websockets itself gives
_PINGS_PER_TURN: Final = 100

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

    With ``cluster``, the hub is one process of a cluster: its routing core is
    ``cluster.core`` (``hub`` must be None), and each connection's frames wait for
    the cluster operations they require, one at a time, so they keep their order.

    With ``media``, the hub routes media (``blindhub hub --route-media``): its routing core is
    ``media.hub`` (``hub`` and ``cluster`` must be None). With ``placement`` too, it is one of
    several routing hubs that place their rooms through Redis: a join first waits for its room's
    placement, and one whose room lives on another process is served there: every frame of the
    member is passed to that process and back (``_forward``).
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
        self._connections: dict[PeerId, ServerConnection] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._server: Server | None = None
        # Bytes framed for each recipient and not yet handed to its transport; written by
        # _flush, scheduled once per turn of the event loop.
        self._unflushed: dict[ServerConnection, int] = {}
        self._keepalive_task: asyncio.Task[None] | None = None

    @property
    def server(self) -> Server:
        """The underlying websockets server (once started)."""
        if self._server is None:
            raise RuntimeError("the hub is not started")
        return self._server

    @property
    def url(self) -> str:
        host, port = self.server.sockets[0].getsockname()[:2]
        scheme = "wss" if self._ssl_context else "ws"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def buffered_bytes(self) -> int:
        """Bytes written to clients that the kernel has not accepted yet, in total."""
        written = sum(c.transport.get_write_buffer_size() for c in self._connections.values())
        return written + sum(self._unflushed.values())

    async def start(self) -> None:
        limits = self.hub.limits
        if self.cluster is not None:
            await self.cluster.start(self.deliver, self._close_peer)
        if self.media is not None:
            self.media.start(self.deliver)
        self._server = await serve(
            self._handle_connection,
            self._host,
            self._port,
            ssl=self._ssl_context,
            compression=None,
            process_request=self._process_request,
            max_size=limits.max_message_bytes,
            # One keepalive task for the hub (_keepalive) instead of websockets' one per
            # connection, which is a tenth of an idle connection's memory.
            ping_interval=None,
            close_timeout=limits.close_timeout,
            logger=self._logger.getChild("websockets"),
        )
        self._keepalive_task = asyncio.create_task(self._keepalive())
        if self.placement is not None:
            await self.placement.start(self.url, self._close_peer)

    async def close(self) -> None:
        """Stop accepting, close every connection with 1001 and wait for them."""
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        self.server.close(code=CloseCode.GOING_AWAY)
        await self.server.wait_closed()
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
            if connection is None or connection.protocol.state is not State.OPEN:
                continue  # it disconnected or is closing; its disconnect tells the room
            frame = delivery.message.encode()
            if self._write(connection, frame) and self._metadata is not None:
                self._metadata.record(delivery, frame)

    def _write(self, connection: ServerConnection, frame: str) -> bool:
        """Write ``frame`` to an open connection without waiting; False if it is closed instead
        for not reading."""
        data = frame.encode()
        unflushed = self._unflushed.get(connection, 0)
        buffered = connection.transport.get_write_buffer_size() + unflushed
        if buffered + len(data) > self.hub.limits.max_buffered_bytes:
            self._close_soon(connection, CloseCode.POLICY_VIOLATION, CLOSE_SLOW_READER)
            return False
        if not self._unflushed:
            asyncio.get_running_loop().call_soon(self._flush)
        # The sans-I/O protocol frames it now; the bytes wait in its output until _flush
        # or until websockets itself writes (a pong, a close), whichever comes first, so
        # the order of everything sent to one client is kept.
        connection.protocol.send_text(data)
        self._unflushed[connection] = unflushed + len(data)
        return True

    def _flush(self) -> None:
        unflushed, self._unflushed = self._unflushed, {}
        for connection in unflushed:
            # A connection that left OPEN is written by websockets as it closes; its output
            # may then end with the half-close marker, which only websockets handles.
            if connection.protocol.state is State.OPEN:
                data = b"".join(connection.protocol.data_to_send())
                if data:
                    connection.transport.write(data)

    def _close_peer(self, peer: PeerId, code: CloseCode, reason: str) -> None:
        """The cluster's word to close ``peer`` (its stream overflowed: ``slow-reader``)."""
        connection = self._connections.get(peer)
        if connection is not None:
            self._close_soon(connection, code, reason)

    def _close_soon(self, connection: ServerConnection, code: int, reason: str) -> None:
        if connection.protocol.close_sent is not None:
            return
        task = asyncio.create_task(self._close_or_abort(connection, code, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_or_abort(self, connection: ServerConnection, code: int, reason: str) -> None:
        # A slow reader's write buffer is full and a silent peer reads nothing, so close()
        # could wait for a drain that never comes: give the closing handshake
        # close_timeout, then cut the connection.
        try:
            async with asyncio.timeout(self.hub.limits.close_timeout):
                await connection.close(code, reason)
        except TimeoutError:
            connection.transport.abort()

    async def _keepalive(self) -> None:
        """Every ``ping_interval``, ping every connection; ``ping_timeout`` later, close
        those that have not answered (1011, as websockets' own keepalive does)."""
        limits = self.hub.limits
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(limits.ping_interval)
            pongs: dict[ServerConnection, asyncio.Future[float]] = {}
            for count, connection in enumerate(list(self._connections.values()), 1):
                # A ping is a system call: let relays run between batches, so that 10,000
                # pings are not one long stall of the event loop.
                if count % _PINGS_PER_TURN == 0:
                    await asyncio.sleep(0)
                # On an open connection ping() waits for nothing (on a closing one it would
                # wait for the close). It returns the future of the pong, which
                # ensure_future gives back as it is.
                if connection.protocol.state is State.OPEN:
                    with contextlib.suppress(ConnectionClosed):
                        pongs[connection] = asyncio.ensure_future(await connection.ping())
            loop.call_later(limits.ping_timeout, self._close_silent, pongs)

    def _close_silent(self, pongs: dict[ServerConnection, asyncio.Future[float]]) -> None:
        for connection, pong in pongs.items():
            if not pong.done() and connection.protocol.state is State.OPEN:
                self._close_soon(connection, CloseCode.INTERNAL_ERROR, CLOSE_PING_TIMEOUT)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if request.path == "/metrics":
            extra = None if self.cluster is None else self.cluster.metric_lines()
            if self.media is not None:
                extra = self.media.metric_lines()
            if self.placement is not None:
                extra = [*(extra or []), *self.placement.metric_lines()]
            return connection.respond(
                HTTPStatus.OK, render_metrics(self.hub, self.buffered_bytes(), extra)
            )
        return None

    async def _handle_connection(self, connection: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            peer = self.hub.connect(loop.time())
        except Refused as refusal:
            self.hub.metrics.closes_total[CloseCode.TRY_AGAIN_LATER] += 1
            await connection.close(CloseCode.TRY_AGAIN_LATER, refusal.code)
            return
        self._connections[peer] = connection
        self._log("connect", peer=peer, remote=_address(connection))
        # asyncio's own loop sets TCP_NODELAY on every TCP connection; uvloop does not on
        # accepted ones, and Nagle's algorithm then holds small relays back for milliseconds.
        sock = connection.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The opening handshake's headers are a fifth of an idle connection's memory and
        # nothing reads them once it is open. (websockets reads request being None as
        # "handshake not done", so the request stays, emptied.)
        assert connection.request is not None
        connection.request.headers.clear()
        connection.response = None
        try:
            while True:
                try:
                    frame = await self._receive(connection, self.hub.join_deadline(peer))
                except ConnectionClosed:
                    break
                except TimeoutError:
                    await connection.close(CloseCode.POLICY_VIOLATION, CLOSE_JOIN_TIMEOUT)
                    break
                if isinstance(frame, bytes):
                    await connection.close(CloseCode.UNSUPPORTED_DATA, CLOSE_BINARY_FRAME)
                    break
                if self.placement is not None:
                    screened = await self.placement.screen(peer, frame, loop.time())
                    if isinstance(screened, list):
                        self.deliver(screened)
                        continue
                    if screened is not None:
                        if await self._forward(connection, peer, screened, frame):
                            break
                        continue
                self.deliver(self.hub.handle(peer, frame, loop.time()))
                if self.cluster is not None:
                    self.deliver(await self.cluster.run(peer))
        finally:
            del self._connections[peer]
            self.deliver(self.hub.disconnect(peer))
            if self.cluster is not None:
                await self.cluster.run(peer)
            sent = connection.protocol.close_sent
            code = CloseCode.ABNORMAL_CLOSURE if sent is None else sent.code
            self.hub.metrics.closes_total[code] += 1
            self._log("disconnect", peer=peer, code=int(code))

    async def _forward(
        self, connection: ServerConnection, peer: PeerId, home: "Home", join: str
    ) -> bool:
        """Serve ``peer``'s ``join`` from the room's home process, on a websocket of its own:
        every frame passes both ways unchanged until the peer leaves (False: it is in no room
        here again) or either side closes (True). The home closing it closes the client with
        the same code and reason."""
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
            return await self._forward_member(connection, upstream, join)
        finally:
            placement.forwarding -= 1
            await upstream.close()
            placement.media.hub.served_elsewhere(peer, loop.time())

    async def _forward_member(
        self, connection: ServerConnection, upstream: ClientConnection, join: str
    ) -> bool:
        try:
            await upstream.send(join)
            answer = await upstream.recv()
        except ConnectionClosed:
            self._close_as_home_did(connection, upstream)
            return True
        if isinstance(answer, str):
            self._write(connection, answer)
        if not _is_welcome(answer):
            return False  # the home refused the join (room-full, ...): in no room, here
        left = asyncio.Event()
        pump = asyncio.create_task(self._forward_frames(connection, upstream, left))
        with contextlib.suppress(ConnectionClosed):
            async for frame in upstream:
                if isinstance(frame, str):
                    self._write(connection, frame)
        if left.is_set():
            await pump
            return False
        self._close_as_home_did(connection, upstream)
        await pump
        return True

    def _close_as_home_did(self, connection: ServerConnection, upstream: ClientConnection) -> None:
        received = upstream.protocol.close_rcvd
        if received is None:  # the home went away without a word
            self._close_soon(connection, CloseCode.SERVICE_RESTART, CLOSE_HOME_LOST)
        else:
            self._close_soon(connection, received.code, received.reason)

    @staticmethod
    async def _forward_frames(
        client: ServerConnection, upstream: ClientConnection, left: asyncio.Event
    ) -> None:
        """Pass the client's frames to the home until it leaves its room (``left`` is set)
        or either side closes; then close the websocket to the home."""
        try:
            while True:
                frame = await client.recv()
                if isinstance(frame, bytes):
                    await client.close(CloseCode.UNSUPPORTED_DATA, CLOSE_BINARY_FRAME)
                    return
                await upstream.send(frame)
                if _is_leave(frame):
                    left.set()
                    return
        except ConnectionClosed:
            return
        finally:
            await upstream.close()

    @staticmethod
    async def _receive(connection: ServerConnection, deadline: float | None) -> str | bytes:
        # A peer in a room has no deadline: its frames skip the timeout's set-up and
        # tear-down, which cost as much as routing the frame.
        if deadline is None:
            return await connection.recv()
        async with asyncio.timeout_at(deadline):
            return await connection.recv()

    def _log(self, event: str, **fields: object) -> None:
        self._logger.info(event, extra={"fields": fields})


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


def _address(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "unknown"
