"""The hub's websocket connections: websockets' sans-I/O protocol on asyncio transports.

websockets' asyncio connection layer hands each message to a task per connection through a
queue and a future, which was most of the hub's CPU per relayed message
(docs/benchmarks/hub.md). Here each connection is an ``asyncio.Protocol`` that feeds the
bytes it reads to websockets' ``ServerProtocol`` and passes each text message to the
server's `Handler` at once, in the event loop's read callback: no task, queue or future per
connection or per message.

What websockets' own server did, this layer still does through websockets' protocol, with
the same codes: the opening handshake and its HTTP errors (and plain HTTP answers,
``Handler.respond``), unframing, unmasking and the message size limit (1009), UTF-8 (1007),
answers to pings, the closing handshake, cut after ``close_timeout``, and 1001 to every
connection on shutdown. On top of it:

- a binary message closes its connection (1003, ``binary-frame``): the hub speaks text only;
- writes never wait: the hub frames the text messages it sends itself (a header,
  `text_frame_header`), and a connection's frames go to its transport together at the end of
  the event loop's turn, in order with the protocol's own output; a connection whose unsent
  bytes would pass ``max_buffered_bytes`` is closed (1008, ``slow-reader``) instead;
- one keepalive for the server pings every connection each ``ping_interval`` and closes
  those that have not answered ``ping_timeout`` later (1011, as websockets' keepalive);
- a connection that has not completed its opening handshake after ``join_timeout`` is cut;
- one connection's burst of messages is handled ``MESSAGES_PER_TURN`` at a time, its reading
  paused meanwhile, so that it cannot hold the event loop from the others;
- a busy server waits out the rest of ``batch_window`` after each turn that sent something
  before it polls again (signaling.pacing), so that it reads and writes many messages at once.
"""

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import time
from http import HTTPStatus
from typing import Final, Protocol, cast

from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol
from websockets.typing import BytesLike

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

from signaling.hub import Limits
from signaling.pacing import PollPacer
from signaling.protocol import CLOSE_BINARY_FRAME, CLOSE_SLOW_READER

CLOSE_PING_TIMEOUT: Final = "keepalive ping timeout"  # the reason websockets itself gives
MESSAGES_PER_TURN: Final = 64
CLOSE_EARLY_DATA: Final = "data before the opening handshake ended"
_FINAL_TEXT: Final = 0x81  # the first byte of a text frame that is a whole message
_PINGS_PER_TURN: Final = 100


def text_frame_header(length: int) -> bytes:
    """The header of a text frame of ``length`` bytes from a server: final, unmasked, no
    extension (RFC 6455 section 5.2), as websockets writes it. The hub frames the messages
    it sends itself; websockets' ``Frame.serialize`` costs as much as routing the message.
    """
    if length < 126:
        return _SHORT_HEADERS[length]
    if length < 0x10000:
        return _PACK_16_BIT_HEADER(0x81, 126, length)
    return _PACK_64_BIT_HEADER(0x81, 127, length)


_SHORT_HEADERS: Final = tuple(bytes((0x81, length)) for length in range(126))
_PACK_16_BIT_HEADER: Final = struct.Struct("!BBH").pack
_PACK_64_BIT_HEADER: Final = struct.Struct("!BBQ").pack


class Handler(Protocol):
    """What the server tells the hub, each call in the event loop's callback that caused it."""

    def respond(self, path: str) -> tuple[HTTPStatus, str] | None:
        """A plain HTTP answer (status, text) to a request for ``path``; None: a websocket."""
        ...

    def opened(self, connection: "Connection") -> None:
        """``connection`` completed its opening handshake."""
        ...

    def received(self, connection: "Connection", text: str) -> None:
        """A text message arrived on an open ``connection``."""
        ...

    def closed(self, connection: "Connection") -> None:
        """An opened ``connection`` is gone (closed, cut or lost); nothing more comes from it."""
        ...


