"""The aiortc internals signaling/media_adapter.py relies on, checked loudly; and the recorder.

If aiortc moves a seam, the structural tests below say which one; tests/test_media_server.py
then proves the routing hub still forwards whole frames end to end."""

import asyncio
import fractions
import inspect
import json
from pathlib import Path

import aiortc
import av
import pytest
from aiortc import RTCRtpReceiver, RTCRtpSender
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcdtlstransport import RTCDtlsTransport, RtpRouter

from signaling.media_adapter import (
    RECEIVER_DECODER_ERROR,
    RECEIVER_JITTER_BUFFER,
    ForwardTrack,
    add_transceiver,
    hub_peer_connection,
    on_keyframe_wanted,
    on_nack,
    take_frames,
)
from signaling.protocol import PeerId
from signaling.recording import MediaRecorder

REREAD = (
    "re-read aiortc's rtcrtpsender.py / rtcrtpreceiver.py and update signaling/media_adapter.py"
)


def source_of(function) -> str:
    return inspect.getsource(function)


def test_aiortc_version_is_one_the_adapter_was_written_for():
    assert aiortc.__version__.startswith("1.16."), f"aiortc {aiortc.__version__}: {REREAD}"


def test_taking_frames_seam_the_receiver_queues_what_its_jitter_buffer_returns():
    handle = source_of(RTCRtpReceiver._handle_rtp_packet)
    assert "pli_flag, encoded_frame = self.__jitter_buffer.add(packet)" in handle, (
        f"RTCRtpReceiver no longer takes frames from __jitter_buffer.add: {REREAD}"
    )
    assert "if encoded_frame is not None and self.__decoder_thread:" in handle, (
        f"RTCRtpReceiver queues frames for its decoder some other way: {REREAD}"
    )
    assert "self._prefetch" in source_of(JitterBuffer._remove_frame), (
        f"JitterBuffer no longer holds frames back by _prefetch: {REREAD}"
    )


def test_asking_for_a_keyframe_seam_the_decoder_error_sends_a_pli():
    handle = source_of(RTCRtpReceiver._handle_rtp_packet)
    assert "if self.__decoder_error.is_set():" in handle, (
        f"RTCRtpReceiver no longer sends a PLI on {RECEIVER_DECODER_ERROR}: {REREAD}"
    )
    assert "await self._send_rtcp_pli(packet.ssrc)" in handle, REREAD


def test_forwarding_seam_a_sender_packs_packets_without_encoding():
    next_frame = source_of(RTCRtpSender._next_encoded_frame)
    assert "payloads, timestamp = self.__encoder.pack(data)" in next_frame, (
        f"RTCRtpSender no longer packs pre-encoded av.Packet data: {REREAD}"
    )
    for encoder in (OpusEncoder, Vp8Encoder):
        assert "convert_timebase(packet.pts, packet.time_base" in source_of(encoder.pack), (
            f"{encoder.__name__}.pack no longer takes the timestamp from the packet: {REREAD}"
        )


def test_bounding_ssrcs_seam_the_router_learns_ssrcs_in_its_table():
    assert "self._rtp_router.route_rtp(packet)" in source_of(RTCDtlsTransport._handle_rtp_data), (
        f"RTCDtlsTransport no longer routes RTP through _rtp_router.route_rtp: {REREAD}"
    )
    assert "self.ssrc_table[packet.ssrc] = pt_receiver" in source_of(RtpRouter.route_rtp), (
        f"RtpRouter no longer learns SSRCs in ssrc_table: {REREAD}"
    )


def test_keyframe_wanted_seam_plis_reach_handle_rtcp_packet():
    handle = source_of(RTCRtpSender._handle_rtcp_packet)
    assert "RTCP_PSFB_PLI" in handle and "self._send_keyframe()" in handle, (
        f"RTCRtpSender no longer handles PLIs in _handle_rtcp_packet: {REREAD}"
    )
    assert "await self._retransmit(seq)" in handle, (
        f"RTCRtpSender no longer answers NACKs in _handle_rtcp_packet: {REREAD}"
    )


def test_budgeting_retransmissions_seam_every_nack_goes_through_handle_rtcp_packet():
    assert "await recipient._handle_rtcp_packet(packet)" in source_of(
        RTCDtlsTransport._handle_rtcp_data
    ), f"RTCDtlsTransport no longer hands RTCP to _handle_rtcp_packet: {REREAD}"
    assert "RtcpRtpfbPacket" in source_of(RtpRouter.route_rtcp), (
        f"RtpRouter no longer routes NACKs to the sender of their media SSRC: {REREAD}"
    )
    handle = source_of(RTCRtpSender._handle_rtcp_packet)
    assert "for seq in packet.lost:\n                await self._retransmit(seq)" in handle, (
        f"RTCRtpSender no longer answers NACKs by calling _retransmit per packet: {REREAD}"
    )
    # Nothing else in the sender resends from its history.
    sender_source = inspect.getsource(aiortc.rtcrtpsender)
    assert sender_source.count("self._retransmit(") == 1, (
        f"RTCRtpSender calls _retransmit from somewhere else too: {REREAD}"
    )
    assert list(inspect.signature(RTCRtpSender._retransmit).parameters) == [
        "self",
        "sequence_number",
    ], f"RTCRtpSender._retransmit takes other arguments: {REREAD}"


