"""``blindhub contacts [list | show NAME | verify NAME | forget NAME]``: the peers you pinned."""

import argparse
import sys

from client.exit_codes import ExitCode
from client.identity_store import home_directory, load_known_peers, open_identity, save_known_peers
from crypto.errors import CryptoError
from crypto.identity import Pin, UnknownPeer, safety_number

HOME_HELP = "where your identity and pins live ($BLINDHUB_HOME)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help=HOME_HELP)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    # --home also after the action; SUPPRESS keeps an absent one from undoing one given before.
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument("--home", default=argparse.SUPPRESS, help=HOME_HELP)
    actions.add_parser("list", parents=[home], help="list pinned peers (the default)")
    show = actions.add_parser(
        "show",
        parents=[home],
        help="NAME's fingerprint and the safety number to compare with NAME out of band",
    )
    show.add_argument("contact", metavar="NAME")
    verify = actions.add_parser(
        "verify", parents=[home], help="record that NAME's key was compared out of band"
    )
    verify.add_argument("contact", metavar="NAME")
    forget = actions.add_parser(
        "forget", parents=[home], help="forget NAME's pin; the next key is pinned anew"
    )
    forget.add_argument("contact", metavar="NAME")


def run(args: argparse.Namespace) -> int:
    home = home_directory(args.home)
    try:
        peers = load_known_peers(home)
        if args.action in (None, "list"):
            for pin in peers:
                status = "verified" if pin.verified else "pinned"
                print(f"{pin.name}\t{pin.public_key.fingerprint()}\t{status}")
            return ExitCode.OK
        if args.action == "show":
            found = peers.get(args.contact)
            if found is None:
                raise UnknownPeer(f"no pinned identity for peer {args.contact!r}")
            show(found, safety_number(open_identity(home).public_key, found.public_key))
            return ExitCode.OK
        loaded = peers.copy()
        pin = (peers.mark_verified if args.action == "verify" else peers.remove)(args.contact)
        save_known_peers(home, peers, loaded=loaded)
    except UnknownPeer as error:
        print(f"blindhub contacts: {error}", file=sys.stderr)
        return ExitCode.UNKNOWN_CONTACT
    except (CryptoError, OSError) as error:
        print(f"blindhub contacts: {error}", file=sys.stderr)
        return ExitCode.LOCAL_PROBLEM
    print(f"{args.action}: {pin.name} {pin.public_key.fingerprint()}")
    return ExitCode.OK


def show(pin: Pin, digits: str) -> None:
    groups = digits.split()
    half = len(groups) // 2
    print(f"{pin.name}\t{pin.public_key.fingerprint()}\t{'verified' if pin.verified else 'pinned'}")
    # Both sides print the same digits; compare them in person or on a trusted channel,
    # then run `blindhub contacts verify NAME`.
    print("safety number:")
    print("  " + " ".join(groups[:half]))
    print("  " + " ".join(groups[half:]))
