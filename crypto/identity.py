"""Long-term identities: Ed25519 keys, fingerprints, safety numbers, key files, pins.

Everything here is a pure function or a plain data structure. Reading and writing
files (and choosing where they live) is the client's job, see client/identity_store.py;
this module owns the formats.

- A fingerprint is shown when one key must be named (e.g. on a pin mismatch).
- A safety number is compared by two people: it covers both keys, is the same on
  both ends, and carries ~116 bits per party so no one can grind a key to match.
- Key files are JSON, optionally sealed with a passphrase (Argon2id + XSalsa20-Poly1305).
- Known peers pin the first key seen for a name, like SSH's known_hosts; a new name that
  looks like a pinned one (crypto/names.py) is refused like a changed key.
"""

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing

from crypto import strict_json
from crypto.errors import LocalError, RemoteError
from crypto.names import MAX_NAME_LENGTH, check_normalized, looks_alike

PUBLIC_KEY_SIZE = 32
SEED_SIZE = 32
SIGNATURE_SIZE = 64

SAFETY_NUMBER_VERSION = 0
SAFETY_NUMBER_ITERATIONS = 5200
# 7 groups of 5 digits per party: 7 * log2(10^5) = 116.3 bits (Signal shows 6 groups, 99.7 bits).
SAFETY_NUMBER_GROUPS_PER_PARTY = 7
SAFETY_NUMBER_GROUP_BYTES = 5

KEY_FILE_KIND = "blindhub-identity"
KEY_FILE_VERSION = 1
KNOWN_PEERS_KIND = "blindhub-known-peers"
KNOWN_PEERS_VERSION = 1
# Key files are a few hundred bytes; anything much larger is not one of ours.
MAX_KEY_FILE_SIZE = 4096
MAX_KNOWN_PEERS_FILE_SIZE = 1 << 20
MAX_PEER_NAME_LENGTH = MAX_NAME_LENGTH
# Argon2id costs read back from a file are bounded, so a tampered file cannot make
# decoding allocate gigabytes or spin for hours.
MAX_ARGON2_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE
MAX_ARGON2_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE


class BadSignature(RemoteError):
    """A signature did not verify under the claimed identity key."""


class MalformedIdentityKey(RemoteError):
    """Bytes offered as an Ed25519 public key are not one."""


class PinnedIdentityMismatch(RemoteError):
    """A peer presented an identity key other than the one pinned for its name."""

    def __init__(
        self,
        name: str,
        pinned: "IdentityPublicKey",
        presented: "IdentityPublicKey",
        *,
        pinned_name: str | None = None,
    ) -> None:
        self.name = name
        self.pinned_name = name if pinned_name is None else pinned_name
        self.pinned = pinned
        self.presented = presented
        keys = f"pinned {pinned.fingerprint()}, presented {presented.fingerprint()}"
        if self.pinned_name == name:
            super().__init__(
                f"identity key for peer {name!r} changed: {keys}; the pin was not replaced"
            )
        else:
            super().__init__(
                f"peer name {name!r} looks like the pinned {self.pinned_name!r}: {keys}; "
                "refused as a changed key, and nothing was pinned"
            )


class ConfusableName(PinnedIdentityMismatch):
    """A peer's name is not pinned but looks like one that is (the same UTS #39 skeleton, case
    ignored): a hub swapping keys under ``bob`` spelt with a Cyrillic o (U+043E), or under
    ``Bob``, would otherwise get a fresh pin instead of this error."""

    def __init__(
        self,
        name: str,
        pinned_name: str,
        pinned: "IdentityPublicKey",
        presented: "IdentityPublicKey",
    ) -> None:
        super().__init__(name, pinned, presented, pinned_name=pinned_name)


class CorruptKeyFile(LocalError):
    """A key file (or known-peers file) cannot be decoded; it is never replaced silently."""


class WrongPassphrase(LocalError):
    """The passphrase does not open the key file (or it is needed and was not given)."""


class UnknownPeer(LocalError):
    """No pin exists for this peer name."""


