"""The asyncio edge of ``blindhub hub --route-media``: one aiortc connection per member.

``MediaServer`` is the ``MediaSink`` of the hub's routing core (``Hub(limits, media=...)``) and
carries out what the media-routing core (``signaling.media_routing.MediaRouter``) decides: it
makes each member's connection and sends its ``media-offer`` right after ``welcome``, applies
its ``media-answer`` (SDP aiortc cannot apply is ``invalid-sdp`` for that member alone), sends
``media-tracks``, forwards every frame a member publishes to the slot it has at every other
member, and closes the connection when the member leaves. Every aiortc internal it relies on
is in ``signaling.media_adapter``.

The server (``signaling.server.HubServer(hub, media=...)``) calls ``start`` and ``close`` and
renders ``metric_lines`` under ``/metrics``.
"""

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription

from signaling.hub import Delivery, Hub, Limits, Metrics, count_error
from signaling.media_adapter import (
    SDP_ERRORS,
    ForwardTrack,
    add_transceiver,
    bound_ssrcs,
    hub_peer_connection,
    on_keyframe_wanted,
    on_nack,
    request_keyframe,
    take_frames,
)
from signaling.media_routing import (
    ApplyAnswer,
    CloseMedia,
    MediaCommand,
    MediaRouter,
    RequestKeyframe,
    RetransmitBudget,
    SendOffer,
    SendTracks,
    SlotChanged,
)
from signaling.protocol import (
    MEDIA_KINDS,
    ErrorCode,
    ErrorMessage,
    MediaOffer,
    PeerId,
)
from signaling.recording import MediaRecorder

Deliver = Callable[[list[Delivery]], None]


@dataclass(slots=True)
class _Connection:
    """One member's connection to the hub."""

    room: str
    session: int
    pc: RTCPeerConnection
    receivers: dict[str, RTCRtpReceiver] = field(default_factory=dict)
    # slot -> kind -> the track its sender forwards.
    slots: list[dict[str, ForwardTrack]] = field(default_factory=list)


