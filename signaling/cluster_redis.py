"""The cluster's edge: executes `signaling.cluster` operations against Redis (or Valkey).

What lives in Redis, under a key prefix (``blindhub`` by default):

- ``{p}:room:{room}`` (sorted set, members by join order) and ``{p}:where:{room}`` (peer ->
  node): the members of each room, cluster-wide; ``{p}:rooms``: the rooms, for ``max_rooms``;
- ``{p}:node-peers:{node}``: the peers of a node (peer -> room), so that a dead node's peers
  can be removed; ``{p}:beats`` (sorted set): each node's last heartbeat, by Redis's own
  clock. A node silent for longer than `ClusterConfig.reap_after` is reaped by the first other
  node that notices: its peers leave their rooms, their rooms hear ``peer-left``, and
  ``{p}:reaped:{node}`` tells the node, should it be alive after all, that it was;
- ``{p}:inbox:{peer}``: a stream per recipient, for every event that crosses processes
  (relay, peer-joined, peer-left), bounded by MAXLEN; each entry carries its sender and the
  sender's sequence number, so a write retried after a lost reply is delivered once;
- ``{p}:hint:{node}``: a pub/sub channel naming a recipient with new entries. Pub/sub is
  at-most-once, so a hint only saves time: every heartbeat also reads every local stream.

Every decision that needs the cluster's state (room size, room limit, membership) is one Lua
script, so it is atomic: two processes cannot both admit the last seat of a room.
"""

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as redis
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from redis.retry import Retry
from websockets.frames import CloseCode

from signaling.cluster import (
    FINAL_SEQ,
    ClusterCore,
    JoinOp,
    LeaveOp,
    RelayOp,
    parse_event,
)
from signaling.hub import Delivery
from signaling.protocol import CLOSE_SLOW_READER, ErrorCode, PeerId

OVERFLOW: Final = "o"
CLOSE_NODE_REAPED: Final = "node-reaped"
"""The close reason (with 1012) of the peers of a process that the others took for dead."""
"""The kind of the stream entry written in place of one that would pass the stream's bound."""

_READ_BATCH: Final = 256
# What one read of the streams may bring into memory at most: entries times the largest
# payload. Without it, a process behind on many streams (each up to its bound) would read
# 512 streams of 256 entries of 64 KiB, 8 GiB, in one reply.
_READ_BYTES: Final = 64 * 1024 * 1024
_MAX_STREAM: Final = 65536
_MAX_BATCH: Final = 1024
_MAX_QUEUED: Final = 8192
_STREAMS_PER_READ: Final = 512

_PRELUDE: Final = """
local p = ARGV[1]
local maxlen = ARGV[2]
local inbox_ttl = ARGV[3]
local function notify(recipient, rnode, kind, sender, room, seq, payload)
  local key = p .. ':inbox:' .. recipient
  local unread = redis.call('XLEN', key)
  if unread >= tonumber(maxlen) then
    -- Its process is that far behind: one overflow mark, read as "close it" (slow-reader).
    if unread == tonumber(maxlen) then
      redis.call('XADD', key, '*', 'k', 'o', 'f', sender, 'r', room, 's', seq)
    end
  elseif payload then
    redis.call('XADD', key, '*', 'k', kind, 'f', sender, 'r', room, 's', seq, 'd', payload)
  else
    redis.call('XADD', key, '*', 'k', kind, 'f', sender, 'r', room, 's', seq)
  end
  redis.call('PEXPIRE', key, inbox_ttl)
  redis.call('PUBLISH', p .. ':hint:' .. rnode, recipient)
end
local function leave(room, peer, node, seq)
  local wk = p .. ':where:' .. room
  if redis.call('HDEL', wk, peer) == 0 then return 0 end
  redis.call('ZREM', p .. ':room:' .. room, peer)
  redis.call('HDEL', p .. ':node-peers:' .. node, peer)
  redis.call('DEL', p .. ':inbox:' .. peer)
  local rest = redis.call('HGETALL', wk)
  if #rest == 0 then
    redis.call('DEL', p .. ':room:' .. room)
    redis.call('SREM', p .. ':rooms', room)
  end
  for i = 1, #rest, 2 do
    if rest[i + 1] ~= node then notify(rest[i], rest[i + 1], 'l', peer, room, seq, nil) end
  end
  return 1
end
"""

