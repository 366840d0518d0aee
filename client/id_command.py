"""``blindhub id``: show your identity fingerprint, creating the identity on first use."""

import argparse
import sys

from client.identity_store import home_directory, load_or_create_identity
from crypto.errors import CryptoError

EXIT_LOCAL_PROBLEM = 7


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="where your identity and pins live ($BLINDHUB_HOME)")


def run(args: argparse.Namespace) -> int:
    home = home_directory(args.home)
    try:
        identity = load_or_create_identity(home)
    except (CryptoError, OSError) as error:
        print(f"blindhub id: {error}", file=sys.stderr)
        return EXIT_LOCAL_PROBLEM
    print(identity.public_key.fingerprint())
    return 0
