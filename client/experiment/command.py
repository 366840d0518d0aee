"""``blindhub demo``: the interception experiment, fully local (client/experiment/runner.py).

Exit codes (client/exit_codes.py): 0 every cell came out as claimed; 9 the control failed, so
the experiment is invalid; 10 the control worked but some protected cell did not come out as
claimed; 2 a usage error.
"""

import argparse
import asyncio
import errno
import json
import logging
import os
import sys
from pathlib import Path

from client.cli import seconds_argument
from client.exit_codes import ExitCode
from client.experiment.routed import ROUTED_SCENARIOS
from client.experiment.runner import DEFAULT_SECONDS, SCENARIOS, run_experiment, write_outputs

MIN_SECONDS = 1.0
MAX_SECONDS = 60.0


media_seconds = seconds_argument(
    lambda seconds: MIN_SECONDS <= seconds <= MAX_SECONDS,
    f"must be a number of seconds from {MIN_SECONDS:g} to {MAX_SECONDS:g}",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--out",
        type=Path,
        help="write report.json, recovered WAV/PNG files and figure.png and figure.svg here",
    )
    parser.add_argument(
        "--seconds",
        type=media_seconds,
        default=DEFAULT_SECONDS,
        help=(
            f"media seconds per call, {MIN_SECONDS:g} to {MAX_SECONDS:g} "
            f"(default {DEFAULT_SECONDS:g})"
        ),
    )
    parser.add_argument(
        "--cells",
        type=cell_selection,
        default=cell_selection("all"),
        help=(
            "the cells to run, comma-separated: 1 to 8 (two peers), R1 to R6 (a group call "
            "through a routing hub), two-party, routed or all (default); each family's control "
            "always runs"
        ),
    )


def cell_selection(text: str) -> tuple[list[int], list[int]]:
    """``--cells``: comma-separated cell numbers (``1``..``8``, ``R1``..``R6``), ``two-party``,
    ``routed`` or ``all``; the indexes of the two-party and routed cells chosen, each family's
    control added (without it a family proves nothing)."""
    classic: set[int] = set()
    routed: set[int] = set()
    for token in (part.strip() for part in text.split(",")):
        if token in ("all", "two-party"):
            classic |= set(range(len(SCENARIOS)))
        if token in ("all", "routed"):
            routed |= set(range(len(ROUTED_SCENARIOS)))
        if token in ("all", "two-party", "routed"):
            continue
        family, limit, number = (
            (routed, len(ROUTED_SCENARIOS), token[1:])
            if token[:1] in ("R", "r")
            else (classic, len(SCENARIOS), token)
        )
        if not number.isdigit() or not 1 <= int(number) <= limit:
            raise argparse.ArgumentTypeError(
                f"{token!r} is not a cell: give 1 to {len(SCENARIOS)}, R1 to "
                f"R{len(ROUTED_SCENARIOS)}, two-party, routed or all"
            )
        family.add(int(number) - 1)
    return sorted(classic | ({0} if classic else set())), sorted(
        routed | ({0} if routed else set())
    )


def _cannot_write(directory: Path, error: OSError) -> int:
    print(
        f"blindhub demo: cannot write to --out {directory}: {error.strerror or error}",
        file=sys.stderr,
    )
    return ExitCode.LOCAL_PROBLEM


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        # Before the experiment, not a minute into it.
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            if not os.access(args.out, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable")
        except OSError as error:
            return _cannot_write(args.out, error)
    # aiortc logs each frame a peer drops; the report counts them instead.
    logging.basicConfig(level=logging.ERROR)
    classic, routed = args.cells
    report = asyncio.run(
        run_experiment(
            args.seconds,
            [SCENARIOS[index] for index in classic],
            progress=_progress,
            routed=[ROUTED_SCENARIOS[index] for index in routed],
            recordings=None if args.out is None else args.out / "hub-recordings",
        )
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.table())
    if args.out is not None:
        try:
            written = write_outputs(report, args.out)
        except OSError as error:
            return _cannot_write(args.out, error)
        for path in written:
            _progress(f"wrote {path}")
    _progress(f"experiment took {report.seconds:.1f} s")
    if not report.valid:
        return ExitCode.EXPERIMENT_INVALID
    return ExitCode.OK if report.all_as_expected else ExitCode.EXPERIMENT_UNEXPECTED
