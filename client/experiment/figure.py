"""The interception experiment's figure, drawn with matplotlib and written as PNG and SVG.

One row per cell: what the experiment measured and its verdict, then 20 ms of alice's tone as
she sent it, as bob heard it and as the hub recovered it, and the last picture of her test
pattern that the hub decoded, large enough to read its frame number (or "no frame"). A row
with more than one sender (a routed cell: three members) splits each of those panels into one
strip per sender, named in the strip: each member's tone as sent, as another member heard it
and as the hub recovered it, and the hub's last picture of each member's pattern.

Only the experiment imports this module: matplotlib is the ``demo`` extra, which no product
command needs. It uses matplotlib's object API (``Figure``), not pyplot, so that drawing keeps
no global state and needs no GUI backend.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import ScaledTranslation
from PIL import Image

from client.media import TONE_AMPLITUDE

SENT, HEARD, RECOVERED = "black", "#1e8c3c", "#c81e1e"
AS_EXPECTED, NOT_AS_EXPECTED = "#1e8c3c", "#c81e1e"
PANEL_BACKGROUND = "#f2f2f2"
QUIET = "#777777"
WINDOW_SAMPLES = 960  # 20 ms of 48 kHz audio per panel: about 9 cycles of the 440 Hz tone
DPI = 100

# Inches. The picture column is 4:3 like the pattern, and tall enough that the pattern's digits
# come out about 60 pixels high in the PNG.
LABEL_WIDTH = 4.2
WAVE_WIDTH = 2.9
PICTURE_WIDTH = 2.4
ROW_HEIGHT = 2.2
PANEL_HEIGHT = 1.8
HEADER_HEIGHT = 1.0
GAP = 0.2
STRIP_GAP = 0.06  # between the strips of a row with several senders
FILES = ("figure.png", "figure.svg")
LABEL_CHARACTERS = 46  # of 10-point text in a line of the label column
LINE_SPACING = 1.3


@dataclass(frozen=True)
class FigureRow:
    """One cell of the experiment as the figure shows it."""

    title: str
    measured: Sequence[str]  # one line each
    verdict: str  # "HEAD: explanation"; the head is shown in bold
    as_expected: bool
    sent: Sequence[int]  # 48 kHz samples
    heard: Sequence[int]
    recovered: Sequence[int]
    picture: Image.Image | None  # the hub's last decoded picture of alice's pattern
    picture_caption: str
    # With more than one, the row shows these instead of sent, heard, recovered and picture.
    senders: Sequence[SenderPanels] = ()


@dataclass(frozen=True)
class SenderPanels:
    """One sender of a row with several: its tone as sent, as ``listener`` heard it and as
    the hub recovered it, and the hub's last picture of its pattern."""

    name: str
    sent: Sequence[int]
    listener: str | None
    heard: Sequence[int]
    recovered: Sequence[int]
    picture: Image.Image | None


