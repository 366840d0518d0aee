"""What a relay on the media path sees of RTP: headers, header extensions and sizes.

Parses each packet a peer's transports get, as bytes after SRTP (client/frame_transform.py's
``install_rtp_data_observer``): SRTP leaves the header and its extensions in clear and adds a
fixed-size tag, so everything here is what crossed the wire, read independently of aiortc's own
parser (which drops extensions its side did not negotiate).
"""

from __future__ import annotations

import statistics
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiortc import RTCPeerConnection
from aiortc.rtp import RtpPacket

from client.frame_transform import install_packet_observer, install_rtp_data_observer
from client.media import AUDIO_FRAME_SAMPLES, burst_phase
from crypto.sframe import SFrameHeader

ONE_BYTE_PROFILE = 0xBEDE  # RFC 8285 section 4.2
TWO_BYTE_PROFILE = 0x1000  # RFC 8285 section 4.3 (the low 4 bits are free "appbits")


@dataclass(frozen=True)
class WirePacket:
    """One RTP packet as it crossed: header fields, header extension elements, payload."""

    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    extensions: tuple[tuple[int, bytes], ...]
    payload: bytes
    size: int  # the whole packet: header, extensions and payload (SRTP adds a fixed tag)

    @classmethod
    def parse(cls, data: bytes) -> WirePacket:
        """RFC 3550 section 5.1, with the RFC 8285 extension elements unpacked."""
        first, second, sequence_number, timestamp, ssrc = struct.unpack_from("!BBHII", data)
        assert first >> 6 == 2, "not RTP version 2"
        position = 12 + 4 * (first & 0x0F)  # past the CSRCs
        extensions: tuple[tuple[int, bytes], ...] = ()
        if first & 0x10:
            profile, words = struct.unpack_from("!HH", data, position)
            position += 4
            extensions = _elements(profile, data[position : position + 4 * words])
            position += 4 * words
        end = len(data) - (data[-1] if first & 0x20 else 0)  # RTP padding
        payload = data[position:end]
        return cls(second & 0x7F, sequence_number, timestamp, ssrc, extensions, payload, len(data))


def _elements(profile: int, block: bytes) -> tuple[tuple[int, bytes], ...]:
    elements = []
    position = 0
    two_byte = profile & 0xFFF0 == TWO_BYTE_PROFILE
    assert two_byte or profile == ONE_BYTE_PROFILE, f"unknown extension profile {profile:#x}"
    while position < len(block):
        element_id = block[position]
        if element_id == 0:  # padding
            position += 1
            continue
        if two_byte:
            length, position = block[position + 1], position + 2
        else:
            if element_id >> 4 == 15:  # "stop parsing" (RFC 8285 section 4.2)
                break
            element_id, length, position = element_id >> 4, (element_id & 0x0F) + 1, position + 1
        elements.append((element_id, block[position : position + length]))
        position += length
    return tuple(elements)


@dataclass
class RawTap:
    """Every RTP packet one peer's transports get, and which SSRCs carried which kind."""

    packets: list[WirePacket] = field(default_factory=list)
    ssrcs: dict[str, set[int]] = field(default_factory=lambda: {"audio": set(), "video": set()})

    def install(self, pc: RTCPeerConnection) -> None:
        """Tap ``pc`` (before any media flows): each transport once (BUNDLE shares them)."""
        transports = {id(t.receiver.transport): t.receiver.transport for t in pc.getTransceivers()}
        for transport in transports.values():
            install_rtp_data_observer(transport, self._raw)
        for transceiver in pc.getTransceivers():
            install_packet_observer(transceiver.receiver, self._kind_of(transceiver.kind))

    def _raw(self, data: bytes) -> None:
        self.packets.append(WirePacket.parse(data))

    def _kind_of(self, kind: str) -> Callable[[RtpPacket], None]:
        return lambda packet: self.ssrcs[kind].add(packet.ssrc)

    def of_kind(self, kind: str) -> list[WirePacket]:
        return [packet for packet in self.packets if packet.ssrc in self.ssrcs[kind]]


# Frames this close to a change of phase are left out: the encoder's look-ahead (6.5 ms) and
# its smoothing carry one phase a frame or two into the next.
PHASE_MARGIN_FRAMES = 3


def steady_phase(first: int) -> str | None:
    """The ``BurstTrack`` phase of the frame starting at sample ``first``, or None if it is
    within ``PHASE_MARGIN_FRAMES`` of a change of phase (or of the start)."""
    around = {
        burst_phase(first + shift * AUDIO_FRAME_SAMPLES)
        for shift in range(-PHASE_MARGIN_FRAMES, PHASE_MARGIN_FRAMES + 1)
    }
    steady = first >= PHASE_MARGIN_FRAMES * AUDIO_FRAME_SAMPLES and len(around) == 1
    return around.pop() if steady else None


def sizes_by_phase(
    audio: Sequence[WirePacket], size: Callable[[WirePacket], int]
) -> dict[str, list[int]]:
    """``size`` of each audio packet of a ``BurstTrack``'s call, by the phase it was sent in.

    Each 20 ms frame is one packet whose RTP timestamp counts the track's samples from a random
    origin: the earliest timestamp (the call's first frame) aligns the phases.
    """
    offsets = [(packet.timestamp - audio[0].timestamp + 2**31) % 2**32 - 2**31 for packet in audio]
    origin = min(offsets)
    by_phase: dict[str, list[int]] = {"voiced": [], "quiet": []}
    for packet, offset in zip(audio, offsets, strict=True):
        phase = steady_phase(offset - origin)
        if phase is not None:
            by_phase[phase].append(size(packet))
    return by_phase


def sframe_body_size(packet: WirePacket) -> int:
    """The payload without its SFrame header, whose length depends on the KID and CTR alone."""
    return len(packet.payload) - SFrameHeader.parse(packet.payload)[1]


def describe(sizes: Sequence[int]) -> str:
    """min/median/max and the distinct sizes of ``sizes``."""
    distinct = sorted(set(sizes))
    shown = distinct if len(distinct) <= 6 else [*distinct[:3], "...", *distinct[-3:]]
    return (
        f"n={len(sizes)} min={min(sizes)} median={statistics.median(sizes):g} max={max(sizes)} "
        f"distinct={len(distinct)} {shown}"
    )
