"""Where a user's identity and known peers live on disk, and how they are written.

The formats belong to crypto/identity.py; this module only chooses the directory
(``--home DIR``, else ``$BLINDHUB_HOME``, else the platform's user config directory),
creates files readable by their owner only (0600, directory 0700), writes atomically
and refuses a private key file that others can read, as OpenSSH does.

The pins (``known_peers.json``) are shared by every command and call of a user, which may run
at once: a call keeps what it loaded, and at its end writes only its own changes (pins made,
verified or removed) onto the file as it is then, under a lock (``save_known_peers``), so a
``contacts forget`` or another call's pin made meanwhile is kept. Anyone who can write the pin
file or its directory could pin their key under a contact's name: such a file is refused.
"""

import contextlib
import getpass
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from crypto.errors import LocalError
from crypto.identity import (
    IdentityKey,
    KnownPeers,
    Pin,
    decode_identity_file,
    encode_identity_file,
    is_passphrase_protected,
)

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

HOME_ENVIRONMENT_VARIABLE = "BLINDHUB_HOME"
PASSPHRASE_ENVIRONMENT_VARIABLE = "BLINDHUB_PASSPHRASE"
APP_DIRECTORY = "blindhub"
IDENTITY_FILE = "identity.json"
KNOWN_PEERS_FILE = "known_peers.json"
# Held (flock) while the pin file is read, merged and replaced; never deleted, so every
# process locks the same inode.
KNOWN_PEERS_LOCK_FILE = "known_peers.json.lock"
FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


class UnsafePermissions(LocalError):
    """The private key file can be read or written by users other than its owner, or the pin
    file or its directory can be written by them."""


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
    """The pins stored in ``home``; none yet if the file does not exist. ``UnsafePermissions``
    if others can write the file or ``home``."""
    if home.exists():
        _check_not_writable_by_others(home)
    path = home / KNOWN_PEERS_FILE
    if not path.exists():
        return KnownPeers()
    _check_not_writable_by_others(path)
    return KnownPeers.decode(path.read_bytes())


def save_known_peers(home: Path, peers: KnownPeers, *, loaded: KnownPeers) -> list[Pin]:
    """Write the changes made to ``peers`` since it was ``loaded`` (a copy taken then) onto
    the pin file as it is now, under the lock; never the snapshot itself, which would undo
    whatever other processes wrote meanwhile. Returns the pins this process made that were
    not kept, because another had pinned that name (or a look-alike) to another key first."""
    changes = peers.changes_since(loaded)
    if not changes:
        return []
    with known_peers_lock(home):
        current = load_known_peers(home)
        dropped = current.apply(changes)
        _write_private(home / KNOWN_PEERS_FILE, current.encode(), exclusive=False)
    return dropped


@contextlib.contextmanager
def known_peers_lock(home: Path) -> Iterator[None]:
    """Held while the pin file is read, merged and replaced (by every blindhub process)."""
    home.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    _check_not_writable_by_others(home)
    descriptor = os.open(home / KNOWN_PEERS_LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        if sys.platform == "win32":
            msvcrt.locking(descriptor, msvcrt.LK_LOCK, 1)
        else:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # which releases the lock


def _check_not_writable_by_others(path: Path) -> None:
    """Refuse a pin file or directory that another user owns or may write: whoever can write
    it can pin their own key under a contact's name."""
    if os.name != "posix":
        return
    status = path.stat()
    if status.st_uid != os.getuid():
        raise UnsafePermissions(f"{path} belongs to another user; pins are kept in your own")
    if status.st_mode & 0o022:
        raise UnsafePermissions(
            f"{path} can be written by other users, who could replace a contact's key; "
            f"run: chmod go-w {path}"
        )


def _write_private(path: Path, data: bytes, *, exclusive: bool) -> None:
    """Write with mode 0600 from the first byte; atomically replace unless ``exclusive``."""
    path.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    if exclusive:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        target = path
    else:
        # A temporary name of its own (mkstemp creates it 0600), so concurrent writers
        # never share one, then an atomic rename over the file.
        descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        target = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if not exclusive:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
