"""A real hub on loopback, real websockets clients: relays, every refusal and close, abuse."""

import asyncio
import io
import json
import re
import signal
import socket
import ssl
import sys
import urllib.request
from contextlib import AsyncExitStack
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from client.hub_connection import (
    HubClosed,
    HubConnection,
    Relayed,
)
from signaling.hub import KIB, Limits
from signaling.protocol import ErrorCode, PeerId, PeerJoined, PeerLeft, Refused
from signaling.server import MetadataRecorder
from tests.conftest import wait_for
from tests.tls import self_signed_certificate

# Generous for a loaded 2-core machine; only bounds how long a failing test hangs.
TIMEOUT = 10.0


async def recv_json(websocket: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    return message


async def join_raw(url: str, room: str, **options) -> tuple[ClientConnection, dict[str, Any]]:
    websocket = await connect(url, compression=None, **options)
    await websocket.send(json.dumps({"type": "join", "room": room}))
    return websocket, await recv_json(websocket)


async def closed_code(websocket: ClientConnection) -> tuple[int | None, str | None]:
    await asyncio.wait_for(websocket.wait_closed(), TIMEOUT)
    assert websocket.close_code is not None
    return websocket.close_code, websocket.close_reason


class Pair:
    """Two HubConnections joined in one room."""

    def __init__(self, alice: HubConnection, bob: HubConnection, ids: tuple[PeerId, PeerId]):
        self.alice, self.bob = alice, bob
        self.alice_id, self.bob_id = ids

    @classmethod
    async def join(cls, url: str, room: str, stack: AsyncExitStack) -> "Pair":
        alice = await stack.enter_async_context(await HubConnection.connect(url))
        bob = await stack.enter_async_context(await HubConnection.connect(url))
        alice_id = (await alice.join(room)).peer_id
        bob_id = (await bob.join(room)).peer_id
        assert await asyncio.wait_for(alice.next_event(), TIMEOUT) == PeerJoined(bob_id)
        return cls(alice, bob, (alice_id, bob_id))

    async def check_relay(self, payload: object = "still here") -> None:
        await self.alice.relay(self.bob_id, payload)
        assert await asyncio.wait_for(self.bob.next_event(), TIMEOUT) == (
            Relayed(self.alice_id, payload)
        )
        await self.bob.relay(self.alice_id, payload)
        assert await asyncio.wait_for(self.alice.next_event(), TIMEOUT) == (
            Relayed(self.bob_id, payload)
        )


async def test_relay_both_ways_and_peer_left_on_leave(hub):
    async with AsyncExitStack() as stack:
        pair = await Pair.join(hub.url, "call", stack)
        offer = {"sdp": "v=0\r\n", "nested": [1, 2.5, None, True, {"é": "\u2603"}]}
        await pair.check_relay(offer)
        await pair.bob.leave()
        assert await asyncio.wait_for(pair.alice.next_event(), TIMEOUT) == (PeerLeft(pair.bob_id))


async def test_peer_left_on_abrupt_disconnect(hub):
    async with AsyncExitStack() as stack:
        pair = await Pair.join(hub.url, "call", stack)
        pair.bob._websocket.transport.abort()
        assert await asyncio.wait_for(pair.alice.next_event(), TIMEOUT) == (PeerLeft(pair.bob_id))


async def test_third_peer_is_refused_and_rooms_are_isolated(hub):
    async with AsyncExitStack() as stack:
        pair = await Pair.join(hub.url, "call", stack)
        other = await Pair.join(hub.url, "other", stack)
        carol = await stack.enter_async_context(await HubConnection.connect(hub.url))
        with pytest.raises(Refused) as refusal:
            await carol.join("call")
        assert refusal.value.code is ErrorCode.ROOM_FULL
        await pair.alice.relay(other.alice_id, "across rooms")
        with pytest.raises(Refused) as refusal:
            await asyncio.wait_for(pair.alice.next_event(), TIMEOUT)
        assert refusal.value.code is ErrorCode.UNKNOWN_PEER
        await other.check_relay()
        await pair.check_relay()


BAD_TEXT = [
    ("not json", ErrorCode.INVALID_JSON),
    ("[1, 2]", ErrorCode.NOT_AN_OBJECT),
    ('{"type":"shout"}', ErrorCode.UNKNOWN_TYPE),
    ('{"type":"join","room":["x"]}', ErrorCode.INVALID_FIELD),
    ('{"type":"join","room":"no spaces"}', ErrorCode.INVALID_ROOM),
    ('{"type":"relay","to":"someone","payload":1}', ErrorCode.NOT_JOINED),
]


@pytest.mark.parametrize(("frame", "code"), BAD_TEXT, ids=[code for _, code in BAD_TEXT])
async def test_bad_input_gets_its_error_while_another_room_relays(hub, frame, code):
    async with AsyncExitStack() as stack:
        healthy = await Pair.join(hub.url, "healthy", stack)
        attacker = await stack.enter_async_context(await connect(hub.url))
        await attacker.send(frame)
        answer = await recv_json(attacker)
        assert (answer["type"], answer["code"]) == ("error", code)
        await healthy.check_relay()
        # The attacker's connection is still usable.
        await attacker.send('{"type":"join","room":"attacker"}')
        assert (await recv_json(attacker))["type"] == "welcome"


@pytest.mark.parametrize(
    ("frame", "close"),
    [
        (b"\x00binary", (1003, "binary-frame")),
        ("x" * (64 * KIB + 1), (1009, "frame with 65537 bytes exceeds limit of 65536 bytes")),
    ],
    ids=["binary", "too-big"],
)
async def test_bad_frames_close_with_their_code_while_another_room_relays(hub, frame, close):
    async with AsyncExitStack() as stack:
        healthy = await Pair.join(hub.url, "healthy", stack)
        attacker = await stack.enter_async_context(await connect(hub.url, max_size=None))
        await attacker.send(frame)
        assert await closed_code(attacker) == close
        await healthy.check_relay()
    assert hub.hub.metrics.closes_total[close[0]] == 1


async def test_connections_beyond_the_limit_are_closed_with_1013(start_hub):
    hub = await start_hub(Limits(max_connections=2))
    async with AsyncExitStack() as stack:
        pair = await Pair.join(hub.url, "full", stack)
        extra = await stack.enter_async_context(await connect(hub.url))
        assert await closed_code(extra) == (1013, "hub-full")
        await pair.check_relay()
    assert hub.hub.metrics.errors_total[ErrorCode.HUB_FULL] == 1


async def test_a_connection_that_never_joins_is_closed_with_1008(start_hub):
    hub = await start_hub(Limits(join_timeout=0.3))
    async with AsyncExitStack() as stack:
        idle = await stack.enter_async_context(await connect(hub.url))
        pair = await Pair.join(hub.url, "busy", stack)
        assert await closed_code(idle) == (1008, "join-timeout")
        await pair.check_relay()
        assert hub.hub.connection_count == 2


async def test_a_peer_that_stops_answering_pings_is_closed_with_1011(start_hub):
    hub = await start_hub(Limits(ping_interval=0.2, ping_timeout=0.3, close_timeout=0.2))
    async with AsyncExitStack() as stack:
        healthy = await Pair.join(hub.url, "healthy", stack)
        silent, _ = await join_raw(hub.url, "silent", ping_interval=None, close_timeout=0.2)
        await stack.enter_async_context(silent)
        # It reads nothing from now on, so it answers no ping.
        silent.transport.pause_reading()
        await wait_for(lambda: hub.hub.metrics.closes_total[1011] > 0, TIMEOUT)
        assert hub.hub.metrics.closes_total[1011] == 1
        assert hub.hub.room_size("silent") == 0
        # The others answer every ping and stay; two rounds of pings went by meanwhile.
        await healthy.check_relay()
        assert hub.hub.room_size("healthy") == 2


async def test_healthz_and_metrics(hub):
    async with AsyncExitStack() as stack:
        pair = await Pair.join(hub.url, "m", stack)
        await pair.check_relay()
        lonely = await stack.enter_async_context(await HubConnection.connect(hub.url))
        with pytest.raises(Refused):
            await lonely.join("m")
        base = hub.url.replace("ws://", "http://")

        def get(path: str) -> tuple[int, str]:
            with urllib.request.urlopen(base + path, timeout=TIMEOUT) as response:
                return response.status, response.read().decode()

        assert await asyncio.to_thread(get, "/healthz") == (200, "ok\n")
        status, metrics = await asyncio.to_thread(get, "/metrics")
    assert status == 200
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line[0] != "#")
    assert samples["blindhub_connections"] == "3"
    assert samples["blindhub_rooms"] == "1"
    assert samples["blindhub_messages_relayed_total"] == "2"
    assert samples['blindhub_errors_total{code="room-full"}'] == "1"
    assert samples['blindhub_errors_total{code="invalid-json"}'] == "0"


