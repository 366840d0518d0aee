from pathlib import Path

from client.cli import main
from client.identity_store import load_known_peers, open_identity, save_known_peers
from crypto.identity import IdentityKey


def pin_each_other(tmp_path: Path) -> tuple[Path, Path, IdentityKey, IdentityKey]:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    alice = open_identity(alice_home, environ={})
    bob = open_identity(bob_home, environ={})
    for home, name, key in (
        (alice_home, "bob", bob.public_key),
        (bob_home, "alice", alice.public_key),
    ):
        peers = load_known_peers(home)
        loaded = peers.copy()
        peers.check(name, key)
        save_known_peers(home, peers, loaded=loaded)
    return alice_home, bob_home, alice, bob


def test_both_sides_show_the_same_safety_number(tmp_path, capsys):
    alice_home, bob_home, alice, bob = pin_each_other(tmp_path)
    assert main(["contacts", "--home", str(alice_home), "show", "bob"]) == 0
    alice_view = capsys.readouterr().out.splitlines()
    assert main(["contacts", "--home", str(bob_home), "show", "alice"]) == 0
    bob_view = capsys.readouterr().out.splitlines()

    assert alice_view[0] == f"bob\t{bob.public_key.fingerprint()}\tpinned"
    assert bob_view[0] == f"alice\t{alice.public_key.fingerprint()}\tpinned"
    assert alice_view[1:] == bob_view[1:]
    digits = " ".join(alice_view[2:]).split()
    assert len(digits) == 14 and all(len(group) == 5 and group.isdigit() for group in digits)


def test_show_then_verify_marks_the_pin_verified(tmp_path, capsys):
    alice_home, _, _, bob = pin_each_other(tmp_path)
    assert main(["contacts", "--home", str(alice_home), "verify", "bob"]) == 0
    assert main(["contacts", "--home", str(alice_home), "show", "bob"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-4] == f"bob\t{bob.public_key.fingerprint()}\tverified"
    )


def test_show_an_unknown_contact_exits_8(tmp_path, capsys):
    assert main(["contacts", "--home", str(tmp_path), "show", "nobody"]) == 8
    assert capsys.readouterr().err == "blindhub contacts: no pinned identity for peer 'nobody'\n"
