"""The header extensions a blindhub peer lets into a session description."""

from client.rtp_policy import ABS_SEND_TIME, AUDIO_LEVEL, MID, strip_header_extensions

# What aiortc 1.16 offers, plus what other stacks offer: a direction, attributes, a session-level
# extmap (RFC 8285 section 5) and extensions aiortc never sends.
OFFER = (
    "v=0\r\n"
    "o=- 1 1 IN IP4 0.0.0.0\r\n"
    "s=-\r\n"
    "t=0 0\r\n"
    "a=extmap:9 urn:ietf:params:rtp-hdrext:toffset\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 96\r\n"
    f"a=extmap:1 {MID}\r\n"
    f"a=extmap:2 {AUDIO_LEVEL}\r\n"
    f"a=extmap:4/sendonly {AUDIO_LEVEL} vad=on\r\n"
    "a=extmap:5 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n"
    "a=extmap:6 urn:ietf:params:rtp-hdrext:encrypt urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n"
    "a=extmap:7\r\n"
    "a=rtpmap:96 opus/48000/2\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 97\r\n"
    f"a=extmap:1 {MID}\r\n"
    f"a=extmap:3/sendrecv {ABS_SEND_TIME}\r\n"
    "a=extmap:8 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n"
    "a=rtpmap:97 VP8/90000\r\n"
)


def test_only_mid_and_abs_send_time_stay():
    stripped = strip_header_extensions(OFFER)
    extmaps = [line for line in stripped.splitlines() if line.startswith("a=extmap")]
    assert extmaps == [
        f"a=extmap:1 {MID}",
        f"a=extmap:1 {MID}",
        f"a=extmap:3/sendrecv {ABS_SEND_TIME}",
    ]


def test_every_other_line_stays_as_it_was():
    stripped = strip_header_extensions(OFFER)
    kept = [line for line in OFFER.splitlines(keepends=True) if not line.startswith("a=extmap")]
    assert [line for line in stripped.splitlines(keepends=True) if "extmap" not in line] == kept
    assert stripped.endswith("\r\n") and "\n" not in stripped.replace("\r\n", "")
    assert strip_header_extensions(stripped) == stripped


def test_the_audio_level_is_refused_however_it_is_spelled():
    # As an attribute of another URI it stays out too (RFC 6904 would encrypt it, but aiortc
    # does not implement that: allowed means exactly an allowed URI).
    assert AUDIO_LEVEL not in strip_header_extensions(OFFER)
    assert strip_header_extensions(f"a=extmap:2 {AUDIO_LEVEL}\n") == ""