async def test_closing_the_hub_closes_every_connection_with_1001(start_hub):
    hub = await start_hub()
    async with AsyncExitStack() as stack:
        pair = await Pair.join(hub.url, "bye", stack)
        await hub.close()
        with pytest.raises(HubClosed) as closed:
            await asyncio.wait_for(pair.alice.next_event(), TIMEOUT)
        assert closed.value.code == 1001
        assert [event async for event in pair.bob] == []


async def test_metadata_records_what_was_routed_with_the_exact_payload(start_hub):
    sink = io.StringIO()
    hub = await start_hub(metadata=MetadataRecorder(sink, clock=lambda: 1.5))
    async with AsyncExitStack() as stack:
        alice, bob = await join_raw(hub.url, "rec"), await join_raw(hub.url, "rec")
        for websocket, _ in (alice, bob):
            await stack.enter_async_context(websocket)
        payload = '{"ciphertext": "AAEC",   "n": 1e5}'
        await bob[0].send(f'{{"type":"relay","to":"{alice[1]["peer_id"]}","payload":{payload}}}')
        await recv_json(alice[0])  # peer-joined
        relayed = await asyncio.wait_for(alice[0].recv(decode=True), TIMEOUT)
    records = [json.loads(line) for line in sink.getvalue().splitlines()]
    alice_id, bob_id = alice[1]["peer_id"], bob[1]["peer_id"]
    assert [(r["type"], r["from"], r["to"]) for r in records] == [
        ("welcome", None, alice_id),
        ("welcome", None, bob_id),
        ("peer-joined", None, alice_id),
        ("relay", bob_id, alice_id),
        ("peer-left", None, alice_id),
    ][: len(records)]
    relay_record = records[3]
    assert relay_record["room"] == "rec" and relay_record["time"] == 1.5
    assert relay_record["size"] == len(relayed.encode())
    # The payload's exact text (spacing, number spelling) is in the log line.
    assert f'"payload":{payload}}}' in sink.getvalue().splitlines()[3]


