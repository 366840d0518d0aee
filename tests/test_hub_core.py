"""The wire format and the routing core, without sockets: frames in, deliveries out."""

import itertools
import json
import sys
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signaling.hub import Delivery, Hub, Limits
from signaling.protocol import (
    ErrorCode,
    ErrorMessage,
    Join,
    JsonText,
    Leave,
    MalformedHubMessage,
    MediaAnswer,
    MediaMode,
    MediaOffer,
    MediaTrack,
    MediaTracks,
    PeerId,
    PeerJoined,
    PeerLeft,
    Refused,
    RelayFrom,
    RelayTo,
    Welcome,
    parse_client_message,
    parse_client_message_strictly,
    parse_hub_message,
)

INVALID = ErrorCode.INVALID_FIELD


def counter_ids() -> Callable[[], PeerId]:
    numbers = itertools.count(1)
    return lambda: PeerId(f"peer{next(numbers)}")


def make_hub(**limits) -> Hub:
    return Hub(Limits(**limits), new_peer_id=counter_ids())


def joined(hub: Hub, room: str, count: int) -> list[PeerId]:
    peers = [hub.connect(now=0.0) for _ in range(count)]
    for peer in peers:
        hub.handle(peer, json.dumps({"type": "join", "room": room}), now=0.0)
    return peers


def error_code(deliveries: list[Delivery]) -> ErrorCode:
    [delivery] = deliveries
    assert isinstance(delivery.message, ErrorMessage)
    return delivery.message.code


def test_join_welcomes_with_the_peers_already_there_and_announces_the_newcomer():
    hub = make_hub()
    first, second = hub.connect(0.0), hub.connect(0.0)
    assert hub.handle(first, '{"type":"join","room":"r"}', 0.0) == [
        Delivery(first, Welcome(first, "r", ()), "r")
    ]
    assert hub.handle(second, '{"type":"join","room":"r"}', 0.0) == [
        Delivery(second, Welcome(second, "r", (first,)), "r"),
        Delivery(first, PeerJoined(second), "r"),
    ]
    assert (hub.room_count, hub.connection_count) == (1, 2)


def test_relay_forwards_the_exact_payload_text_both_ways():
    hub = make_hub()
    alice, bob = joined(hub, "r", 2)
    # Whitespace, spellings a re-encoding would change (1.50E+308, 1e-400 which reads as 0.0),
    # a huge integer and escapes survive byte for byte. (A non-finite 1e999 is refused.)
    payload = (
        '{"sdp": "v=0\\r\\n",  "n": 1.50E+308, "tiny": 1e-400, "big": 12345678901234567890, '
        '"u": "\\u00e9"}'
    )
    frame = f'{{"type": "relay", "to": "{bob}", "payload": {payload}}}'
    assert hub.handle(alice, frame, 0.0) == [
        Delivery(bob, RelayFrom(alice, JsonText(payload)), "r")
    ]
    assert hub.handle(bob, f'{{"type":"relay","to":"{alice}","payload":null}}', 0.0) == [
        Delivery(alice, RelayFrom(bob, JsonText("null")), "r")
    ]
    assert hub.metrics.messages_relayed_total == 2


def test_third_peer_gets_room_full_and_nothing_changes():
    hub = make_hub()
    alice, bob = joined(hub, "r", 2)
    carol = hub.connect(0.0)
    assert error_code(hub.handle(carol, '{"type":"join","room":"r"}', 0.0)) is ErrorCode.ROOM_FULL
    assert hub.room_of(carol) is None
    assert hub.handle(alice, f'{{"type":"relay","to":"{carol}","payload":1}}', 0.0)[0].message == (
        ErrorMessage(ErrorCode.UNKNOWN_PEER, "no such peer in this room")
    )
    assert hub.handle(alice, f'{{"type":"relay","to":"{bob}","payload":1}}', 0.0) == [
        Delivery(bob, RelayFrom(alice, JsonText("1")), "r")
    ]


def test_rooms_are_isolated():
    hub = make_hub()
    alice, _ = joined(hub, "one", 2)
    carol, _ = joined(hub, "two", 2)
    frame = f'{{"type":"relay","to":"{carol}","payload":1}}'
    assert error_code(hub.handle(alice, frame, 0.0)) is ErrorCode.UNKNOWN_PEER


