"""Hub benchmark: ``python -m tests.bench.hub [--quick] [--peerjs] [--unpaced] [--runs N]
[--in-flight N]`` (``--redis``: tests/bench/hub_cluster.py).

Starts each server in a subprocess and, from this process (one load generator for all),
measures memory per idle connection (RSS difference of the server process), one-way relay
latency for 100 concurrent pairs at about 5,000 messages/s and the server's CPU at that
rate, relay throughput (20 pairs flat out, from clients that cost little per message:
tests/bench/load.py) with the server's CPU per relayed message, the messages each of its
reads brought and each of its writes took, and the cores the load generator used meanwhile,
and 10,000 concurrent connections. The servers:

- ``hub``: ``blindhub hub``, limits raised so that the load is not refused;
- ``unpaced`` (with ``--unpaced``): the same hub with ``--batch-window 0``, which polls its
  sockets again as soon as it has relayed what it read (signaling.pacing);
- ``bare``: a bare websockets relay (same library and settings, frames forwarded to the
  paired connection unparsed), the floor of what websockets itself costs;
- ``peerjs`` (with ``--peerjs``): PeerJS server, npm package ``peer`` 1.0.2, installed from
  the npm registry into a cache directory outside the repository and run embedded in a small
  Node script with its connection limit raised to the hub's. Its protocol maps one to one:
  a pair is two clients with ids of the bench's choosing (connect with ``?key&id&token``,
  the server answers ``OPEN`` where the hub answers ``welcome``), and a relay is
  ``{"type":"CANDIDATE","dst":ID,"payload":P}``, which PeerJS forwards to ``dst`` as
  ``{"type","src","dst","payload"}`` where the hub forwards ``{"type","from","payload"}``.
  The payloads are the same JSON values.

Every figure is printed as min/median/max over the runs, and the ratios hub / other use
the medians.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from tests.bench.load import IN_FLIGHT, LightClient

PAIRS = 100
RATE = 5_000  # messages per second over all pairs
LATENCY_SECONDS = 5.0
THROUGHPUT_PAIRS = 20
THROUGHPUT_MESSAGES = 300_000
PAYLOAD = "x" * 200
MAX_CONNECTIONS = 20_000
HUB_FLAGS = [
    "--max-connections", str(MAX_CONNECTIONS), "--max-rooms", str(MAX_CONNECTIONS),
    "--rate-per-second", "1e9", "--rate-burst", "1000000000",
]  # fmt: skip
PEERJS_PACKAGE = "peer@1.0.2"
PEERJS_RUNNER = f"""\
import {{ PeerServer }} from "peer";
PeerServer({{ host: "127.0.0.1", port: 0, concurrent_limit: {MAX_CONNECTIONS} }}, (server) => {{
  console.log(`listening on ws://127.0.0.1:${{server.address().port}}`);
}});
"""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def raise_file_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may hold spaces; the fields after it are numbers.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def io_calls(pid: int) -> tuple[int, int]:
    """read(2) and write(2) system calls (of each family) of a process so far."""
    with open(f"/proc/{pid}/io") as io:
        counts = dict(line.split(":") for line in io)
    return int(counts["syscr"]), int(counts["syscw"])


@asynccontextmanager
async def subprocess_server(
    command: list[str], cwd: Path | None = None
) -> AsyncIterator[tuple[str, int]]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, cwd=cwd
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        yield line.removeprefix("listening on ").strip(), process.pid
    finally:
        process.terminate()
        await process.wait()


class Client(Protocol):
    """What the measurements need of a client: websockets' own, or the throughput runs'
    LightClient (tests/bench/load.py)."""

    async def send(self, message: str) -> None: ...
    async def recv(self) -> str | bytes: ...
    async def close(self) -> None: ...


C = TypeVar("C", bound=Client)
OpenClient = Callable[[str], Awaitable[C]]


async def websockets_client(url: str) -> ClientConnection:
    return await connect(url, compression=None, max_size=None)


@dataclass(frozen=True)
class Pair(Generic[C]):
    """``second`` relays to ``first`` (whose id is ``first_id``) in the measurements."""

    first: C
    second: C
    first_id: str


class Server:
    """The hub or the bare relay, spoken to with the hub's wire format."""

    def __init__(self, name: str, url: str, pid: int) -> None:
        self.name, self.url, self.pid = name, url, pid
        self._pairs = itertools.count()

    async def pair(self, open_client: OpenClient[C]) -> Pair[C]:
        """Two connections joined in a fresh room; returns them and their peer ids."""
        room = f"r{next(self._pairs)}"
        first = await open_client(self.url)
        await first.send(json.dumps({"type": "join", "room": room}))
        first_id = json.loads(await first.recv())["peer_id"]
        second = await open_client(self.url)
        await second.send(json.dumps({"type": "join", "room": room}))
        await second.recv()  # welcome
        await first.recv()  # peer-joined
        return Pair(first, second, first_id)

    def relay(self, to: str, payload: object) -> str:
        return json.dumps({"type": "relay", "to": to, "payload": payload})


