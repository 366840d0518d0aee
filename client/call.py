"""The peer's asyncio driver: a WebRTC call through the hub, every media frame end-to-end encrypted.

``Call`` does the I/O of one call and nothing else: it joins the room, waits for the peer (the
peer that was in the room first initiates), then feeds a ``client.session.CallSession`` every
event (hub events, the local SDP, the SAS answer, hangups, timer expiries) and carries out the
actions it returns: relay a payload, install keys in the frame protection, ask the SAS
question, make or apply an SDP offer or answer, end the call. Every protocol decision lives in
the session; this module holds none.

Fail closed: SFrame transforms (client/frame_transform.py) are installed and keyed on every
sender and receiver before a remote description is applied, so no sender can start or decoder
receive a frame before then. After setup the hub only carries sealed rekeys and the bye: media
goes on if the hub goes away, in the epoch it has then (no rekey can cross any more). The hub
can still refuse to carry the setup or a rekey; that makes calls fail, never leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRecorder, MediaRelay
from websockets.exceptions import InvalidHandshake, InvalidURI

from client.exit_codes import ExitCode
from client.frame_transform import (
    SDP_ERRORS,
    SUPPORTED_CODECS,
    FrameTransform,
    install_constant_bitrate_opus,
    install_receiver_transform,
    install_sender_transform,
    request_keyframe,
)
from client.hub_connection import HubClosed, HubConnection, HubEvent, Relayed
from client.media import ReceivedMedia, collect, open_recorder, recordable
from client.rtp_policy import AUDIO_BITRATE, strip_header_extensions
from client.session import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_REKEY_INTERVAL,
    DEFAULT_SETUP_TIMEOUT,
    Action,
    AnswerOffer,
    ApplyAnswer,
    AskSas,
    CallError,
    CallFailed,
    CallSession,
    Ended,
    HubUnreachable,
    InstallKeys,
    MakeOffer,
    MediaStarted,
    Protected,
    ProtectionState,
    RetireReceiveKeys,
    Send,
    SessionConfig,
    SessionState,
    Verify,
)
from crypto.frame_crypto import (
    FrameCounters,
    KeyUpdate,
    SFrameReceiver,
    SFrameSender,
    apply_key_update,
)
from crypto.identity import IdentityKey, KnownPeers
from crypto.sframe import CipherSuite
from signaling.protocol import PeerId, PeerJoined, PeerLeft, SignalingError, Welcome

logger = logging.getLogger("blindhub.call")

KINDS = ("audio", "video")


@dataclass
class KindStats:
    sent: int = 0
    received: int = 0
    decrypted: int = 0
    failed: int = 0
    replayed: int = 0  # of the failed: SFrame replays
    unauthenticated: int = 0  # of the failed: altered frames (or not sealed for us)
    sframe_bytes_added: int = 0


@dataclass
class CallStats:
    """The end-of-call summary (``--stats-json`` writes ``as_dict()``)."""

    protection: ProtectionState | None = None
    audio: KindStats = field(default_factory=KindStats)
    video: KindStats = field(default_factory=KindStats)
    setup_seconds: float | None = None  # join to the first decrypted audio frame
    round_trip_seconds: float | None = None
    duration_seconds: float = 0.0
    rekeys: int = 0
    hub_lost: bool = False
    ended_by: str = ""
    # What the hub was caught doing, with how often: the session's ("sdp-tampered",
    # "identity-refused", "replay-rejected", "alteration-rejected": sealed signalling) and the
    # frame protection's ("media-replay-rejected", "media-alteration-rejected": SFrame).
    detections: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ConfirmSas = Callable[[ProtectionState], Awaitable[bool]]


class CallPhase(enum.Enum):
    """Where a call is, for a user who would otherwise see nothing until the peer arrives
    (``CallConfig.on_phase``). In this order; WAITING only when the room was empty."""

    CONNECTING = "connecting"  # to the hub, and joining the room
    WAITING = "waiting"  # for a peer in the room
    KEY_AGREEMENT = "key-agreement"  # the peer is there: keys, identities, the SAS, the SDP
    MEDIA = "media"  # media flows, end-to-end encrypted
    HUB_LOST = "hub-lost"  # in the call: media goes on, but no rekey can cross any more


class HubNotTrusted(CallError):
    """The wss:// hub's TLS certificate did not verify."""

    exit_code = ExitCode.HUB_NOT_TRUSTED