class Connection(asyncio.Protocol):
    """One client's websocket connection (created by `WebSocketServer`)."""

    transport: asyncio.Transport

    def __init__(self, server: "WebSocketServer") -> None:
        self._server = server
        self.protocol = ServerProtocol(
            max_size=server.limits.max_message_bytes, logger=server.logger
        )
        self.remote = "unknown"
        # Whether the protocol's state is OPEN, read for every message sent. That state
        # changes only in calls to the protocol, each followed by `_take_protocol_output`,
        # which updates this (and in connection_lost).
        self.open = False
        self._max_buffered_bytes = server.limits.max_buffered_bytes
        self._received = server.handler.received  # for every message
        self._opened = False  # the handler was told; it is told of the close too
        self._closed_by_hub = False  # what the client sends from then on is discarded
        # What is written to the client and not handed to the transport yet, in order: the
        # protocol's output (handshake, pongs, close) and the text frames of `send`.
        self._outgoing: list[bytes] = []
        self._unflushed = 0  # bytes of text frames in it
        self._transport_buffered = 0  # the transport's buffer when the first of them came
        self._fragments: list[BytesLike] | None = None  # a fragmented text message so far
        # Once open, the hub cuts frames itself (`_unframe`): the bytes read and not yet cut.
        self._unframing = False
        self._buffer = bytearray()
        self._turn_pending = False  # `_continue` is scheduled
        self._ping: bytes | None = None  # the payload of the ping not answered yet
        self._held = False  # reading paused by the handler (`hold`)
        self._writing_paused = False  # reading paused: the client does not read what it asks
        # Cuts the connection: one that never completes its opening handshake, or whose
        # closing handshake does not end.
        self._cut_timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None  # of `close_at`
        self._deadline_timer: asyncio.TimerHandle | None = None

    @property
    def close_code(self) -> int | None:
        """The code of the close frame the hub sent, None if it sent none."""
        sent = self.protocol.close_sent
        return None if sent is None else sent.code

    def buffered_bytes(self) -> int:
        """Bytes written to this connection that the kernel has not accepted yet."""
        return self.transport.get_write_buffer_size() + self._unflushed

    def send(self, text: str) -> bool:
        """Send a text message without waiting: True if it is on its way, False if the
        connection is not open or is closed instead because it stopped reading."""
        if not self.open:
            return False
        data = text.encode()
        header = text_frame_header(len(data))
        size = len(header) + len(data)
        if not self._unflushed:
            # Within a turn the transport's buffer only drains: its size at the first send
            # bounds it for the rest.
            self._transport_buffered = self.transport.get_write_buffer_size()
        if self._transport_buffered + self._unflushed + size > self._max_buffered_bytes:
            self.close(CloseCode.POLICY_VIOLATION, CLOSE_SLOW_READER)
            return False
        if not self._unflushed:
            self._server.flush_soon(self)
        self._server.sent_in_turn += 1
        # An empty message adds no data: an empty write in the list is the protocol's EOF.
        self._outgoing += (header, data) if data else (header,)
        self._unflushed += size
        return True

    def close(self, code: int | None, reason: str = "") -> None:
        """Start the closing handshake (``code`` None: a close frame without a code); the
        connection is cut if it has not ended ``close_timeout`` later (a reader that stopped
        reads no close frame either)."""
        if not self.open:
            return
        self._closed_by_hub = True
        self.protocol.send_close(code, reason)
        self._take_protocol_output()
        self.flush()

    def close_at(self, deadline: float | None, code: int, reason: str) -> None:
        """Close the connection with ``code`` and ``reason`` at ``deadline`` (event loop
        time) unless this is called again before with another deadline; None: never."""
        if deadline == self.deadline:
            return
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self.deadline = deadline
        if deadline is not None:
            self._deadline_timer = self._server.loop.call_at(
                deadline, self._deadline_passed, code, reason
            )

    def hold(self) -> None:
        """Read nothing more until `release` (the handler has a queue of this connection's
        messages to work off)."""
        if not self._held:
            self._held = True
            self.transport.pause_reading()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._next_turn()  # what the buffer holds first, then reading again

    def ping(self) -> bytes | None:
        """Send a ping unless one is unanswered; the payload of the one outstanding, None
        if the connection is not open."""
        if not self.open:
            return None
        if self._ping is None:
            self._ping = os.urandom(4)
            self.protocol.send_ping(self._ping)
            self._take_protocol_output()
            self.flush()
        return self._ping

    def answered(self, ping: bytes) -> bool:
        """Whether the ping with payload ``ping`` is answered."""
        return self._ping != ping

    def flush(self) -> None:
        """Hand everything written to this connection so far to the transport."""
        if not self._outgoing:
            return
        writes, self._outgoing = self._outgoing, []
        self._unflushed = 0
        if self.transport.is_closing():
            return  # a transport that is going away takes no more writes
        data = b"".join(writes)
        if data:
            self.transport.write(data)
        if writes[-1] == SEND_EOF:  # nothing is written after it
            self._end_stream()

    def _take_protocol_output(self) -> None:
        """Move what the protocol wrote (handshake, pongs, close, EOF) to the outgoing list,
        after every call that may make it write, so that everything leaves in order; and
        once it expects the connection to end, cut it if it has not ``close_timeout`` later."""
        self._outgoing += self.protocol.data_to_send()
        self.open = self.protocol.state is State.OPEN
        if self.protocol.close_expected() and self._cut_timer is None:
            self._cut_after(self._server.limits.close_timeout)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple):
            self.remote = f"{peername[0]}:{peername[1]}"
        # asyncio's own loop sets TCP_NODELAY on every TCP connection; uvloop does not on
        # accepted ones, and Nagle's algorithm then holds small relays back for milliseconds.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # What the protocol answers by itself (pongs, the close) is written whatever the
        # client left unread: past ``max_buffered_bytes``, its reading stops instead.
        self.transport.set_write_buffer_limits(high=self._server.limits.max_buffered_bytes)
        self._server.connections.add(self)
        self._cut_after(self._server.limits.join_timeout)

    def data_received(self, data: bytes) -> None:
        if self._unframing and not self._buffer:
            # Most reads end on a frame's end: cut them where they are, keep only the rest.
            cut = self._unframe(data)
            if cut < len(data):
                self._buffer += data[cut:]
        elif self._unframing:
            self._buffer += data
            del self._buffer[: self._unframe(self._buffer)]
        else:
            self._feed(data)
        self.flush()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._next_turn()  # what the buffer holds first, then reading again

    def eof_received(self) -> None:
        self.protocol.receive_eof()
        self._take_protocol_output()
        # A TLS transport reports the end of the stream in the callback of the read before
        # it, even when that read paused reading: what the hub left for a later turn is
        # dropped as on connection_lost.
        self._drop_unread()
        self.flush()
        # Returning None closes the transport: after EOF a websocket writes nothing more,
        # and a TLS transport cannot stay half-open anyway.

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent; the protocol is CLOSED from here
        self.open = False
        self._drop_unread()
        for timer in (self._cut_timer, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        self._server.forget(self)
        if self._opened:
            self._server.handler.closed(self)

    # Internals

    def _drop_unread(self) -> None:
        """Drop what was read and not unframed yet (held, or left for the next turn): the
        protocol takes no more data after EOF."""
        self._unframing = False
        self._buffer.clear()

    def _handshake(self, request: Request) -> None:
        answer = self._server.handler.respond(request.path)
        if answer is None:
            response = self.protocol.accept(request)
        else:
            response = self.protocol.reject(*answer)
        self.protocol.send_response(response)
        self._take_protocol_output()
        self.flush()
        if self.open:
            if self._cut_timer is not None:
                self._cut_timer.cancel()
                self._cut_timer = None
            self._opened = True
            self._server.handler.opened(self)

    def _frame(self, frame: Frame) -> None:
        # The client's messages before its close frame count; after the hub's, none does.
        if self._closed_by_hub:
            return
        opcode = frame.opcode
        if opcode is Opcode.TEXT and frame.fin:
            self._text(frame.data)
        elif opcode is Opcode.TEXT:
            self._fragments = [frame.data]
        elif opcode is Opcode.CONT and self._fragments is not None:
            self._fragments.append(frame.data)
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), None
                self._text(data)
        elif opcode is Opcode.BINARY:
            self.close(CloseCode.UNSUPPORTED_DATA, CLOSE_BINARY_FRAME)
        elif opcode is Opcode.PONG and frame.data == self._ping:
            self._ping = None
        # The protocol answers pings and closes by itself.

    def _text(self, data: BytesLike) -> None:
        try:
            text = str(data, "utf-8")
        except UnicodeDecodeError as error:
            self._closed_by_hub = True
            self.protocol.fail(CloseCode.INVALID_DATA, f"{error.reason} at position {error.start}")
            self._take_protocol_output()
            self.flush()
            return
        try:
            self._received(self, text)
        except Exception:
            # A fault of the hub's own: logged, and the connection closed as websockets
            # closes one whose handler failed; the others are served on.
            self._server.logger.exception("handler failed")
            self.close(CloseCode.INTERNAL_ERROR)

    def _feed(self, data: bytes) -> None:
        """Pass ``data`` to the protocol and act on what it parsed."""
        self.protocol.receive_data(data)
        self._take_protocol_output()  # before any reply to what it read
        events = self.protocol.events_received()
        for event in events:
            if isinstance(event, Frame):
                self._frame(event)
            else:
                assert isinstance(event, Request)  # a server receives no response
                self._handshake(event)
                # A client sends nothing after its request until it has the response (RFC
                # 6455 section 4.1); one that did is closed, and what it sent is not read.
                # (One that hid the start of a frame before the end of the chunk that ended
                # its request can only garble its own connection.)
                if len(events) > 1 or not data.endswith(b"\r\n\r\n"):
                    self.close(CloseCode.PROTOCOL_ERROR, CLOSE_EARLY_DATA)
                elif self.open:
                    self._unframing = True

    def _unframe(self, buffer: bytes | bytearray) -> int:
        """Cut ``buffer`` into frames: each text message goes to the handler, any other frame
        whole to the protocol; at most ``MESSAGES_PER_TURN`` per turn of the event loop, none
        while the handler holds the connection or the client leaves its answers unread. How
        many bytes it cut (the rest waits for more, or for the next turn)."""
        max_size = self._server.limits.max_message_bytes
        start, available, handled = 0, len(buffer), 0
        while available - start >= 2 and not (self._held or self._writing_paused):
            if handled == MESSAGES_PER_TURN:
                self._next_turn()
                break
            if self._closed_by_hub:
                # Closing: the protocol reads the rest (the client's close) and discards it.
                self._unframing = False
                self._feed(bytes(buffer[start:]))
                start = available
                break
            first, second = buffer[start], buffer[start + 1]
            length = second & 0x7F
            extended = 2 if length == 126 else 8 if length == 127 else 0
            header = 2 + extended + (4 if second & 0x80 else 0)  # clients must mask
            if available - start < header:
                break
            if extended:
                length = int.from_bytes(buffer[start + 2 : start + 2 + extended])
            if length > max_size:
                # The protocol refuses it from its header (1009): it is not waited for.
                self._unframing = False
                self._feed(bytes(buffer[start:]))
                start = available
                break
            end = start + header + length
            if end > available:
                break
            if first == _FINAL_TEXT and second & 0x80 and self._fragments is None:
                mask = buffer[end - length - 4 : end - length]
                self._text(apply_mask(buffer[end - length : end], mask))
            else:
                self._feed(bytes(buffer[start:end]))
                if not self.open:
                    # The client's close, or a frame the protocol refused: it reads the rest.
                    self._unframing = False
                    if end < available:
                        self._feed(bytes(buffer[end:]))
                    start = available
                    break
            handled += 1
            start = end
        return start

    def _next_turn(self) -> None:
        """Stop reading and unframe the rest of the buffer in the next turn of the loop."""
        if not self._turn_pending:
            self._turn_pending = True
            self.transport.pause_reading()
            self._server.loop.call_soon(self._continue)

    def _continue(self) -> None:
        self._turn_pending = False
        if self._unframing:
            del self._buffer[: self._unframe(self._buffer)]
            self.flush()
        if not (
            self._turn_pending or self._held or self._writing_paused or self.transport.is_closing()
        ):
            self.transport.resume_reading()

    def _end_stream(self) -> None:
        # Half-close where TCP allows it (the client then closes), else close.
        if self.transport.can_write_eof():
            # uvloop may raise RuntimeError for a transport that is going away.
            with contextlib.suppress(OSError, RuntimeError):
                self.transport.write_eof()
        else:
            self.transport.close()

    def _cut_after(self, delay: float) -> None:
        if self._cut_timer is not None:
            self._cut_timer.cancel()
        self._cut_timer = self._server.loop.call_later(delay, self.transport.abort)

    def _deadline_passed(self, code: int, reason: str) -> None:
        self.deadline = self._deadline_timer = None
        self.close(code, reason)


