"""The hub's connection layer (signaling.connections) against clients that write raw frames:
every way a client may cut, fragment, interleave or break its frames gets what websockets'
own server gave it, and a burst is served in order across turns of the event loop."""

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.uri import parse_uri

from signaling import connections
from signaling.connections import MESSAGES_PER_TURN, text_frame_header
from signaling.hub import KIB, Delivery, Hub, Limits
from signaling.protocol import ErrorCode, PeerId
from signaling.server import HubServer

TIMEOUT = 10.0


def client_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    """A frame as a client writes it (masked), by websockets' own serializer."""
    return Frame(opcode, data, fin).serialize(mask=True, extensions=[])


def relay(to: str, payload: object) -> bytes:
    return json.dumps({"type": "relay", "to": to, "payload": payload}).encode()


async def recv_json(websocket: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
    return message


@asynccontextmanager
async def pair(url: str) -> AsyncIterator[tuple[ClientConnection, ClientConnection, str]]:
    """A sender and a receiver in one room, and the receiver's id."""
    async with AsyncExitStack() as stack:
        receiver = await stack.enter_async_context(await connect(url, max_size=None))
        await receiver.send('{"type":"join","room":"r"}')
        receiver_id = (await recv_json(receiver))["peer_id"]
        sender = await stack.enter_async_context(await connect(url, max_size=None))
        await sender.send('{"type":"join","room":"r"}')
        await recv_json(sender)
        assert (await recv_json(receiver))["type"] == "peer-joined"
        yield sender, receiver, receiver_id


async def closed(websocket: ClientConnection) -> tuple[int | None, str | None]:
    await asyncio.wait_for(websocket.wait_closed(), TIMEOUT)
    return websocket.close_code, websocket.close_reason


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 0xFFFF, 0x10000, 70_000])
def test_the_hub_frames_text_exactly_as_websockets_does(length):
    data = b"x" * length
    expected = Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])
    assert text_frame_header(length) + data == expected


async def test_frames_cut_anywhere_across_reads_arrive_whole_and_in_order(hub):
    async with pair(hub.url) as (sender, receiver, receiver_id):
        frames = b"".join(client_frame(Opcode.TEXT, relay(receiver_id, n)) for n in range(20))
        # One byte per write, with a turn of the event loop between: the hub reads each
        # frame in pieces, headers included.
        for offset in range(len(frames)):
            sender.transport.write(frames[offset : offset + 1])
            await asyncio.sleep(0)
        assert [(await recv_json(receiver))["payload"] for _ in range(20)] == list(range(20))


async def test_every_length_encoding_is_read(start_hub):
    hub = await start_hub(Limits(max_message_bytes=128 * KIB, max_buffered_bytes=512 * KIB))
    async with pair(hub.url) as (sender, receiver, receiver_id):
        # 7-bit, 16-bit and 64-bit lengths, from the envelope's size up.
        for size in (10, 200, 70_000):
            payload = "y" * size
            await sender.send(relay(receiver_id, payload).decode())
            assert (await recv_json(receiver))["payload"] == payload


async def test_a_fragmented_message_with_a_ping_inside_is_one_message(hub):
    async with pair(hub.url) as (sender, receiver, receiver_id):
        message = relay(receiver_id, "in three parts")
        sender.transport.write(
            client_frame(Opcode.TEXT, message[:10], fin=False)
            + client_frame(Opcode.PING, b"inside")
            + client_frame(Opcode.CONT, message[10:20], fin=False)
            + client_frame(Opcode.CONT, message[20:])
            + client_frame(Opcode.TEXT, relay(receiver_id, "after"))
        )
        assert (await recv_json(receiver))["payload"] == "in three parts"
        assert (await recv_json(receiver))["payload"] == "after"


