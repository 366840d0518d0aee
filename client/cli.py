"""The ``blindhub`` command line.

Each subcommand lives in the module that owns it and is imported only when it
runs, so ``blindhub sframe`` starts without loading aiortc. A command module
exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).
"""

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from client.exit_codes import ExitCode

TRACEBACK_VARIABLE = "BLINDHUB_TRACEBACK"

# name -> (module, one-line help). Named, not imported: `demo` is the experiment package's,
# which no product module imports (the import contracts in pyproject.toml).
COMMANDS: dict[str, tuple[str, str]] = {
    "call": ("client.call_command", "call a peer; every media frame end-to-end encrypted"),
    "id": ("client.id_command", "show your identity fingerprint (created on first use)"),
    "contacts": ("client.contacts_command", "list, verify or forget the peers you pinned"),
    "demo": (
        "client.experiment.command",
        "the interception experiment: a hostile hub vs real calls",
    ),
    "hub": ("client.hub_command", "run the signalling hub (a websocket relay of opaque payloads)"),
    "sframe": ("client.sframe_command", "SFrame (RFC 9605) by hand: inspect, protect, unprotect"),
    "web": ("client.web_command", "serve the browser client from this install on 127.0.0.1"),
}


def seconds_argument(is_valid: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type for a number of seconds: anything else, NaN included, is a usage error
    (exit 2) that states ``rule``, before the command does anything."""

    def parse(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if math.isnan(seconds) or not is_valid(seconds):
            raise argparse.ArgumentTypeError(rule)
        return seconds

    return parse


class CommandModule(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blindhub",
        description="End-to-end encrypted calls through a hub that cannot intercept them.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported; the others just list their help.
        if name == wanted:
            module: CommandModule = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(arguments).parse_args(arguments)
    try:
        exit_code: int = args.run(args)
    except KeyboardInterrupt:
        # Ctrl-C where a command set no handler of its own (the call hangs up on its own).
        return ExitCode.INTERRUPTED
    except Exception as error:
        # The last resort: every failure a command expects has its own line and code, so this
        # is a bug. One line and a code still, never a traceback, unless asked for one.
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(
            f"blindhub {args.command}: internal error: {type(error).__name__}: {error} "
            f"(set {TRACEBACK_VARIABLE}=1 for the traceback)",
            file=sys.stderr,
        )
        return ExitCode.INTERNAL_ERROR
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
