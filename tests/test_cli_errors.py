"""Every command, given a bad argument, path, port or device, ends with one line on stderr and
an exit code of client/exit_codes.py: never a traceback. Each case is run as a user would."""

import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import client.id_command
import client.media
from client.cli import TRACEBACK_VARIABLE, main
from client.exit_codes import ExitCode
from client.media import MediaSourceError, open_sources


def blindhub(*arguments: str, **options: object) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "BLINDHUB_PASSPHRASE"}
    result: subprocess.CompletedProcess[str] = subprocess.run(
        [sys.executable, "-m", "client.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=environment,
        **options,  # type: ignore[call-overload]
    )
    return result


def one_line_error(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The single stderr line of a failed command, checked to be one line and no traceback."""
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"blindhub {command}: "), result.stderr
    return lines[0]


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """A TCP port that accepts connections, to tell whether a command connected to it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        yield listener


def was_connected(listener: socket.socket) -> bool:
    try:
        connection, _ = listener.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


# -- hub


def test_hub_on_a_port_in_use(listening_socket):
    port = listening_socket.getsockname()[1]
    result = blindhub("hub", "--port", str(port))
    assert result.returncode == ExitCode.LOCAL_PROBLEM
    assert "address already in use" in one_line_error(result, "hub")


def test_hub_with_a_missing_or_bad_certificate(tmp_path):
    missing = str(tmp_path / "missing.pem")
    result = blindhub("hub", "--port", "0", "--tls-cert", missing, "--tls-key", missing)
    assert result.returncode == ExitCode.LOCAL_PROBLEM
    assert "No such file" in one_line_error(result, "hub")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    result = blindhub("hub", "--port", "0", "--tls-cert", str(not_pem), "--tls-key", str(not_pem))
    assert result.returncode == ExitCode.LOCAL_PROBLEM
    assert "not a PEM certificate chain" in one_line_error(result, "hub")


def test_hub_recording_metadata_to_a_missing_directory(tmp_path):
    path = tmp_path / "missing" / "x.log"
    result = blindhub("hub", "--port", "0", "--record-metadata", str(path))
    assert result.returncode == ExitCode.LOCAL_PROBLEM
    assert str(path) in one_line_error(result, "hub")


def test_hub_port_out_of_range():
    result = blindhub("hub", "--port", "65536")
    assert result.returncode == ExitCode.USAGE and "--port" in result.stderr


# -- demo


def test_demo_out_where_no_directory_can_be_made(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    # Refused before the experiment runs (it would take a minute), not after.
    result = blindhub("demo", "--out", str(a_file / "sub"))
    assert result.returncode == ExitCode.LOCAL_PROBLEM
    assert "--out" in one_line_error(result, "demo")


# -- id


def test_id_protect_with_no_terminal_and_no_passphrase(tmp_path):
    # A new session has no controlling terminal: the passphrase cannot be asked for.
    result = blindhub("id", "--protect", "--home", str(tmp_path), start_new_session=True)
    assert result.returncode == ExitCode.LOCAL_PROBLEM
    assert "no passphrase" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "identity.json").exists()


# -- contacts


def test_contacts_takes_home_before_or_after_the_action(tmp_path):
    home = tmp_path / "home"
    assert blindhub("id", "--home", str(home)).returncode == 0
    for arguments in (
        ["--home", str(home), "list"],
        ["list", "--home", str(home)],
        ["--home", str(tmp_path / "elsewhere"), "list", "--home", str(home)],
    ):
        result = blindhub("contacts", *arguments)
        assert (result.returncode, result.stderr) == (0, ""), arguments
    result = blindhub("contacts", "forget", "nobody", "--home", str(home))
    assert result.returncode == ExitCode.UNKNOWN_CONTACT
    assert "nobody" in one_line_error(result, "contacts")
    # After the action, --home is the directory used, not the default.
    assert not (Path.home() / ".config" / "blindhub" / "nobody").exists()


# -- call: arguments checked before anything connects


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("room", "bad.room"),
        ("room", "x" * 65),
        ("room", "ümlaut"),
        ("--duration", "-1"),
        ("--duration", "0"),
        ("--duration", "nan"),
        ("--duration", "inf"),
        ("--hub", "http://127.0.0.1:1"),
    ],
)
def test_call_refuses_a_bad_room_duration_or_hub_before_connecting(
    listening_socket, tmp_path, option, value
):
    hub = f"ws://127.0.0.1:{listening_socket.getsockname()[1]}"
    arguments = {"room": "room1", "--hub": hub, "--duration": "1"} | {option: value}
    result = blindhub(
        "call",
        arguments["room"],
        "--hub",
        arguments["--hub"],
        "--duration",
        arguments["--duration"],
        "--name",
        "alice",
        "--home",
        str(tmp_path),
    )
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "Traceback" not in result.stderr
    assert not was_connected(listening_socket)


