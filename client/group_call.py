"""The peer's asyncio driver for a group call through a hub that routes media.

``GroupCall`` does the I/O of one group call and nothing else. The hub terminates this peer's
one WebRTC connection (it offers, we answer: ``media-offer``/``media-answer``) and forwards
every frame of every other member on pre-allocated slots, which ``media-tracks`` maps to
members. Every protocol decision lives in ``client.group_session.GroupSession``: the pairwise
key agreements, the SAS questions, the sender keys, the roster and the group security code.
This module feeds it the hub's events, the SAS answers and the timer expiries, and carries out
its actions: relay a payload, ask a SAS question, send under a new sender key, give a member's
receiver a key, show the roster and the code.

Fail closed as in a two-party call: the SFrame transforms are installed on every sender and
receiver before the answer is made, so nothing can be sent before we hold a sender key, and
nothing reaches a decoder that did not decrypt under the key of the member its slot belongs
to. The slot map is the hub's word, so it is only a hint: a frame under another member's key
fails to authenticate and is counted. A frame whose key has not arrived yet is held (bounded)
and passed to the decoder when the key comes (``client.frame_transform.LateDelivery``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from client.call import (
    KINDS,
    CallConfig,
    CallPhase,
    Hangup,
    HubFailed,
    JoinedHub,
    ask_sas,
    join_hub,
    prefer_supported_codecs,
    read_hub_events,
    rejecting_bad_sdp,
)
from client.exit_codes import ExitCode
from client.frame_transform import (
    FrameTransform,
    LateDelivery,
    install_constant_bitrate_opus,
    install_holding_receiver_transform,
    install_sender_transform,
    request_keyframe,
)
from client.group_session import (
    Action,
    AddReceiveKey,
    AskSas,
    Ended,
    GroupSession,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    RetireReceiveGenerations,
    RosterChanged,
    RosterEntry,
    SecurityCode,
    Send,
    UseSendKey,
)
from client.hub_connection import HubClosed, Relayed
from client.media import GroupRecorder, MediaSourceError, ReceivedMedia, keep_frame
from client.rtp_policy import AUDIO_BITRATE
from client.session import CallError, CallFailed, ProtectionState
from crypto.frame_crypto import SFrameSender
from crypto.sender_keys import (
    HoldingFrameTransform,
    SenderKey,
    SenderKeyCounters,
    SenderKeyReceiver,
)
from crypto.sframe import CipherSuite, SFrameError
from signaling.protocol import (
    MediaMode,
    MediaOffer,
    MediaTracks,
    PeerId,
    PeerJoined,
    PeerLeft,
    SignalingError,
)

logger = logging.getLogger("blindhub.group")

# A held frame whose key has not come by then is dropped (and counted): long enough for a key
# that crosses the hub a little after the first frame under it, short enough that audio
# released late is still worth playing.
HOLD_SECONDS = 1.0
# How long after the hub gives a slot to another member the previous member's last frames may
# still come out of it; past that, a frame is the new member's or nobody's.
STALE_SECONDS = 2.0


class RecentDepartures:
    """The members that left in the last ``seconds``, whose frames are refused.

    Bounded in time, not kept for the whole call, where it would grow by one id per leave:
    a departed member's frames stop coming once what it sent before leaving is through the
    hub and the slot's buffer, the same while as ``STALE_SECONDS`` bounds for a slot's previous
    member. (After its leave the session no longer counts it present, which refuses its frames
    too; this also covers the hub announcing the same id again within the window.) Times are
    the call's clock, which never goes back, so the oldest departures come first and are
    pruned whenever one is added: it holds only those of the last window."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._until: dict[PeerId, float] = {}  # in order of departure

    def add(self, peer: PeerId, now: float) -> None:
        for gone, until in list(self._until.items()):
            if until >= now:
                break
            del self._until[gone]
        self._until.pop(peer, None)  # a later departure: to the end, with a new window
        self._until[peer] = now + self._seconds

    def refuses(self, peer: PeerId, now: float) -> bool:
        until = self._until.get(peer)
        return until is not None and now <= until

    def __len__(self) -> int:
        return len(self._until)


