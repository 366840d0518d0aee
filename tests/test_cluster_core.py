"""The cluster's routing core alone: what it decides, and the operations it asks the edge for."""

import itertools

from signaling.cluster import FINAL_SEQ, ClusterCore, Event, JoinOp, LeaveOp, RelayOp, parse_event
from signaling.hub import Delivery, Limits
from signaling.protocol import (
    ErrorCode,
    ErrorMessage,
    JsonText,
    PeerId,
    PeerJoined,
    PeerLeft,
    RelayFrom,
    Welcome,
)

NODE = "n1"


def core(**limits) -> ClusterCore:
    ids = (PeerId(f"p{n}") for n in itertools.count(1))
    return ClusterCore(NODE, Limits(**limits), new_peer_id=lambda: next(ids))


def joined(hub: ClusterCore, room: str, others: list[tuple[PeerId, str]]) -> PeerId:
    peer = hub.connect(0.0)
    assert hub.handle(peer, f'{{"type":"join","room":"{room}"}}', 0.0) == []
    [op] = hub.take_ops(peer)
    assert op == JoinOp(peer, room, 1)
    assert isinstance(op, JoinOp)
    hub.joined(op, others)
    return peer


def test_a_join_waits_for_the_store_and_welcomes_with_the_members_of_every_node():
    hub = core()
    local = joined(hub, "r", [])
    peer = hub.connect(0.0)
    hub.handle(peer, '{"type":"join","room":"r"}', 0.0)
    # A second join while the first is with the store is refused at once.
    [refusal] = hub.handle(peer, '{"type":"join","room":"r"}', 0.0)
    assert isinstance(refusal.message, ErrorMessage)
    assert refusal.message.code is ErrorCode.ALREADY_JOINED
    [op] = hub.take_ops(peer)
    assert isinstance(op, JoinOp)
    deliveries = hub.joined(op, [(PeerId("remote"), "n2"), (local, NODE)])
    assert deliveries == [
        Delivery(peer, Welcome(peer, "r", (PeerId("remote"), local)), "r"),
        Delivery(local, PeerJoined(peer), "r"),  # the store told the remote one
    ]


def test_relays_between_local_peers_never_reach_the_store_and_others_do_in_order():
    hub = core()
    alice = joined(hub, "r", [])
    bob = joined(hub, "r", [(alice, NODE)])
    assert hub.handle(alice, f'{{"type":"relay","to":"{bob}","payload":1}}', 0.0) == [
        Delivery(bob, RelayFrom(alice, JsonText("1")), "r")
    ]
    assert hub.take_ops(alice) == []
    for n in (2, 3):
        assert hub.handle(alice, f'{{"type":"relay","to":"far","payload":{n}}}', 0.0) == []
    assert hub.take_ops(alice) == [
        RelayOp(alice, "far", "r", JsonText("2"), 2),
        RelayOp(alice, "far", "r", JsonText("3"), 3),
    ]


def test_without_the_store_joins_and_remote_relays_are_refused_and_leaves_are_kept():
    hub = core()
    alice = joined(hub, "r", [])
    bob = joined(hub, "r", [(alice, NODE)])
    hub.available = False
    newcomer = hub.connect(0.0)
    [refusal] = hub.handle(newcomer, '{"type":"join","room":"s"}', 0.0)
    assert isinstance(refusal.message, ErrorMessage)
    assert refusal.message.code is ErrorCode.CLUSTER_UNAVAILABLE
    [refusal] = hub.handle(alice, '{"type":"relay","to":"far","payload":1}', 0.0)
    assert isinstance(refusal.message, ErrorMessage)
    assert refusal.message.code is ErrorCode.CLUSTER_UNAVAILABLE
    [local] = hub.handle(alice, f'{{"type":"relay","to":"{bob}","payload":1}}', 0.0)
    assert local.recipient == bob
    assert hub.disconnect(alice) == [Delivery(bob, PeerLeft(alice), "r")]
    assert hub.take_ops(alice) == [LeaveOp(alice, "r", 2)]


