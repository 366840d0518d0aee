"""``blindhub call ROOM --hub URL --name NAME``: one end-to-end encrypted call.

Exit codes: client/exit_codes.py, documented in docs/reference/cli.md. A failed call exits
with its ``CallError.exit_code`` (3 to 6, 11 and 12); 2 and 7 are this command's own checks,
refused before anything connects (7 also when ``--stats-json`` cannot be written after it).

There is no option to weaken a call: every call from this command is the product assembly
(``client.call.CallParts()``), end-to-end encrypted with verified identities. Only the
interception experiment (client/experiment/) composes weaker peers, in code.
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import ssl
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

from client.call import Call, CallConfig, CallPhase, CallStats, join_hub
from client.cli import seconds_argument
from client.exit_codes import ExitCode
from client.group_call import GroupCall, GroupCallbacks, GroupStats
from client.group_session import RosterEntry
from client.identity_store import (
    home_directory,
    load_known_peers,
    open_identity,
    save_known_peers,
)
from client.media import MediaSourceError, check_recording_path, open_sources
from client.session import (
    DEFAULT_REKEY_INTERVAL,
    STATUS_MEANING,
    CallError,
    ProtectionState,
    Verify,
)
from crypto.errors import CryptoError
from crypto.identity import KnownPeers
from crypto.names import InvalidName, normalize_name
from signaling.protocol import NAME_PATTERN, MediaMode


def own_name(value: str) -> str:
    """``--name``: signed exactly as typed, so it must already be normal (crypto/names.py);
    checked here, as a usage error, rather than by the peer during the key agreement."""
    normal = peer_name(value)
    if normal != value:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not in the normal form names are signed in (Unicode NFKC, single "
            f"spaces, none at either end): use {normal!r}"
        )
    return value


MIN_REKEY_INTERVAL = 1.0
MAX_REKEY_INTERVAL = 24 * 3600.0


def peer_name(value: str) -> str:
    """``--peer``: compared with the name the peer signs, which is normal, so normalised."""
    try:
        return normalize_name(value)
    except InvalidName as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# Rekeys cannot be switched off from the command line: they are what heals a stolen key.
rekey_interval = seconds_argument(
    lambda seconds: MIN_REKEY_INTERVAL <= seconds <= MAX_REKEY_INTERVAL,
    f"must be {MIN_REKEY_INTERVAL:g} to {MAX_REKEY_INTERVAL:g} seconds",
)


# -- checked before anything connects: a bad value is a usage error (exit 2), and the hub
# never hears of it


def room_name(value: str) -> str:
    # The hub's own rule (signaling.protocol), so that a room it would refuse is never sent.
    if NAME_PATTERN.fullmatch(value) is None:
        raise argparse.ArgumentTypeError("must be 1 to 64 of A-Z a-z 0-9 - _")
    return value


def hub_url(value: str) -> str:
    try:
        parse_uri(value)
    except InvalidURI:
        raise argparse.ArgumentTypeError("must be ws://HOST:PORT or wss://HOST:PORT") from None
    return value


call_seconds = seconds_argument(
    lambda seconds: 0 < seconds < math.inf, "must be a positive number of seconds"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "room",
        type=room_name,
        help="the room to call in (both peers name the same room): 1 to 64 of A-Z a-z 0-9 - _",
    )
    parser.add_argument(
        "--hub",
        required=True,
        type=hub_url,
        help="the hub's URL, ws://HOST:PORT or wss://HOST:PORT",
    )
    parser.add_argument(
        "--hub-ca",
        metavar="FILE",
        help="for a wss:// hub: trust only the certificates in this PEM file (a private CA, or "
        "the hub's own self-signed certificate) instead of the system's trust store",
    )
    parser.add_argument(
        "--name",
        required=True,
        type=own_name,
        help="your name, signed in the key agreement, shown to and pinned by the peer",
    )
    parser.add_argument(
        "--peer",
        type=peer_name,
        help="whom you are calling: a peer that signs another name (exit 11), or this name "
        "with another key than the one pinned for it (exit 5), is refused before any media key "
        "exists",
    )
    parser.add_argument(
        "--send",
        default="tone:440",
        help="what to send: tone[:HZ], pattern, FILE, mic, camera; several joined by commas",
    )
    parser.add_argument("--record", help="record what is received: .wav, .mkv or .mp4")
    parser.add_argument(
        "--duration", type=call_seconds, help="hang up after this many seconds of media"
    )
    parser.add_argument(
        "--verify",
        choices=[v.value for v in Verify],
        default=Verify.PROMPT.value,
        help="prompt: confirm the SAS; tofu: pin new peers; pinned: only pinned peers",
    )
    parser.add_argument("--home", help="where your identity and pins live ($BLINDHUB_HOME)")
    parser.add_argument("--stats-json", help="write the end-of-call statistics to this file")
    parser.add_argument(
        "--rekey-interval",
        type=rekey_interval,
        default=DEFAULT_REKEY_INTERVAL,
        metavar="SECONDS",
        help=(
            "a new epoch of keys this often: forward secrecy and healing after a key is "
            f"stolen (default {DEFAULT_REKEY_INTERVAL:g}; at least {MIN_REKEY_INTERVAL:g})"
        ),
    )


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


def save_pins(home: Path, known_peers: KnownPeers, loaded: KnownPeers) -> None:
    """This call's pin changes onto the pin file as it is now (other calls and ``contacts``
    may have changed it meanwhile); what could not be kept is said, not hidden."""
    try:
        dropped = save_known_peers(home, known_peers, loaded=loaded)
    except (CryptoError, OSError) as error:
        print(f"blindhub call: this call's pins were not saved: {error}", file=sys.stderr)
        return
    for pin in dropped:
        print(
            f"blindhub call: {pin.name!r} was pinned to another key by another command during "
            f"this call; that pin stands and this call's ({pin.public_key.fingerprint()}) was "
            "not kept",
            file=sys.stderr,
        )


def print_stats(stats: CallStats) -> None:
    print(f"call ended ({stats.ended_by}) after {stats.duration_seconds:.1f} s")
    for kind in ("audio", "video"):
        s = getattr(stats, kind)
        print(
            f"  {kind}: sent {s.sent}, received {s.received}, decrypted {s.decrypted}, "
            f"failed {s.failed}, SFrame bytes added {s.sframe_bytes_added}"
        )
    print(f"  rekeys completed: {stats.rekeys}")
    if stats.round_trip_seconds is not None:
        print(f"  round-trip time {stats.round_trip_seconds * 1000:.1f} ms")
    if stats.hub_lost:
        print("  the hub went away during the call")


class HubCaUnusable(Exception):
    """``--hub-ca`` names no readable PEM certificate."""


def hub_ssl_context(ca_file: str | None) -> ssl.SSLContext | None:
    """What verifies a wss:// hub: only the certificates in ``ca_file``, or (None) the system's
    trust store. Hostname checking stays on either way."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        reason = getattr(error, "strerror", None) or str(error)
        message = f"--hub-ca {ca_file}: not a readable PEM certificate: {reason}"
        raise HubCaUnusable(message) from None


