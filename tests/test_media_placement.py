"""Routing hubs (``--route-media``) sharing a real Valkey server: where a routed room lives.

In-process hubs (several `HubServer`s on one event loop, each its own node) where a test reads
internals; a real ``blindhub hub --route-media --redis`` subprocess where a process must die.
Members are plain aiortc peers (tests/test_media_server.py) or bare websockets where no media
is needed."""

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from client.cli import main
from client.experiment.analysis import dominant_frequency
from client.group_call import GroupCall
from signaling.cluster_redis import ClusterConfig
from signaling.hub import Limits
from signaling.media_placement import CLOSE_ROOM_MOVED, RoomPlacement
from signaling.media_server import MediaServer
from signaling.protocol import CLOSE_HOME_LOST, ErrorCode, PeerLeft
from signaling.server import HubServer
from tests.conftest import wait_for
from tests.redis_server import RedisServer
from tests.test_group_call import TONES, heard_everyone, member
from tests.test_hub_cluster import hub_process, join, recv
from tests.test_media_server import Peer, metric, metrics

pytestmark = pytest.mark.slow

HEARTBEAT = 0.2
CONFIG = ClusterConfig("redis://", heartbeat_interval=HEARTBEAT)


async def until(websocket: ClientConnection, kind: str) -> dict[str, Any]:
    """The first message of type ``kind`` (a media-offer comes when the hub has made it, so
    its place among the others is not fixed)."""
    while (message := await recv(websocket))["type"] != kind:
        pass
    return message


@asynccontextmanager
async def routed_hubs(
    redis_server: RedisServer, count: int, limits: Limits | None = None
) -> AsyncIterator[list[HubServer]]:
    async with AsyncExitStack() as stack:
        servers = []
        for _ in range(count):
            media = MediaServer(limits or Limits(max_peers_per_room=4))
            config = ClusterConfig(redis_server.url, heartbeat_interval=HEARTBEAT)
            server = HubServer(media=media, placement=RoomPlacement(media, config))
            servers.append(await stack.enter_async_context(server))
        yield servers


def placement(server: HubServer) -> RoomPlacement:
    assert server.placement is not None
    return server.placement


def rooms(server: HubServer) -> dict[str, tuple[str, ...]]:
    assert server.media is not None
    return {room: tuple(members) for room, members in server.media.hub.rooms().items()}


async def test_a_member_on_another_process_is_served_by_the_rooms_home(
    redis_server: RedisServer,
):
    async with routed_hubs(redis_server, 2) as [home, other]:
        alice = Peer(home.url, 440)
        bob = Peer(other.url, 550)  # a balancer sent it to the other process
        try:
            await alice.join("call")
            await bob.join("call")
            a, b = alice.welcome().peer_id, bob.welcome().peer_id
            assert bob.welcome().peers == (a,)
            # The room lives on its first member's process alone; the other passes frames.
            assert rooms(home) == {"call": (a, b)} and rooms(other) == {}
            text = await metrics(other)
            assert metric(text, "blindhub_forwarded_members") == 1
            assert metric(text, "blindhub_forwarded_members_total") == 1
            assert metric(text, "blindhub_redis_available") == 1

            def heard() -> bool:
                return len(alice.audio_from(b)) >= 30000 and len(bob.audio_from(a)) >= 30000

            await wait_for(heard, timeout=30)  # the media flows to the home directly
            assert abs(dominant_frequency(alice.audio_from(b), 48000) - 550) < 5
            assert abs(dominant_frequency(bob.audio_from(a), 48000) - 440) < 5

            # Leaving ends the forwarding: the connection is in no room on its own process,
            # and its next room is placed anew (here, on that process).
            await bob.ws.send(json.dumps({"type": "leave"}))
            await wait_for(lambda: any(isinstance(m, PeerLeft) for m in alice.messages))
            await wait_for(lambda: placement(other).forwarding == 0)
            await bob.ws.send(json.dumps({"type": "join", "room": "next"}))
            await wait_for(lambda: "next" in rooms(other))
        finally:
            await alice.close()
            await bob.close()


