"""The peer: a two-party WebRTC call through the hub, every media frame end-to-end encrypted.

One ``Call`` runs one call: join the room; agree keys with the peer through the hub (the peer
that was in the room first initiates); exchange the SDP offer and answer as sealed messages
(aiortc puts every candidate in the SDP); then media flows peer to peer with SFrame on every
sender and receiver (crypto/frame_crypto.py through client/frame_transform.py). Fail closed:
the transforms are installed and keyed before the peer connection can send or decode anything.

After setup the hub only carries sealed rekeys and the bye: a call survives the hub going away.
The hub can still refuse to carry the setup; that makes calls fail, never leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

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
from aiortc.rtp import RtpPacket
from websockets.exceptions import InvalidHandshake, InvalidURI

from client.frame_transform import (
    SDP_ERRORS,
    SUPPORTED_CODECS,
    FrameTransform,
    install_packet_observer,
    install_receiver_transform,
    install_sender_transform,
    request_keyframe,
)
from client.hub_connection import HubClosed, HubConnection, Relayed
from client.media import ReceivedMedia, collect, open_recorder, recordable
from crypto.errors import CryptoError
from crypto.frame_crypto import FrameCounters, SFrameReceiver, SFrameSender, apply_key_update
from crypto.handshake import HandshakeResult, Initiator, Responder
from crypto.identity import IdentityKey, IdentityPublicKey, KnownPeers, PinnedIdentityMismatch
from crypto.sealed import Received, SealedChannel, SealedReplay
from crypto.sframe import CipherSuite, SFrameError
from signaling.protocol import PeerId, PeerJoined, PeerLeft, SignalingError

logger = logging.getLogger("blindhub.call")

SUITES = (CipherSuite.AES_128_GCM_SHA256_128, CipherSuite.AES_256_GCM_SHA512_128)
KINDS = ("audio", "video")
DEFAULT_GRACE_SECONDS = 2.0
DEFAULT_SETUP_TIMEOUT = 30.0


class ExperimentOnlyLayers(enum.Enum):
    """EXPERIMENT ONLY (issue 6): which protections a peer applies, for the interception
    experiment's control runs. Never a product option: a product call is always ``VERIFIED``.

    - ``PLAIN``: no SFrame and unsealed signalling (the control; media leaves unencrypted
      end to end, protected by DTLS-SRTP alone).
    - ``SFRAME``: SFrame under keys from an unauthenticated exchange (throwaway identities),
      signalling not sealed.
    - ``SEALED``: plus the signed key agreement with the real identities and sealed signalling.
    - ``VERIFIED``: plus pinned identities and the SAS (the product).
    """

    PLAIN = "plain"
    SFRAME = "sframe"
    SEALED = "sealed"
    VERIFIED = "verified"

    @property
    def encrypts_frames(self) -> bool:
        return self is not ExperimentOnlyLayers.PLAIN

    @property
    def seals_signalling(self) -> bool:
        return self in (ExperimentOnlyLayers.SEALED, ExperimentOnlyLayers.VERIFIED)


class Verify(enum.Enum):
    """How the peer's identity is accepted (``--verify``)."""

    PROMPT = "prompt"  # pin on first use, and the user confirms the SAS unless already verified
    TOFU = "tofu"  # pin on first use; a changed key is refused
    PINNED = "pinned"  # only peers already pinned


class CallError(Exception):
    """A call that did not complete; ``exit_code`` is the command's exit status."""

    exit_code = 6


class HubUnreachable(CallError):
    """The hub could not be reached or refused to let us join."""

    exit_code = 3


class VerificationRefused(CallError):
    """The user declined the SAS, or ``--verify pinned`` met a peer not pinned."""

    exit_code = 4


class IdentityMismatch(CallError):
    """The peer's identity key differs from the one pinned for its name."""

    exit_code = 5


class CallFailed(CallError):
    """The setup failed (peer left, protocol error, timeout) or the connection failed."""

    exit_code = 6


