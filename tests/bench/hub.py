"""Hub benchmark: ``python -m tests.bench.hub [--quick]`` (``--redis``: tests/bench/hub_cluster.py).

Starts the hub in a subprocess (``blindhub hub``) and, from this process, measures
memory per idle connection (RSS difference of the hub process), one-way relay
latency for 100 concurrent pairs at about 5,000 messages/s, relay throughput, and
10,000 concurrent connections. The baseline is a bare websockets relay (same
library, same settings, frames forwarded to the paired connection unparsed) run
the same way, so every figure is also given as a ratio hub / bare.
"""

import argparse
import asyncio
import itertools
import json
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

PAIRS = 100
RATE = 5_000  # messages per second over all pairs
LATENCY_SECONDS = 5.0
THROUGHPUT_MESSAGES = 100_000
PAYLOAD = "x" * 200
HUB_FLAGS = [
    "--max-connections", "20000", "--max-rooms", "20000",
    "--rate-per-second", "1e9", "--rate-burst", "1000000000",
]  # fmt: skip


def raise_file_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


@asynccontextmanager
async def subprocess_server(command: list[str]) -> AsyncIterator[tuple[str, int]]:
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        yield line.removeprefix("listening on ").strip(), process.pid
    finally:
        process.terminate()
        await process.wait()


class Server:
    """Either the hub or the bare relay, spoken to with the hub's wire format."""

    def __init__(self, name: str, url: str, pid: int) -> None:
        self.name, self.url, self.pid = name, url, pid
        self._rooms = itertools.count()

    async def pair(self) -> "Pair":
        """Two connections joined in a fresh room; returns them and their peer ids."""
        room = f"r{next(self._rooms)}"
        first = await connect(self.url, compression=None, max_size=None)
        await first.send(json.dumps({"type": "join", "room": room}))
        first_id = json.loads(await first.recv())["peer_id"]
        second = await connect(self.url, compression=None, max_size=None)
        await second.send(json.dumps({"type": "join", "room": room}))
        await second.recv()  # welcome
        await first.recv()  # peer-joined
        return Pair(first, second, first_id)


@dataclass(frozen=True)
class Pair:
    """``second`` relays to ``first`` (whose id is ``first_id``) in the measurements."""

    first: ClientConnection
    second: ClientConnection
    first_id: str


async def open_pairs(server: Server, count: int) -> list[Pair]:
    pairs: list[Pair] = []
    for start in range(0, count, 100):
        pairs += await asyncio.gather(*(server.pair() for _ in range(min(100, count - start))))
    return pairs


async def close_all(pairs: list[Pair]) -> None:
    connections = [c for pair in pairs for c in (pair.first, pair.second)]
    for start in range(0, len(connections), 500):
        await asyncio.gather(*(c.close() for c in connections[start : start + 500]))


