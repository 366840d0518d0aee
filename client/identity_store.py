"""Where a user's identity and known peers live on disk, and how they are written.

The formats belong to crypto/identity.py; this module only chooses the directory
(``--home DIR``, else ``$BLINDHUB_HOME``, else the platform's user config directory),
creates files readable by their owner only (0600, directory 0700), writes atomically
and refuses a private key file that others can read, as OpenSSH does.
"""

import getpass
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from crypto.errors import LocalError
from crypto.identity import (
    IdentityKey,
    KnownPeers,
    decode_identity_file,
    encode_identity_file,
    is_passphrase_protected,
)

HOME_ENVIRONMENT_VARIABLE = "BLINDHUB_HOME"
PASSPHRASE_ENVIRONMENT_VARIABLE = "BLINDHUB_PASSPHRASE"
APP_DIRECTORY = "blindhub"
IDENTITY_FILE = "identity.json"
KNOWN_PEERS_FILE = "known_peers.json"
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


class UnsafePermissions(LocalError):
    """The private key file can be read or written by users other than its owner."""


class PassphraseRefused(LocalError):
    """A new passphrase was empty, or its confirmation did not match."""


class IdentityExists(LocalError):
    """A new protected identity was asked for where one already exists."""


def home_directory(
    explicit: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] = os.environ,
    platform: str = sys.platform,
) -> Path:
    """``explicit``, else ``$BLINDHUB_HOME``, else the platform's user config directory."""
    if explicit is not None:
        return Path(explicit)
    if environ.get(HOME_ENVIRONMENT_VARIABLE):
        return Path(environ[HOME_ENVIRONMENT_VARIABLE])
    return user_config_directory(environ, platform) / APP_DIRECTORY


def user_config_directory(environ: Mapping[str, str], platform: str) -> Path:
    """The per-user configuration directory, by each platform's own convention."""
    if platform == "win32" and environ.get("APPDATA"):
        return Path(environ["APPDATA"])
    if platform == "darwin":
        return Path.home() / "Library" / "Application Support"
    # XDG Base Directory: an unset, empty or relative $XDG_CONFIG_HOME means ~/.config.
    xdg = environ.get("XDG_CONFIG_HOME", "")
    return Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"


def load_or_create_identity(
    home: Path,
    passphrase: bytes | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> IdentityKey:
    """The identity stored in ``home``, creating it on first use.

    An unreadable, corrupt or wrong-passphrase file raises (``CorruptKeyFile``,
    ``WrongPassphrase``, ``UnsafePermissions``); it is never replaced by a new key.
    """
    path = home / IDENTITY_FILE
    if path.exists():
        return load_identity(home, passphrase)
    identity = IdentityKey.generate(random_bytes)
    _write_private(path, encode_identity_file(identity, passphrase, random_bytes), exclusive=True)
    return identity


def open_identity(
    home: Path,
    *,
    protect_new: bool = False,
    environ: Mapping[str, str] = os.environ,
    ask: Callable[[str], str] = getpass.getpass,
) -> IdentityKey:
    """The user's identity for a command, created on first use.

    A protected identity is unlocked with a passphrase; a new one is protected if
    ``protect_new``. The passphrase comes from ``$BLINDHUB_PASSPHRASE`` when it is set
    (scripts, tests), else it is asked on the terminal without echo (a new one twice).
    """
    path = home / IDENTITY_FILE
    if path.exists():
        if protect_new:
            raise IdentityExists(f"{path} exists already; a new identity was not created")
        data = _read_private(path)  # refuse a file others can read before asking anything
        passphrase = None
        if is_passphrase_protected(data):
            passphrase = _read_passphrase(f"passphrase for {path}: ", environ, ask)
        return decode_identity_file(data, passphrase)
    if not protect_new:
        return load_or_create_identity(home)
    passphrase = _read_passphrase("passphrase for your new identity: ", environ, ask)
    if PASSPHRASE_ENVIRONMENT_VARIABLE not in environ and _ask(
        ask, "the same passphrase again: "
    ) != (passphrase.decode()):
        raise PassphraseRefused("the two passphrases differ; no identity was created")
    return load_or_create_identity(home, passphrase)


def _read_passphrase(prompt: str, environ: Mapping[str, str], ask: Callable[[str], str]) -> bytes:
    passphrase = environ.get(PASSPHRASE_ENVIRONMENT_VARIABLE)
    if passphrase is None:
        passphrase = _ask(ask, prompt)
    if not passphrase:
        raise PassphraseRefused("the passphrase is empty")
    return passphrase.encode()


def _ask(ask: Callable[[str], str], prompt: str) -> str:
    try:
        return ask(prompt)
    except EOFError:  # no terminal, and stdin ended
        raise PassphraseRefused(
            f"no passphrase: no terminal to ask on, and ${PASSPHRASE_ENVIRONMENT_VARIABLE} "
            "is not set"
        ) from None


def load_identity(home: Path, passphrase: bytes | None = None) -> IdentityKey:
    return decode_identity_file(_read_private(home / IDENTITY_FILE), passphrase)


def _read_private(path: Path) -> bytes:
    """The bytes of a private key file, refused (as OpenSSH does) if others can access it."""
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise UnsafePermissions(f"{path} is accessible by other users; run: chmod 600 {path}")
    return path.read_bytes()


def load_known_peers(home: Path) -> KnownPeers:
    """The pins stored in ``home``; none yet if the file does not exist."""
    path = home / KNOWN_PEERS_FILE
    if not path.exists():
        return KnownPeers()
    return KnownPeers.decode(path.read_bytes())


def save_known_peers(home: Path, peers: KnownPeers) -> None:
    _write_private(home / KNOWN_PEERS_FILE, peers.encode(), exclusive=False)


def _write_private(path: Path, data: bytes, *, exclusive: bool) -> None:
    """Write with mode 0600 from the first byte; atomically replace unless ``exclusive``."""
    path.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    target = path if exclusive else path.with_name(path.name + ".tmp")
    if not exclusive:
        target.unlink(missing_ok=True)  # a stale temporary file may have another mode
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if not exclusive:
        os.replace(target, path)
