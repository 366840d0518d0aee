"""A real routing hub (``blindhub hub --route-media``) with real aiortc peers, no SFrame: the

forwarder alone. Each peer is plain aiortc: it answers the hub's media-offer, publishes a tone
and the test pattern, and reads what arrives on each of its slots."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from array import array
from collections import defaultdict

import av
import pytest
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.rtp import (
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    AnyRtcpPacket,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
    RtpPacket,
)

from client.experiment.analysis import dominant_frequency
from client.frame_transform import request_keyframe
from client.media import PatternTrack, ToneTrack, left_channel
from signaling.hub import Limits
from signaling.media_adapter import MAX_SSRCS
from signaling.media_routing import RTX_BURST, RTX_RATE
from signaling.media_server import MediaServer
from signaling.protocol import (
    ErrorCode,
    ErrorMessage,
    Join,
    Leave,
    MediaAnswer,
    MediaMode,
    MediaOffer,
    MediaTracks,
    PeerLeft,
    Welcome,
    parse_hub_message,
)
from signaling.recording import MediaRecorder
from signaling.server import HubServer
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

TONES = (440, 550, 660)
OPUS_PAYLOAD_TYPE, VP8_PAYLOAD_TYPE, RTX_PAYLOAD_TYPE = 96, 97, 98  # in the hub's offer
# Enough audio for a dominant-frequency estimate (16,384 samples) with margin.
AUDIO_SAMPLES = 30000


class Peer:
    """One plain aiortc participant of a routed room."""

    def __init__(self, url: str, tone: int) -> None:
        self.url = url
        self.tone = tone
        self.messages: list[object] = []
        # max-bundle: with aiortc's default (balanced) an answerer leaves the second and later
        # video m-lines on a transport of their own that never connects (aiortc 1.16).
        config = RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        self.pc = RTCPeerConnection(config)
        self.audio: dict[str, array[int]] = defaultdict(lambda: array("h"))
        self.video_frames: dict[str, int] = defaultdict(int)
        self.plis_received = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def join(self, room: str = "r", *, answer: bool = True) -> None:
        self.ws = await websockets.connect(self.url)
        await self.ws.send(Join(room).encode())
        self._tasks.append(asyncio.create_task(self._read()))
        await wait_for(lambda: self.first(MediaOffer) is not None)
        if answer:
            await self.answer()

    async def answer(self) -> None:
        offer = self.first(MediaOffer)
        assert isinstance(offer, MediaOffer)
        await self.pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
        self.pc.addTrack(ToneTrack(self.tone))
        video_sender = self.pc.addTrack(PatternTrack())
        self._count_plis(video_sender)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        for transceiver in self.pc.getTransceivers()[2:]:
            self._tasks.append(asyncio.create_task(self._consume(transceiver)))
        await self.ws.send(MediaAnswer(self.pc.localDescription.sdp).encode())

    def first(self, kind: type) -> object | None:
        return next((m for m in self.messages if isinstance(m, kind)), None)

    def welcome(self) -> Welcome:
        welcome = self.first(Welcome)
        assert isinstance(welcome, Welcome)
        return welcome

    def tracks(self) -> dict[str, tuple[str, str]]:
        """mid -> (kind, publisher) from the latest media-tracks."""
        latest = [m for m in self.messages if isinstance(m, MediaTracks)]
        if not latest:
            return {}
        return {t.mid: (t.kind, t.peer_id) for t in latest[-1].tracks}

    def audio_from(self, publisher: str) -> array[int]:
        mids = [
            mid for mid, (kind, p) in self.tracks().items() if p == publisher and kind == "audio"
        ]
        return self.audio[mids[0]] if mids else array("h")

    def video_from(self, publisher: str) -> int:
        mids = [
            mid for mid, (kind, p) in self.tracks().items() if p == publisher and kind == "video"
        ]
        return self.video_frames[mids[0]] if mids else 0

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pc.close()
        await self.ws.close()

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for text in self.ws:
                assert isinstance(text, str)
                self.messages.append(parse_hub_message(text))

    async def _consume(self, transceiver) -> None:
        track = transceiver.receiver.track
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if isinstance(frame, av.AudioFrame):
                    channels = len(frame.layout.channels)
                    data = bytes(frame.planes[0])[: frame.samples * channels * 2]
                    self.audio[transceiver.mid].extend(left_channel(data, channels))
                else:
                    self.video_frames[transceiver.mid] += 1

    def _count_plis(self, sender) -> None:
        handle = sender._handle_rtcp_packet

        async def count(packet: AnyRtcpPacket) -> None:
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_PLI:
                self.plis_received += 1
            await handle(packet)

        sender._handle_rtcp_packet = count


@pytest.fixture
async def routed():
    servers: list[HubServer] = []
    peers: list[Peer] = []

    async def start(limits: Limits | None = None, recorder: MediaRecorder | None = None):
        server = HubServer(media=MediaServer(limits, recorder=recorder))
        await server.start()
        servers.append(server)
        return server

    def peer(server: HubServer, tone: int) -> Peer:
        peers.append(Peer(server.url, tone))
        return peers[-1]

    yield start, peer
    for p in peers:
        await p.close()
    for server in servers:
        await server.close()


async def metrics(server: HubServer) -> str:
    url = server.url.replace("ws://", "http://") + "/metrics"

    def get() -> str:
        with urllib.request.urlopen(url) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)


def metric(text: str, name: str) -> int:
    return int(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


async def test_three_peers_hear_each_other_through_the_hub(routed, tmp_path):
    start, peer = routed
    recorder = MediaRecorder(tmp_path)
    server = await start(Limits(max_peers_per_room=8), recorder)
    peers = [peer(server, tone) for tone in TONES]
    for p in peers:
        await p.join()
    ids = [p.welcome().peer_id for p in peers]
    assert all(p.welcome().media is MediaMode.ROUTED for p in peers)

    def heard_all() -> bool:
        return all(
            len(p.audio_from(other)) >= AUDIO_SAMPLES and p.video_from(other) >= 10
            for p in peers
            for other in ids
            if other != p.welcome().peer_id
        )

    await wait_for(heard_all, timeout=30)
    for p in peers:
        own = p.welcome().peer_id
        # Two slots in use, audio and video each, naming the two others.
        assert sorted(publisher for _, publisher in p.tracks().values()) == sorted(
            2 * [other for other in ids if other != own]
        )
        for other, tone in zip(ids, TONES, strict=True):
            if other != own:
                heard = dominant_frequency(p.audio_from(other), 48000)
                assert abs(heard - tone) < 5, (own, other, heard)

    text = await metrics(server)
    assert metric(text, "blindhub_media_subscribers") == 3
    assert metric(text, 'blindhub_media_frames_forwarded_total{kind="audio"}') > 0
    assert metric(text, 'blindhub_media_frames_forwarded_total{kind="video"}') > 0

    # A peer that leaves frees its slot: the others' media-tracks drop it.
    await peers[2].ws.send(Leave().encode())
    await wait_for(
        lambda: all(ids[2] not in {pub for _, pub in p.tracks().values()} for p in peers[:2])
    )
    for p in peers[:2]:
        assert len(p.tracks()) == 2
        assert any(isinstance(m, PeerLeft) for m in p.messages)

    # Every recorded stream opens in PyAV and holds frames, with a matching sidecar.
    await server.close()
    files = sorted(tmp_path.glob("*.mkv"))
    assert len(files) == 6
    for path in files:
        sizes = [json.loads(line)["size"] for line in path.with_suffix(".jsonl").open()]
        with av.open(str(path)) as container:
            packets = [bytes(p) for p in container.demux() if p.size]
        assert [len(p) for p in packets] == sizes and sizes


async def test_garbage_answer_is_invalid_sdp_and_disturbs_nobody(routed):
    start, peer = routed
    server = await start(Limits(max_peers_per_room=8))
    good = [peer(server, 440), peer(server, 550)]
    for p in good:
        await p.join()
    bad = peer(server, 660)
    await bad.join(answer=False)
    await bad.ws.send(MediaAnswer("v=0\r\ngarbage\r\n").encode())
    await wait_for(lambda: bad.first(ErrorMessage) is not None)
    error = bad.first(ErrorMessage)
    assert isinstance(error, ErrorMessage) and error.code is ErrorCode.INVALID_SDP
    # The good peers go on hearing each other.
    a, b = (p.welcome().peer_id for p in good)
    before = len(good[0].audio_from(b))
    await wait_for(lambda: len(good[0].audio_from(b)) > before + 48000 // 2)
    assert len(good[1].audio_from(a)) > 0
    assert metric(await metrics(server), 'blindhub_errors_total{code="invalid-sdp"}') == 1
    # A second answer while none is expected (the good peers answered already).
    await good[0].ws.send(MediaAnswer("v=0\r\n").encode())
    await wait_for(
        lambda: any(
            isinstance(m, ErrorMessage) and m.code is ErrorCode.UNEXPECTED_MEDIA
            for m in good[0].messages
        )
    )


async def test_an_answer_aiortc_fails_on_in_an_unforeseen_way_is_invalid_sdp_too(
    routed, monkeypatch
):
    # aiortc's parser may fail on text nobody tried with an error outside SDP_ERRORS: the
    # member still gets invalid-sdp (and may answer again), never a hub task dead in silence.
    apply_description = RTCPeerConnection.setRemoteDescription

    async def failing_on_marked_answers(pc, description):
        if description.type == "answer" and "a=x-unforeseen" in description.sdp:
            raise TypeError("an error aiortc was never seen to raise")
        return await apply_description(pc, description)

    monkeypatch.setattr(RTCPeerConnection, "setRemoteDescription", failing_on_marked_answers)
    start, peer = routed
    server = await start(Limits(max_peers_per_room=8))
    member = peer(server, 440)
    await member.join(answer=False)
    await member.ws.send(MediaAnswer("v=0\r\na=x-unforeseen\r\n").encode())
    await wait_for(lambda: member.first(ErrorMessage) is not None)
    error = member.first(ErrorMessage)
    assert isinstance(error, ErrorMessage) and error.code is ErrorCode.INVALID_SDP
    await member.answer()  # a good answer after it is applied
    listener = peer(server, 550)
    await listener.join()
    source = member.welcome().peer_id
    await wait_for(lambda: len(listener.audio_from(source)) > 48000 // 2)


async def test_subscriber_plis_reach_the_publisher_throttled(routed):
    start, peer = routed
    server = await start(Limits(max_peers_per_room=8))
    publisher, subscriber = peer(server, 440), peer(server, 550)
    await publisher.join()
    await subscriber.join()
    await wait_for(lambda: subscriber.video_from(publisher.welcome().peer_id) >= 5)
    receiver = next(
        t.receiver
        for t in subscriber.pc.getTransceivers()
        if subscriber.tracks().get(t.mid) == ("video", publisher.welcome().peer_id)
    )
    text = await metrics(server)
    forwarded_before = metric(text, "blindhub_media_plis_forwarded_total")
    throttled_before = metric(text, "blindhub_media_plis_throttled_total")
    plis_before = publisher.plis_received
    # For a second the subscriber asks for a keyframe with (nearly) every packet it gets.
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < 1.0:
        request_keyframe(receiver)
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.1)  # the last requests cross (counted, not decisive)
    elapsed = loop.time() - started
    text = await metrics(server)
    forwarded = metric(text, "blindhub_media_plis_forwarded_total") - forwarded_before
    throttled = metric(text, "blindhub_media_plis_throttled_total") - throttled_before
    allowed = int(elapsed / 0.2) + 1
    assert throttled >= 10, (forwarded, throttled)
    assert 2 <= forwarded <= allowed, (forwarded, throttled)
    assert publisher.plis_received - plis_before <= allowed
    await wait_for(lambda: publisher.plis_received - plis_before >= 2)


async def test_loss_on_one_subscribers_leg_is_answered_on_that_leg_alone(routed):
    start, peer = routed
    server = await start(Limits(max_peers_per_room=8))
    publisher, lossy, clean = peer(server, 440), peer(server, 550), peer(server, 660)
    nacks_at_publisher = 0

    await publisher.join()
    video_sender = publisher.pc.getTransceivers()[1].sender
    handle = video_sender._handle_rtcp_packet

    async def count_nacks(packet: AnyRtcpPacket) -> None:
        nonlocal nacks_at_publisher
        nacks_at_publisher += isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK
        await handle(packet)

    video_sender._handle_rtcp_packet = count_nacks
    await lossy.join()
    await clean.join()
    # The lossy subscriber's downlink loses every 50th VP8 packet (not the retransmissions,
    # which travel on the RTX payload type): loss on the hub's leg to it alone.
    transport = lossy.pc.getTransceivers()[0].receiver.transport
    handle_rtp_data = transport._handle_rtp_data
    seen = 0

    async def lose(data: bytes, arrival_time_ms: int) -> None:
        nonlocal seen
        if data[1] & 0x7F == VP8_PAYLOAD_TYPE:
            seen += 1
            if seen % 50 == 0:
                return
        await handle_rtp_data(data, arrival_time_ms)

    transport._handle_rtp_data = lose
    retransmitted = 0
    handle_lossy = transport._handle_rtp_data

    async def count_retransmissions(data: bytes, arrival_time_ms: int) -> None:
        nonlocal retransmitted
        retransmitted += data[1] & 0x7F == RTX_PAYLOAD_TYPE
        await handle_lossy(data, arrival_time_ms)

    transport._handle_rtp_data = count_retransmissions
    source = publisher.welcome().peer_id
    start_lossy, start_clean = lossy.video_from(source), clean.video_from(source)
    await wait_for(lambda: clean.video_from(source) - start_clean >= 90, timeout=30)
    # The hub answered the lossy leg's NACKs itself, from its own history for that leg
    # (retransmissions on the RTX payload type), and never passed them to the publisher; the
    # clean subscriber got its 90 frames meanwhile, and the lossy one kept decoding too.
    lost = seen // 50
    assert lost >= 2 and retransmitted >= lost // 2, (lost, retransmitted)
    assert nacks_at_publisher == 0
    assert lossy.video_from(source) - start_lossy >= 10
    # (aiortc's own receiver drops a frame whose lost packet comes back after the next frame
    # began, and waits for a keyframe: an aiortc subscriber still stutters on its lossy leg.)


async def test_a_subscriber_flooding_nacks_gets_retransmissions_within_its_budget(routed):
    start, peer = routed
    server = await start(Limits(max_peers_per_room=8))
    publisher, flooder, quiet = peer(server, 440), peer(server, 550), peer(server, 660)
    for p in (publisher, flooder, quiet):
        await p.join()
    source = publisher.welcome().peer_id
    await wait_for(lambda: flooder.video_from(source) >= 5 and quiet.video_from(source) >= 5)
    # The sequence numbers of the hub's latest VP8 packets to the flooder, as it sees them.
    client_transport = flooder.pc.getTransceivers()[0].receiver.transport
    handle_rtp_data = client_transport._handle_rtp_data
    latest: dict[int, list[int]] = defaultdict(list)

    async def note(data: bytes, arrival_time_ms: int) -> None:
        if data[1] & 0x7F == VP8_PAYLOAD_TYPE:
            seqs = latest[int.from_bytes(data[8:12])]
            seqs.append(int.from_bytes(data[2:4]))
            del seqs[:-128]  # the hub's history of a sender: 128 packets
        await handle_rtp_data(data, arrival_time_ms)

    client_transport._handle_rtp_data = note
    # What the hub retransmits to the flooder, on the wire (RTX payload type).
    hub_transport = server.media._connections[flooder.welcome().peer_id].receivers["video"]
    hub_transport = hub_transport.transport
    send_rtp = hub_transport._send_rtp
    retransmitted = 0

    async def count(data: bytes) -> None:
        nonlocal retransmitted
        retransmitted += data[1] & 0x7F == RTX_PAYLOAD_TYPE
        await send_rtp(data)

    hub_transport._send_rtp = count
    await wait_for(lambda: any(len(seqs) >= 100 for seqs in latest.values()), timeout=30)
    loop = asyncio.get_running_loop()
    started = loop.time()  # (the hub runs on this loop: one clock for both)
    text = await metrics(server)
    granted_before = metric(text, "blindhub_media_retransmissions_total")
    refused_before = metric(text, "blindhub_media_retransmissions_refused_total")
    retransmitted_before = retransmitted
    quiet_before = quiet.video_from(source)
    requested = 0
    flooding = True

    async def flood() -> None:
        # Every 10 ms, a NACK for every packet of the hub's history of that leg.
        nonlocal requested
        while flooding:
            for ssrc, seqs in list(latest.items()):
                # (sorted: aiortc packs a NACK's list in ascending order only)
                lost = sorted(seqs)
                nack = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=ssrc, lost=lost)
                await client_transport._send_rtp(bytes(nack))
                requested += len(seqs)
            await asyncio.sleep(0.01)  # pacing only

    flood_task = asyncio.create_task(flood())
    try:
        # The other subscriber gets 60 frames of the publisher's video meanwhile.
        await wait_for(lambda: quiet.video_from(source) - quiet_before >= 60, timeout=30)
        await wait_for(lambda: requested >= 20 * RTX_BURST)
    finally:
        flooding = False
        await flood_task
    text = await metrics(server)
    elapsed = loop.time() - started
    granted = metric(text, "blindhub_media_retransmissions_total") - granted_before
    refused = metric(text, "blindhub_media_retransmissions_refused_total") - refused_before
    # The flooder's connection had at most a full bucket when the flood began.
    allowed = RTX_BURST + RTX_RATE * elapsed
    assert granted <= allowed, (granted, allowed, elapsed)
    assert retransmitted - retransmitted_before <= granted, (retransmitted, granted)
    assert retransmitted - retransmitted_before >= RTX_BURST // 2, retransmitted
    assert refused >= requested // 2, (refused, requested)
    # The flooded hub answers the others as before.
    before = quiet.video_from(source)
    await wait_for(lambda: quiet.video_from(source) >= before + 10)


async def test_a_publisher_spraying_ssrcs_keeps_the_hub_bounded(routed):
    start, peer = routed
    server = await start(Limits(max_peers_per_room=8))
    sprayer, listener = peer(server, 440), peer(server, 550)
    await sprayer.join()
    await listener.join()
    source = sprayer.welcome().peer_id
    await wait_for(lambda: len(listener.audio_from(source)) > 0)
    connection = server.media._connections[source]
    hub_transport = connection.receivers["audio"].transport
    arrived = 0
    handle_rtp_data = hub_transport._handle_rtp_data

    async def count(data: bytes, arrival_time_ms: int) -> None:
        nonlocal arrived
        arrived += 1
        await handle_rtp_data(data, arrival_time_ms)

    hub_transport._handle_rtp_data = count
    # Every packet a fresh SSRC on the Opus payload type: aiortc learns each one (its routing
    # table, and per SSRC statistics in the receiver) and never forgets it.
    client_transport = sprayer.pc.getTransceivers()[0].sender.transport
    for ssrc in range(1, 3001):
        packet = RtpPacket(payload_type=OPUS_PAYLOAD_TYPE, ssrc=ssrc, sequence_number=ssrc)
        packet.payload = b"\xfc\x00"
        await client_transport._send_rtp(packet.serialize())
        if ssrc % 50 == 0:
            await asyncio.sleep(0.001)  # not decisive: keeps the socket buffers from overflowing
    await wait_for(lambda: arrived >= 2000, timeout=20)
    assert len(hub_transport._rtp_router.ssrc_table) <= MAX_SSRCS
    remote_streams = connection.receivers["audio"]._RTCRtpReceiver__remote_streams
    assert len(remote_streams) <= MAX_SSRCS
    # The publisher's own stream goes on.
    before = len(listener.audio_from(source))
    await wait_for(lambda: len(listener.audio_from(source)) > before + 48000 // 2)
