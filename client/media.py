"""Media sources and sinks for a call, as aiortc MediaStreamTracks.

Sources: a sine tone, a speech-like signal that alternates with near silence (to measure what
the wire shows of voice activity), a moving test pattern that shows its frame number and carries
it as a code, a media file, and the platform's microphone and camera. Sinks: a recorder of what
was received (``.wav``, or ``.mkv`` / ``.mp4`` for audio and video) and a collector that keeps
received audio samples and pattern frame numbers in memory for analysis.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import av
from aiortc import MediaStreamTrack
from aiortc.contrib.media import MediaPlayer, MediaRecorder
from aiortc.mediastreams import MediaStreamError
from PIL import Image, ImageDraw, ImageFont

from client.pattern import BLACK, WHITE, draw_pattern_code, read_pattern_code
from signaling.protocol import PeerId
from signaling.recording import MediaRecorder as EncodedFrameRecorder

SAMPLE_RATE = 48000
AUDIO_FRAME_SAMPLES = 960  # 20 ms, one Opus frame
TONE_AMPLITUDE = 0.3
DEFAULT_TONE_HZ = 440.0

VIDEO_CLOCK_RATE = 90000
VIDEO_FPS = 30
PATTERN_WIDTH = 320
PATTERN_HEIGHT = 240
# From the top: the frame number in digits a person reads, a ball that moves with it, and the
# same number as the block code the tests read. The code's 4 rows of blocks are 16 pixels high
# and start on a 16-pixel boundary, so each one fills VP8 macroblock rows of its own.
PATTERN_DIGITS_HEIGHT = 152
PATTERN_CODE_TOP = 176
PATTERN_DIGITS_SIZE = 120  # pixels a line; the default font's digits are then 70 wide
PATTERN_BALL_RADIUS = 9
PATTERN_BALL_STEP = 4  # pixels a frame
PATTERN_RAIL_LUMA = 64  # grey: the ball's rail reads as a track, not as part of the code

RECORDING_SUFFIXES = frozenset({".wav", ".mkv", ".mp4"})


def left_channel(interleaved_s16: bytes, channels: int) -> array[int]:
    """The first channel of interleaved signed 16-bit native-endian samples."""
    samples = array("h")
    samples.frombytes(interleaved_s16[: len(interleaved_s16) - len(interleaved_s16) % 2])
    return samples[::channels]


class MediaSourceError(ValueError):
    """A ``--send`` spec names no usable source (unknown, missing file, no such device)."""


class _PacedTrack(MediaStreamTrack):
    """Paces frames in real time from a fixed clock, like aiortc's own test tracks."""

    def __init__(self, clock_rate: int, ticks_per_frame: int) -> None:
        super().__init__()
        self._clock_rate = clock_rate
        self._ticks_per_frame = ticks_per_frame
        self._start: float | None = None
        self._frames = 0

    async def _next_frame_index(self) -> int:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            due = self._start + self._frames * self._ticks_per_frame / self._clock_rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        index = self._frames
        self._frames += 1
        return index


def tone_samples(frequency: float, first: int, count: int) -> array[int]:
    """Samples ``first`` to ``first + count`` of the 48 kHz s16 tone a ``ToneTrack`` sends."""
    omega = 2 * math.pi * frequency / SAMPLE_RATE
    peak = TONE_AMPLITUDE * 32767
    return array("h", (int(peak * math.sin(omega * n)) for n in range(first, first + count)))


class ToneTrack(_PacedTrack):
    """A 48 kHz mono sine tone in 20 ms frames."""

    kind = "audio"

    def __init__(self, frequency: float = DEFAULT_TONE_HZ) -> None:
        super().__init__(SAMPLE_RATE, AUDIO_FRAME_SAMPLES)
        if not 20 <= frequency <= SAMPLE_RATE / 2:
            raise MediaSourceError(f"tone frequency must be 20 to 24000 Hz, not {frequency}")
        self.frequency = frequency

    async def recv(self) -> av.AudioFrame:
        index = await self._next_frame_index()
        first = index * AUDIO_FRAME_SAMPLES
        return _audio_frame(tone_samples(self.frequency, first, AUDIO_FRAME_SAMPLES), first)


def _audio_frame(samples: array[int], first: int) -> av.AudioFrame:
    """A 48 kHz mono s16 frame of ``samples``, the ``first`` sample of the track at its start."""
    frame = av.AudioFrame(format="s16", layout="mono", samples=len(samples))
    frame.planes[0].update(samples.tobytes())
    frame.pts = first
    frame.sample_rate = SAMPLE_RATE
    frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
    return frame


