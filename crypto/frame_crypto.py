"""SFrame on one media sender or receiver: the frame transforms a call installs, with counters.

Fail closed by construction: a sender without a key returns None (the frame is not sent) and
a receiver returns None for any frame that does not decrypt (nothing undecrypted reaches the
decoder), counting the failure and reporting it so that the caller can ask for a keyframe.
Pure and synchronous; keys come from the key agreement, never from here.

Keys travel as ``MediaKey`` objects, whose base key no code outside this module can read:
the key agreement (crypto/handshake.py) and every rekey (crypto/sealed.py) yield a
``KeyUpdate``, and ``apply_key_update`` is the one way a caller installs it.
"""

import hmac
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Final, final

from crypto.sframe import (
    AuthenticationError,
    CipherSuite,
    ReceiveContext,
    ReplayError,
    SendContext,
    SFrameError,
    UnknownKeyError,
)

DEFAULT_SUITE = CipherSuite.AES_128_GCM_SHA256_128
FrameTransform = Callable[[bytes], bytes | None]
"""The same shape as client.frame_transform.FrameTransform (this module imports no aiortc)."""


@final
class MediaKey:
    """One sender's SFrame key of one epoch: its KID and a base key that stays inside.

    Only ``SFrameSender.use_key`` and ``SFrameReceiver.add_key`` consume the base key; there
    is no attribute or method that returns it, and the repr shows the epoch and KID only.
    Two keys are equal if epoch, KID and base key are (compared in constant time).
    """

    __slots__ = ("__base_key", "_epoch", "_kid")

    def __init__(self, epoch: int, kid: int, base_key: bytes) -> None:
        self._epoch: Final = epoch
        self._kid: Final = kid
        self.__base_key: Final = bytes(base_key)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def kid(self) -> int:
        return self._kid

    def __repr__(self) -> str:
        return f"MediaKey(epoch={self._epoch}, kid={self._kid})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MediaKey):
            return NotImplemented
        return (self._epoch, self._kid) == (other._epoch, other._kid) and hmac.compare_digest(
            self.__base_key, other.__base_key
        )

    def __hash__(self) -> int:
        return hash((self._epoch, self._kid))

    def __copy__(self) -> "MediaKey":
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, object]) -> "MediaKey":
        return self

    def __reduce__(self) -> str | tuple[object, ...]:
        # A pickle would carry the base key out of the process in the clear.
        raise TypeError("a MediaKey cannot be pickled")

    def _add_to(self, context: SendContext) -> None:
        context.add_key(self._kid, self.__base_key)

    def _add_to_receiver(
        self, context: ReceiveContext, on_first_use: Callable[[int], None] | None
    ) -> None:
        context.add_key(self._kid, self.__base_key, on_first_use=on_first_use)


@dataclass(frozen=True)
class KeyUpdate:
    """What the key agreement or a rekey asks of one party's SFrame sender and receiver.

    ``install_receive``: accept the peer's frames under this key from now on; keep the
    previous receive keys until the peer has switched (the first frame under the new key
    authenticates) and a short grace window has passed (frames in flight), then retire them.
    ``switch_send``: encrypt every frame from now on under this key (the peer holds it).
    The handshake's first update has both; a rekey's updates have one each, in the order
    that never makes a side send under a key its peer lacks (docs/reference/key-agreement.md,
    Rekey).
    """

    install_receive: MediaKey | None = None
    switch_send: MediaKey | None = None


@dataclass
class FrameCounters:
    """Per sender or receiver: frames through SFrame, failures (``failed``, the total, and by
    reason), and the bytes SFrame added."""

    frames: int = 0
    failed: int = 0
    replayed: int = 0  # a (KID, CTR) already accepted or older than the window: a replay
    unauthenticated: int = 0  # the tag did not match: altered, or not sealed for us
    unknown_key: int = 0
    malformed: int = 0  # no parsable SFrame header
    dropped_without_key: int = 0
    plaintext_bytes: int = 0
    ciphertext_bytes: int = 0

    @property
    def bytes_added(self) -> int:
        return self.ciphertext_bytes - self.plaintext_bytes

    def as_dict(self) -> dict[str, int]:
        return asdict(self) | {"bytes_added": self.bytes_added}

    def reject(self, error: SFrameError) -> None:
        """Count a frame that did not decrypt, under its reason."""
        self.failed += 1
        if isinstance(error, ReplayError):
            self.replayed += 1
        elif isinstance(error, AuthenticationError):
            self.unauthenticated += 1
        elif isinstance(error, UnknownKeyError):
            self.unknown_key += 1
        else:
            # ReceiveContext.unprotect raises only these four.
            self.malformed += 1


