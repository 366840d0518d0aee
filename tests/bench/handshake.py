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

Each figure is the best of several repeats, so only the ratios are results.

``--against DIR`` also times the key agreement and the rekey of another checkout of blindhub
(an earlier protocol version: ``git worktree add DIR COMMIT``), each in a fresh interpreter,
alternating with this one's, and prints this version's cost relative to it.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

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


# Run in the other checkout: its bench module has the same two functions (since version 1).
_ELSEWHERE = """
import sys
from tests.bench import best_per_call
from tests.bench.handshake import handshake, rekeys
calls, repeats = int(sys.argv[1]), int(sys.argv[2])
print(best_per_call(handshake, calls, repeats), best_per_call(rekeys, calls, repeats))
"""


def timed_in(checkout: Path, calls: int, repeats: int) -> tuple[float, float]:
    """Seconds per key agreement and per rekey, measured by ``checkout``'s own code."""
    done = subprocess.run(
        [sys.executable, "-c", _ELSEWHERE, str(calls), str(repeats)],
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        capture_output=True,
        text=True,
        check=True,
    )
    agreement, rekey = done.stdout.split()
    return float(agreement), float(rekey)


def compare(other: Path, calls: int, repeats: int, rounds: int) -> None:
    here = Path(__file__).resolve().parents[2]
    best = {here: [float("inf")] * 2, other: [float("inf")] * 2}
    for _ in range(rounds):  # alternating, so that a change of load hits both
        for checkout in (other, here):
            best[checkout] = [
                min(pair)
                for pair in zip(best[checkout], timed_in(checkout, calls, repeats), strict=True)
            ]
    print(f"\nthis checkout against {other}, best of {rounds} alternating rounds")
    print(f"{'operation':40} {'other us':>9} {'this us':>9} {'ratio':>7}")
    for index, name in enumerate(("key agreement (both sides)", "rekey (both sides)")):
        theirs, ours = best[other][index], best[here][index]
        print(f"{name:40} {theirs * 1e6:>9.1f} {ours * 1e6:>9.1f} {ours / theirs:>6.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.handshake", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke run)")
    parser.add_argument(
        "--against", type=Path, metavar="DIR", help="another checkout to compare the cost with"
    )
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
    if args.against is not None:
        compare(args.against.resolve(), 40 * scale, repeats, 2 if args.quick else 5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
