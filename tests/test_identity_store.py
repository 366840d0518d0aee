import os
import stat
import subprocess
import sys
from pathlib import Path

import nacl.pwhash
import pytest

from client.cli import main
from client.identity_store import (
    IDENTITY_FILE,
    KNOWN_PEERS_FILE,
    IdentityExists,
    PassphraseRefused,
    UnsafePermissions,
    home_directory,
    known_peers_lock,
    load_identity,
    load_known_peers,
    load_or_create_identity,
    open_identity,
    save_known_peers,
)
from crypto.identity import (
    CorruptKeyFile,
    IdentityKey,
    KnownPeers,
    Pin,
    WrongPassphrase,
    encode_identity_file,
    is_passphrase_protected,
)
from tests.vectors.make_handshake_vectors import seeded_random

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_directory_precedence():
    environ = {"BLINDHUB_HOME": "/env/home", "XDG_CONFIG_HOME": "/xdg"}
    assert home_directory("/explicit", environ, "linux") == Path("/explicit")
    assert home_directory(None, environ, "linux") == Path("/env/home")
    assert home_directory(None, {"XDG_CONFIG_HOME": "/xdg"}, "linux") == Path("/xdg/blindhub")
    assert home_directory(None, {"XDG_CONFIG_HOME": "rel"}, "linux") == (
        Path.home() / ".config" / "blindhub"
    )
    assert home_directory(None, {}, "darwin") == (
        Path.home() / "Library" / "Application Support" / "blindhub"
    )
    assert home_directory(None, {"APPDATA": "C:/Users/u/AppData"}, "win32") == Path(
        "C:/Users/u/AppData/blindhub"
    )


@posix_only
def test_identity_is_created_once_with_owner_only_modes(tmp_path):
    home = tmp_path / "home"
    created = load_or_create_identity(home, random_bytes=seeded_random("store"))
    assert mode(home) == 0o700 and mode(home / IDENTITY_FILE) == 0o600
    again = load_or_create_identity(home, random_bytes=seeded_random("other"))
    assert again.public_key == created.public_key


def test_passphrase_protected_identity(tmp_path):
    identity = IdentityKey(bytes(32))
    tmp_path.joinpath(IDENTITY_FILE).write_bytes(
        encode_identity_file(
            identity,
            b"pw",
            seeded_random("p"),
            opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
            memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN,
        )
    )
    tmp_path.joinpath(IDENTITY_FILE).chmod(0o600)
    assert load_identity(tmp_path, b"pw").public_key == identity.public_key
    with pytest.raises(WrongPassphrase):
        load_or_create_identity(tmp_path, b"wrong")


def test_a_corrupt_identity_file_is_an_error_and_never_replaced(tmp_path):
    path = tmp_path / IDENTITY_FILE
    path.write_bytes(b"{not json")
    path.chmod(0o600)
    with pytest.raises(CorruptKeyFile):
        load_or_create_identity(tmp_path)
    assert path.read_bytes() == b"{not json"


@posix_only
def test_a_readable_private_key_file_is_refused(tmp_path):
    load_or_create_identity(tmp_path, random_bytes=seeded_random("r"))
    (tmp_path / IDENTITY_FILE).chmod(0o644)
    with pytest.raises(UnsafePermissions, match="chmod 600"):
        load_identity(tmp_path)


@posix_only
def test_known_peers_round_trip_with_owner_only_mode(tmp_path):
    assert len(load_known_peers(tmp_path)) == 0
    peers = load_known_peers(tmp_path)
    loaded = peers.copy()
    peers.check("bob", IdentityKey(bytes(range(32))).public_key)
    peers.mark_verified("bob")
    save_known_peers(tmp_path, peers, loaded=loaded)
    assert mode(tmp_path / KNOWN_PEERS_FILE) == 0o600
    assert list(load_known_peers(tmp_path)) == list(peers)
    # Written through a temporary file of its own name, renamed over the pins: none is left.
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        KNOWN_PEERS_FILE,
        KNOWN_PEERS_FILE + ".lock",
    ]


def key(number: int):
    return IdentityKey(bytes([number]) * 32).public_key


def pins_in(home: Path) -> dict[str, bool]:
    return {pin.name: pin.verified for pin in load_known_peers(home)}


def write_pins(home: Path, **names: int) -> None:
    peers = KnownPeers()
    for name, number in names.items():
        peers.check(name, key(number))
    save_known_peers(home, peers, loaded=KnownPeers())