# ARGV[4..]: room, peer, node, max peers, max rooms, seq, restore ("1": re-add a member the
# store lost, whatever the limits; nothing if it is there).
_JOIN: Final = (
    _PRELUDE
    + """
local room, peer, node, seq = ARGV[4], ARGV[5], ARGV[6], ARGV[9]
local restore = ARGV[10] == '1'
local rk, wk = p .. ':room:' .. room, p .. ':where:' .. room
-- A node the others reaped (or that Redis lost) admits no one before its heartbeat learns it:
-- its peer would be a member whose node no reaper will ever look at again.
if not redis.call('ZSCORE', p .. ':beats', node) then return {'cluster-unavailable'} end
if restore and redis.call('HEXISTS', wk, peer) == 1 then return {'present'} end
local n = redis.call('ZCARD', rk)
if n == 0 then
  if not restore and redis.call('SCARD', p .. ':rooms') >= tonumber(ARGV[8]) then
    return {'too-many-rooms'}
  end
  redis.call('SADD', p .. ':rooms', room)
elseif not restore and n >= tonumber(ARGV[7]) then
  return {'room-full'}
end
local reply = {'ok'}
for _, other in ipairs(redis.call('ZRANGE', rk, 0, -1)) do
  local onode = redis.call('HGET', wk, other)
  reply[#reply + 1] = other
  reply[#reply + 1] = onode
  if onode ~= node then notify(other, onode, 'j', peer, room, seq, nil) end
end
redis.call('ZADD', rk, redis.call('INCR', p .. ':order'), peer)
redis.call('HSET', wk, peer, node)
redis.call('HSET', p .. ':node-peers:' .. node, peer, room)
return reply
"""
)

# ARGV[4..]: room, sender, recipient, seq, payload.
_RELAY: Final = (
    _PRELUDE
    + """
local wk = p .. ':where:' .. ARGV[4]
local rnode = redis.call('HGET', wk, ARGV[6])
if not rnode or redis.call('HEXISTS', wk, ARGV[5]) == 0 then return 'unknown-peer' end
notify(ARGV[6], rnode, 'r', ARGV[5], ARGV[4], ARGV[7], ARGV[8])
return 'ok'
"""
)

# ARGV[4..]: room, peer, node, seq.
_LEAVE: Final = _PRELUDE + "return leave(ARGV[4], ARGV[5], ARGV[6], ARGV[7])\n"

# ARGV[4..]: the node, the silence in ms past which a node is dead. Its heartbeat, by Redis's
# clock (no two hub clocks are compared); whether Redis knew it ('known'; 'late' if its last
# beat is older than that silence), had reaped it ('reaped') or had never seen it ('new': a
# first beat, or a Redis that lost everything).
_BEAT: Final = """
local p, node = ARGV[1], ARGV[4]
local beats = p .. ':beats'
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local known = redis.call('ZSCORE', beats, node)
redis.call('ZADD', beats, now, node)
if known then
  if now - tonumber(known) > tonumber(ARGV[5]) then return 'late' end
  return 'known'
end
if redis.call('DEL', p .. ':reaped:' .. node) == 1 then return 'reaped' end
return 'new'
"""

