"""``blindhub contacts [list | verify NAME | forget NAME]``: the peers whose keys you pinned."""

import argparse
import sys

from client.identity_store import home_directory, load_known_peers, save_known_peers
from crypto.errors import CryptoError
from crypto.identity import UnknownPeer

EXIT_LOCAL_PROBLEM = 7
EXIT_UNKNOWN_CONTACT = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="where your identity and pins live ($BLINDHUB_HOME)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="list pinned peers (the default)")
    verify = actions.add_parser("verify", help="record that NAME's key was compared out of band")
    verify.add_argument("contact", metavar="NAME")
    forget = actions.add_parser("forget", help="forget NAME's pin; the next key is pinned anew")
    forget.add_argument("contact", metavar="NAME")


def run(args: argparse.Namespace) -> int:
    home = home_directory(args.home)
    try:
        peers = load_known_peers(home)
        if args.action in (None, "list"):
            for pin in peers:
                status = "verified" if pin.verified else "pinned"
                print(f"{pin.name}\t{pin.public_key.fingerprint()}\t{status}")
            return 0
        pin = (peers.mark_verified if args.action == "verify" else peers.remove)(args.contact)
        save_known_peers(home, peers)
    except UnknownPeer as error:
        print(f"blindhub contacts: {error}", file=sys.stderr)
        return EXIT_UNKNOWN_CONTACT
    except (CryptoError, OSError) as error:
        print(f"blindhub contacts: {error}", file=sys.stderr)
        return EXIT_LOCAL_PROBLEM
    print(f"{args.action}: {pin.name} {pin.public_key.fingerprint()}")
    return 0
