"""The key agreement and sealed signalling against their raw primitives, same process.

Run: ``python -m tests.bench.handshake`` (add ``--quick`` for a fast smoke run).

- Handshake: a full four-message run of both state machines, JSON through text as on
  the wire, against the asymmetric operations it cannot avoid (two X25519 key pairs and
  exchanges, two Ed25519 signatures and verifications).
- Sealed message: ``seal`` + ``open`` of an SDP-sized object, carried as JSON text,
  against ``json.dumps`` + ChaCha20-Poly1305 encrypt + decrypt + ``json.loads`` of it (the
  difference is the wire envelope, base64url and the checks).
- Rekey: the three sealed messages against two X25519 key pairs and exchanges.

Each figure is the best of several repeats, so only the ratios are results.
"""

import argparse
import json
import os

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from crypto.handshake import Initiator, Responder
from crypto.identity import IdentityKey
from crypto.messages import decode_message, encode_message
from crypto.sealed import Role, SealedChannel
from crypto.sframe import CipherSuite
from tests.bench import best_per_call

SUITES = [CipherSuite.AES_128_GCM_SHA256_128]
SDP_LIKE = {
    "type": "offer",
    "sdp": "a=candidate:1 1 udp 2130706431 192.0.2.1 50000 typ host\r\n" * 40,
}


def wire(message: dict[str, object]) -> dict[str, object]:
    return decode_message(encode_message(message))


def handshake(calls: int) -> None:
    alice, bob = IdentityKey(bytes(32)), IdentityKey(bytes(range(32)))
    for index in range(calls):
        initiator = Initiator(alice, f"call-{index}", SUITES, os.urandom, name="alice")
        responder = Responder(bob, f"call-{index}", SUITES, os.urandom, name="bob")
        [accept] = responder.receive(wire(initiator.start()))
        [reveal] = initiator.receive(wire(accept))
        [confirm] = responder.receive(wire(reveal))
        initiator.receive(wire(confirm))


def raw_asymmetric(calls: int) -> None:
    alice, bob = IdentityKey(bytes(32)), IdentityKey(bytes(range(32)))
    for _ in range(calls):
        mine, theirs = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        mine.exchange(theirs.public_key())
        theirs.exchange(mine.public_key())
        for signer in (alice, bob):
            signer.public_key.verify(b"t" * 32, signer.sign(b"t" * 32))


def channel_pair() -> tuple[SealedChannel, SealedChannel]:
    secret = os.urandom(32)
    return (
        SealedChannel(Role.INITIATOR, "call", secret, os.urandom),
        SealedChannel(Role.RESPONDER, "call", secret, os.urandom),
    )


def sealed(calls: int) -> None:
    alice, bob = channel_pair()
    for _ in range(calls):
        bob.open(wire(alice.seal(SDP_LIKE)))


def raw_chacha(calls: int) -> None:
    aead = ChaCha20Poly1305(os.urandom(32))
    for index in range(calls):
        nonce = index.to_bytes(12, "big")
        ciphertext = aead.encrypt(nonce, json.dumps(SDP_LIKE).encode(), b"aad")
        json.loads(aead.decrypt(nonce, ciphertext, b"aad"))


def rekeys(calls: int) -> None:
    alice, bob = channel_pair()
    for _ in range(calls):
        [ack] = bob.open(wire(alice.start_rekey())).replies
        [done] = alice.open(wire(ack)).replies
        bob.open(wire(done))


def raw_exchange(calls: int) -> None:
    for _ in range(calls):
        mine, theirs = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        mine.exchange(theirs.public_key())
        theirs.exchange(mine.public_key())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.handshake", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke run)")
    args = parser.parse_args(argv)
    repeats, scale = (3, 1) if args.quick else (7, 5)
    cases = [
        ("handshake (4 messages, both sides)", handshake, raw_asymmetric, 40 * scale),
        (f"sealed seal+open ({len(encode_message(SDP_LIKE))} B)", sealed, raw_chacha, 400 * scale),
        ("rekey (3 sealed messages)", rekeys, raw_exchange, 100 * scale),
    ]
    print(f"blindhub key agreement vs raw primitives, best of {repeats} runs")
    print(f"{'operation':40} {'raw us':>9} {'ours us':>9} {'ratio':>7}")
    for name, ours, raw, calls in cases:
        raw_time = best_per_call(raw, calls, repeats)
        our_time = best_per_call(ours, calls, repeats)
        print(
            f"{name:40} {raw_time * 1e6:>9.1f} {our_time * 1e6:>9.1f} {our_time / raw_time:>6.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