async def test_a_nack_retransmits_only_the_granted_packets_each_once():
    pc = hub_peer_connection()
    try:
        sender = add_transceiver(pc, "video", "sendonly").sender
        other = add_transceiver(pc, "video", "sendonly").sender
        retransmitted: list[int] = []

        async def retransmit(sequence_number: int) -> None:
            retransmitted.append(sequence_number)

        sender._retransmit = retransmit  # type: ignore[method-assign]
        wanted: list[int] = []
        grants = iter([2, 0, 5])

        def granted(count: int) -> int:
            wanted.append(count)
            return next(grants)

        on_nack(sender, granted)
        assert "_handle_rtcp_packet" in vars(sender)
        assert "_handle_rtcp_packet" not in vars(other)
        nack = aiortc.rtp.RtcpRtpfbPacket(fmt=aiortc.rtp.RTCP_RTPFB_NACK, ssrc=1, media_ssrc=2)
        nack.lost = [7, 7, 9, 8, 9, 10]
        await sender._handle_rtcp_packet(nack)
        assert (wanted, retransmitted) == ([4], [7, 9])
        await sender._handle_rtcp_packet(nack)
        assert (wanted, retransmitted) == ([4, 4], [7, 9])
        await sender._handle_rtcp_packet(nack)
        assert (wanted, retransmitted) == ([4, 4, 4], [7, 9, 7, 9, 8, 10])
        # Other feedback is the sender's own, as before (a receiver report asks for nothing).
        report = aiortc.rtp.RtcpRrPacket(ssrc=1)
        await sender._handle_rtcp_packet(report)
        assert wanted == [4, 4, 4]
    finally:
        await pc.close()


async def test_seams_are_installed_per_instance_and_the_decoder_gets_nothing():
    pc = hub_peer_connection()
    try:
        receiver = add_transceiver(pc, "audio", "recvonly").receiver
        other = add_transceiver(pc, "audio", "recvonly").receiver
        sender = add_transceiver(pc, "video", "sendonly").sender
        taken: list[tuple[bytes, int]] = []
        take_frames(receiver, lambda frame, timestamp: taken.append((frame, timestamp)))
        wanted: list[None] = []
        on_keyframe_wanted(sender, lambda: wanted.append(None))
        buffer = getattr(receiver, RECEIVER_JITTER_BUFFER)
        assert buffer._prefetch == 0
        assert "add" in vars(buffer) and "add" not in vars(getattr(other, RECEIVER_JITTER_BUFFER))
        assert "_handle_rtcp_packet" in vars(sender)
        # Two one-packet frames: the first is complete when the second starts.
        for sequence, timestamp, data in ((1, 960, b"first"), (2, 1920, b"second")):
            packet = aiortc.rtp.RtpPacket(sequence_number=sequence, timestamp=timestamp)
            packet._data = data  # type: ignore[attr-defined]  # as the depacketizer leaves it
            assert buffer.add(packet) == (False, None)
        assert taken == [(b"first", 960)]
        pli = aiortc.rtp.RtcpPsfbPacket(fmt=aiortc.rtp.RTCP_PSFB_PLI, ssrc=1, media_ssrc=2)
        await sender._handle_rtcp_packet(pli)
        assert wanted == [None]
    finally:
        await pc.close()


async def test_a_forward_track_gives_the_frames_as_packets():
    track = ForwardTrack("video")
    assert track.put(b"frame", 4_000_000_000) is False
    packet = await track.recv()
    assert (bytes(packet), packet.pts, packet.time_base) == (
        b"frame",
        4_000_000_000,
        fractions.Fraction(1, 90000),
    )
    dropped = [track.put(bytes([n]), n) for n in range(40)]
    assert dropped.count(True) == 8
    assert bytes(await track.recv()) == bytes([8])
    track.stop()
    track.clear()
    with pytest.raises(aiortc.mediastreams.MediaStreamError):
        await asyncio.wait_for(track.recv(), 1)


# FFmpeg's parsers drop what does not parse as the codec; the recordings are read without them.
EXACT_FRAMES = {"fflags": "+noparse+nofillin"}


