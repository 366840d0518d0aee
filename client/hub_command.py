"""``blindhub hub``: run the signalling hub (signaling/) until SIGINT or SIGTERM.

The command line lives with the other commands; the hub it runs imports nothing of the client."""

import argparse
import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import ssl
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from client.exit_codes import ExitCode
from signaling.hub import Hub, Limits
from signaling.media_routing import (
    ROUTED_MAX_PEERS_PER_ROOM,
    RTX_BURST,
    RTX_RATE,
    RetransmitBudget,
)
from signaling.server import HubServer, JsonLinesFormatter, MetadataRecorder, new_event_loop

if TYPE_CHECKING:
    from signaling.cluster_redis import ClusterLink
    from signaling.media_placement import RoomPlacement
    from signaling.media_server import MediaServer

_LIMIT_HELP = {
    "max_message_bytes": "largest frame accepted; larger closes with 1009",
    "max_peers_per_room": "peers per room; one more gets room-full",
    "max_rooms": "rooms at once; a new room beyond gets too-many-rooms",
    "max_connections": "connections at once; one more is closed with 1013",
    "rate_per_second": "messages per second per connection (token bucket refill)",
    "rate_burst": "messages a connection may send at once (token bucket size)",
    "max_buffered_bytes": "unsent bytes to one client before it is closed with 1008",
    "ping_interval": "seconds between websocket pings",
    "ping_timeout": "seconds to wait for a pong before closing with 1011",
    "close_timeout": "seconds a closing handshake may take before the TCP connection is cut",
    "join_timeout": "seconds a connection may stay in no room before it is closed with 1008",
    "batch_window": "seconds a busy hub gathers messages before it polls again; 0: never",
}


def port_number(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError("must be a port number, 0 to 65535")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=port_number, default=8765, help="port, 1 to 65535 (0 picks a free one)"
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve wss")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--record-metadata",
        metavar="FILE",
        help="append one JSON line per routed message (metadata and payload as it passed)",
    )
    parser.add_argument("--quiet", action="store_true", help="no connection log on stderr")
    parser.add_argument(
        "--route-media",
        action="store_true",
        help="terminate each peer's WebRTC connection and forward its encoded media to the "
        "others of its room, never decoding it (default: media flows peer to peer)",
    )
    parser.add_argument(
        "--record-media",
        metavar="DIR",
        help="with --route-media: write every forwarded stream to DIR (one Matroska file and "
        "one JSON-lines sidecar per stream)",
    )
    parser.add_argument(
        "--retransmit-rate",
        type=float,
        metavar="PACKETS",
        help="with --route-media: packets per second the hub resends to one member for its "
        f"NACKs, after a burst of --retransmit-burst (default {RTX_RATE})",
    )
    parser.add_argument(
        "--retransmit-burst",
        type=int,
        metavar="PACKETS",
        help=f"with --route-media: packets the hub resends to one member at once (default "
        f"{RTX_BURST})",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="share rooms with every hub process using this Redis or Valkey "
        "(redis://[:password@]host:port/db, rediss:// for TLS); default: this process alone",
    )
    parser.add_argument(
        "--redis-prefix", default="blindhub", help="key prefix of this cluster in Redis"
    )
    parser.add_argument(
        "--advertise",
        metavar="URL",
        help="with --route-media and --redis: the URL at which clients reach this process "
        "itself (not the load balancer), sent to a join that reaches another process "
        "(default: the URL it listens on)",
    )
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=1.0,
        help="seconds between cluster heartbeats; a killed process is noticed within "
        "5 heartbeats, a stall shorter than 3 is not taken for death (default 1.0)",
    )
    defaults = Limits()
    for limit in fields(Limits):
        default = getattr(defaults, limit.name)
        help_default = f"default {default}"
        if limit.name == "max_peers_per_room":
            help_default += f", {ROUTED_MAX_PEERS_PER_ROOM} with --route-media"
        parser.add_argument(
            "--" + limit.name.replace("_", "-"),
            type=type(default),
            # Left unset so that --route-media can choose its own default.
            default=None if limit.name == "max_peers_per_room" else default,
            help=f"{_LIMIT_HELP[limit.name]} ({help_default})",
        )


