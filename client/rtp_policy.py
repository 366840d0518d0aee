"""What a blindhub peer's RTP may show in clear, decided on the session descriptions.

SRTP encrypts the RTP payload (and SFrame the frame inside it) but leaves the header, header
extensions included, in clear for every relay on the media path. aiortc negotiates
``ssrc-audio-level`` (RFC 6464) for audio and writes into each packet the loudness of the raw
audio, so a relay could follow speech every 20 ms. A peer negotiates only the extensions below
(an allow-list: one aiortc adds later stays out): an extension missing from an offer is missing
from its answer, and RFC 8285 lets no side send an extension the answer did not accept.

Everything that still crosses in clear is listed in docs/explanation/protocol.md.
"""

from __future__ import annotations

# The media section an RTP stream belongs to ("0", "1"): the SSRC, in clear anyway, says as
# much; aiortc's receivers route BUNDLEd streams with it.
MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
# The sender's clock when a packet left (24 bits, 1/262144 s): about the arrival time anyone
# on the path measures; aiortc's receiver estimates the bandwidth it reports back (REMB) from it.
ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"

CLEAR_HEADER_EXTENSIONS = frozenset({MID, ABS_SEND_TIME})
"""The RTP header extensions a blindhub peer negotiates; none reveals media content."""

AUDIO_BITRATE = 32_000
"""Opus at a constant 32 kbit/s: 80 bytes every 20 ms, whatever is said (libwebrtc's default
rate for Opus, RFC 7587's range for fullband speech)."""

_EXTMAP = "a=extmap:"


def strip_header_extensions(sdp: str) -> str:
    """``sdp`` without the ``a=extmap`` lines (RFC 8285) of extensions not allowed in clear.

    Used on our own offer before it is applied and sent, and on the peer's offer or answer
    before it is applied, so that neither side's header extensions can bring one back.
    """
    lines = sdp.splitlines(keepends=True)
    return "".join(line for line in lines if _allowed(line))


def _allowed(line: str) -> bool:
    if not line.startswith(_EXTMAP):
        return True
    # a=extmap:<id>[/<direction>] <URI> [<attributes>]
    fields = line[len(_EXTMAP) :].split()
    return len(fields) >= 2 and fields[1] in CLEAR_HEADER_EXTENSIONS
