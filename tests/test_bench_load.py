"""The throughput runs' light websocket client (tests/bench/load.py), against real servers."""

import asyncio
import json
import os
from collections.abc import AsyncIterator
from http import HTTPStatus

import pytest
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


@pytest.fixture
async def scripted_url() -> AsyncIterator[str]:
    async with serve(scripted, "127.0.0.1", 0, max_size=None) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"


async def test_messages_of_every_length_arrive_whole_and_pings_are_answered(scripted_url):
    client = await LightClient.open(scripted_url)
    for length in LENGTHS:
        assert await client.recv() == "m" * length
    assert await client.recv() == "after the pong"
    await client.close()


async def test_a_refused_upgrade_is_a_load_error():
    async with serve(scripted, "127.0.0.1", 0, process_request=refuse) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        with pytest.raises(LoadError, match=r"^the upgrade was refused: HTTP/1\.1 403 Forbidden$"):
            await LightClient.open(url)


@pytest.mark.parametrize("count", [1, IN_FLIGHT, 5 * IN_FLIGHT + 7])
async def test_a_flow_through_the_hub_counts_every_message(start_hub: StartHub, count: int):
    hub = await start_hub(Limits(rate_per_second=1e9, rate_burst=10**9))
    server = Server("hub", hub.url, os.getpid())
    pairs = [await server.pair(LightClient.open) for _ in range(2)]
    for pair in pairs:
        await pair.second.flow(pair.first, server.relay(pair.first_id, PAYLOAD), count)
        assert (pair.first.expected, pair.first.received) == (count, count)
        relayed = json.loads(pair.first.last_received)
        assert (relayed["type"], relayed["payload"]) == ("relay", PAYLOAD)
    # The other direction was never used: nothing was counted there.
    assert [pair.second.received for pair in pairs] == [0, 0]
    for pair in pairs:
        await pair.first.close()
        await pair.second.close()
