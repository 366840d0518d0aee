"""The hostile hub: the normal hub with switchable attacker capabilities (the experiment, issue 6).

`HostileHub` puts the attacker between the honest hub's two halves, by composition: the honest
routing core (`signaling.hub.Hub`: rooms, limits, the wire format) and the honest websockets
server (`signaling.server.HubServer`), which drives the hostile hub as its `RoutingCore`. Every
frame goes to the core first; the attack works on the relays that come out of it. What it adds is
what a hub operator could do to listen in:

- ``record``: the ``--record-metadata`` log of everything it delivers, plus, wherever it sits in
  the media path, every media packet it relays (`MediaMitm.packets` and `.frames`).
- ``dtls-mitm``: rewrites the SDP it relays so that each peer runs DTLS-SRTP with the hub
  (`client.experiment.media_mitm.MediaMitm`). When the SDP is sealed it cannot read it; it then
  does the one thing left, alter the sealed message that carries it each way (the offer and the
  answer), which the peers detect.
- ``keyswap``: runs the key agreement with each peer itself, with its own identity keys under the
  peers' real names, as far as it can learn them. The identities travel encrypted (protocol
  version 2), and the initiator authenticates first: the hub answers the initiator's commit as a
  responder and learns the initiator's name from its reveal; it then calls the responder under
  that name (`Initiator`), learns the responder's name from its confirm, and only then confirms
  to the initiator under it (`Responder`, replaying the random bytes of the first answer so that
  its accept stays valid). A responder that refuses the hub's key never reveals its name: if it
  leaves, the hub confirms to the initiator under a name of its own choosing. It then
  holds both legs' SFrame keys and sealing keys: it unseals and reseals the signalling, rewrites
  the SDP as in ``dtls-mitm``, and its `MediaMitm` opens each frame with one leg's key, records
  the plaintext and seals it again for the other leg (`SFrameRelay`). Only the peers comparing
  their SAS, or pinned identities, expose it.
- ``tamper``: drops relayed messages of chosen types, and after every sealed message of the call
  it forwards (the setup's are spared: see `_in_setup`) injects a replayed copy and an altered
  copy. In the media path (with ``dtls-mitm`` or
  ``keyswap``) it also replays, alters and drops some of the frames it relays (`MediaTamper`
  around the relay's own transform; what it did is `RoomAttack.media_tamper.counts`).

Without the media path the relays are rewritten at once and ``handle`` returns them, as the core
does. In the media path (``dtls-mitm``, ``keyswap``) rewriting a relay awaits the hub's own WebRTC
legs and key agreements, so the hostile hub is an asyncio component there: its ``handle`` returns
only the core's other deliveries, and tasks rewrite the relays, in order per sender and
recipient, and write them later through `HubServer.deliver`.
"""

from __future__ import annotations

import asyncio
import enum
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from client.experiment.media_mitm import (
    Direction,
    InterceptionError,
    Kind,
    MediaMitm,
    MediaTamper,
    RelayTransform,
    TamperCounts,
)
from crypto import strict_json
from crypto.frame_crypto import KeyUpdate, SFrameReceiver, SFrameSender, apply_key_update
from crypto.handshake import HandshakeResult, HandshakeState, Initiator, Responder
from crypto.identity import IdentityKey, IdentityPublicKey, b64decode, b64encode
from crypto.sealed import Received, SealedChannel
from crypto.sframe import CipherSuite
from signaling.hub import Delivery, Hub, Limits, Metrics, random_peer_id
from signaling.protocol import JsonText, PeerId, RelayFrom
from signaling.server import HubServer, MetadataRecorder

logger = logging.getLogger("blindhub.hostile")

# Each side's sealed messages start with its decision ("confirmed"), then its offer or answer.
SDP_SEQUENCE = 1
HANDSHAKE_TYPES = frozenset({"commit", "accept", "reveal", "confirm"})
# The responder's name as the hub claims it when the responder never revealed its own.
GUESSED_RESPONDER_NAME = "peer"
SDP_TYPES = frozenset({"offer", "answer"})