class FrameProtection(Protocol):
    """What a call does to each encoded frame: SFrame in the product (``SFrameProtection``)."""

    def install(
        self, suite: CipherSuite, update: KeyUpdate, on_first_use: Callable[[int], None]
    ) -> None:
        """Keys from the session: epoch 0, then each rekey. ``on_first_use(kid)`` once the
        first frame under a new receive key authenticates."""

    def retire(self, kids: frozenset[int]) -> None:
        """Erase receive keys whose grace window is over."""

    def transforms(
        self, kind: str, on_failure: Callable[[], None]
    ) -> tuple[FrameTransform, FrameTransform] | None:
        """The (sender, receiver) transforms for ``kind``; ``on_failure`` hears of each frame
        the receiver drops. None installs no transform (only the experiment's control)."""

    def counters(self, kind: str) -> tuple[FrameCounters, FrameCounters]:
        """(sent, received) for ``kind``."""

    @property
    def send_kid(self) -> int | None:
        """The KID frames are sent under now."""


class SFrameProtection:
    """SFrame (RFC 9605) on every sender and receiver; fail closed without a key."""

    def __init__(self) -> None:
        self._sender: SFrameSender | None = None
        self._receiver: SFrameReceiver | None = None

    def install(
        self, suite: CipherSuite, update: KeyUpdate, on_first_use: Callable[[int], None]
    ) -> None:
        if self._sender is None or self._receiver is None:
            self._sender, self._receiver = SFrameSender(suite), SFrameReceiver(suite)
        # The session retires old receive keys itself, once the peer has switched.
        apply_key_update(update, self._sender, self._receiver, on_first_use=on_first_use)

    def retire(self, kids: frozenset[int]) -> None:
        if self._receiver is not None:
            for kid in kids & self._receiver.kids:
                self._receiver.remove_key(kid)

    def transforms(
        self, kind: str, on_failure: Callable[[], None]
    ) -> tuple[FrameTransform, FrameTransform]:
        if self._sender is None or self._receiver is None:
            return _drop_all, _drop_all  # no key, no frame (the session keys the call first)
        return self._sender.transform(kind), self._receiver.transform(
            kind, lambda _error: on_failure()
        )

    def counters(self, kind: str) -> tuple[FrameCounters, FrameCounters]:
        if self._sender is None or self._receiver is None:
            return FrameCounters(), FrameCounters()
        return (
            self._sender.counters.get(kind, FrameCounters()),
            self._receiver.counters.get(kind, FrameCounters()),
        )

    @property
    def send_kid(self) -> int | None:
        return None if self._sender is None else self._sender.kid


def _drop_all(frame: bytes) -> None:
    return None


SessionFactory = Callable[[SessionConfig, bool, float], CallSession]
"""(config, initiator, now) -> the session for the remote participant."""


def product_session(config: SessionConfig, initiator: bool, now: float) -> CallSession:
    return CallSession(config, initiator=initiator, now=now)


@dataclass(frozen=True)
class CallParts:
    """How a call is assembled. ``CallParts()`` is the product, the only assembly any command
    builds; the interception experiment (client/experiment/) and the tests compose others,
    e.g. weaker sessions or a frame protection that also records what it sees."""

    session: SessionFactory = product_session
    frames: Callable[[], FrameProtection] = SFrameProtection
    # Sees the peer connection once its transceivers exist, before any remote description.
    prepare_connection: Callable[[RTCPeerConnection], None] | None = None


