"""``blindhub call ROOM --hub URL --name NAME``: one end-to-end encrypted call.

Exit codes: the one table, ``client.exit_codes.ExitCode`` (documented in
docs/reference/cli.md): ``OK`` the call completed; ``USAGE``; a failed call exits with its
``CallError.exit_code`` (``HUB_UNREACHABLE``, ``VERIFICATION_REFUSED``, ``IDENTITY_MISMATCH``,
``CALL_FAILED``); ``LOCAL_PROBLEM`` for a bad ``--send``/``--record`` or unreadable identity
files.

There is no option to weaken a call: every call from this command is the product assembly
(``client.call.CallParts()``), end-to-end encrypted with verified identities. Only the
interception experiment (client/experiment/) composes weaker peers, in code.
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

from client.call import Call, CallConfig, CallStats
from client.exit_codes import ExitCode
from client.identity_store import (
    home_directory,
    load_known_peers,
    open_identity,
    save_known_peers,
)
from client.media import MediaSourceError, check_recording_path, open_sources
from client.session import CallError, ProtectionState, Verify
from crypto.errors import CryptoError
from crypto.identity import MAX_PEER_NAME_LENGTH
from crypto.messages import name_field


def peer_name(value: str) -> str:
    # Checked here, as a usage error, rather than by the peer during the key agreement.
    try:
        return name_field(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 1 to {MAX_PEER_NAME_LENGTH} printable characters"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("room", help="the room to call in (both peers name the same room)")
    parser.add_argument("--hub", required=True, help="the hub's URL, ws://HOST:PORT or wss://...")
    parser.add_argument(
        "--name",
        required=True,
        type=peer_name,
        help="your name, signed in the key agreement, shown to and pinned by the peer",
    )
    parser.add_argument(
        "--send",
        default="tone:440",
        help="what to send: tone[:HZ], pattern, FILE, mic, camera; several joined by commas",
    )
    parser.add_argument("--record", help="record what is received: .wav, .mkv or .mp4")
    parser.add_argument("--duration", type=float, help="hang up after this many seconds")
    parser.add_argument(
        "--verify",
        choices=[v.value for v in Verify],
        default=Verify.PROMPT.value,
        help="prompt: confirm the SAS; tofu: pin new peers; pinned: only pinned peers",
    )
    parser.add_argument("--home", help="where your identity and pins live ($BLINDHUB_HOME)")
    parser.add_argument("--stats-json", help="write the end-of-call statistics to this file")


async def read_line(prompt: str) -> str:
    """One line from stdin, cancellable: Ctrl-C (a hangup) must end the process at once, and a
    thread blocked in ``input()`` would keep ``asyncio.run`` from returning until a line came."""
    print(prompt, end="", flush=True)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()
    received = bytearray()
    fd = sys.stdin.fileno()

    def settle(line: str) -> None:
        if not answer.done():
            answer.set_result(line)

    def on_readable() -> None:
        chunk = os.read(fd, 1024)
        received.extend(chunk)
        if not chunk or b"\n" in received:  # a whole line, or the end of input
            settle(received.split(b"\n", 1)[0].decode(errors="replace"))

    try:
        loop.add_reader(fd, on_readable)
    except (NotImplementedError, PermissionError):
        # No readiness for this stdin (a Windows loop, or a regular file, which epoll refuses):
        # a daemon thread, which never delays the process's exit.
        def read_blocking() -> None:
            loop.call_soon_threadsafe(settle, sys.stdin.readline().rstrip("\n"))

        threading.Thread(target=read_blocking, daemon=True).start()
        return await answer
    try:
        return await answer
    finally:
        loop.remove_reader(fd)


async def ask_to_confirm(state: ProtectionState) -> bool:
    print(state.describe(), flush=True)
    answer = await read_line("Does the peer read the same SAS? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def show_protection(state: ProtectionState) -> None:
    print(state.describe(), flush=True)


def print_stats(stats: CallStats) -> None:
    print(f"call ended ({stats.ended_by}) after {stats.duration_seconds:.1f} s")
    for kind in ("audio", "video"):
        s = getattr(stats, kind)
        print(
            f"  {kind}: sent {s.sent}, received {s.received}, decrypted {s.decrypted}, "
            f"failed {s.failed}, SFrame bytes added {s.sframe_bytes_added}"
        )
    if stats.round_trip_seconds is not None:
        print(f"  round-trip time {stats.round_trip_seconds * 1000:.1f} ms")
    if stats.hub_lost:
        print("  the hub went away during the call")


async def run_call(call: Call) -> CallStats:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
        loop.add_signal_handler(signal.SIGINT, call.hangup, "ctrl-c")
    return await call.run()


def run(args: argparse.Namespace) -> int:
    home = home_directory(args.home)
    try:
        identity = open_identity(home)
        known_peers = load_known_peers(home)
        tracks = open_sources(args.send)
        if args.record:
            check_recording_path(args.record)
    except (MediaSourceError, CryptoError, OSError) as error:
        print(f"blindhub call: {error}", file=sys.stderr)
        return ExitCode.LOCAL_PROBLEM
    verify = Verify(args.verify)
    call = Call(
        CallConfig(
            room=args.room,
            hub_url=args.hub,
            name=args.name,
            identity=identity,
            known_peers=known_peers,
            tracks=tracks,
            verify=verify,
            confirm_sas=ask_to_confirm,
            record_path=args.record,
            duration=args.duration,
            on_protection=None if verify is Verify.PROMPT else show_protection,
        )
    )
    try:
        stats = asyncio.run(run_call(call))
    except CallError as error:
        print(f"blindhub call: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        save_known_peers(home, known_peers)
    print_stats(stats)
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats.as_dict(), indent=2) + "\n")
    return ExitCode.OK