class Capability(enum.StrEnum):
    RECORD = "record"
    DTLS_MITM = "dtls-mitm"
    KEYSWAP = "keyswap"
    TAMPER = "tamper"


def parse_capabilities(text: str) -> frozenset[Capability]:
    """``"record+tamper"`` -> {RECORD, TAMPER}; raises ValueError naming an unknown one."""
    try:
        return frozenset(Capability(name) for name in text.split("+") if name)
    except ValueError:
        known = ", ".join(c.value for c in Capability)
        raise ValueError(f"unknown capability in {text!r} (known: {known})") from None


@dataclass(frozen=True)
class TamperPlan:
    """What ``tamper`` does: inject a replay and/or an altered copy after each sealed message,
    and drop every relayed message whose clear ``type`` is listed. In the media path, in every
    ``media_period`` frames of each stream: replay one and alter one (as ``replay`` and
    ``alter`` say), and drop one if ``drop_media``."""

    replay: bool = True
    alter: bool = True
    drop_types: frozenset[str] = frozenset()
    media_period: int = 40
    drop_media: bool = True


class SFrameRelay:
    """The keyswap's `RelayTransform`: each leg's frames opened with the key the hub agreed with
    that peer, and sealed again under the key it agreed with the other peer."""

    def __init__(self, offerer_leg: HandshakeResult, answerer_leg: HandshakeResult) -> None:
        legs = {
            Direction.OFFERER_TO_ANSWERER: (offerer_leg, answerer_leg),
            Direction.ANSWERER_TO_OFFERER: (answerer_leg, offerer_leg),
        }
        self._receivers: dict[Direction, SFrameReceiver] = {}
        self._senders: dict[Direction, SFrameSender] = {}
        for direction, (source, destination) in legs.items():
            self._receivers[direction] = SFrameReceiver(source.suite)
            self._senders[direction] = SFrameSender(destination.suite)
        self.key_update(offerer_leg.initial_keys, from_offerer=True)
        self.key_update(answerer_leg.initial_keys, from_offerer=False)
        self._open = {
            (direction, kind): receiver.transform(kind)
            for direction, receiver in self._receivers.items()
            for kind in ("audio", "video")
        }
        self._seal = {
            (direction, kind): sender.transform(kind)
            for direction, sender in self._senders.items()
            for kind in ("audio", "video")
        }

    def open(self, direction: Direction, kind: Kind, frame: bytes) -> bytes | None:
        return self._open[direction, kind](frame)

    def seal(self, direction: Direction, kind: Kind, frame: bytes) -> list[bytes]:
        sealed = self._seal[direction, kind](frame)
        return [] if sealed is None else [sealed]

    def key_update(self, update: KeyUpdate, *, from_offerer: bool) -> None:
        """Install one leg's keys (epoch 0's, or a rekey's): the receive key opens that peer's
        frames, the send key seals the frames to it. Old receive keys are kept (no grace
        window to honour: the attacker loses nothing by holding them)."""
        incoming = Direction.OFFERER_TO_ANSWERER if from_offerer else Direction.ANSWERER_TO_OFFERER
        outgoing = Direction.ANSWERER_TO_OFFERER if from_offerer else Direction.OFFERER_TO_ANSWERER
        apply_key_update(update, self._senders[outgoing], self._receivers[incoming])


@dataclass
class _Leg:
    """The hub's own key agreement with one peer (keyswap)."""

    machine: Initiator | Responder
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def result(self) -> HandshakeResult:
        return self.machine.result

    @property
    def channel(self) -> SealedChannel:
        return self.machine.result.channel


class _Recorded:
    """Random bytes drawn once and recorded, so that a second machine can draw the same."""

    def __init__(self, random_bytes: Callable[[int], bytes]) -> None:
        self._random_bytes = random_bytes
        self.drawn: list[bytes] = []

    def __call__(self, size: int) -> bytes:
        data = self._random_bytes(size)
        self.drawn.append(data)
        return data

    def replay(self) -> Callable[[int], bytes]:
        remaining: Iterator[bytes] = iter(self.drawn)

        def random_bytes(size: int) -> bytes:
            data = next(remaining, None)
            if data is None:
                # Past what the first machine drew (a rekey later in the call): fresh bytes.
                return self._random_bytes(size)
            assert len(data) == size
            return data

        return random_bytes