class WebSocketServer:
    """Listens, and runs `Connection`s for ``handler``: ``await start(...)``, ``await close()``."""

    def __init__(self, handler: Handler, limits: Limits, logger: logging.Logger) -> None:
        self.handler = handler
        self.limits = limits
        self.logger = logger
        self.connections: set[Connection] = set()
        self._unflushed: list[Connection] = []
        self.pacer = PollPacer(limits.batch_window)
        self.sent_in_turn = 0  # messages `Connection.send` took in this turn of the loop
        self._server: asyncio.Server | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._all_gone: asyncio.Future[None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.server.get_loop()

    @property
    def server(self) -> asyncio.Server:
        if self._server is None:
            raise RuntimeError("the server is not started")
        return self._server

    @property
    def address(self) -> tuple[str, int]:
        """The host and port it listens on."""
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), host, port, ssl=ssl_context
        )
        self._keepalive_task = asyncio.create_task(self._keepalive())

    async def close(self) -> None:
        """Stop listening, close every connection (1001) and wait until each has ended or
        been cut."""
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        self.server.close()
        for connection in list(self.connections):
            if connection.open:
                connection.close(CloseCode.GOING_AWAY)
            elif connection.protocol.state is State.CONNECTING:
                connection.transport.abort()
        if self.connections:
            self._all_gone = self.loop.create_future()
            await self._all_gone
        await self.server.wait_closed()

    def buffered_bytes(self) -> int:
        """Bytes written to clients that the kernel has not accepted yet, in total."""
        return sum(connection.buffered_bytes() for connection in self.connections)

    def flush_soon(self, connection: Connection) -> None:
        """Flush ``connection`` at the end of this turn of the event loop."""
        if not self._unflushed:
            self.loop.call_soon(self._flush)
        self._unflushed.append(connection)

    def forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
        if not self.connections and self._all_gone is not None and not self._all_gone.done():
            self._all_gone.set_result(None)

    def _flush(self) -> None:
        unflushed, self._unflushed = self._unflushed, []
        for connection in unflushed:
            connection.flush()
        wait = self.pacer.after_turn(time.monotonic(), self.sent_in_turn)
        self.sent_in_turn = 0
        if wait:
            # Blocks the event loop on purpose, for less than a window: it is busy, and what
            # arrives meanwhile is read and relayed together once it polls (signaling.pacing).
            time.sleep(wait)

    async def _keepalive(self) -> None:
        """Every ``ping_interval``, ping every connection; ``ping_timeout`` later, close
        those that have not answered (1011, as websockets' own keepalive does)."""
        while True:
            await asyncio.sleep(self.limits.ping_interval)
            pings: list[tuple[Connection, bytes]] = []
            for count, connection in enumerate(list(self.connections), 1):
                # A ping is a system call: let relays run between batches, so that 10,000
                # pings are not one long stall of the event loop.
                if count % _PINGS_PER_TURN == 0:
                    await asyncio.sleep(0)
                ping = connection.ping()
                if ping is not None:
                    pings.append((connection, ping))
            self.loop.call_later(self.limits.ping_timeout, self._close_silent, pings)

    @staticmethod
    def _close_silent(pings: list[tuple[Connection, bytes]]) -> None:
        for connection, ping in pings:
            if not connection.answered(ping):
                connection.close(CloseCode.INTERNAL_ERROR, CLOSE_PING_TIMEOUT)
