"""``blindhub hub --record-media DIR``: every stream the hub forwarded, as an operator keeps it.

One Matroska file per stream (a publisher's audio or video in one room), holding each frame
exactly as the hub received and forwarded it, muxed by PyAV without decoding or encoding, so
ffmpeg, PyAV and media players open it. Next to it a JSON-lines sidecar with one line per frame:
its arrival time (Unix seconds), its RTP timestamp and its size, which Matroska's millisecond
timestamps would round.

The frames are SFrame ciphertext, which FFmpeg's Opus parser, run by default when a file is
read, takes for broken Opus packets and drops (a few in a hundred): read them exactly with the
parsers off (``ffprobe -fflags +noparse+nofillin``; PyAV ``av.open(path, options={"fflags":
"+noparse+nofillin"})``).

Files are named ``ROOM.PEER.KIND.mkv`` and ``ROOM.PEER.KIND.jsonl`` (rooms and peer ids are
letters, digits, ``-`` and ``_``); a peer that joins the same room again records to
``ROOM.PEER.KIND.2.mkv``, and so on. A video file's dimensions are placeholders: the hub
cannot read them from frames it cannot decrypt.
"""

import contextlib
import fractions
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TextIO

import av

from signaling.media_adapter import CLOCK_RATES
from signaling.protocol import PeerId

logger = logging.getLogger("blindhub.hub")

# What writing a file can fail with: the file system, or PyAV refusing a frame or the trailer.
_FILE_ERRORS: Final = (OSError, ValueError, av.FFmpegError)

# PyAV's names for a stream that only carries packets of each codec.
_CODEC_NAMES: Final = {"audio": "libopus", "video": "libvpx"}


class _StreamFile:
    def __init__(self, path: Path, kind: str) -> None:
        # All or nothing: what is open when a later step fails (the sidecar's name taken by a
        # directory, a permission refused) is closed, not left to the garbage collector.
        with contextlib.ExitStack() as opening:
            self._container = opening.enter_context(av.open(str(path), "w", format="matroska"))
            self._stream = self._container.add_stream(_CODEC_NAMES[kind], rate=CLOCK_RATES[kind])
            # Open as long as the stream is; closed in close().
            self._sidecar: TextIO = opening.enter_context(
                open(path.with_suffix(".jsonl"), "w", buffering=1)
            )
            opening.pop_all()
        self._time_base = fractions.Fraction(1, CLOCK_RATES[kind])
        # Matroska counts milliseconds: a frame is at least that much later than the last.
        self._tick = CLOCK_RATES[kind] // 1000
        self._last_rtp: int | None = None
        self._last_pts = -1

    def write(self, frame: bytes, rtp_timestamp: int, arrival: float) -> None:
        packet = av.Packet(frame)
        packet.pts = packet.dts = self._file_time(rtp_timestamp)
        packet.time_base = self._time_base
        packet.stream = self._stream
        self._container.mux(packet)
        line = {"arrival": round(arrival, 6), "rtp_timestamp": rtp_timestamp, "size": len(frame)}
        self._sidecar.write(json.dumps(line, separators=(",", ":")) + "\n")

    def _file_time(self, rtp_timestamp: int) -> int:
        """The frame's time in the file: RTP time from the first frame, unwrapped (RTP
        timestamps wrap at 2**32), and at least 1 ms later than the frame before, since
        Matroska refuses time that goes back and a publisher may send any timestamp at all.
        The sidecar keeps the RTP timestamp as it came."""
        if self._last_rtp is None:
            pts = 0
        else:
            step = (rtp_timestamp - self._last_rtp + 2**31) % 2**32 - 2**31
            pts = max(self._last_pts + step, self._last_pts + self._tick)
        self._last_rtp, self._last_pts = rtp_timestamp, pts
        return pts

    def close(self) -> None:
        try:
            self._container.close()  # writes the trailer: a full disk fails here
        finally:
            self._sidecar.close()


class MediaRecorder:
    """Writes every forwarded frame to its stream's file in ``directory`` (which must exist)."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self._clock = clock
        self._files: dict[tuple[str, PeerId, str], _StreamFile] = {}
        self._used: set[str] = set()
        self._failed: set[tuple[str, PeerId, str]] = set()  # streams no longer recorded
        self.errors = 0

    def write(self, room: str, publisher: PeerId, kind: str, frame: bytes, timestamp: int) -> None:
        """Record one forwarded frame. Never raises for what a file or PyAV can fail with: it
        runs in the forwarding path, and a recording that cannot be written (a full disk, a
        directory gone, a frame the muxer refuses) must not stop the call; that stream is
        logged, counted and not recorded any further."""
        key = (room, publisher, kind)
        if key in self._failed:
            return
        try:
            stream = self._files.get(key)
            if stream is None:
                stream = self._files[key] = _StreamFile(self._path(room, publisher, kind), kind)
            stream.write(frame, timestamp, self._clock())
        except _FILE_ERRORS as error:
            self.errors += 1
            self._failed.add(key)
            logger.error("no longer recording %s of %s in %s: %s", kind, publisher, room, error)

    def end(self, room: str, publisher: PeerId) -> None:
        """``publisher`` left ``room``: close its files."""
        for kind in CLOCK_RATES:
            key = (room, publisher, kind)
            stream = self._files.pop(key, None)
            if stream is not None:
                self._close(key, stream)

    def close(self) -> None:
        for key, stream in self._files.items():
            self._close(key, stream)
        self._files.clear()

    def _close(self, key: tuple[str, PeerId, str], stream: _StreamFile) -> None:
        """Close a stream's files; like ``write``, never raises (closing writes the trailer,
        which a full disk refuses, and runs when a member leaves): logged and counted, once
        per stream."""
        try:
            stream.close()
        except _FILE_ERRORS as error:
            if key not in self._failed:  # else counted when it stopped recording
                self.errors += 1
            room, publisher, kind = key
            logger.error(
                "could not finish recording %s of %s in %s: %s", kind, publisher, room, error
            )

    def _path(self, room: str, publisher: PeerId, kind: str) -> Path:
        stem = f"{room}.{publisher}.{kind}"
        name, count = stem, 1
        while name in self._used or (self.directory / f"{name}.mkv").exists():
            count += 1
            name = f"{stem}.{count}"
        self._used.add(name)
        return self.directory / f"{name}.mkv"