@pytest.mark.parametrize("how", ["leave", "disconnect"])
def test_peer_left_on_leave_and_on_disconnect(how):
    hub = make_hub()
    alice, bob = joined(hub, "r", 2)
    leave = '{"type":"leave"}'
    deliveries = hub.handle(bob, leave, 0.0) if how == "leave" else hub.disconnect(bob)
    assert deliveries == [Delivery(alice, PeerLeft(bob), "r")]
    assert hub.handle(alice, '{"type":"leave"}', 0.0) == []
    assert hub.room_count == 0


def test_room_size_counts_the_peers_in_a_room_as_they_join_and_leave():
    hub = make_hub()
    assert hub.room_size("r") == 0
    alice, bob = joined(hub, "r", 2)
    carol = hub.connect(0.0)
    hub.handle(carol, '{"type":"join","room":"r"}', 0.0)  # refused: the room is full
    assert (hub.room_size("r"), hub.room_size("other")) == (2, 0)
    hub.handle(alice, '{"type":"leave"}', 0.0)
    assert hub.room_size("r") == 1
    hub.disconnect(bob)
    assert hub.room_size("r") == 0


def test_a_peer_in_no_room_has_a_join_deadline():
    hub = make_hub(join_timeout=10.0)
    peer = hub.connect(now=5.0)
    assert hub.join_deadline(peer) == 15.0
    hub.handle(peer, '{"type":"join","room":"r"}', now=6.0)
    assert hub.join_deadline(peer) is None
    hub.handle(peer, '{"type":"leave"}', now=30.0)
    assert hub.join_deadline(peer) == 40.0
    # Refused requests from a peer in no room do not move its deadline.
    hub.handle(peer, '{"type":"leave"}', now=35.0)
    assert hub.join_deadline(peer) == 40.0


def test_a_peer_served_in_a_room_elsewhere_gets_a_fresh_join_deadline():
    hub = make_hub(join_timeout=10.0)
    peer = hub.connect(now=5.0)
    hub.served_elsewhere(peer, now=100.0)
    assert hub.join_deadline(peer) == 110.0


def test_a_frame_the_edge_refuses_costs_a_token_and_is_counted():
    hub = make_hub(rate_per_second=1.0, rate_burst=1)
    peer = hub.connect(now=0.0)
    unavailable = ErrorMessage(ErrorCode.CLUSTER_UNAVAILABLE, "retry later")
    assert hub.refuse(peer, unavailable, now=0.0) == [Delivery(peer, unavailable, None)]
    # The bucket is empty now: the next refusal is the rate limit's.
    assert error_code(hub.refuse(peer, unavailable, now=0.0)) is ErrorCode.RATE_LIMITED
    assert hub.metrics.errors_total == {
        ErrorCode.CLUSTER_UNAVAILABLE: 1,
        ErrorCode.RATE_LIMITED: 1,
    }


def test_a_frame_the_edge_carries_out_costs_a_token_once_asked_for():
    hub = make_hub(rate_per_second=1.0, rate_burst=1)
    peer = hub.connect(now=0.0)
    assert hub.may_send(peer, now=0.0) and hub.may_send(peer, now=0.0)  # asking spends nothing
    assert hub.charge(peer, now=0.0) == []
    assert not hub.may_send(peer, now=0.5)
    assert error_code(hub.charge(peer, now=0.5)) is ErrorCode.RATE_LIMITED
    assert hub.may_send(peer, now=1.5)


def test_a_peer_that_left_can_join_again():
    hub = make_hub()
    [alice] = joined(hub, "r", 1)
    hub.handle(alice, '{"type":"leave"}', 0.0)
    assert hub.handle(alice, '{"type":"join","room":"s"}', 0.0)[0].message == (
        Welcome(alice, "s", ())
    )


