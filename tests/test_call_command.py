"""``blindhub call`` against ``blindhub hub`` as real processes: wss with a self-signed hub
certificate, and the one line per phase a user sees while a call is set up."""

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.exit_codes import ExitCode
from tests.tls import self_signed_certificate

PHASES = [
    "connecting to the hub at ",
    "waiting for a peer in room room1",
    "a peer joined: agreeing keys",
    "media flowing, end-to-end encrypted",
]


async def start(*arguments: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client.cli",
        *arguments,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_until(process: asyncio.subprocess.Process, text: str) -> str:
    """stdout up to and including the line holding ``text``."""
    assert process.stdout is not None
    shown = ""
    while text not in shown:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line, shown
        shown += line.decode()
    return shown


async def finish(process: asyncio.subprocess.Process, shown: str = "") -> tuple[int, str, str]:
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, shown + stdout.decode(), stderr.decode()


@dataclass
class TlsHub:
    url: str
    certificate: Path


@pytest.fixture
async def tls_hub(tmp_path: Path) -> AsyncIterator[TlsHub]:
    """``blindhub hub`` serving wss with a self-signed certificate, on a free port."""
    certificate, key = self_signed_certificate(tmp_path)
    hub = await start(
        "hub", "--port", "0", "--quiet", "--tls-cert", str(certificate), "--tls-key", str(key)
    )
    try:
        line = await read_until(hub, "listening on ")
        url = line.split("listening on ", 1)[1].strip()
        assert url.startswith("wss://127.0.0.1:"), line
        yield TlsHub(url, certificate)
    finally:
        hub.terminate()
        code, _, err = await finish(hub)
        assert code == 0 and "Traceback" not in err, err


def call(hub: TlsHub, home: Path, name: str, *extra: str) -> list[str]:
    return [
        "call", "room1", "--hub", hub.url, "--name", name, "--home", str(home / name),
        "--verify", "tofu", *extra,
    ]  # fmt: skip


async def test_a_hub_certificate_that_does_not_verify_is_refused_in_one_line(tls_hub, tmp_path):
    # The system's trust store does not hold the self-signed certificate.
    code, out, err = await finish(await start(*call(tls_hub, tmp_path, "alice")))
    assert code == ExitCode.HUB_NOT_TRUSTED, err
    assert int(ExitCode.HUB_NOT_TRUSTED) == 12  # documented in docs/reference/cli.md
    assert err.startswith("blindhub call: the hub at wss://") and "not trusted" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in out + err
    assert out.splitlines() == [f"connecting to the hub at {tls_hub.url}"]
    # Another CA is no better: only the certificate itself, or its issuer, is trusted.
    (tmp_path / "other").mkdir()
    other, _ = self_signed_certificate(tmp_path / "other")
    code, _, err = await finish(
        await start(*call(tls_hub, tmp_path, "alice", "--hub-ca", str(other)))
    )
    assert code == ExitCode.HUB_NOT_TRUSTED, err


@pytest.mark.slow
async def test_a_call_over_wss_with_hub_ca_shows_each_phase_in_order(tls_hub, tmp_path):
    ca = ("--hub-ca", str(tls_hub.certificate), "--duration", "2")
    alice = await start(*call(tls_hub, tmp_path, "alice", *ca))
    # alice is alone in the room: she says so, and the call waits for bob.
    shown = await read_until(alice, "waiting for a peer")
    bob = await start(*call(tls_hub, tmp_path, "bob", *ca))
    (a_code, a_out, a_err), (b_code, b_out, b_err) = await asyncio.gather(
        finish(alice, shown), finish(bob)
    )
    assert (a_code, b_code) == (0, 0), (a_err, b_err)
    assert "Traceback" not in a_err + b_err
    for out, phases in ((a_out, PHASES), (b_out, [PHASES[0], *PHASES[2:]])):
        lines = out.splitlines()
        at = [next(i for i, line in enumerate(lines) if line.startswith(p)) for p in phases]
        assert at == sorted(at), out
        # The protection state comes between the key agreement and the media.
        protected = next(i for i, line in enumerate(lines) if "end-to-end encrypted (" in line)
        assert at[-2] < protected < at[-1], out
        assert "call ended (" in out  # by its duration, or the peer's bye at the end of its own
    assert not any(line.startswith(PHASES[1]) for line in b_out.splitlines())  # bob found alice
    assert os.path.exists(tmp_path / "bob" / "known_peers.json")