BURST_SECONDS = 1  # voiced for this long, then as long near silent, and again
_VOICE_HARMONICS = 12
_VOICE_PEAK = 0.3 * 32767
_SYLLABLES_PER_SECOND = 4
_NOISE_FLOOR = 30  # about -60 dBFS: a quiet room through a microphone, never digital zero


@cache
def _burst_cycle() -> array[int]:
    """One voiced second then one quiet second, 48 kHz s16 (a fixed seed: the same each run)."""
    noise = random.Random(1)
    samples = array("h")
    for n in range(2 * BURST_SECONDS * SAMPLE_RATE):
        t = n / SAMPLE_RATE
        sample = noise.uniform(-_NOISE_FLOOR, _NOISE_FLOOR)
        if t < BURST_SECONDS:
            # A glottal-like buzz (harmonics falling as 1/k) whose pitch glides from 100 to
            # 160 Hz, its loudness shaped into syllables, with a breath of noise.
            phase = 2 * math.pi * (100 * t + 30 * t * t)
            buzz = sum(math.sin(k * phase) / k for k in range(1, _VOICE_HARMONICS + 1))
            envelope = 0.2 + 0.8 * math.sin(math.pi * _SYLLABLES_PER_SECOND * t) ** 2
            sample += _VOICE_PEAK * envelope * (0.5 * buzz + 0.1 * noise.uniform(-1, 1))
        samples.append(max(-32768, min(32767, round(sample))))
    return samples


def burst_samples(first: int, count: int) -> array[int]:
    """Samples ``first`` to ``first + count`` of what a ``BurstTrack`` sends."""
    cycle = _burst_cycle()
    start = first % len(cycle)
    samples = cycle[start : start + count]
    while len(samples) < count:
        samples += cycle[: count - len(samples)]
    return samples


def burst_phase(sample: int) -> str:
    """ "voiced" or "quiet": which phase of a ``BurstTrack`` sample ``sample`` is in."""
    return "voiced" if sample // (BURST_SECONDS * SAMPLE_RATE) % 2 == 0 else "quiet"


class BurstTrack(_PacedTrack):
    """48 kHz mono, 20 ms frames: a second of a speech-like voiced signal, then a second of a
    quiet room's noise floor, and so on (``burst_phase`` says which is which)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__(SAMPLE_RATE, AUDIO_FRAME_SAMPLES)
        _burst_cycle()  # made here (once, cached), not in the first recv, mid-call

    async def recv(self) -> av.AudioFrame:
        index = await self._next_frame_index()
        first = index * AUDIO_FRAME_SAMPLES
        return _audio_frame(burst_samples(first, AUDIO_FRAME_SAMPLES), first)


class PatternTrack(_PacedTrack):
    """30 fps video: the frame number in large digits, a moving ball and the number as a code."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__(VIDEO_CLOCK_RATE, VIDEO_CLOCK_RATE // VIDEO_FPS)

    async def recv(self) -> av.VideoFrame:
        index = await self._next_frame_index()
        frame = av.VideoFrame(width=PATTERN_WIDTH, height=PATTERN_HEIGHT, format="yuv420p")
        _fill_plane(frame.planes[0], draw_pattern(index).tobytes(), PATTERN_WIDTH)
        for chroma in frame.planes[1:]:
            chroma.update(b"\x80" * chroma.buffer_size)
        frame.pts = index * self._ticks_per_frame
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        return frame


