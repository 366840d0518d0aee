"""A peer's connection to the hub: join a room, relay payloads, receive typed events.

The hub is the adversary, so nothing it sends is taken on trust: every frame
is parsed strictly (``signaling.protocol``) and checked against what this
connection asked for and what it has seen (a welcome only after a join, for
the room asked for; events only about peers of that room; relays only from
them). Anything else raises a typed error and changes no state. What the hub
cannot be checked on (who really sent a payload) is the key agreement's job.
"""

import json
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from crypto import strict_json
from signaling.hub import Limits
from signaling.protocol import (
    ErrorCode,
    ErrorMessage,
    HubMessage,
    Join,
    JsonText,
    Leave,
    MalformedHubMessage,
    MediaOffer,
    MediaTracks,
    PeerId,
    PeerJoined,
    PeerLeft,
    Refused,
    RelayFrom,
    RelayTo,
    SignalingError,
    Welcome,
    parse_hub_message,
)

DEFAULT_MAX_MESSAGE_BYTES: Final = Limits().max_message_bytes
# A relayed frame is at most a few bytes longer than the frame its sender sent.
_RELAY_OVERHEAD: Final = 1024


def decode_payload(text: JsonText) -> object:
    """A relayed payload's value, read as strict JSON (``crypto.strict_json``): duplicate
    names, NaN, infinities (``1e400`` too) and deep nesting are ``invalid-json``.

    The hub forwards a payload's text unread (it only checks that it is one JSON value), so
    the receiver is the one that must refuse a text two parsers could read differently.
    """
    try:
        return strict_json.loads(text)
    except strict_json.StrictJsonError as error:
        raise MalformedHubMessage(ErrorCode.INVALID_JSON, f"payload: {error}") from None


class UnexpectedHubMessage(SignalingError, ValueError):
    """A well-formed hub message that contradicts this connection's state."""