@dataclass
class CallConfig:
    room: str
    hub_url: str
    name: str
    identity: IdentityKey
    known_peers: KnownPeers
    tracks: Sequence[MediaStreamTrack] = ()
    verify: Verify = Verify.PROMPT
    peer: str | None = None  # the only name to accept (``--peer``), normalised
    # Asked with no time limit: only hangup() ends the wait (setup_timeout is for the network).
    confirm_sas: ConfirmSas | None = None
    record_path: str | None = None
    duration: float | None = None
    rekey_interval: float | None = DEFAULT_REKEY_INTERVAL  # seconds between epochs
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    setup_timeout: float = DEFAULT_SETUP_TIMEOUT
    ice_servers: Sequence[RTCIceServer] = ()
    random_bytes: Callable[[int], bytes] = os.urandom
    on_protection: Callable[[ProtectionState], None] | None = None
    # Verifies a wss:// hub's certificate; None: the system's trust store.
    hub_ssl_context: ssl.SSLContext | None = None
    on_phase: Callable[[CallPhase], None] | None = None

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            name=self.name,
            identity=self.identity,
            known_peers=self.known_peers,
            verify=self.verify,
            peer=self.peer,
            setup_timeout=self.setup_timeout,
            grace_seconds=self.grace_seconds,
            rekey_interval=self.rekey_interval,
            random_bytes=self.random_bytes,
        )


# -- the driver's events (what it feeds the session, from its tasks and callbacks)


@dataclass(frozen=True)
class _FromHub:
    event: PeerJoined | PeerLeft | Relayed


@dataclass(frozen=True)
class HubFailed:
    """The hub connection closed (``closed``) or sent a message this peer refused."""

    detail: str
    closed: bool


@dataclass(frozen=True)
class Hangup:
    """The user (or ``--duration``, or the connection failing) ends the call."""

    reason: str


@dataclass(frozen=True)
class _SasAnswered:
    accepted: bool


@dataclass(frozen=True)
class _KeyUsed:
    kid: int


_Event = _FromHub | HubFailed | Hangup | _SasAnswered | _KeyUsed