class PeerJsServer(Server):
    """PeerJS: ids chosen by the client, ``OPEN`` on connect, relays addressed by ``dst``."""

    async def pair(self, open_client: OpenClient[C]) -> Pair[C]:
        number = next(self._pairs)
        first_id, second_id = f"p{number}a", f"p{number}b"
        first = await self._open(open_client, first_id)
        second = await self._open(open_client, second_id)
        return Pair(first, second, first_id)

    async def _open(self, open_client: OpenClient[C], peer_id: str) -> C:
        url = f"{self.url}/peerjs?key=peerjs&id={peer_id}&token=t{peer_id}"
        connection = await open_client(url)
        assert json.loads(await connection.recv())["type"] == "OPEN"
        return connection

    def relay(self, to: str, payload: object) -> str:
        return json.dumps({"type": "CANDIDATE", "dst": to, "payload": payload})


async def open_pairs(server: Server, count: int, open_client: OpenClient[C]) -> list[Pair[C]]:
    pairs: list[Pair[C]] = []
    for start in range(0, count, 100):
        batch = range(min(100, count - start))
        pairs += await asyncio.gather(*(server.pair(open_client) for _ in batch))
    return pairs


async def close_all(pairs: Sequence[Pair[Any]]) -> None:
    connections = [c for pair in pairs for c in (pair.first, pair.second)]
    for start in range(0, len(connections), 500):
        await asyncio.gather(*(c.close() for c in connections[start : start + 500]))


