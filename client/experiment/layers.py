"""EXPERIMENT ONLY: peers with fewer protection layers, for the interception experiment's cells.

The product has one call assembly (``client.call.CallParts()``): SFrame on every frame, keys from
the signed key agreement with the real identity, the pin check and sealed signalling. The
experiment shows what each layer is worth by taking layers away, and it does so here, by
composing weaker sessions and frame protections that no product module constructs (the import
contracts in pyproject.toml forbid product modules to import this package):

- ``PLAIN``: no SFrame and unsealed signalling (the control; media is protected by DTLS-SRTP
  alone, which a hub in the media path terminates).
- ``SFRAME``: SFrame under keys from an unauthenticated exchange (throwaway identities),
  signalling not sealed.
- ``SEALED``: plus the signed key agreement with the real identities and sealed signalling, but
  no pin check and nobody compares the SAS.
- ``VERIFIED``: plus pinned identities and the SAS: the product itself.

A group call (``client.group_call.GroupCall``) has three of these: ``VERIFIED``, the product's
``GroupParts()`` with pinned identities; ``SEALED``, the same with identities nobody pinned
(``--verify tofu``); and ``PLAIN``, whose members still run the key agreements and hand each
other sender keys but send and accept every frame in the clear (the routed cells' control).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from client.call import CallParts
from client.frame_transform import FrameTransform
from client.group_call import GroupParts
from client.session import (
    Action,
    CallFailed,
    CallSession,
    ProtectionState,
    Send,
    SessionConfig,
    SessionState,
)
from crypto.frame_crypto import FrameCounters, KeyUpdate, MediaKey, SFrameSender
from crypto.handshake import HandshakeResult
from crypto.identity import IdentityKey, IdentityPublicKey
from crypto.sealed import SealedChannel
from crypto.sender_keys import HoldingFrameTransform, ReleasedFrame, SenderKey, SenderKeyReceiver
from crypto.sframe import CipherSuite, SFrameError


class Layers(enum.Enum):
    """Which protections a peer applies; see the module docstring."""

    PLAIN = "plain"
    SFRAME = "sframe"
    SEALED = "sealed"
    VERIFIED = "verified"

    @property
    def encrypts_frames(self) -> bool:
        return self is not Layers.PLAIN

    @property
    def seals_signalling(self) -> bool:
        return self in (Layers.SEALED, Layers.VERIFIED)

    def parts(self) -> CallParts:
        """The call assembly for these layers (``VERIFIED``: the product's)."""
        if self is Layers.VERIFIED:
            return CallParts()
        if self is Layers.PLAIN:
            return CallParts(session=_PlainSession.make, frames=NoFrameProtection)
        session = _UnsealedSession if self is Layers.SFRAME else _UncheckedSession
        return CallParts(session=session.make)

    def group_parts(self) -> GroupParts:
        """The group call's frame protection for these layers: ``PLAIN``, or the product's for
        ``SEALED`` (the members then accept unpinned keys, ``--verify tofu``, and nobody
        compares the security code) and ``VERIFIED``."""
        if self is Layers.PLAIN:
            return GroupParts(sender=PlainGroupSender, receiver=PlainGroupReceiver)
        if self in (Layers.SEALED, Layers.VERIFIED):
            return GroupParts()
        raise ValueError(f"a group call has no {self.value} layers")


class CellScenario:
    """What the scenario of every cell says, two-party or routed: its layers (``layers``), the
    name of what the hub does (``attack_name``), and from these its name and whether it is the
    control."""

    layers: Layers

    @property
    def attack_name(self) -> str:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return f"{self.layers.value} x {self.attack_name}"

    @property
    def is_control(self) -> bool:
        return self.layers is Layers.PLAIN


class _WeakerSession(CallSession):
    layers: Layers

    @classmethod
    def make(cls, config: SessionConfig, initiator: bool, now: float) -> CallSession:
        return cls(config, initiator=initiator, now=now)

    def _peer_check(self) -> Callable[[str, IdentityPublicKey], object] | None:
        return None  # nobody's identity is checked below VERIFIED, so nothing is pinned

    def _asks_sas(self, protection: ProtectionState) -> bool:
        return False


class _UncheckedSession(_WeakerSession):
    """``SEALED``: the real identities sign, signalling is sealed; no pin, no SAS compared."""

    layers = Layers.SEALED

    def _protection_of(self, result: HandshakeResult) -> ProtectionState:
        return ProtectionState(
            end_to_end_encrypted=True,
            suite=result.suite.name,
            peer_name=result.peer_name,
            sas=result.sas,
            layers=self.layers.value,
        )


class _UnsealedSession(_WeakerSession):
    """``SFRAME``: keys from throwaway identities; signalling in clear."""

    layers = Layers.SFRAME

    def _agreement_identity(self) -> IdentityKey:
        # Fresh identities nobody is accountable for: the experiment's unauthenticated exchange.
        return IdentityKey.generate(self.config.random_bytes)

    def _signalling_channel(self, result: HandshakeResult) -> SealedChannel | None:
        return None

    def _protection_of(self, result: HandshakeResult) -> ProtectionState:
        # The identities are throwaway, so the SAS would mean nothing: none is shown.
        return ProtectionState(
            end_to_end_encrypted=True,
            suite=result.suite.name,
            peer_name=result.peer_name,
            layers=self.layers.value,
        )

    def _seal(self, content: dict[str, Any]) -> dict[str, Any]:
        return content

    def _open_setup(self, payload: object) -> object:
        return payload


class _PlainSession(_UnsealedSession):
    """``PLAIN``: no key agreement at all; the names go in a clear hello, unchecked."""

    layers = Layers.PLAIN

    def start(self, now: float) -> list[Action]:
        return [Send({"type": "hello", "name": self.config.name})]

    def receive(self, payload: object, now: float) -> list[Action]:
        if self.state is not SessionState.KEY_AGREEMENT:
            return super().receive(payload, now)
        if not isinstance(payload, dict) or payload.get("type") != "hello":
            return self._fail(CallFailed("expected the peer's hello"))
        name = payload.get("name")
        if not isinstance(name, str) or not name:
            return self._fail(CallFailed("the peer's hello carries no name"))
        self.peer_name = name
        self.protection = ProtectionState(
            end_to_end_encrypted=False, suite=None, peer_name=name, layers=self.layers.value
        )
        return self._accept(now)

    def _initial_keys(self) -> list[Action]:
        return []


class NoFrameProtection:
    """``PLAIN``'s frames: no transform at all, as plain aiortc sends them."""

    send_kid = None

    def install(
        self, suite: CipherSuite, update: KeyUpdate, on_first_use: Callable[[int], None]
    ) -> None:
        raise AssertionError("a plain call has no keys")

    def retire(self, kids: frozenset[int]) -> None:
        pass

    def transforms(
        self, kind: str, on_failure: Callable[[], None]
    ) -> tuple[FrameTransform, FrameTransform] | None:
        return None

    def counters(self, kind: str) -> tuple[FrameCounters, FrameCounters]:
        return FrameCounters(), FrameCounters()


class PlainGroupSender(SFrameSender):
    """``PLAIN`` in a group call: every frame leaves as the encoder made it, once a sender key
    exists (as in the product, nothing is sent before the first member is keyed)."""

    def use_key(self, key: MediaKey) -> None:
        pass  # the key is never used

    def transform(self, kind: str) -> FrameTransform:
        counters = self.counters.setdefault(kind, FrameCounters())

        def clear(frame: bytes) -> bytes:
            counters.frames += 1
            counters.plaintext_bytes += len(frame)
            counters.ciphertext_bytes += len(frame)
            return frame

        return clear


class PlainGroupReceiver(SenderKeyReceiver):
    """``PLAIN`` in a group call: every frame goes to the decoder as it came, whoever made it."""

    def add_key(self, key: SenderKey) -> list[ReleasedFrame]:
        return []  # nothing is ever held for a key

    def transform(
        self, kind: str, on_failure: Callable[[SFrameError], None] | None = None
    ) -> HoldingFrameTransform:
        super().transform(kind, on_failure)  # makes the kind's counters
        counters = self.counters[kind]

        def clear(frame: bytes, tag: object = None) -> bytes:
            counters.frames += 1
            counters.plaintext_bytes += len(frame)
            counters.ciphertext_bytes += len(frame)
            return frame

        return clear