class Call:
    """``stats = await Call(config).run()``; ``hangup()`` ends it from elsewhere (Ctrl-C)."""

    def __init__(
        self, config: CallConfig, parts: CallParts | None = None, *, joined: JoinedHub | None = None
    ) -> None:
        self.config = config
        self._joined = joined  # a hub connection already in the room (the call command's)
        self.parts = parts or CallParts()
        self.stats = CallStats()
        self.received = ReceivedMedia()
        self.frames: FrameProtection = self.parts.frames()
        self.session: CallSession | None = None
        self._events: asyncio.Queue[_Event] = asyncio.Queue()
        self._hub: HubConnection | None = None
        self._peer: PeerId | None = None
        self._pc: RTCPeerConnection | None = None
        self._offer: asyncio.Task[None] | None = None
        self._recorder: MediaRecorder | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._timers: list[asyncio.TimerHandle] = []
        self._join_time = 0.0
        self._media_started = 0.0

    @property
    def peer_name(self) -> str | None:
        return None if self.session is None else self.session.peer_name

    def hangup(self, reason: str = "hangup") -> None:
        """End the call; during setup, abandon it (``run`` raises ``CallFailed``)."""
        self._events.put_nowait(Hangup(reason))

    async def run(self) -> CallStats:
        try:
            await self._join()
            ended = await self._drive()
            if self._media_started:
                # Also for a call that failed in the middle (a stalled rekey, lost signalling).
                await self._finish(ended.reason)
        finally:
            self._record_session()
            await self._close()
        if ended.error is not None:
            raise ended.error
        if ended.reason == "connection-failed":
            raise CallFailed("the peer-to-peer connection failed")
        return self.stats

    # -- the hub and the peer

    async def _join(self) -> None:
        config = self.config
        joined = self._joined or await join_hub(config, self._phase)
        self._hub, self._join_time = joined.hub, joined.join_time
        welcome = joined.welcome
        if len(welcome.peers) > 1:
            raise CallFailed(f"room {config.room!r} already has a call")
        # The peer that was in the room first initiates; both sides see the same order.
        initiator = not welcome.peers
        if initiator:
            # The offer needs no key, and no sender or receiver can start before the answer is
            # applied: make it while the peer joins and keys are agreed.
            self._offer = asyncio.create_task(self._create_offer())
            self._tasks.append(self._offer)
        self._tasks.append(
            asyncio.create_task(read_hub_events(joined.hub, self._from_hub, self._hub_failed))
        )
        if welcome.peers:
            self._events.put_nowait(_FromHub(PeerJoined(welcome.peers[0])))
        else:
            self._phase(CallPhase.WAITING)

    def _phase(self, phase: CallPhase) -> None:
        if self.config.on_phase is not None:
            self.config.on_phase(phase)

    def _from_hub(self, event: HubEvent) -> None:
        if isinstance(event, PeerJoined | PeerLeft | Relayed):
            self._events.put_nowait(_FromHub(event))
        else:
            self._events.put_nowait(HubFailed(f"{event.TYPE} in a peer-to-peer room", False))

    def _hub_failed(self, detail: str, closed: bool) -> None:
        self._events.put_nowait(HubFailed(detail, closed))

    # -- feeding the session

    async def _drive(self) -> Ended:
        """Feed the session events until it ends; return how."""
        loop = asyncio.get_running_loop()
        waiting_since = loop.time()
        while True:
            session = self.session
            if session is None:
                deadline: float | None = waiting_since + self.config.setup_timeout
            else:
                deadline = session.next_deadline
            try:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                event = await asyncio.wait_for(self._events.get(), timeout)
            except TimeoutError:
                if session is None:
                    raise CallFailed("the call was not set up in time") from None
                actions = session.handle_timer(loop.time())
            else:
                actions = self._handle(event, loop.time())
            ended = await self._carry_out(actions)
            if ended is not None:
                return ended

    def _handle(self, event: _Event, now: float) -> list[Action]:
        session = self.session
        if session is None:
            return self._handle_before_peer(event, now)
        match event:
            case _FromHub(PeerLeft(peer_id)) if peer_id == self._peer:
                return session.peer_left(now)
            case _FromHub(Relayed(sender, payload)) if sender == self._peer:
                return session.receive(payload, now)
            case _FromHub():
                return []  # someone else joining or talking is not our call
            case HubFailed(detail, closed):
                if closed and not self.stats.hub_lost:
                    # Media is peer to peer: the call goes on without the hub, in its epoch.
                    self.stats.hub_lost = True
                    if session.state is SessionState.IN_CALL:
                        self._phase(CallPhase.HUB_LOST)
                else:
                    logger.warning("ignored a bad message from the hub: %s", detail)
                return session.hub_failed(detail, now, closed=closed)
            case Hangup(reason):
                return session.hangup(reason, now)
            case _SasAnswered(accepted):
                return session.sas_answer(accepted, now)
            case _KeyUsed(kid):
                return session.receive_key_used(kid, now)

    def _handle_before_peer(self, event: _Event, now: float) -> list[Action]:
        match event:
            case _FromHub(PeerJoined(peer_id)):
                self._peer = peer_id
                self._phase(CallPhase.KEY_AGREEMENT)
                initiator = self._offer is not None
                self.session = self.parts.session(self.config.session_config(), initiator, now)
                return self.session.start(now)
            case HubFailed(detail):
                raise CallFailed(f"the hub failed during setup: {detail}")
            case Hangup():
                raise CallFailed("hung up before the call was set up")
        return []

    async def _carry_out(self, actions: list[Action]) -> Ended | None:
        pending = deque(actions)
        while pending:
            action = pending.popleft()
            if isinstance(action, Ended):
                return action
            try:
                pending.extend(await self._carry_out_one(action))
            except CallError as error:
                # The session unpins a peer it had not accepted, as for its own failures.
                assert self.session is not None
                pending = deque(self.session.abort(error, asyncio.get_running_loop().time()))
        return None

    async def _carry_out_one(self, action: Action) -> list[Action]:
        """Carry out one action; return the session's answer to its outcome, if any."""
        session = self.session
        assert session is not None
        now = asyncio.get_running_loop().time
        match action:
            case Send(payload):
                return await self._send(payload)
            case InstallKeys(suite, update):
                self.frames.install(suite, update, self._key_used)
            case RetireReceiveKeys(kids):
                self.frames.retire(kids)
            case AskSas(protection):
                self._tasks.append(asyncio.create_task(self._ask_sas(protection)))
            case Protected(protection):
                self.stats.protection = protection
                if self.config.on_protection is not None:
                    self.config.on_protection(protection)
            case MakeOffer():
                assert self._offer is not None
                await self._offer
                pc = self._connection()
                self._install_transforms(pc)
                return session.offer_ready(pc.localDescription.sdp, now())
            case AnswerOffer(sdp):
                answer = await self._answer(sdp)
                return session.answer_ready(answer, now())
            case ApplyAnswer(sdp):
                with rejecting_bad_sdp("the peer's"):
                    await self._connection().setRemoteDescription(
                        RTCSessionDescription(strip_header_extensions(sdp), "answer")
                    )
            case MediaStarted():
                await self._start_media()
                self._phase(CallPhase.MEDIA)
        return []

    def _key_used(self, kid: int) -> None:
        # Called from the receiver's frame transform, in the event loop's thread.
        self._events.put_nowait(_KeyUsed(kid))

    async def _send(self, payload: dict[str, Any]) -> list[Action]:
        assert self._hub is not None and self._peer is not None and self.session is not None
        try:
            await self._hub.relay(self._peer, payload)
        except SignalingError as error:  # includes HubClosed
            closed = isinstance(error, HubClosed)
            self.stats.hub_lost = self.stats.hub_lost or closed
            now = asyncio.get_running_loop().time()
            return self.session.hub_failed(str(error), now, closed=closed)
        return []

    async def _ask_sas(self, protection: ProtectionState) -> None:
        self._events.put_nowait(_SasAnswered(await ask_sas(self.config, protection)))

    # -- the peer connection

    def _connection(self) -> RTCPeerConnection:
        assert self._pc is not None
        return self._pc

    def _new_connection(self) -> RTCPeerConnection:
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.config.ice_servers)))
        return self._pc

    async def _create_offer(self) -> None:
        pc = self._new_connection()
        tracks = {track.kind: track for track in self.config.tracks}
        for kind in KINDS:
            track = tracks.get(kind)
            pc.addTransceiver(track or kind, direction="sendrecv" if track else "recvonly")
        prefer_supported_codecs(pc)
        offer = await pc.createOffer()
        await pc.setLocalDescription(
            RTCSessionDescription(strip_header_extensions(offer.sdp), offer.type)
        )

    async def _answer(self, offer: str) -> str:
        pc = self._new_connection()
        # The answer is derived from the offer: aiortc can also fail on the offer there.
        with rejecting_bad_sdp("the peer's"):
            await pc.setRemoteDescription(
                RTCSessionDescription(strip_header_extensions(offer), "offer")
            )
            for track in self.config.tracks:
                pc.addTrack(track)
            prefer_supported_codecs(pc)
            self._install_transforms(pc)
            await pc.setLocalDescription(await pc.createAnswer())
        sdp: str = pc.localDescription.sdp
        return sdp

    def _install_transforms(self, pc: RTCPeerConnection) -> None:
        """The frame protection on every sender and receiver, and the constant-bitrate audio
        encoder, before any of them can start."""
        if self.parts.prepare_connection is not None:
            self.parts.prepare_connection(pc)
        for transceiver in pc.getTransceivers():
            kind = transceiver.kind
            if kind == "audio":
                install_constant_bitrate_opus(transceiver.sender, AUDIO_BITRATE)
            transforms = self.frames.transforms(kind, _keyframe_requester(transceiver.receiver))
            if transforms is None:
                continue
            protect, unprotect = transforms
            install_sender_transform(transceiver.sender, protect)
            install_receiver_transform(transceiver.receiver, self._timed(kind, unprotect))

    def _timed(self, kind: str, transform: FrameTransform) -> FrameTransform:
        """The audio receiver's transform also times the setup (join to first audio)."""
        if kind != "audio":
            return transform

        def timed(frame: bytes) -> bytes | None:
            plaintext = transform(frame)
            if plaintext is not None and self.stats.setup_seconds is None:
                self.stats.setup_seconds = time.monotonic() - self._join_time
            return plaintext

        return timed

    async def _start_media(self) -> None:
        pc = self._connection()
        loop = asyncio.get_running_loop()
        self._media_started = time.monotonic()
        tracks = [t.receiver.track for t in pc.getTransceivers() if t.receiver.track]
        # Each received track feeds the statistics and the recorder: each reads its own copy.
        relay = MediaRelay()
        if self.config.record_path is not None:
            self._recorder = open_recorder(self.config.record_path)
            for track in recordable(self.config.record_path, tracks):
                self._recorder.addTrack(relay.subscribe(track))
            await self._recorder.start()
        for track in tracks:
            self._tasks.append(asyncio.create_task(collect(relay.subscribe(track), self.received)))

        @pc.on("connectionstatechange")
        def on_state() -> None:
            # "closed": the peer closed its connection (its DTLS close_notify), perhaps after a
            # bye the hub withheld.
            if pc.connectionState in ("failed", "closed"):
                self.hangup(f"connection-{pc.connectionState}")

        if self.config.duration is not None:
            self._timers.append(loop.call_later(self.config.duration, self.hangup, "duration"))

    # -- the end

    async def _finish(self, reason: str) -> None:
        stats = self.stats
        stats.ended_by = reason
        stats.duration_seconds = time.monotonic() - self._media_started
        detections = stats.detections
        for kind in KINDS:
            sent, received = self.frames.counters(kind)
            kind_stats: KindStats = getattr(stats, kind)
            kind_stats.sent = sent.frames
            kind_stats.decrypted = received.frames
            kind_stats.failed = received.failed
            kind_stats.replayed = received.replayed
            kind_stats.unauthenticated = received.unauthenticated
            kind_stats.received = received.frames + received.failed
            kind_stats.sframe_bytes_added = sent.bytes_added
            for what, count in (
                ("media-replay-rejected", received.replayed),
                ("media-alteration-rejected", received.unauthenticated),
            ):
                if count:
                    detections[what] = detections.get(what, 0) + count
        if self.frames.send_kid is None:
            # No SFrame (the experiment's control): what was received is what was decoded.
            stats.audio.received = stats.audio.decrypted = self.received.audio_frames
            stats.video.received = stats.video.decrypted = self.received.video_frames
        if self._pc is not None:
            for sender in self._pc.getSenders():
                report = await sender.getStats()
                for item in report.values():
                    rtt = getattr(item, "roundTripTime", None)
                    if rtt is not None:
                        stats.round_trip_seconds = rtt

    def _record_session(self) -> None:
        """What the session counted, also for a call that failed (the experiment reads it)."""
        if self.session is not None:
            self.stats.rekeys = self.session.rekeys
            self.stats.detections.update(self.session.detections)

    async def _close(self) -> None:
        """Stop everything, each step even if one before it failed."""
        for timer in self._timers:
            timer.cancel()
        async with contextlib.AsyncExitStack() as stack:
            if self._hub is not None:
                stack.push_async_callback(self._hub.close)
            stack.push_async_callback(self._cancel_tasks)
            if self._pc is not None:
                stack.push_async_callback(self._pc.close)
            if self._recorder is not None:
                stack.push_async_callback(self._recorder.stop)

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _keyframe_requester(receiver: RTCRtpReceiver) -> Callable[[], None]:
    """A dropped frame leaves the decoder without a reference: ask for a keyframe."""

    def on_failure() -> None:
        request_keyframe(receiver)

    return on_failure