def window(samples: Sequence[int]) -> list[float]:
    """20 ms from the middle, scaled so that the sent tone's peak reaches the panel's edge."""
    start = max(0, len(samples) // 2 - WINDOW_SAMPLES // 2)
    scale = TONE_AMPLITUDE * 32767
    return [sample / scale for sample in samples[start : start + WINDOW_SAMPLES]]


def draw_figure(rows: Sequence[FigureRow], valid: bool) -> Figure:
    """The whole figure: a title that says whether the experiment is valid (its control
    worked), the column names, then one row per cell."""
    width = LABEL_WIDTH + 3 * (WAVE_WIDTH + GAP) + PICTURE_WIDTH + GAP
    height = HEADER_HEIGHT + ROW_HEIGHT * len(rows)
    figure = Figure(figsize=(width, height), dpi=DPI, facecolor="white")

    def place(left: float, top: float, panel_width: float) -> Axes:
        """A panel ``left`` inches from the figure's left edge and ``top`` from its top."""
        bottom = height - top - PANEL_HEIGHT
        return figure.add_axes(
            (left / width, bottom / height, panel_width / width, PANEL_HEIGHT / height)
        )

    figure.text(
        GAP / width,
        1 - 0.4 / height,
        "blindhub interception experiment: "
        + ("valid" if valid else "INVALID (the control failed)"),
        fontsize=18,
        fontweight="bold",
        color="black" if valid else NOT_AS_EXPECTED,
        va="center",
    )
    columns = (
        # Two-party rows: alice's tone as sent and as bob heard it; a routed row draws a strip
        # per member instead, each titled with its name.
        ("sent (20 ms of the tone)", WAVE_WIDTH),
        ("heard by the other peer", WAVE_WIDTH),
        ("recovered by the hub", WAVE_WIDTH),
        ("video the hub decoded", PICTURE_WIDTH),
    )
    left = LABEL_WIDTH
    for name, panel_width in columns:
        figure.text(left / width, 1 - 0.85 / height, name, fontsize=12, color=QUIET, va="center")
        left += panel_width + GAP
    for index, row in enumerate(rows):
        top = HEADER_HEIGHT + index * ROW_HEIGHT
        _draw_label(place(GAP, top, LABEL_WIDTH - 2 * GAP), row)
        left = LABEL_WIDTH
        if len(row.senders) > 1:
            _draw_senders(figure, width, height, top, row)
            continue
        for samples, color, empty in (
            (row.sent, SENT, ""),
            (row.heard, HEARD, "nothing heard"),
            (row.recovered, RECOVERED, "nothing recovered"),
        ):
            _draw_wave(place(left, top, WAVE_WIDTH), samples, color, empty)
            left += WAVE_WIDTH + GAP
        _draw_picture(place(left, top, PICTURE_WIDTH), row.picture, row.picture_caption)
    return figure


def _draw_senders(figure: Figure, width: float, height: float, top: float, row: FigureRow) -> None:
    """Each column's panel as one strip per sender (stacked; side by side for the pictures)."""
    count = len(row.senders)
    strip = (PANEL_HEIGHT - STRIP_GAP * (count - 1)) / count

    def place(left: float, strip_top: float, panel_width: float, panel_height: float) -> Axes:
        bottom = height - strip_top - panel_height
        return figure.add_axes(
            (left / width, bottom / height, panel_width / width, panel_height / height)
        )

    for index, sender in enumerate(row.senders):
        strip_top = top + index * (strip + STRIP_GAP)
        left = LABEL_WIDTH
        heard_as = f"{sender.name} at {sender.listener}" if sender.listener else sender.name
        for samples, color, empty, name in (
            (sender.sent, SENT, "", sender.name),
            (sender.heard, HEARD, "nothing heard", heard_as),
            (sender.recovered, RECOVERED, "nothing recovered", sender.name),
        ):
            axes = place(left, strip_top, WAVE_WIDTH, strip)
            _draw_wave(axes, samples, color, empty, small=True)
            axes.text(
                0.01,
                0.95,
                name,
                fontsize=8,
                color=QUIET,
                va="top",
                transform=axes.transAxes,
                bbox={"facecolor": PANEL_BACKGROUND, "edgecolor": "none", "pad": 1},
            )
            left += WAVE_WIDTH + GAP
    picture_width = (PICTURE_WIDTH - STRIP_GAP * (count - 1)) / count
    left = LABEL_WIDTH + 3 * (WAVE_WIDTH + GAP)
    for index, sender in enumerate(row.senders):
        axes = place(left + index * (picture_width + STRIP_GAP), top, picture_width, PANEL_HEIGHT)
        _draw_picture(axes, sender.picture, sender.name, small=True)


def _draw_label(axes: Axes, row: FigureRow) -> None:
    """The cell's title, what was measured and the verdict, stacked down from the top."""
    axes.set_axis_off()
    color = AS_EXPECTED if row.as_expected else NOT_AS_EXPECTED
    head, _, explanation = row.verdict.partition(": ")
    measured = [
        textwrap.fill(line, LABEL_CHARACTERS, subsequent_indent="  ", break_on_hyphens=False)
        for line in row.measured
    ]
    blocks = (
        (row.title, 14, "bold", "black"),
        ("\n".join(measured), 10, "normal", "black"),
        (head, 11, "bold", color),
        (
            textwrap.fill(explanation, LABEL_CHARACTERS + 8, break_on_hyphens=False),
            9,
            "normal",
            color,
        ),
    )
    below = 0.0  # points from the top
    for text, size, weight, text_color in blocks:
        offset = ScaledTranslation(0, -below / 72, axes.figure.dpi_scale_trans)
        axes.text(
            0,
            1,
            text,
            fontsize=size,
            fontweight=weight,
            color=text_color,
            va="top",
            linespacing=LINE_SPACING,
            transform=axes.transAxes + offset,
        )
        below += (text.count("\n") + 1) * size * LINE_SPACING + size * 0.6


def _draw_wave(
    axes: Axes, samples: Sequence[int], color: str, empty: str, *, small: bool = False
) -> None:
    axes.set_facecolor(PANEL_BACKGROUND)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_ylim(-1.15, 1.15)
    axes.set_xlim(0, WINDOW_SAMPLES - 1)
    axes.axhline(0, color=QUIET, linewidth=0.5)
    values = window(samples)
    if values:
        axes.plot(values, color=color, linewidth=0.8 if small else 1.2)
    else:
        axes.text(
            0.5,
            0.4 if small else 0.7,
            empty,
            color=QUIET,
            fontsize=8 if small else 11,
            ha="center",
            transform=axes.transAxes,
        )


def _draw_picture(
    axes: Axes, picture: Image.Image | None, caption: str, *, small: bool = False
) -> None:
    axes.set_xticks([])
    axes.set_yticks([])
    if picture is not None:
        axes.imshow(picture, interpolation="antialiased")
    else:
        axes.set_facecolor(PANEL_BACKGROUND)
        axes.text(
            0.5,
            0.5,
            "no\nframe" if small else "no frame",
            color=NOT_AS_EXPECTED,
            fontsize=11 if small else 16,
            fontweight="bold",
            ha="center",
            va="center",
            transform=axes.transAxes,
        )
    axes.set_xlabel(caption, fontsize=9, color=QUIET, labelpad=3)


def write_figure(figure: Figure, directory: Path) -> list[Path]:
    """Write ``figure.png`` and ``figure.svg`` into ``directory``; return their paths."""
    paths = [directory / name for name in FILES]
    # Text stays text in the SVG (searchable, and a tenth of the size as paths); a fixed hash
    # salt and no date make the same figure the same file.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "blindhub"}):
        for path in paths:
            figure.savefig(path, dpi=DPI, metadata={"Date": None} if path.suffix == ".svg" else {})
    return paths