async def memory(server: Server, steps: list[int]) -> dict[int, float]:
    """KiB of hub RSS per idle, joined connection at each total in ``steps``."""
    await asyncio.sleep(0.5)
    baseline = rss_kib(server.pid)
    pairs: list[Pair] = []
    result = {}
    for total in steps:
        pairs += await open_pairs(server, total // 2 - len(pairs))
        await asyncio.sleep(1.0)
        result[total] = (rss_kib(server.pid) - baseline) / total
    await close_all(pairs)
    return result


async def latency(server: Server) -> tuple[float, float, float]:
    """p50 and p99 one-way relay latency (ms) and the achieved rate (messages/s)."""
    pairs = await open_pairs(server, PAIRS)
    samples: list[float] = []
    interval = PAIRS / RATE
    deadline = time.perf_counter() + LATENCY_SECONDS

    async def send(sender: ClientConnection, to: str, offset: float) -> None:
        await asyncio.sleep(offset)
        next_at = time.perf_counter()
        while next_at < deadline:
            message = {"type": "relay", "to": to, "payload": [time.perf_counter_ns(), PAYLOAD]}
            await sender.send(json.dumps(message))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await sender.send(json.dumps({"type": "relay", "to": to, "payload": None}))

    async def receive(receiver: ClientConnection) -> None:
        while (payload := json.loads(await receiver.recv())["payload"]) is not None:
            samples.append((time.perf_counter_ns() - payload[0]) / 1e6)

    started = time.perf_counter()
    await asyncio.gather(
        *(send(pair.second, pair.first_id, i * interval / PAIRS) for i, pair in enumerate(pairs)),
        *(receive(pair.first) for pair in pairs),
    )
    elapsed = time.perf_counter() - started
    await close_all(pairs)
    quantiles = statistics.quantiles(samples, n=100)
    return quantiles[49], quantiles[98], len(samples) / elapsed


async def throughput(server: Server) -> float:
    """Relayed messages per second, 20 pairs sending as fast as they can."""
    pairs = await open_pairs(server, 20)
    per_pair = THROUGHPUT_MESSAGES // len(pairs)

    async def run(sender: ClientConnection, receiver: ClientConnection, to: str) -> None:
        frame = json.dumps({"type": "relay", "to": to, "payload": PAYLOAD})

        async def produce() -> None:
            for _ in range(per_pair):
                await sender.send(frame)

        async def consume() -> None:
            for _ in range(per_pair):
                await receiver.recv()

        await asyncio.gather(produce(), consume())

    started = time.perf_counter()
    await asyncio.gather(*(run(pair.second, pair.first, pair.first_id) for pair in pairs))
    elapsed = time.perf_counter() - started
    await close_all(pairs)
    return per_pair * len(pairs) / elapsed


async def measure(server: Server, steps: list[int]) -> dict[str, float]:
    figures = {f"KiB/conn at {n}": kib for n, kib in (await memory(server, steps)).items()}
    p50, p99, rate = await latency(server)
    figures |= {"latency p50 ms": p50, "latency p99 ms": p99, "latency run msg/s": rate}
    figures["throughput msg/s"] = await throughput(server)
    return figures


async def bare_relay(port: int) -> None:
    """The baseline: pairs connections by room and forwards frames unparsed."""
    rooms: dict[str, list[ServerConnection]] = {}
    ids = itertools.count()

    async def handler(connection: ServerConnection) -> None:
        room = json.loads(await connection.recv())["room"]
        members = rooms.setdefault(room, [])
        peer_id = f"p{next(ids)}"
        await connection.send(json.dumps({"type": "welcome", "peer_id": peer_id, "peers": []}))
        for other in members:
            await other.send(json.dumps({"type": "peer-joined", "peer_id": peer_id}))
        members.append(connection)
        async for frame in connection:
            for other in members:
                if other is not connection:
                    await other.send(frame)

    async with serve(handler, "127.0.0.1", port, compression=None) as server:
        print(f"listening on ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()


async def main(quick: bool) -> None:
    raise_file_limit()
    steps = [1_000, 5_000] if quick else [1_000, 5_000, 10_000]
    hub_command = [sys.executable, "-m", "client.cli", "hub", "--port", "0", "--quiet"]
    bare_command = [sys.executable, "-m", "tests.bench.hub", "--bare-relay"]
    results = {}
    for name, command in (("hub", hub_command + HUB_FLAGS), ("bare", bare_command)):
        async with subprocess_server(command) as (url, pid):
            results[name] = await measure(Server(name, url, pid), steps)
    print(f"{'figure':<22}{'hub':>12}{'bare relay':>12}{'hub/bare':>10}")
    for figure, value in results["hub"].items():
        bare = results["bare"][figure]
        print(f"{figure:<22}{value:>12.2f}{bare:>12.2f}{value / bare:>10.2f}")
    print(f"(10,000 connections: {'reached' if 10_000 in steps else 'skipped with --quick'})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="stop at 5,000 connections")
    parser.add_argument("--bare-relay", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--redis", action="store_true", help="the cluster: hub processes sharing a Valkey server"
    )
    args = parser.parse_args()
    if args.redis:
        from tests.bench.hub_cluster import main as cluster_main

        asyncio.run(cluster_main(args.quick))
    elif args.bare_relay:
        raise_file_limit()
        asyncio.run(bare_relay(0))
    else:
        asyncio.run(main(args.quick))
