"""A tiny raster canvas that writes PNG, for the interception experiment's figure.

The design card keeps the dependencies to aiortc, pynacl, websockets, av and
cryptography, and PyAV's FFmpeg has no text renderer, so the figure is drawn here:
filled boxes, polylines, scaled RGB images and a 5x7 bitmap font, encoded as an
8-bit RGB PNG with zlib.
"""

import struct
import zlib
from collections.abc import Sequence

Color = tuple[int, int, int]

BLACK: Color = (0, 0, 0)
WHITE: Color = (255, 255, 255)
GREY: Color = (150, 150, 150)
LIGHT_GREY: Color = (235, 235, 235)
RED: Color = (200, 30, 30)
GREEN: Color = (30, 140, 60)
BLUE: Color = (30, 80, 200)

# 5x7 glyphs, one 5-bit row per entry, most significant bit on the left
# (the HD44780 character ROM shapes). Lower case is drawn as upper case.
_GLYPHS: dict[str, tuple[int, ...]] = {
    " ": (0, 0, 0, 0, 0, 0, 0),
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11),
    "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E),
    "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F),
    "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F),
    "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11),
    "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11),
    "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D),
    "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E),
    "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A),
    "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04),
    "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    ".": (0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C),
    ",": (0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08),
    ":": (0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00),
    "-": (0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00),
    "_": (0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F),
    "/": (0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "=": (0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00),
    "+": (0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00),
    "<": (0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02),
    ">": (0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08),
    "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04),
    "!": (0x04, 0x04, 0x04, 0x04, 0x00, 0x00, 0x04),
}
GLYPH_WIDTH = 5
GLYPH_HEIGHT = 7


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """Encode packed 8-bit RGB pixels, row by row from the top, as a PNG file."""
    if width <= 0 or height <= 0 or len(rgb) != width * height * 3:
        raise ValueError(f"need {width}x{height}x3 bytes of RGB, got {len(rgb)}")
    stride = width * 3
    # Filter type 0 (none) before every scanline.
    raw = b"".join(b"\x00" + rgb[row * stride : (row + 1) * stride] for row in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


class Canvas:
    """An RGB raster with the few drawing operations the experiment's figure needs."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width = width
        self.height = height
        self._pixels = bytearray(bytes(background) * (width * height))

    def pixel(self, x: int, y: int) -> Color:
        offset = (y * self.width + x) * 3
        red, green, blue = self._pixels[offset : offset + 3]
        return red, green, blue

    def set_pixel(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            offset = (y * self.width + x) * 3
            self._pixels[offset : offset + 3] = bytes(color)

    def fill_rect(self, x: int, y: int, width: int, height: int, color: Color) -> None:
        left, right = max(x, 0), min(x + width, self.width)
        if left >= right:
            return
        row_bytes = bytes(color) * (right - left)
        for row in range(max(y, 0), min(y + height, self.height)):
            offset = (row * self.width + left) * 3
            self._pixels[offset : offset + len(row_bytes)] = row_bytes

    def outline_rect(self, x: int, y: int, width: int, height: int, color: Color) -> None:
        self.fill_rect(x, y, width, 1, color)
        self.fill_rect(x, y + height - 1, width, 1, color)
        self.fill_rect(x, y, 1, height, color)
        self.fill_rect(x + width - 1, y, 1, height, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Bresenham's line, both ends included."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        step_x, step_y = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        error = dx + dy
        while True:
            self.set_pixel(x0, y0, color)
            if x0 == x1 and y0 == y1:
                return
            doubled = 2 * error
            if doubled >= dy:
                error += dy
                x0 += step_x
            if doubled <= dx:
                error += dx
                y0 += step_y

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 1) -> int:
        """Draw one line of text; return the x just past it. Unknown characters draw as '?'."""
        for character in text.upper():
            rows = _GLYPHS.get(character, _GLYPHS["?"])
            for row_index, bits in enumerate(rows):
                for column in range(GLYPH_WIDTH):
                    if bits & (1 << (GLYPH_WIDTH - 1 - column)):
                        self.fill_rect(
                            x + column * scale, y + row_index * scale, scale, scale, color
                        )
            x += (GLYPH_WIDTH + 1) * scale
        return x

    def waveform(
        self,
        x: int,
        y: int,
        width: int,
        height: int,
        samples: Sequence[float],
        color: Color,
    ) -> None:
        """Plot samples in [-1, 1] across a framed panel, one column per step."""
        self.fill_rect(x, y, width, height, LIGHT_GREY)
        self.outline_rect(x, y, width, height, GREY)
        middle = y + height // 2
        self.line(x, middle, x + width - 1, middle, GREY)
        if not samples:
            return
        half = (height - 4) / 2
        previous: tuple[int, int] | None = None
        for column in range(width):
            sample = samples[min(len(samples) - 1, column * len(samples) // width)]
            point = (x + column, round(middle - max(-1.0, min(1.0, sample)) * half))
            if previous is not None:
                self.line(*previous, *point, color)
            previous = point

    def image(
        self,
        x: int,
        y: int,
        width: int,
        height: int,
        rgb: bytes,
        source_width: int,
        source_height: int,
    ) -> None:
        """Blit packed RGB pixels scaled (nearest neighbour) into a box."""
        if len(rgb) != source_width * source_height * 3:
            raise ValueError("image size does not match its pixels")
        for row in range(height):
            source_row = row * source_height // height
            for column in range(width):
                offset = (source_row * source_width + column * source_width // width) * 3
                red, green, blue = rgb[offset : offset + 3]
                self.set_pixel(x + column, y + row, (red, green, blue))

    def to_png(self) -> bytes:
        return encode_png(self.width, self.height, bytes(self._pixels))