def test_hub_ca_needs_a_wss_hub_and_a_readable_file(listening_socket, tmp_path):
    port = listening_socket.getsockname()[1]

    def call(hub: str, ca: str) -> subprocess.CompletedProcess[str]:
        return blindhub(
            "call", "room1", "--hub", hub, "--hub-ca", ca, "--name", "alice",
            "--home", str(tmp_path),
        )  # fmt: skip

    result = call(f"ws://127.0.0.1:{port}", str(tmp_path / "ca.pem"))
    assert result.returncode == ExitCode.USAGE
    assert "wss" in one_line_error(result, "call")
    result = call(f"wss://127.0.0.1:{port}", str(tmp_path / "missing.pem"))
    assert result.returncode == ExitCode.LOCAL_PROBLEM
    assert "--hub-ca" in one_line_error(result, "call")
    assert not was_connected(listening_socket)


# -- call: devices


@pytest.mark.parametrize("device", ["mic", "camera"])
def test_a_capture_format_this_pyav_lacks_is_a_media_source_error(monkeypatch, device):
    def no_such_format(file: str, format: str | None = None, **options: object) -> None:
        raise ValueError(f"no container format {format!r}")  # what PyAV raises

    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(client.media, "MediaPlayer", no_such_format)
    with pytest.raises(MediaSourceError, match="no container format"):
        open_sources(device)


@pytest.mark.parametrize("device", ["mic", "camera"])
def test_call_send_a_device_that_cannot_be_opened(monkeypatch, capsys, tmp_path, device):
    def no_such_format(file: str, format: str | None = None, **options: object) -> None:
        raise ValueError(f"no container format {format!r}")

    monkeypatch.setattr(client.media, "MediaPlayer", no_such_format)
    code = main(
        ["call", "room1", "--hub", "ws://127.0.0.1:1", "--name", "alice", "--send", device,
         "--home", str(tmp_path)]
    )  # fmt: skip
    assert code == ExitCode.LOCAL_PROBLEM
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("blindhub call: cannot open the"), err


# -- the last resort


