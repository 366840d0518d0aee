import asyncio
import os
from array import array
from pathlib import Path

import av
import pytest
from aiortc import MediaStreamTrack
from aiortc.codecs.vpx import Vp8Decoder, Vp8Encoder, vp8_depayload
from aiortc.jitterbuffer import JitterFrame
from PIL import Image

from client.experiment.analysis import dominant_frequency
from client.media import (
    AUDIO_FRAME_SAMPLES,
    PATTERN_CODE_TOP,
    PATTERN_DIGITS_HEIGHT,
    PATTERN_HEIGHT,
    PATTERN_WIDTH,
    SAMPLE_RATE,
    VIDEO_FPS,
    MediaSourceError,
    PatternTrack,
    ReceivedMedia,
    ToneTrack,
    collect,
    draw_pattern,
    left_channel,
    open_recorder,
    open_sources,
    read_pattern_number,
    recordable,
)
from tests.conftest import wait_for


def test_left_channel_takes_every_other_sample():
    interleaved = array("h", [1, -1, 2, -2, 3, -3]).tobytes()
    assert list(left_channel(interleaved, 2)) == [1, 2, 3]
    assert list(left_channel(interleaved, 1)) == [1, -1, 2, -2, 3, -3]


async def test_tone_track_is_a_paced_48khz_tone():
    track = ToneTrack(660)
    samples = array("h")
    pts = []
    for _ in range(20):
        frame = await track.recv()
        assert (frame.sample_rate, frame.samples, frame.layout.name) == (48000, 960, "mono")
        pts.append(frame.pts)
        samples.frombytes(bytes(frame.planes[0])[: AUDIO_FRAME_SAMPLES * 2])
    assert pts == [n * AUDIO_FRAME_SAMPLES for n in range(20)]
    assert abs(dominant_frequency(samples, SAMPLE_RATE) - 660) < 1


async def test_pattern_frame_numbers_survive_vp8():
    track = PatternTrack()
    encoder, decoder = Vp8Encoder(), Vp8Decoder()
    read = []
    for index in range(15):
        frame = await track.recv()
        assert read_pattern_number(frame) == index
        payloads, timestamp = encoder.encode(frame)
        encoded = b"".join(vp8_depayload(p) for p in payloads)
        for decoded in decoder.decode(JitterFrame(encoded, timestamp)):
            assert isinstance(decoded, av.VideoFrame)
            read.append(read_pattern_number(decoded))
    assert read == list(range(15))


