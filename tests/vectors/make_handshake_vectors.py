"""Generate tests/vectors/handshake.json: one v2 handshake, sealed message and signed rekey.

Every random byte comes from ``seeded_random(label)`` (SHA-256 of the label and a
32-bit counter, concatenated), so another implementation can replay the exact run:
each party draws, in order, its X25519 ephemeral private key (32 bytes) then its nonce
(32 bytes) during the handshake, then a 32-byte X25519 private key per rekey.

Run from the repository root: ``python -m tests.vectors.make_handshake_vectors``.
tests/test_handshake.py regenerates the file in memory and compares it byte for byte.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from crypto.frame_crypto import MediaKey
from crypto.handshake import (
    Exchange,
    Initiator,
    Party,
    Responder,
    epoch0_secret,
    handshake_keys,
    initiator_transcript_hash,
)
from crypto.identity import IdentityKey, b64decode, b64encode
from crypto.sealed import (
    EpochKeys,
    Role,
    SealedChannel,
    hkdf_expand,
    next_epoch_secret,
    x25519_public_bytes,
)
from crypto.sframe import CipherSuite

VECTORS_PATH = Path(__file__).with_name("handshake.json")
CALL_ID = "call-4f1e2d"
INITIATOR_NAME = "alice"
RESPONDER_NAME = "bob"
OFFERED = [CipherSuite.AES_128_GCM_SHA256_128, CipherSuite.AES_128_CTR_HMAC_SHA256_80]
RESPONDER_SUPPORTS = [
    CipherSuite.AES_128_CTR_HMAC_SHA256_80,
    CipherSuite.AES_128_GCM_SHA256_128,
    CipherSuite.AES_256_GCM_SHA512_128,
]
SEALED_CONTENT = {"type": "offer", "sdp": "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\n"}


def seeded_random(label: str) -> Callable[[int], bytes]:
    """Deterministic ``random_bytes``: SHA-256(label || counter) blocks, counter from 0."""
    counter = 0

    def random_bytes(size: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < size:
            out += hashlib.sha256(label.encode() + counter.to_bytes(4, "big")).digest()
            counter += 1
        return out[:size]

    return random_bytes


def identity_seed(name: str) -> bytes:
    return hashlib.sha256(f"blindhub vectors {name} identity".encode()).digest()


def _handshake_secrets(commit: dict[str, Any], accept: dict[str, Any]) -> dict[str, Any]:
    """The intermediate values an implementation needs to check step by step: the exchange
    hash, the initiator's transcript hash T_i and the two keys that encrypt the identities."""
    alice_random, bob_random = seeded_random("alice"), seeded_random("bob")
    alice_ephemeral = X25519PrivateKey.from_private_bytes(alice_random(32))
    bob_ephemeral = X25519PrivateKey.from_private_bytes(bob_random(32))
    exchange = Exchange(
        offered=tuple(OFFERED),
        chosen=CipherSuite(accept["suite"]),
        call_id=CALL_ID,
        initiator_nonce=b64decode(commit["nonce"]),
        responder_nonce=b64decode(accept["nonce"]),
        initiator_ephemeral=x25519_public_bytes(alice_ephemeral),
        responder_ephemeral=x25519_public_bytes(bob_ephemeral),
    )
    keys = handshake_keys(alice_ephemeral.exchange(bob_ephemeral.public_key()), exchange.hash())
    alice = Party(IdentityKey(identity_seed("alice")).public_key, INITIATOR_NAME)
    return {
        "exchange_hash": exchange.hash().hex(),
        "initiator_transcript_hash": initiator_transcript_hash(exchange, alice).hex(),
        "auth_key_initiator": keys.initiator.hex(),
        "auth_key_responder": keys.responder.hex(),
    }


def _epoch_secrets(transcript_hash: bytes) -> tuple[bytes, bytes]:
    """Epochs 0 and 1's secrets from the seeded randomness and the documented schedule.

    The channels never hand out a base key, so the published ones are derived here from
    first principles and checked against the channels' key objects (``_epoch``).
    """
    alice_random, bob_random = seeded_random("alice"), seeded_random("bob")
    # Each party draws its ephemeral, then its nonce, then one private key per rekey.
    alice_ephemeral = X25519PrivateKey.from_private_bytes(alice_random(32))
    bob_ephemeral = X25519PrivateKey.from_private_bytes(bob_random(32))
    alice_random(32), bob_random(32)
    alice_rekey = X25519PrivateKey.from_private_bytes(alice_random(32))
    bob_rekey = X25519PrivateKey.from_private_bytes(bob_random(32))
    shared = alice_ephemeral.exchange(bob_ephemeral.public_key())
    epoch0 = epoch0_secret(shared, transcript_hash)
    epoch1 = next_epoch_secret(
        epoch0,
        1,
        alice_rekey.exchange(bob_rekey.public_key()),
        requester=x25519_public_bytes(alice_rekey),
        accepter=x25519_public_bytes(bob_rekey),
    )
    return epoch0, epoch1