def test_a_save_writes_only_its_changes_onto_the_pins_as_they_are_now(tmp_path):
    write_pins(tmp_path, bob=1, carol=2)
    call = load_known_peers(tmp_path)  # a call starts
    loaded = call.copy()
    # Meanwhile `contacts forget bob`, and another call pins dave.
    write_pins(tmp_path, dave=3)
    others = load_known_peers(tmp_path)
    others_loaded = others.copy()
    others.remove("bob")
    save_known_peers(tmp_path, others, loaded=others_loaded)
    # The call pins erin and verifies carol.
    call.check("erin", key(4))
    call.mark_verified("carol")
    assert save_known_peers(tmp_path, call, loaded=loaded) == []
    assert pins_in(tmp_path) == {"carol": True, "dave": False, "erin": False}


def test_a_pin_made_first_by_another_process_stands(tmp_path):
    call = load_known_peers(tmp_path)
    loaded = call.copy()
    write_pins(tmp_path, bob=1)
    call.check("bob", key(2))
    [dropped] = save_known_peers(tmp_path, call, loaded=loaded)
    assert dropped.public_key == key(2)
    assert load_known_peers(tmp_path).get("bob") == Pin("bob", key(1))


@posix_only
@pytest.mark.parametrize("which", ["file", "directory"])
def test_pins_others_can_write_are_refused(tmp_path, which, capsys):
    write_pins(tmp_path, bob=1)
    path = tmp_path / KNOWN_PEERS_FILE if which == "file" else tmp_path
    path.chmod(mode(path) | 0o022)
    with pytest.raises(UnsafePermissions, match=f"chmod go-w {path}"):
        load_known_peers(tmp_path)
    with pytest.raises(UnsafePermissions):
        write_pins(tmp_path, carol=2)
    assert main(["contacts", "--home", str(tmp_path), "list"]) == 7
    error = capsys.readouterr().err
    assert error.startswith("blindhub contacts: ") and "can be written by other users" in error


# One blindhub process, driven line by line on its stdin: each command answers "ok" on stdout
# once done, so the test orders the processes by what they said, never by waiting.
PIN_PROCESS = """
import sys
from pathlib import Path
from client.identity_store import load_known_peers, save_known_peers
from crypto.identity import IdentityKey

home = Path(sys.argv[1])
peers = loaded = None
for line in sys.stdin:
    command, *words = line.split()
    if command == "load":
        loaded = load_known_peers(home)
        peers = loaded.copy()
    elif command == "pin":
        peers.check(words[0], IdentityKey(bytes([int(words[1])]) * 32).public_key)
    elif command == "forget":
        peers.remove(words[0])
    elif command == "save":
        print("saving", flush=True)
        save_known_peers(home, peers, loaded=loaded)
    elif command == "pin-many":  # load, pin, save, as fast as it can: races the other process
        for number in range(int(words[1])):
            loaded = load_known_peers(home)
            peers = loaded.copy()
            peers.check(f"{words[0]}{number}", IdentityKey(bytes([number]) * 32).public_key)
            save_known_peers(home, peers, loaded=loaded)
    print("ok", flush=True)
"""