class RecordingRefused(CallError):
    """``--record`` names a file a group call cannot record to (it needs .mkv)."""

    exit_code = ExitCode.LOCAL_PROBLEM


@dataclass
class MemberStats:
    """What this peer received from one remote member (``--stats-json``: ``members``)."""

    peer_id: str
    name: str | None = None
    fingerprint: str | None = None
    status: str | None = None
    audio: dict[str, int] = field(default_factory=dict)
    video: dict[str, int] = field(default_factory=dict)
    generations: list[int] = field(default_factory=list)
    left: bool = False
    first_audio_seconds: float | None = None  # from our join to its first decrypted audio


@dataclass(frozen=True)
class KeyChange:
    """We started sending under a new sender key (``seconds`` after our join)."""

    seconds: float
    generation: int
    step: int


@dataclass
class GroupStats:
    """The end-of-call summary of a group call (``--stats-json`` writes ``as_dict()``)."""

    members: dict[str, MemberStats] = field(default_factory=dict)
    sent: dict[str, dict[str, int]] = field(default_factory=dict)
    security_code: str | None = None
    setup_seconds: float | None = None  # join to the first decrypted audio frame of a member
    duration_seconds: float = 0.0
    unmapped_frames: int = 0  # frames on a slot the hub had not given to a member
    # Frames on a slot just given to another member that decrypted under the previous one's
    # key: its last frames, still in the slot's buffer; dropped, counted against no one.
    stale_frames: int = 0
    # Frames the hub put on one member's slot that another member's key decrypted (a splice),
    # by slot member, then by true sender (peer ids).
    spliced: dict[str, dict[str, int]] = field(default_factory=dict)
    key_changes: list[KeyChange] = field(default_factory=list)
    # When the hub announced each leave (seconds after our join), by peer id.
    leaves_announced: dict[str, float] = field(default_factory=dict)
    hub_lost: bool = False
    ended_by: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the driver's events


@dataclass(frozen=True)
class _FromHub:
    event: object


@dataclass(frozen=True)
class _SasAnswered:
    peer: PeerId
    accepted: bool


_Event = _FromHub | HubFailed | Hangup | _SasAnswered


@dataclass(frozen=True)
class GroupParts:
    """How a group call protects its frames: the product's SFrame sender and sender-key
    receivers. A seam for the experiment alone (client/experiment/ composes weaker peers from
    it); the product never builds anything else."""

    sender: Callable[[CipherSuite], SFrameSender] = SFrameSender
    receiver: Callable[[CipherSuite], SenderKeyReceiver] = SenderKeyReceiver


@dataclass
class GroupCallbacks:
    """What the user is shown as the group changes (the call command prints each)."""

    on_member_joined: Callable[[PeerId, ProtectionState], None] | None = None
    on_member_left: Callable[[PeerId, str | None, str], None] | None = None
    on_member_failed: Callable[[PeerId, CallError], None] | None = None
    on_roster: Callable[[tuple[RosterEntry, ...]], None] | None = None
    on_security_code: Callable[[str], None] | None = None


_HeldTag = tuple["_Slot", int]
"""What a held frame carries: the slot it came on and its RTP timestamp."""


class _MemberFrames:
    """One remote member's receiver, its per-kind transforms, and when each kind started
    holding frames for a key (``HOLD_SECONDS`` later, what is still held is dropped)."""

    def __init__(self, receiver: SenderKeyReceiver) -> None:
        self.receiver = receiver
        self.transforms: dict[str, tuple[HoldingFrameTransform, SenderKeyCounters]] = {}
        self.holding: dict[str, float] = {}

    def kind(
        self, kind: str, on_failure: Callable[[SFrameError], None]
    ) -> tuple[HoldingFrameTransform, SenderKeyCounters]:
        entry = self.transforms.get(kind)
        if entry is None:
            transform = self.receiver.transform(kind, on_failure)
            entry = self.transforms[kind] = (transform, self.receiver.counters[kind])
        return entry