@cache
def _digits_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_pattern(index: int) -> Image.Image:
    """The luma (mode "L") of pattern frame ``index``, as ``PatternTrack`` sends it."""
    image = Image.new("L", (PATTERN_WIDTH, PATTERN_HEIGHT), BLACK)
    draw = ImageDraw.Draw(image)
    digits = str(index)
    # Up to 4 digits (5.5 minutes) at full size, then smaller so that every digit still fits.
    size = PATTERN_DIGITS_SIZE * 4 // max(4, len(digits))
    centre = (PATTERN_WIDTH // 2, PATTERN_DIGITS_HEIGHT // 2)
    # A stroke thickens the font's thin lines, so that they stay legible in a small picture.
    draw.text(
        centre, digits, fill=WHITE, font=_digits_font(size), anchor="mm", stroke_width=size // 40
    )
    rail = (PATTERN_DIGITS_HEIGHT + PATTERN_CODE_TOP) // 2
    draw.line((0, rail, PATTERN_WIDTH, rail), fill=PATTERN_RAIL_LUMA, width=3)
    travel = PATTERN_WIDTH - 2 * PATTERN_BALL_RADIUS
    x = PATTERN_BALL_RADIUS + index * PATTERN_BALL_STEP % travel
    draw.ellipse(
        (
            x - PATTERN_BALL_RADIUS,
            rail - PATTERN_BALL_RADIUS,
            x + PATTERN_BALL_RADIUS,
            rail + PATTERN_BALL_RADIUS,
        ),
        fill=WHITE,
    )
    code_height = PATTERN_HEIGHT - PATTERN_CODE_TOP
    code = draw_pattern_code(index, PATTERN_WIDTH, code_height)
    image.paste(Image.frombytes("L", (PATTERN_WIDTH, code_height), code), (0, PATTERN_CODE_TOP))
    return image


def _fill_plane(plane: av.video.plane.VideoPlane, rows: bytes, width: int) -> None:
    stride = plane.line_size
    if stride == width:
        plane.update(rows)
        return
    padding = bytes(stride - width)
    plane.update(b"".join(rows[y : y + width] + padding for y in range(0, len(rows), width)))


def read_pattern_number(frame: av.VideoFrame) -> int | None:
    """The frame number a ``PatternTrack`` frame carries, or None if it cannot be read."""
    if frame.width != PATTERN_WIDTH or frame.height != PATTERN_HEIGHT:
        return None
    if frame.format.name != "yuv420p":
        frame = frame.reformat(format="yuv420p")
    luma = frame.planes[0]
    code = bytes(luma)[PATTERN_CODE_TOP * luma.line_size :]
    return read_pattern_code(code, PATTERN_WIDTH, PATTERN_HEIGHT - PATTERN_CODE_TOP, luma.line_size)


def _device_player(kind: str) -> MediaPlayer:
    system = platform.system()
    if system == "Linux":
        device, format_name = ("default", "pulse") if kind == "audio" else ("/dev/video0", "v4l2")
    elif system == "Darwin":
        device, format_name = ("none:default", "avfoundation")
        if kind == "video":
            device = "default:none"
    elif system == "Windows":
        device, format_name = (f"{kind}=default", "dshow")
    else:
        raise MediaSourceError(f"no {kind} device support on {system}")
    try:
        return MediaPlayer(device, format=format_name)
    # ValueError: this FFmpeg build has no such capture format ("no container format 'pulse'").
    except (av.FFmpegError, OSError, ValueError) as exc:
        name = "microphone" if kind == "audio" else "camera"
        raise MediaSourceError(f"cannot open the {name} ({format_name} {device}): {exc}") from None


def open_sources(spec: str) -> list[MediaStreamTrack]:
    """The tracks a ``--send`` spec names: ``tone[:HZ]``, ``pattern``, ``mic``, ``camera`` or a
    media file path, several joined by commas. At most one audio and one video track."""
    tracks: list[MediaStreamTrack] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, argument = item.partition(":")
        if name == "tone":
            try:
                frequency = float(argument) if argument else DEFAULT_TONE_HZ
            except ValueError:
                raise MediaSourceError(f"not a tone frequency: {argument!r}") from None
            tracks.append(ToneTrack(frequency))
        elif item == "pattern":
            tracks.append(PatternTrack())
        elif item in ("mic", "camera"):
            player = _device_player("audio" if item == "mic" else "video")
            track = player.audio if item == "mic" else player.video
            if track is None:
                raise MediaSourceError(f"the {item} device has no {item} stream")
            tracks.append(track)
        elif Path(item).is_file():
            try:
                player = MediaPlayer(item)
            except (av.FFmpegError, OSError) as exc:
                raise MediaSourceError(f"cannot open media file {item}: {exc}") from None
            tracks.extend(track for track in (player.audio, player.video) if track is not None)
        else:
            raise MediaSourceError(
                f"unknown source {item!r} (tone[:HZ], pattern, mic, camera, FILE)"
            )
    kinds = [track.kind for track in tracks]
    if not tracks or len(set(kinds)) != len(kinds):
        raise MediaSourceError(f"{spec!r} must name one audio and/or one video source")
    return tracks


def check_recording_path(path: str) -> None:
    """Raise ``MediaSourceError`` unless a recording can be written at ``path``; opens nothing
    (aiortc's recorder would truncate an existing file, and swallows a failure to create one)."""
    if Path(path).suffix.lower() not in RECORDING_SUFFIXES:
        raise MediaSourceError(f"recording must end in .wav, .mkv or .mp4, not {path!r}")
    directory = Path(path).parent
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        raise MediaSourceError(
            f"cannot record to {path!r}: {directory} is not a writable directory"
        )
    if Path(path).is_dir() or (Path(path).exists() and not os.access(path, os.W_OK)):
        raise MediaSourceError(f"cannot record to {path!r}: not a writable file")


def open_recorder(path: str) -> MediaRecorder:
    """A recorder of received tracks: ``.wav`` takes audio; ``.mkv``/``.mp4`` audio and video."""
    check_recording_path(path)
    return MediaRecorder(path)


class GroupRecorder:
    """``--record FILE.mkv`` in a group call: one audio and one video track per remote member,
    each titled with the member's name.

    It keeps the frames as they decrypted (Opus and VP8, never re-encoded), first one file per
    member and kind in a directory beside ``path`` (the members and their names are known only
    as the call goes on, and a Matroska file declares its tracks up front), then, on ``close``,
    puts them into ``path`` side by side, each track starting at the time its first frame came.
    """

    def __init__(self, path: str) -> None:
        if Path(path).suffix.lower() != ".mkv":
            raise MediaSourceError(
                f"a group call records to .mkv (a track per member, named), not {path!r}"
            )
        check_recording_path(path)
        self.path = Path(path)
        self._directory = Path(
            tempfile.mkdtemp(prefix=".blindhub-recording-", dir=self.path.parent)
        )
        self._frames = EncodedFrameRecorder(self._directory)

    def add(self, member: str, kind: str, frame: bytes, rtp_timestamp: int) -> None:
        """One decrypted frame of ``member``'s ``kind`` stream."""
        self._frames.write(GROUP_RECORDING_ROOM, PeerId(member), kind, frame, rtp_timestamp)

    def close(self, names: dict[str, str]) -> None:
        """Write ``path`` with a track per member and kind, titled ``names[member]``."""
        self._frames.close()
        try:
            parts = sorted(self._directory.glob(f"{GROUP_RECORDING_ROOM}.*.mkv"))
            if parts:
                _combine(parts, names, self.path)
        finally:
            shutil.rmtree(self._directory, ignore_errors=True)


GROUP_RECORDING_ROOM = "call"


def _combine(parts: list[Path], names: dict[str, str], path: Path) -> None:
    """Copy the packets of every part into one Matroska file, each part's track titled with
    its member's name, shifted so that all share the time of the earliest first frame."""
    inputs = [av.open(str(part)) for part in parts]
    try:
        starts = [_first_arrival(part) for part in parts]
        origin = min(starts)
        with av.open(str(path), "w", format="matroska") as output:
            tracks = []
            for part, source in zip(parts, inputs, strict=True):
                member, kind = part.name.split(".")[1:3]
                stream = output.add_stream_from_template(source.streams[0])
                stream.metadata["title"] = f"{names.get(member, member)} {kind}"
                tracks.append(stream)
            for source, track, start in zip(inputs, tracks, starts, strict=True):
                shift = round((start - origin) / track.time_base) if track.time_base else 0
                for packet in source.demux(source.streams[0]):
                    if packet.size == 0:
                        continue
                    assert packet.pts is not None
                    packet.pts = packet.dts = packet.pts + shift
                    packet.stream = track
                    output.mux(packet)
    finally:
        for source in inputs:
            source.close()


def _first_arrival(part: Path) -> float:
    """When the first frame of a part came (its sidecar's first line)."""
    with part.with_suffix(".jsonl").open() as sidecar:
        first = sidecar.readline()
    return float(json.loads(first)["arrival"]) if first else 0.0


def recordable(path: str, tracks: Sequence[MediaStreamTrack]) -> list[MediaStreamTrack]:
    """The received tracks a recording at ``path`` can hold (a .wav holds no video)."""
    if Path(path).suffix.lower() == ".wav":
        return [track for track in tracks if track.kind == "audio"]
    return list(tracks)


@dataclass
class ReceivedMedia:
    """What a collector took from received tracks: mono samples and pattern frame numbers."""

    samples: array[int] = field(default_factory=lambda: array("h"))
    sample_rate: int = SAMPLE_RATE
    audio_frames: int = 0
    video_frames: int = 0
    pattern_numbers: list[int] = field(default_factory=list)


async def collect(track: MediaStreamTrack, into: ReceivedMedia) -> None:
    """Read ``track`` until it ends, keeping its audio samples or pattern numbers in ``into``."""
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        keep_frame(frame, into)


def keep_frame(frame: object, into: ReceivedMedia) -> None:
    """Keep one decoded frame's audio samples or pattern number in ``into``."""
    if isinstance(frame, av.AudioFrame):
        into.audio_frames += 1
        into.sample_rate = frame.sample_rate
        channels = len(frame.layout.channels)
        interleaved = bytes(frame.planes[0])[: frame.samples * channels * 2]
        into.samples.extend(left_channel(interleaved, channels))
    elif isinstance(frame, av.VideoFrame):
        into.video_frames += 1
        number = read_pattern_number(frame)
        if number is not None:
            into.pattern_numbers.append(number)
