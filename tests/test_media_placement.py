"""Routing hubs (``--route-media``) sharing a real Valkey server: where a routed room lives.

In-process hubs (several `HubServer`s on one event loop, each its own node) where a test reads
internals; a real ``blindhub hub --route-media --redis`` subprocess where a process must die.
Members are plain aiortc peers (tests/test_media_server.py) or bare websockets where no media
is needed."""

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from client.cli import main
from client.experiment.analysis import dominant_frequency
from signaling.cluster_redis import ClusterConfig
from signaling.hub import Limits
from signaling.media_placement import CLOSE_ROOM_MOVED, RoomPlacement
from signaling.media_server import MediaServer
from signaling.protocol import ErrorCode, ErrorMessage, parse_hub_message
from signaling.server import HubServer
from tests.conftest import wait_for
from tests.redis_server import RedisServer
from tests.test_media_server import Peer

pytestmark = pytest.mark.slow

TIMEOUT = 10.0
HEARTBEAT = 0.2
CONFIG = ClusterConfig("redis://", heartbeat_interval=HEARTBEAT)


async def recv(websocket: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    return message


async def join(url: str, room: str) -> tuple[ClientConnection, dict[str, Any]]:
    websocket = await connect(url, compression=None)
    await websocket.send(json.dumps({"type": "join", "room": room}))
    return websocket, await recv(websocket)


async def until(websocket: ClientConnection, kind: str) -> dict[str, Any]:
    """The first message of type ``kind`` (a media-offer comes when the hub has made it, so
    its place among the others is not fixed)."""
    while (message := await recv(websocket))["type"] != kind:
        pass
    return message


@asynccontextmanager
async def routed_hubs(redis_server: RedisServer, count: int) -> AsyncIterator[list[HubServer]]:
    async with AsyncExitStack() as stack:
        servers = []
        for _ in range(count):
            media = MediaServer(Limits(max_peers_per_room=4))
            config = ClusterConfig(redis_server.url, heartbeat_interval=HEARTBEAT)
            placement = RoomPlacement(media, config)
            server = HubServer(media=media, placement=placement)
            servers.append(await stack.enter_async_context(server))
        yield servers


def placement(server: HubServer) -> RoomPlacement:
    assert server.placement is not None
    return server.placement


async def test_a_room_lives_where_it_was_first_joined_and_joins_elsewhere_are_sent_there(
    redis_server: RedisServer,
):
    async with routed_hubs(redis_server, 2) as [first, second]:
        alice = Peer(first.url, 440)
        await alice.join("call")
        # A join through the other process is told where the room lives, and nothing else.
        elsewhere, answer = await join(second.url, "call")
        assert answer["code"] == ErrorCode.ROOM_ELSEWHERE
        redirect = parse_hub_message(json.dumps(answer))
        assert isinstance(redirect, ErrorMessage) and redirect.home == first.url
        assert second.media is not None and second.media.hub.rooms() == {}
        # The refused connection is in no room: it may join a room that lives on its process.
        await elsewhere.send(json.dumps({"type": "join", "room": "other"}))
        assert (await recv(elsewhere))["type"] == "welcome"
        await elsewhere.close()

        bob = Peer(redirect.home, 550)
        try:
            await bob.join("call")
            a, b = alice.welcome().peer_id, bob.welcome().peer_id

            def heard() -> bool:
                return len(alice.audio_from(b)) >= 30000 and len(bob.audio_from(a)) >= 30000

            await wait_for(heard, timeout=30)
            assert abs(dominant_frequency(alice.audio_from(b), 48000) - 550) < 5
            assert abs(dominant_frequency(bob.audio_from(a), 48000) - 440) < 5
        finally:
            await alice.close()
            await bob.close()
        assert placement(second).redirects_total == 1


async def test_first_joins_at_once_on_two_processes_agree_on_one_home(redis_server: RedisServer):
    async with routed_hubs(redis_server, 2) as servers:
        rooms = [f"race{i}" for i in range(8)]
        answers = await asyncio.gather(
            *(join(server.url, room) for room in rooms for server in servers)
        )
        for index, room in enumerate(rooms):
            pair = answers[2 * index : 2 * index + 2]
            kinds = sorted(answer["type"] for _, answer in pair)
            assert kinds == ["error", "welcome"], (room, pair)
            home = next(servers[i].url for i, (_, a) in enumerate(pair) if a["type"] == "welcome")
            refused = next(a for _, a in pair if a["type"] == "error")
            assert refused["code"] == ErrorCode.ROOM_ELSEWHERE and refused["home"] == home
        for websocket, _ in answers:
            await websocket.close()


@asynccontextmanager
async def routed_process(redis_server: RedisServer) -> AsyncIterator[tuple[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client.cli", "hub", "--port", "0", "--quiet", "--route-media",
        "--redis", redis_server.url, "--heartbeat", str(HEARTBEAT),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert line.startswith("listening on "), line
        yield line.removeprefix("listening on ").strip(), process
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def test_a_dead_home_ends_its_rooms_which_another_process_then_takes(
    redis_server: RedisServer,
):
    async with (
        routed_process(redis_server) as (url, doomed),
        routed_hubs(redis_server, 1) as [survivor],
    ):
        member, welcome = await join(url, "call")
        assert welcome["type"] == "welcome" and welcome["media"] == "routed"
        assert (await recv(member))["type"] == "media-offer"
        _, answer = await join(survivor.url, "call")
        assert answer["code"] == ErrorCode.ROOM_ELSEWHERE and answer["home"] == url

        doomed.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(ConnectionClosed):
            await recv(member)  # every member was a connection of the home: the room ended
        while True:
            websocket, answer = await join(survivor.url, "call")
            await websocket.close()
            if answer["type"] == "welcome":
                break
            # Until the dead home's presence expires, joins are still sent to it.
            assert answer["code"] == ErrorCode.ROOM_ELSEWHERE and answer["home"] == url
            await asyncio.sleep(HEARTBEAT / 2)
        assert time.monotonic() - killed_at < CONFIG.presence_ttl + 1.0


async def test_without_redis_joins_are_refused_rooms_go_on_and_it_recovers(
    redis_server: RedisServer,
):
    async with routed_hubs(redis_server, 2) as [first, second]:
        alice, _ = await join(first.url, "call")
        bob, welcome = await join(first.url, "call")
        await until(alice, "peer-joined")
        redis_server.stop()
        await wait_for(lambda: not placement(first).available)
        _, answer = await join(first.url, "new")
        assert answer["code"] == ErrorCode.CLUSTER_UNAVAILABLE
        # The room in place goes on: its signalling never needed Redis.
        await alice.send(json.dumps({"type": "relay", "to": welcome["peer_id"], "payload": 1}))
        assert (await until(bob, "relay"))["payload"] == 1

        redis_server.start()  # empty: the heartbeats write the homes back
        await wait_for(lambda: placement(first).available and placement(second).available)
        new, welcome = await join(first.url, "new")
        assert welcome["type"] == "welcome"
        _, answer = await join(second.url, "call")
        assert answer["code"] == ErrorCode.ROOM_ELSEWHERE and answer["home"] == first.url
        for websocket in (alice, bob, new):
            await websocket.close()


async def test_a_room_another_process_took_is_closed_here(redis_server: RedisServer):
    async with routed_hubs(redis_server, 1) as [server]:
        member, _ = await join(server.url, "call")
        # Another live process holds the room (this one was cut off past its presence).
        control = redis.Redis.from_url(redis_server.url, decode_responses=True)
        await control.set("blindhub:media-node:other", "ws://elsewhere.invalid")
        await control.set("blindhub:media-home:call", "other")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await recv(member)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1012, CLOSE_ROOM_MOVED)
        assert placement(server).rooms_lost_total == 1
        await control.aclose()


def test_advertise_needs_route_media_and_redis(capsys):
    assert main(["hub", "--advertise", "ws://hub1.internal:8765"]) == 2
    assert "--advertise needs --route-media and --redis" in capsys.readouterr().err