async def test_500_concurrent_connections(start_hub):
    hub = await start_hub(Limits(max_rooms=1000))
    async with AsyncExitStack() as stack:
        joins = [join_raw(hub.url, f"room{i // 2}") for i in range(500)]
        clients = await asyncio.gather(*joins)
        for websocket, _ in clients:
            await stack.enter_async_context(websocket)
        assert (hub.hub.connection_count, hub.hub.room_count) == (500, 250)
        # The second to join each room relays to the first, who saw it join.
        seconds = [(ws, welcome["peers"][0]) for ws, welcome in clients if welcome["peers"]]
        firsts = [ws for ws, welcome in clients if not welcome["peers"]]
        assert len(seconds) == len(firsts) == 250
        for second, first_id in seconds:
            await second.send(json.dumps({"type": "relay", "to": first_id, "payload": 1}))
        for first in firsts:
            assert (await recv_json(first))["type"] == "peer-joined"
            assert (await recv_json(first))["payload"] == 1
    await wait_for(lambda: hub.hub.connection_count == 0, TIMEOUT)
    assert hub.hub.metrics.messages_relayed_total == 250


async def test_a_flood_of_10000_messages_is_rate_limited_and_others_keep_relaying(start_hub):
    hub = await start_hub(Limits(rate_per_second=100.0, rate_burst=50))
    async with AsyncExitStack() as stack:
        healthy = await Pair.join(hub.url, "healthy", stack)
        # It never reads either, so its own close handshake would wait: keep that short.
        flooder, _ = await join_raw(hub.url, "flood", close_timeout=0.2)
        await stack.enter_async_context(flooder)
        victim, _ = await join_raw(hub.url, "flood")
        await stack.enter_async_context(victim)
        frame = json.dumps({"type": "relay", "to": "nobody-here", "payload": "x" * 100})
        for _ in range(10_000):
            await flooder.send(frame)
        await healthy.check_relay()
        errors = hub.hub.metrics.errors_total
        await wait_for(
            lambda: errors[ErrorCode.RATE_LIMITED] + errors[ErrorCode.UNKNOWN_PEER] == 10_000,
            TIMEOUT,
        )
    # Only the burst plus what refilled while the flood lasted got through to routing.
    assert errors[ErrorCode.UNKNOWN_PEER] < 50 + 100 * 10
    assert errors[ErrorCode.RATE_LIMITED] > 9_000