async def test_an_encrypted_group_call_with_members_on_two_processes(redis_server: RedisServer):
    async with routed_hubs(redis_server, 2, Limits(max_peers_per_room=8)) as [home, other]:
        calls = [GroupCall(member(home, "alice"))]
        tasks = [asyncio.create_task(calls[0].run())]
        try:
            await wait_for(lambda: "group" in rooms(home), timeout=20)
            # The room lives where its first member is; the others reach the other process.
            calls += [GroupCall(member(other, name)) for name in ("bob", "carol")]
            tasks += [asyncio.create_task(call.run()) for call in calls[1:]]
            await wait_for(lambda: all(heard_everyone(call, 2) for call in calls), timeout=60)
            codes = {call.stats.security_code for call in calls}
        finally:
            for call in calls:
                call.hangup("done")
        stats = await asyncio.gather(*tasks)
        assert len(codes) == 1 and None not in codes
        for call, summary in zip(calls, stats, strict=True):
            assert len(summary.members) == 2
            for peer, media in call.received.items():
                name = summary.members[peer].name
                assert name is not None
                heard = dominant_frequency(media.samples, media.sample_rate)
                assert abs(heard - TONES[name]) < 5, (call.config.name, name, heard)
        assert placement(other).forwarded_total == 2


async def test_first_joins_at_once_on_two_processes_agree_on_one_home(redis_server: RedisServer):
    async with routed_hubs(redis_server, 2) as servers:
        names = [f"race{i}" for i in range(8)]
        answers = await asyncio.gather(
            *(join(server.url, room) for room in names for server in servers)
        )
        assert all(answer["type"] == "welcome" for _, answer in answers)
        for room in names:
            homes = [server for server in servers if room in rooms(server)]
            assert len(homes) == 1 and len(rooms(homes[0])[room]) == 2, room
        for websocket, _ in answers:
            await websocket.close()


async def test_the_homes_answers_and_closes_reach_a_forwarded_member_unchanged(
    redis_server: RedisServer,
):
    limits = Limits(max_peers_per_room=4, join_timeout=1.0)
    async with routed_hubs(redis_server, 2, limits) as [home, other]:
        alice, _ = await join(home.url, "call")
        bob, welcome = await join(other.url, "call")
        assert welcome["type"] == "welcome"
        await bob.send("{")
        assert (await until(bob, "error"))["code"] == ErrorCode.INVALID_JSON
        await bob.send(json.dumps({"type": "relay", "to": "nobody", "payload": 1}))
        assert (await until(bob, "error"))["code"] == ErrorCode.UNKNOWN_PEER
        # It never answers its media-offer: the home closes it as one that never joins.
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await recv(bob)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "join-timeout")
        await alice.close()


def routed_process(redis_server: RedisServer) -> AbstractAsyncContextManager[tuple[str, Any]]:
    """A real ``blindhub hub --route-media --redis`` process (the cluster tests' helper)."""
    return hub_process(redis_server, "--route-media")


async def test_a_dead_home_ends_its_rooms_which_another_process_then_takes(
    redis_server: RedisServer,
):
    async with (
        routed_process(redis_server) as (url, doomed),
        routed_hubs(redis_server, 1) as [survivor],
    ):
        member, welcome = await join(url, "call")
        assert welcome["type"] == "welcome" and welcome["media"] == "routed"
        forwarded, welcome = await join(survivor.url, "call")
        assert welcome["type"] == "welcome" and len(welcome["peers"]) == 1

        doomed.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(ConnectionClosed):
            while True:
                await recv(member)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await recv(forwarded)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1012, CLOSE_HOME_LOST)
        while True:
            websocket, answer = await join(survivor.url, "call")
            await websocket.close()
            if answer["type"] == "welcome":
                break
            # Until the dead home's presence expires, the room is still placed there.
            assert answer["code"] == ErrorCode.CLUSTER_UNAVAILABLE
            await asyncio.sleep(HEARTBEAT / 2)
        assert answer["peers"] == []
        assert time.monotonic() - killed_at < CONFIG.presence_ttl + 1.0
        assert placement(survivor).home_unreachable_total >= 1


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
        _, answer = await join(second.url, "call")  # the room's home is written back
        assert answer["type"] == "welcome" and len(answer["peers"]) == 2
        assert len(rooms(first)["call"]) == 3
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


def test_a_routing_hub_with_a_bad_redis_url_is_a_usage_error(capsys):
    assert main(["hub", "--route-media", "--redis", "nope://redis.internal"]) == 2
    assert "blindhub hub: --redis: " in capsys.readouterr().err