def b64encode(data: bytes) -> str:
    """Base64url without padding, the byte encoding of every blindhub JSON format."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """Strict inverse of ``b64encode``; raises ``ValueError`` on anything else."""
    if not isinstance(text, str) or "=" in text:
        raise ValueError("not unpadded base64url text")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as error:
        raise ValueError("not base64url") from error
    if b64encode(data) != text:  # rejects non-canonical trailing bits and stray characters
        raise ValueError("not canonical base64url")
    return data


@dataclass(frozen=True)
class IdentityPublicKey:
    """An Ed25519 public identity key (32 bytes)."""

    raw: bytes

    def __post_init__(self) -> None:
        # Any 32 bytes are accepted here; a key that is not a valid point simply never
        # verifies a signature, which is where it matters.
        if not isinstance(self.raw, bytes) or len(self.raw) != PUBLIC_KEY_SIZE:
            raise MalformedIdentityKey(f"an identity key is {PUBLIC_KEY_SIZE} bytes")

    def _verify_key(self) -> nacl.signing.VerifyKey:
        return nacl.signing.VerifyKey(self.raw)

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise ``BadSignature`` unless ``signature`` signs ``message`` under this key."""
        if len(signature) != SIGNATURE_SIZE:
            raise BadSignature("a signature is 64 bytes")
        try:
            self._verify_key().verify(message, signature)
        except nacl.exceptions.BadSignatureError as error:
            raise BadSignature("signature does not verify under the peer's identity key") from error

    def fingerprint(self) -> str:
        """``SHA256:`` and the unpadded base64 of the key's SHA-256, like OpenSSH shows."""
        digest = hashlib.sha256(self.raw).digest()
        return "SHA256:" + base64.b64encode(digest).rstrip(b"=").decode("ascii")

    def __repr__(self) -> str:
        return f"IdentityPublicKey({self.fingerprint()})"


class IdentityKey:
    """A private Ed25519 identity key. Its repr shows only the public fingerprint."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_SIZE:
            raise LocalError(f"an identity seed is {SEED_SIZE} bytes")
        self._signing_key = nacl.signing.SigningKey(seed)
        self.public_key = IdentityPublicKey(bytes(self._signing_key.verify_key))

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes]) -> "IdentityKey":
        return cls(random_bytes(SEED_SIZE))

    def sign(self, message: bytes) -> bytes:
        return self._signing_key.sign(message).signature

    def seed(self) -> bytes:
        """The secret seed; only for writing the key file."""
        return bytes(self._signing_key)

    def __repr__(self) -> str:
        return f"IdentityKey(public={self.public_key.fingerprint()})"


def _party_digits(public_key: IdentityPublicKey) -> str:
    # Signal's numeric fingerprint: SHA-512 iterated 5,200 times over the key, so
    # grinding a key whose digits match costs 5,200 hashes per try on top of 2^116 tries.
    digest = SAFETY_NUMBER_VERSION.to_bytes(2, "big") + public_key.raw
    for _ in range(SAFETY_NUMBER_ITERATIONS):
        digest = hashlib.sha512(digest + public_key.raw).digest()
    groups = []
    for index in range(SAFETY_NUMBER_GROUPS_PER_PARTY):
        chunk = digest[index * SAFETY_NUMBER_GROUP_BYTES : (index + 1) * SAFETY_NUMBER_GROUP_BYTES]
        groups.append(f"{int.from_bytes(chunk, 'big') % 100_000:05d}")
    return " ".join(groups)


def decimal_groups(value: bytes, digits: int, group: int = 5) -> str:
    """``value`` as ``digits`` decimal digits (its big-endian integer modulo 10**digits) in
    groups of ``group``, the form people read aloud (the SAS, the group security code). From
    a 32-byte hash, 30 digits or fewer are biased by less than 2**-156."""
    text = f"{int.from_bytes(value, 'big') % 10**digits:0{digits}d}"
    return " ".join(text[i : i + group] for i in range(0, digits, group))


def safety_number(first: IdentityPublicKey, second: IdentityPublicKey) -> str:
    """Both parties' digits, lower half first, so both ends show the same 70 digits."""
    halves = sorted([_party_digits(first), _party_digits(second)])
    return " ".join(halves)


# -- key files ---------------------------------------------------------------------------


def encode_identity_file(
    identity: IdentityKey,
    passphrase: bytes | None,
    random_bytes: Callable[[int], bytes],
    *,
    opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE,
    memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE,
) -> bytes:
    """The key file's bytes: the seed in the clear, or sealed under the passphrase."""
    document: dict[str, Any] = {
        "kind": KEY_FILE_KIND,
        "version": KEY_FILE_VERSION,
        "public_key": b64encode(identity.public_key.raw),
    }
    if passphrase is None:
        document["protection"] = "none"
        document["seed"] = b64encode(identity.seed())
    else:
        salt = random_bytes(nacl.pwhash.argon2id.SALTBYTES)
        box = nacl.secret.SecretBox(_passphrase_key(passphrase, salt, opslimit, memlimit))
        nonce = random_bytes(nacl.secret.SecretBox.NONCE_SIZE)
        # The stored public key is checked against this seed on decoding.
        sealed = box.encrypt(identity.seed(), nonce)
        document["protection"] = "argon2id-xsalsa20poly1305"
        document["argon2id"] = {"opslimit": opslimit, "memlimit": memlimit, "salt": b64encode(salt)}
        document["sealed_seed"] = b64encode(bytes(sealed))
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def _passphrase_key(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, passphrase, salt, opslimit=opslimit, memlimit=memlimit
    )


