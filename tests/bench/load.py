"""A websocket load generator that costs little per message, for throughput runs
(tests/bench/hub.py, tests/bench/hub_cluster.py).

A websockets client spends about as much CPU per relayed message as the server it loads
(builds, masks and writes each frame, then parses, unmasks and decodes each one it receives).
On this 2-core machine that made the load generator, not the server, the bottleneck of a
throughput run: it used a whole core against every server, so the run measured what each
server made the generator do rather than how fast the server relays.

``LightClient`` keeps the cost per message small instead:

- it opens the connection and speaks the few setup messages (join, welcome) like any client;
- in a flow it writes the same frame for every message, built once by websockets
  (masked, RFC 6455 section 5.3), and counts the text frames it receives by their headers
  without decoding them; it keeps the last one, so that a run can check what arrived.

A flow keeps at most ``IN_FLIGHT`` messages between a sender and its receiver, so that no
server buffers more for a run than a reader that keeps up would make it.
"""

import asyncio
import os
from base64 import b64encode
from urllib.parse import urlsplit

from websockets.frames import Close, Frame, Opcode
from websockets.utils import accept_key

IN_FLIGHT = 256
UPGRADE_LIMIT = 65_536  # bytes of a server's HTTP response
CLOSE_TIMEOUT = 10.0


class LoadError(Exception):
    """The server answered with something a load run cannot go on from."""


def client_frame(opcode: Opcode, payload: bytes) -> bytes:
    return Frame(opcode, payload).serialize(mask=True)


class LightClient(asyncio.Protocol):
    """A websocket client connection (``await LightClient.open(url)``): ``send``, ``recv``
    and ``close`` as websockets' own client has them, and ``flow`` for throughput runs."""

    def __init__(self, key: str) -> None:
        self._accept = accept_key(key).lower()
        loop = asyncio.get_running_loop()
        self._upgraded: asyncio.Future[None] = loop.create_future()
        self._lost: asyncio.Future[None] = loop.create_future()
        self._buffer = bytearray()
        # Texts received during setup; None after the last. None during a flow.
        self._texts: asyncio.Queue[str | None] | None = asyncio.Queue()
        self._writable = asyncio.Event()
        self._writable.set()
        self.expected = 0  # messages sent to this client in the current flow
        self.received = 0  # text frames counted in the current flow
        self.last_received = b""  # the payload of the last one
        self._lag = 0
        self._caught_up: asyncio.Future[None] | None = None

    @classmethod
    async def open(cls, url: str) -> "LightClient":
        parts = urlsplit(url)
        key = b64encode(os.urandom(16)).decode()
        loop = asyncio.get_running_loop()
        host, port = parts.hostname or "localhost", parts.port or 80
        _, client = await loop.create_connection(lambda: cls(key), host, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
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
        error = exc or LoadError("the server closed the connection")
        for future in (self._upgraded, self._caught_up):
            if future is not None and not future.done():
                future.set_exception(error)
        self._writable.set()  # a flow waiting to write goes on, to find the connection lost
        if not self._lost.done():
            self._lost.set_result(None)
            if self._texts is not None:
                self._texts.put_nowait(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._upgraded.done() and not self._take_upgrade():
            return
        position, size = 0, len(buffer)
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
                if self._texts is None:
                    self.received += 1
                    self.last_received = bytes(buffer[start:end])
                else:
                    self._texts.put_nowait(buffer[start:end].decode())
            elif first == 0x80 | Opcode.PING:
                self._transport.write(client_frame(Opcode.PONG, bytes(buffer[start:end])))
            elif first == 0x80 | Opcode.CLOSE:
                self._transport.close()
            elif first != 0x80 | Opcode.PONG:
                self._fail(f"unexpected frame header {first:#04x}")
                return
            position = end
        del buffer[:position]
        waiter = self._caught_up
        if waiter is not None and self.expected - self.received <= self._lag:
            self._caught_up = None
            waiter.set_result(None)

    def _take_upgrade(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > UPGRADE_LIMIT:
                self._fail("the HTTP response has no end")
            return False
        response = bytes(self._buffer[:end]).decode("latin-1")
        status, headers = response.partition("\r\n")[::2]
        if not status.startswith("HTTP/1.1 101 "):
            self._fail(f"the upgrade was refused: {status}")
        elif f"sec-websocket-accept: {self._accept}" not in headers.lower():
            self._fail("the upgrade does not accept our key")
        else:
            del self._buffer[: end + 4]
            self._upgraded.set_result(None)
            return True
        return False

    def _fail(self, reason: str) -> None:
        self._transport.abort()
        self.connection_lost(LoadError(reason))

    # setup, as websockets' client

    async def send(self, text: str) -> None:
        self._transport.write(client_frame(Opcode.TEXT, text.encode()))

    async def recv(self) -> str:
        assert self._texts is not None, "recv() during a flow"
        text = await self._texts.get()
        if text is None:
            self._texts.put_nowait(None)  # for the next recv()
            raise LoadError("the connection is closed")
        return text

    async def close(self) -> None:
        if not self._lost.done():
            self._transport.write(client_frame(Opcode.CLOSE, Close(1000, "").serialize()))
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), CLOSE_TIMEOUT)
            except TimeoutError:
                self._transport.abort()

    # flows

    async def flow(self, receiver: "LightClient", text: str, count: int) -> None:
        """Send ``text`` ``count`` times as fast as ``receiver`` keeps up (counting what it
        receives from now on instead of decoding it); return once it received them all."""
        frame = client_frame(Opcode.TEXT, text.encode())
        receiver._texts = None
        for _ in range(count):
            self._transport.write(frame)
            receiver.expected += 1
            if receiver.expected - receiver.received > IN_FLIGHT:
                await receiver._catching_up(IN_FLIGHT // 2)
            if not self._writable.is_set():
                await self._writable.wait()
        if receiver.expected > receiver.received:
            await receiver._catching_up(0)

    async def _catching_up(self, lag: int) -> None:
        if self._lost.done():
            raise LoadError("the connection is closed")
        self._lag = lag
        self._caught_up = asyncio.get_running_loop().create_future()
        await self._caught_up
