"""Where a routed room lives when several routing hubs share one Redis
(``blindhub hub --route-media --redis URL``).

A routed room's media flows through the one process that holds its members' WebRTC
connections, so the room lives on one process, its *home*, as LiveKit places a room on one
node. The home is chosen in Redis, atomically, by the room's first join: one script reads the
room's home key and, if no live process holds it, writes this process there, so two processes
never both take a room, and the room goes to the process its first member reached (no
extra hop for a room whose members come through one process, as a balancer hashing the room
name sends them). The home key expires with the home's presence (3 heartbeats, refreshed at
each heartbeat for every room the process holds), so the rooms of a process that dies are free
again within that bound, and one that is merely slow to beat keeps them.

A member whose join reaches another process is served by the home all the same: that process
opens a websocket of its own to the home (its ``--advertise`` URL) for that member, sends the
join on it, and from then on passes every frame both ways unchanged (``HubServer``). To the
home it is a member like any other, so the room's messages, error codes, limits and order are
exactly one process's; its media goes to the home directly (the home's ICE candidates are in
its offer).

While Redis is unreachable, joins are refused with ``cluster-unavailable`` and every room goes
on where it is; when Redis returns (empty or not) the next heartbeat writes the homes back. A
room whose home key another process took meanwhile (this one was cut off for longer than the
presence) is closed here: its members are closed with 1012 ``room-moved`` and join again.
"""

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from websockets.frames import CloseCode

from signaling.cluster_redis import ClusterConfig, new_node_id, node_metric_lines, redis_client
from signaling.hub import Delivery
from signaling.media_server import MediaServer
from signaling.protocol import (
    CodedError,
    ErrorCode,
    ErrorMessage,
    Join,
    PeerId,
    parse_client_message,
)

CLOSE_ROOM_MOVED: Final = "room-moved"