def is_passphrase_protected(data: bytes) -> bool:
    """Whether decoding this key file needs a passphrase (raises ``CorruptKeyFile``)."""
    protection: str = _load_key_document(data)["protection"]
    return protection != "none"


def _load_key_document(data: bytes) -> dict[str, Any]:
    document = _load_json_object(data, MAX_KEY_FILE_SIZE, CorruptKeyFile, "key file")
    if document.get("kind") != KEY_FILE_KIND or document.get("version") != KEY_FILE_VERSION:
        raise CorruptKeyFile("not a blindhub identity key file of a known version")
    if document.get("protection") not in ("none", "argon2id-xsalsa20poly1305"):
        raise CorruptKeyFile("unknown key file protection")
    return document


def decode_identity_file(data: bytes, passphrase: bytes | None) -> IdentityKey:
    """The identity in a key file; ``CorruptKeyFile`` or ``WrongPassphrase`` otherwise."""
    document = _load_key_document(data)
    try:
        public_raw = b64decode(document["public_key"])
        if document["protection"] == "none":
            seed = b64decode(document["seed"])
        else:
            seed = _open_sealed_seed(document, passphrase)
        identity = IdentityKey(seed)
    except (WrongPassphrase, CorruptKeyFile):
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptKeyFile("key file fields are missing or malformed") from error
    if identity.public_key.raw != public_raw:
        raise CorruptKeyFile("key file's public key does not match its private key")
    return identity


def _open_sealed_seed(document: dict[str, Any], passphrase: bytes | None) -> bytes:
    params = document["argon2id"]
    opslimit, memlimit = params["opslimit"], params["memlimit"]
    if not all(type(value) is int for value in (opslimit, memlimit)) or not (
        0 < opslimit <= MAX_ARGON2_OPSLIMIT and 0 < memlimit <= MAX_ARGON2_MEMLIMIT
    ):
        raise CorruptKeyFile("key file's Argon2id costs are out of range")
    salt = b64decode(params["salt"])
    sealed = b64decode(document["sealed_seed"])
    if len(salt) != nacl.pwhash.argon2id.SALTBYTES:
        raise CorruptKeyFile("key file's salt has the wrong size")
    if passphrase is None:
        raise WrongPassphrase("this key file is protected by a passphrase; none was given")
    try:
        key = _passphrase_key(passphrase, salt, opslimit, memlimit)
    except nacl.exceptions.CryptoError as error:
        raise CorruptKeyFile("key file's Argon2id costs are rejected") from error
    try:
        return nacl.secret.SecretBox(key).decrypt(sealed)
    except nacl.exceptions.CryptoError as error:
        # A wrong passphrase and a flipped ciphertext bit are indistinguishable here.
        raise WrongPassphrase("wrong passphrase, or the sealed key was altered") from error


def _load_json_object(
    data: bytes, limit: int, error: type[LocalError], what: str
) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray) or len(data) > limit:
        raise error(f"{what} is not bytes of at most {limit} bytes")
    try:
        document = strict_json.loads(data)
    except strict_json.StrictJsonError as exc:
        raise error(f"{what} is not strict UTF-8 JSON") from exc
    if not isinstance(document, dict):
        raise error(f"{what} is not a JSON object")
    return document


# -- known peers -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    name: str
    public_key: IdentityPublicKey
    verified: bool = False


@dataclass(frozen=True)
class PinChanges:
    """What one holder of a ``KnownPeers`` changed since it was loaded (``changes_since``),
    to be replayed onto the file as it is now (``apply``) rather than overwriting it."""

    added: tuple[Pin, ...] = ()
    verified: tuple[Pin, ...] = ()
    removed: tuple[Pin, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.verified or self.removed)


