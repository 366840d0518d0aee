"""SFrame protect/unprotect against raw AES-128-GCM, measured in the same process.

Run: ``python -m tests.bench.sframe`` (add ``--quick`` for a fast smoke run).

Each figure is the best of several repeats of a tight loop, so background load
inflates both sides alike; only ratios are reported as results. Raw AES-GCM is
``AESGCM.encrypt``/``decrypt`` on the very same frame buffers with a 12-byte nonce
and no AAD: the floor any SFrame implementation over ``cryptography`` pays.
"""

import argparse
import os
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.sframe import CipherSuite, ReceiveContext, SendContext, SFrameHeader
from tests.bench import best_per_call

FRAME_SIZES = (100, 1200, 20000)  # audio, small video, large video frame
TARGETS = {100: 2.5, 20000: 1.5}  # protect / raw AES-GCM, AES_128_GCM_SHA256_128
BASE_KEY = bytes(range(16))
KID = 1
# A typical header: one small KID, and the CTR an hour of 30 fps video reaches.
TYPICAL_KID, TYPICAL_CTR = 1, 30 * 3600


def measure(suite: CipherSuite, size: int, calls: int, repeats: int) -> dict[str, float]:
    frames = [os.urandom(size) for _ in range(64)]
    aesgcm = AESGCM(bytes(16))
    nonce = bytes(12)
    sealed = [aesgcm.encrypt(nonce, frame, None) for frame in frames]

    def raw_encrypt(n: int) -> None:
        for i in range(n):
            aesgcm.encrypt(nonce, frames[i & 63], None)

    def raw_decrypt(n: int) -> None:
        for i in range(n):
            aesgcm.decrypt(nonce, sealed[i & 63], None)

    def protect(n: int) -> None:
        sender = SendContext(suite)
        sender.add_key(KID, BASE_KEY, next_counter=TYPICAL_CTR)
        for i in range(n):
            sender.protect(KID, frames[i & 63])

    sender = SendContext(suite)
    sender.add_key(KID, BASE_KEY, next_counter=TYPICAL_CTR)
    ciphertexts = [sender.protect(KID, frames[i & 63]) for i in range(calls)]

    def unprotect(n: int) -> None:
        receiver = ReceiveContext(suite)
        receiver.add_key(KID, BASE_KEY)
        for i in range(n):
            receiver.unprotect(ciphertexts[i])

    return {
        "raw_encrypt": best_per_call(raw_encrypt, calls, repeats),
        "raw_decrypt": best_per_call(raw_decrypt, calls, repeats),
        "protect": best_per_call(protect, calls, repeats),
        "unprotect": best_per_call(unprotect, calls, repeats),
    }


def overhead(suite: CipherSuite, kid: int, ctr: int) -> int:
    return len(bytes(SFrameHeader(kid, ctr))) + suite.nt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.sframe", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke run)")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 9

    print("SFrame vs raw AES-128-GCM (AESGCM on the same buffers), best of", repeats, "runs")
    print(
        f"{'suite':28} {'bytes':>6} {'raw enc us':>10} {'protect':>9} {'raw dec us':>10} "
        f"{'unprotect':>9}"
    )
    verdicts = []
    for suite in CipherSuite:
        for size in FRAME_SIZES:
            calls = (300 if args.quick else 3000) if size < 10000 else (100 if args.quick else 800)
            result = measure(suite, size, calls, repeats)
            protect_ratio = result["protect"] / result["raw_encrypt"]
            unprotect_ratio = result["unprotect"] / result["raw_decrypt"]
            print(
                f"{suite.name:28} {size:>6} {result['raw_encrypt'] * 1e6:>10.2f} "
                f"{protect_ratio:>8.2f}x {result['raw_decrypt'] * 1e6:>10.2f} "
                f"{unprotect_ratio:>8.2f}x"
            )
            if suite is CipherSuite.AES_128_GCM_SHA256_128 and size in TARGETS:
                verdicts.append((size, protect_ratio, TARGETS[size]))

    print()
    for size, ratio, target in verdicts:
        status = "met" if ratio <= target else "MISSED"
        print(
            f"target protect <= {target}x raw at {size} B (AES_128_GCM_SHA256_128): "
            f"{ratio:.2f}x {status}"
        )

    print()
    print("per-frame overhead in bytes (header + tag)")
    cases = [(0, 0), (TYPICAL_KID, 1000), (TYPICAL_KID, TYPICAL_CTR), (0x1234, 2**32)]
    print(f"{'suite':28} {'tag':>4} " + " ".join(f"{f'kid={k},ctr={c}':>20}" for k, c in cases))
    for suite in CipherSuite:
        cells = " ".join(f"{overhead(suite, k, c):>20}" for k, c in cases)
        print(f"{suite.name:28} {suite.nt:>4} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
