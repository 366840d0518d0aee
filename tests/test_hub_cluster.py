"""Hub processes sharing rooms through a real Valkey server (tests/redis_server.py).

In-process hubs (several `HubServer`s on one event loop, each its own node) where a test
reads internals; real ``blindhub hub --redis`` subprocesses where a process must die or
be flooded on its own cores.
"""

import asyncio
import json
import logging
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from client.cli import main
from signaling.cluster import ClusterCore, JoinOp, RelayOp
from signaling.cluster_redis import ClusterConfig, ClusterLink, new_node_id, read_plan
from signaling.hub import Delivery, Limits
from signaling.protocol import ErrorCode, ErrorMessage, PeerId, Welcome
from signaling.server import HubServer, JsonLinesFormatter
from tests.conftest import wait_for
from tests.redis_server import RedisServer

TIMEOUT = 10.0
HEARTBEAT = 0.2


async def recv(websocket: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    return message


async def join(url: str, room: str) -> tuple[ClientConnection, dict[str, Any]]:
    websocket = await connect(url, compression=None)
    await websocket.send(json.dumps({"type": "join", "room": room}))
    return websocket, await recv(websocket)


async def relay(websocket: ClientConnection, to: str, payload: object) -> None:
    await websocket.send(json.dumps({"type": "relay", "to": to, "payload": payload}))


@asynccontextmanager
async def hubs(
    redis: RedisServer, count: int, limits: Limits | None = None
) -> AsyncIterator[list[HubServer]]:
    async with AsyncExitStack() as stack:
        servers = []
        for _ in range(count):
            link = ClusterLink(
                ClusterCore(new_node_id(), limits),
                ClusterConfig(redis.url, heartbeat_interval=HEARTBEAT),
            )
            servers.append(await stack.enter_async_context(HubServer(cluster=link)))
        yield servers


def available(server: HubServer) -> bool:
    assert server.cluster is not None
    return server.cluster.core.available


async def test_two_peers_on_two_processes_call_each_other(redis_server: RedisServer):
    async with hubs(redis_server, 2) as (one, two):
        alice, welcome_a = await join(one.url, "call")
        bob, welcome_b = await join(two.url, "call")
        assert welcome_a["peers"] == []
        assert welcome_b["peers"] == [welcome_a["peer_id"]]
        a, b = welcome_a["peer_id"], welcome_b["peer_id"]
        assert await recv(alice) == {"type": "peer-joined", "peer_id": b}
        await relay(bob, a, {"sdp": "offer", "n": 1.50})
        # Forwarded byte for byte, as one process does.
        assert await asyncio.wait_for(alice.recv(), TIMEOUT) == (
            f'{{"type":"relay","from":"{b}","payload":{{"sdp": "offer", "n": 1.5}}}}'
        )
        await relay(alice, b, "answer")
        assert await recv(bob) == {"type": "relay", "from": a, "payload": "answer"}
        await bob.close()
        assert await recv(alice) == {"type": "peer-left", "peer_id": b}
        await alice.close()
        metrics = one.cluster.metric_lines() if one.cluster else []
        assert "blindhub_cross_node_relays_received_total 1" in metrics
        assert "blindhub_cross_node_relays_sent_total 1" in metrics


async def test_a_relay_storm_across_three_processes_arrives_once_and_in_order(
    redis_server: RedisServer,
):
    count = 200
    limits = Limits(max_peers_per_room=3, rate_per_second=1e6, rate_burst=10**6)
    async with hubs(redis_server, 3, limits) as servers:
        peers = []
        for server in servers:
            websocket, welcome = await join(server.url, "storm")
            peers.append((websocket, welcome["peer_id"]))
        ids = [peer_id for _, peer_id in peers]
        for index, (websocket, _) in enumerate(peers):
            for _ in range(2 - index):  # each hears those who came after it
                assert (await recv(websocket))["type"] == "peer-joined"

        async def send(websocket: ClientConnection, me: str) -> None:
            for n in range(count):
                for other in ids:
                    if other != me:
                        await relay(websocket, other, n)

        async def hear(websocket: ClientConnection) -> dict[str, list[int]]:
            heard: dict[str, list[int]] = {}
            for _ in range(2 * count):
                message = await recv(websocket)
                heard.setdefault(message["from"], []).append(message["payload"])
            return heard

        results = await asyncio.gather(
            *(send(ws, me) for ws, me in peers), *(hear(ws) for ws, _ in peers)
        )
        for (_, me), heard in zip(peers, results[3:], strict=True):
            assert heard == {other: list(range(count)) for other in ids if other != me}
        for websocket, _ in peers:
            await websocket.close()


async def test_every_refusal_holds_across_processes(redis_server: RedisServer):
    limits = Limits(max_rooms=1, max_connections=2, rate_burst=3, rate_per_second=0.001)
    async with hubs(redis_server, 2, limits) as (one, two):
        alice, welcome = await join(one.url, "only")
        bob, _ = await join(two.url, "only")
        assert (await recv(alice))["type"] == "peer-joined"
        # room-full: the room's two seats are on two processes.
        carol, refusal = await join(two.url, "only")
        assert refusal["code"] == ErrorCode.ROOM_FULL
        # too-many-rooms: the one room of the cluster is on the other process.
        await carol.send(json.dumps({"type": "join", "room": "second"}))
        assert (await recv(carol))["code"] == ErrorCode.TOO_MANY_ROOMS
        await carol.send(json.dumps({"type": "leave"}))
        assert (await recv(carol))["code"] == ErrorCode.NOT_JOINED
        # rate-limited: carol's fourth message (the burst is 3).
        await carol.send(json.dumps({"type": "leave"}))
        assert (await recv(carol))["code"] == ErrorCode.RATE_LIMITED
        # hub-full: two connections on process two already.
        extra = await connect(two.url)
        await asyncio.wait_for(extra.wait_closed(), TIMEOUT)
        assert (extra.close_code, extra.close_reason) == (1013, ErrorCode.HUB_FULL)
        await carol.close()
        await alice.close()
        assert (await recv(bob))["type"] == "peer-left"
        dave, _ = await join(one.url, "only")
        assert (await recv(bob))["type"] == "peer-joined"
        # unknown-peer: an id of the cluster that is not in the room, and one that never was.
        await relay(dave, welcome["peer_id"], 1)  # alice left
        assert (await recv(dave))["code"] == ErrorCode.UNKNOWN_PEER
        # already-joined, then the parse errors and not-joined, answered by the process.
        await dave.send(json.dumps({"type": "join", "room": "only"}))
        assert (await recv(dave))["code"] == ErrorCode.ALREADY_JOINED
        erin = await connect(one.url)
        for frame, code in [
            ("{", ErrorCode.INVALID_JSON),
            ("[]", ErrorCode.NOT_AN_OBJECT),
        ]:
            await erin.send(frame)
            assert (await recv(erin))["code"] == code
        await erin.close()
        frank = await connect(one.url)
        for frame, code in [
            ('{"type":"dance"}', ErrorCode.UNKNOWN_TYPE),
            ('{"type":"join"}', ErrorCode.INVALID_FIELD),
            ('{"type":"join","room":"a b"}', ErrorCode.INVALID_ROOM),
        ]:
            await frank.send(frame)
            assert (await recv(frank))["code"] == code
        await frank.close()
        grace = await connect(two.url)  # bob's process has one free seat now
        # cluster-unavailable: Redis stops; a join is refused, with the documented code.
        redis_server.stop()
        await wait_for(lambda: not available(one))
        await grace.send(json.dumps({"type": "join", "room": "other"}))
        assert (await recv(grace))["code"] == ErrorCode.CLUSTER_UNAVAILABLE
        for websocket in (bob, dave, grace):
            await websocket.close()


async def test_a_retried_write_is_delivered_once(redis_server: RedisServer):
    async with hubs(redis_server, 2) as (one, two):
        alice, welcome_a = await join(one.url, "r")
        bob, welcome_b = await join(two.url, "r")
        a, b = welcome_a["peer_id"], welcome_b["peer_id"]
        await recv(alice)
        assert one.cluster is not None
        link = one.cluster
        frame = json.dumps({"type": "relay", "to": b, "payload": "once"})
        assert link.core.handle(a, frame, asyncio.get_running_loop().time()) == []
        [op] = link.core.take_ops(a)
        assert isinstance(op, RelayOp)
        # The same write twice, as redis-py's retry does when a reply is lost.
        for _ in range(2):
            link.submit(op)
        await relay(alice, b, "after")
        assert await recv(bob) == {"type": "relay", "from": a, "payload": "once"}
        assert await recv(bob) == {"type": "relay", "from": a, "payload": "after"}
        await wait_for(lambda: "blindhub_duplicates_dropped_total 1" in two_metrics(two))
        await alice.close()
        await bob.close()


def two_metrics(server: HubServer) -> list[str]:
    assert server.cluster is not None
    return server.cluster.metric_lines()


async def test_redis_stopped_and_restarted_mid_call(redis_server: RedisServer):
    async with hubs(redis_server, 2) as (one, two):
        alice, welcome_a = await join(one.url, "call")
        bob, welcome_b = await join(two.url, "call")
        a, b = welcome_a["peer_id"], welcome_b["peer_id"]
        await recv(alice)
        carol, _ = await join(one.url, "local")
        dave, welcome_d = await join(one.url, "local")
        await recv(carol)
        await relay(alice, b, 1)
        assert (await recv(bob))["payload"] == 1

        redis_server.stop()
        await wait_for(lambda: not available(one) and not available(two))
        # New joins are refused; what one process can do alone goes on.
        erin, refusal = await join(two.url, "new")
        assert refusal["code"] == ErrorCode.CLUSTER_UNAVAILABLE
        await relay(carol, welcome_d["peer_id"], "local")
        assert (await recv(dave))["payload"] == "local"
        await relay(alice, b, 2)
        assert (await recv(alice))["code"] == ErrorCode.CLUSTER_UNAVAILABLE

        redis_server.start()  # empty: it had no persistence
        await wait_for(lambda: available(one) and available(two))
        for n in (3, 4, 5):
            await relay(alice, b, n)
        await relay(bob, a, "back")
        got = [await recv(bob) for _ in range(3)]
        assert [m.get("payload") for m in got] == [3, 4, 5], got
        assert (await recv(alice))["payload"] == "back"
        await erin.send(json.dumps({"type": "join", "room": "call"}))
        assert (await recv(erin))["code"] == ErrorCode.ROOM_FULL  # the call was restored
        for websocket in (alice, bob, carol, dave, erin):
            await websocket.close()


# -- real processes


@asynccontextmanager
async def hub_process(redis: RedisServer, *flags: str) -> AsyncIterator[tuple[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client.cli", "hub", "--port", "0", "--quiet",
        "--redis", redis.url, "--heartbeat", str(HEARTBEAT), *flags,
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


@pytest.mark.slow
async def test_a_killed_process_is_noticed_and_its_peers_leave(redis_server: RedisServer):
    flags = ("--max-peers-per-room", "3")
    async with AsyncExitStack() as stack:
        processes = [
            await stack.enter_async_context(hub_process(redis_server, *flags)) for _ in range(3)
        ]
        (url1, doomed), (url2, _), (url3, _) = processes
        alice, welcome_a = await join(url1, "call")
        bob, welcome_b = await join(url2, "call")
        carol, welcome_c = await join(url3, "call")
        a, b, c = welcome_a["peer_id"], welcome_b["peer_id"], welcome_c["peer_id"]
        assert (await recv(bob))["peer_id"] == c
        await relay(alice, b, "mid-call")
        assert (await recv(bob))["payload"] == "mid-call"
        doomed.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert await recv(bob) == {"type": "peer-left", "peer_id": a}
        assert await recv(carol) == {"type": "peer-left", "peer_id": a}
        # The bound: 4 heartbeats of silence, one more until a look, and delivery.
        bound = ClusterConfig("redis://", heartbeat_interval=HEARTBEAT).failure_detection_bound
        assert time.monotonic() - killed_at < bound + 1.0
        await relay(bob, c, "still here")
        assert await recv(carol) == {"type": "relay", "from": b, "payload": "still here"}
        # The dead process's seat is free again.
        _dave, welcome_d = await join(url2, "call")
        assert welcome_d["peers"] == [b, c]


FLOODER = """
import asyncio, json, sys
from websockets.asyncio.client import connect
async def main(url, count):
    sink = await connect(url, compression=None)
    await sink.send('{"type":"join","room":"flood"}')
    sink_id = json.loads(await sink.recv())["peer_id"]
    source = await connect(url, compression=None)
    await source.send('{"type":"join","room":"flood"}')
    await source.recv()
    frame = json.dumps({"type": "relay", "to": sink_id, "payload": "x" * 1000})
    async def drain():
        for _ in range(count):
            await sink.recv()
    reader = asyncio.create_task(drain())
    print("flooding", flush=True)
    for _ in range(count):
        await source.send(frame)
    await reader
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.slow
async def test_a_flood_on_one_process_does_not_slow_relays_between_the_others(
    redis_server: RedisServer,
):
    flags = ("--rate-per-second", "1e9", "--rate-burst", "1000000000")
    async with AsyncExitStack() as stack:
        (url1, _), (url2, _), (url3, _) = [
            await stack.enter_async_context(hub_process(redis_server, *flags)) for _ in range(3)
        ]
        bob, welcome_b = await join(url2, "quiet")
        carol, welcome_c = await join(url3, "quiet")
        await recv(bob)
        b, c = welcome_b["peer_id"], welcome_c["peer_id"]

        async def round_trips(count: int) -> list[float]:
            times = []
            for n in range(count):
                started = time.perf_counter()
                await relay(bob, c, n)
                assert (await recv(carol))["payload"] == n
                await relay(carol, b, n)
                assert (await recv(bob))["payload"] == n
                times.append(time.perf_counter() - started)
            return times

        quiet = await round_trips(100)
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOODER, url1, "200000", stdout=asyncio.subprocess.PIPE
        )
        assert flooder.stdout is not None
        assert await asyncio.wait_for(flooder.stdout.readline(), TIMEOUT) == b"flooding\n"
        flooded = await round_trips(100)
        still_flooding = flooder.returncode is None
        flooder.kill()
        await flooder.wait()
        assert still_flooding, "the flood ended before the measurement"
        # The flooded process shares the machine's two cores, not the others' event loops.
        assert statistics.median(flooded) < 3 * statistics.median(quiet) + 0.02, (
            statistics.median(quiet),
            statistics.median(flooded),
        )


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--redis", "http://example.invalid"], "--redis:"),
        (["--redis", "redis://127.0.0.1:1", "--heartbeat", "0"], "heartbeat must be positive"),
    ],
)
def test_a_bad_redis_url_or_heartbeat_is_a_usage_error(flags, reason, capsys):
    assert main(["hub", "--port", "0", *flags]) == 2
    assert reason in capsys.readouterr().err


def test_the_in_memory_hub_does_not_load_the_redis_client():
    code = "import sys, client.hub_command, signaling.server; print('redis' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout == "False\n", result.stderr


@pytest.mark.slow
async def test_a_real_call_between_peers_on_two_hub_processes(redis_server: RedisServer, tmp_path):
    async with AsyncExitStack() as stack:
        (url1, _), (url2, _) = [
            await stack.enter_async_context(hub_process(redis_server)) for _ in range(2)
        ]

        async def call(url: str, name: str) -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "client.cli", "call", "room1", "--hub", url,
                "--name", name, "--home", str(tmp_path / name), "--verify", "tofu",
                "--duration", "2", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip

        alice, bob = await call(url1, "alice"), await call(url2, "bob")
        results = await asyncio.wait_for(asyncio.gather(alice.communicate(), bob.communicate()), 90)
        for process, (out, err) in zip((alice, bob), results, strict=True):
            assert process.returncode == 0, err.decode()
            assert "end-to-end encrypted (" in out.decode(), out.decode()


async def test_a_join_abandoned_while_queued_does_not_stop_the_writer(redis_server: RedisServer):
    # A connection task cancelled while its join waits in the writer's queue leaves a cancelled
    # future behind; answering it must not end the writer that serves every connection (which
    # would leave every later join, and the hub's own close, waiting for good).
    async with asyncio.timeout(TIMEOUT), hubs(redis_server, 1) as [server]:
        link = server.cluster
        assert link is not None
        abandoned = asyncio.create_task(link._run_join(JoinOp(PeerId("abandoned"), "room", 0)))
        await asyncio.sleep(0)  # it has queued its join and awaits the reply
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        websocket, welcome = await join(server.url, "after")
        assert welcome["type"] == "welcome"
        await websocket.close()


class Records(logging.Handler):
    """The hub's log records, each with whether its process served joins when it was
    written."""

    def __init__(self, link: ClusterLink) -> None:
        super().__init__()
        self.link = link
        self.seen: list[tuple[str, dict[str, Any], bool]] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        self.records.append(record)
        self.seen.append((record.getMessage(), fields, self.link.core.available))

    def events(self, name: str) -> list[tuple[dict[str, Any], bool]]:
        return [(fields, available) for event, fields, available in self.seen if event == name]


class DeliveryFailsOnce(HubServer):
    """A hub whose first delivery of an ``unknown-peer`` error raises: a fault in what the
    cluster's writer runs for a reply (it delivers the refusals Redis answers), which the
    writer cannot foresee."""

    failed = False

    def deliver(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            message = delivery.message
            refusal = isinstance(message, ErrorMessage) and message.code is ErrorCode.UNKNOWN_PEER
            if refusal and not self.failed:
                self.failed = True
                raise RuntimeError("injected delivery fault")
        super().deliver(deliveries)


class WelcomeFails(HubServer):
    """A hub whose delivery of a welcome to room "faulty" raises: a fault of the hub's own
    while it serves one connection's messages in order (``_serve``)."""

    def deliver(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            if isinstance(delivery.message, Welcome) and delivery.message.room == "faulty":
                raise RuntimeError("injected delivery fault")
        super().deliver(deliveries)


async def test_a_fault_while_serving_a_member_closes_it_with_1011_and_is_logged(
    redis_server: RedisServer,
):
    async with (
        asyncio.timeout(TIMEOUT),
        logged_link(redis_server, "serve") as (link, records),
        WelcomeFails(cluster=link, logger=logging.getLogger("blindhub.test.serve")) as server,
    ):
        websocket = await connect(server.url, compression=None)
        await websocket.send(json.dumps({"type": "join", "room": "faulty"}))
        await asyncio.wait_for(websocket.wait_closed(), TIMEOUT)
        assert (websocket.close_code, websocket.close_reason) == (1011, "")
        [record] = [r for r in records.records if r.getMessage() == "connection-failed"]
        assert record.exc_info is not None
        assert str(record.exc_info[1]) == "injected delivery fault"
        # The others are served on.
        alice, welcome = await join(server.url, "calm")
        assert welcome["type"] == "welcome"
        await alice.close()


@asynccontextmanager
async def logged_link(redis: RedisServer, name: str) -> AsyncIterator[tuple[ClusterLink, Records]]:
    logger = logging.getLogger(f"blindhub.test.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    link = ClusterLink(
        ClusterCore(new_node_id(), logger=logger),
        ClusterConfig(redis.url, heartbeat_interval=HEARTBEAT),
        logger=logger,
    )
    records = Records(link)
    logger.addHandler(records)
    try:
        yield link, records
    finally:
        logger.removeHandler(records)


async def test_a_read_of_streams_whose_peers_left_meanwhile_reads_the_others(
    redis_server: RedisServer,
):
    # The reader takes the dirty streams in chunks, one after the other; a peer of a later
    # chunk may leave while an earlier one is read (found by the benchmark: a KeyError that
    # stopped the reader until its restart).
    async with (
        logged_link(redis_server, "read") as (link, _),
        HubServer(cluster=link) as server,
    ):
        alice, _ = await join(server.url, "call")
        gone = PeerId("gone-meanwhile")
        await link._read([gone])
        await link._read([gone, *link._positions])  # no KeyError, and the rest is read
        await alice.close()


async def test_a_fault_in_the_writer_is_logged_refuses_joins_and_the_writer_restarts(
    redis_server: RedisServer,
):
    async with (
        asyncio.timeout(TIMEOUT),
        logged_link(redis_server, "writer") as (link, records),
        DeliveryFailsOnce(cluster=link) as one,
        hubs(redis_server, 1) as [two],
    ):
        alice, welcome_a = await join(one.url, "r")
        bob, welcome_b = await join(two.url, "r")
        b = welcome_b["peer_id"]
        await recv(alice)
        # Redis answers unknown-peer; delivering that refusal raises inside the writer.
        await relay(alice, "nobody", 1)
        await relay(alice, b, "after the fault")
        await wait_for(lambda: bool(records.events("cluster-task-failed")))
        [(fields, serving)] = records.events("cluster-task-failed")
        assert fields["node"] == link.node
        assert fields["task"] == "writer"
        assert fields["error"] == "RuntimeError: injected delivery fault"
        assert not serving  # joins were refused with cluster-unavailable from then on
        [record] = [r for r in records.records if r.getMessage() == "cluster-task-failed"]
        line = json.loads(JsonLinesFormatter({"node": link.node}).format(record))
        assert "raise RuntimeError" in line["traceback"]
        assert "blindhub_cluster_task_failures_total 1" in link.metric_lines()
        # Nothing after the fault is lost, and the restarted writer serves joins again.
        assert await recv(bob) == {
            "type": "relay", "from": welcome_a["peer_id"], "payload": "after the fault"
        }  # fmt: skip
        await wait_for(lambda: link.core.available)
        carol, welcome_c = await join(one.url, "s")
        assert welcome_c["type"] == "welcome"
        await relay(alice, b, "again")
        assert (await recv(bob))["payload"] == "again"
        for websocket in (alice, bob, carol):
            await websocket.close()


async def test_a_script_that_redis_fails_refuses_that_relay_and_the_process_recovers(
    redis_server: RedisServer,
):
    async with (
        asyncio.timeout(TIMEOUT),
        logged_link(redis_server, "script") as (link, records),
        HubServer(cluster=link) as one,
        hubs(redis_server, 1) as [two],
    ):
        alice, _ = await join(one.url, "r")
        bob, welcome_b = await join(two.url, "r")
        b = welcome_b["peer_id"]
        await recv(alice)
        # A key of the wrong type where bob's stream belongs: the relay script fails in Redis.
        control = redis.Redis.from_url(redis_server.url)
        await control.delete(f"blindhub:inbox:{b}")
        await control.set(f"blindhub:inbox:{b}", "not a stream")
        await relay(alice, b, "refused")
        assert (await recv(alice))["code"] == ErrorCode.CLUSTER_UNAVAILABLE
        [(fields, _)] = records.events("redis-unavailable")[:1]
        assert fields["node"] == link.node
        assert "WRONGTYPE" in fields["error"]
        await control.delete(f"blindhub:inbox:{b}")
        await control.aclose()
        await wait_for(lambda: link.core.available)
        await relay(alice, b, "delivered")
        assert (await recv(bob))["payload"] == "delivered"
        for websocket in (alice, bob):
            await websocket.close()


async def test_a_reader_that_stops_on_one_process_is_closed_there_and_others_go_on(
    redis_server: RedisServer,
):
    limits = Limits(
        rate_per_second=1e6, rate_burst=1000, max_buffered_bytes=128 * 1024, close_timeout=0.2
    )
    async with asyncio.timeout(4 * TIMEOUT), hubs(redis_server, 2, limits) as (one, two):
        # Bystanders on both processes, in a room that crosses them too.
        carol, welcome_c = await join(one.url, "calm")
        dave, welcome_d = await join(two.url, "calm")
        await recv(carol)
        c, d = welcome_c["peer_id"], welcome_d["peer_id"]
        # The reader, on process two, pushes back at once (a small buffer, a one-frame queue)
        # and never reads; its sender floods it from process one.
        sock = socket.create_connection(two.address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader = await connect(two.url, sock=sock, max_queue=1, max_size=None, close_timeout=0.2)
        await reader.send('{"type":"join","room":"slow"}')
        reader_id = (await recv(reader))["peer_id"]
        sender, _ = await join(one.url, "slow")
        frame = json.dumps({"type": "relay", "to": reader_id, "payload": "y" * 60_000})
        closes = two.hub.metrics.closes_total
        peak = sent = 0
        while not closes[1008]:
            await sender.send(frame)
            sent += 1
            # A yield, not a wait: both processes run between two sends, so every buffer size
            # process two reaches is sampled.
            await asyncio.sleep(0)
            peak = max(peak, two.buffered_bytes())
            if sent % 10 == 0:
                await relay(carol, d, sent)
                assert (await recv(dave))["payload"] == sent
        # Closed on its own process with the close code of one process; that process's
        # buffers never held more than one client's bound.
        assert closes[1008] == 1 and closes[1006] == 0
        assert peak <= limits.max_buffered_bytes
        assert "blindhub_stream_overflows_total 0" in two_metrics(two)
        # The sender hears it left; the bystanders on both processes were never held up.
        left = {"type": "peer-left", "peer_id": reader_id}
        while await recv(sender) != left:
            pass
        await relay(dave, c, "after")
        assert (await recv(carol))["payload"] == "after"
        for websocket in (carol, dave, sender, reader):
            await websocket.close()


@pytest.mark.slow
async def test_a_stream_past_its_bound_closes_its_recipient_and_loses_nothing_silently(
    redis_server: RedisServer,
):
    # Process two stops (SIGSTOP) while a peer of process one floods a peer of two past the
    # stream's bound (1,024 entries: twice the burst); when it resumes, its peer gets what
    # the stream held, in order, then a close: never a relay after a gap.
    flags = ("--rate-per-second", "1e9", "--rate-burst", "512", "--heartbeat", "1")
    bound = 1024
    async with AsyncExitStack() as stack:
        (url1, _), (url2, paused) = [
            await stack.enter_async_context(hub_process(redis_server, *flags)) for _ in range(2)
        ]
        recipient, welcome_r = await join(url2, "flood")
        sender, _ = await join(url1, "flood")
        assert (await recv(recipient))["type"] == "peer-joined"
        bystander, welcome_b = await join(url2, "calm")
        partner, _ = await join(url1, "calm")
        await recv(bystander)
        control = redis.Redis.from_url(redis_server.url)
        stream = f"blindhub:inbox:{welcome_r['peer_id']}"
        paused.send_signal(signal.SIGSTOP)
        try:
            # In chunks under the burst, each confirmed written (process one answers the relay
            # to nobody after the chunk's relays); between two, the bucket refills, which
            # takes a tick of uvloop's clock (it counts milliseconds). A pause for the rate
            # limit, not for an order.
            for chunk in range(0, 1200, 200):
                for n in range(chunk, chunk + 200):
                    await relay(sender, welcome_r["peer_id"], n)
                await relay(sender, "nobody", None)
                reply = await recv(sender)
                assert reply["code"] == ErrorCode.UNKNOWN_PEER, (chunk, reply)
                await asyncio.sleep(0.002)
            # The stream stopped growing at its bound and one overflow mark.
            assert await control.xlen(stream) == bound + 1
        finally:
            paused.send_signal(signal.SIGCONT)
        heard = []
        with pytest.raises(ConnectionClosed):
            while True:
                heard.append((await recv(recipient))["payload"])
        assert (recipient.close_code, recipient.close_reason) == (1008, "slow-reader")
        assert heard == list(range(len(heard))) and len(heard) >= bound - 2
        assert await recv(sender) == {"type": "peer-left", "peer_id": welcome_r["peer_id"]}
        # The process's other peers were untouched.
        await relay(partner, welcome_b["peer_id"], "still here")
        assert (await recv(bystander))["payload"] == "still here"
        await control.aclose()


async def metric(url: str, name: str) -> float:
    """One value of a hub process's /metrics."""
    http = url.replace("ws://", "http://") + "/metrics"
    with await asyncio.to_thread(urllib.request.urlopen, http, timeout=TIMEOUT) as response:
        text = response.read().decode()
    [value] = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)


async def node_of(control: redis.Redis, room: str, peer: str) -> str:
    node = await control.hget(f"blindhub:where:{room}", peer)
    assert isinstance(node, bytes)
    return node.decode()


@pytest.mark.slow
async def test_a_process_stalled_for_less_than_its_stated_tolerance_is_not_reaped(
    redis_server: RedisServer,
):
    heartbeat = 0.5
    config = ClusterConfig("redis://", heartbeat_interval=heartbeat)
    # Longer than a heartbeat, and than the 2 heartbeats a stall could last before the
    # reaper had its margin; half a heartbeat short of the stated tolerance (3).
    stall = config.stall_tolerance - heartbeat / 2
    assert stall > 2 * heartbeat
    flags = ("--heartbeat", str(heartbeat))
    async with AsyncExitStack() as stack:
        (url1, _), (url2, stalled) = [
            await stack.enter_async_context(hub_process(redis_server, *flags)) for _ in range(2)
        ]
        alice, welcome_a = await join(url1, "call")
        bob, welcome_b = await join(url2, "call")
        a, b = welcome_a["peer_id"], welcome_b["peer_id"]
        await recv(alice)
        control = redis.Redis.from_url(redis_server.url)
        node = await node_of(control, "call", b)
        stalled.send_signal(signal.SIGSTOP)
        await asyncio.sleep(stall)  # the stall itself
        stalled.send_signal(signal.SIGCONT)
        seconds, micros = await control.time()
        resumed = seconds * 1000 + micros // 1000

        async def beat() -> float:
            return await control.zscore("blindhub:beats", node) or 0.0

        # Once it has beaten again, no reaper can take it for dead for this stall.
        deadline = time.monotonic() + TIMEOUT
        while await beat() < resumed:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert await metric(url1, "blindhub_nodes_reaped_total") == 0
        await relay(alice, b, "through")
        assert await recv(bob) == {"type": "relay", "from": a, "payload": "through"}
        await relay(bob, a, "back")
        assert await recv(alice) == {"type": "relay", "from": b, "payload": "back"}
        await control.aclose()


@pytest.mark.slow
async def test_a_process_taken_for_dead_closes_its_peers_when_it_resumes_and_serves_again(
    redis_server: RedisServer,
):
    async with AsyncExitStack() as stack:
        (url1, _), (url2, stalled) = [
            await stack.enter_async_context(hub_process(redis_server)) for _ in range(2)
        ]
        alice, _ = await join(url1, "call")
        bob, welcome_b = await join(url2, "call")
        await recv(alice)
        stalled.send_signal(signal.SIGSTOP)
        try:
            # Stopped past the bound: the other process reaps it.
            assert await recv(alice) == {"type": "peer-left", "peer_id": welcome_b["peer_id"]}
        finally:
            stalled.send_signal(signal.SIGCONT)
        # When it resumes, its peers are closed as if it had died (their partners were told
        # they left), so their clients reconnect as new peers.
        with pytest.raises(ConnectionClosed):
            await recv(bob)
        assert (bob.close_code, bob.close_reason) == (1012, "node-reaped")
        # And it serves again, after at most a heartbeat of cluster-unavailable.
        deadline = time.monotonic() + TIMEOUT
        while True:
            carol, answer = await join(url2, "again")
            if answer["type"] == "welcome":
                break
            assert answer["code"] == ErrorCode.CLUSTER_UNAVAILABLE
            assert time.monotonic() < deadline
            await carol.close()
        dave, welcome_d = await join(url1, "again")
        assert await recv(carol) == {"type": "peer-joined", "peer_id": welcome_d["peer_id"]}
        await relay(carol, welcome_d["peer_id"], "hello")
        assert (await recv(dave))["payload"] == "hello"


async def test_forged_stream_entries_are_dropped_and_the_reader_goes_on(
    redis_server: RedisServer,
):
    async with asyncio.timeout(TIMEOUT), hubs(redis_server, 2) as (one, two):
        alice, welcome_a = await join(one.url, "r")
        bob, welcome_b = await join(two.url, "r")
        a, b = welcome_a["peer_id"], welcome_b["peer_id"]
        await recv(alice)
        # What one process (or anyone with Redis) could write into bob's stream.
        control = redis.Redis.from_url(redis_server.url)
        stream = f"blindhub:inbox:{b}"
        for forged in [
            {"junk": "1"},
            {"k": "r", "f": a, "r": "r", "s": "x", "d": "1"},
            {"k": "r", "f": a, "r": "r", "s": str(2**53), "d": "1"},  # would silence alice
            {"k": "r", "f": a, "r": "r", "s": "9", "d": "x" * (Limits().max_message_bytes + 1)},
        ]:
            await control.xadd(stream, forged)  # type: ignore[arg-type]
        await relay(alice, b, "real")
        assert await recv(bob) == {"type": "relay", "from": a, "payload": "real"}
        assert "blindhub_stream_entries_rejected_total 4" in two_metrics(two)
        assert "blindhub_cluster_task_failures_total 0" in two_metrics(two)
        await control.aclose()
        await alice.close()
        await bob.close()


async def test_joins_racing_for_the_last_seats_from_three_processes_get_exactly_them(
    redis_server: RedisServer,
):
    async with asyncio.timeout(TIMEOUT), hubs(redis_server, 3) as servers:
        sockets = [await connect(server.url) for server in servers for _ in range(4)]
        frame = json.dumps({"type": "join", "room": "contested"})
        await asyncio.gather(*(websocket.send(frame) for websocket in sockets))
        answers = [await recv(websocket) for websocket in sockets]
        welcomes = [answer for answer in answers if answer["type"] == "welcome"]
        assert len(welcomes) == 2
        assert sorted(len(w["peers"]) for w in welcomes) == [0, 1]
        assert [a["code"] for a in answers if a["type"] == "error"] == [ErrorCode.ROOM_FULL] * 10
        for websocket in sockets:
            await websocket.close()


async def test_a_process_taken_for_dead_admits_no_join_before_it_knows(
    redis_server: RedisServer,
):
    # A heartbeat long enough that this process does not beat during the test: Redis has
    # reaped it (as another process would) and it does not know yet.
    link = ClusterLink(
        ClusterCore(new_node_id()), ClusterConfig(redis_server.url, heartbeat_interval=60)
    )
    async with asyncio.timeout(TIMEOUT), HubServer(cluster=link) as server:
        control = redis.Redis.from_url(redis_server.url)
        await control.zrem("blindhub:beats", link.node)
        await control.set(f"blindhub:reaped:{link.node}", "1")
        refused, answer = await join(server.url, "r")
        assert answer["code"] == ErrorCode.CLUSTER_UNAVAILABLE
        assert await control.hlen("blindhub:where:r") == 0
        await refused.close()
        await control.aclose()


def test_one_read_of_the_streams_holds_a_bounded_number_of_payload_bytes():
    for max_payload in (1, 1024, 64 * 1024, 16 * 1024 * 1024, 128 * 1024 * 1024):
        for dirty in (1, 7, 100, 512, 10_000):
            streams, count = read_plan(dirty, max_payload)
            assert 1 <= streams <= dirty and 1 <= count <= 256
            # Within the budget, or one entry at a time when a single one is larger.
            assert streams * count * max_payload <= max(64 * 1024 * 1024, max_payload)
    assert read_plan(1, 64 * 1024) == (1, 256)  # one busy stream: full batches
    assert read_plan(10_000, 256) == (512, 256)  # small payloads: as before


async def test_a_persistent_redis_back_after_an_outage_longer_than_the_bound_reaps_no_one(
    tmp_path,
):
    # Redis comes back with the beats it had: every process looks silent for the whole
    # outage, and the first to beat must not take the others for dead before they beat.
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    try:
        async with asyncio.timeout(4 * TIMEOUT), hubs(server, 2) as (one, two):
            alice, welcome_a = await join(one.url, "call")
            bob, welcome_b = await join(two.url, "call")
            a, b = welcome_a["peer_id"], welcome_b["peer_id"]
            await recv(alice)
            server.stop()
            await wait_for(lambda: not available(one) and not available(two))
            bound = ClusterConfig("redis://", heartbeat_interval=HEARTBEAT).failure_detection_bound
            await asyncio.sleep(bound)  # the outage itself
            server.start()
            await wait_for(lambda: available(one) and available(two))
            await relay(alice, b, "after")
            assert await recv(bob) == {"type": "relay", "from": a, "payload": "after"}
            await relay(bob, a, "back")
            assert await recv(alice) == {"type": "relay", "from": b, "payload": "back"}
            for server_ in (one, two):
                assert "blindhub_nodes_reaped_total 0" in two_metrics(server_)
            await alice.close()
            await bob.close()
    finally:
        server.kill()
