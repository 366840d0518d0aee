import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.pattern import CODE_COLUMNS, PatternError, draw_pattern_code, read_pattern_code


@given(st.integers(min_value=0, max_value=2**24 - 1), st.integers(min_value=0, max_value=64))
def test_pattern_code_round_trips_with_any_stride(number, padding):
    width, height = 320, 192
    rows = draw_pattern_code(number, width, height)
    assert len(rows) == width * height
    stride = width + padding
    padded = b"".join(rows[y * width : (y + 1) * width] + b"\x00" * padding for y in range(height))
    assert read_pattern_code(padded, width, height, stride) == number


def test_a_garbled_pattern_code_is_rejected_not_misread():
    width, height = 320, 192
    rows = bytearray(draw_pattern_code(123456, width, height))
    block_width = width // CODE_COLUMNS
    # Invert the first block: one bit of the number flips, so the check no longer matches.
    for y in range(height // 4):
        for x in range(block_width):
            rows[y * width + x] = 251 - rows[y * width + x]
    assert read_pattern_code(bytes(rows), width, height, width) is None
    assert read_pattern_code(bytes(width * height), width, height, width) is None


def test_read_pattern_code_refuses_a_short_plane():
    with pytest.raises(PatternError, match="smaller"):
        read_pattern_code(b"\x00" * 100, 320, 192, 320)