async def memory(server: Server, steps: list[int]) -> dict[int, float]:
    """KiB of server RSS per idle, joined connection at each total in ``steps``."""
    # These two sleeps let the hub's RSS settle before it is read: they shape a measurement,
    # no order or outcome depends on them.
    await asyncio.sleep(0.5)
    baseline = rss_kib(server.pid)
    pairs: list[Pair[ClientConnection]] = []
    result = {}
    for total in steps:
        pairs += await open_pairs(server, total // 2 - len(pairs), websockets_client)
        await asyncio.sleep(1.0)
        result[total] = (rss_kib(server.pid) - baseline) / total
    await close_all(pairs)
    return result


async def latency(server: Server) -> tuple[float, float, float, float]:
    """p50 and p99 one-way relay latency (ms), the achieved rate (messages/s) and the
    server's CPU meanwhile (cores)."""
    pairs = await open_pairs(server, PAIRS, websockets_client)
    samples: list[float] = []
    interval = PAIRS / RATE
    deadline = time.perf_counter() + LATENCY_SECONDS

    async def send(sender: ClientConnection, to: str, offset: float) -> None:
        # The sleeps here are the load's schedule: each pair sends at RATE / PAIRS, staggered.
        await asyncio.sleep(offset)
        next_at = time.perf_counter()
        while next_at < deadline:
            await sender.send(server.relay(to, [time.perf_counter_ns(), PAYLOAD]))
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        await sender.send(server.relay(to, None))

    async def receive(receiver: ClientConnection) -> None:
        while (payload := json.loads(await receiver.recv())["payload"]) is not None:
            samples.append((time.perf_counter_ns() - payload[0]) / 1e6)

    started, cpu_before = time.perf_counter(), cpu_seconds(server.pid)
    await asyncio.gather(
        *(send(pair.second, pair.first_id, i * interval / PAIRS) for i, pair in enumerate(pairs)),
        *(receive(pair.first) for pair in pairs),
    )
    elapsed = time.perf_counter() - started
    cores = (cpu_seconds(server.pid) - cpu_before) / elapsed
    await close_all(pairs)
    quantiles = statistics.quantiles(samples, n=100)
    return quantiles[49], quantiles[98], len(samples) / elapsed, cores


async def flat_out(
    pairs: Sequence[Pair[LightClient]],
    relay: Callable[[str, object], str],
    per_pair: int,
    window: int = IN_FLIGHT,
) -> None:
    """Each pair's second relays ``per_pair`` messages to its first as fast as it keeps up
    (``window`` in flight at most), then one more; check what the first received."""

    async def run(pair: Pair[LightClient]) -> None:
        text, last = relay(pair.first_id, PAYLOAD), relay(pair.first_id, "last")
        got = await pair.second.flow(pair.first, text, per_pair, last, window)
        for relayed, payload in ((pair.first.relay, PAYLOAD), (got, "last")):
            assert relayed is not None and json.loads(relayed)["payload"] == payload, relayed

    await asyncio.gather(*(run(pair) for pair in pairs))


async def throughput(server: Server, window: int) -> tuple[float, float, float, float, float]:
    """Relayed messages per second, 20 pairs sending as fast as their receivers keep up
    (``window`` in flight at most, from clients that cost little per message, so that the
    server is what saturates: tests/bench/load.py); the server's CPU per relayed message
    (microseconds), the messages each of its reads brought and each of its writes took; and
    the cores this process, the load generator, used meanwhile (of the machine's two, shared
    with the server)."""
    pairs = await open_pairs(server, THROUGHPUT_PAIRS, LightClient.open)
    per_pair = THROUGHPUT_MESSAGES // len(pairs)
    started, cpu_before = time.perf_counter(), cpu_seconds(server.pid)
    io_before, own_before = io_calls(server.pid), time.process_time()
    await flat_out(pairs, server.relay, per_pair, window)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(server.pid) - cpu_before
    io_after, own = io_calls(server.pid), time.process_time() - own_before
    await close_all(pairs)
    messages = per_pair * len(pairs)
    # /proc counts read(2) and write(2), which uvloop and Node use, not the recv(2) and
    # send(2) of asyncio's own loop (the bare relay's): nan there.
    per_read, per_write = (
        messages / (after - before) if after > before else math.nan
        for before, after in zip(io_before, io_after, strict=True)
    )
    return messages / elapsed, cpu / messages * 1e6, per_read, per_write, own / elapsed


async def measure(server: Server, steps: list[int], window: int) -> dict[str, float]:
    figures = {f"KiB/conn at {n}": kib for n, kib in (await memory(server, steps)).items()}
    p50, p99, rate, cores = await latency(server)
    figures |= {
        "latency p50 ms": p50,
        "latency p99 ms": p99,
        "latency run msg/s": rate,
        "CPU cores at 5k msg/s": cores,
    }
    (
        figures["throughput msg/s"],
        figures["CPU us/msg"],
        figures["msgs per read"],
        figures["msgs per write"],
        figures["load gen cores"],
    ) = await throughput(server, window)
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


def peerjs_directory() -> Path:
    """Where PeerJS is installed: a cache outside the repository, kept between runs."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "blindhub-bench" / "peerjs-1.0.2"


def install_peerjs() -> Path | str:
    """Install PeerJS once into its cache; return the directory, or why it cannot run."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        return "npm or node not found on PATH"
    directory = peerjs_directory()
    if not (directory / "node_modules" / "peer" / "package.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "package.json").write_text('{"private": true, "type": "module"}\n')
        install = [npm, "install", "--no-audit", "--no-fund", "--save-exact", PEERJS_PACKAGE]
        done = subprocess.run(install, cwd=directory, capture_output=True, text=True)
        if done.returncode != 0:
            return f"npm install {PEERJS_PACKAGE} failed: {done.stderr.strip()[-300:]}"
    (directory / "run.mjs").write_text(PEERJS_RUNNER)
    return directory


@dataclass(frozen=True)
class Contender:
    name: str
    command: list[str]
    cwd: Path | None
    server: Callable[[str, str, int], Server]


def summary(values: list[float]) -> str:
    return f"{min(values):.2f}/{statistics.median(values):.2f}/{max(values):.2f}"


def report(results: dict[str, list[dict[str, float]]]) -> None:
    names = list(results)
    print(f"{'figure':<22}" + "".join(f"{name + ' min/med/max':>30}" for name in names), end="")
    print("".join(f"{'hub/' + name:>12}" for name in names[1:]))
    for figure in results["hub"][0]:
        columns = {name: [run[figure] for run in runs] for name, runs in results.items()}
        line = f"{figure:<22}" + "".join(f"{summary(columns[name]):>30}" for name in names)
        hub = statistics.median(columns["hub"])
        print(line + "".join(f"{hub / statistics.median(columns[n]):>12.2f}" for n in names[1:]))


async def main(quick: bool, peerjs: bool, unpaced: bool, runs: int, window: int) -> None:
    raise_file_limit()
    steps = [1_000, 5_000] if quick else [1_000, 5_000, 10_000]
    hub_command = [sys.executable, "-m", "client.cli", "hub", "--port", "0", "--quiet"]
    bare_command = [sys.executable, "-m", "tests.bench.hub", "--bare-relay"]
    contenders = [
        Contender("hub", hub_command + HUB_FLAGS, None, Server),
        Contender("bare", bare_command, None, Server),
    ]
    if unpaced:
        unpaced_command = hub_command + HUB_FLAGS + ["--batch-window", "0"]
        contenders.insert(1, Contender("unpaced", unpaced_command, None, Server))
    if peerjs:
        installed = install_peerjs()
        if isinstance(installed, str):
            print(f"PeerJS: skipped ({installed})")
        else:
            node = shutil.which("node")
            assert node is not None
            contenders.append(Contender("peerjs", [node, "run.mjs"], installed, PeerJsServer))
    results: dict[str, list[dict[str, float]]] = {c.name: [] for c in contenders}
    for run in range(runs):
        # Alternate the order, so that a drift of the machine's load spreads over all.
        for contender in contenders if run % 2 == 0 else contenders[::-1]:
            async with subprocess_server(contender.command, contender.cwd) as (url, pid):
                server = contender.server(contender.name, url, pid)
                results[contender.name].append(await measure(server, steps, window))
            print(f"run {run + 1}/{runs} {contender.name}: done", file=sys.stderr, flush=True)
    report(results)
    print(f"(10,000 connections: {'reached' if 10_000 in steps else 'skipped with --quick'})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="stop at 5,000 connections")
    parser.add_argument(
        "--peerjs", action="store_true", help="also PeerJS server (installed with npm)"
    )
    parser.add_argument("--unpaced", action="store_true", help="also the hub with --batch-window 0")
    parser.add_argument("--runs", type=int, default=1, help="repeat each measurement N times")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=IN_FLIGHT,
        help=f"messages in flight per pair in the throughput runs (default {IN_FLIGHT})",
    )
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
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(bare_relay(0))
    else:
        asyncio.run(main(args.quick, args.peerjs, args.unpaced, args.runs, args.in_flight))
