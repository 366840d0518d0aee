"""The client's hub connection never trusts the hub: a scripted hostile hub sends it lies."""

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.server import ServerConnection, serve

from client.hub_connection import (
    HubClosed,
    HubConnection,
    PayloadTooLarge,
    Relayed,
    UnexpectedHubMessage,
    decode_payload,
)
from signaling.hub import KIB
from signaling.protocol import (
    ErrorCode,
    JsonText,
    MalformedHubMessage,
    PeerId,
    PeerJoined,
    Refused,
    RelayFrom,
    parse_hub_message,
)
from tests.conftest import wait_for

TIMEOUT = 10.0
ME, FRIEND = "me", "friend"
P2P = "peer-to-peer"
WELCOME = json.dumps(
    {"type": "welcome", "peer_id": ME, "room": "r", "peers": [FRIEND], "media": "peer-to-peer"}
)
RELAY_OK = '{"type":"relay","from":"friend","payload":{"ok":true}}'


@asynccontextmanager
async def scripted_hub(frames: Sequence[str | bytes]) -> AsyncIterator[str]:
    """A hub that answers the first message (a join) with ``frames``, then waits."""

    async def handler(connection: ServerConnection) -> None:
        await connection.recv()
        for frame in frames:
            await connection.send(frame)
        await connection.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


async def joined_to(url: str) -> HubConnection:
    hub = await HubConnection.connect(url, open_timeout=TIMEOUT)
    await asyncio.wait_for(hub.join("r"), TIMEOUT)
    return hub


async def test_a_well_behaved_hub_gives_typed_events():
    async with scripted_hub([WELCOME, RELAY_OK]) as url, await joined_to(url) as hub:
        assert (hub.peer_id, hub.room, hub.peers) == (ME, "r", {FRIEND})
        assert await hub.next_event() == Relayed(PeerId(FRIEND), {"ok": True})


@pytest.mark.parametrize(
    "welcome",
    [
        {"type": "welcome", "peer_id": ME, "room": "elsewhere", "peers": [], "media": P2P},
        {"type": "welcome", "peer_id": ME, "room": "r", "peers": [ME], "media": P2P},
        {"type": "welcome", "peer_id": ME, "room": "r", "peers": [FRIEND, FRIEND], "media": P2P},
        {"type": "peer-joined", "peer_id": FRIEND},
    ],
    ids=["other-room", "lists-me", "duplicate", "not-a-welcome"],
)
async def test_a_lying_welcome_is_rejected(welcome):
    async with scripted_hub([json.dumps(welcome)]) as url:
        hub = await HubConnection.connect(url)
        async with hub:
            with pytest.raises(UnexpectedHubMessage):
                await asyncio.wait_for(hub.join("r"), TIMEOUT)
            assert hub.room is None and hub.peer_id is None


@pytest.mark.parametrize(
    ("frame", "error", "code"),
    [
        ('{"type":"relay","from":"stranger","payload":1}', UnexpectedHubMessage, None),
        ('{"type":"peer-left","peer_id":"stranger"}', UnexpectedHubMessage, None),
        ('{"type":"peer-joined","peer_id":"friend"}', UnexpectedHubMessage, None),
        ('{"type":"peer-joined","peer_id":"me"}', UnexpectedHubMessage, None),
        (WELCOME, UnexpectedHubMessage, None),
        ("{not json", MalformedHubMessage, ErrorCode.INVALID_JSON),
        (b"\x01binary", MalformedHubMessage, ErrorCode.INVALID_JSON),
        ('{"type":"relay","from":"friend","payload":{"a":1,"a":2}}', MalformedHubMessage, "dup"),
        ('{"type":"relay","from":"friend","payload":[NaN]}', MalformedHubMessage, "nan"),
        ('{"type":"kick"}', MalformedHubMessage, ErrorCode.UNKNOWN_TYPE),
        ('{"type":"error","code":"unknown-peer","message":"m"}', Refused, ErrorCode.UNKNOWN_PEER),
    ],
)
async def test_each_bad_hub_message_raises_its_type_and_the_state_survives(frame, error, code):
    async with scripted_hub([WELCOME, frame, RELAY_OK]) as url, await joined_to(url) as hub:
        with pytest.raises(error) as raised:
            await asyncio.wait_for(hub.next_event(), TIMEOUT)
        if isinstance(code, ErrorCode):
            assert raised.value.code is code
        assert hub.peers == {FRIEND}
        assert await hub.next_event() == Relayed(PeerId(FRIEND), {"ok": True})


async def test_an_oversized_hub_frame_closes_with_1009():
    huge = json.dumps({"type": "relay", "from": FRIEND, "payload": "x" * (70 * KIB)})
    async with scripted_hub([WELCOME, huge]) as url, await joined_to(url) as hub:
        with pytest.raises(HubClosed) as closed:
            await asyncio.wait_for(hub.next_event(), TIMEOUT)
        assert closed.value.code == 1009