NO_MASK = b"\x00\x00\x00\x00"
BROKEN_FRAMES = {
    "invalid-utf8": (
        client_frame(Opcode.TEXT, b'{"type":"leave"\xff}'),
        (1007, "invalid start byte at position 15"),
    ),
    "unmasked": (
        Frame(Opcode.TEXT, b"{}").serialize(mask=False, extensions=[]),
        (1002, "incorrect masking"),
    ),
    "unexpected-continuation": (
        client_frame(Opcode.CONT, b"{}"),
        (1002, "unexpected continuation frame"),
    ),
    # Written by hand: websockets refuses to write either.
    "long-ping": (
        b"\x89\xfe" + (126).to_bytes(2) + NO_MASK + b"p" * 126,
        (1002, "control frame too long"),
    ),
    "huge-length": (
        b"\x81\xff" + (2**40).to_bytes(8) + NO_MASK,
        (1009, "frame with 1099511627776 bytes exceeds limit of 65536 bytes"),
    ),
    "binary-fragment": (client_frame(Opcode.BINARY, b"\x00", fin=False), (1003, "binary-frame")),
}


@pytest.mark.parametrize(("frame", "close"), BROKEN_FRAMES.values(), ids=BROKEN_FRAMES.keys())
async def test_broken_frames_close_with_the_code_websockets_gives(hub, frame, close):
    async with pair(hub.url) as (sender, receiver, _):
        sender.transport.write(frame)
        assert await closed(sender) == close
        # The room hears that it left, and the hub still serves the rest.
        assert (await recv_json(receiver))["type"] == "peer-left"
        await receiver.send('{"type":"leave"}')
        await receiver.send('{"type":"leave"}')
        assert (await recv_json(receiver))["code"] == ErrorCode.NOT_JOINED
    assert hub.hub.metrics.closes_total[close[0]] == 1


async def test_data_sent_before_the_handshake_response_closes_with_1002(hub):
    host, port = hub.address
    reader, writer = await asyncio.open_connection(host, port)
    protocol = ClientProtocol(parse_uri(hub.url))
    protocol.send_request(protocol.connect())
    [request] = protocol.data_to_send()
    # RFC 6455 section 4.1: a client waits for the response before it sends anything.
    writer.write(request + client_frame(Opcode.TEXT, b'{"type":"join","room":"early"}'))
    events: list[Request | Response | Frame] = []
    while not any(isinstance(event, Frame) and event.opcode is Opcode.CLOSE for event in events):
        protocol.receive_data(await asyncio.wait_for(reader.read(4096), TIMEOUT))
        events += protocol.events_received()
    response, close_frame = events
    assert isinstance(response, Response) and response.status_code == 101
    assert isinstance(close_frame, Frame)
    assert Close.parse(close_frame.data) == Close(1002, "data before the opening handshake ended")
    writer.close()
    assert hub.hub.room_size("early") == 0


async def test_a_burst_in_one_write_is_served_in_order_over_several_turns(start_hub):
    hub = await start_hub(Limits(rate_burst=10_000, max_buffered_bytes=4096 * KIB))
    count = 10 * MESSAGES_PER_TURN + 3
    async with pair(hub.url) as (sender, receiver, receiver_id):
        sender.transport.write(
            b"".join(client_frame(Opcode.TEXT, relay(receiver_id, n)) for n in range(count))
        )
        assert [(await recv_json(receiver))["payload"] for _ in range(count)] == list(range(count))
        # Reading resumed after the burst: the sender is still served.
        await sender.send(relay(receiver_id, "after").decode())
        assert (await recv_json(receiver))["payload"] == "after"


def poll_waits(hub: HubServer) -> tuple[int, float]:
    """The hub's poll-pacing counters, as its /metrics serves them."""
    url = hub.url.replace("ws://", "http://") + "/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        lines = response.read().decode().splitlines()
    samples = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    waits = int(samples["blindhub_poll_waits_total"])
    return waits, float(samples["blindhub_poll_wait_seconds_total"])