def run(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        print("blindhub hub: --tls-cert and --tls-key go together", file=sys.stderr)
        return ExitCode.USAGE
    if args.record_media is not None and not args.route_media:
        print("blindhub hub: --record-media needs --route-media", file=sys.stderr)
        return ExitCode.USAGE
    retransmits = (args.retransmit_rate, args.retransmit_burst)
    if retransmits != (None, None) and not args.route_media:
        print("blindhub hub: --retransmit-rate and -burst need --route-media", file=sys.stderr)
        return ExitCode.USAGE
    try:
        budget = RetransmitBudget(
            RTX_RATE if args.retransmit_rate is None else args.retransmit_rate,
            RTX_BURST if args.retransmit_burst is None else args.retransmit_burst,
        )
    except ValueError as error:
        print(f"blindhub hub: {error}", file=sys.stderr)
        return ExitCode.USAGE
    if args.advertise is not None and not (args.route_media and args.redis is not None):
        print("blindhub hub: --advertise needs --route-media and --redis", file=sys.stderr)
        return ExitCode.USAGE
    if args.max_peers_per_room is None:
        routed = ROUTED_MAX_PEERS_PER_ROOM if args.route_media else Limits().max_peers_per_room
        args.max_peers_per_room = routed
    try:
        limits = Limits(**{limit.name: getattr(args, limit.name) for limit in fields(Limits)})
    except ValueError as error:
        print(f"blindhub hub: {error}", file=sys.stderr)
        return ExitCode.USAGE
    # Files, then the port: each a one-line error (exit 7) before anything is served.
    try:
        ssl_context = _tls_context(args.tls_cert, args.tls_key)
    except ssl.SSLError:
        return _local_problem(
            f"--tls-cert {args.tls_cert} and --tls-key {args.tls_key} are not a PEM "
            "certificate chain and its private key"
        )
    except OSError as error:
        return _local_problem(f"cannot read --tls-cert or --tls-key: {_reason(error)}")
    with contextlib.ExitStack() as stack:
        metadata = None
        node = None  # a cluster's or placement's node id, on every log line
        if args.record_metadata is not None:
            try:
                sink = stack.enter_context(open(args.record_metadata, "a", buffering=1))
            except OSError as error:
                return _local_problem(
                    f"cannot append to --record-metadata {args.record_metadata}: {_reason(error)}"
                )
            metadata = MetadataRecorder(sink)
        # Where and how it listens, whatever its routing core.
        serve = functools.partial(
            HubServer, host=args.host, port=args.port, ssl_context=ssl_context, metadata=metadata
        )
        if args.route_media:
            try:
                media = media_server(limits, args.record_media, budget)
            except (OSError, ValueError) as error:
                return _local_problem(f"--record-media {args.record_media}: {_reason(error)}")
            placement = None
            if args.redis is not None:
                try:
                    placement = _placement(args, media)
                except ValueError as error:
                    print(f"blindhub hub: --redis: {error}", file=sys.stderr)
                    return ExitCode.USAGE
                node = placement.node
            server = serve(media=media, placement=placement)
        elif args.redis is None:
            server = serve(Hub(limits))
        else:
            try:
                cluster = _cluster(args, limits)
            except ValueError as error:
                print(f"blindhub hub: --redis: {error}", file=sys.stderr)
                return ExitCode.USAGE
            node = cluster.node
            server = serve(cluster=cluster)
        # Only a hub that serves logs, and only while it serves: an error above leaves the
        # process's logging as it found it (the command also runs inside the tests' process).
        stack.enter_context(_logging_to_stderr(quiet=args.quiet, node=node))
        try:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                runner.run(_serve_until_signalled(server))
        except OSError as error:  # only listening raises it: connections fail on their own
            return _local_problem(f"cannot listen on {args.host}:{args.port}: {_reason(error)}")
    return ExitCode.OK


def _cluster(args: argparse.Namespace, limits: Limits) -> "ClusterLink":
    # The Redis client is loaded only by a hub that joins a cluster.
    from signaling.cluster import ClusterCore
    from signaling.cluster_redis import ClusterConfig, ClusterLink, new_node_id

    config = ClusterConfig(args.redis, prefix=args.redis_prefix, heartbeat_interval=args.heartbeat)
    return ClusterLink(ClusterCore(new_node_id(), limits), config)


def _placement(args: argparse.Namespace, media: "MediaServer") -> "RoomPlacement":
    from signaling.cluster_redis import ClusterConfig
    from signaling.media_placement import RoomPlacement

    config = ClusterConfig(args.redis, prefix=args.redis_prefix, heartbeat_interval=args.heartbeat)
    return RoomPlacement(media, config, advertise=args.advertise)


def media_server(
    limits: Limits, record_media: str | None, budget: RetransmitBudget
) -> "MediaServer":
    """The media side of ``blindhub hub --route-media``: its recorder (``--record-media``)
    and each member's retransmission budget; OSError if the directory cannot be written."""
    # aiortc and PyAV are loaded only by a hub that routes media.
    from signaling.media_server import MediaServer
    from signaling.recording import MediaRecorder

    recorder = None
    if record_media is not None:
        directory = Path(record_media)
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable")
        recorder = MediaRecorder(directory)
    return MediaServer(limits, recorder=recorder, retransmit_budget=budget)


def _tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def _reason(error: Exception) -> str:
    # An OSError's str() starts with "[Errno N]"; the file name is already in our message.
    return getattr(error, "strerror", None) or str(error)


def _local_problem(message: str) -> int:
    print(f"blindhub hub: {message}", file=sys.stderr)
    return ExitCode.LOCAL_PROBLEM


async def _serve_until_signalled(server: HubServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)
    async with server:
        print(f"listening on {server.url}", flush=True)
        await stop.wait()


@contextlib.contextmanager
def _logging_to_stderr(*, quiet: bool, node: str | None) -> Iterator[None]:
    """The hub's log as JSON lines on stderr (with the node id in a cluster), while serving."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLinesFormatter(None if node is None else {"node": node}))
    hub_logger = logging.getLogger("blindhub.hub")
    level = hub_logger.level
    hub_logger.addHandler(handler)
    hub_logger.setLevel(logging.WARNING if quiet else logging.INFO)
    # websockets' own lines (handshake failures, "server listening") are not structured.
    websockets_logger = logging.getLogger("blindhub.hub.websockets")
    websockets_level = websockets_logger.level
    websockets_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        hub_logger.removeHandler(handler)
        hub_logger.setLevel(level)
        websockets_logger.setLevel(websockets_level)
