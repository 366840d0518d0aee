"""The experiment's figure: both files written and valid, the hub's picture readable in it."""

import xml.etree.ElementTree as ET

import av
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from client.experiment.figure import DPI, FILES, FigureRow, draw_figure, window, write_figure
from client.media import (
    PATTERN_HEIGHT,
    PATTERN_WIDTH,
    SAMPLE_RATE,
    draw_pattern,
    read_pattern_number,
    tone_samples,
)

NUMBER = 137


def row(title: str, picture: Image.Image | None, recovered: bool) -> FigureRow:
    tone = tone_samples(440, 0, SAMPLE_RATE)
    return FigureRow(
        title=title,
        measured=("tone correlation: peers 1.00, hub 1.00",),
        verdict="CONTROL: the hub recovers plain WebRTC (audio and video)",
        as_expected=True,
        sent=tone,
        heard=tone,
        recovered=tone if recovered else [],
        picture=picture,
        picture_caption="the last of 90 frames it decoded" if picture else "no video decoded",
    )


@pytest.fixture(scope="module")
def figure() -> Figure:
    # The pattern as the hub would have decoded it: through VP8, in colour.
    return draw_figure(
        [
            row("1. intercepted", draw_pattern(NUMBER).convert("RGB"), recovered=True),
            row("2. protected", None, recovered=False),
        ],
        valid=True,
    )


def picture_panels(figure: Figure) -> list[Axes]:
    """The picture column's panels, top row first (the only axes with a caption)."""
    return [axes for axes in figure.axes if axes.get_xlabel()]


def pixel_box(axes: Axes, height: int) -> tuple[int, int, int, int]:
    """Where a panel's image (or, with none, the panel) sits in the PNG, as a Pillow box."""
    extent = axes.images[0].get_window_extent() if axes.images else axes.get_window_extent()
    # Matplotlib counts up from the bottom; a pixel on the border may be antialiased, so keep
    # to the inside.
    return (
        round(extent.x0) + 1,
        height - round(extent.y1) + 1,
        round(extent.x1) - 1,
        height - round(extent.y0) - 1,
    )


def test_both_files_are_written_and_valid(figure, tmp_path):
    paths = write_figure(figure, tmp_path)
    assert paths == [tmp_path / name for name in FILES]
    width, height = figure.get_size_inches() * DPI
    with Image.open(paths[0]) as png:
        assert png.format == "PNG"
        assert png.size == (round(width), round(height))
    svg = ET.parse(paths[1]).getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert svg.get("width") == f"{width * 72 / DPI:g}pt"
    # The text stays text: the "no frame" label can be found (and read by a screen reader).
    texts = [
        "".join(element.itertext()) for element in svg.iter("{http://www.w3.org/2000/svg}text")
    ]
    assert "no frame" in texts
    assert "blindhub interception experiment: valid" in texts


def test_the_hub_s_picture_is_large_enough_to_read_its_number(figure, tmp_path):
    png_path = write_figure(figure, tmp_path)[0]
    with Image.open(png_path) as png:
        panel = png.convert("RGB").crop(pixel_box(picture_panels(figure)[0], png.height))
    # Shown at 60% or more of its size, and the pixels as saved still carry its number.
    assert panel.height >= 0.6 * PATTERN_HEIGHT
    frame = av.VideoFrame.from_image(panel.resize((PATTERN_WIDTH, PATTERN_HEIGHT)))
    assert read_pattern_number(frame) == NUMBER


def test_a_cell_without_a_frame_says_so_in_red(figure, tmp_path):
    panel_axes = picture_panels(figure)[1]
    assert not panel_axes.images
    assert [text.get_text() for text in panel_axes.texts] == ["no frame"]
    png_path = write_figure(figure, tmp_path)[0]
    with Image.open(png_path) as png:
        panel = png.convert("RGB").crop(pixel_box(panel_axes, png.height))
    rgb = panel.tobytes()
    pixels = zip(rgb[::3], rgb[1::3], rgb[2::3], strict=True)
    red = [(r, g, b) for r, g, b in pixels if r > 150 and g < 90 and b < 90]
    assert len(red) > 200  # the label's glyphs, drawn


def test_an_empty_audio_panel_says_what_is_missing(figure):
    labels = {text.get_text() for axes in figure.axes for text in axes.texts}
    assert "nothing recovered" in labels
    assert "nothing heard" not in labels


def test_the_window_is_20_ms_from_the_middle_at_full_scale():
    samples = window(tone_samples(440, 0, SAMPLE_RATE))
    assert len(samples) == SAMPLE_RATE // 50
    assert 0.99 < max(samples) <= 1.0
    assert window([]) == []