class _Slot:
    """One receiving transceiver: its mid, its kind, and what passes the frames its members'
    receivers held for a key on to its decoder."""

    def __init__(self, transceiver: RTCRtpTransceiver) -> None:
        self.mid: str = transceiver.mid or ""
        self.kind: str = transceiver.kind
        self.receiver = transceiver.receiver
        self.late: LateDelivery | None = None
        # The member the slot carried before, and until when its last frames may still come
        # out of the slot (aiortc's jitter buffer keeps a frame until the next packet arrives:
        # the next member's first, however long the slot stays free).
        self.previous: PeerId | None = None
        self.previous_until = 0.0


def attach_tracks(pc: RTCPeerConnection, tracks: Sequence[MediaStreamTrack]) -> None:
    """Our tracks on the hub's first transceiver of each kind (mids 0 and 1), where it
    receives what we publish; every other transceiver only receives."""
    by_kind = {track.kind: track for track in tracks}
    seen: set[str] = set()
    for transceiver in pc.getTransceivers():
        kind = transceiver.kind
        if kind in seen:
            transceiver.direction = "recvonly"
            continue
        seen.add(kind)
        track = by_kind.get(kind)
        if track is not None:
            transceiver.sender.replaceTrack(track)
            transceiver.direction = "sendonly"
        else:
            transceiver.direction = "inactive"


