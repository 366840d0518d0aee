"""SFrame on one media sender or receiver: the frame transforms a call installs, with counters.

Fail closed by construction: a sender without a key returns None (the frame is not sent) and
a receiver returns None for any frame that does not decrypt (nothing undecrypted reaches the
decoder), counting the failure and reporting it so that the caller can ask for a keyframe.
Pure and synchronous; keys come from the key agreement, never from here.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass

from crypto.sframe import CipherSuite, ReceiveContext, SendContext, SFrameError

DEFAULT_SUITE = CipherSuite.AES_128_GCM_SHA256_128


@dataclass
class FrameCounters:
    """Per sender or receiver: frames through SFrame, failures, and the bytes SFrame added."""

    frames: int = 0
    failed: int = 0
    dropped_without_key: int = 0
    plaintext_bytes: int = 0
    ciphertext_bytes: int = 0

    @property
    def bytes_added(self) -> int:
        return self.ciphertext_bytes - self.plaintext_bytes

    def as_dict(self) -> dict[str, int]:
        return asdict(self) | {"bytes_added": self.bytes_added}


class SFrameSender:
    """Encrypts every frame of one sender under its current KID; drops frames before a key."""

    def __init__(self, suite: CipherSuite = DEFAULT_SUITE) -> None:
        self._context = SendContext(suite)
        self._kid: int | None = None
        self.counters = FrameCounters()

    @property
    def kid(self) -> int | None:
        return self._kid

    def use_key(self, kid: int, base_key: bytes) -> None:
        """Send under ``kid`` from the next frame on; the previous key is forgotten."""
        self._context.add_key(kid, base_key)
        previous, self._kid = self._kid, kid
        if previous is not None:
            self._context.remove_key(previous)

    def __call__(self, frame: bytes) -> bytes | None:
        if self._kid is None:
            self.counters.dropped_without_key += 1
            return None
        protected = self._context.protect(self._kid, frame)
        self.counters.frames += 1
        self.counters.plaintext_bytes += len(frame)
        self.counters.ciphertext_bytes += len(protected)
        return protected

    def __repr__(self) -> str:
        return f"SFrameSender(kid={self._kid}, frames={self.counters.frames})"


class SFrameReceiver:
    """Decrypts every frame of one receiver; counts and reports each frame it must drop."""

    def __init__(
        self,
        suite: CipherSuite = DEFAULT_SUITE,
        on_failure: Callable[[SFrameError], None] | None = None,
    ) -> None:
        self._context = ReceiveContext(suite)
        self._on_failure = on_failure
        self.counters = FrameCounters()

    @property
    def kids(self) -> frozenset[int]:
        return self._context.kids

    def add_key(self, kid: int, base_key: bytes) -> None:
        self._context.add_key(kid, base_key)

    def remove_key(self, kid: int) -> None:
        self._context.remove_key(kid)

    def __call__(self, frame: bytes) -> bytes | None:
        try:
            plaintext = self._context.unprotect(frame)
        except SFrameError as error:
            self.counters.failed += 1
            if self._on_failure is not None:
                self._on_failure(error)
            return None
        self.counters.frames += 1
        self.counters.plaintext_bytes += len(plaintext)
        self.counters.ciphertext_bytes += len(frame)
        return plaintext

    def __repr__(self) -> str:
        return f"SFrameReceiver(kids={sorted(self.kids)}, frames={self.counters.frames})"