# ARGV[4..]: the seq of the reaped peers' peer-left, the silence in ms past which a node is
# dead, and a node to reap whatever its silence (a node leaving on purpose), or ''. Returns
# each reaped node and its number of peers.
_REAP: Final = (
    _PRELUDE
    + """
local beats = p .. ':beats'
local dead = {}
if ARGV[6] ~= '' then
  dead = {ARGV[6]}
else
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  dead = redis.call('ZRANGEBYSCORE', beats, '-inf', '(' .. (now - tonumber(ARGV[5])))
end
local reply = {}
for _, node in ipairs(dead) do
  local peers = redis.call('HGETALL', p .. ':node-peers:' .. node)
  for i = 1, #peers, 2 do leave(peers[i + 1], peers[i], node, ARGV[4]) end
  redis.call('DEL', p .. ':node-peers:' .. node)
  redis.call('ZREM', beats, node)
  -- Kept a day: a node that comes back later than that takes Redis for restarted.
  if ARGV[6] == '' then redis.call('SET', p .. ':reaped:' .. node, '1', 'EX', 86400) end
  reply[#reply + 1] = node
  reply[#reply + 1] = #peers / 2
end
return reply
"""
)


_Queued = tuple[AsyncScript, list[Any], Callable[[Any], None]]

# XREAD's reply with decoded responses: per stream, its entries (ID, fields).
_XReadReply = list[tuple[str, list[tuple[str, dict[str, str]]]]]


