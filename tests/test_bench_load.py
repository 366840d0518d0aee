"""The throughput runs' light websocket client (tests/bench/load.py), against real servers."""

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

import pytest
from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from signaling.hub import Limits
from tests.bench.hub import PAYLOAD, Server
from tests.bench.load import IN_FLIGHT, LightClient, LoadError
from tests.conftest import StartHub

# One of each length encoding (7 bits, 16 bits, 64 bits) and each boundary between them.
LENGTHS = [0, 5, 125, 126, 65_535, 65_536, 200_000]


async def scripted(connection: ServerConnection) -> None:
    """Sends a message of each of LENGTHS, then one more once its ping was answered."""
    for length in LENGTHS:
        await connection.send("m" * length)
    pong = await connection.ping()
    # A client that does not answer fails the test (the connection closes) instead of hanging.
    await asyncio.wait_for(pong, 5)
    await connection.send("after the pong")
    await connection.wait_closed()


def refuse(connection: ServerConnection, request: Request) -> Response:
    return connection.respond(HTTPStatus.FORBIDDEN, "no\n")


def ws_url(server: asyncio.Server | WebSocketServer) -> str:
    return f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"


@pytest.fixture
async def scripted_url() -> AsyncIterator[str]:
    async with serve(scripted, "127.0.0.1", 0, max_size=None) as server:
        yield ws_url(server)


async def test_messages_of_every_length_arrive_whole_and_pings_are_answered(scripted_url):
    client = await LightClient.open(scripted_url)
    for length in LENGTHS:
        assert await client.recv() == "m" * length
    assert await client.recv() == "after the pong"
    await client.close()


async def test_a_refused_upgrade_is_a_load_error():
    async with serve(scripted, "127.0.0.1", 0, process_request=refuse) as server:
        with pytest.raises(LoadError, match=r"^the upgrade was refused: HTTP/1\.1 403 Forbidden$"):
            await LightClient.open(ws_url(server))


async def test_an_upgrade_that_does_not_accept_the_key_is_a_load_error():
    async def wrong_key(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        )
        await reader.read()

    server = await asyncio.start_server(wrong_key, "127.0.0.1", 0)
    async with server:
        with pytest.raises(LoadError, match=r"^the upgrade does not accept our key$"):
            await LightClient.open(ws_url(server))


@pytest.mark.parametrize("count", [1, IN_FLIGHT, 5 * IN_FLIGHT + 7])
async def test_a_flow_through_the_hub_counts_every_message(start_hub: StartHub, count: int):
    hub = await start_hub(Limits(rate_per_second=1e9, rate_burst=10**9))
    server = Server("hub", hub.url, os.getpid())
    pair = await server.pair(LightClient.open)
    text, last = server.relay(pair.first_id, PAYLOAD), server.relay(pair.first_id, "last")
    got = await pair.second.flow(pair.first, text, count, last)
    assert pair.first.received == count
    assert pair.first.relay is not None
    for relayed, payload in ((pair.first.relay, PAYLOAD), (got, "last")):
        envelope = json.loads(relayed)
        assert (sorted(envelope), envelope["payload"]) == (["from", "payload", "type"], payload)
    await pair.first.close()
    await pair.second.close()


class ScriptedRelay:
    """Forwards what ``/sender`` sends to ``/receiver``, unchanged, with one of these faults:
    held until ``release`` is set, each sent twice, ``inject`` after the 10th, or the sender
    closed (1008) after the 10th."""

    def __init__(
        self, *, held: bool = False, twice: bool = False, inject: str = "", close: bool = False
    ) -> None:
        self.twice, self.inject, self.close_sender = twice, inject, close
        self.release = asyncio.Event()
        if not held:
            self.release.set()
        self.window_reached = asyncio.Event()  # once IN_FLIGHT messages came from the sender
        self._receiver: asyncio.Future[ServerConnection] = asyncio.Future()

    async def handler(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        if connection.request.path == "/receiver":
            self._receiver.set_result(connection)
            await connection.wait_closed()
            return
        receiver = await self._receiver
        messages: asyncio.Queue[str] = asyncio.Queue()

        async def forward() -> None:
            await self.release.wait()
            for number in range(1, 1_000_000):
                message = await messages.get()
                for _ in range(2 if self.twice else 1):
                    await receiver.send(message)
                if number == 10 and self.inject:
                    await receiver.send(self.inject)
                if number == 10 and self.close_sender:
                    await connection.close(1008, "enough")

        forwarding = asyncio.create_task(forward())
        received = 0
        async for message in connection:
            assert isinstance(message, str)
            messages.put_nowait(message)
            received += 1
            if received == IN_FLIGHT:
                self.window_reached.set()
        forwarding.cancel()

    @asynccontextmanager
    async def clients(self) -> AsyncIterator[tuple[LightClient, LightClient]]:
        async with serve(self.handler, "127.0.0.1", 0) as server:
            receiver = await LightClient.open(f"{ws_url(server)}/receiver")
            sender = await LightClient.open(f"{ws_url(server)}/sender")
            yield sender, receiver


async def test_a_flow_keeps_at_most_its_window_in_flight():
    relay = ScriptedRelay(held=True)
    async with relay.clients() as (sender, receiver):
        flow = asyncio.create_task(sender.flow(receiver, "m", 2 * IN_FLIGHT, "last"))
        await relay.window_reached.wait()
        # The sender wrote a window and waits for the receiver: nothing came yet.
        assert (receiver.expected, receiver.received) == (IN_FLIGHT, 0)
        relay.release.set()
        assert await flow == "last"
        assert receiver.received == 2 * IN_FLIGHT


async def test_a_relay_received_twice_fails_the_flow():
    async with ScriptedRelay(twice=True).clients() as (sender, receiver):
        with pytest.raises(LoadError, match=r"^2000 relays of 1000 came before 'last'$"):
            await sender.flow(receiver, "m", 1_000, "last")


async def test_a_message_that_is_not_the_relay_fails_the_flow():
    async with ScriptedRelay(inject="surprise").clients() as (sender, receiver):
        with pytest.raises(LoadError, match="'surprise'"):
            await sender.flow(receiver, "m", 5 * IN_FLIGHT, "last")


async def test_a_sender_closed_mid_flow_fails_the_flow_with_the_close_code():
    async with ScriptedRelay(close=True).clients() as (sender, receiver):
        closed = r"^sender: the server closed the connection: 1008 \(policy violation\) enough$"
        with pytest.raises(LoadError, match=closed):
            await sender.flow(receiver, "m", 5 * IN_FLIGHT, "last")