@contextlib.contextmanager
def rejecting_bad_sdp(whose: str) -> Iterator[None]:
    """Even an authenticated peer's SDP is input: aiortc rejects bad SDP with untyped errors
    (client/frame_transform.py's SDP_ERRORS); they become ``CallFailed``. ``whose`` names
    the description's author in the message ("the peer's", "the hub's")."""
    try:
        yield
    except SDP_ERRORS as error:
        reason = str(error) or type(error).__name__
        raise CallFailed(f"{whose} session description was rejected: {reason}") from None


def prefer_supported_codecs(pc: RTCPeerConnection) -> None:
    """Opus and VP8 only: the codecs the frame transforms can frame."""
    for transceiver in pc.getTransceivers():
        capabilities = RTCRtpSender.getCapabilities(transceiver.kind)
        transceiver.setCodecPreferences(
            [c for c in capabilities.codecs if c.name in SUPPORTED_CODECS or c.name == "rtx"]
        )


@dataclass(frozen=True)
class JoinedHub:
    """A hub connection that has joined ``config.room``, and the hub's welcome."""

    hub: HubConnection
    welcome: Welcome
    join_time: float  # time.monotonic() when the join was sent


async def join_hub(config: CallConfig, on_phase: Callable[[CallPhase], None]) -> JoinedHub:
    """Connect to the hub and join the room, or raise the call error that says why not."""
    on_phase(CallPhase.CONNECTING)
    try:
        async with asyncio.timeout(config.setup_timeout):
            hub = await HubConnection.connect(config.hub_url, ssl_context=config.hub_ssl_context)
            join_time = time.monotonic()
            try:
                welcome = await hub.join(config.room)
            except BaseException:
                await hub.close()
                raise
    except ssl.SSLCertVerificationError as error:
        raise HubNotTrusted(
            f"the hub at {config.hub_url} is not trusted: {error.verify_message}"
        ) from None
    except (OSError, InvalidURI, InvalidHandshake, TimeoutError, SignalingError) as error:
        raise HubUnreachable(f"cannot join {config.room!r} at {config.hub_url}: {error}") from None
    return JoinedHub(hub, welcome, join_time)


async def read_hub_events(
    hub: HubConnection,
    on_event: Callable[[HubEvent], None],
    on_failure: Callable[[str, bool], None],
) -> None:
    """Hand each hub event to ``on_event`` until the connection closes; a bad message is
    ``on_failure(detail, closed=False)``, the close ``on_failure(detail, closed=True)``."""
    while True:
        try:
            event = await hub.next_event()
        except HubClosed as error:
            on_failure(str(error), True)
            return
        except SignalingError as error:
            on_failure(str(error), False)
            continue
        on_event(event)


async def ask_sas(config: CallConfig, protection: ProtectionState) -> bool:
    """The user's answer to the SAS question; no answer without a ``confirm_sas``."""
    confirm = config.confirm_sas
    return confirm is not None and await confirm(protection)


__all__ = [
    "Call",
    "CallConfig",
    "CallError",
    "CallParts",
    "CallPhase",
    "CallStats",
    "FrameProtection",
    "HubNotTrusted",
    "JoinedHub",
    "KindStats",
    "SFrameProtection",
]
