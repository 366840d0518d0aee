import math
import random

import pytest

from client.experiment.analysis import (
    FFT_SIZE,
    AnalysisError,
    dominant_frequency,
    normalized_correlation,
    tone_correlation,
)

RATE = 48000


def sine(frequency: float, count: int, amplitude: float = 10000.0, phase: float = 0.0):
    return [amplitude * math.sin(2 * math.pi * frequency * n / RATE + phase) for n in range(count)]


@pytest.mark.parametrize("frequency", [100.0, 440.0, 660.0, 1234.5, 7000.0])
def test_dominant_frequency_finds_a_tone_within_one_hertz(frequency):
    assert abs(dominant_frequency(sine(frequency, FFT_SIZE * 2), RATE) - frequency) < 1


def test_dominant_frequency_ignores_leading_silence_and_noise():
    noise = random.Random(7)
    samples = [0.0] * FFT_SIZE * 2 + [
        s + noise.uniform(-3000, 3000) for s in sine(660, FFT_SIZE * 2)
    ]
    assert abs(dominant_frequency(samples, RATE) - 660) < 1


def test_dominant_frequency_needs_a_full_window():
    with pytest.raises(AnalysisError, match="need at least"):
        dominant_frequency(sine(440, FFT_SIZE - 1), RATE)


def test_normalized_correlation():
    tone = sine(440, 4800)
    assert normalized_correlation(tone, tone) == pytest.approx(1)
    assert normalized_correlation(tone, [-x for x in tone]) == pytest.approx(-1)
    assert abs(normalized_correlation(tone, sine(440, 4800, phase=math.pi / 2))) < 0.01
    assert normalized_correlation(tone, [0.0] * 4800) == 0
    with pytest.raises(AnalysisError, match="differ in length"):
        normalized_correlation(tone, tone[:-1])


def test_tone_correlation_is_phase_blind_and_frequency_selective():
    assert tone_correlation(sine(440, 9600, phase=1.0), RATE, 440) > 0.99
    assert tone_correlation(sine(660, 9600), RATE, 440) < 0.02
    noise = random.Random(3)
    assert tone_correlation([noise.uniform(-1, 1) for _ in range(9600)], RATE, 440) < 0.05
    assert tone_correlation([0.0] * 100, RATE, 440) == 0
    with pytest.raises(AnalysisError):
        tone_correlation([], RATE, 440)
