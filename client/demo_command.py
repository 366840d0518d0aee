"""``blindhub demo``: the interception experiment, fully local (client/experiment.py).

Exit codes: 0 every cell came out as claimed; 1 the control failed, so the experiment is
invalid; 2 the control worked but some protected cell did not come out as claimed.
"""

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from client.experiment import DEFAULT_SECONDS, run_experiment, write_outputs

EXIT_INVALID = 1
EXIT_UNEXPECTED = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--out", type=Path, help="write report.json, recovered WAV/PNG files and figure.png here"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"media seconds per call (default {DEFAULT_SECONDS:g})",
    )


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.seconds <= 60:
        _progress("--seconds must be between 1 and 60")
        return EXIT_UNEXPECTED
    # aiortc logs each frame a peer drops; the report counts them instead.
    logging.basicConfig(level=logging.ERROR)
    report = asyncio.run(run_experiment(args.seconds, progress=_progress))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.table())
    if args.out is not None:
        for path in write_outputs(report, args.out):
            _progress(f"wrote {path}")
    _progress(f"experiment took {report.seconds:.1f} s")
    if not report.valid:
        return EXIT_INVALID
    return 0 if report.all_as_expected else EXIT_UNEXPECTED