def phase_printer(args: argparse.Namespace) -> Callable[[CallPhase], None]:
    """One line per phase on stdout, so a call waiting for its peer does not look hung."""
    lines = {
        CallPhase.CONNECTING: f"connecting to the hub at {args.hub}",
        CallPhase.WAITING: f"waiting for a peer in room {args.room}",
        CallPhase.KEY_AGREEMENT: "a peer joined: agreeing keys",
        CallPhase.MEDIA: "media flowing, end-to-end encrypted (Ctrl-C hangs up)",
        # Said at once: a hub that closes its connections stops the rekeys, and with them
        # forward secrecy and healing for the rest of the call.
        CallPhase.HUB_LOST: (
            "the hub went away: media goes on end-to-end encrypted, but without rekeys from now on"
        ),
    }

    def show(phase: CallPhase) -> None:
        print(lines[phase], flush=True)

    return show


def show_member_joined(peer: str, state: ProtectionState) -> None:
    print(f"joined: {state.describe()}", flush=True)


def show_member_left(peer: str, name: str | None, reason: str) -> None:
    print(f"left: {name or 'a member not yet authenticated'} ({reason})", flush=True)


def show_member_failed(peer: str, error: CallError) -> None:
    print(f"not admitted: a peer got no key: {error}", flush=True)