class GroupCall:
    """``stats = await GroupCall(config).run()``; ``hangup()`` ends it from elsewhere."""

    def __init__(
        self,
        config: CallConfig,
        callbacks: GroupCallbacks | None = None,
        *,
        joined: JoinedHub | None = None,
        parts: GroupParts | None = None,
    ) -> None:
        self.config = config
        self._parts = parts or GroupParts()
        self.callbacks = callbacks or GroupCallbacks()
        self.stats = GroupStats()
        # What was decoded from each member, by peer id.
        self.received: dict[PeerId, ReceivedMedia] = {}
        self.session: GroupSession | None = None
        self._joined = joined
        self._events: asyncio.Queue[_Event] = asyncio.Queue()
        self._sender: SFrameSender | None = None
        self._members: dict[PeerId, _MemberFrames] = {}
        self._departed = RecentDepartures(STALE_SECONDS)  # members whose frames are refused
        self._former: dict[PeerId, _MemberFrames] = {}
        self._protect: dict[str, FrameTransform] = {}
        self._slot_owner: dict[str, PeerId] = {}  # mid -> member, as the hub says
        self._slots: dict[str, _Slot] = {}
        self._pc: RTCPeerConnection | None = None
        self._recorder: GroupRecorder | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._timers: list[asyncio.TimerHandle] = []
        self._join_time = 0.0
        self._media_started = 0.0
        self._media_phase_shown = False

    def hangup(self, reason: str = "hangup") -> None:
        self._events.put_nowait(Hangup(reason))

    @property
    def receivers(self) -> Mapping[PeerId, SenderKeyReceiver]:
        """What decrypts each present member's frames (the keys stay inside)."""
        return {peer: member.receiver for peer, member in self._members.items()}

    async def run(self) -> GroupStats:
        ended: Ended | None = None
        try:
            joined = self._joined or await join_hub(self.config, self._phase)
            self._joined = joined
            self._join_time = joined.join_time
            if joined.welcome.media is not MediaMode.ROUTED:
                raise CallFailed("the hub does not route media: a group call needs --route-media")
            if self.config.record_path is not None:
                try:
                    self._recorder = GroupRecorder(self.config.record_path)
                except MediaSourceError as error:
                    raise RecordingRefused(str(error)) from None
            loop = asyncio.get_running_loop()
            self.session = GroupSession(self.config.session_config(), now=loop.time())
            self._tasks.append(
                asyncio.create_task(read_hub_events(joined.hub, self._hub_event, self._hub_failed))
            )
            self._phase(CallPhase.WAITING if not joined.welcome.peers else CallPhase.KEY_AGREEMENT)
            first = self.session.welcome(list(joined.welcome.peers), loop.time())
            ended = await self._carry_out(first) or await self._drive()
            await self._finish(ended.reason)
        finally:
            await self._close()
        if ended.error is not None:
            raise ended.error
        return self.stats

    def _phase(self, phase: CallPhase) -> None:
        if self.config.on_phase is not None:
            self.config.on_phase(phase)

    def _hub_event(self, event: object) -> None:
        self._events.put_nowait(_FromHub(event))

    def _hub_failed(self, detail: str, closed: bool) -> None:
        self._events.put_nowait(HubFailed(detail, closed))

    # -- feeding the session

    async def _drive(self) -> Ended:
        loop = asyncio.get_running_loop()
        session = self.session
        assert session is not None
        while True:
            deadline = session.next_deadline
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                event = await asyncio.wait_for(self._events.get(), timeout)
            except TimeoutError:
                actions = session.handle_timer(loop.time())
            else:
                actions = await self._handle(event, loop.time())
            ended = await self._carry_out(actions)
            if ended is not None:
                return ended

    async def _handle(self, event: _Event, now: float) -> list[Action]:
        session = self.session
        assert session is not None
        match event:
            case _FromHub(PeerJoined(peer_id)):
                return session.peer_joined(peer_id, now)
            case _FromHub(PeerLeft(peer_id)):
                # Only for a peer in the room or a member that was (its sealed bye may come
                # before the hub's word): the hub can name any id.
                if session.present(peer_id) or peer_id in self.stats.members:
                    self.stats.leaves_announced[peer_id] = time.monotonic() - self._join_time
                return session.peer_left(peer_id, now)
            case _FromHub(Relayed(sender, payload)):
                return session.receive(sender, payload, now)
            case _FromHub(MediaOffer(sdp)):
                return await self._answer(sdp)
            case _FromHub(MediaTracks(tracks)):
                self._map_slots({track.mid: track.peer_id for track in tracks})
            case HubFailed(detail, closed):
                # The hub carries the media too: without it there is no call.
                self.stats.hub_lost = self.stats.hub_lost or closed
                if not closed:
                    logger.warning("ignored a bad message from the hub: %s", detail)
                return session.hub_failed(detail, now, closed=closed)
            case Hangup(reason):
                return session.hangup(reason, now)
            case _SasAnswered(peer, accepted):
                return session.sas_answer(peer, accepted, now)
        return []

    async def _carry_out(self, actions: list[Action]) -> Ended | None:
        pending = deque(actions)
        while pending:
            action = pending.popleft()
            if isinstance(action, Ended):
                return action
            pending.extend(await self._carry_out_one(action))
        return None

    async def _carry_out_one(self, action: Action) -> list[Action]:
        session = self.session
        assert session is not None
        match action:
            case Send(peer, payload):
                return await self._send(peer, payload)
            case AskSas(peer, protection):
                self._tasks.append(asyncio.create_task(self._ask_sas(peer, protection)))
            case UseSendKey(key):
                if self._sender is None:
                    self._sender = self._parts.sender(key.suite)
                    self._protect = {kind: self._sender.transform(kind) for kind in KINDS}
                self._sender.use_key(key.media_key())
                self.stats.key_changes.append(
                    KeyChange(time.monotonic() - self._join_time, key.generation, key.step)
                )
            case AddReceiveKey(peer, key):
                self._add_receive_key(peer, key)
            case RetireReceiveGenerations(peer, below):
                member = self._members.get(peer)
                if member is not None:
                    member.receiver.retire_generations_below(below)
            case MemberJoined(peer, protection):
                joined = self.stats.members.setdefault(peer, MemberStats(peer_id=peer))
                joined.name, joined.fingerprint = protection.peer_name, protection.peer_fingerprint
                joined.status, joined.left = protection.pin, False
                if not self._media_phase_shown:
                    self._media_phase_shown = True
                    self._phase(CallPhase.MEDIA)
                if self.callbacks.on_member_joined is not None:
                    self.callbacks.on_member_joined(peer, protection)
            case MemberLeft(peer, reason):
                name = self._member_left(peer)
                if self.callbacks.on_member_left is not None:
                    self.callbacks.on_member_left(peer, name, reason)
            case MemberFailed(peer, error):
                self._member_left(peer)
                if self.callbacks.on_member_failed is not None:
                    self.callbacks.on_member_failed(peer, error)
            case RosterChanged(roster):
                if self.callbacks.on_roster is not None:
                    self.callbacks.on_roster(roster)
            case SecurityCode(code):
                self.stats.security_code = code
                if self.callbacks.on_security_code is not None:
                    self.callbacks.on_security_code(code)
        return []

    async def _send(self, peer: PeerId, payload: dict[str, Any]) -> list[Action]:
        assert self._joined is not None and self.session is not None
        try:
            await self._joined.hub.relay(peer, payload)
        except SignalingError as error:
            return self._hub_send_failed(error)
        return []

    def _hub_send_failed(self, error: SignalingError) -> list[Action]:
        """Sending to the hub failed (``HubClosed`` included)."""
        assert self.session is not None
        closed = isinstance(error, HubClosed)
        self.stats.hub_lost = self.stats.hub_lost or closed
        now = asyncio.get_running_loop().time()
        return self.session.hub_failed(str(error), now, closed=closed)

    async def _ask_sas(self, peer: PeerId, protection: ProtectionState) -> None:
        accepted = await ask_sas(self.config, protection)
        self._events.put_nowait(_SasAnswered(peer, accepted))

    # -- keys and frames

    def _add_receive_key(self, peer: PeerId, key: SenderKey) -> None:
        member = self._member_frames(peer)
        for released in member.receiver.add_key(key):
            slot, timestamp = cast(_HeldTag, released.tag)
            member.holding.pop(released.kind, None)
            self._decrypted(peer, released.kind, released.plaintext, timestamp)
            if slot.late is not None:
                slot.late(released.plaintext, timestamp)

    def _decrypted(self, peer: PeerId, kind: str, plaintext: bytes, timestamp: int) -> None:
        if kind == "audio":
            stats = self.stats.members.setdefault(peer, MemberStats(peer_id=peer))
            if stats.first_audio_seconds is None:
                stats.first_audio_seconds = time.monotonic() - self._join_time
                if self.stats.setup_seconds is None:
                    self.stats.setup_seconds = stats.first_audio_seconds
        if self._recorder is not None:
            self._recorder.add(peer, kind, plaintext, timestamp)

    def _member_frames(self, peer: PeerId) -> _MemberFrames:
        """``peer``'s receiver, made when the hub first names it (its frames may come before
        its first key: they are held until it arrives)."""
        member = self._members.get(peer)
        if member is None:
            assert self.session is not None
            member = self._members[peer] = _MemberFrames(self._parts.receiver(self.session.suite))
        return member

    def _member_left(self, peer: PeerId) -> str | None:
        """Drop ``peer``'s receiver (its frames are refused from now on); its name, if any."""
        self._departed.add(peer, asyncio.get_running_loop().time())
        member = self._members.pop(peer, None)
        if member is None:
            return None
        # Kept only to recognise its last frames on a slot the hub gives to someone else.
        self._former[peer] = member
        self._end_holding(member.receiver)
        stats = self._member_stats(peer, member.receiver)
        stats.left = True
        return stats.name

    def _map_slots(self, owners: dict[str, PeerId]) -> None:
        previous = self._slot_owner
        self._slot_owner = owners
        now = asyncio.get_running_loop().time()
        for mid, slot in self._slots.items():
            before, after = previous.get(mid), owners.get(mid)
            if before is not None and before != after:
                # Its last frame may stay in the slot's buffer until the next packet arrives,
                # however long the slot stays free: the new member's first packet.
                slot.previous, slot.previous_until = before, math.inf
            if after is not None and after != before:
                slot.previous_until = now + STALE_SECONDS
                if slot.kind == "video":
                    # A new sender on this slot: the decoder needs a keyframe to start from.
                    request_keyframe(slot.receiver)
        # A former member's receiver is kept only while a slot may still deliver its frames.
        expected = {slot.previous for slot in self._slots.values() if slot.previous_until >= now}
        self._former = {peer: m for peer, m in self._former.items() if peer in expected}

    def _slot_transform(self, slot: _Slot) -> Callable[[bytes, int], bytes | None]:
        kind, mid = slot.kind, slot.mid
        stats = self.stats
        session = self.session
        assert session is not None
        loop = asyncio.get_running_loop()

        def on_failure(_error: SFrameError) -> None:
            request_keyframe(slot.receiver)

        def unprotect(frame: bytes, timestamp: int) -> bytes | None:
            owner, now = self._slot_owner.get(mid), loop.time()
            if slot.previous is not None and self._from_previous_owner(slot, frame, now):
                stats.stale_frames += 1
                return None
            # A peer the hub names but that is not in the room gets no receiver (nor held frames).
            if owner is None or self._departed.refuses(owner, now) or not session.present(owner):
                stats.unmapped_frames += 1
                return None
            member = self._member_frames(owner)
            transform, counters = member.kind(kind, on_failure)
            held, failed = counters.held, counters.failed
            plaintext = transform(frame, (slot, timestamp))
            if plaintext is not None:
                self._decrypted(owner, kind, plaintext, timestamp)
            elif counters.failed > failed:
                self._attribute(owner, kind, frame)
            elif counters.held > held and kind not in member.holding:
                # The first frame held for a key: the rest of its wait starts with it.
                started = member.holding[kind] = loop.time()
                loop.call_later(HOLD_SECONDS, self._expire_held, owner, kind, started)
            return plaintext

        return unprotect

    def _attribute(self, owner: PeerId, kind: str, frame: bytes) -> None:
        """A frame on ``owner``'s slot failed under its key: if another member's key
        authenticates it, the hub moved that member's frame there (a splice). It stays
        dropped (never played as ``owner``) and is counted under its true sender."""
        for peer, member in self._members.items():
            if peer != owner and member.receiver.authenticates(kind, frame):
                spliced = self.stats.spliced.setdefault(owner, {})
                spliced[peer] = spliced.get(peer, 0) + 1
                return

    def _from_previous_owner(self, slot: _Slot, frame: bytes, now: float) -> bool:
        """Whether ``frame`` is one of the last frames of the member ``slot`` carried before:
        that member's key authenticates it (the key stays, for this, after it left). Such a
        frame is dropped, never decoded into the new member's stream nor counted against it."""
        if now > slot.previous_until:
            slot.previous = None
            return False
        assert slot.previous is not None
        member = self._members.get(slot.previous) or self._former.get(slot.previous)
        return member is not None and member.receiver.authenticates(slot.kind, frame)

    def _expire_held(self, peer: PeerId, kind: str, started: float) -> None:
        """The hold window of ``peer``'s ``kind`` frames that started at ``started`` is over."""
        member = self._members.get(peer)
        if member is not None and member.holding.get(kind) == started:
            del member.holding[kind]
            member.receiver.expire_held(kind)

    def _send_transform(self, kind: str) -> FrameTransform:
        def protect(frame: bytes) -> bytes | None:
            transform = self._protect.get(kind)
            if transform is None:
                return None  # no key, no frame
            return transform(frame)

        return protect

    # -- the connection to the hub

    async def _answer(self, offer: str) -> list[Action]:
        if self._pc is not None:
            logger.warning("ignored a second media offer from the hub")
            return []
        assert self._joined is not None and self.session is not None
        pc = self._pc = RTCPeerConnection(
            # One transport for every m-line: aiortc's default (balanced) leaves a second m-line
            # of a kind on a transport the hub's BUNDLE discards, so its media never arrives.
            RTCConfiguration(
                iceServers=list(self.config.ice_servers), bundlePolicy=RTCBundlePolicy.MAX_BUNDLE
            )
        )
        with rejecting_bad_sdp("the hub's"):
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            attach_tracks(pc, self.config.tracks)
            prefer_supported_codecs(pc)
            self._install_transforms(pc)
            await pc.setLocalDescription(await pc.createAnswer())
        try:
            await self._joined.hub.send_media_answer(pc.localDescription.sdp)
        except SignalingError as error:  # the hub may close at any time
            return self._hub_send_failed(error)
        self._start_media(pc)
        return []

    def _install_transforms(self, pc: RTCPeerConnection) -> None:
        for transceiver in pc.getTransceivers():
            kind = transceiver.kind
            if transceiver.direction == "sendonly" or transceiver.direction == "inactive":
                if kind == "audio":
                    install_constant_bitrate_opus(transceiver.sender, AUDIO_BITRATE)
                install_sender_transform(transceiver.sender, self._send_transform(kind))
            else:
                slot = _Slot(transceiver)
                self._slots[slot.mid] = slot
                slot.late = install_holding_receiver_transform(
                    transceiver.receiver, self._slot_transform(slot)
                )

    def _start_media(self, pc: RTCPeerConnection) -> None:
        loop = asyncio.get_running_loop()
        self._media_started = time.monotonic()
        for slot in self._slots.values():
            track = slot.receiver.track
            if track is not None:
                self._tasks.append(asyncio.create_task(self._collect(slot, track)))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self.hangup(f"connection-{pc.connectionState}")

        if self.config.duration is not None:
            self._timers.append(loop.call_later(self.config.duration, self.hangup, "duration"))

    async def _collect(self, slot: _Slot, track: MediaStreamTrack) -> None:
        """Keep what each slot decodes, under the member the slot belongs to now."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            owner = self._slot_owner.get(slot.mid)
            if owner is None:
                continue
            keep_frame(frame, self.received.setdefault(owner, ReceivedMedia()))

    # -- the end

    @staticmethod
    def _end_holding(receiver: SenderKeyReceiver) -> None:
        """The wait of the frames ``receiver`` holds for a key ends with their member or the
        call: they count as expired, so that every frame held is accounted for once."""
        for kind in KINDS:
            receiver.expire_held(kind)

    def _member_stats(self, peer: PeerId, receiver: SenderKeyReceiver) -> MemberStats:
        stats = self.stats.members.setdefault(peer, MemberStats(peer_id=peer))
        generations: set[int] = set()
        for kind in KINDS:
            counters = receiver.counters.get(kind) or SenderKeyCounters()
            # Every frame that came: decrypted at once, held (then released, expired or pushed
            # out), failed, or sent before we joined.
            received = counters.frames - counters.released + counters.held
            received += counters.failed + counters.before_join
            setattr(stats, kind, counters.as_dict() | {"received": received})
            generations |= counters.generations
        stats.generations = sorted(generations)
        return stats

    async def _finish(self, reason: str) -> None:
        stats = self.stats
        stats.ended_by = reason
        if self._media_started:
            stats.duration_seconds = time.monotonic() - self._media_started
        for peer, member in self._members.items():
            self._end_holding(member.receiver)
            self._member_stats(peer, member.receiver)
        if self._sender is not None:
            stats.sent = {kind: c.as_dict() for kind, c in self._sender.counters.items()}

    async def _close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        async with contextlib.AsyncExitStack() as stack:
            if self._joined is not None:
                stack.push_async_callback(self._joined.hub.close)
            stack.push_async_callback(self._cancel_tasks)
            if self._pc is not None:
                stack.push_async_callback(self._pc.close)
            if self._recorder is not None:
                stack.callback(self._recorder.close, self._names())

    def _names(self) -> dict[str, str]:
        return {peer: m.name or peer for peer, m in self.stats.members.items()}

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = [
    "GroupCall",
    "GroupCallbacks",
    "GroupParts",
    "GroupStats",
    "KeyChange",
    "MemberStats",
    "RecordingRefused",
    "attach_tracks",
]
