"""Signal analysis of what a call carried, in the standard library only.

Pure functions over sample arrays and luma planes: the dominant frequency of a recording, the
normalized correlation of two signals or of a signal with a reference tone, and the frame-number
code the test pattern draws into each video frame (``draw_pattern_code`` / ``read_pattern_code``).
"""

from __future__ import annotations

import cmath
import math
from array import array
from collections.abc import Sequence

FFT_SIZE = 16384


class AnalysisError(ValueError):
    """The input is too short or malformed for the requested analysis."""


def _fft(values: list[complex]) -> list[complex]:
    """In-place iterative radix-2 FFT; ``len(values)`` must be a power of two."""
    size = len(values)
    j = 0
    for i in range(1, size):
        bit = size >> 1
        while j & bit:
            j ^= bit
            bit >>= 1
        j |= bit
        if i < j:
            values[i], values[j] = values[j], values[i]
    length = 2
    while length <= size:
        step = cmath.exp(-2j * math.pi / length)
        half = length // 2
        twiddles = [step**k for k in range(half)]
        for start in range(0, size, length):
            for k in range(half):
                even = values[start + k]
                odd = values[start + k + half] * twiddles[k]
                values[start + k] = even + odd
                values[start + k + half] = even - odd
        length *= 2
    return values


def dominant_frequency(samples: Sequence[float], sample_rate: int) -> float:
    """The frequency in Hz with the most energy, from the loudest ``FFT_SIZE`` window.

    Uses a Hann window and parabolic interpolation between bins, so a pure tone is located to
    well under one bin (``sample_rate / FFT_SIZE``, about 3 Hz at 48 kHz).
    """
    if len(samples) < FFT_SIZE:
        raise AnalysisError(f"need at least {FFT_SIZE} samples, got {len(samples)}")
    # The loudest window avoids leading silence before the first frame arrived.
    starts = range(0, len(samples) - FFT_SIZE + 1, FFT_SIZE // 2)
    start = max(starts, key=lambda s: math.fsum(abs(x) for x in samples[s : s + FFT_SIZE : 16]))
    window = [
        complex(samples[start + n] * (0.5 - 0.5 * math.cos(2 * math.pi * n / (FFT_SIZE - 1))))
        for n in range(FFT_SIZE)
    ]
    spectrum = [abs(value) for value in _fft(window)[: FFT_SIZE // 2]]
    peak = max(range(1, len(spectrum) - 1), key=spectrum.__getitem__)
    left, centre, right = (math.log(spectrum[peak + d] + 1e-12) for d in (-1, 0, 1))
    denominator = left - 2 * centre + right
    offset = 0.0 if denominator == 0 else 0.5 * (left - right) / denominator
    return (peak + offset) * sample_rate / FFT_SIZE


def normalized_correlation(first: Sequence[float], second: Sequence[float]) -> float:
    """The cosine similarity of two equally long signals, in [-1, 1]; 0 if either is silent."""
    if len(first) != len(second):
        raise AnalysisError(f"signals differ in length: {len(first)} and {len(second)}")
    energy = math.sqrt(math.fsum(x * x for x in first) * math.fsum(y * y for y in second))
    if energy == 0:
        return 0.0
    return math.fsum(x * y for x, y in zip(first, second, strict=True)) / energy


def tone_correlation(samples: Sequence[float], sample_rate: int, frequency: float) -> float:
    """How much of a signal is a sine at ``frequency`` (any phase), in [0, 1].

    The magnitude of the signal's projection on a sine and a cosine at that frequency,
    relative to its energy: about 1 for the pure tone, about 0 for noise or another tone.
    """
    if not samples:
        raise AnalysisError("no samples")
    omega = 2 * math.pi * frequency / sample_rate
    sine = math.fsum(x * math.sin(omega * n) for n, x in enumerate(samples))
    cosine = math.fsum(x * math.cos(omega * n) for n, x in enumerate(samples))
    energy = math.fsum(x * x for x in samples)
    if energy == 0:
        return 0.0
    return min(1.0, math.sqrt(2 * (sine * sine + cosine * cosine) / (len(samples) * energy)))


def middle_second(samples: Sequence[int], sample_rate: int) -> list[int]:
    """One second from the middle of a recording (past the codec's start-up), or all of it."""
    start = max(0, len(samples) // 2 - sample_rate // 2)
    return list(samples[start : start + sample_rate])


def left_channel(interleaved_s16: bytes, channels: int) -> array[int]:
    """The first channel of interleaved signed 16-bit native-endian samples."""
    samples = array("h")
    samples.frombytes(interleaved_s16[: len(interleaved_s16) - len(interleaved_s16) % 2])
    return samples[::channels]


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
        raise AnalysisError("luma plane is smaller than the pattern code")
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
