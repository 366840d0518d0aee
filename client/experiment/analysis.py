"""Signal analysis of what a call carried, in the standard library only.

Pure functions over sample arrays: the dominant frequency of a recording, and the normalized
correlation of two signals or of a signal with a reference tone. The experiment and the tests
measure calls with them; the product never does. (The frame-number code the test pattern draws
is the product's: `client.pattern`.)
"""

from __future__ import annotations

import cmath
import math
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