def new_node_id() -> str:
    """A fresh id for one hub process (a restarted process is a new node)."""
    return secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How one process takes part in the cluster."""

    url: str
    prefix: str = "blindhub"
    heartbeat_interval: float = 1.0
    # The presence TTL, in heartbeats. A process is reaped once silent for the TTL and a
    # margin of one more heartbeat (`reap_after`): a beat that is late by up to an interval (a
    # loaded event loop, a slow round trip) is lateness, not death.
    presence_beats: int = 3
    socket_timeout: float = 2.0
    max_redis_connections: int = 32

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0 or self.presence_beats < 2:
            raise ValueError("the heartbeat must be positive and the presence at least 2 beats")

    @property
    def presence_ttl(self) -> float:
        return self.heartbeat_interval * self.presence_beats

    @property
    def reap_after(self) -> float:
        """Seconds without a heartbeat (by Redis's clock) after which a process is dead."""
        return self.presence_ttl + self.heartbeat_interval

    @property
    def stall_tolerance(self) -> float:
        """A live process whose event loop stalls for less than this is never reaped (its
        last beat may be an interval old when the stall begins; it beats as the stall ends)."""
        return self.reap_after - self.heartbeat_interval

    @property
    def failure_detection_bound(self) -> float:
        """Seconds from a process's death until the others have reaped it, at most (each
        looks at every heartbeat)."""
        return self.reap_after + self.heartbeat_interval


def redis_client(config: ClusterConfig, max_connections: int) -> redis.Redis:
    # Operations wait for one of a bounded set of Redis connections, as long as it takes:
    # a busy pool is backpressure (a waiting connection reads no more frames, so TCP slows
    # its sender), not an outage. A Redis that stops answering fails each command after
    # socket_timeout instead.
    pool = redis.BlockingConnectionPool.from_url(
        config.url,
        max_connections=max_connections,
        timeout=None,
        decode_responses=True,
        socket_timeout=config.socket_timeout,
        socket_connect_timeout=config.socket_timeout,
        # One retry on a broken connection: a write retried after its reply was lost is
        # written twice, and the recipient's sequence check delivers it once.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
    )
    return redis.Redis.from_pool(pool)


class ClusterLink:
    """Runs a `ClusterCore`'s operations on Redis and feeds back what other nodes sent.

    ``start(deliver)`` connects and starts the heartbeat, the hint listener and the stream
    reader; ``deliver`` writes deliveries to local connections (`HubServer.deliver`).
    """

    def __init__(
        self, core: ClusterCore, config: ClusterConfig, *, logger: logging.Logger | None = None
    ) -> None:
        self.core = core
        self.config = config
        self._logger = logger or logging.getLogger("blindhub.hub")
        # Three clients, so that neither a flood of relays nor a backlog of reads can delay
        # the heartbeat past the presence TTL (the others would reap a live process), and
        # sends cannot starve reads: the connections' operations, the stream reader, and the
        # control traffic (heartbeat, reaper, hints).
        self._redis = redis_client(config, config.max_redis_connections)
        self._reader = redis_client(config, 1)
        self._control = redis_client(config, 4)
        self._join = self._redis.register_script(_JOIN)
        self._relay = self._redis.register_script(_RELAY)
        self._leave = self._redis.register_script(_LEAVE)
        self._reap = self._redis.register_script(_REAP)
        self._beat = self._redis.register_script(_BEAT)
        self._deliver: Callable[[list[Delivery]], None] = lambda deliveries: None
        self._close_peer: Callable[[PeerId, CloseCode, str], None] = lambda *close: None
        # Unread entries per recipient stream: past it the recipient is closed as a slow
        # reader, as one process closes a client past max_buffered_bytes. Twice what one
        # sender may burst, so a process that keeps up never reaches it.
        limits = core.limits
        self._stream_bound = min(_MAX_STREAM, max(1024, 2 * limits.rate_burst))
        # Per local recipient in a room, the ID of the last entry read from its stream.
        self._positions: dict[PeerId, str] = {}
        self._dirty: set[PeerId] = set()
        self._wake = asyncio.Event()
        self._pending_leaves: list[LeaveOp] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Operations for the next pipeline: a script, its arguments, what to do with its reply
        # (or its error).
        self._queue: list[_Queued] = []
        # The pipeline being written, and the replies not yet acted on: what a writer that
        # failed leaves for its restart (every operation is answered once, none is lost).
        self._in_flight: list[_Queued] = []
        self._answers: collections.deque[tuple[Callable[[Any], None], Any]] = collections.deque()
        self._queued = asyncio.Event()
        self._space = asyncio.Event()
        self._stopping = False
        self._beaten = False

    @property
    def node(self) -> str:
        return self.core.node

    def _args(self, *args: object) -> list[Any]:
        ttl_ms = int(max(60.0, 10 * self.config.presence_ttl) * 1000)
        return [self.config.prefix, self._stream_bound, ttl_ms, *args]

    def _key(self, *parts: str) -> str:
        return ":".join((self.config.prefix, *parts))

    async def start(
        self,
        deliver: Callable[[list[Delivery]], None],
        close_peer: Callable[[PeerId, CloseCode, str], None],
    ) -> None:
        """``close_peer(peer, code, reason)`` closes a local connection."""
        self._deliver = deliver
        self._close_peer = close_peer
        await self._heartbeat()
        self._log("cluster-start", redis_available=self.core.available)
        works = (
            ("writer", self._write_batches),
            ("heartbeat", self._beat_forever),
            ("hints", self._listen_for_hints),
            ("reader", self._read_streams),
        )
        for name, work in works:
            self._tasks.append(asyncio.create_task(self._supervise(name, work)))

    async def close(self) -> None:
        """Stop, and leave the cluster at once (the others need not wait for the TTL)."""
        # The writer first writes what is queued (the leaves of the closed connections).
        # Every loop also stops on this flag: redis-py may swallow a cancellation that lands
        # in the middle of a command, and the task would then wait forever.
        self._stopping = True
        self._queued.set()
        self._wake.set()
        writer = self._tasks[0]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(writer), 2 * self.config.socket_timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(RedisError, OSError):
            await self._reap(args=self._args(FINAL_SEQ, 0, self.node), client=self._control)
        for client in (self._redis, self._reader, self._control):
            await client.aclose()

    # -- the operations of one connection, in order

    async def run(self, peer: PeerId) -> list[Delivery]:
        """Start what ``peer``'s last frame (or its disconnect) requires of the cluster.

        A join is waited for (its welcome comes from Redis). Relays and leaves are queued,
        in order, for the next pipeline, and the connection reads its next frame at once: its
        refusals (``unknown-peer``, ``cluster-unavailable``) are delivered when Redis answers.
        Only a queue at its bound makes the connection wait (backpressure)."""
        deliveries: list[Delivery] = []
        for op in self.core.take_ops(peer):
            if isinstance(op, JoinOp):
                deliveries += await self._run_join(op)
            else:
                self.submit(op)
        while len(self._queue) >= _MAX_QUEUED:
            self._space.clear()
            await self._space.wait()
        return deliveries

    def submit(self, op: RelayOp | LeaveOp) -> None:
        """Queue a relay or a leave for the next pipeline."""
        if isinstance(op, RelayOp):
            args = self._args(op.room, op.sender, op.recipient, op.seq, op.payload)
            self._queue.append((self._relay, args, lambda reply: self._relayed(op, reply)))
        else:
            self._positions.pop(op.peer, None)
            args = self._args(op.room, op.peer, self.node, op.seq)
            self._queue.append((self._leave, args, lambda reply: self._left(op, reply)))
        self._queued.set()

    async def _run_join(self, op: JoinOp) -> list[Delivery]:
        limits = self.core.limits
        args = (op.room, op.peer, self.node, limits.max_peers_per_room, limits.max_rooms, op.seq)
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((self._join, self._args(*args, "0"), _settle(reply)))
        self._queued.set()
        outcome = await reply
        if isinstance(outcome, Exception):
            self._failed(outcome)
            refusal = self.core.refused(op, ErrorCode.CLUSTER_UNAVAILABLE)
            for undo in self.core.take_ops(op.peer):  # the leave that undoes it, if it was run
                assert isinstance(undo, LeaveOp)
                self.submit(undo)
            return refusal
        if outcome[0] != "ok":
            return self.core.refused(op, ErrorCode(outcome[0]))
        self._positions[op.peer] = "0-0"
        self._mark_dirty(op.peer)
        others = [(PeerId(outcome[i]), outcome[i + 1]) for i in range(1, len(outcome), 2)]
        return self.core.joined(op, others)

    def _relayed(self, op: RelayOp, reply: Any) -> None:
        if isinstance(reply, Exception):
            self._failed(reply)
            self._deliver(self.core.refused(op, ErrorCode.CLUSTER_UNAVAILABLE))
        elif reply != "ok":
            self._deliver(self.core.refused(op, ErrorCode.UNKNOWN_PEER))
        else:
            self.core.relayed(op)

    def _left(self, op: LeaveOp, reply: Any) -> None:
        if isinstance(reply, Exception):
            self._failed(reply)
            self._pending_leaves.append(op)  # written when Redis returns

    # -- the writes of every connection, pipelined

    async def _write_batches(self) -> None:
        # One pipeline at a time, of the operations queued meanwhile, in queue order: under
        # load a round trip carries many, and one connection's operations stay in order.
        self._answer()  # what a failed run left unanswered, first
        while True:
            await self._queued.wait()
            if self._stopping and not self._queue:
                return
            batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
            if not self._queue:
                self._queued.clear()
            self._space.set()
            self._in_flight = batch
            replies: list[Any]
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for script, args, _ in batch:
                        await script(args=args, client=pipe)
                    replies = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as error:
                replies = [error] * len(batch)
            self._in_flight = []
            self._answers.extend(
                (done, reply) for (_, _, done), reply in zip(batch, replies, strict=True)
            )
            self._answer()

    def _answer(self) -> None:
        # Each reply leaves the queue before it is acted on: if acting on it raises, the
        # restarted writer goes on with the next one and never acts on one twice.
        while self._answers:
            done, reply = self._answers.popleft()
            done(reply)

    async def _supervise(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run one of the link's loops, and restart it after an unexpected exception.

        Restarted, not left to end: an ended writer (or reader, or heartbeat) would fail in
        silence, every later join of the process waiting for good; and not ended with the
        process either, which would drop all its connections for a fault that one operation
        or one stream entry hit. The failure is logged (with the node id and the traceback)
        and counted; until the next heartbeat that reaches Redis the process refuses joins
        and remote relays with ``cluster-unavailable``, so new work fails fast with the
        documented code rather than waiting on a loop being restarted; operations the writer
        had sent get the error as their reply (a join is then refused, a leave kept for
        later); and the loop restarts a heartbeat later, so a fault that recurs cannot spin.
        """
        while True:
            try:
                await work()
                return
            except Exception as error:  # any fault: what this is for
                metrics = self.core.cluster_metrics
                metrics.task_failures_total += 1
                self.core.available = False
                fields = {
                    "node": self.node,
                    "task": name,
                    "error": f"{type(error).__name__}: {error}",
                }
                self._logger.error("cluster-task-failed", exc_info=error, extra={"fields": fields})
                self._answers.extend((done, error) for _, _, done in self._in_flight)
                self._in_flight = []
            if not self._stopping:
                await asyncio.sleep(self.config.heartbeat_interval)

    # -- failure and recovery

    def _failed(self, error: Exception) -> None:
        self.core.cluster_metrics.redis_errors_total += 1
        if self.core.available:
            self._log("redis-unavailable", error=f"{type(error).__name__}: {error}")
        self.core.available = False

    async def _heartbeat(self) -> None:
        try:
            # The beat first, alone: one round trip, whatever else this heartbeat does.
            silence_ms = int(self.config.reap_after * 1000)
            state = await self._beat(args=self._args(self.node, silence_ms), client=self._control)
            if state == "reaped":
                # Taken for dead (a stall or a cut longer than the stall tolerance): its
                # peers' partners heard peer-left, and Redis no longer holds its peers.
                self._taken_for_dead()
            elif state == "new" and self._beaten:
                # Redis lost this node (it restarted empty). The other processes put their
                # peers back at their own next heartbeat, within one interval: until this
                # node's next one, joins and remote relays get cluster-unavailable, not an
                # unknown-peer for a peer not yet put back.
                self.core.available = False
                await self._restore()
            elif not self.core.available:
                await self._recover()
            self._beaten = True
            # A node that could not beat for that long either stalled or lost Redis, and
            # then the others likely lost it too (a Redis that restarted from its persisted
            # data still has their old beats): they get one heartbeat to beat again before
            # this node reaps anyone.
            if state != "late":
                await self._reap_dead_nodes()
        except (RedisError, OSError) as error:
            self._failed(error)
            return
        # The sweep: every local stream is read, whatever hints were lost.
        self._dirty.update(self._positions)
        self._wake.set()

    def _taken_for_dead(self) -> None:
        """Close every local peer in a room, as if this process had died (which the others
        believe): their clients reconnect, to any process, as new peers. Until the next
        heartbeat, joins are refused (cluster-unavailable)."""
        self.core.available = False
        members = self.core.local_members()
        for peer, _ in members:
            self._close_peer(peer, CloseCode.SERVICE_RESTART, CLOSE_NODE_REAPED)
        self._log("node-taken-for-dead", closed=len(members))

    async def _recover(self) -> None:
        await self._drop_stale_connections()
        while self._pending_leaves:
            op = self._pending_leaves[0]
            await self._leave(
                args=self._args(op.room, op.peer, self.node, op.seq), client=self._control
            )
            self._pending_leaves.pop(0)
        self.core.available = True
        self._log("redis-available")

    async def _restore(self) -> None:
        """Put this node's members back into a Redis that lost them; re-read every stream."""
        await self._drop_stale_connections()
        limits = self.core.limits
        for peer, room in self.core.local_members():
            args = (room, peer, self.node, limits.max_peers_per_room, limits.max_rooms, 0)
            await self._join(args=self._args(*args, "1"), client=self._control)
        # Entries already delivered are dropped by their sequence numbers.
        for peer in self._positions:
            self._positions[peer] = "0-0"
        self._log("cluster-restored", members=len(self._positions))

    async def _drop_stale_connections(self) -> None:
        # Connections idle in the pools across an outage are broken: each would fail once.
        for client in (self._redis, self._reader):
            await client.connection_pool.disconnect(inuse_connections=False)

    async def _reap_dead_nodes(self) -> None:
        silence_ms = int(self.config.reap_after * 1000)
        reply = await self._reap(args=self._args(FINAL_SEQ, silence_ms, ""), client=self._control)
        for index in range(0, len(reply), 2):
            self.core.cluster_metrics.nodes_reaped_total += 1
            self._log("node-reaped", dead=reply[index], peers=reply[index + 1])

    async def _beat_forever(self) -> None:
        # At a fixed rate, not an interval after the last beat ended: a heartbeat slowed by
        # load or by a restore does not push every later one back.
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self._stopping:
            due = max(due + self.config.heartbeat_interval, loop.time())
            await asyncio.sleep(due - loop.time())
            await self._heartbeat()

    # -- what other nodes sent

    def _mark_dirty(self, peer: PeerId) -> None:
        self._dirty.add(peer)
        self._wake.set()

    async def _listen_for_hints(self) -> None:
        channel = self._key("hint", self.node)
        while not self._stopping:
            try:
                async with self._control.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    while not self._stopping:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=self.config.heartbeat_interval
                        )
                        if message is not None and message["data"] in self._positions:
                            self._mark_dirty(PeerId(message["data"]))
            except (RedisError, OSError) as error:
                self._failed(error)
            # Resubscribe after a heartbeat; the sweep reads whatever was hinted meanwhile.
            await asyncio.sleep(self.config.heartbeat_interval)

    async def _read_streams(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            peers = [peer for peer in self._dirty if peer in self._positions]
            self._dirty.clear()
            streams, _ = read_plan(len(peers), self.core.limits.max_message_bytes)
            for start in range(0, len(peers), streams):
                chunk = peers[start : start + streams]
                try:
                    await self._read(chunk)
                except (RedisError, OSError) as error:
                    self._failed(error)  # the next heartbeat's sweep reads them again

    async def _read(self, peers: list[PeerId]) -> None:
        # A peer of a later chunk may have left while an earlier chunk was being read.
        streams = {
            self._key("inbox", peer): position
            for peer in peers
            if (position := self._positions.get(peer)) is not None
        }
        if not streams:
            return
        async with self._reader.pipeline(transaction=False) as pipe:
            # What was delivered leaves the stream, so its length is what is still unread.
            for key, position in streams.items():
                if position != "0-0":
                    pipe.xtrim(key, minid=position)
            _, count = read_plan(len(peers), self.core.limits.max_message_bytes)
            pipe.xread(streams, count=count)  # type: ignore[arg-type]
            results = await pipe.execute()
        replies: _XReadReply = results[-1]
        now = time.time()
        metrics = self.core.cluster_metrics
        max_payload = self.core.limits.max_message_bytes
        prefix_length = len(self._key("inbox", ""))
        for key, entries in replies:
            peer = PeerId(key[prefix_length:])
            if peer not in self._positions:
                continue  # it left while the read was under way
            for entry_id, entry in entries:
                if entry.get("k") == OVERFLOW:
                    self.core.cluster_metrics.stream_overflows_total += 1
                    self._positions.pop(peer, None)
                    self._close_peer(peer, CloseCode.POLICY_VIOLATION, CLOSE_SLOW_READER)
                    break
                self._positions[peer] = entry_id
                lag = max(0.0, now - int(entry_id.split("-")[0]) / 1000)
                metrics.stream_lag_seconds = lag
                metrics.stream_lag_seconds_sum += lag
                metrics.stream_lag_count += 1
                event = parse_event(entry, max_payload)
                if event is None:
                    metrics.stream_entries_rejected_total += 1
                    self._log("stream-entry-rejected", peer=peer, entry=entry_id)
                    continue
                self._deliver(self.core.receive(peer, event))
            if len(entries) == count and peer in self._positions:
                self._dirty.add(peer)
                self._wake.set()

    # -- what /metrics adds

    def metric_lines(self) -> list[str]:
        metrics = self.core.cluster_metrics
        return [
            *node_metric_lines(self.node, self.core.available, metrics.redis_errors_total),
            "# HELP blindhub_cross_node_relays_sent_total Relays written to another process.",
            "# TYPE blindhub_cross_node_relays_sent_total counter",
            f"blindhub_cross_node_relays_sent_total {metrics.relays_sent_total}",
            "# HELP blindhub_cross_node_relays_received_total Relays read from another process.",
            "# TYPE blindhub_cross_node_relays_received_total counter",
            f"blindhub_cross_node_relays_received_total {metrics.relays_received_total}",
            "# HELP blindhub_duplicates_dropped_total Stream entries delivered before.",
            "# TYPE blindhub_duplicates_dropped_total counter",
            f"blindhub_duplicates_dropped_total {metrics.duplicates_dropped_total}",
            "# HELP blindhub_stream_lag_seconds From a stream entry's write to its read.",
            "# TYPE blindhub_stream_lag_seconds summary",
            f"blindhub_stream_lag_seconds_sum {metrics.stream_lag_seconds_sum:.6f}",
            f"blindhub_stream_lag_seconds_count {metrics.stream_lag_count}",
            "# HELP blindhub_stream_lag_last_seconds The lag of the last entry read.",
            "# TYPE blindhub_stream_lag_last_seconds gauge",
            f"blindhub_stream_lag_last_seconds {metrics.stream_lag_seconds:.6f}",
            "# HELP blindhub_stream_overflows_total Peers closed: their process fell behind.",
            "# TYPE blindhub_stream_overflows_total counter",
            f"blindhub_stream_overflows_total {metrics.stream_overflows_total}",
            "# HELP blindhub_stream_entries_rejected_total Stream entries no hub process writes.",
            "# TYPE blindhub_stream_entries_rejected_total counter",
            f"blindhub_stream_entries_rejected_total {metrics.stream_entries_rejected_total}",
            "# HELP blindhub_cluster_task_failures_total Cluster loops restarted after a fault.",
            "# TYPE blindhub_cluster_task_failures_total counter",
            f"blindhub_cluster_task_failures_total {metrics.task_failures_total}",
            "# HELP blindhub_nodes_reaped_total Dead processes whose peers this one removed.",
            "# TYPE blindhub_nodes_reaped_total counter",
            f"blindhub_nodes_reaped_total {metrics.nodes_reaped_total}",
        ]

    def _log(self, event: str, **fields: object) -> None:
        self._logger.info(event, extra={"fields": {"node": self.node, **fields}})


def node_metric_lines(node: str, available: bool, redis_errors_total: int) -> list[str]:
    """What every hub process that uses Redis adds to /metrics, a cluster's or a routing
    hub's that places its rooms there: its node id, whether Redis answers, Redis errors."""
    return [
        "# HELP blindhub_node_info The id of this hub process in its cluster.",
        "# TYPE blindhub_node_info gauge",
        f'blindhub_node_info{{node="{node}"}} 1',
        "# HELP blindhub_redis_available 1 while the shared state (Redis) answers.",
        "# TYPE blindhub_redis_available gauge",
        f"blindhub_redis_available {int(available)}",
        "# HELP blindhub_redis_errors_total Redis commands that failed.",
        "# TYPE blindhub_redis_errors_total counter",
        f"blindhub_redis_errors_total {redis_errors_total}",
    ]


def read_plan(dirty: int, max_payload: int) -> tuple[int, int]:
    """For ``dirty`` streams to read: how many streams one read takes, and how many entries of
    each, so that a read holds at most `_READ_BYTES` of payloads (at least one entry)."""
    entries = max(1, _READ_BYTES // max_payload)
    streams = max(1, min(_STREAMS_PER_READ, entries, dirty))
    return streams, max(1, min(_READ_BATCH, entries // streams))


def _settle(future: asyncio.Future[Any]) -> Callable[[Any], None]:
    """The writer's answer to a join. A join whose connection task was cancelled meanwhile has
    nobody waiting: setting its result would raise inside the writer, which serves every
    connection of this process."""

    def settle(reply: Any) -> None:
        if not future.done():
            future.set_result(reply)

    return settle