@pytest.mark.parametrize("window", [0.005, 0.0], ids=["paced", "never"])
async def test_a_busy_hub_waits_before_polling_again_and_keeps_the_order(
    start_hub, monkeypatch, window
):
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(connections, "time", SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    hub = await start_hub(Limits(rate_burst=10_000, batch_window=window))
    rounds, per_round = 20, 25
    async with pair(hub.url) as (sender, receiver, receiver_id):
        # Twenty turns at least that relay 25 messages each: far more than two per window.
        for first in range(0, rounds * per_round, per_round):
            for n in range(first, first + per_round):
                await sender.send(relay(receiver_id, n).decode())
            got = [(await recv_json(receiver))["payload"] for _ in range(per_round)]
            assert got == list(range(first, first + per_round))
    waits, waited = await asyncio.to_thread(poll_waits, hub)
    if window:
        assert 0 < waits < rounds * per_round and 0 < waited <= waits * window
    else:
        assert (waits, waited) == (0, 0.0)
    # What the hub blocked its loop for is what the pacer decided, wait by wait.
    assert len(slept) == waits and sum(slept) == pytest.approx(waited, abs=1e-5)


async def test_a_busy_hub_waits_a_window_for_each_turn_a_burst_needs(start_hub):
    # Not one window in all (hub-protocol.md): each turn of MESSAGES_PER_TURN that sent
    # something is followed by the rest of a window, so the last of five turns' worth left
    # the hub two windows at least after the burst was sent, however the machine runs.
    window = 0.005
    hub = await start_hub(Limits(rate_burst=10_000, batch_window=window))
    count = 5 * MESSAGES_PER_TURN
    async with pair(hub.url) as (sender, receiver, receiver_id):
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        sender.transport.write(
            b"".join(client_frame(Opcode.TEXT, relay(receiver_id, n)) for n in range(count))
        )
        got = [(await recv_json(receiver))["payload"] for _ in range(count)]
        assert got == list(range(count))
        assert loop.time() - sent_at >= 2 * window


async def test_a_hub_that_was_busy_answers_at_once_once_the_load_stopped(start_hub, monkeypatch):
    # The hub's clock is the test's: it stands still through a burst, then a second passes
    # without a message, and the pacer's rate has decayed to nothing.
    now = [0.0]
    clock = SimpleNamespace(monotonic=lambda: now[0], sleep=time.sleep)
    monkeypatch.setattr(connections, "time", clock)
    hub = await start_hub(Limits(rate_burst=10_000, batch_window=0.005))
    async with pair(hub.url) as (sender, receiver, receiver_id):
        for n in range(25):
            await sender.send(relay(receiver_id, n).decode())
        assert [(await recv_json(receiver))["payload"] for _ in range(25)] == list(range(25))
        waits_when_busy, _ = await asyncio.to_thread(poll_waits, hub)
        assert waits_when_busy > 0
        now[0] += 1.0
        # Two messages now, one per turn at the same instant, are two in the pacer's rate
        # (below its four per 10 ms at this window), not two more after the burst's.
        for payload in ("once", "twice"):
            await sender.send(relay(receiver_id, payload).decode())
            assert (await recv_json(receiver))["payload"] == payload
        assert (await asyncio.to_thread(poll_waits, hub))[0] == waits_when_busy


class FaultyHub(Hub):
    """A routing core with a fault of its own: a relay whose payload is "boom" raises."""

    def handle(self, peer: PeerId, text: str, now: float) -> list[Delivery]:
        if '"boom"' in text:
            raise RuntimeError("injected routing fault")
        return super().handle(peer, text, now)


async def test_a_fault_of_the_hub_closes_that_connection_with_1011_and_is_logged(caplog):
    async with (
        HubServer(FaultyHub(Limits(max_peers_per_room=3))) as hub,
        pair(hub.url) as (sender, receiver, receiver_id),
    ):
        with caplog.at_level(logging.ERROR, logger="blindhub.hub.websockets"):
            await sender.send(relay(receiver_id, "boom").decode())
            assert await closed(sender) == (1011, "")
        [record] = [r for r in caplog.records if r.getMessage() == "handler failed"]
        assert record.exc_info is not None
        assert str(record.exc_info[1]) == "injected routing fault"
        # The room hears it left; the hub serves the others on.
        assert (await recv_json(receiver))["type"] == "peer-left"
        async with await connect(hub.url) as third:
            await third.send('{"type":"join","room":"r"}')
            assert (await recv_json(third))["peers"] == [receiver_id]