class HubClosed(SignalingError, ConnectionError):
    """The connection closed; ``code`` is its close code (1006: no close frame at all)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"the hub connection closed ({code}) {reason}".rstrip())
        self.code = code
        self.reason = reason


class PayloadTooLarge(SignalingError, ValueError):
    """This process tried to relay a payload larger than the hub accepts."""


@dataclass(frozen=True, slots=True)
class Relayed:
    """A payload another peer of the room sent us, decoded as strict JSON."""

    sender: PeerId
    payload: Any


HubEvent = PeerJoined | PeerLeft | Relayed


def encode_payload(payload: Any) -> JsonText:
    """Encode a payload as compact JSON; NaN and infinities are refused (not JSON)."""
    return JsonText(json.dumps(payload, separators=(",", ":"), allow_nan=False))


class HubConnection:
    """``async with await HubConnection.connect(url) as hub: await hub.join(room)``."""

    def __init__(self, websocket: ClientConnection, max_message_bytes: int) -> None:
        self._websocket = websocket
        self._max_message_bytes = max_message_bytes
        self.peer_id: PeerId | None = None
        self.room: str | None = None
        self.peers: set[PeerId] = set()
        self._joining: str | None = None
        # After leave(): the peers of the room left, until the hub's next answer to a join.
        # The hub may have sent events of that room before it saw the leave.
        self._left_room_peers: set[PeerId] | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        open_timeout: float = 10.0,
    ) -> Self:
        """Open a websocket to the hub at ``url`` (ws:// or wss://).

        A wss:// hub's certificate is verified against ``ssl_context``, by default the
        system's trust store; a certificate that does not verify raises
        ``ssl.SSLCertVerificationError`` (an ``OSError``)."""
        if ssl_context is None and url.lower().startswith("wss:"):
            ssl_context = ssl.create_default_context()
        websocket = await connect(
            url,
            ssl=ssl_context,
            compression=None,
            max_size=max_message_bytes + _RELAY_OVERHEAD,
            open_timeout=open_timeout,
        )
        return cls(websocket, max_message_bytes)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._websocket.close()

    async def join(self, room: str) -> Welcome:
        """Join ``room``; return the welcome, or raise ``Refused`` with the hub's code.

        Events that arrive before the answer cannot concern this room yet and are
        rejected like any other message that contradicts the state.
        """
        if self.room is not None or self._joining is not None:
            raise UnexpectedHubMessage("join called twice")
        self._joining = room
        try:
            await self._send(Join(room).encode())
            message = await self._receive()
            while self._left_room_peers is not None and not isinstance(
                message, Welcome | ErrorMessage
            ):
                self._check_event(self._left_room_peers, message)
                message = await self._receive()
            # The hub answers a join after the leave: no event of the room left can follow.
            self._left_room_peers = None
            if isinstance(message, ErrorMessage):
                raise Refused(message.code, message.message)
            if not isinstance(message, Welcome):
                raise UnexpectedHubMessage(f"expected welcome, got {message.TYPE}")
            if message.room != room:
                raise UnexpectedHubMessage("welcome names another room")
            if message.peer_id in message.peers or len(set(message.peers)) != len(message.peers):
                raise UnexpectedHubMessage("welcome lists this peer or one peer twice")
        finally:
            self._joining = None
        self.peer_id, self.room, self.peers = message.peer_id, room, set(message.peers)
        return message

    async def relay(self, to: PeerId, payload: Any) -> None:
        """Send ``payload`` (any JSON value) to peer ``to`` of our room."""
        text = RelayTo(to, encode_payload(payload)).encode()
        if len(text.encode()) > self._max_message_bytes:
            raise PayloadTooLarge(f"a relay frame may be {self._max_message_bytes} bytes at most")
        await self._send(text)

    async def leave(self) -> None:
        """Leave the room (the hub does not answer); join may be called again.

        Events of the room that the hub sent before it saw the leave may still arrive:
        until the hub answers the next join, they are checked like any event and dropped.
        """
        await self._send(Leave().encode())
        if self.room is not None:
            self._left_room_peers = self.peers
        self.room, self.peers = None, set()

    async def next_event(self) -> HubEvent:
        """The next event; an ``error`` from the hub is raised as ``Refused``."""
        while True:
            message = await self._receive()
            if isinstance(message, ErrorMessage):
                raise Refused(message.code, message.message)
            if isinstance(message, Welcome):
                raise UnexpectedHubMessage("welcome without a join")
            if self._left_room_peers is None:
                break
            self._check_event(self._left_room_peers, message)
        if self.room is None:
            raise UnexpectedHubMessage(f"{message.TYPE} outside a room")
        self._check_event(self.peers, message)
        if isinstance(message, RelayFrom):
            return Relayed(message.sender, decode_payload(message.payload))
        assert isinstance(message, PeerJoined | PeerLeft)  # _check_event refused the rest
        return message

    def _check_event(
        self,
        peers: set[PeerId],
        message: PeerJoined | PeerLeft | RelayFrom | MediaOffer | MediaTracks,
    ) -> None:
        """Check an event against ``peers``, the room it concerns, then track who is there."""
        if isinstance(message, MediaOffer | MediaTracks):
            # Media messages come only from a hub that routes media, which this connection
            # does not handle yet: refused, as every message that contradicts the state.
            raise UnexpectedHubMessage(f"{message.TYPE} from a hub this client does not expect")
        if isinstance(message, PeerJoined):
            if message.peer_id == self.peer_id or message.peer_id in peers:
                raise UnexpectedHubMessage("peer-joined for a peer already here")
            peers.add(message.peer_id)
        elif isinstance(message, PeerLeft):
            if message.peer_id not in peers:
                raise UnexpectedHubMessage("peer-left for a peer not here")
            peers.discard(message.peer_id)
        elif message.sender not in peers:
            raise UnexpectedHubMessage("relay from a peer not in this room")

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> HubEvent:
        try:
            return await self.next_event()
        except HubClosed as closed:
            if closed.code in (CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY):
                raise StopAsyncIteration from None
            raise

    async def _send(self, text: str) -> None:
        try:
            await self._websocket.send(text)
        except ConnectionClosed as closed:
            raise self._closed(closed) from None

    async def _receive(self) -> HubMessage:
        try:
            frame = await self._websocket.recv()
        except ConnectionClosed as closed:
            raise self._closed(closed) from None
        if isinstance(frame, bytes):
            raise MalformedHubMessage(ErrorCode.INVALID_JSON, "the hub sent a binary frame")
        return parse_hub_message(frame)

    @staticmethod
    def _closed(closed: ConnectionClosed) -> HubClosed:
        # The hub's close frame, else ours (we closed first, e.g. 1009 on a frame too big).
        frame = closed.rcvd or closed.sent
        if frame is None:
            return HubClosed(CloseCode.ABNORMAL_CLOSURE, "")
        return HubClosed(frame.code, frame.reason)