@dataclass(frozen=True)
class ProtectionState:
    """What the user is shown: is this call end-to-end encrypted, and with whom."""

    layers: ExperimentOnlyLayers
    end_to_end_encrypted: bool
    suite: str | None
    peer_name: str
    peer_fingerprint: str | None
    pin: str | None  # "verified", "pinned" or "new"; None when identities are not checked
    sas: str | None

    def describe(self) -> str:
        if not self.end_to_end_encrypted:
            return f"NOT end-to-end encrypted (experiment layers: {self.layers.value})"
        lines = [f"end-to-end encrypted ({self.suite}) with {self.peer_name}"]
        if self.layers is not ExperimentOnlyLayers.VERIFIED:
            lines.append(f"  identity NOT verified (experiment layers: {self.layers.value})")
            if self.sas is not None:
                lines.append(f"  SAS (nobody compares it at this layer): {self.sas}")
        else:
            lines.append(f"  fingerprint {self.peer_fingerprint} ({self.pin})")
            lines.append(f"  SAS to read aloud: {self.sas}")
        return "\n".join(lines)


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
    # What the hub was caught doing, with how often: "sdp-tampered", "identity-refused",
    # "replay-rejected", "alteration-rejected" (sealed signalling), "media-replay-rejected",
    # "media-alteration-rejected" (SFrame).
    detections: dict[str, int] = field(default_factory=dict)

    def detect(self, what: str) -> None:
        self.detections[what] = self.detections.get(what, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        result = asdict(self)
        if self.protection is not None:
            result["protection"]["layers"] = self.protection.layers.value
        return result


ConfirmSas = Callable[[ProtectionState], Awaitable[bool]]


@dataclass(frozen=True)
class WirePacket:
    """One RTP packet as it reached a receiver of the call: after SRTP, before RTX unwrapping
    and before SFrame. Immutable copies of the packet's fields, so whoever observes the wire
    cannot alter what the call decodes."""

    kind: str
    payload_type: int
    sequence_number: int
    timestamp: int
    payload: bytes


WireObserver = Callable[[WirePacket], None]
"""Sees each RTP packet the call's receivers get (``CallConfig.wire_observer``)."""

EncodedFrameObserver = Callable[[str, bytes], None]
"""Sees (kind, frame) for each frame the call's encoders produce, before SFrame protects it
(``CallConfig.encoded_frame_observer``). The frame is immutable bytes."""


@dataclass
class CallConfig:
    room: str
    hub_url: str
    name: str
    identity: IdentityKey
    known_peers: KnownPeers
    tracks: Sequence[MediaStreamTrack] = ()
    verify: Verify = Verify.PROMPT
    # Asked with no time limit: only hangup() ends the wait (setup_timeout is for the network).
    confirm_sas: ConfirmSas | None = None
    record_path: str | None = None
    duration: float | None = None
    rekey_after: float | None = None  # seconds into the media, once
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    setup_timeout: float = DEFAULT_SETUP_TIMEOUT
    ice_servers: Sequence[RTCIceServer] = ()
    experiment_only_layers: ExperimentOnlyLayers = ExperimentOnlyLayers.VERIFIED
    random_bytes: Callable[[int], bytes] = os.urandom
    on_protection: Callable[[ProtectionState], None] | None = None
    # For tests and the experiment, never the command line: what crossed the wire to this
    # peer, and what its encoders produced before SFrame (only when frames are encrypted).
    # Both observers see immutable copies and cannot alter media; an exception from one is
    # logged and the media goes on.
    wire_observer: WireObserver | None = None
    encoded_frame_observer: EncodedFrameObserver | None = None


class Call:
    """``stats = await Call(config).run()``; ``hangup()`` ends it from elsewhere (Ctrl-C)."""

    def __init__(self, config: CallConfig) -> None:
        self.config = config
        self.stats = CallStats()
        self.received = ReceivedMedia()
        self.peer_name: str | None = None
        self._hub: HubConnection | None = None
        self._peer: PeerId | None = None
        self._channel: SealedChannel | None = None
        self._pc: RTCPeerConnection | None = None
        self._recorder: MediaRecorder | None = None
        self._sframe_sender: SFrameSender | None = None
        self._sframe_receiver: SFrameReceiver | None = None
        self._ended = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._join_time = 0.0
        self._setup: asyncio.Future[None] | None = None
        self._new_pin: str | None = None  # a peer pinned during this call's key agreement
        self._media_started = 0.0

    def hangup(self, reason: str = "hangup") -> None:
        """End the call; during setup, abandon it (``run`` raises ``CallFailed``)."""
        if self._setup is not None and not self._setup.done():
            self._setup.cancel(reason)
        elif not self._ended.is_set():
            self.stats.ended_by = reason
            self._ended.set()

    async def run(self) -> CallStats:
        self._setup = asyncio.ensure_future(self._set_up())
        try:
            await self._setup
        except TimeoutError:
            await self._close()
            raise CallFailed("the call was not set up in time") from None
        except SignalingError as error:  # includes HubClosed
            await self._close()
            raise CallFailed(f"the hub failed during setup: {error}") from None
        except asyncio.CancelledError:
            await self._close()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task itself is being cancelled, not just the setup
            raise CallFailed("hung up before the call was set up") from None
        except BaseException:
            await self._close()
            raise
        try:
            await self._in_call()
        finally:
            await self._say_bye()
            await self._close()
        return self.stats

    # -- setup

    async def _set_up(self) -> None:
        """Each network phase has ``setup_timeout``; the SAS comparison between them has none."""
        config = self.config
        try:
            async with asyncio.timeout(config.setup_timeout):
                offer_ready, result = await self._meet_peer()
            protection = await self._protection(result)
        except BaseException:
            # Failed, refused or hung up before the peer was accepted: a key the user never
            # confirmed (perhaps the hub's, stalling until the user gives up) stays unpinned.
            if self._new_pin is not None:
                config.known_peers.remove(self._new_pin)
            raise
        self.stats.protection = protection
        if config.on_protection is not None:
            config.on_protection(protection)

        if result is not None:
            self._sframe_sender = SFrameSender(result.suite)
            self._sframe_receiver = SFrameReceiver(result.suite)
            apply_key_update(result.initial_keys, self._sframe_sender, self._sframe_receiver)
            if config.experiment_only_layers.seals_signalling:
                self._channel = result.channel
        async with asyncio.timeout(config.setup_timeout):
            await self._negotiate(offer_ready)

    async def _meet_peer(self) -> tuple[asyncio.Task[None] | None, HandshakeResult | None]:
        """Join, wait for the peer and agree keys: the offer being made (initiator) and the
        key agreement's result (None for the experiment's PLAIN layers)."""
        config = self.config
        try:
            self._hub = await HubConnection.connect(config.hub_url)
            self._join_time = time.monotonic()
            welcome = await self._hub.join(config.room)
        except (OSError, InvalidURI, InvalidHandshake, TimeoutError, SignalingError) as error:
            raise HubUnreachable(
                f"cannot join {config.room!r} at {config.hub_url}: {error}"
            ) from None
        if len(welcome.peers) > 1:
            raise CallFailed(f"room {config.room!r} already has a call")
        # The peer that was in the room first initiates; both sides see the same order.
        initiator = not welcome.peers
        offer_ready = None
        if initiator:
            offer_ready = asyncio.create_task(self._create_offer())
            self._tasks.append(offer_ready)
        self._peer = welcome.peers[0] if welcome.peers else await self._await_peer()
        result: HandshakeResult | None = None
        if config.experiment_only_layers.encrypts_frames:
            # Each name travels in the key agreement, signed by its owner: the hub cannot
            # rename a peer, so nothing is ever pinned under a name the hub chose.
            result = await self._agree_keys(initiator)
            self.peer_name = result.peer_name
        else:
            self.peer_name = await self._exchange_hellos()
        return offer_ready, result

    async def _exchange_hellos(self) -> str:
        """EXPERIMENT ONLY (``PLAIN``, no key agreement): the names, in clear and unchecked."""
        await self._relay({"type": "hello", "name": self.config.name})
        hello = await self._next_setup_message("hello")
        peer_name = hello.get("name")
        if not isinstance(peer_name, str) or not peer_name:
            raise CallFailed("the peer's hello carries no name")
        return peer_name

    async def _await_peer(self) -> PeerId:
        assert self._hub is not None
        while True:
            event = await self._hub.next_event()
            if isinstance(event, PeerJoined):
                return event.peer_id

    async def _next_setup_message(self, expected: str | None = None) -> dict[str, Any]:
        """The peer's next setup message (opened, if signalling is sealed)."""
        assert self._hub is not None
        while True:
            event = await self._hub.next_event()
            if isinstance(event, PeerLeft) and event.peer_id == self._peer:
                raise CallFailed("the peer left during setup")
            if not isinstance(event, Relayed) or event.sender != self._peer:
                continue  # someone else joining or talking is not our call
            message = event.payload
            if self._channel is not None:
                try:
                    received = self._channel.open(message)
                except CryptoError as error:
                    # The only sealed setup messages are the offer and the answer.
                    self.stats.detect("sdp-tampered")
                    raise CallFailed(f"a sealed setup message was rejected: {error}") from None
                message = received.content
            if not isinstance(message, dict):
                raise CallFailed("the peer sent a setup message that is not an object")
            if expected is not None and message.get("type") != expected:
                raise CallFailed(
                    f"expected {expected!r} from the peer, got {message.get('type')!r}"
                )
            return message

    async def _relay(self, content: dict[str, Any]) -> None:
        assert self._hub is not None and self._peer is not None
        message = self._channel.seal(content) if self._channel is not None else content
        await self._hub.relay(self._peer, message)

    async def _agree_keys(self, initiator: bool) -> HandshakeResult:
        config = self.config
        layers = config.experiment_only_layers
        assert self._hub is not None and self._peer is not None
        # Below SEALED the keys come from an exchange nobody is accountable for (the
        # experiment's unauthenticated control): fresh identities, no check.
        identity = (
            config.identity
            if layers.seals_signalling
            else IdentityKey.generate(config.random_bytes)
        )
        peer_check = self._check_peer if layers is ExperimentOnlyLayers.VERIFIED else None
        try:
            machine: Initiator | Responder
            pending: list[dict[str, Any]] = []
            if initiator:
                call_id = config.random_bytes(16).hex()
                calling = Initiator(
                    identity,
                    call_id,
                    SUITES,
                    config.random_bytes,
                    name=config.name,
                    peer_check=peer_check,
                )
                await self._hub.relay(self._peer, calling.start())
                machine = calling
            else:
                commit = await self._next_setup_message("commit")
                offered_call_id = commit.get("call_id")
                if not isinstance(offered_call_id, str):
                    raise CallFailed("the peer's commit carries no call id")
                machine = Responder(
                    identity,
                    offered_call_id,
                    SUITES,
                    config.random_bytes,
                    name=config.name,
                    peer_check=peer_check,
                )
                pending.append(commit)
            while machine.state.name != "DONE":
                message = pending.pop(0) if pending else await self._next_setup_message()
                for reply in machine.receive(message):
                    await self._hub.relay(self._peer, reply)
            return machine.result
        except PinnedIdentityMismatch as error:
            self.stats.detect("identity-refused")
            raise IdentityMismatch(str(error)) from None
        except VerificationRefused:
            self.stats.detect("identity-refused")
            raise
        except CryptoError as error:
            raise CallFailed(f"key agreement failed: {error}") from None

    def _check_peer(self, name: str, key: IdentityPublicKey) -> None:
        """The handshake's pin check: ``name`` and ``key`` were just signed by the peer."""
        if self.config.verify is Verify.PINNED:
            pin = self.config.known_peers.get(name)
            if pin is None:
                raise VerificationRefused(f"{name} is not pinned and --verify pinned is set")
            if pin.public_key != key:
                raise PinnedIdentityMismatch(name, pin.public_key, key)
            return
        is_new = self.config.known_peers.get(name) is None
        self.config.known_peers.check(name, key)
        if is_new:
            self._new_pin = name

    async def _protection(self, result: HandshakeResult | None) -> ProtectionState:
        config = self.config
        layers = config.experiment_only_layers
        name = self.peer_name or ""
        if result is None:
            return ProtectionState(layers, False, None, name, None, None, None)
        if layers is not ExperimentOnlyLayers.VERIFIED:
            # Below SEALED the identities are throwaway, so the SAS would mean nothing.
            sas = result.sas if layers.seals_signalling else None
            return ProtectionState(layers, True, result.suite.name, name, None, None, sas)
        pin = config.known_peers.get(name)
        assert pin is not None  # _check_peer pinned or found it
        status = "verified" if pin.verified else "pinned"
        state = ProtectionState(
            layers,
            True,
            result.suite.name,
            name,
            result.peer_identity.fingerprint(),
            status,
            result.sas,
        )
        if config.verify is Verify.PROMPT and not pin.verified:
            if config.confirm_sas is None or not await config.confirm_sas(state):
                # A SAS that does not match may mean a man in the middle (_set_up unpins).
                raise VerificationRefused(f"the SAS with {name} was not confirmed")
            config.known_peers.mark_verified(name)
        return state

    def _new_peer_connection(self) -> RTCPeerConnection:
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.config.ice_servers)))
        return self._pc

    async def _create_offer(self) -> None:
        """The initiator's offer, made while the peer joins and keys are agreed: it needs no
        key, and no sender or receiver can start before the answer is applied."""
        pc = self._new_peer_connection()
        tracks = {track.kind: track for track in self.config.tracks}
        for kind in KINDS:
            track = tracks.get(kind)
            pc.addTransceiver(track or kind, direction="sendrecv" if track else "recvonly")
        self._prefer_codecs()
        await pc.setLocalDescription(await pc.createOffer())

    async def _negotiate(self, offer_ready: asyncio.Task[None] | None) -> None:
        config = self.config
        if offer_ready is not None:
            await offer_ready
            assert self._pc is not None
            pc = self._pc
            self._install_transforms()
            await self._relay({"type": "offer", "sdp": pc.localDescription.sdp})
            answer = await self._next_setup_message("answer")
            with _rejecting_bad_sdp():
                await pc.setRemoteDescription(RTCSessionDescription(self._sdp(answer), "answer"))
        else:
            offer = await self._next_setup_message("offer")
            pc = self._new_peer_connection()
            # The answer is derived from the offer: aiortc can also fail on the offer there.
            with _rejecting_bad_sdp():
                await pc.setRemoteDescription(RTCSessionDescription(self._sdp(offer), "offer"))
                for track in config.tracks:
                    pc.addTrack(track)
                self._prefer_codecs()
                self._install_transforms()
                await pc.setLocalDescription(await pc.createAnswer())
            await self._relay({"type": "answer", "sdp": pc.localDescription.sdp})
        self._media_started = time.monotonic()
        self._start_receiving()

    @staticmethod
    def _sdp(message: dict[str, Any]) -> str:
        sdp = message.get("sdp")
        if not isinstance(sdp, str):
            raise CallFailed("the peer's session description is missing")
        return sdp

    def _prefer_codecs(self) -> None:
        """Opus and VP8 only: the codecs the frame transforms can frame."""
        assert self._pc is not None
        for transceiver in self._pc.getTransceivers():
            capabilities = RTCRtpSender.getCapabilities(transceiver.kind)
            transceiver.setCodecPreferences(
                [c for c in capabilities.codecs if c.name in SUPPORTED_CODECS or c.name == "rtx"]
            )

    def _install_transforms(self) -> None:
        """SFrame on every sender and receiver, keyed, and the observers the config asks for,
        before any of them can start."""
        assert self._pc is not None
        config = self.config
        for transceiver in self._pc.getTransceivers():
            kind = transceiver.kind
            if config.wire_observer is not None:
                install_packet_observer(transceiver.receiver, _copying(kind, config.wire_observer))
            if self._sframe_sender is None or self._sframe_receiver is None:
                continue
            protect = self._sframe_sender.transform(kind)
            if config.encoded_frame_observer is not None:
                protect = _observed(kind, protect, config.encoded_frame_observer)
            install_sender_transform(transceiver.sender, protect)
            unprotect = self._sframe_receiver.transform(kind, self._on_drop(transceiver.receiver))
            install_receiver_transform(
                transceiver.receiver, self._first_audio_timer(kind, unprotect)
            )

    def _on_drop(self, receiver: RTCRtpReceiver) -> Callable[[SFrameError], None]:
        def on_failure(error: SFrameError) -> None:
            request_keyframe(receiver)

        return on_failure

    def _first_audio_timer(
        self, kind: str, transform: Callable[[bytes], bytes | None]
    ) -> Callable[[bytes], bytes | None]:
        if kind != "audio":
            return transform

        def timed(frame: bytes) -> bytes | None:
            plaintext = transform(frame)
            if plaintext is not None and self.stats.setup_seconds is None:
                self.stats.setup_seconds = time.monotonic() - self._join_time
            return plaintext

        return timed

    def _start_receiving(self) -> None:
        assert self._pc is not None
        tracks = [t.receiver.track for t in self._pc.getTransceivers() if t.receiver.track]
        # Each received track feeds the statistics and the recorder: each reads its own copy.
        relay = MediaRelay()
        if self.config.record_path is not None:
            self._recorder = open_recorder(self.config.record_path)
            for track in recordable(self.config.record_path, tracks):
                self._recorder.addTrack(relay.subscribe(track))
        for track in tracks:
            self._tasks.append(asyncio.create_task(collect(relay.subscribe(track), self.received)))

    # -- in the call

    async def _in_call(self) -> None:
        assert self._pc is not None
        pc = self._pc
        if self._recorder is not None:
            await self._recorder.start()

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "failed":
                self.hangup("connection-failed")

        self._tasks.append(asyncio.create_task(self._read_hub()))
        if self.config.duration is not None:
            self._tasks.append(asyncio.create_task(self._end_after(self.config.duration)))
        if self.config.rekey_after is not None and self._channel is not None:
            self._tasks.append(asyncio.create_task(self._rekey_after(self.config.rekey_after)))
        await self._ended.wait()
        self.stats.duration_seconds = time.monotonic() - self._media_started
        await self._collect_stats()
        if self.stats.ended_by == "connection-failed":
            raise CallFailed("the peer-to-peer connection failed")

    async def _end_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.hangup("duration")

    async def _rekey_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self._channel is not None
        await self._send_sealed_wire(self._channel.start_rekey())

    async def _send_sealed_wire(self, message: dict[str, Any]) -> None:
        assert self._hub is not None and self._peer is not None
        try:
            await self._hub.relay(self._peer, message)
        except HubClosed:
            self.stats.hub_lost = True

    async def _read_hub(self) -> None:
        assert self._hub is not None
        while True:
            try:
                event = await self._hub.next_event()
            except HubClosed:
                # Media is peer to peer: the call goes on without the hub.
                self.stats.hub_lost = True
                return
            except SignalingError as error:
                logger.warning("ignored a bad message from the hub: %s", error)
                continue
            if isinstance(event, PeerLeft) and event.peer_id == self._peer:
                self.hangup("peer-left")
                return
            if isinstance(event, Relayed) and event.sender == self._peer:
                await self._on_call_message(event.payload)

    async def _on_call_message(self, message: Any) -> None:
        if self._channel is None:
            if isinstance(message, dict) and message.get("type") == "bye":
                self.hangup("peer-bye")
            return
        try:
            received = self._channel.open(message)
        except CryptoError as error:
            # A forged or replayed copy changes nothing (the channel is as it was): count it.
            self.stats.detect(
                "replay-rejected" if isinstance(error, SealedReplay) else "alteration-rejected"
            )
            logger.warning("dropped a sealed message that did not open: %s", error)
            return
        await self._apply(received)

    async def _apply(self, received: Received) -> None:
        for reply in received.replies:
            await self._send_sealed_wire(reply)
        if self._sframe_sender is not None and self._sframe_receiver is not None:
            retire = apply_key_update(received.keys, self._sframe_sender, self._sframe_receiver)
            if retire:
                # Frames under the old key are still in flight: keep it for the grace window.
                asyncio.get_running_loop().call_later(
                    self.config.grace_seconds, self._retire_receive_keys, retire
                )
            if received.keys.switch_send is not None:
                self.stats.rekeys += 1
        if received.content is not None and received.content.get("type") == "bye":
            self.hangup("peer-bye")

    def _retire_receive_keys(self, kids: frozenset[int]) -> None:
        assert self._sframe_receiver is not None
        for kid in kids & self._sframe_receiver.kids:
            self._sframe_receiver.remove_key(kid)

    async def _collect_stats(self) -> None:
        stats = self.stats
        for kind, counters_sent, counters_received in self._counters():
            kind_stats: KindStats = getattr(stats, kind)
            kind_stats.sent = counters_sent.frames
            kind_stats.decrypted = counters_received.frames
            kind_stats.failed = counters_received.failed
            kind_stats.replayed = counters_received.replayed
            kind_stats.unauthenticated = counters_received.unauthenticated
            kind_stats.received = counters_received.frames + counters_received.failed
            kind_stats.sframe_bytes_added = counters_sent.bytes_added
        for what, count in (
            ("media-replay-rejected", stats.audio.replayed + stats.video.replayed),
            (
                "media-alteration-rejected",
                stats.audio.unauthenticated + stats.video.unauthenticated,
            ),
        ):
            if count:
                stats.detections[what] = count
        if self._sframe_receiver is None:
            stats.audio.received = stats.audio.decrypted = self.received.audio_frames
            stats.video.received = stats.video.decrypted = self.received.video_frames
        assert self._pc is not None
        for sender in self._pc.getSenders():
            report = await sender.getStats()
            for item in report.values():
                rtt = getattr(item, "roundTripTime", None)
                if rtt is not None:
                    stats.round_trip_seconds = rtt

    def _counters(self) -> list[tuple[str, FrameCounters, FrameCounters]]:
        if self._sframe_sender is None or self._sframe_receiver is None:
            return []
        sent, received = self._sframe_sender.counters, self._sframe_receiver.counters
        return [
            (kind, sent.get(kind, FrameCounters()), received.get(kind, FrameCounters()))
            for kind in KINDS
        ]

    async def _say_bye(self) -> None:
        if (
            self._hub is None
            or self._peer is None
            or self.stats.ended_by in ("peer-bye", "peer-left")
        ):
            return
        try:
            await self._relay({"type": "bye"})
        except (HubClosed, SignalingError, CryptoError):
            self.stats.hub_lost = True

    async def _close(self) -> None:
        if self._recorder is not None:
            await self._recorder.stop()
        if self._pc is not None:
            await self._pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._hub is not None:
            await self._hub.close()


@contextlib.contextmanager
def _rejecting_bad_sdp() -> Iterator[None]:
    """Even an authenticated peer's SDP is input: aiortc rejects bad SDP with untyped errors
    (client/frame_transform.py's SDP_ERRORS); they become ``CallFailed``."""
    try:
        yield
    except SDP_ERRORS as error:
        reason = str(error) or type(error).__name__
        raise CallFailed(f"the peer's session description was rejected: {reason}") from None


def _copying(kind: str, observer: WireObserver) -> Callable[[RtpPacket], None]:
    def observe(packet: RtpPacket) -> None:
        copy = WirePacket(
            kind,
            packet.payload_type,
            packet.sequence_number,
            packet.timestamp,
            bytes(packet.payload),
        )
        try:
            observer(copy)
        except Exception:
            logger.exception("the wire observer failed; the call goes on")

    return observe


def _observed(kind: str, protect: FrameTransform, observer: EncodedFrameObserver) -> FrameTransform:
    def observe_then_protect(frame: bytes) -> bytes | None:
        try:
            observer(kind, bytes(frame))
        except Exception:
            logger.exception("the encoded frame observer failed; the call goes on")
        return protect(frame)

    return observe_then_protect