def test_an_event_read_twice_is_delivered_once_and_a_left_room_hears_nothing():
    hub = core()
    alice = joined(hub, "r", [])
    remote = PeerId("remote")
    joined_event = Event(Event.JOINED, remote, "r", 1)
    relay = Event(Event.RELAY, remote, "r", 2, JsonText('"hi"'))
    assert hub.receive(alice, joined_event) == [Delivery(alice, PeerJoined(remote), "r")]
    assert hub.receive(alice, relay) == [Delivery(alice, RelayFrom(remote, JsonText('"hi"')), "r")]
    assert hub.receive(alice, relay) == []
    assert hub.receive(alice, joined_event) == []
    assert hub.cluster_metrics.duplicates_dropped_total == 2
    left = Event(Event.LEFT, remote, "r", FINAL_SEQ)
    assert hub.receive(alice, left) == [Delivery(alice, PeerLeft(remote), "r")]
    assert hub.receive(alice, Event(Event.RELAY, remote, "r", 3, JsonText("1"))) == []
    hub.handle(alice, '{"type":"leave"}', 0.0)
    assert hub.receive(alice, Event(Event.RELAY, PeerId("x"), "r", 1, JsonText("1"))) == []


def test_store_refusals_become_the_single_process_errors():
    hub = core()
    peer = hub.connect(0.0)
    hub.handle(peer, '{"type":"join","room":"r"}', 0.0)
    [op] = hub.take_ops(peer)
    for code in (ErrorCode.ROOM_FULL, ErrorCode.TOO_MANY_ROOMS, ErrorCode.CLUSTER_UNAVAILABLE):
        [error] = hub.refused(op, code)
        assert isinstance(error.message, ErrorMessage)
        assert error.message.code is code
    assert hub.room_of(peer) is None
    assert hub.metrics.errors_total[ErrorCode.ROOM_FULL] == 1


def test_a_join_whose_outcome_is_unknown_is_undone_before_anything_else_of_the_peer():
    hub = core()
    peer = hub.connect(0.0)
    hub.handle(peer, '{"type":"join","room":"r"}', 0.0)
    [op] = hub.take_ops(peer)
    assert isinstance(op, JoinOp)
    # Redis may have run the join before the reply was lost: a leave undoes it, if so.
    hub.refused(op, ErrorCode.CLUSTER_UNAVAILABLE)
    assert hub.take_ops(peer) == [LeaveOp(peer, "r", 2)]
    # A definite refusal leaves nothing to undo.
    hub.handle(peer, '{"type":"join","room":"r"}', 0.0)
    [op] = hub.take_ops(peer)
    assert isinstance(op, JoinOp)
    hub.refused(op, ErrorCode.ROOM_FULL)
    assert hub.take_ops(peer) == []


def test_a_stream_entry_no_hub_process_writes_is_not_an_event():
    good = {"k": "r", "f": "alice", "r": "room", "s": "7", "d": '"hi"'}
    assert parse_event(good, 64) == Event(Event.RELAY, PeerId("alice"), "room", 7, JsonText('"hi"'))
    left = {"k": "l", "f": "alice", "r": "room", "s": str(FINAL_SEQ)}
    assert parse_event(left, 64) == Event(Event.LEFT, PeerId("alice"), "room", FINAL_SEQ)
    for forged in [
        {},
        {**good, "k": "x"},  # no such kind
        {"k": "r", "f": "alice", "r": "room", "s": "7"},  # a relay without its payload
        {**left, "d": "1"},  # a payload on a peer-left
        {**good, "f": "a:b"},  # names as a client's are checked
        {**good, "r": ""},
        {**good, "s": "-1"},
        {**good, "s": "٣"},  # a digit, not an ASCII one
        {**good, "s": "1" * 17},
        {**good, "s": str(FINAL_SEQ)},  # only a peer-left may be the last of its sender
        {**good, "d": "x" * 65},  # larger than any frame a client may send
    ]:
        assert parse_event(forged, 64) is None, forged
