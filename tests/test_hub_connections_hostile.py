"""The hub's connection layer (signaling.connections) against hostile clients and peer
processes: what they send cannot crash a callback, end another message's stream, grow the
hub's memory past its bounds, or leave a connection open without a peer."""

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.uri import parse_uri

from signaling.connections import MESSAGES_PER_TURN, Connection, WebSocketServer
from signaling.hub import KIB, Limits
from signaling.server import HubServer
from tests.tls import self_signed_certificate

TIMEOUT = 10.0


def client_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True, extensions=[])


class Recorder:
    """A handler that records what the connections tell it; ``hold``: hold a connection on
    each message, as the cluster's queue does when it is full."""

    def __init__(self, hold: bool = False, greeting: str | None = None) -> None:
        self.hold = hold
        self.greeting = greeting
        self.opened_connections: asyncio.Queue[Connection] = asyncio.Queue()
        self.texts: list[str] = []
        self.closed_connections: list[Connection] = []

    def respond(self, path: str) -> tuple[HTTPStatus, str] | None:
        return None

    def opened(self, connection: Connection) -> None:
        if self.greeting is not None:
            connection.send(self.greeting)
        self.opened_connections.put_nowait(connection)

    def received(self, connection: Connection, text: str) -> None:
        assert connection not in self.closed_connections
        self.texts.append(text)
        if self.hold:
            connection.hold()
        else:
            connection.send(text)

    def closed(self, connection: Connection) -> None:
        self.closed_connections.append(connection)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop's callbacks raised during the test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)


async def serve(handler: Recorder, limits: Limits | None = None) -> WebSocketServer:
    server = WebSocketServer(handler, limits or Limits(), logging.getLogger("test"))
    await server.start("127.0.0.1", 0, None)
    return server


def url(server: WebSocketServer) -> str:
    host, port = server.address
    return f"ws://{host}:{port}"


async def until(condition: Any) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.01)


async def test_messages_left_unread_when_a_held_connection_is_lost_are_dropped_quietly(
    loop_errors,
):
    handler = Recorder(hold=True)
    server = await serve(handler)
    async with await connect(url(server)) as client:
        connection = await handler.opened_connections.get()
        # One write: the hub holds the connection at the first message, the rest waits.
        client.transport.write(b"".join(client_frame(Opcode.TEXT, b"%d" % n) for n in range(3)))
        await until(lambda: handler.texts)
        connection.transport.abort()  # lost (a write failed, or cut) while held
        await until(lambda: handler.closed_connections)
        connection.release()  # the handler works off its queue, then releases
        for _ in range(5):
            await asyncio.sleep(0)
    await server.close()
    assert handler.texts == ["0"]
    assert handler.closed_connections == [connection]
    assert loop_errors == []


async def test_an_empty_text_message_does_not_end_the_stream(loop_errors):
    # The hub never writes one itself, but a forwarded member hears what its room's home
    # process writes, unchanged.
    handler = Recorder(greeting="")
    server = await serve(handler)
    async with await connect(url(server)) as client:
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == ""
        await client.send("after")
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == "after"
    await server.close()
    assert loop_errors == []


async def test_a_home_that_closes_without_a_code_closes_its_forwarded_member_alike(start_hub):
    hub = await start_hub()
    async with await connect(hub.url) as client:
        await until(lambda: hub._websockets.connections)
        [connection] = hub._websockets.connections
        # An empty close frame from the home: websockets reads it as 1005, a code no close
        # frame may carry (RFC 6455 section 7.4.1).
        upstream: Any = SimpleNamespace(protocol=SimpleNamespace(close_rcvd=Close(1005, "")))
        HubServer._close_as_home_did(connection, upstream)
        await asyncio.wait_for(client.wait_closed(), TIMEOUT)
        assert (client.close_code, client.close_reason) == (1005, "")


async def test_a_client_that_pings_and_never_reads_cannot_grow_the_hubs_buffer():
    limits = Limits(max_buffered_bytes=128 * KIB)
    handler = Recorder()
    server = await serve(handler, limits)
    host, port = server.address
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    _, writer = await asyncio.open_connection(sock=sock)
    protocol = ClientProtocol(parse_uri(url(server)))
    protocol.send_request(protocol.connect())
    writer.write(b"".join(protocol.data_to_send()))
    connection = await asyncio.wait_for(handler.opened_connections.get(), TIMEOUT)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    # From here on the client reads nothing: each ping makes the hub write a pong.
    pings = client_frame(Opcode.PING, b"p" * 125) * 500
    peak, written = 0, 0
    while written < 16_000_000:  # pings, as fast as the hub reads them, for a while
        if writer.transport.get_write_buffer_size() < 1_000_000:
            writer.write(pings)
            written += len(pings)
        await asyncio.sleep(0.001)
        peak = max(peak, connection.buffered_bytes())
        if loop.time() > deadline:
            break
    # A turn's worth of pongs may pass the bound, no more.
    assert peak <= limits.max_buffered_bytes + MESSAGES_PER_TURN * 127
    writer.transport.abort()
    await server.close()


async def test_a_tls_client_that_ends_its_stream_right_after_a_burst_breaks_no_callback(
    tmp_path, loop_errors
):
    # Over TLS the transport hands the hub a read and the end of the stream (close_notify)
    # in one callback, whatever the hub paused: the rest of a burst is still to be unframed
    # when the protocol has taken EOF.
    cert_path, key_path = self_signed_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    handler = Recorder()
    server = WebSocketServer(handler, Limits(), logging.getLogger("test"))
    await server.start("127.0.0.1", 0, server_context)
    host, port = server.address
    client_context = ssl.create_default_context(cafile=str(cert_path))
    _, writer = await asyncio.open_connection(host, port, ssl=client_context)
    protocol = ClientProtocol(parse_uri(f"wss://{host}:{port}"))
    protocol.send_request(protocol.connect())
    writer.write(b"".join(protocol.data_to_send()))
    connection = await asyncio.wait_for(handler.opened_connections.get(), TIMEOUT)
    burst = [client_frame(Opcode.TEXT, b"%d" % n) for n in range(MESSAGES_PER_TURN + 1)]
    writer.write(b"".join([*burst, client_frame(Opcode.PING, b"p")]))
    writer.close()  # close_notify, in the same read as the burst
    await until(lambda: handler.closed_connections)
    await server.close()
    assert handler.closed_connections == [connection]
    assert loop_errors == []
