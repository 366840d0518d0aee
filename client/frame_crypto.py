"""SFrame on one media sender or receiver: the frame transforms a call installs, with counters.

Fail closed by construction: a sender without a key returns None (the frame is not sent) and
a receiver returns None for any frame that does not decrypt (nothing undecrypted reaches the
decoder), counting the failure and reporting it so that the caller can ask for a keyframe.
Pure and synchronous; keys come from the key agreement, never from here.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass

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

    def use_key(self, kid: int, base_key: bytes) -> None:
        """Send under ``kid`` from the next frame on; the previous key is forgotten."""
        self._context.add_key(kid, base_key)
        previous, self._kid = self._kid, kid
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

    def add_key(self, kid: int, base_key: bytes) -> None:
        self._context.add_key(kid, base_key)

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