async def test_relay_refuses_locally_what_the_hub_would_refuse(hub):
    async with await HubConnection.connect(hub.url) as client:
        await client.join("r")
        with pytest.raises(PayloadTooLarge):
            await client.relay(PeerId("someone"), "x" * (64 * KIB))
        with pytest.raises(ValueError, match="Out of range float"):
            await client.relay(PeerId("someone"), float("nan"))
        # The connection is intact: the hub answers the next request.
        await client.relay(PeerId("someone"), "small")
        with pytest.raises(Refused) as refusal:
            await asyncio.wait_for(client.next_event(), TIMEOUT)
        assert refusal.value.code is ErrorCode.UNKNOWN_PEER


async def test_events_of_a_room_left_are_dropped_until_the_next_join_is_answered(hub):
    async with (
        await HubConnection.connect(hub.url) as alice,
        await HubConnection.connect(hub.url) as bob,
        await HubConnection.connect(hub.url) as carol,
    ):
        alice_id = (await alice.join("old")).peer_id
        bob_id = (await bob.join("old")).peer_id
        # Bob does not read: a relay and a peer-left of the old room wait in his buffer.
        await alice.relay(bob_id, "in flight")
        await alice.leave()
        await asyncio.wait_for(alice.join("elsewhere"), TIMEOUT)  # the hub did both
        await bob.leave()
        welcome = await asyncio.wait_for(bob.join("new"), TIMEOUT)
        assert (welcome.peers, bob.room, bob.peers) == ((), "new", set())
        carol_id = (await carol.join("new")).peer_id
        assert await asyncio.wait_for(bob.next_event(), TIMEOUT) == PeerJoined(carol_id)
        await carol.relay(bob_id, "new room")  # a peer id lasts as long as its connection
        assert await asyncio.wait_for(bob.next_event(), TIMEOUT) == Relayed(carol_id, "new room")
        assert alice_id not in bob.peers


async def test_after_leave_events_of_the_room_left_are_dropped_and_lies_still_raise():
    stranger_relay = '{"type":"relay","from":"stranger","payload":1}'
    frames = [WELCOME, RELAY_OK, '{"type":"peer-left","peer_id":"friend"}', stranger_relay]
    async with scripted_hub(frames) as url, await joined_to(url) as hub:
        await hub.leave()
        assert (hub.room, hub.peers) == (None, set())
        with pytest.raises(UnexpectedHubMessage, match="relay from a peer not in this room"):
            await asyncio.wait_for(hub.next_event(), TIMEOUT)


async def test_events_iterate_until_the_hub_goes_away(start_hub):
    hub = await start_hub()
    async with (
        await HubConnection.connect(hub.url) as alice,
        await HubConnection.connect(hub.url) as bob,
    ):
        await alice.join("r")
        bob_id = (await bob.join("r")).peer_id
        events: list[object] = []
        task = asyncio.create_task(_collect(alice, events))
        await wait_for(lambda: len(events) == 1, TIMEOUT)
        await hub.close()
        await asyncio.wait_for(task, TIMEOUT)
    assert events == [PeerJoined(bob_id)]


async def _collect(hub: HubConnection, events: list[object]) -> None:
    async for event in hub:
        events.append(event)


# -- the payload decoder: strict JSON, whatever the hub let through -----------------------


@pytest.mark.parametrize("payload", ['{"a":1,"a":2}', '[{"b":{"a":1,"a":1}}]'])
def test_the_client_refuses_duplicate_names_the_hub_forwards(payload):
    frame = f'{{"type":"relay","from":"p","payload":{payload}}}'
    assert parse_hub_message(frame) == RelayFrom(PeerId("p"), JsonText(payload))
    with pytest.raises(MalformedHubMessage, match="duplicate name") as refused:
        decode_payload(JsonText(payload))
    assert refused.value.code is ErrorCode.INVALID_JSON


@pytest.mark.parametrize(
    "payload",
    [
        "[NaN]",
        '{"x":-Infinity}',
        "[1,]",
        "01",
        '"\u0000',
        "1e400",
        "[-1E999]",
        "[" * 100 + "]" * 100,
    ],
)
def test_the_payload_decoder_refuses_what_is_not_strict_json(payload):
    with pytest.raises(MalformedHubMessage) as refused:
        decode_payload(JsonText(payload))
    assert refused.value.code is ErrorCode.INVALID_JSON


def test_the_payload_decoder_keeps_every_json_value():
    payload = '{"a":[1,2.5,"\u00e9",null,true],"b":{"a":{}}}'
    assert decode_payload(JsonText(payload)) == json.loads(payload)