BAD_FRAMES = [
    ("{", ErrorCode.INVALID_JSON),
    ("", ErrorCode.INVALID_JSON),
    ('{"type":"join","room":"r"} {}', ErrorCode.INVALID_JSON),
    ('{"type":"relay","to":"x","payload":NaN}', ErrorCode.INVALID_JSON),
    (
        '{"type":"relay","to":"x","payload":' + "[" * 100_000 + "]" * 100_000 + "}",
        ErrorCode.INVALID_JSON,
    ),
    ('{"type":"relay","to":"x","payload":' + "9" * 5000 + "}", ErrorCode.INVALID_JSON),
    ("[]", ErrorCode.NOT_AN_OBJECT),
    ('"join"', ErrorCode.NOT_AN_OBJECT),
    ("null", ErrorCode.NOT_AN_OBJECT),
    ('{"type":"dance"}', ErrorCode.UNKNOWN_TYPE),
    ("{}", ErrorCode.INVALID_FIELD),
    ('{"type":7}', ErrorCode.INVALID_FIELD),
    ('{"type":"join"}', ErrorCode.INVALID_FIELD),
    ('{"type":"join","room":5}', ErrorCode.INVALID_FIELD),
    ('{"type":"join","room":"r","extra":1}', ErrorCode.INVALID_FIELD),
    ('{"type":"join","room":"r","room":"s"}', ErrorCode.INVALID_FIELD),
    ('{"type":"relay","to":"x"}', ErrorCode.INVALID_FIELD),
    ('{"type":"relay","to":["x"],"payload":1}', ErrorCode.INVALID_FIELD),
    ('{"type":"join","room":""}', ErrorCode.INVALID_ROOM),
    ('{"type":"join","room":"a b"}', ErrorCode.INVALID_ROOM),
    ('{"type":"join","room":"r\\n"}', ErrorCode.INVALID_ROOM),
    ('{"type":"join","room":"' + "r" * 65 + '"}', ErrorCode.INVALID_ROOM),
    ('{"type":"join","room":"caf\\u00e9"}', ErrorCode.INVALID_ROOM),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES, ids=[code for _, code in BAD_FRAMES])
def test_each_malformed_frame_has_its_code_and_changes_nothing(frame, code):
    hub = make_hub()
    alice, bob = joined(hub, "r", 2)
    [stranger] = joined(hub, "s", 1)
    assert error_code(hub.handle(stranger, frame, 0.0)) is code
    assert hub.metrics.errors_total == {code: 1}
    assert hub.room_of(stranger) == "s"
    assert hub.handle(alice, f'{{"type":"relay","to":"{bob}","payload":1}}', 0.0) == [
        Delivery(bob, RelayFrom(alice, JsonText("1")), "r")
    ]


def test_requests_out_of_order_are_refused_with_their_codes():
    hub = make_hub()
    lonely = hub.connect(0.0)
    assert error_code(hub.handle(lonely, '{"type":"relay","to":"x","payload":1}', 0.0)) is (
        ErrorCode.NOT_JOINED
    )
    assert error_code(hub.handle(lonely, '{"type":"leave"}', 0.0)) is ErrorCode.NOT_JOINED
    [alice] = joined(hub, "r", 1)
    assert error_code(hub.handle(alice, '{"type":"join","room":"s"}', 0.0)) is (
        ErrorCode.ALREADY_JOINED
    )
    assert error_code(hub.handle(alice, f'{{"type":"relay","to":"{alice}","payload":1}}', 0.0)) is (
        ErrorCode.UNKNOWN_PEER
    )
    assert hub.room_of(alice) == "r"


def test_room_and_connection_limits():
    hub = make_hub(max_rooms=1, max_connections=3)
    joined(hub, "r", 1)
    late = hub.connect(0.0)
    assert error_code(hub.handle(late, '{"type":"join","room":"s"}', 0.0)) is (
        ErrorCode.TOO_MANY_ROOMS
    )
    hub.connect(0.0)
    with pytest.raises(Refused) as refusal:
        hub.connect(0.0)
    assert refusal.value.code is ErrorCode.HUB_FULL
    assert hub.connection_count == 3


