"""``blindhub sframe``: reproduce SFrame vectors and read captures, hex in, hex out.

- ``inspect HEX``: the header of an SFrame ciphertext (KID, CTR, lengths).
- ``protect --suite N --key HEX --kid N --ctr N [--metadata HEX] PLAINTEXT_HEX``
- ``unprotect --suite N --key HEX [--metadata HEX] CIPHERTEXT_HEX``

``--key`` is the base key, ``--suite`` the RFC 9605 code (1 to 5). The result is
one line on stdout; bad input gives exit status 1 and one line on stderr that
names the error (``AuthenticationError``, ...) and never the key.
"""

import argparse
import sys

from client.exit_codes import ExitCode
from crypto.sframe import (
    MAX_COUNTER,
    MAX_KID,
    CipherSuite,
    ReceiveContext,
    SendContext,
    SFrameError,
    SFrameHeader,
)


class _InputError(Exception):
    """An argument that is not what the command needs."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = actions.add_parser("inspect", help="print the KID, CTR and lengths of a ciphertext")
    inspect.add_argument("ciphertext", metavar="HEX", help="SFrame ciphertext (or its start)")

    protect = actions.add_parser("protect", help="encrypt: print the SFrame ciphertext")
    _add_key_arguments(protect)
    protect.add_argument("--kid", required=True, help="key ID, 0 to 2**64-1")
    protect.add_argument("--ctr", required=True, help="counter, 0 to 2**64-1")
    protect.add_argument("plaintext", metavar="PLAINTEXT_HEX")

    unprotect = actions.add_parser("unprotect", help="decrypt: print the plaintext")
    _add_key_arguments(unprotect)
    unprotect.add_argument("ciphertext", metavar="CIPHERTEXT_HEX")


def _add_key_arguments(parser: argparse.ArgumentParser) -> None:
    codes = ", ".join(f"{suite.value}={suite.name}" for suite in CipherSuite)
    parser.add_argument("--suite", required=True, help=f"cipher suite: {codes}")
    parser.add_argument("--key", required=True, metavar="HEX", help="base key")
    parser.add_argument("--metadata", default="", metavar="HEX", help="metadata (default none)")


def run(args: argparse.Namespace) -> int:
    try:
        print(_ACTIONS[args.action](args))
    except (_InputError, SFrameError) as error:
        kind = "error" if isinstance(error, _InputError) else type(error).__name__
        print(f"blindhub sframe {args.action}: {kind}: {error}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return ExitCode.OK


def _inspect(args: argparse.Namespace) -> str:
    data = _hex("HEX", args.ciphertext)
    header, header_length = SFrameHeader.parse(data)
    return (
        f"kid={header.kid} ctr={header.ctr} header_length={header_length} "
        f"ciphertext_length={len(data) - header_length}"
    )


def _protect(args: argparse.Namespace) -> str:
    suite, key, metadata = (
        _suite(args.suite),
        _hex("--key", args.key),
        _hex("--metadata", args.metadata),
    )
    kid = _integer("--kid", args.kid, MAX_KID)
    ctr = _integer("--ctr", args.ctr, MAX_COUNTER)
    plaintext = _hex("PLAINTEXT_HEX", args.plaintext)
    sender = SendContext(suite)
    sender.add_key(kid, key, next_counter=ctr)
    return sender.protect(kid, plaintext, metadata).hex()


def _unprotect(args: argparse.Namespace) -> str:
    suite, key, metadata = (
        _suite(args.suite),
        _hex("--key", args.key),
        _hex("--metadata", args.metadata),
    )
    ciphertext = _hex("CIPHERTEXT_HEX", args.ciphertext)
    header, _ = SFrameHeader.parse(ciphertext)
    receiver = ReceiveContext(suite)
    receiver.add_key(header.kid, key)
    return receiver.unprotect(ciphertext, metadata).hex()


_ACTIONS = {"inspect": _inspect, "protect": _protect, "unprotect": _unprotect}


def _hex(name: str, text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise _InputError(f"{name} is not valid hex") from None


def _integer(name: str, text: str, maximum: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise _InputError(f"{name} must be an integer (decimal or 0x-prefixed hex)") from None
    if not 0 <= value <= maximum:
        raise _InputError(f"{name} must be in 0..{maximum}")
    return value


def _suite(text: str) -> CipherSuite:
    try:
        return CipherSuite(int(text, 0))
    except ValueError:
        raise _InputError(f"--suite must be one of 1 to {len(CipherSuite)}") from None
