"""Generate tests/vectors/group/group.json: sender keys (RFC 9605 section 5.1) as blindhub's
group calls use them.

- ``ratchet``: for every cipher suite, a base key (the first ``Nh`` bytes of
  ``seeded_random("group suite <n>")``, see tests/vectors/make_handshake_vectors.py) at
  generation 3, then steps 0 to 3 of its ratchet, each with its KID and the SFrame key and salt
  of RFC 9605 section 4.4.2 under that KID;
- ``kids``: the KID layout, ``(generation << 8) | (step % 256)``, around the step wrap;
- ``frame``: one SFrame ciphertext under a ratcheted key (suite 4, generation 1, step 2, CTR 0,
  the media kind ``audio`` as metadata, as ``SFrameSender`` binds it);
- ``sender_key_message``: the sealed plaintext of a ``sender-key`` and a ``sender-key-ack``
  message for that key (the bytes the sealed channel encrypts);
- ``security_code``: the group security code of three identities (seeds as in the handshake
  vectors) with their generations.

Run from the repository root: ``python -m tests.vectors.make_group_vectors``.
tests/test_group_vectors.py regenerates the file in memory and compares it byte for byte.
"""

import json
from pathlib import Path
from typing import Any

from crypto.frame_crypto import SFrameSender
from crypto.identity import IdentityKey, b64decode
from crypto.messages import SenderKeyAck, SenderKeyMessage, encode_message
from crypto.sender_keys import SenderKey, group_security_code
from crypto.sframe import CipherSuite, derive_key_salt, sender_key_kid
from tests.vectors.make_handshake_vectors import identity_seed, seeded_random

VECTORS_PATH = Path(__file__).parent / "group" / "group.json"
RATCHET_GENERATION = 3
RATCHET_STEPS = 4
KID_CASES = [(0, 0), (0, 7), (0, 8), (0, 255), (0, 256), (1, 0), (2, 300), (2**31, 2**31)]
FRAME_SUITE = CipherSuite.AES_128_GCM_SHA256_128
FRAME_KIND = "audio"
FRAME_PLAINTEXT = b"an Opus frame of a group call"
CODE_MEMBERS = [("alice", 0), ("bob", 2), ("carol", 1)]


def _base_key(suite: CipherSuite) -> bytes:
    return seeded_random(f"group suite {int(suite)}")(suite.nh)


def _step(suite: CipherSuite, key: SenderKey, base_key: bytes) -> dict[str, Any]:
    sframe_key, sframe_salt = derive_key_salt(suite, key.kid, base_key)
    return {
        "step": key.step,
        "kid": key.kid,
        "base_key": base_key.hex(),
        "sframe_key": sframe_key.hex(),
        "sframe_salt": sframe_salt.hex(),
    }


def _ratchet(suite: CipherSuite) -> dict[str, Any]:
    key = SenderKey(suite, RATCHET_GENERATION, 0, _base_key(suite))
    steps = []
    for _ in range(RATCHET_STEPS):
        # The base key itself, read back from the sealed message's encoding (no getter exists).
        base_key = bytes.fromhex(_base_key_hex(key))
        steps.append(_step(suite, key, base_key))
        key = key.ratcheted()
    return {"cipher_suite": int(suite), "generation": RATCHET_GENERATION, "steps": steps}


def _base_key_hex(key: SenderKey) -> str:
    return b64decode(SenderKeyMessage(key).encode()["base_key"]).hex()


def _frame_key() -> SenderKey:
    return SenderKey(FRAME_SUITE, 1, 0, _base_key(FRAME_SUITE)).ratcheted().ratcheted()


def _frame() -> dict[str, Any]:
    key = _frame_key()
    sender = SFrameSender(FRAME_SUITE)
    sender.use_key(key.media_key())
    ciphertext = sender.transform(FRAME_KIND)(FRAME_PLAINTEXT)
    assert ciphertext is not None
    return {
        "cipher_suite": int(FRAME_SUITE),
        "generation": key.generation,
        "step": key.step,
        "kid": key.kid,
        "base_key": _base_key_hex(key),
        "ctr": 0,
        "metadata": FRAME_KIND.encode().hex(),
        "plaintext": FRAME_PLAINTEXT.hex(),
        "ciphertext": ciphertext.hex(),
    }


def build_vectors() -> dict[str, Any]:
    frame_key = _frame_key()
    members = [(IdentityKey(identity_seed(name)).public_key, g) for name, g in CODE_MEMBERS]
    return {
        "ratchet_bits": 8,
        "ratchet": [_ratchet(suite) for suite in CipherSuite],
        "kids": [
            {"generation": g, "step": s, "kid": sender_key_kid(g, s, 8)} for g, s in KID_CASES
        ],
        "frame": _frame(),
        "sender_key_message": {
            "sender-key": encode_message(SenderKeyMessage(frame_key).encode()).decode(),
            "sender-key-ack": encode_message(SenderKeyAck(frame_key.kid).encode()).decode(),
        },
        "security_code": {
            "members": [
                {"name": name, "identity_key": key.raw.hex(), "generation": generation}
                for (name, generation), (key, _) in zip(CODE_MEMBERS, members, strict=True)
            ],
            "code": group_security_code(members),
        },
    }


def render(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    VECTORS_PATH.write_text(render(build_vectors()), encoding="utf-8")