def test_an_unexpected_exception_is_one_line_and_exit_70(monkeypatch, capsys, tmp_path):
    def broken(args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(client.id_command, "run", broken)
    monkeypatch.delenv(TRACEBACK_VARIABLE, raising=False)
    assert main(["id", "--home", str(tmp_path)]) == ExitCode.INTERNAL_ERROR
    assert int(ExitCode.INTERNAL_ERROR) == 70  # documented in docs/reference/cli.md
    err = capsys.readouterr().err
    assert err == (
        "blindhub id: internal error: RuntimeError: a bug "
        f"(set {TRACEBACK_VARIABLE}=1 for the traceback)\n"
    )
    monkeypatch.setenv(TRACEBACK_VARIABLE, "1")
    with pytest.raises(RuntimeError, match="a bug"):
        main(["id", "--home", str(tmp_path)])


# -- every command, a batch of bad inputs, as real processes


def bad_inputs(tmp_path: Path, port_in_use: int) -> list[list[str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not what anyone expects\n")
    missing = str(tmp_path / "missing" / "x")
    hub = f"ws://127.0.0.1:{port_in_use}"
    call = ["call", "room1", "--name", "alice", "--home", str(tmp_path / "home")]
    return [
        ["call"],
        ["call", "room1", "--hub", hub],
        [*call, "--hub", "nonsense"],
        [*call, "--hub", hub, "--duration", "-1"],
        [*call, "--hub", hub, "--duration", "soon"],
        ["call", "bad room", "--name", "alice", "--hub", hub],
        [*call, "--hub", hub, "--name", "\x07"],
        [*call, "--hub", hub, "--send", "nothing-such"],
        [*call, "--hub", hub, "--send", str(a_file)],
        [*call, "--hub", hub, "--send", "tone:5"],
        [*call, "--hub", hub, "--record", missing + ".wav"],
        [*call, "--hub", hub, "--record", str(tmp_path / "x.ogg")],
        [*call, "--hub", hub, "--verify", "maybe"],
        [*call, "--hub", hub, "--hub-ca", str(a_file)],
        [*call, "--hub", "wss://127.0.0.1:1", "--hub-ca", str(a_file)],
        [*call, "--hub", "ws://127.0.0.1:1"],  # nothing listens there: unreachable
        [*call[:-1], str(a_file), "--hub", hub],  # a home that is a file
        ["hub", "--port", str(port_in_use)],
        ["hub", "--port", "-1"],
        ["hub", "--port", "0", "--host", "no-such-host.invalid"],
        ["hub", "--port", "0", "--tls-cert", missing],
        ["hub", "--port", "0", "--tls-cert", missing, "--tls-key", missing],
        ["hub", "--port", "0", "--tls-cert", str(a_file), "--tls-key", str(a_file)],
        ["hub", "--port", "0", "--record-metadata", missing],
        ["hub", "--port", "0", "--record-metadata", str(tmp_path)],
        ["hub", "--max-peers-per-room", "0"],
        ["hub", "--rate-per-second", "fast"],
        ["id", "--home", str(a_file)],
        ["id", "--protect", "--home", str(tmp_path / "new")],
        ["id", "--bogus"],
        ["contacts", "verify", "nobody", "--home", str(a_file)],
        ["contacts", "show"],
        ["contacts", "forget", "nobody", "--home", str(tmp_path / "home")],
        ["contacts", "dance"],
        ["sframe", "inspect", "zz"],
        ["sframe", "inspect", ""],
        ["sframe", "protect", "--suite", "9", "--key", "00", "--kid", "1", "--ctr", "1", "00"],
        ["sframe", "protect", "--suite", "4", "--key", "00", "--kid", "-1", "--ctr", "1", "00"],
        ["sframe", "unprotect", "--suite", "4", "--key", "00" * 16, "00" * 20],
        ["sframe"],
        ["demo", "--seconds", "0"],
        ["demo", "--out", str(a_file / "sub")],
        ["nosuchcommand"],
    ]


def test_no_command_prints_a_traceback_for_any_bad_input(tmp_path, listening_socket):
    port = listening_socket.getsockname()[1]
    environment = {k: v for k, v in os.environ.items() if k != "BLINDHUB_PASSPHRASE"}
    cases = bad_inputs(tmp_path, port)
    # All at once: each is a fresh interpreter, most of the time is imports.
    processes = [
        (
            arguments,
            subprocess.Popen(
                [sys.executable, "-m", "client.cli", *arguments],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=environment,
                start_new_session=True,  # no terminal to ask a passphrase on
            ),
        )
        for arguments in cases
    ]
    commands = set()
    documented = {int(code) for code in ExitCode} - {0}
    for arguments, process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert "Traceback" not in stdout + stderr, (arguments, stderr)
        assert process.returncode in documented, (arguments, process.returncode, stderr)
        assert process.returncode != ExitCode.INTERNAL_ERROR, (arguments, stderr)
        assert stderr.strip(), arguments
        commands.add(arguments[0])
    assert commands >= {"call", "hub", "id", "contacts", "sframe", "demo"}