# KEYS[1]: the room's home key. ARGV: this node, the presence in ms, the node-key prefix.
# Returns the URL of another live home, or nothing once this node is the home.
_PLACE: Final = """
local home = redis.call('GET', KEYS[1])
if home and home ~= ARGV[1] then
  local url = redis.call('GET', ARGV[3] .. home)
  if url then return url end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# KEYS[1]: this node's key. ARGV: this node, the presence in ms, its URL, the home-key prefix,
# then the rooms it holds. Refreshes its presence and each home it still holds; returns the
# rooms another node took.
_BEAT: Final = """
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
local lost = {}
for i = 5, #ARGV do
  local key = ARGV[4] .. ARGV[i]
  local home = redis.call('GET', key)
  if home and home ~= ARGV[1] then
    lost[#lost + 1] = ARGV[i]
  else
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  end
end
return lost
"""

ClosePeer = Callable[[PeerId, CloseCode, str], None]


@dataclass(frozen=True, slots=True)
class Home:
    """The URL of the process a joined room lives on, when it is not this one."""

    url: str


class RoomPlacement:
    """Places the routed rooms of ``media`` (one process's routing hub) in a cluster.

    The server calls ``screen`` for each frame before the routing core sees it, ``start`` once
    it listens (with its own URL, used when ``advertise`` is None) and ``close``."""

    def __init__(
        self,
        media: MediaServer,
        config: ClusterConfig,
        *,
        advertise: str | None = None,
        node: str | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.media = media
        self.config = config
        self.node = node or new_node_id()
        self.url = advertise
        self.available = False
        self.forwarded_total = 0
        self.forwarding = 0
        self.home_unreachable_total = 0
        self.redis_errors_total = 0
        self.rooms_lost_total = 0
        self._logger = logger or logging.getLogger("blindhub.hub")
        self._redis = redis_client(config, config.max_redis_connections)
        self._place: AsyncScript = self._redis.register_script(_PLACE)
        self._beat: AsyncScript = self._redis.register_script(_BEAT)
        # Rooms a join is being placed in: held by this process although no member is in yet.
        self._placing: Counter[str] = Counter()
        self._close_peer: ClosePeer | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None

    @property
    def _presence_ms(self) -> int:
        return round(self.config.presence_ttl * 1000)

    def _home_key(self, room: str) -> str:
        return f"{self.config.prefix}:media-home:{room}"

    def _node_key(self, node: str) -> str:
        return f"{self.config.prefix}:media-node:{node}"

    async def start(self, url: str, close_peer: ClosePeer) -> None:
        """Start beating; ``url`` is where this process listens (its URL unless advertised)."""
        self.url = self.url or url
        self._close_peer = close_peer
        await self._beat_once()
        self._heartbeat_task = asyncio.create_task(self._heartbeat())

    async def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        # Its rooms close with the process: without its presence, the next join of each takes
        # it at once rather than at the home key's expiry.
        with contextlib.suppress(RedisError):
            await self._redis.delete(self._node_key(self.node))
        await self._redis.aclose()

    async def screen(self, peer: PeerId, text: str, now: float) -> list[Delivery] | Home | None:
        """For a join: the refusal when Redis is unreachable, or the room's `Home` when it lives
        on another process; else None: hand ``text`` to the routing core (at once, with no
        await between, so that the room is held)."""
        hub = self.media.hub
        if hub.room_of(peer) is not None:
            return None
        try:
            message = parse_client_message(text)
        except CodedError:
            return None  # the routing core answers it
        if not isinstance(message, Join) or not hub.may_send(peer, now):
            return None  # the routing core answers it (a join past the rate: rate-limited)
        if not self.available:
            return hub.refuse(peer, _UNAVAILABLE, now)
        room = message.room
        self._placing[room] += 1
        try:
            home = await self._place(
                keys=[self._home_key(room)],
                args=[self.node, self._presence_ms, self._node_key("")],
            )
        except RedisError as error:
            self._redis_failed(error)
            return hub.refuse(peer, _UNAVAILABLE, now)
        finally:
            self._placing[room] -= 1
            if not self._placing[room]:
                del self._placing[room]
        if home is None:
            return None
        # Passed to the home, the join costs this connection a token, as every join does.
        return hub.charge(peer, now) or Home(home)

    def unreachable(self, peer: PeerId, home: Home, now: float) -> list[Delivery]:
        """The answer to a join whose home this process cannot reach (it died, and its
        presence has not expired yet: the next join after that is placed again)."""
        self.home_unreachable_total += 1
        self._log("home-unreachable", peer=peer, home=home.url)
        return self.media.hub.refuse(peer, _UNAVAILABLE, now)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                await self._beat_once()
            except Exception as error:  # a bug: logged, and the next heartbeat tries again
                self.available = False
                fields = {"node": self.node, "error": str(error)}
                self._logger.exception("placement-beat-failed", extra={"fields": fields})

    async def _beat_once(self) -> None:
        assert self.url is not None, "started"
        rooms = self.media.hub.rooms()
        held = [*rooms, *(room for room in self._placing if room not in rooms)]
        try:
            lost: list[str] = await self._beat(
                keys=[self._node_key(self.node)],
                args=[self.node, self._presence_ms, self.url, self._home_key(""), *held],
            )
        except RedisError as error:
            self._redis_failed(error)
            return
        if not self.available:
            self._log("redis-available")
        self.available = True
        assert self._close_peer is not None
        now_held = self.media.hub.rooms()
        for room in lost:
            # A room only being placed when the beat was sent is another's: nothing was lost.
            if room not in rooms:
                continue
            self.rooms_lost_total += 1
            self._log("room-lost", room=room)
            # Its members since this beat's snapshot are closed too: the room is not ours.
            for member in now_held.get(room, ()):
                self._close_peer(member, CloseCode.SERVICE_RESTART, CLOSE_ROOM_MOVED)

    def _redis_failed(self, error: RedisError) -> None:
        self.redis_errors_total += 1
        if self.available:
            self._log("redis-unavailable", error=str(error))
        self.available = False

    def metric_lines(self) -> list[str]:
        return [
            *node_metric_lines(self.node, self.available, self.redis_errors_total),
            "# HELP blindhub_forwarded_members Members served here for a room of another process.",
            "# TYPE blindhub_forwarded_members gauge",
            f"blindhub_forwarded_members {self.forwarding}",
            "# HELP blindhub_forwarded_members_total Joins sent to the room's home process.",
            "# TYPE blindhub_forwarded_members_total counter",
            f"blindhub_forwarded_members_total {self.forwarded_total}",
            "# HELP blindhub_home_unreachable_total Joins refused: the room's home process "
            "did not answer.",
            "# TYPE blindhub_home_unreachable_total counter",
            f"blindhub_home_unreachable_total {self.home_unreachable_total}",
            "# HELP blindhub_rooms_lost_total Rooms closed here because another process "
            "holds them.",
            "# TYPE blindhub_rooms_lost_total counter",
            f"blindhub_rooms_lost_total {self.rooms_lost_total}",
        ]

    def _log(self, event: str, **fields: object) -> None:
        self._logger.info(event, extra={"fields": {"node": self.node, **fields}})


_UNAVAILABLE: Final = ErrorMessage(
    ErrorCode.CLUSTER_UNAVAILABLE, "the hub cannot reach its shared state; retry later"
)
