"""``blindhub id``: show your identity fingerprint, creating the identity on first use."""

import argparse
import sys

from client.exit_codes import ExitCode
from client.identity_store import home_directory, open_identity
from crypto.errors import CryptoError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="where your identity and pins live ($BLINDHUB_HOME)")
    parser.add_argument(
        "--protect",
        action="store_true",
        help="create the identity encrypted at rest under a passphrase (Argon2id); the "
        "passphrase is asked, or read from $BLINDHUB_PASSPHRASE",
    )


def run(args: argparse.Namespace) -> int:
    home = home_directory(args.home)
    try:
        identity = open_identity(home, protect_new=args.protect)
    except (CryptoError, OSError) as error:
        print(f"blindhub id: {error}", file=sys.stderr)
        return ExitCode.LOCAL_PROBLEM
    print(identity.public_key.fingerprint())
    return ExitCode.OK