@dataclass
class _HeldInitiator:
    """The initiator's side of the keyswap until the responder's name is known: its commit
    (answered at once by ``probe``, whose random bytes are recorded), and its reveal, which
    ``probe`` opened to learn who the initiator is."""

    peer: PeerId
    commit: dict[str, Any]
    identity: IdentityKey
    randomness: _Recorded
    probe: Responder
    learned: list[tuple[str, IdentityPublicKey]] = field(default_factory=list)
    reveal: dict[str, Any] | None = None


@dataclass
class RoomAttack:
    """What the hub did to one room's call and what it got out of it."""

    mitm: MediaMitm | None = None
    offerer: PeerId | None = None
    legs: dict[PeerId, _Leg] = field(default_factory=dict)
    held: _HeldInitiator | None = None
    relay: SFrameRelay | None = None
    media_tamper: MediaTamper | None = None
    events: list[str] = field(default_factory=list)

    @property
    def sas_by_peer(self) -> dict[PeerId, str]:
        """The SAS each peer's key agreement with the hub produced (keyswap)."""
        return {
            peer: leg.result.sas
            for peer, leg in self.legs.items()
            if leg.machine.state is HandshakeState.DONE
        }


def _decode(payload: JsonText) -> Any:
    try:
        return strict_json.loads(payload)
    except strict_json.StrictJsonError:
        return None


def _encode(message: Any) -> JsonText:
    return JsonText(json.dumps(message, separators=(",", ":")))


def _type(message: Any) -> str | None:
    kind = message.get("type") if isinstance(message, dict) else None
    return kind if isinstance(kind, str) else None


def altered(message: dict[str, Any]) -> dict[str, Any] | None:
    """A sealed message with the last ciphertext bit flipped (its tag no longer matches); None
    if its ciphertext is not non-empty base64url: there is no bit to flip, and the recipient
    rejects the message as it is."""
    text = message.get("ciphertext")
    try:
        ciphertext = bytearray(b64decode(text)) if isinstance(text, str) else bytearray()
    except ValueError:
        return None
    if not ciphertext:
        return None
    ciphertext[-1] ^= 1
    return {**message, "ciphertext": b64encode(bytes(ciphertext))}


def _offered(commit: dict[str, Any]) -> list[CipherSuite]:
    """The suites a commit offers: the hub's legs support exactly those."""
    return [CipherSuite(code) for code in commit.get("suites", [])]


def _sealed(message: Any) -> bool:
    return _type(message) == "sealed" and isinstance(message.get("ciphertext"), str)


def _in_setup(message: dict[str, Any]) -> bool:
    """One of a side's setup messages: its decision about the peer, then its offer or answer.
    A copy of one injected there would end the setup (any sealed setup message that does not
    open does), which the dtls-mitm cells show; the tamper is about the call after it."""
    sequence = message.get("seq")
    return message.get("epoch") == 0 and type(sequence) is int and sequence <= SDP_SEQUENCE