def lit_box(image: Image.Image, top: int, bottom: int) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) of what is drawn bright in rows ``top`` to ``bottom``
    of a luma image, relative to that band."""
    band = image.crop((0, top, image.width, bottom))
    box = band.point(lambda value: 255 if value > 128 else 0).getbbox()
    assert box is not None, "nothing is drawn there"
    return box


async def test_the_pattern_shows_its_number_in_digits_and_something_moving():
    track = PatternTrack()
    frames = [await track.recv() for _ in range(3)]
    images = [frame.to_image().convert("L") for frame in frames]
    assert all(image.size == (PATTERN_WIDTH, PATTERN_HEIGHT) for image in images)
    digits = [image.crop((0, 0, PATTERN_WIDTH, PATTERN_DIGITS_HEIGHT)) for image in images]
    # Large digits, more than half the band high, that change with the number.
    box = lit_box(images[1], 0, PATTERN_DIGITS_HEIGHT)
    assert box[3] - box[1] > PATTERN_DIGITS_HEIGHT // 2
    assert digits[1].tobytes() != digits[2].tobytes()
    # Beside them, something moves every frame: the ball on its rail.
    balls = [lit_box(image, PATTERN_DIGITS_HEIGHT, PATTERN_CODE_TOP) for image in images]
    assert balls[0][0] < balls[1][0] < balls[2][0]


@pytest.mark.parametrize("number", [0, 7, 1234, 98765, 2**24 - 1])
def test_every_number_fits_in_its_band_and_reads_back(number):
    image = draw_pattern(number)
    # No digit is cut at an edge of its band.
    left, top, right, bottom = lit_box(image, 0, PATTERN_DIGITS_HEIGHT)
    assert left > 0 and top > 0 and right < PATTERN_WIDTH and bottom < PATTERN_DIGITS_HEIGHT
    frame = av.VideoFrame(width=PATTERN_WIDTH, height=PATTERN_HEIGHT, format="yuv420p")
    frame.planes[0].update(image.tobytes())
    assert read_pattern_number(frame) == number


def test_a_frame_of_another_size_carries_no_number():
    assert read_pattern_number(av.VideoFrame(width=640, height=480, format="yuv420p")) is None


def test_open_sources_parses_specs():
    assert [t.kind for t in open_sources("tone:660,pattern")] == ["audio", "video"]
    (tone,) = open_sources("tone")
    assert isinstance(tone, ToneTrack) and tone.frequency == 440
    assert isinstance(open_sources(" pattern ")[0], PatternTrack)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tone:abc", "not a tone frequency"),
        ("tone:5", "20 to 24000"),
        ("bogus", "unknown source"),
        ("tone,tone:660", "one audio and/or one video"),
        ("", "one audio and/or one video"),
    ],
)
def test_open_sources_rejects_bad_specs(spec, message):
    with pytest.raises(MediaSourceError, match=message):
        open_sources(spec)


@pytest.mark.skipif(os.path.exists("/dev/video0"), reason="this machine has a camera")
def test_a_missing_camera_is_a_clear_error():
    with pytest.raises(MediaSourceError, match="camera"):
        open_sources("camera")


def test_recordings_must_be_wav_mkv_or_mp4(tmp_path):
    with pytest.raises(MediaSourceError, match=r"\.wav, \.mkv or \.mp4"):
        open_recorder(str(tmp_path / "call.ogg"))
    tracks = [ToneTrack(), PatternTrack()]
    assert recordable("x.wav", tracks) == tracks[:1]
    assert recordable("x.mkv", tracks) == tracks


class Counted(MediaStreamTrack):
    """``source`` as its consumer takes it, counting the frames taken."""

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.kind = source.kind
        self.source = source
        self.taken = 0

    async def recv(self) -> "av.frame.Frame | av.Packet[av.stream.Stream]":
        frame = await self.source.recv()
        self.taken += 1
        return frame


FRAMES_PER_SECOND = {"audio": SAMPLE_RATE // AUDIO_FRAME_SAMPLES, "video": VIDEO_FPS}


async def record(path: Path, tracks: list[MediaStreamTrack], seconds: float) -> None:
    """Record ``seconds`` of each track that ``path`` can hold: stop once the recorder took
    that many frames of each."""
    recorder = open_recorder(str(path))
    recorded = [Counted(track) for track in recordable(str(path), tracks)]
    for track in recorded:
        recorder.addTrack(track)
    await recorder.start()
    await wait_for(
        lambda: all(track.taken >= seconds * FRAMES_PER_SECOND[track.kind] for track in recorded)
    )
    await recorder.stop()


async def test_a_wav_recording_plays_back_as_a_file_source(tmp_path):
    path = tmp_path / "tone.wav"
    await record(path, [ToneTrack(550), PatternTrack()], 0.8)
    (source,) = open_sources(str(path))
    assert source.kind == "audio"
    received = ReceivedMedia()
    await asyncio.wait_for(collect(source, received), timeout=10)
    assert abs(dominant_frequency(received.samples, received.sample_rate) - 550) < 2


async def test_an_mkv_recording_holds_audio_and_video(tmp_path):
    path = tmp_path / "call.mkv"
    await record(path, [ToneTrack(770), PatternTrack()], 1.0)
    received = ReceivedMedia()
    sources = open_sources(str(path))
    assert sorted(t.kind for t in sources) == ["audio", "video"]
    await asyncio.wait_for(
        asyncio.gather(*(collect(track, received) for track in sources)), timeout=10
    )
    assert abs(dominant_frequency(received.samples, received.sample_rate) - 770) < 2
    numbers = received.pattern_numbers
    assert len(numbers) >= 10 and numbers == sorted(numbers)
