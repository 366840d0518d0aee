"""A websocket load generator that costs little per message, for throughput runs
(tests/bench/hub.py, tests/bench/hub_cluster.py).

A websockets client builds, masks and writes each frame, then parses, unmasks and decodes each
one it receives: about 15 µs per relayed message here, more than the hub spends relaying it.
With websockets clients on this 2-core machine, the load generator of `tests.bench.hub` used a
whole core in every throughput run and was what saturated first.

``LightClient`` keeps the cost per message small instead:

- it opens the connection and speaks the few setup messages (join, welcome) like any client;
- in a flow it writes the same frame for every message, built once by websockets (masked,
  RFC 6455 section 5.3), and its receiver counts a frame only if it is byte for byte the first
  relay it counted; any other frame is decoded and ends the flow. The flow ends with one
  different message, whose relay must come after exactly the messages counted.

A flow keeps at most ``window`` messages between a sender and its receiver (``IN_FLIGHT`` by
default), so that no server buffers more for a run than a reader that keeps up would make it.
"""

import asyncio
import os
from base64 import b64encode
from urllib.parse import urlsplit

from websockets.frames import Close, Frame, Opcode
from websockets.utils import accept_key

IN_FLIGHT = 256
UPGRADE_LIMIT = 65_536  # bytes of a server's HTTP response
OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 10.0
FLOW_TIMEOUT = 120.0


class LoadError(Exception):
    """The server answered with something a load run cannot go on from."""


def client_frame(opcode: Opcode, payload: bytes) -> bytes:
    return Frame(opcode, payload).serialize(mask=True)