class MediaServer:
    """The media side of a routing hub; ``hub`` is the routing core to serve."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        recorder: MediaRecorder | None = None,
        logger: logging.Logger | None = None,
        retransmit_budget: RetransmitBudget | None = None,
    ) -> None:
        limits = limits or Limits()
        self.router = MediaRouter(
            limits.max_peers_per_room,
            limits.join_timeout,
            retransmit_budget=retransmit_budget or RetransmitBudget(),
        )
        self.hub = Hub(limits, media=self, logger=logger)
        self._recorder = recorder
        self._logger = logger or logging.getLogger("blindhub.hub")
        self._connections: dict[PeerId, _Connection] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._task_failures = 0
        self._deliver: Deliver | None = None
        self._metrics: Metrics = self.hub.metrics

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def close(self) -> None:
        """Close every connection (the websocket server has closed every member's already)."""
        for peer in list(self._connections):
            self._carry_out(self.router.leave(peer))
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._recorder is not None:
            self._recorder.close()

    # The MediaSink of the routing core.

    def joined(self, peer: PeerId, room: str, now: float) -> None:
        self._carry_out(self.router.join(peer, room, now))

    def left(self, peer: PeerId) -> None:
        self._carry_out(self.router.leave(peer))

    def answered(self, peer: PeerId, sdp: str) -> None:
        self._carry_out(self.router.answer(peer, sdp))

    def answer_deadline(self, peer: PeerId) -> float | None:
        return self.router.answer_deadline(peer)

    def metric_lines(self) -> list[str]:
        counters = self.router.counters
        recording_errors = 0 if self._recorder is None else self._recorder.errors
        lines = [
            "# HELP blindhub_media_subscribers Members of routed rooms whose media is connected.",
            "# TYPE blindhub_media_subscribers gauge",
            f"blindhub_media_subscribers {self.router.subscriber_count}",
        ]
        for name, counter, text in (
            ("frames_received", counters.frames_received, "Frames received from publishers"),
            ("frames_forwarded", counters.frames_forwarded, "Frames sent to subscribers"),
            ("bytes_forwarded", counters.bytes_forwarded, "Frame bytes sent to subscribers"),
            ("frames_dropped", counters.frames_dropped, "Frames dropped for a slow sender"),
        ):
            lines += [
                f"# HELP blindhub_media_{name}_total {text}, by kind.",
                f"# TYPE blindhub_media_{name}_total counter",
                *(
                    f'blindhub_media_{name}_total{{kind="{kind}"}} {counter[kind]}'
                    for kind in MEDIA_KINDS
                ),
            ]
        return [
            *lines,
            "# HELP blindhub_media_plis_forwarded_total Keyframe requests sent to publishers.",
            "# TYPE blindhub_media_plis_forwarded_total counter",
            f"blindhub_media_plis_forwarded_total {counters.plis_forwarded}",
            "# HELP blindhub_media_plis_throttled_total Keyframe requests dropped by the "
            "throttle (one per publisher per 200 ms).",
            "# TYPE blindhub_media_plis_throttled_total counter",
            f"blindhub_media_plis_throttled_total {counters.plis_throttled}",
            "# HELP blindhub_media_retransmissions_total Packets subscribers asked for again "
            "(NACKs) that the hub retransmitted from its history.",
            "# TYPE blindhub_media_retransmissions_total counter",
            f"blindhub_media_retransmissions_total {counters.retransmissions_granted}",
            "# HELP blindhub_media_retransmissions_refused_total Packets subscribers asked for "
            "again (NACKs) beyond their connection's retransmission budget, not sent.",
            "# TYPE blindhub_media_retransmissions_refused_total counter",
            f"blindhub_media_retransmissions_refused_total {counters.retransmissions_refused}",
            "# HELP blindhub_media_recording_errors_total Streams --record-media stopped "
            "recording because their file could not be written.",
            "# TYPE blindhub_media_recording_errors_total counter",
            f"blindhub_media_recording_errors_total {recording_errors}",
            "# HELP blindhub_media_task_failures_total Media tasks (applying an answer, closing "
            "a connection) that ended with an unexpected fault.",
            "# TYPE blindhub_media_task_failures_total counter",
            f"blindhub_media_task_failures_total {self._task_failures}",
        ]

    # Carrying out the router's commands.

    def _carry_out(self, commands: list[MediaCommand]) -> None:
        for command in commands:
            if isinstance(command, SendOffer):
                self._connect(command)
            elif isinstance(command, ApplyAnswer):
                self._spawn("apply-answer", command.peer, self._apply(command))
            elif isinstance(command, SendTracks):
                self._send([Delivery(command.peer, command.tracks, command.room)])
            elif isinstance(command, SlotChanged):
                connection = self._connections.get(command.subscriber)
                if connection is not None:
                    for track in connection.slots[command.slot].values():
                        track.clear()
            elif isinstance(command, RequestKeyframe):
                connection = self._connections.get(command.publisher)
                if connection is not None:
                    request_keyframe(connection.receivers["video"])
            else:
                assert isinstance(command, CloseMedia)
                self._disconnect(command)

    def _connect(self, command: SendOffer) -> None:
        peer = command.peer
        pc = hub_peer_connection()
        connection = _Connection(command.room, command.session, pc)
        for kind in MEDIA_KINDS:
            receiver = add_transceiver(pc, kind, "recvonly").receiver
            take_frames(receiver, self._frame_sink(peer, command.room, kind))
            connection.receivers[kind] = receiver
        bound_ssrcs(connection.receivers["audio"])
        budget = self._retransmissions_granter(peer)
        for slot in range(self.router.slots):
            tracks = {}
            for kind in MEDIA_KINDS:
                sender = add_transceiver(pc, kind, "sendonly").sender
                tracks[kind] = ForwardTrack(kind)
                sender.replaceTrack(tracks[kind])
                on_keyframe_wanted(sender, self._keyframe_reporter(peer, slot))
                on_nack(sender, budget)
            connection.slots.append(tracks)
        self._connections[peer] = connection
        self._spawn("offer", peer, self._offer(peer, connection))

    async def _offer(self, peer: PeerId, connection: _Connection) -> None:
        pc = connection.pc
        try:
            await pc.setLocalDescription(await pc.createOffer())
        except SDP_ERRORS:
            # The member left (its connection closed) while the offer was being made.
            return
        if self._connections.get(peer) is connection:
            offer = MediaOffer(pc.localDescription.sdp)
            self._send([Delivery(peer, offer, connection.room)])

    async def _apply(self, command: ApplyAnswer) -> None:
        peer, session = command.peer, command.session
        connection = self._connections.get(peer)
        if connection is None or connection.session != session:
            return
        try:
            answer = RTCSessionDescription(sdp=command.sdp, type="answer")
            await connection.pc.setRemoteDescription(answer)
        except Exception as error:
            # A member's SDP is input, and aiortc's parser fails on bad text with many types
            # (SDP_ERRORS, and any other it may raise for text nobody tried): each is this
            # member's invalid-sdp, never a task that dies silently with the member stuck.
            if not isinstance(error, SDP_ERRORS):
                self._logger.warning("media-answer of %s failed unexpectedly", peer, exc_info=error)
            if self._connections.get(peer) is not connection:
                return  # it left meanwhile: nobody to tell
            self.router.answer_failed(peer, session)
            count_error(self._metrics, self._logger, ErrorCode.INVALID_SDP, peer=peer, log=True)
            message = ErrorMessage(ErrorCode.INVALID_SDP, f"cannot apply the media-answer: {error}")
            self._send([Delivery(peer, message, connection.room)])
            return
        now = asyncio.get_running_loop().time()
        self._carry_out(self.router.answer_applied(peer, session, now))

    def _disconnect(self, command: CloseMedia) -> None:
        connection = self._connections.get(command.peer)
        if connection is None or connection.session != command.session:
            return
        del self._connections[command.peer]
        if self._recorder is not None:
            self._recorder.end(connection.room, command.peer)
        self._spawn("close", command.peer, connection.pc.close())

    def _frame_sink(self, publisher: PeerId, room: str, kind: str) -> Callable[[bytes, int], None]:
        router, connections, recorder = self.router, self._connections, self._recorder
        dropped = router.counters.frames_dropped

        def forward(frame: bytes, rtp_timestamp: int) -> None:
            routes = router.routes(publisher)
            for subscriber, slot in routes:
                if connections[subscriber].slots[slot][kind].put(frame, rtp_timestamp):
                    dropped[kind] += 1
            router.forwarded(kind, len(frame), len(routes))
            if recorder is not None and routes:
                recorder.write(room, publisher, kind, frame, rtp_timestamp)

        return forward

    def _keyframe_reporter(self, subscriber: PeerId, slot: int) -> Callable[[], None]:
        def report() -> None:
            now = asyncio.get_running_loop().time()
            self._carry_out(self.router.keyframe_wanted(subscriber, slot, now))

        return report

    def _retransmissions_granter(self, subscriber: PeerId) -> Callable[[int], int]:
        def grant(wanted: int) -> int:
            now = asyncio.get_running_loop().time()
            return self.router.retransmissions_wanted(subscriber, wanted, now)

        return grant

    def _send(self, deliveries: list[Delivery]) -> None:
        if self._deliver is None:
            raise RuntimeError("the media server is not started")
        self._deliver(deliveries)

    def _spawn(self, name: str, peer: PeerId, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine``, the task ``name`` for ``peer``'s connection."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(lambda task: self._task_done(name, peer, task))

    def _task_done(self, name: str, peer: PeerId, task: asyncio.Task[None]) -> None:
        """A task's fault is logged (with its traceback) and counted when it ends, not left
        for asyncio to report at garbage collection, or never: nothing else awaits these
        tasks while the hub runs."""
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        self._task_failures += 1
        fields = {"task": name, "peer": peer, "error": f"{type(error).__name__}: {error}"}
        self._logger.error("media-task-failed", exc_info=error, extra={"fields": fields})
