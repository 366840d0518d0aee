"""Cluster benchmark: ``python -m tests.bench.hub --redis [--quick]``.

Starts a Valkey server (tests/redis_server.py) and 1, 2 or 3 ``blindhub hub --redis``
subprocesses, and from this process measures, in one run:

- relay latency p50/p99 at about 5,000 messages/s over 100 pairs, both peers of each pair on
  one process (same-process) against the two on two processes (cross-process);
- relay throughput of 20 pairs sending as fast as their receivers keep up (clients that cost
  little per message: tests/bench/load.py), with 1 process, and with 2
  (pairs kept on one process each, as a load balancer with room affinity would place them,
  and pairs split across the two);
- memory per idle joined connection of a clustered process (RSS difference);
- how it grows with 1, 2 and 3 processes: connections opened and joined per second, relays
  per second with pairs split across processes, and the CPU each part used meanwhile (the
  hubs, Valkey, this load generator), which shows what saturates first.
"""

import asyncio
import itertools
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from websockets.asyncio.client import ClientConnection

from tests.bench.hub import (
    HUB_FLAGS,
    PAYLOAD,
    C,
    OpenClient,
    Pair,
    close_all,
    cpu_seconds,
    flat_out,
    raise_file_limit,
    rss_kib,
    subprocess_server,
    websockets_client,
)
from tests.bench.load import LightClient
from tests.redis_server import RedisServer

PAIRS = 100
RATE = 5_000
LATENCY_SECONDS = 5.0
THROUGHPUT_MESSAGES = 200_000
_ROOMS = itertools.count()


def relay(to: str, payload: object) -> str:
    return json.dumps({"type": "relay", "to": to, "payload": payload})


async def pair(open_client: OpenClient[C], first_url: str, second_url: str) -> Pair[C]:
    """Two connections in a fresh room, the first on ``first_url``, the second on the other."""
    room = f"c{next(_ROOMS)}"
    first = await open_client(first_url)
    await first.send(json.dumps({"type": "join", "room": room}))
    welcome = json.loads(await first.recv())
    assert welcome["type"] == "welcome", welcome
    first_id = welcome["peer_id"]
    second = await open_client(second_url)
    await second.send(json.dumps({"type": "join", "room": room}))
    await second.recv()  # welcome
    await first.recv()  # peer-joined
    return Pair(first, second, first_id)


async def open_pairs(
    count: int, place: Callable[[int], tuple[str, str]], open_client: OpenClient[C]
) -> list[Pair[C]]:
    pairs: list[Pair[C]] = []
    for start in range(0, count, 100):
        batch = range(start, min(count, start + 100))
        pairs += await asyncio.gather(*(pair(open_client, *place(i)) for i in batch))
    return pairs


async def latency(pairs: list[Pair[ClientConnection]]) -> tuple[float, float]:
    """p50 and p99 one-way relay latency (ms) at RATE messages/s over ``pairs``."""
    samples: list[float] = []
    interval = len(pairs) / RATE
    deadline = time.perf_counter() + LATENCY_SECONDS

    async def send(sender: ClientConnection, to: str, offset: float) -> None:
        await asyncio.sleep(offset)
        next_at = time.perf_counter()
        while next_at < deadline:
            await sender.send(relay(to, [time.perf_counter_ns(), PAYLOAD]))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await sender.send(relay(to, None))

    async def receive(receiver: ClientConnection) -> None:
        while True:
            message = json.loads(await receiver.recv())
            assert message["type"] == "relay", message
            if message["payload"] is None:
                break
            samples.append((time.perf_counter_ns() - message["payload"][0]) / 1e6)

    await asyncio.gather(
        *(send(p.second, p.first_id, i * interval / len(pairs)) for i, p in enumerate(pairs)),
        *(receive(p.first) for p in pairs),
    )
    quantiles = statistics.quantiles(samples, n=100)
    return quantiles[49], quantiles[98]


async def throughput(
    pairs: list[Pair[LightClient]], pids: list[int]
) -> tuple[float, dict[int, float]]:
    """Relayed messages per second over ``pairs`` (as fast as their receivers keep up), and
    the CPU share of each pid meanwhile."""
    per_pair = THROUGHPUT_MESSAGES // len(pairs)
    before = {pid: cpu_seconds(pid) for pid in pids}
    started = time.perf_counter()
    await flat_out(pairs, relay, per_pair)
    elapsed = time.perf_counter() - started
    shares = {pid: (cpu_seconds(pid) - before[pid]) / elapsed for pid in pids}
    return per_pair * len(pairs) / elapsed, shares