def show_roster(roster: tuple[RosterEntry, ...]) -> None:
    """The members we share keys with: the hub decides who is in the room, not who gets keys."""
    print(f"roster: {len(roster)} other member(s) hold our key", flush=True)
    for member in roster:
        meaning = STATUS_MEANING.get(member.status.value, "")
        print(f"  {member.status.value} {member.name} {member.fingerprint} ({meaning})", flush=True)


def show_security_code(code: str) -> None:
    print(
        f"group security code: {code} (the same on every member's screen exactly when all see "
        "the same members and keys: compare it aloud)",
        flush=True,
    )


GROUP_CALLBACKS = GroupCallbacks(
    on_member_joined=show_member_joined,
    on_member_left=show_member_left,
    on_member_failed=show_member_failed,
    on_roster=show_roster,
    on_security_code=show_security_code,
)


async def run_call(config: CallConfig) -> CallStats | GroupStats:
    """Join the room, then call as the hub allows: peer to peer with the one other peer, or a
    group call whose media the hub routes."""
    joined = await join_hub(config, config.on_phase or (lambda _phase: None))
    call: Call | GroupCall
    if joined.welcome.media is MediaMode.ROUTED:
        call = GroupCall(config, GROUP_CALLBACKS, joined=joined)
    else:
        call = Call(config, joined=joined)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
        loop.add_signal_handler(signal.SIGINT, call.hangup, "ctrl-c")
    return await call.run()


def print_group_stats(stats: GroupStats) -> None:
    print(f"call ended ({stats.ended_by}) after {stats.duration_seconds:.1f} s")
    for kind, counters in stats.sent.items():
        print(f"  sent {kind}: {counters.get('frames', 0)} frames")
    for member in stats.members.values():
        who = member.name or member.peer_id
        for kind in ("audio", "video"):
            c = getattr(member, kind)
            print(
                f"  from {who} {kind}: decrypted {c.get('frames', 0)}, held for a key "
                f"{c.get('held', 0)}, failed {c.get('failed', 0)}"
            )


def run(args: argparse.Namespace) -> int:
    if args.hub_ca is not None and not args.hub.lower().startswith("wss:"):
        print("blindhub call: --hub-ca is for a wss:// hub", file=sys.stderr)
        return ExitCode.USAGE
    try:
        hub_ssl = hub_ssl_context(args.hub_ca)
    except HubCaUnusable as error:
        print(f"blindhub call: {error}", file=sys.stderr)
        return ExitCode.LOCAL_PROBLEM
    home = home_directory(args.home)
    try:
        identity = open_identity(home)
        known_peers = load_known_peers(home)
        loaded = known_peers.copy()
        tracks = open_sources(args.send)
        if args.record:
            check_recording_path(args.record)
    except (MediaSourceError, CryptoError, OSError) as error:
        print(f"blindhub call: {error}", file=sys.stderr)
        return ExitCode.LOCAL_PROBLEM
    verify = Verify(args.verify)
    config = CallConfig(
        room=args.room,
        hub_url=args.hub,
        name=args.name,
        identity=identity,
        known_peers=known_peers,
        tracks=tracks,
        verify=verify,
        peer=args.peer,
        confirm_sas=ask_to_confirm,
        record_path=args.record,
        duration=args.duration,
        rekey_interval=args.rekey_interval,
        # Shown in every mode, once the peer is accepted and before media: in prompt mode
        # too, so a verified contact other than the one meant does not go unnoticed.
        on_protection=show_protection,
        hub_ssl_context=hub_ssl,
        on_phase=phase_printer(args),
    )
    try:
        stats = asyncio.run(run_call(config))
    except CallError as error:
        print(f"blindhub call: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        save_pins(home, known_peers, loaded)
    if isinstance(stats, GroupStats):
        print_group_stats(stats)
    else:
        print_stats(stats)
    if args.stats_json:
        try:
            Path(args.stats_json).write_text(json.dumps(stats.as_dict(), indent=2) + "\n")
        except OSError as error:
            print(f"blindhub call: cannot write --stats-json: {error}", file=sys.stderr)
            return ExitCode.LOCAL_PROBLEM
    return ExitCode.OK
