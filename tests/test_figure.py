import math

import av
import pytest

from client.experiment.figure import BLACK, BLUE, RED, WHITE, Canvas, encode_png


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """Decode with FFmpeg's PNG decoder, an implementation independent of ours."""
    codec = av.CodecContext.create("png", "r")
    (frame,) = codec.decode(av.Packet(data))
    rgb = frame.reformat(format="rgb24")
    plane = rgb.planes[0]
    rows = [
        bytes(plane)[r * plane.line_size : r * plane.line_size + rgb.width * 3]
        for r in range(rgb.height)
    ]
    return rgb.width, rgb.height, b"".join(rows)


def pixel(rgb: bytes, width: int, x: int, y: int) -> tuple[int, int, int]:
    offset = (y * width + x) * 3
    return rgb[offset], rgb[offset + 1], rgb[offset + 2]


def test_png_decodes_to_the_pixels_drawn():
    canvas = Canvas(40, 30)
    canvas.fill_rect(10, 5, 8, 4, RED)
    width, height, rgb = decode_png(canvas.to_png())
    assert (width, height) == (40, 30)
    assert pixel(rgb, width, 10, 5) == RED
    assert pixel(rgb, width, 17, 8) == RED
    assert pixel(rgb, width, 18, 8) == WHITE
    assert pixel(rgb, width, 9, 5) == WHITE


def test_encode_png_rejects_a_size_mismatch():
    with pytest.raises(ValueError, match="need 2x2x3 bytes"):
        encode_png(2, 2, b"\x00" * 11)


def test_text_draws_the_glyph_rows():
    canvas = Canvas(20, 10)
    end = canvas.text(1, 1, "T", BLACK)
    assert end == 7
    # 'T': a full top bar, then a single centre column.
    assert [canvas.pixel(x, 1) for x in range(1, 6)] == [BLACK] * 5
    assert canvas.pixel(3, 4) == BLACK
    assert canvas.pixel(1, 4) == WHITE


def test_waveform_follows_the_signal():
    canvas = Canvas(100, 41)
    samples = [math.sin(2 * math.pi * i / 100) for i in range(100)]
    canvas.waveform(0, 0, 100, 41, samples, BLUE)
    # The peak of the sine (column 25) sits near the top, the trough (75) near the bottom.
    peak_rows = [y for y in range(41) if canvas.pixel(25, y) == BLUE]
    trough_rows = [y for y in range(41) if canvas.pixel(75, y) == BLUE]
    assert peak_rows and max(peak_rows) <= 4
    assert trough_rows and min(trough_rows) >= 36


def test_image_is_scaled_into_its_box():
    source = bytes(RED) * 2 + bytes(BLUE) * 2  # 2x2: top row red, bottom row blue
    canvas = Canvas(10, 10)
    canvas.image(0, 0, 10, 10, source, 2, 2)
    assert canvas.pixel(9, 0) == RED
    assert canvas.pixel(0, 9) == BLUE