def _media(key: MediaKey, epoch_secret: bytes, sender: Role) -> dict[str, Any]:
    base_key = hkdf_expand(epoch_secret, f"sframe {sender.value}")
    assert key == MediaKey(key.epoch, key.kid, base_key)
    return {"epoch": key.epoch, "kid": key.kid, "base_key": base_key.hex()}


def _epoch(keys: EpochKeys, epoch_secret: bytes) -> dict[str, Any]:
    """An epoch's keys named by sender (the initiator's view, whose send is the I->R key)."""
    return {
        "sframe_initiator": _media(keys.send, epoch_secret, Role.INITIATOR),
        "sframe_responder": _media(keys.receive, epoch_secret, Role.RESPONDER),
        "seal_initiator": keys.seal_send.hex(),
        "seal_responder": keys.seal_receive.hex(),
    }


def build_vectors() -> dict[str, Any]:
    alice, bob = IdentityKey(identity_seed("alice")), IdentityKey(identity_seed("bob"))
    initiator = Initiator(alice, CALL_ID, OFFERED, seeded_random("alice"), name=INITIATOR_NAME)
    responder = Responder(
        bob, CALL_ID, RESPONDER_SUPPORTS, seeded_random("bob"), name=RESPONDER_NAME
    )
    commit = initiator.start()
    [accept] = responder.receive(commit)
    [reveal] = initiator.receive(accept)
    [confirm] = responder.receive(reveal)
    assert initiator.receive(confirm) == []
    mine, theirs = initiator.result, responder.result
    assert (mine.sas, mine.transcript_hash) == (theirs.sas, theirs.transcript_hash)
    assert (mine.peer_name, theirs.peer_name) == (RESPONDER_NAME, INITIATOR_NAME)
    epoch0 = mine.channel.keys

    sealed = mine.channel.seal(SEALED_CONTENT)
    assert theirs.channel.open(sealed).content == SEALED_CONTENT
    rekey, ack, done = _rekey(mine.channel, theirs.channel)
    secret0, secret1 = _epoch_secrets(mine.transcript_hash)

    return {
        "description": (
            "blindhub handshake v2: Ed25519 identities, X25519 ephemerals, HKDF-SHA-256, "
            "AES-256-GCM for the identities and the sealed channel, signed rekeys; random "
            "bytes from seeded_random(label) in tests/vectors/make_handshake_vectors.py"
        ),
        "inputs": {
            "call_id": CALL_ID,
            "initiator_name": INITIATOR_NAME,
            "responder_name": RESPONDER_NAME,
            "initiator_identity_seed": identity_seed("alice").hex(),
            "responder_identity_seed": identity_seed("bob").hex(),
            "initiator_random_label": "alice",
            "responder_random_label": "bob",
            "offered_suites": [int(suite) for suite in OFFERED],
            "responder_supported_suites": [int(suite) for suite in RESPONDER_SUPPORTS],
        },
        "identities": {
            "initiator_public": b64encode(alice.public_key.raw),
            "responder_public": b64encode(bob.public_key.raw),
        },
        "messages": {"commit": commit, "accept": accept, "reveal": reveal, "confirm": confirm},
        "handshake": _handshake_secrets(commit, accept),
        "transcript_hash": mine.transcript_hash.hex(),
        "sas": mine.sas,
        "suite": int(mine.suite),
        "epoch0": _epoch(epoch0, secret0),
        "sealed": {"sender": "initiator", "content": SEALED_CONTENT, "message": sealed},
        "rekey": {
            "requester": "initiator",
            "messages": {"rekey": rekey, "rekey-ack": ack, "rekey-done": done},
            "epoch1": _epoch(mine.channel.keys, secret1),
        },
    }


def _rekey(
    requester: SealedChannel, accepter: SealedChannel
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    rekey = requester.start_rekey()
    [ack] = accepter.open(rekey).replies
    [done] = requester.open(ack).replies
    accepter.open(done)
    return rekey, ack, done


def render(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    VECTORS_PATH.write_text(render(build_vectors()), encoding="utf-8")
    print(f"wrote {VECTORS_PATH}")