def test_token_bucket_refuses_a_burst_then_refills_with_time():
    hub = make_hub(rate_per_second=10.0, rate_burst=5)
    [alice] = joined(hub, "r", 1)  # the join spent one token at t=0
    leave_rejoin = ['{"type":"leave"}', '{"type":"join","room":"r"}']
    outcomes = [hub.handle(alice, leave_rejoin[i % 2], 0.0) for i in range(6)]
    refused = [d for d in outcomes if d and isinstance(d[0].message, ErrorMessage)]
    assert len(refused) == 2  # 4 tokens left of 5
    assert hub.metrics.errors_total[ErrorCode.RATE_LIMITED] == 2
    # 0.1 s later exactly one token is back.
    assert hub.handle(alice, leave_rejoin[0], 0.1) == []
    assert error_code(hub.handle(alice, leave_rejoin[1], 0.1)) is ErrorCode.RATE_LIMITED


def test_a_flood_is_logged_once(caplog):
    hub = make_hub(rate_per_second=1.0, rate_burst=1)
    [alice] = joined(hub, "r", 1)
    with caplog.at_level("INFO", logger="blindhub.hub"):
        for _ in range(100):
            hub.handle(alice, '{"type":"leave"}', 0.0)
    assert [r.fields["code"] for r in caplog.records if r.getMessage() == "error"] == [
        "rate-limited"
    ]
    assert hub.metrics.errors_total[ErrorCode.RATE_LIMITED] == 100


def test_logs_never_contain_payloads(caplog):
    hub = make_hub()
    alice, bob = joined(hub, "r", 2)
    with caplog.at_level("DEBUG"):
        hub.handle(alice, f'{{"type":"relay","to":"{bob}","payload":"SECRET"}}', 0.0)
        hub.handle(alice, '{"type":"relay","to":"nobody","payload":"SECRET"}', 0.0)
        hub.handle(alice, '{"type":"relay","payload":"SECRET"', 0.0)
    logged = " ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "error" in logged
    assert "SECRET" not in logged


def test_limits_reject_nonsense():
    with pytest.raises(ValueError, match="max_buffered_bytes"):
        Limits(max_message_bytes=1000, max_buffered_bytes=1500)
    with pytest.raises(ValueError, match="max_peers_per_room"):
        Limits(max_peers_per_room=0)
    with pytest.raises(ValueError, match="join timeouts must be positive"):
        Limits(join_timeout=0)


HUB_MESSAGES = [
    Welcome(PeerId("a"), "r", (PeerId("b"), PeerId("c"))),
    PeerJoined(PeerId("a-_9")),
    PeerLeft(PeerId("a")),
    RelayFrom(PeerId("a"), JsonText('{"x": [1, 2.5e3, "\\u0000"]}')),
    ErrorMessage(ErrorCode.ROOM_FULL, "the room is full"),
    Welcome(PeerId("a"), "r", (), MediaMode.ROUTED),
    MediaOffer("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"),
    MediaTracks((MediaTrack("2", "audio", PeerId("b")), MediaTrack("3", "video", PeerId("b")))),
    MediaTracks(()),
    ErrorMessage(ErrorCode.INVALID_SDP, "cannot apply the media-answer"),
]


@pytest.mark.parametrize("message", HUB_MESSAGES, ids=lambda m: m.TYPE)
def test_hub_messages_round_trip(message):
    assert parse_hub_message(message.encode()) == message


@pytest.mark.parametrize(
    "message", [Join("room_1"), RelayTo("p", JsonText("[]")), Leave(), MediaAnswer("v=0")], ids=repr
)
def test_client_messages_round_trip(message):
    assert parse_client_message(message.encode()) == message


@pytest.mark.parametrize("payload", ['{"a":1,"a":2}', '[{"b":{"a":1,"a":1}}]'])
def test_the_hub_forwards_duplicate_names_unread(payload):
    # The receiving client refuses them (test_hub_connection.py); the hub forwards the text.
    frame = f'{{"type":"relay","from":"p","payload":{payload}}}'
    assert parse_hub_message(frame) == RelayFrom(PeerId("p"), JsonText(payload))


# 1.5e308 * 10 spelled out in full is the third; the last is the first decimal past the
# halfway point above the largest double, so it rounds to infinity.
NOT_FINITE = [
    "1e400", "-1E999", "15" + "0" * 308 + ".0", "NaN", "Infinity", "-Infinity", "+1", "1E+999",
    "0.000001e400", "-" + "9" * 400 + ".5", "1.797693134862315808e308",
]  # fmt: skip


