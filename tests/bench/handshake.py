"""The key agreement and sealed signalling against their raw primitives, same process.

Run: ``python -m tests.bench.handshake`` (add ``--quick`` for a fast smoke run).

- Handshake: a full four-message run of both state machines, JSON through text as on
  the wire, against the operations it cannot avoid (two X25519 key pairs and exchanges,
  two Ed25519 signatures and verifications, and the two encrypted identities: AES-256-GCM
  encrypt and decrypt of each).
- Sealed message: ``seal`` + ``open`` of an SDP-sized object, carried as JSON text,
  against ``json.dumps`` + AES-256-GCM encrypt + decrypt + ``json.loads`` of it (the
  difference is the wire envelope, base64url and the checks).
- Rekey: the three sealed messages against two X25519 key pairs and exchanges and the two
  Ed25519 signatures and verifications that bind it to the identities.

Each figure is the best of several repeats, so only the ratios are results. The cost of
protocol version 2 against version 1 is in docs/benchmarks/handshake.md.
"""

import argparse
import json
import os

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.handshake import Initiator, Responder
from crypto.identity import IdentityKey
from crypto.messages import AUTH_PLAINTEXT_SIZE, decode_message, encode_message
from crypto.sealed import Role, SealedChannel
from crypto.sframe import CipherSuite
from tests.bench import best_per_call

SUITES = [CipherSuite.AES_128_GCM_SHA256_128]
SDP_LIKE = {
    "type": "offer",
    "sdp": "a=candidate:1 1 udp 2130706431 192.0.2.1 50000 typ host\r\n" * 40,
}
ALICE, BOB = IdentityKey(bytes(32)), IdentityKey(bytes(range(32)))


def wire(message: dict[str, object]) -> dict[str, object]:
    return decode_message(encode_message(message))


def handshake(calls: int) -> None:
    for index in range(calls):
        initiator = Initiator(ALICE, f"call-{index}", SUITES, os.urandom, name="alice")
        responder = Responder(BOB, f"call-{index}", SUITES, os.urandom, name="bob")
        [accept] = responder.receive(wire(initiator.start()))
        [reveal] = initiator.receive(wire(accept))
        [confirm] = responder.receive(wire(reveal))
        initiator.receive(wire(confirm))


def signatures() -> None:
    for signer in (ALICE, BOB):
        signer.public_key.verify(b"t" * 32, signer.sign(b"t" * 32))


def exchange() -> None:
    mine, theirs = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    mine.exchange(theirs.public_key())
    theirs.exchange(mine.public_key())


def raw_handshake(calls: int) -> None:
    identity = bytes(AUTH_PLAINTEXT_SIZE)
    for _ in range(calls):
        exchange()
        signatures()
        for _sender in (Role.INITIATOR, Role.RESPONDER):
            aead = AESGCM(os.urandom(32))
            aead.decrypt(bytes(12), aead.encrypt(bytes(12), identity, b"aad"), b"aad")


def channel_pair() -> tuple[SealedChannel, SealedChannel]:
    secret, transcript = os.urandom(32), os.urandom(32)
    return (
        SealedChannel(
            Role.INITIATOR,
            "call",
            secret,
            os.urandom,
            identity=ALICE,
            peer_identity=BOB.public_key,
            transcript_hash=transcript,
        ),
        SealedChannel(
            Role.RESPONDER,
            "call",
            secret,
            os.urandom,
            identity=BOB,
            peer_identity=ALICE.public_key,
            transcript_hash=transcript,
        ),
    )


def sealed(calls: int) -> None:
    alice, bob = channel_pair()
    for _ in range(calls):
        bob.open(wire(alice.seal(SDP_LIKE)))


def raw_aead(calls: int) -> None:
    aead = AESGCM(os.urandom(32))
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


def raw_rekey(calls: int) -> None:
    for _ in range(calls):
        exchange()
        signatures()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.handshake", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke run)")
    args = parser.parse_args(argv)
    repeats, scale = (3, 1) if args.quick else (7, 5)
    cases = [
        ("handshake (4 messages, both sides)", handshake, raw_handshake, 40 * scale),
        (f"sealed seal+open ({len(encode_message(SDP_LIKE))} B)", sealed, raw_aead, 400 * scale),
        ("rekey (3 sealed messages, signed)", rekeys, raw_rekey, 100 * scale),
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