async def test_a_client_that_never_reads_is_closed_and_its_buffer_stays_bounded(start_hub):
    limits = Limits(
        rate_per_second=1e6, rate_burst=1000, max_buffered_bytes=128 * KIB, close_timeout=0.2
    )
    hub = await start_hub(limits)
    async with AsyncExitStack() as stack:
        healthy = await Pair.join(hub.url, "healthy", stack)
        sender, _ = await join_raw(hub.url, "slow")
        await stack.enter_async_context(sender)
        # A small receive buffer and a one-frame queue: the reader pushes back at once.
        sock = socket.create_connection(sender.remote_address[:2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader = await connect(hub.url, sock=sock, max_queue=1, max_size=None, close_timeout=0.2)
        await stack.enter_async_context(reader)
        await reader.send('{"type":"join","room":"slow"}')
        reader_id = json.loads(await asyncio.wait_for(reader.recv(), TIMEOUT))["peer_id"]
        frame = json.dumps({"type": "relay", "to": reader_id, "payload": "y" * 60_000})
        peak = 0
        for _ in range(2_000):
            if hub.hub.metrics.closes_total[1008]:
                break
            await sender.send(frame)
            # A yield, not a wait: the hub runs between two sends, so every buffer size it
            # reaches is sampled below.
            await asyncio.sleep(0)
            peak = max(peak, hub.buffered_bytes())
        # The hub counts the close once its handshake ends or is cut (close_timeout), which
        # the sends above may outrun.
        await wait_for(lambda: hub.hub.metrics.closes_total[1008] > 0, TIMEOUT)
        assert hub.hub.metrics.closes_total[1008] == 1
        assert peak <= limits.max_buffered_bytes
        await healthy.check_relay()
        # The sender learns the reader left, and was never blocked on it.
        left = {"type": "peer-left", "peer_id": reader_id}
        while await recv_json(sender) != left:
            pass


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
async def test_the_hub_command_prints_its_url_and_stops_cleanly_with_1001(tmp_path, stop_signal):
    metadata = tmp_path / "metadata.jsonl"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client.cli", "hub", "--port", "0", "--quiet",
        "--record-metadata", str(metadata),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), TIMEOUT)).decode()
        match = re.fullmatch(r"listening on (ws://127\.0\.0\.1:(\d+))\n", line)
        assert match and match[2] != "0"
        async with await HubConnection.connect(match[1]) as client:
            await client.join("cli")
            process.send_signal(stop_signal)
            with pytest.raises(HubClosed) as closed:
                await asyncio.wait_for(client.next_event(), TIMEOUT)
            assert closed.value.code == 1001
        assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    [record] = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert (record["type"], record["room"]) == ("welcome", "cli")


async def test_tls_relays_over_wss(start_hub, tmp_path):
    cert_path, key_path = self_signed_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    hub = await start_hub(ssl_context=server_context)
    assert hub.url.startswith("wss://127.0.0.1:")
    client_context = ssl.create_default_context(cafile=str(cert_path))
    async with AsyncExitStack() as stack:
        alice = await stack.enter_async_context(
            await HubConnection.connect(hub.url, ssl_context=client_context)
        )
        bob = await stack.enter_async_context(
            await HubConnection.connect(hub.url, ssl_context=client_context)
        )
        alice_id = (await alice.join("tls")).peer_id
        await bob.join("tls")
        await bob.relay(alice_id, {"sealed": "AAAA"})
        assert isinstance(await asyncio.wait_for(alice.next_event(), TIMEOUT), PeerJoined)
        assert await asyncio.wait_for(alice.next_event(), TIMEOUT) == (
            Relayed(bob.peer_id or PeerId(""), {"sealed": "AAAA"})
        )