@pytest.mark.parametrize("number", NOT_FINITE)
def test_the_hub_refuses_numbers_that_are_not_finite_doubles(number):
    # Python's json reads these as infinity; the hub's scanner refuses them as not JSON.
    for frame in (
        f'{{"type":"relay","to":"p","payload":{number}}}',
        f'{{"type":"relay","to":"p","payload":{{"a":[{number}]}}}}',
    ):
        with pytest.raises(MalformedHubMessage) as refused:
            parse_client_message(frame)
        assert refused.value.code is ErrorCode.INVALID_JSON


def test_the_hub_still_forwards_large_finite_numbers_and_integers():
    # The second is the last decimal below the halfway point: it rounds to the largest double.
    for payload in (
        "1.7976931348623157e308", "1.797693134862315807e308", "-1e-400", "1" + "0" * 400,
        "9" * 4300, "-" + "9" * 4300, "0." + "0" * 400 + "1e400",
    ):  # fmt: skip
        frame = f'{{"type":"relay","to":"p","payload":{payload}}}'
        assert parse_client_message(frame) == RelayTo(PeerId("p"), JsonText(payload))


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"type":"welcome","peer_id":"a","room":"r","peers":"b","media":"routed"}', INVALID),
        ('{"type":"welcome","peer_id":"a","room":"r","peers":["b c"],"media":"routed"}', INVALID),
        ('{"type":"welcome","peer_id":"a","room":"r","peers":[]}', INVALID),
        ('{"type":"welcome","peer_id":"a","room":"r","peers":[],"media":"sfu"}', INVALID),
        ('{"type":"media-offer","sdp":1}', INVALID),
        ('{"type":"media-offer","sdp":"v=0","x":1}', INVALID),
        ('{"type":"media-tracks","tracks":{}}', INVALID),
        ('{"type":"media-tracks","tracks":[{"mid":"2","kind":"audio"}]}', INVALID),
        ('{"type":"media-tracks","tracks":[{"mid":"2","kind":"data","peer_id":"a"}]}', INVALID),
        ('{"type":"media-tracks","tracks":[{"mid":"2 ","kind":"audio","peer_id":"a"}]}', INVALID),
        ('{"type":"media-tracks","tracks":[{"mid":"2","kind":"audio","peer_id":"a b"}]}', INVALID),
        (
            '{"type":"media-tracks","tracks":[{"mid":"2","kind":"audio","peer_id":"a"},'
            '{"mid":"2","kind":"video","peer_id":"b"}]}',
            INVALID,
        ),
        ('{"type":"peer-joined","peer_id":""}', ErrorCode.INVALID_FIELD),
        ('{"type":"relay","to":"a","payload":1}', ErrorCode.INVALID_FIELD),
        ('{"type":"error","code":"made-up","message":"m"}', ErrorCode.INVALID_FIELD),
        ('{"type":"join","room":"r"}', ErrorCode.UNKNOWN_TYPE),
    ],
)
def test_bad_hub_messages_have_their_codes(frame, code):
    with pytest.raises(MalformedHubMessage) as error:
        parse_hub_message(frame)
    assert error.value.code is code


@given(st.text(max_size=200))
def test_any_text_parses_or_raises_a_coded_error(text):
    try:
        parse_client_message(text)
    except MalformedHubMessage as error:
        assert error.code in ErrorCode


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(json_values, st.sampled_from(["", " ", "\n\t "]))
def test_any_json_payload_is_relayed_as_the_same_text(value, space):
    payload = json.dumps(value, indent=space or None)
    frame = f'{{{space}"type":"relay",{space}"to":"p",{space}"payload":{space}{payload}{space}}}'
    assert parse_client_message(frame) == RelayTo("p", JsonText(payload))


def relay_frame(payload: str) -> str:
    return f'{{"type":"relay","to":"p","payload":{payload}}}'


