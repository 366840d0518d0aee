"""Sender keys for group calls: RFC 9605 section 5.1 over blindhub's sealed channels.

Each member of a group call encrypts its frames under its own SFrame key, a ``SenderKey``:
a base key at a (generation, ratchet step), whose KID is

    KID = (generation << RATCHET_BITS) | (step % 2**RATCHET_BITS)        (RFC 9605 5.1)

The member hands its key to every other member it has authenticated, over the pairwise
sealed channel (crypto/sealed.py, ``seal_sender_key``). When someone joins, the sender
ratchets (``ratcheted()``: the next step, from which the previous base key cannot be
computed) and gives the joiner only the new step, so the joiner cannot read what was sent
before; when someone leaves, it starts a fresh generation (``fresh()``) that the leaver never
gets. Receivers follow the ratchet by themselves: the KID of each frame announces the step.

Like ``MediaKey``, a ``SenderKey`` keeps its base key inside: no getter, no pickling, a repr
without it. docs/reference/sframe.md (Sender keys) and docs/reference/key-agreement.md
(Sender keys) are the specification.
"""

import hmac
import os
from collections.abc import Callable
from typing import Final, final

from crypto.frame_crypto import MediaKey
from crypto.sframe import (
    CipherSuite,
    SFrameUsageError,
    ratchet_base_key,
    sender_key_kid,
)

# R of RFC 9605 section 5.1: the low 8 bits of the KID carry the ratchet step. A receiver reads
# a step as ahead only within half of the 2**8 values (see MAX_RATCHET_STEPS), which is far more
# than the steps a sender takes between two of its frames (one per join). 8 bits keep the KID of
# generation 0 in the one-byte header for steps 0-7 and every KID below 2**39 in 5 bytes.
RATCHET_BITS: Final = 8
STEP_MASK: Final = (1 << RATCHET_BITS) - 1
# Generations (one per leave) and steps (one per join) are counted in sealed JSON, whose
# integers every implementation reads exactly below 2**53; 2**31 of each outlasts any call.
MAX_GENERATION: Final = 2**31
MAX_STEP: Final = 2**31

RandomBytes = Callable[[int], bytes]


@final
class SenderKey:
    """One sender's SFrame key at (generation, step): its base key stays inside.

    The base key is ``suite.nh`` bytes (the size the ratchet produces). Only this module and
    the sealed ``sender-key`` message consume it: there is no attribute or method that returns
    it to a caller, the repr shows suite, generation, step and KID only, a copy is the object
    itself and pickling is refused. Two keys are equal if suite, generation, step and base key
    are (the base key compared in constant time).
    """

    __slots__ = ("__base_key", "_generation", "_kid", "_step", "_suite")

    def __init__(self, suite: CipherSuite, generation: int, step: int, base_key: bytes) -> None:
        try:
            suite = CipherSuite(suite)
        except ValueError:
            raise SFrameUsageError("unknown SFrame cipher suite") from None
        if type(generation) is not int or not 0 <= generation <= MAX_GENERATION:
            raise SFrameUsageError(f"a key generation is an integer from 0 to {MAX_GENERATION}")
        if type(step) is not int or not 0 <= step <= MAX_STEP:
            raise SFrameUsageError(f"a ratchet step is an integer from 0 to {MAX_STEP}")
        if len(base_key) != suite.nh:
            raise SFrameUsageError(f"a {suite.name} sender key is {suite.nh} bytes")
        self._suite: Final = suite
        self._generation: Final = generation
        self._step: Final = step
        self._kid: Final = sender_key_kid(generation, step, RATCHET_BITS)
        self.__base_key: Final = bytes(base_key)

    @classmethod
    def fresh(
        cls, suite: CipherSuite, generation: int, *, random_bytes: RandomBytes = os.urandom
    ) -> "SenderKey":
        """A new random base key (``suite.nh`` bytes) at step 0 of ``generation``."""
        return cls(suite, generation, 0, random_bytes(CipherSuite(suite).nh))

    def ratcheted(self) -> "SenderKey":
        """The next step of this generation: RFC 9605 section 5.1's ratchet,
        ``base_key[n+1] = HKDF-Expand(HKDF-Extract("", base_key[n]), "SFrame 1.0 Ratchet", Nh)``.
        The previous base key cannot be computed from the result."""
        if self._step == MAX_STEP:
            raise SFrameUsageError("no ratchet steps left in this generation; start a fresh one")
        return SenderKey(
            self._suite,
            self._generation,
            self._step + 1,
            ratchet_base_key(self._suite, self.__base_key),
        )

    @property
    def suite(self) -> CipherSuite:
        return self._suite

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def step(self) -> int:
        return self._step

    @property
    def kid(self) -> int:
        return self._kid

    def media_key(self) -> MediaKey:
        """This key for ``SFrameSender.use_key`` (whose suite must be this key's); its epoch
        is the generation."""
        return MediaKey(self._generation, self._kid, self.__base_key)

    def _sealable_base_key(self) -> bytes:
        """The base key, for the ``sender-key`` message only (crypto/messages.py), whose
        encoding goes straight into a sealed channel's ciphertext, and for this module."""
        return self.__base_key

    def __repr__(self) -> str:
        return (
            f"SenderKey(suite={self._suite.name}, generation={self._generation}, "
            f"step={self._step}, kid={self._kid})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SenderKey):
            return NotImplemented
        return (self._suite, self._generation, self._step) == (
            other._suite,
            other._generation,
            other._step,
        ) and hmac.compare_digest(self.__base_key, other.__base_key)

    def __hash__(self) -> int:
        return hash((self._suite, self._generation, self._step))

    def __copy__(self) -> "SenderKey":
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, object]) -> "SenderKey":
        return self

    def __reduce__(self) -> str | tuple[object, ...]:
        # A pickle would carry the base key out of the process in the clear.
        raise TypeError("a SenderKey cannot be pickled")