@asynccontextmanager
async def cluster(redis: RedisServer, count: int) -> AsyncIterator[list[tuple[str, int]]]:
    command = [sys.executable, "-m", "client.cli", "hub", "--port", "0", "--quiet"]
    # A fresh key prefix per cluster: nothing of the previous run is left to reap.
    flags = [*HUB_FLAGS, "--redis", redis.url, "--redis-prefix", f"bench{next(_ROOMS)}"]
    async with AsyncExitStack() as stack:
        hubs = []
        for _ in range(count):
            hubs.append(await stack.enter_async_context(subprocess_server(command + flags)))
        yield hubs


def same(url: str) -> Callable[[int], tuple[str, str]]:
    return lambda i: (url, url)


def across(urls: list[str]) -> Callable[[int], tuple[str, str]]:
    return lambda i: (urls[i % len(urls)], urls[(i + 1) % len(urls)])


def affine(urls: list[str]) -> Callable[[int], tuple[str, str]]:
    return lambda i: (urls[i % len(urls)], urls[i % len(urls)])


async def main(quick: bool) -> None:
    raise_file_limit()
    me = os.getpid()
    with tempfile.TemporaryDirectory() as directory:
        redis = RedisServer(pathlib.Path(directory))
        redis.start()
        try:
            await run_all(redis, me, quick)
        finally:
            redis.stop()


async def run_all(redis: RedisServer, me: int, quick: bool) -> None:
    rows: list[tuple[str, float, float]] = []  # figure, value, reference

    async with cluster(redis, 2) as [(url1, pid1), (url2, _)]:
        pairs = await open_pairs(PAIRS, same(url1), websockets_client)
        same_p50, same_p99 = await latency(pairs)
        await close_all(pairs)
        pairs = await open_pairs(PAIRS, across([url1, url2]), websockets_client)
        cross_p50, cross_p99 = await latency(pairs)
        await close_all(pairs)
        rows += [
            ("latency p50 ms, cross/same", cross_p50, same_p50),
            ("latency p99 ms, cross/same", cross_p99, same_p99),
        ]
        steps = [1_000] if quick else [1_000, 5_000]
        await asyncio.sleep(0.5)
        baseline = rss_kib(pid1)
        idle: list[Pair[ClientConnection]] = []
        for total in steps:
            idle += await open_pairs(total // 2 - len(idle), same(url1), websockets_client)
            await asyncio.sleep(1.0)
            kib = (rss_kib(pid1) - baseline) / total
            rows.append((f"KiB/idle conn at {total} (limit 20)", kib, 20.0))
        await close_all(idle)

    growth: dict[int, dict[str, float]] = {}
    for count in (1, 2, 3):
        async with cluster(redis, count) as hubs:
            urls = [url for url, _ in hubs]
            pids = [pid for _, pid in hubs] + [redis.pid, me]
            started = time.perf_counter()
            idle = await open_pairs(1_000, affine(urls), websockets_client)
            connections_per_second = 2_000 / (time.perf_counter() - started)
            await close_all(idle)
            flows = await open_pairs(20, affine(urls), LightClient.open)
            local_rate, _ = await throughput(flows, pids)
            await close_all(flows)
            place = across(urls) if count > 1 else same(urls[0])
            flows = await open_pairs(20, place, LightClient.open)
            rate, shares = await throughput(flows, pids)
            await close_all(flows)
            growth[count] = {
                "conn/s": connections_per_second,
                "relays/s affine": local_rate,
                "relays/s split": rate,
                "cpu hubs": sum(shares[pid] for _, pid in hubs),
                "cpu max hub": max(shares[pid] for _, pid in hubs),
                "cpu valkey": shares[redis.pid],
                "cpu generator": shares[me],
            }
    rows.append(
        ("relays/s 2 vs 1, affine", growth[2]["relays/s affine"], growth[1]["relays/s affine"])
    )
    rows.append(
        ("relays/s 2 vs 1, split", growth[2]["relays/s split"], growth[1]["relays/s split"])
    )

    print(f"{'figure':<34}{'value':>12}{'reference':>12}{'ratio':>8}")
    for figure, value, reference in rows:
        print(f"{figure:<34}{value:>12.2f}{reference:>12.2f}{value / reference:>8.2f}")
    print()
    print("processes  " + "".join(f"{name:>17}" for name in growth[1]))
    for count, figures in growth.items():
        print(f"{count:<11}" + "".join(f"{value:>17.2f}" for value in figures.values()))
    print("(cpu: cores used during the split-pairs throughput run; 2 cores on this machine)")
