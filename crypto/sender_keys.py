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

import hashlib
import hmac
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, NamedTuple, Protocol, final

from crypto.errors import LocalError, RemoteError
from crypto.frame_crypto import DEFAULT_SUITE, FrameCounters, MediaKey
from crypto.identity import IdentityPublicKey, decimal_groups
from crypto.sframe import (
    DEFAULT_REPLAY_WINDOW,
    CipherSuite,
    ReceiveContext,
    SFrameError,
    SFrameHeader,
    SFrameUsageError,
    UnknownKeyError,
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
# How many ratchet steps ahead of the newest it knows a receiver follows for one frame. A
# sender ratchets once per join and may skip steps when several members join before it switches
# (the group session switches within 0.5 s of a change); 16 is far above that, keeps the
# work a forged KID can cause to 16 cached derivations, and stays below 2**(RATCHET_BITS - 1),
# so a KID behind the newest step is never read as ahead.
MAX_RATCHET_STEPS: Final = 16
# Superseded steps of a generation whose keys a receiver keeps for late frames (audio and video
# of one sender travel apart, so frames under the previous step arrive after the first under
# the next); enough for several joins in a row.
MAX_OLD_STEPS: Final = 4
# Frames held per kind while their key is on its way: 64 is 1.3 s of 50 fps audio and 2 s of
# 30 fps video, above the 0.5 s after which a sender switches without every ack, and bounds
# what a flood of frames under unknown generations can make a receiver keep.
MAX_HELD_FRAMES: Final = 64

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


# -- receiving: one remote sender ----------------------------------------------------------------


class SenderKeyRejected(SFrameError, RemoteError):
    """A sender key that does not fit what this receiver holds: another suite, a generation
    already retired or older than the newest, or a second, different key of a known generation.
    A sender hands out one key per generation, in order; this one is not from an honest one."""


@dataclass
class SenderKeyCounters(FrameCounters):
    """``FrameCounters`` of one kind of a ``SenderKeyReceiver``, plus what waiting for keys did.

    ``held``: frames kept because their generation's key had not arrived; each later ends in
    ``released`` (decrypted when its key came: also counted in ``frames``), ``expired`` (still
    held when the caller's hold window ended), ``overflowed`` (pushed out by newer held frames,
    oldest first), ``before_join`` or a failure. ``before_join``: frames under a generation or
    step older than the first key this receiver got (sent before we joined; never failures).
    ``generations``: the generations under which frames of this kind decrypted.
    """

    held: int = 0
    released: int = 0
    expired: int = 0
    overflowed: int = 0
    before_join: int = 0
    generations: set[int] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | {"generations": sorted(self.generations)}


class _Chain:
    """One generation of the sender, as far as this receiver has followed it: the newest step
    whose key it holds, that step's base key, the next steps' base keys derived so far (so a
    forged KID costs no derivation twice) and the KIDs of the superseded steps it still keeps."""

    __slots__ = ("ahead", "base_key", "old_kids", "step")

    def __init__(self, step: int, base_key: bytes) -> None:
        self.step = step
        self.base_key = base_key
        self.ahead: list[bytes] = []
        self.old_kids: deque[int] = deque()

    def __repr__(self) -> str:
        return f"<sender-key chain step={self.step}>"


class ReleasedFrame(NamedTuple):
    """A held frame that decrypted once its key came: its kind, plaintext and the caller's tag
    (for example where and when it arrived, to pass it to the decoder late)."""

    kind: str
    plaintext: bytes
    tag: object = None


class HoldingFrameTransform(Protocol):
    """A receiver's frame transform that may hold a frame: ``tag`` comes back with it when it is
    released."""

    def __call__(self, frame: bytes, tag: object = None, /) -> bytes | None: ...


class _Kind:
    """One kind of media (audio, video) of the sender: its own receive context, so a key's first
    use is heard per kind, with the kind bound as SFrame metadata as ``SFrameSender`` does."""

    __slots__ = ("context", "counters", "held", "metadata", "on_failure")

    def __init__(self, kind: str, context: ReceiveContext) -> None:
        self.context = context
        self.counters = SenderKeyCounters()
        self.metadata = kind.encode()
        self.on_failure: Callable[[SFrameError], None] | None = None
        self.held: deque[tuple[int, bytes, object]] = deque()  # (arrival number, frame, tag)


class SenderKeyReceiver:
    """Decrypts the frames of one remote sender in a group call, under its sender keys.

    ``add_key`` installs each key the sender hands us (through the sealed channel). Frames under
    a later ratchet step of a known generation are followed (at most ``MAX_RATCHET_STEPS``
    ahead; the derived key is kept only once a frame under it authenticates, so a forged header
    cannot make the receiver ratchet). Frames under a generation newer than every key held are
    held (``MAX_HELD_FRAMES`` per kind, oldest dropped first) until ``add_key`` releases them
    or ``expire_held`` ends their wait: a key that is late costs a short delay, never a failure.
    Frames older than the first key we got were sent before we joined: dropped, counted as
    ``before_join``. Everything else that does not decrypt fails closed, as in
    ``SFrameReceiver``: dropped, counted by reason, reported to ``on_failure``.
    """

    def __init__(
        self, suite: CipherSuite = DEFAULT_SUITE, *, replay_window: int = DEFAULT_REPLAY_WINDOW
    ) -> None:
        self._suite = CipherSuite(suite)
        self._replay_window = replay_window
        ReceiveContext(self._suite, replay_window)  # checks both arguments now
        self._kinds: dict[str, _Kind] = {}
        self._chains: dict[int, _Chain] = {}  # generation -> its newest step
        self._keys: dict[int, bytes] = {}  # KID -> base key, every key installed
        self._join: tuple[int, int] | None = None  # (generation, step) of the first key
        self._newest_generation = -1
        self._retired_below = 0
        self._arrivals = 0  # numbers held frames, so releases keep their arrival order

    @property
    def suite(self) -> CipherSuite:
        return self._suite

    @property
    def kids(self) -> frozenset[int]:
        """The KIDs this receiver holds keys for."""
        return frozenset(self._keys)

    @property
    def counters(self) -> dict[str, SenderKeyCounters]:
        return {kind: state.counters for kind, state in self._kinds.items()}

    def __repr__(self) -> str:
        return (
            f"SenderKeyReceiver(suite={self._suite.name}, kids={sorted(self._keys)}, "
            f"held={sum(len(state.held) for state in self._kinds.values())})"
        )

    def __reduce__(self) -> str | tuple[object, ...]:
        # It keeps the base keys as bytes: a pickle would carry them out in the clear.
        raise TypeError("a SenderKeyReceiver cannot be pickled")

    # -- keys

    def add_key(self, key: SenderKey) -> list[ReleasedFrame]:
        """Install the sender's ``key``; return the held frames that now decrypt, in the order
        they arrived, each with the tag the caller gave it. The same key again changes nothing;
        a key that does not fit raises ``SenderKeyRejected`` (and changes nothing)."""
        generation, step = key.generation, key.step
        if key.suite is not self._suite:
            raise SenderKeyRejected(f"a {key.suite.name} key for a {self._suite.name} receiver")
        chain = self._chains.get(generation)
        if chain is not None:
            if chain.step == step and hmac.compare_digest(chain.base_key, key._sealable_base_key()):
                return []
            raise SenderKeyRejected(f"a second key for generation {generation}")
        if generation < self._retired_below or generation <= self._newest_generation:
            raise SenderKeyRejected(f"generation {generation} is older than the newest held")
        self._chains[generation] = _Chain(step, key._sealable_base_key())
        self._install(key.kid, key._sealable_base_key())
        self._newest_generation = generation
        if self._join is None:
            self._join = (generation, step)
        return self._release()

    def retire_generations_below(self, generation: int) -> None:
        """Forget every key of the generations below ``generation`` (their grace is over):
        frames under them fail from now on (``unknown_key``)."""
        for old in [g for g in self._chains if g < generation]:
            chain = self._chains.pop(old)
            for kid in (*chain.old_kids, sender_key_kid(old, chain.step, RATCHET_BITS)):
                self._uninstall(kid)
        self._retired_below = max(self._retired_below, generation)

    def expire_held(self, kind: str) -> int:
        """Drop the frames of ``kind`` still waiting for a key (their hold window is over);
        return how many."""
        state = self._kinds.get(kind)
        if state is None:
            return 0
        count = len(state.held)
        state.held.clear()
        state.counters.expired += count
        return count

    def _install(self, kid: int, base_key: bytes, *, present: _Kind | None = None) -> None:
        """Add a key to every kind's context but ``present``'s, which already holds it."""
        self._keys[kid] = base_key
        for kind, state in self._kinds.items():
            if state is not present:
                state.context.add_key(kid, base_key, on_first_use=self._first_use(kind))

    def _uninstall(self, kid: int) -> None:
        del self._keys[kid]
        for state in self._kinds.values():
            state.context.remove_key(kid)

    def _first_use(self, kind: str) -> Callable[[int], None]:
        return partial(self._record_generation, self._kinds[kind].counters.generations)

    @staticmethod
    def _record_generation(generations: set[int], kid: int) -> None:
        generations.add(kid >> RATCHET_BITS)

    # -- frames

    def transform(
        self, kind: str, on_failure: Callable[[SFrameError], None] | None = None
    ) -> HoldingFrameTransform:
        """The frame transform for the sender's ``kind`` stream; ``on_failure`` hears of each
        frame that fails (not of those held, expired or sent before we joined)."""
        state = self._kinds.get(kind)
        if state is None:
            state = self._kinds[kind] = _Kind(
                kind, ReceiveContext(self._suite, self._replay_window)
            )
            for kid, base_key in self._keys.items():
                state.context.add_key(kid, base_key, on_first_use=self._first_use(kind))
        state.on_failure = on_failure
        unprotect_with_key = state.context.unprotect
        counters, metadata = state.counters, state.metadata
        without_key = self._without_key

        # Runs once a frame in the event loop: the path of a frame whose key is held is the
        # same as SFrameReceiver's (one context call, inline counting); the rest is rare.
        def unprotect(frame: bytes, tag: object = None) -> bytes | None:
            try:
                plaintext = unprotect_with_key(frame, metadata)
            except UnknownKeyError:
                return without_key(state, frame, None, tag)
            except SFrameError as error:
                _failed(state, error)
                return None
            counters.frames += 1
            counters.plaintext_bytes += len(plaintext)
            counters.ciphertext_bytes += len(frame)
            return plaintext

        return unprotect

    def authenticates(self, kind: str, frame: bytes) -> bool:
        """Whether a key this receiver already uses for ``kind`` authenticates ``frame``, with
        nothing done: no replay window moves, nothing is held, followed or counted. For a frame
        whose sender is in doubt (the hub may put one member's frames on another's slot, and a
        slot it just gave another member may still deliver the previous one's last frames):
        it belongs to whoever's key authenticates it."""
        state = self._kinds.get(kind)
        return state is not None and state.context.authenticates(frame, state.metadata)

    def _without_key(
        self, state: _Kind, frame: bytes, arrival: int | None, tag: object
    ) -> bytes | None:
        """A frame whose KID has no key installed (``arrival`` is set for a held frame tried
        again): follow the ratchet, hold it, or drop it as sent before we joined, or as failed."""
        counters = state.counters
        try:
            kid = SFrameHeader.parse(frame)[0].kid
            if self._join is None or kid >> RATCHET_BITS > self._newest_generation:
                self._hold(state, frame, arrival, tag)
                return None
            if self._before_join(kid):
                counters.before_join += 1
                return None
            plaintext = self._ratchet(state, kid, frame)
        except SFrameError as error:
            _failed(state, error)
            return None
        return _decrypted(counters, frame, plaintext)

    def _hold(self, state: _Kind, frame: bytes, arrival: int | None, tag: object) -> None:
        if arrival is None:
            arrival, self._arrivals = self._arrivals, self._arrivals + 1
            state.counters.held += 1
        state.held.append((arrival, frame, tag))
        if len(state.held) > MAX_HELD_FRAMES:
            state.held.popleft()
            state.counters.overflowed += 1

    def _before_join(self, kid: int) -> bool:
        assert self._join is not None  # the caller's check
        join_generation, join_step = self._join
        generation = kid >> RATCHET_BITS
        if generation != join_generation:
            return generation < join_generation
        chain = self._chains.get(generation)
        if chain is None:
            return False  # retired: a late frame
        # The KID's step read as behind the newest one we know (by less than half the step
        # space; more is a step ahead).
        behind = (chain.step - kid) & STEP_MASK
        return behind < 1 << (RATCHET_BITS - 1) and chain.step - behind < join_step

    def _ratchet(self, state: _Kind, kid: int, frame: bytes) -> bytes:
        """Decrypt ``frame`` under a later step of its generation; adopt that step only if the
        frame authenticates (RFC 9605 section 5.1: the receiver ratchets as the KID shows)."""
        generation = kid >> RATCHET_BITS
        chain = self._chains.get(generation)
        if chain is None:
            raise UnknownKeyError(f"no key for KID {kid}")
        ahead = (kid - chain.step) & STEP_MASK
        if not 0 < ahead <= MAX_RATCHET_STEPS:
            raise UnknownKeyError(f"no key for KID {kid}")
        while len(chain.ahead) < ahead:
            chain.ahead.append(ratchet_base_key(self._suite, (chain.base_key, *chain.ahead)[-1]))
        base_key = chain.ahead[ahead - 1]
        state.context.add_key(kid, base_key)
        try:
            plaintext = state.context.unprotect(frame, state.metadata)
        except SFrameError:
            state.context.remove_key(kid)
            raise
        # Adopted. This kind's context keeps the key it authenticated with (and so its replay
        # window); the other kinds get it now. The steps skipped on the way stay as old steps
        # too: the sender used them, and their frames may still be on their way (audio and
        # video travel apart, and one frame under a later step can overtake them).
        state.counters.generations.add(generation)
        chain.old_kids.append(sender_key_kid(generation, chain.step, RATCHET_BITS))
        for skipped in range(1, ahead):
            skipped_kid = sender_key_kid(generation, chain.step + skipped, RATCHET_BITS)
            self._install(skipped_kid, chain.ahead[skipped - 1])
            chain.old_kids.append(skipped_kid)
        chain.step += ahead
        chain.base_key = base_key
        del chain.ahead[:ahead]
        self._install(kid, base_key, present=state)
        while len(chain.old_kids) > MAX_OLD_STEPS:
            self._uninstall(chain.old_kids.popleft())
        return plaintext

    def _release(self) -> list[ReleasedFrame]:
        released: list[tuple[int, ReleasedFrame]] = []
        for kind, state in self._kinds.items():
            waiting, state.held = state.held, deque()
            for arrival, frame, tag in waiting:
                plaintext = self._retry(state, frame, arrival, tag)
                if plaintext is not None:
                    state.counters.released += 1
                    released.append((arrival, ReleasedFrame(kind, plaintext, tag)))
        released.sort(key=lambda entry: entry[0])
        return [frame for _, frame in released]

    def _retry(self, state: _Kind, frame: bytes, arrival: int, tag: object) -> bytes | None:
        try:
            plaintext = state.context.unprotect(frame, state.metadata)
        except UnknownKeyError:
            return self._without_key(state, frame, arrival, tag)
        except SFrameError as error:
            _failed(state, error)
            return None
        return _decrypted(state.counters, frame, plaintext)


# The per-frame transform inlines these two (a call costs a few percent of a frame there).


def _decrypted(counters: SenderKeyCounters, frame: bytes, plaintext: bytes) -> bytes:
    counters.frames += 1
    counters.plaintext_bytes += len(plaintext)
    counters.ciphertext_bytes += len(frame)
    return plaintext


def _failed(state: _Kind, error: SFrameError) -> None:
    state.counters.reject(error)
    if state.on_failure is not None:
        state.on_failure(error)


# -- the group security code -------------------------------------------------------------------

GROUP_CODE_LABEL: Final = b"blindhub-v2 group security code"
# 30 digits (99 bits) in 6 groups of 5, read aloud once for the whole group. A hub that puts
# members of its own into two different views chooses their keys and generations, so it can
# search for two views with one code: a birthday search, about 2**50 tries for 99 bits (2**33
# for 20 digits would be within reach of a determined operator).
GROUP_CODE_DIGITS: Final = 30
# Each try also costs 5,200 hashes, as the safety number's (crypto/identity.py): 2**62 in all.
GROUP_CODE_ITERATIONS: Final = 5200
# The generation field of a member whose sender key has not reached us: no generation has it.
# Such a member holds our key, so it must count in the code all the same; left out, a screen
# that lists it would show the code of one that does not.
GROUP_CODE_NO_KEY: Final = 2**64 - 1


def group_security_code(members: Iterable[tuple[IdentityPublicKey, int | None]]) -> str:
    """The code every member of a group call shows: the same exactly when the same identity
    keys, each with the same current sender-key generation, are in the call (ours included).
    A member listed with generation None is one whose key we do not hold yet.

    Order-independent (sorted by identity key bytes) and domain-separated::

        d_0 = SHA-256(GROUP_CODE_LABEL || count (4 bytes) || key_1 || generation_1 (8 bytes)
                      || ... || key_n || generation_n (8 bytes))
        d_i+1 = SHA-256(d_i || d_0), 5,200 times; the code is 30 digits of d_5200 in groups of 5

    where a generation None is written as ``GROUP_CODE_NO_KEY``.
    """
    listed = [(key.raw, generation) for key, generation in members]
    if len({raw for raw, _ in listed}) != len(listed):
        raise LocalError("each member of a group security code is listed once")
    if any(
        g is not None and (type(g) is not int or not 0 <= g <= MAX_GENERATION) for _, g in listed
    ):
        raise LocalError(f"a key generation is an integer from 0 to {MAX_GENERATION}, or None")
    entries = sorted((raw, GROUP_CODE_NO_KEY if g is None else g) for raw, g in listed)
    transcript = (
        GROUP_CODE_LABEL
        + len(entries).to_bytes(4, "big")
        + b"".join(raw + generation.to_bytes(8, "big") for raw, generation in entries)
    )
    first = digest = hashlib.sha256(transcript).digest()
    for _ in range(GROUP_CODE_ITERATIONS):
        digest = hashlib.sha256(digest + first).digest()
    return decimal_groups(digest, GROUP_CODE_DIGITS)
