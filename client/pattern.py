"""The frame-number code that the test pattern (``--send pattern``) draws into each frame.

``draw_pattern_code`` renders a number as blocks of luma big enough to survive VP8 at a low
bitrate; ``read_pattern_code`` reads it back from a decoded frame, so a receiver can tell which
frames arrived. Pure functions over luma rows.
"""

from __future__ import annotations


class PatternError(ValueError):
    """The luma plane is too small to hold the pattern code."""


# The pattern code: a grid of black and white blocks, big enough to survive VP8 at low bitrate.
# 24 bits of frame number, then 8 bits of check so that a garbled picture is rejected, not misread.
CODE_COLUMNS = 8
CODE_ROWS = 4
NUMBER_BITS = 24
CHECK_MASK = 0xA5
BLACK = 16
WHITE = 235


def _code_bits(number: int) -> list[int]:
    number &= (1 << NUMBER_BITS) - 1
    check = (sum(number.to_bytes(3, "big")) & 0xFF) ^ CHECK_MASK
    word = number << 8 | check
    return [(word >> (31 - i)) & 1 for i in range(CODE_COLUMNS * CODE_ROWS)]


def draw_pattern_code(number: int, width: int, code_height: int) -> bytes:
    """Luma rows (``width`` x ``code_height``, no padding) showing ``number`` as blocks."""
    bits = _code_bits(number)
    block_width = width // CODE_COLUMNS
    block_height = code_height // CODE_ROWS
    rows = bytearray()
    for row in range(CODE_ROWS):
        line = b"".join(
            bytes([WHITE if bits[row * CODE_COLUMNS + col] else BLACK]) * block_width
            for col in range(CODE_COLUMNS)
        ).ljust(width, bytes([BLACK]))
        rows += line * block_height
    return bytes(rows.ljust(width * code_height, bytes([BLACK])))


def read_pattern_code(luma: bytes, width: int, code_height: int, stride: int) -> int | None:
    """The frame number drawn by ``draw_pattern_code``, or None if the check does not match."""
    if stride < width or len(luma) < stride * code_height:
        raise PatternError("luma plane is smaller than the pattern code")
    block_width = width // CODE_COLUMNS
    block_height = code_height // CODE_ROWS
    word = 0
    for row in range(CODE_ROWS):
        for col in range(CODE_COLUMNS):
            # Sample the middle half of each block: edges blur under compression.
            top = row * block_height + block_height // 4
            left = col * block_width + block_width // 4
            total = count = 0
            for y in range(top, top + block_height // 2, 2):
                segment = luma[y * stride + left : y * stride + left + block_width // 2 : 2]
                total += sum(segment)
                count += len(segment)
            word = word << 1 | (total > count * (BLACK + WHITE) // 2)
    number = word >> 8
    if _code_bits(number) != [(word >> (31 - i)) & 1 for i in range(32)]:
        return None
    return number
