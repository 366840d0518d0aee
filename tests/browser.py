"""Chromium for the browser-peer tests: found on the system, never downloaded.

Playwright drives the system's Chromium (``executable_path``); without one every browser test
is skipped with one line naming the package to install, and with ``CI=true`` that skip is a
failure, so CI cannot pass without having run them (``.ci/run`` installs the package).
"""

import asyncio
import contextlib
import json
import os
import shutil
import threading
import wave
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from client.media import tone_samples
from client.web_command import make_server

CHROMIUM_NAMES = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")
INSTALL_HINT = "apt-get install chromium (Debian's chromium or chromium-headless-shell package)"

# A closed network and a shared machine: nothing reaches out, nothing extra runs.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Host candidates on the loopback interface, for calls within this machine.
    "--allow-loopback-in-peer-connection",
)


def chromium_path() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    return None


def require_chromium() -> str:
    """The Chromium to run, or skip (fail on CI) saying which package to install."""
    path = chromium_path()
    try:
        import playwright  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        message = f"no Chromium or no playwright: {INSTALL_HINT}; pip install playwright"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the browser tests cannot run: {message}")
        pytest.skip(message)
    return path


def write_tone(path: Path, frequency: float, seconds: float = 10.0) -> Path:
    """A mono 16-bit sine WAV at 48 kHz, the fake microphone's input."""
    samples = tone_samples(frequency, 0, int(seconds * 48_000))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48_000)
        out.writeframes(samples.tobytes())
    return path


@contextlib.contextmanager
def web_server(hub_url: str) -> Iterator[str]:
    """``blindhub web``'s server on a free port, in a thread; yields its base URL."""
    server = make_server(hub_url, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = str(server.server_address[0]), server.server_address[1]
        yield f"http://{host}:{port}/"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.asynccontextmanager
async def chromium(executable: str, extra_args: Sequence[str] = ()) -> AsyncIterator[Any]:
    """One headless Chromium with a fresh temporary profile; each ``new_context()`` of it is a
    separate peer (its own IndexedDB, so its own identity and pins)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=[*CHROMIUM_ARGS, *extra_args]
        )
        try:
            yield browser
        finally:
            await browser.close()


def fake_media_args(tone_wav: Path) -> list[str]:
    return [
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={tone_wav}",
        # The page plays what it receives without a click (a person's click on Join allows it).
        "--autoplay-policy=no-user-gesture-required",
    ]


# -- the page's audit (client/web/audit.js), tripped: Chromium made to send or decode around the
# page's worker

# The page audits every second: a bypass must end its call within five audits.
AUDIT_BOUND_MS = 5_000
# Samples in one Opus frame of the pages and of the Python peer (20 ms at 48 kHz).
OPUS_FRAME_SAMPLES = 960

# Every RTCPeerConnection the page makes, recorded before its scripts run (a context's init
# script): the test reaches the page's media connection without a hook in the page.
RECORD_CONNECTIONS = """(() => {
  const Native = window.RTCPeerConnection;
  window.recordedConnections = [];
  window.RTCPeerConnection = class extends Native {
    constructor(...args) {
      super(...args);
      window.recordedConnections.push(this);
    }
  };
})();"""

# Takes the page's worker off every sender (side "send") or every receiver ("receive") of one
# kind on its first connection: "removed" sets the transform to null, "passed-through" gives the
# frames to a worker of the test's that hands each on unchanged (a worker from a blob: URL, so
# the context must bypass the page's Content-Security-Policy). Returns the mids.
BYPASS = """([side, kind, how]) => {
  const [pc] = window.recordedConnections;
  const passThrough = () => {
    const code = "onrtctransform = ({ transformer: t }) => t.readable.pipeTo(t.writable);";
    const worker = new Worker(URL.createObjectURL(new Blob([code], { type: "text/javascript" })));
    return new RTCRtpScriptTransform(worker, {});
  };
  const bypassed = [];
  for (const transceiver of pc.getTransceivers()) {
    const way = side === "send" ? "send" : "recv";
    if (transceiver.receiver.track.kind !== kind || !transceiver.direction.includes(way)) continue;
    const end = side === "send" ? transceiver.sender : transceiver.receiver;
    end.transform = how === "removed" ? null : passThrough();
    bypassed.push(transceiver.mid);
  }
  return bypassed;
}"""


async def bypass_and_time_the_end(page: Any, side: str, kind: str, how: str) -> str:
    """Bypass the page's worker (``BYPASS``) and return the state line the page shows when it
    ends the call; fails if that takes longer than AUDIT_BOUND_MS."""
    assert await page.evaluate(BYPASS, [side, kind, how]), (side, kind)
    failed = page.locator("#state.state-failed")
    try:
        await failed.wait_for(timeout=AUDIT_BOUND_MS)
    except Exception:
        audit = await page.locator("#roster").get_attribute("data-audit")
        raise AssertionError(f"the call went on past {AUDIT_BOUND_MS} ms: {audit}") from None
    return await failed.text_content() or ""


async def audit_once_decoded(page: Any, kinds: list[str]) -> dict[str, Any]:
    """The page's last audit (``data-audit``: Chromium's counts against its worker's,
    client/web/audit.js) once its receiving slots that got media are of ``kinds`` (sorted) and
    each decoded some, and both kinds were sent: ``sent`` by kind (``left``: audio payload
    bytes Chromium sent, or video frames it encoded; ``allowed``: the most the audit lets pass;
    ``encrypted``; and for video ``given``, the frames given to the worker, and ``dropped``,
    those it did not pass on) and ``slots`` by mid, those that got media only (kind, packets,
    frames the worker was given and passed on, frames or audio samples decoded, and the most
    the audit allows)."""
    audit: dict[str, Any] = {}
    for _ in range(120):
        audit = json.loads(await page.locator("#roster").get_attribute("data-audit") or "{}")
        audit["slots"] = {
            mid: slot for mid, slot in audit.get("slots", {}).items() if slot["packets"]
        }
        sent = audit.get("sent", {}).values()
        if (
            sorted(slot["kind"] for slot in audit["slots"].values()) == kinds
            and all(s["decoded"] > 0 for s in audit["slots"].values())
            and len(sent) == 2
            and all(s["left"] > 0 and s["encrypted"] > 0 for s in sent)
        ):
            return audit
        await asyncio.sleep(0.25)
    raise AssertionError(f"not every receiver decoded: {audit}")


def assert_everything_went_through_the_worker(audit: dict[str, Any]) -> None:
    """A page's audit (``data-audit``) of an honest call, two-party or group, is within bounds:
    Chromium decoded and sent only what went through the page's worker."""
    for mid, slot in audit["slots"].items():
        # Every frame a decoder got went through the worker, which decrypted it.
        assert slot["given"] >= slot["passed"] > 0, (mid, slot)
        per_frame = 1 if slot["kind"] == "video" else OPUS_FRAME_SAMPLES
        assert slot["decoded"] <= slot["passed"] * per_frame, (mid, slot)
    for kind in ("audio", "video"):
        # And nothing left that did not go to the worker (Chromium counts a video frame as sent
        # once encoded, so it is compared with the frames given to the worker, and one more on
        # its way there).
        sent = audit["sent"][kind]
        assert sent["allowed"] >= sent["left"] > 0, (kind, audit["sent"])
