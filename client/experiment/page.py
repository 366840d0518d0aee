"""The experiment's report as one page a presenter opens in any browser: ``index.html``.

It shows the table, the figure, and for every cell an audio player for what each peer heard and
for what the hub recovered, and the pictures the hub decoded. Self-contained: the styles are
inline, and every image and sound is a file next to it (written by
``client.experiment.runner.write_outputs``), referenced by its bare name, so the directory can be
copied anywhere and opened offline. Nothing is fetched from the network.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

NAME = "index.html"
STYLE = """
body { font-family: sans-serif; margin: 1em auto; max-width: 1160px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.ok { color: #1e8c3c; } .bad { color: #c81e1e; font-weight: bold; }
.figure { max-width: 100%; border: 1px solid #ccc; }
.media { display: flex; flex-wrap: wrap; gap: 1em; }
.media figure { margin: 0; } .media figcaption { font-size: 0.85em; color: #555; }
.media img { width: 240px; image-rendering: pixelated; border: 1px solid #ccc; }
.none { color: #777; font-style: italic; }
"""


@dataclass(frozen=True)
class Media:
    """One file of a cell in the output directory, with what it is."""

    caption: str
    file: str  # a bare file name in the page's directory


@dataclass
class CellSection:
    """One cell of the page: its verdict, its sounds and its pictures."""

    number: str
    title: str
    verdict: str
    as_expected: bool
    audio: list[Media] = field(default_factory=list)
    pictures: list[Media] = field(default_factory=list)
    no_picture: str = "the hub decoded no picture"


def render(
    valid: bool,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    sections: Sequence[CellSection],
    figure: str,
) -> str:
    """The page: title, the table (``header`` and one row per cell), the figure, the cells."""
    e = html.escape
    status = "valid" if valid else "INVALID (a control failed: nothing here proves protection)"
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>blindhub interception experiment</title>",
        f"<style>{STYLE}</style></head><body>",
        f'<h1>blindhub interception experiment: <span class="{"ok" if valid else "bad"}">'
        f"{e(status)}</span></h1>",
        "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead>",
        "<tbody>",
        *("<tr>" + "".join(f"<td>{e(value)}</td>" for value in row) + "</tr>" for row in rows),
        "</tbody></table>",
        f'<h2>The figure</h2><img class="figure" src="{e(figure)}" alt="the experiment\'s figure">',
    ]
    for section in sections:
        mark = "ok" if section.as_expected else "bad"
        lines += [
            f'<h2 id="{e(section.number)}">{e(section.number)}. {e(section.title)}</h2>',
            f'<p class="{mark}">{e(section.verdict)}</p>',
            '<div class="media">',
            *(
                f"<figure><figcaption>{e(m.caption)}</figcaption>"
                f'<audio controls preload="none" src="{e(m.file)}"></audio></figure>'
                for m in section.audio
            ),
            "</div>",
            '<div class="media">',
            *(
                f'<figure><img src="{e(m.file)}" alt="{e(m.caption)}">'
                f"<figcaption>{e(m.caption)}</figcaption></figure>"
                for m in section.pictures
            ),
            "</div>" if section.pictures else f'<p class="none">{e(section.no_picture)}</p></div>',
        ]
    lines.append("</body></html>")
    return "\n".join(lines) + "\n"


def write_page(directory: Path, page: str) -> Path:
    path = directory / NAME
    path.write_text(page, encoding="utf-8")
    return path
