import os
import stat
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
    load_identity,
    load_known_peers,
    load_or_create_identity,
    open_identity,
    save_known_peers,
)
from crypto.identity import (
    CorruptKeyFile,
    IdentityKey,
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
    peers.check("bob", IdentityKey(bytes(range(32))).public_key)
    peers.mark_verified("bob")
    stale = tmp_path / (KNOWN_PEERS_FILE + ".tmp")
    stale.write_bytes(b"stale")
    stale.chmod(0o644)
    save_known_peers(tmp_path, peers)
    assert mode(tmp_path / KNOWN_PEERS_FILE) == 0o600 and not stale.exists()
    assert list(load_known_peers(tmp_path)) == list(peers)


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