class LightClient(asyncio.Protocol):
    """A websocket client connection (``await LightClient.open(url)``): ``send``, ``recv``
    and ``close`` as websockets' own client has them, and ``flow`` for throughput runs."""

    def __init__(self, key: str) -> None:
        self._accept = accept_key(key)
        loop = asyncio.get_running_loop()
        self._upgraded: asyncio.Future[None] = loop.create_future()
        self._lost: asyncio.Future[None] = loop.create_future()
        self._lost_because = "the connection is closed"
        self._buffer = bytearray()
        # Texts received and not counted; None once the connection is lost.
        self._texts: asyncio.Queue[str | None] = asyncio.Queue()
        self._writable = asyncio.Event()
        self._writable.set()
        # In a flow: the relay counted (None before the first), how many were sent and
        # counted, and the waiter for the count to come within ``_lag`` of what was sent.
        self._counting = False
        self.relay: bytes | None = None
        self.expected = 0
        self.received = 0
        self._lag = 0
        self._caught_up: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, url: str) -> "LightClient":
        parts = urlsplit(url)
        key = b64encode(os.urandom(16)).decode()
        loop = asyncio.get_running_loop()
        host, port = parts.hostname or "localhost", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        async with asyncio.timeout(OPEN_TIMEOUT):
            _, client = await loop.create_connection(lambda: cls(key), host, port)
            client._transport.write(
                f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            await client._upgraded
        return client

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost.done():
            return
        if exc is not None:
            self._lost_because = f"the connection is lost: {exc}"
        if not self._upgraded.done():
            self._upgraded.set_exception(LoadError(self._lost_because))
        self._lost.set_result(None)
        self._texts.put_nowait(None)
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._upgraded.done() and not self._take_upgrade():
            return
        position, size, counted = 0, len(buffer), self.received
        while size - position >= 2:
            first, length = buffer[position], buffer[position + 1]
            start = position + 2
            if length == 126:
                start += 2
            elif length == 127:
                start += 8
            elif length > 127:
                self._fail("a server frame was masked")
                return
            if start > size:
                break
            if start > position + 2:
                length = int.from_bytes(buffer[position + 2 : start], "big")
            end = start + length
            if end > size:
                break
            if first == 0x80 | Opcode.TEXT:
                relay = self.relay
                if self._counting and relay is None:
                    self.relay = bytes(buffer[start:end])
                    counted += 1
                elif (
                    self._counting
                    and relay is not None
                    and end - start == len(relay)
                    and buffer.startswith(relay, start)
                ):
                    counted += 1
                else:
                    self._texts.put_nowait(buffer[start:end].decode())
            elif first == 0x80 | Opcode.PING:
                self._transport.write(client_frame(Opcode.PONG, bytes(buffer[start:end])))
            elif first == 0x80 | Opcode.CLOSE:
                self._lost_because = f"the server closed the connection: {self._close(start, end)}"
                self._transport.close()
            elif first != 0x80 | Opcode.PONG:
                self._fail(f"unexpected frame header {first:#04x}")
                return
            position = end
        del buffer[:position]
        self.received = counted
        waiter = self._caught_up
        if waiter is not None and (self.expected - counted <= self._lag or not self._texts.empty()):
            self._caught_up = None
            waiter.set_result(None)

    def _close(self, start: int, end: int) -> str:
        try:
            return str(Close.parse(bytes(self._buffer[start:end])))
        except Exception as error:  # whatever websockets finds wrong with it
            return f"with a close frame websockets refuses ({error})"

    def _take_upgrade(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > UPGRADE_LIMIT:
                self._fail("the HTTP response has no end")
            return False
        status, *lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in lines)
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        if not status.startswith("HTTP/1.1 101 "):
            self._fail(f"the upgrade was refused: {status}")
        elif headers.get("sec-websocket-accept") != self._accept:
            self._fail("the upgrade does not accept our key")
        else:
            del self._buffer[: end + 4]
            self._upgraded.set_result(None)
            return True
        return False

    def _fail(self, reason: str) -> None:
        self._lost_because = reason
        self._transport.abort()
        self.connection_lost(None)

    # setup, as websockets' client

    async def send(self, text: str) -> None:
        self._transport.write(client_frame(Opcode.TEXT, text.encode()))

    async def recv(self) -> str:
        text = await self._texts.get()
        if text is None:
            self._texts.put_nowait(None)  # for the next recv()
            raise LoadError(self._lost_because)
        return text

    async def close(self) -> None:
        if not self._lost.done():
            self._transport.write(client_frame(Opcode.CLOSE, Close(1000, "").serialize()))
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), CLOSE_TIMEOUT)
            except TimeoutError:
                self._transport.abort()

    # flows

    async def flow(
        self, receiver: "LightClient", text: str, count: int, last: str, window: int = IN_FLIGHT
    ) -> str:
        """Send ``text`` ``count`` times as fast as ``receiver`` keeps up, at most ``window``
        in flight, then ``last``; return what ``receiver`` got for ``last``, once it counted
        every relay of ``text`` before it. The first relay counted is kept in
        ``receiver.relay``, for the caller to check."""
        frame = client_frame(Opcode.TEXT, text.encode())
        receiver._counting, receiver.relay = True, None
        receiver.expected = receiver.received = 0
        try:
            async with asyncio.timeout(FLOW_TIMEOUT):
                for _ in range(count):
                    if receiver.expected - receiver.received >= window:
                        await self._until_caught_up(receiver, window // 2)
                    if not self._writable.is_set():
                        await self._writable.wait()
                    if self._lost.done():
                        raise LoadError(f"sender: {self._lost_because}")
                    self._transport.write(frame)
                    receiver.expected += 1
                await self.send(last)
                got = await receiver.recv()
        except TimeoutError:
            raise LoadError(
                f"no relay for {FLOW_TIMEOUT} s: {receiver.received} of {receiver.expected}"
            ) from None
        finally:
            receiver._counting = False
        if receiver.received != count:
            raise LoadError(f"{receiver.received} relays of {count} came before {got[:200]!r}")
        if not self._texts.empty():
            raise LoadError(f"the server answered the sender: {self._texts.get_nowait()!r}")
        return got

    async def _until_caught_up(self, receiver: "LightClient", lag: int) -> None:
        """Wait until ``receiver`` counted all but ``lag`` of what was sent to it; raise if
        either connection is lost or the receiver got something else meanwhile."""
        if receiver._texts.empty():
            assert receiver._caught_up is None, "one flow at a time to a receiver"
            receiver._lag = lag
            waiter = receiver._caught_up = asyncio.get_running_loop().create_future()
            ends = {waiter, self._lost, receiver._lost}
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            receiver._caught_up = None
        if not receiver._texts.empty():
            raise LoadError(f"receiver, in a flow: {await receiver.recv()!r}")
        if self._lost.done():
            raise LoadError(f"sender: {self._lost_because}")