class HostileHub:
    """``HostileHub({Capability.DTLS_MITM})``; ``await hub.serve()`` runs it on a free port.

    The server's `RoutingCore`: the honest core's (``self.hub``) except for relays."""

    def __init__(
        self,
        capabilities: Iterable[Capability],
        limits: Limits | None = None,
        *,
        tamper: TamperPlan | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        new_peer_id: Callable[[], PeerId] = random_peer_id,
    ) -> None:
        self.hub = Hub(limits, new_peer_id=new_peer_id)
        self.capabilities = frozenset(capabilities)
        self.tamper_plan = tamper or TamperPlan()
        self.tampered = TamperCounts()
        self.attacks: dict[str, RoomAttack] = {}
        self.metadata_log = io.StringIO()
        self._random_bytes = random_bytes
        self._deliver: Callable[[list[Delivery]], None] | None = None
        self._queues: dict[tuple[PeerId, PeerId], asyncio.Queue[tuple[str, JsonText]]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._server: HubServer | None = None

    # -- the rest of the RoutingCore the server drives: the honest core's, unchanged

    @property
    def limits(self) -> Limits:
        return self.hub.limits

    @property
    def metrics(self) -> Metrics:
        return self.hub.metrics

    @property
    def connection_count(self) -> int:
        return self.hub.connection_count

    @property
    def room_count(self) -> int:
        return self.hub.room_count

    def room_size(self, room: str) -> int:
        return self.hub.room_size(room)

    def join_deadline(self, peer: PeerId) -> float | None:
        return self.hub.join_deadline(peer)

    def connect(self, now: float) -> PeerId:
        return self.hub.connect(now)

    def disconnect(self, peer: PeerId) -> list[Delivery]:
        # A responder that refused the hub leaves without its name: the hub still answers the
        # initiator, before the core tells it the peer left.
        answers = [
            Delivery(initiator, RelayFrom(peer, _encode(reply)), room)
            for room, attack in self.attacks.items()
            if attack.held is not None and peer in attack.legs
            for initiator, reply in self._confirm_to_initiator(attack, GUESSED_RESPONDER_NAME)
        ]
        return answers + self.hub.disconnect(peer)

    @property
    def in_media_path(self) -> bool:
        return bool(self.capabilities & {Capability.DTLS_MITM, Capability.KEYSWAP})

    def attack(self, room: str) -> RoomAttack:
        return self.attacks.setdefault(room, RoomAttack())

    def metadata(self) -> list[dict[str, Any]]:
        """The ``record`` log, one parsed JSON line per delivery (empty without ``record``)."""
        return [json.loads(line) for line in self.metadata_log.getvalue().splitlines()]

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> HubServer:
        """Start the websockets server around this hub (``record`` keeps the metadata log)."""
        recording = Capability.RECORD in self.capabilities
        self._server = HubServer(
            self,
            host=host,
            port=port,
            metadata=MetadataRecorder(self.metadata_log) if recording else None,
        )
        self._deliver = self._server.deliver
        await self._server.start()
        return self._server

    async def close(self) -> None:
        """Stop the server, the rewriting workers and every media man in the middle."""
        if self._server is not None:
            await self._server.close()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for attack in self.attacks.values():
            if attack.mitm is not None:
                await attack.mitm.close()

    # -- routing

    def handle(self, peer: PeerId, text: str, now: float) -> list[Delivery]:
        """The honest core's deliveries for one frame, with its relays attacked: at once without
        the media path; in it, queued for the rewriting tasks (delivered later)."""
        deliveries = self.hub.handle(peer, text, now)
        if not self.in_media_path:
            return self._tampered(deliveries)
        now_due: list[Delivery] = []
        for delivery in deliveries:
            match delivery:
                case Delivery(recipient, RelayFrom(sender, payload), str(room)):
                    self._queue_rewrite(room, sender, recipient, payload)
                case _:
                    now_due.append(delivery)
        return now_due

    def _queue_rewrite(
        self, room: str, sender: PeerId, recipient: PeerId, payload: JsonText
    ) -> None:
        if self._deliver is None:
            raise RuntimeError("a hub in the media path rewrites asynchronously: use serve()")
        queue = self._queues.get((sender, recipient))
        if queue is None:
            queue = self._queues[sender, recipient] = asyncio.Queue()
            self._workers.append(
                asyncio.create_task(self._rewrite_in_order(sender, recipient, queue))
            )
        queue.put_nowait((room, payload))

    async def _rewrite_in_order(
        self, sender: PeerId, recipient: PeerId, queue: asyncio.Queue[tuple[str, JsonText]]
    ) -> None:
        assert self._deliver is not None
        while True:
            room, payload = await queue.get()
            try:
                deliveries = await self._rewrite(room, sender, recipient, payload)
                self._deliver(self._tampered(deliveries))
            except (ValueError, InterceptionError) as error:
                # The attack failed on this message (a peer refused the hub's keys, or sent what
                # the hub cannot use): it is dropped, and the peers notice the rest.
                self.attack(room).events.append(f"attack-failed: {type(error).__name__}")
                logger.info("attack failed: %s", error)
            except Exception as error:
                # Anything else is a defect in the attack. It costs this message, never the
                # worker: a dead worker would leave every later relay of this pair queued.
                self.attack(room).events.append(f"attack-error: {type(error).__name__}")
                logger.exception("attack error on a relay from %s to %s", sender, recipient)

    async def _rewrite(
        self, room: str, sender: PeerId, recipient: PeerId, payload: JsonText
    ) -> list[Delivery]:
        attack = self.attack(room)
        message = _decode(payload)
        kind = _type(message)

        def to(peer: PeerId, text: JsonText) -> Delivery:
            # Anything the hub sends a peer claims to come from the other one.
            return Delivery(peer, RelayFrom(recipient if peer == sender else sender, text), room)

        if Capability.KEYSWAP in self.capabilities and kind in HANDSHAKE_TYPES:
            return [
                to(peer, _encode(m))
                for peer, m in self._swap_keys(attack, sender, recipient, message)
            ]
        if attack.legs:
            # Nothing passes a leg before the hub's own key agreement with that peer is done.
            await asyncio.gather(*(leg.done.wait() for leg in attack.legs.values()))
        if not _sealed(message):
            rewritten = await self._rewrite_sdp(attack, sender, message)
            return [to(recipient, payload if rewritten is message else _encode(rewritten))]
        if not attack.legs:
            # The SDP, which the hub cannot read, is each side's second sealed message (after
            # its decision): all the hub can do is send something else in its place.
            sdp = message.get("epoch") == 0 and message.get("seq") == SDP_SEQUENCE
            forged = altered(message) if sdp else None
            if forged is None:
                return [to(recipient, payload)]
            attack.events.append("sealed-sdp-altered")
            return [to(recipient, _encode(forged))]
        received = attack.legs[sender].channel.open(message)
        deliveries = [to(sender, _encode(reply)) for reply in received.replies]
        self._follow_rekey(attack, sender, received)
        if received.content is not None:
            content = await self._rewrite_sdp(attack, sender, received.content)
            resealed = attack.legs[recipient].channel.seal(content)
            deliveries.append(to(recipient, _encode(resealed)))
        return deliveries

    def _swap_keys(
        self, attack: RoomAttack, sender: PeerId, recipient: PeerId, message: dict[str, Any]
    ) -> list[tuple[PeerId, dict[str, Any]]]:
        """Answer a key agreement message on the sender's leg.

        The names are signed and encrypted, so the hub learns each from its owner and claims it
        on the other leg: the initiator's from its reveal (it authenticates first, to whoever
        answered its commit), the responder's from its confirm, once the hub has called it
        under the initiator's name."""
        kind = _type(message)
        call_id = str(message.get("call_id"))
        if kind == "commit" and attack.held is None and not attack.legs:
            randomness = _Recorded(self._random_bytes)
            learned: list[tuple[str, IdentityPublicKey]] = []
            identity = self._identity()
            probe = Responder(
                identity,
                call_id,
                _offered(message),
                randomness,
                name=GUESSED_RESPONDER_NAME,
                peer_check=lambda name, key: learned.append((name, key)),
            )
            attack.held = _HeldInitiator(sender, message, identity, randomness, probe, learned)
            attack.events.append("keyswap-started")
            return [(sender, reply) for reply in probe.receive(message)]
        held = attack.held
        if kind == "reveal" and held is not None and sender == held.peer:
            held.probe.receive(message)  # its confirm, under a name it made up, is never sent
            [(name, _key)] = held.learned
            held.reveal = message
            attack.events.append("keyswap-initiator-identified")
            toward_responder = Initiator(
                self._identity(), call_id, _offered(held.commit), self._random_bytes, name=name
            )
            attack.legs[recipient] = _Leg(toward_responder)
            return [(recipient, toward_responder.start())]
        leg = attack.legs.get(sender)
        if leg is None:
            return [(recipient, message)]
        replies = [(sender, reply) for reply in leg.machine.receive(message)]
        if leg.machine.state is HandshakeState.DONE:
            leg.done.set()
            attack.events.append("keyswap-leg-done")
            if held is not None:
                replies += self._confirm_to_initiator(attack, leg.result.peer_name)
        return replies

    def _confirm_to_initiator(
        self, attack: RoomAttack, responder_name: str
    ) -> list[tuple[PeerId, dict[str, Any]]]:
        """The held initiator's leg, finished under ``responder_name``: a responder with the
        probe's identity and random bytes gives the same accept (not sent again), and a
        confirm the initiator can open."""
        held, attack.held = attack.held, None
        if held is None or held.reveal is None:
            return []
        toward_initiator = Responder(
            held.identity,
            held.probe.call_id,
            _offered(held.commit),
            held.randomness.replay(),
            name=responder_name,
        )
        toward_initiator.receive(held.commit)
        replies = [(held.peer, reply) for reply in toward_initiator.receive(held.reveal)]
        leg = attack.legs[held.peer] = _Leg(toward_initiator)
        leg.done.set()
        attack.events.append("keyswap-leg-done")
        return replies

    def _identity(self) -> IdentityKey:
        return IdentityKey.generate(self._random_bytes)

    def _follow_rekey(self, attack: RoomAttack, sender: PeerId, received: Received) -> None:
        if attack.relay is None or attack.offerer is None:
            return
        attack.relay.key_update(received.keys, from_offerer=sender == attack.offerer)

    async def _rewrite_sdp(self, attack: RoomAttack, sender: PeerId, message: Any) -> Any:
        """The hub's own SDP in place of an offer or answer; anything else unchanged."""
        kind = _type(message)
        sdp = message.get("sdp") if kind in SDP_TYPES else None
        if not isinstance(sdp, str):
            return message
        if kind == "offer":
            if attack.mitm is not None:
                return message  # one call per room: a second offer goes through untouched
            attack.offerer = sender
            if attack.legs:
                answerer = next(peer for peer in attack.legs if peer != sender)
                attack.relay = SFrameRelay(attack.legs[sender].result, attack.legs[answerer].result)
            transform: RelayTransform | None = attack.relay
            if Capability.TAMPER in self.capabilities:
                plan = self.tamper_plan
                transform = attack.media_tamper = MediaTamper(
                    attack.relay,
                    period=plan.media_period,
                    replay=plan.replay,
                    alter=plan.alter,
                    drop=plan.drop_media,
                )
            attack.mitm = MediaMitm(relay_transform=transform)
            rewritten = await attack.mitm.intercept_offer(sdp)
        else:
            if attack.mitm is None:
                return message
            rewritten = await attack.mitm.intercept_answer(sdp)
        attack.events.append(f"{kind}-rewritten")
        return {**message, "sdp": rewritten}

    def _tampered(self, deliveries: list[Delivery]) -> list[Delivery]:
        if Capability.TAMPER not in self.capabilities:
            return deliveries
        plan = self.tamper_plan
        result: list[Delivery] = []
        for delivery in deliveries:
            relayed = delivery.message
            if not isinstance(relayed, RelayFrom):
                result.append(delivery)  # the core's own messages: welcomes, errors, peer events
                continue
            message = _decode(relayed.payload)
            if _type(message) in plan.drop_types:
                self.tampered.dropped += 1
                continue
            result.append(delivery)
            if not _sealed(message) or _in_setup(message):
                continue
            copies = []
            if plan.replay:
                self.tampered.replayed += 1
                copies.append(relayed.payload)
            forged = altered(message) if plan.alter else None
            if forged is not None:
                self.tampered.altered += 1
                copies.append(_encode(forged))
            result += [
                Delivery(delivery.recipient, RelayFrom(relayed.sender, copy), delivery.room)
                for copy in copies
            ]
        return result