def test_a_stream_whose_timestamps_go_back_is_recorded_whole_and_in_order(tmp_path):
    # A publisher chooses its RTP timestamps: backwards, repeated or jumping across the wrap.
    recorder = MediaRecorder(tmp_path, clock=lambda: 0.0)
    stamps = [5000, 4000, 4000, 2**32 - 10, 20, 6000]
    frames = [bytes([0xFC, n]) * 10 for n in range(len(stamps))]
    for frame, stamp in zip(frames, stamps, strict=True):
        recorder.write("r", PeerId("p"), "audio", frame, stamp)
    recorder.close()
    with av.open(str(tmp_path / "r.p.audio.mkv"), options=EXACT_FRAMES) as container:
        packets = [p for p in container.demux() if p.size]
    assert [bytes(p) for p in packets] == frames
    times = [p.pts or 0 for p in packets]
    assert times == sorted(set(times))  # always later
    sidecar = [json.loads(line) for line in (tmp_path / "r.p.audio.jsonl").open()]
    assert [line["rtp_timestamp"] for line in sidecar] == stamps


def test_a_recording_that_cannot_be_written_never_raises_into_the_forwarding(tmp_path):
    recorder = MediaRecorder(tmp_path / "gone")  # no such directory
    recorder.write("r", PeerId("p"), "audio", b"frame", 0)
    recorder.write("r", PeerId("p"), "audio", b"frame", 960)
    recorder.close()
    assert recorder.errors == 1  # logged once; the stream is not tried again


def test_a_stream_whose_sidecar_cannot_be_opened_keeps_no_container_open(tmp_path, monkeypatch):
    # PyAV opens the file itself at the first frame, but the container (FFmpeg's muxer state)
    # exists from av.open on: a failed stream must close it, not leave it to the collector.
    opened: list[ClosingSpy] = []
    open_container = av.open

    def open_spied(*args, **kwargs):
        opened.append(ClosingSpy(open_container(*args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(av, "open", open_spied)
    (tmp_path / "r.p.audio.jsonl").mkdir()  # the sidecar's name is taken by a directory
    recorder = MediaRecorder(tmp_path)
    recorder.write("r", PeerId("p"), "audio", b"frame", 0)
    recorder.close()
    assert recorder.errors == 1
    assert [spy.closed for spy in opened] == [True]


def test_a_stream_whose_trailer_cannot_be_written_still_closes_and_never_raises(
    tmp_path, monkeypatch
):
    open_container = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: FailingClose(open_container(*a, **k)))
    recorder = MediaRecorder(tmp_path)
    recorder.write("r", PeerId("p"), "audio", b"frame", 0)
    recorder.write("r", PeerId("q"), "audio", b"frame", 0)
    recorder.end("r", PeerId("p"))  # a member leaves
    recorder.close()  # the hub stops
    assert recorder.errors == 2
    open_files = [path.resolve() for path in Path("/proc/self/fd").iterdir()]
    assert not [path for path in open_files if path.parent == tmp_path.resolve()]


class ClosingSpy:
    """A container that remembers whether it was closed."""

    def __init__(self, container) -> None:
        self._container = container
        self.closed = False

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True
        self._container.close()


class FailingClose(ClosingSpy):
    """A container whose trailer cannot be written (a full disk)."""

    def close(self) -> None:
        super().close()
        raise OSError(28, "No space left on device")


def test_recordings_hold_the_frames_byte_for_byte(tmp_path):
    times = iter(float(n) for n in range(100))
    recorder = MediaRecorder(tmp_path, clock=lambda: next(times))
    audio = [bytes([0xFC, n]) * (n + 3) for n in range(5)]
    video = [bytes([n]) * (100 + n) for n in range(3)]
    for n, frame in enumerate(audio):
        recorder.write("r", PeerId("p"), "audio", frame, 2**32 - 960 + n * 960)
    for n, frame in enumerate(video):
        recorder.write("r", PeerId("p"), "video", frame, 3000 * n)
    recorder.end("r", PeerId("p"))
    recorder.write("r", PeerId("p"), "audio", b"again", 0)  # the same peer joined again
    recorder.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "r.p.audio.2.jsonl",
        "r.p.audio.2.mkv",
        "r.p.audio.jsonl",
        "r.p.audio.mkv",
        "r.p.video.jsonl",
        "r.p.video.mkv",
    ]
    for name, frames in (("r.p.audio", audio), ("r.p.video", video)):
        with av.open(str(tmp_path / f"{name}.mkv"), options=EXACT_FRAMES) as container:
            assert [bytes(p) for p in container.demux() if p.size] == frames
        sidecar = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").open()]
        assert [line["size"] for line in sidecar] == [len(frame) for frame in frames]
    first_audio = json.loads((tmp_path / "r.p.audio.jsonl").open().readline())
    assert first_audio == {"arrival": 0.0, "rtp_timestamp": 2**32 - 960, "size": 6}