@pytest.mark.parametrize(
    ("payload", "accepted"),
    [
        ("9" * 4301, False),  # over the interpreter's 4,300 digits
        ("-" + "9" * 4301, False),
        ("[" * 64 + "]" * 64, True),
        ("[" * 65 + "]" * 65, True),  # past the fast path's bound: the strict scanner decides
        ("[" * 900 + "]" * 900, True),
        ("[" * 5000 + "]" * 5000, False),  # nested too deeply
        ('{"a":' * 500 + "1" + "}" * 500, True),
        ('"\\ud800"', True),  # a lone surrogate escape: msgspec refuses it, Python's json not
        ('"\\udc00\\ud800"', True),
        ('{"a":1,"a":2}', True),  # duplicate names inside a payload are forwarded unread
        ('"\x01"', False),  # a raw control character in a string
        ('"\\x"', False),
        ("[1,]", False),
        ("01", False),
        ("1.", False),
        ('"a" "b"', False),
        ("", False),
    ],
    ids=lambda value: value[:12] if isinstance(value, str) else str(value),
)
def test_the_fast_path_and_the_strict_scanner_agree_on_each_rule(payload, accepted):
    frame = relay_frame(payload)
    if accepted:
        assert parse_client_message(frame) == RelayTo("p", JsonText(payload))
        assert parse_client_message_strictly(frame) == RelayTo("p", JsonText(payload))
    else:
        for parse in (parse_client_message, parse_client_message_strictly):
            with pytest.raises(MalformedHubMessage) as refused:
                parse(frame)
            assert refused.value.code is ErrorCode.INVALID_JSON


@pytest.fixture
def int_digits_limit() -> Iterator[None]:
    saved = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(1000)
    yield
    sys.set_int_max_str_digits(saved)


@pytest.mark.usefixtures("int_digits_limit")
def test_a_lower_integer_limit_of_the_interpreter_is_kept():
    # msgspec's own limit is 4,300 digits; the hub refuses what the interpreter refuses.
    with pytest.raises(MalformedHubMessage) as refused:
        parse_client_message(relay_frame("9" * 2000))
    assert refused.value.code is ErrorCode.INVALID_JSON


def strict_outcome(parse: Callable[[str], object], text: str) -> object:
    try:
        return parse(text)
    except MalformedHubMessage as error:
        return error.code


# Envelopes in and out of the fast path's layout, around payloads that are JSON or nearly.
envelopes = st.sampled_from(
    [
        '{"type":"relay","to":"p","payload":%s}',
        ' {\t"type" : "relay" ,\n"to":"p q\u00e9","payload":\r%s } \n',
        '{"type":"relay","to":"p\\n","payload":%s}',
        '{"to":"p","type":"relay","payload":%s}',
        '{"type":"relay","to":"p","payload":%s,"to":"q"}',
        '{"type":"relay","to":"p","payload":%s',
        '{"type":"relay","to":"p","payload":%s}}',
    ]
)
near_json = st.text(alphabet='[]{}",:0123456789.eE+-tfrunlasNIiy \\\x01u\u00e9', max_size=30)


@given(envelopes, st.one_of(near_json, json_values.map(json.dumps)))
def test_the_fast_path_agrees_with_the_strict_scanner(envelope, payload):
    frame = envelope.replace("%s", payload)
    assert strict_outcome(parse_client_message, frame) == strict_outcome(
        parse_client_message_strictly, frame
    )


def test_welcome_text_names_the_media_mode():
    assert Welcome(PeerId("a"), "r", (PeerId("b"),)).encode() == (
        '{"type":"welcome","peer_id":"a","room":"r","peers":["b"],"media":"peer-to-peer"}'
    )


def test_a_hub_that_does_not_route_media_refuses_a_media_answer():
    hub = make_hub()
    peer = hub.connect(0.0)
    answer = MediaAnswer("v=0").encode()
    for frame in (answer, Join("r").encode(), answer):
        deliveries = hub.handle(peer, frame, 0.0)
    assert deliveries == [
        Delivery(
            peer, ErrorMessage(ErrorCode.UNEXPECTED_MEDIA, "this hub does not route media"), "r"
        )
    ]
    assert hub.metrics.errors_total[ErrorCode.UNEXPECTED_MEDIA] == 2
    assert hub.join_deadline(peer) is None