class SFrameSender:
    """Encrypts the frames of all of one peer's senders under its current KID.

    One SendContext for audio and video alike: the key agreement gives a peer one KID and
    base key per epoch, and only a shared context keeps their (key, CTR) pairs unique. The
    media kind is bound as SFrame metadata (RFC 9605 section 4.4.3), so a frame moved from
    one stream to the other fails to authenticate.
    """

    def __init__(self, suite: CipherSuite = DEFAULT_SUITE) -> None:
        self._context = SendContext(suite)
        self._kid: int | None = None
        self.counters: dict[str, FrameCounters] = {}

    @property
    def kid(self) -> int | None:
        return self._kid

    def use_key(self, key: MediaKey) -> None:
        """Send under ``key`` from the next frame on; the previous key is forgotten."""
        key._add_to(self._context)
        previous, self._kid = self._kid, key.kid
        if previous is not None:
            self._context.remove_key(previous)

    def transform(self, kind: str) -> FrameTransform:
        """The frame transform for this peer's ``kind`` sender."""
        counters = self.counters.setdefault(kind, FrameCounters())
        metadata = kind.encode()

        # Runs once a frame in the event loop's thread, with cold caches: the counting is
        # inline (no method call).
        def protect(frame: bytes) -> bytes | None:
            kid = self._kid
            if kid is None:
                counters.dropped_without_key += 1
                return None
            protected = self._context.protect(kid, frame, metadata)
            counters.frames += 1
            counters.plaintext_bytes += len(frame)
            counters.ciphertext_bytes += len(protected)
            return protected

        return protect

    def __repr__(self) -> str:
        return f"SFrameSender(kid={self._kid})"


class SFrameReceiver:
    """Decrypts the frames of all of one remote peer's senders; counts each frame it drops.

    One ReceiveContext, so that the anti-replay window spans both streams of the peer.
    """

    def __init__(self, suite: CipherSuite = DEFAULT_SUITE) -> None:
        self._context = ReceiveContext(suite)
        self.counters: dict[str, FrameCounters] = {}

    @property
    def kids(self) -> frozenset[int]:
        return self._context.kids

    def add_key(self, key: MediaKey, *, on_first_use: Callable[[int], None] | None = None) -> None:
        """Accept frames under ``key`` too (a KID already held raises ``ValueError``);
        ``on_first_use(kid)`` hears once when the first frame under it authenticates."""
        key._add_to_receiver(self._context, on_first_use)

    def remove_key(self, kid: int) -> None:
        self._context.remove_key(kid)

    def transform(
        self, kind: str, on_failure: Callable[[SFrameError], None] | None = None
    ) -> FrameTransform:
        """The frame transform for the ``kind`` receiver; ``on_failure`` hears of each drop."""
        counters = self.counters.setdefault(kind, FrameCounters())
        metadata = kind.encode()

        def unprotect(frame: bytes) -> bytes | None:  # inline counting, as in protect
            try:
                plaintext = self._context.unprotect(frame, metadata)
            except SFrameError as error:
                counters.reject(error)
                if on_failure is not None:
                    on_failure(error)
                return None
            counters.frames += 1
            counters.plaintext_bytes += len(plaintext)
            counters.ciphertext_bytes += len(frame)
            return plaintext

        return unprotect

    def __repr__(self) -> str:
        return f"SFrameReceiver(kids={sorted(self.kids)})"


def apply_key_update(
    update: KeyUpdate,
    sender: SFrameSender,
    receiver: SFrameReceiver,
    *,
    on_first_use: Callable[[int], None] | None = None,
) -> frozenset[int]:
    """Install ``update``; return the receive KIDs to retire once the peer has switched to the
    new one (``on_first_use`` tells when) and the grace window is over.

    The one path for every key of a call: epoch 0's (``HandshakeResult.initial_keys``, with
    nothing to retire) and each rekey's (``Received.keys``).
    """
    retire: frozenset[int] = frozenset()
    if update.install_receive is not None:
        retire = receiver.kids - {update.install_receive.kid}
        receiver.add_key(update.install_receive, on_first_use=on_first_use)
    if update.switch_send is not None:
        sender.use_key(update.switch_send)
    return retire