class KnownPeers:
    """Pinned identity keys by peer name: trust on first use, then hard failure on change.

    A pure in-memory structure; ``encode``/``decode`` give the file format.
    """

    def __init__(self, pins: dict[str, Pin] | None = None) -> None:
        self._pins: dict[str, Pin] = dict(pins or {})

    def check(self, name: str, public_key: IdentityPublicKey, *, pin_new: bool = True) -> Pin:
        """Return the pin for ``name``, pinning ``public_key`` on first sight (with
        ``pin_new``; else ``UnknownPeer``). Raise ``PinnedIdentityMismatch`` if the pin holds
        another key, and ``ConfusableName`` if ``name`` is new but looks like a pinned name."""
        _check_name(name)
        pin = self._pins.get(name)
        if pin is not None:
            if pin.public_key != public_key:
                raise PinnedIdentityMismatch(name, pin.public_key, public_key)
            return pin
        look_alike = self._look_alike(name)
        if look_alike is not None:
            raise ConfusableName(name, look_alike.name, look_alike.public_key, public_key)
        if not pin_new:
            raise UnknownPeer(f"no pinned identity for peer {name!r}")
        pin = Pin(name, public_key)
        self._pins[name] = pin
        return pin

    def _look_alike(self, name: str) -> Pin | None:
        for pin in self:
            if pin.name != name and looks_alike(name, pin.name):
                return pin
        return None

    def get(self, name: str) -> Pin | None:
        return self._pins.get(name)

    def __iter__(self) -> Iterator[Pin]:
        return iter(sorted(self._pins.values(), key=lambda pin: pin.name))

    def __len__(self) -> int:
        return len(self._pins)

    def mark_verified(self, name: str) -> Pin:
        """Record that the safety number (or SAS) was compared out of band."""
        pin = self._require(name)
        self._pins[name] = Pin(name, pin.public_key, verified=True)
        return self._pins[name]

    def remove(self, name: str) -> Pin:
        """Forget a pin, e.g. after the peer really changed devices; the next key is pinned."""
        pin = self._require(name)
        del self._pins[name]
        return pin

    def copy(self) -> "KnownPeers":
        return KnownPeers(self._pins)

    def changes_since(self, before: "KnownPeers") -> PinChanges:
        """What was pinned, verified and removed here since ``before`` (a copy of this)."""
        added: list[Pin] = []
        verified: list[Pin] = []
        for pin in self:
            old = before.get(pin.name)
            if old is None or old.public_key != pin.public_key:
                added.append(pin)
            elif pin.verified and not old.verified:
                verified.append(pin)
        removed = [
            old
            for old in before
            if (now := self.get(old.name)) is None or now.public_key != old.public_key
        ]
        return PinChanges(tuple(added), tuple(verified), tuple(removed))

    def apply(self, changes: PinChanges) -> list[Pin]:
        """Replay ``changes`` made by another holder onto these pins (the file as it is
        now). A removal or verification applies only to the same key; a pin added there is
        dropped if this copy pinned that name (or a look-alike) to another key meanwhile, as
        the first pin stands. Returns the added pins that were dropped."""
        for old in changes.removed:
            pin = self._pins.get(old.name)
            if pin is not None and pin.public_key == old.public_key:
                del self._pins[old.name]
        dropped: list[Pin] = []
        for new in changes.added:
            try:
                self.check(new.name, new.public_key)
            except PinnedIdentityMismatch:
                dropped.append(new)
                continue
            if new.verified:
                self.mark_verified(new.name)
        for new in changes.verified:
            pin = self._pins.get(new.name)
            if pin is not None and pin.public_key == new.public_key:
                self.mark_verified(new.name)
        return dropped

    def _require(self, name: str) -> Pin:
        pin = self._pins.get(name)
        if pin is None:
            raise UnknownPeer(f"no pinned identity for peer {name!r}")
        return pin

    def encode(self) -> bytes:
        document = {
            "kind": KNOWN_PEERS_KIND,
            "version": KNOWN_PEERS_VERSION,
            "peers": [
                {
                    "name": pin.name,
                    "public_key": b64encode(pin.public_key.raw),
                    "verified": pin.verified,
                }
                for pin in self
            ],
        }
        return (json.dumps(document, indent=2) + "\n").encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> "KnownPeers":
        document = _load_json_object(
            data, MAX_KNOWN_PEERS_FILE_SIZE, CorruptKeyFile, "known-peers file"
        )
        if (
            document.get("kind") != KNOWN_PEERS_KIND
            or document.get("version") != KNOWN_PEERS_VERSION
        ):
            raise CorruptKeyFile("not a blindhub known-peers file of a known version")
        pins: dict[str, Pin] = {}
        try:
            for entry in document["peers"]:
                name, verified = entry["name"], entry["verified"]
                _check_name(name)
                if type(verified) is not bool or name in pins:
                    raise ValueError("bad or duplicate entry")
                pins[name] = Pin(name, IdentityPublicKey(b64decode(entry["public_key"])), verified)
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptKeyFile(f"known-peers file has a malformed entry: {error}") from error
        return cls(pins)


def _check_name(name: str) -> None:
    # Pins are filed under normal names only (crypto/names.py), as the peers sign them.
    check_normalized(name)