class PinProcess:
    def __init__(self, home: Path) -> None:
        root = str(Path(__file__).resolve().parents[1])
        self.process = subprocess.Popen(
            [sys.executable, "-c", PIN_PROCESS, str(home)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": root},
        )

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def expect(self, line: str) -> None:
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == line

    def do(self, command: str) -> None:
        self.send(command)
        if command == "save":
            self.expect("saving")
        self.expect("ok")

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0


def test_two_processes_a_forget_and_a_pin_made_during_a_call_are_kept(tmp_path):
    write_pins(tmp_path, bob=1)
    call, contacts = PinProcess(tmp_path), PinProcess(tmp_path)
    call.do("load")  # the call starts with bob pinned
    for command in ("load", "forget bob", "pin carol 2", "save"):
        contacts.do(command)
    call.do("pin dave 3")
    call.do("save")
    call.close()
    contacts.close()
    assert pins_in(tmp_path) == {"carol": False, "dave": False}


def test_a_save_waits_for_the_lock_and_merges_what_the_holder_wrote(tmp_path):
    other = PinProcess(tmp_path)
    other.do("load")
    other.do("pin carol 2")
    with known_peers_lock(tmp_path):
        other.send("save")
        other.expect("saving")  # it is about to take the lock, or waiting for it
        # The holder replaces the file with a snapshot of its own while the other waits.
        (tmp_path / KNOWN_PEERS_FILE).write_bytes(write_snapshot(bob=1))
    other.expect("ok")
    other.close()
    assert pins_in(tmp_path) == {"bob": False, "carol": False}


def write_snapshot(**names: int) -> bytes:
    peers = KnownPeers()
    for name, number in names.items():
        peers.check(name, key(number))
    return peers.encode()


def test_two_processes_saving_at_once_lose_no_pin(tmp_path):
    first, second = PinProcess(tmp_path), PinProcess(tmp_path)
    first.send("pin-many a 40")
    second.send("pin-many b 40")
    first.expect("ok")
    second.expect("ok")
    first.close()
    second.close()
    assert set(pins_in(tmp_path)) == {f"{p}{n}" for p in "ab" for n in range(40)}


def never_asked(prompt: str) -> str:
    raise AssertionError(f"asked {prompt!r} although $BLINDHUB_PASSPHRASE is set")


def answers(*replies: str):
    queue = list(replies)
    return lambda prompt: queue.pop(0)


def test_open_identity_creates_an_unprotected_identity_by_default(tmp_path):
    identity = open_identity(tmp_path, environ={}, ask=never_asked)
    assert not is_passphrase_protected((tmp_path / IDENTITY_FILE).read_bytes())
    assert open_identity(tmp_path, environ={}, ask=never_asked).seed() == identity.seed()


def test_a_protected_identity_is_unlocked_from_the_environment(tmp_path):
    environ = {"BLINDHUB_PASSPHRASE": "correct horse"}
    identity = open_identity(tmp_path, protect_new=True, environ=environ, ask=never_asked)
    assert is_passphrase_protected((tmp_path / IDENTITY_FILE).read_bytes())
    assert open_identity(tmp_path, environ=environ, ask=never_asked).seed() == identity.seed()
    with pytest.raises(WrongPassphrase):
        open_identity(tmp_path, environ={"BLINDHUB_PASSPHRASE": "wrong"}, ask=never_asked)


def test_a_new_passphrase_is_asked_twice_on_the_terminal(tmp_path):
    identity = open_identity(tmp_path, protect_new=True, environ={}, ask=answers("pw", "pw"))
    unlocked = open_identity(tmp_path, environ={}, ask=answers("pw"))
    assert unlocked.seed() == identity.seed()


@pytest.mark.parametrize(
    ("replies", "message"),
    [(("pw", "pv"), "the two passphrases differ"), (("",), "the passphrase is empty")],
)
def test_a_refused_new_passphrase_creates_nothing(tmp_path, replies, message):
    with pytest.raises(PassphraseRefused, match=message):
        open_identity(tmp_path, protect_new=True, environ={}, ask=answers(*replies))
    assert not (tmp_path / IDENTITY_FILE).exists()


def test_protecting_an_existing_identity_is_refused(tmp_path):
    identity = open_identity(tmp_path, environ={}, ask=never_asked)
    with pytest.raises(IdentityExists):
        open_identity(tmp_path, protect_new=True, environ={"BLINDHUB_PASSPHRASE": "x"})
    assert load_identity(tmp_path).seed() == identity.seed()


@posix_only
def test_a_readable_protected_identity_is_refused_before_the_passphrase_is_asked(tmp_path):
    open_identity(tmp_path, protect_new=True, environ={"BLINDHUB_PASSPHRASE": "pw"})
    (tmp_path / IDENTITY_FILE).chmod(0o644)
    with pytest.raises(UnsafePermissions):
        open_identity(tmp_path, environ={}, ask=never_asked)


def test_blindhub_id_protect_then_unlock(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BLINDHUB_PASSPHRASE", "correct horse")
    assert main(["id", "--home", str(tmp_path), "--protect"]) == 0
    fingerprint = capsys.readouterr().out
    assert fingerprint.startswith("SHA256:")
    assert main(["id", "--home", str(tmp_path)]) == 0
    assert capsys.readouterr().out == fingerprint
    monkeypatch.setenv("BLINDHUB_PASSPHRASE", "wrong")
    assert main(["id", "--home", str(tmp_path)]) == 7
    error = capsys.readouterr().err
    assert error.startswith("blindhub id: ") and error.count("\n") == 1
