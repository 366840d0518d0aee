"""The browser peer: call setup time and the JavaScript SFrame's per-frame cost.

Run: ``python -m tests.bench.web [--runs N]`` (needs Chromium; see tests/browser.py).

- Setup: from joining the hub to the first decrypted audio frame, for the peer that joins
  second (the responder), through a real hub on this machine: a browser calling the Python
  peer (``blindhub call``) against two Python peers. Each side's own clock: the page's
  ``data-setup-ms``, the Python peer's ``setup_seconds`` (``--stats-json``). No one is asked
  anything: the Python peers use ``--verify tofu``, and the page holds a verified pin of the
  Python peer's key (made before, as after an earlier call), so it asks no SAS question.
- SFrame: ``SendContext.protect`` + ``ReceiveContext.unprotect`` of client/web/sframe.js on
  an 80-byte frame (32 kbit/s Opus, 20 ms) and a 10 000-byte one (a video frame), against
  WebCrypto's AES-GCM encrypt + decrypt alone of the same bytes under one imported key, both in
  one of the page's own SFrame workers (``worker.js``, the worker every call's frames go
  through; the page's policy admits no other), which the bench starts and evaluates in.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

from client.identity_store import open_identity
from signaling.hub import Hub
from signaling.server import HubServer
from tests.browser import chromium, fake_media_args, require_chromium, web_server, write_tone
from tests.conftest import wait_for
from tests.test_web_call import start_python_peer

SFRAME_BENCH = """
async ([size, rounds]) => {
  const s = await import("/sframe.js");
  const frame = crypto.getRandomValues(new Uint8Array(size));
  const meta = new TextEncoder().encode("audio");
  const base = crypto.getRandomValues(new Uint8Array(32));
  const sender = new s.SendContext(4);
  const receiver = new s.ReceiveContext(4);
  await sender.addKey(0n, base);
  await receiver.addKey(0n, base);
  const usages = ["encrypt", "decrypt"];
  const key = await crypto.subtle.importKey("raw", base.slice(0, 16), "AES-GCM", false, usages);
  const iv = new Uint8Array(12);
  const time = async (body) => {
    for (let i = 0; i < 200; i++) await body();
    const start = performance.now();
    for (let i = 0; i < rounds; i++) await body();
    return ((performance.now() - start) * 1000) / rounds;
  };
  const sframe = await time(async () =>
    receiver.unprotect(await sender.protect(0n, frame, meta), meta));
  const bare = await time(async () => {
    const params = { name: "AES-GCM", iv, additionalData: meta };
    await crypto.subtle.decrypt(params, key, await crypto.subtle.encrypt(params, key, frame));
  });
  return { sframe, bare };
}
"""


START_WORKER = """
() => { window.benchWorker = new Worker("worker.js", { type: "module", name: "bench" }); }
"""


async def python_to_python(hub: HubServer, out: Path) -> float:
    first = await start_python_peer(hub.url, "bench-py", out / "a", out / "a")
    await wait_for(lambda: hub.hub.room_size("bench-py") == 1, timeout=30)
    second = await start_python_peer(hub.url, "bench-py", out / "b", out / "b")
    await asyncio.gather(first.communicate(), second.communicate())
    stats = json.loads((out / "b" / "stats.json").read_text())
    return float(stats["setup_seconds"]) * 1000


PIN_VERIFIED = """async ([name, key]) => {
  const { pins } = await import("/store.js");
  await pins.check(name, new Uint8Array(key));
  await pins.markVerified(name);
}"""


async def browser_to_python(browser, url: str, hub: HubServer, out: Path) -> float:
    python = open_identity(out / "home", environ={})
    page = await (await browser.new_context()).new_page()
    await page.goto(url)
    await page.locator("body[data-ready='1']").wait_for()
    await page.evaluate(PIN_VERIFIED, ["python", list(python.public_key.raw)])
    await page.goto(f"{url}?room=bench-web&name=browser&autojoin=1")
    await page.locator("#state", has_text="Waiting for a peer").wait_for()
    process = await start_python_peer(hub.url, "bench-web", out / "home", out)
    await process.communicate()
    await page.context.close()
    return float(json.loads((out / "stats.json").read_text())["setup_seconds"]) * 1000


def print_setup(web: list[float], python: list[float]) -> None:
    print(f"setup, join to first decrypted audio, responder side, {len(web)} runs (ms):")
    for label, values in (("browser -> Python", web), ("Python -> Python ", python)):
        runs_ms = [round(value) for value in values]
        print(f"  {label}: median {statistics.median(values):.0f}  {runs_ms}")


async def main(runs: int, setup: bool) -> None:
    executable = require_chromium()
    hub = HubServer(Hub())
    await hub.start()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        tone = write_tone(root / "tone.wav", 660.0)
        with web_server(hub.url) as url:
            async with chromium(executable, fake_media_args(tone)) as browser:
                web, python = [], []
                for run in range(runs if setup else 0):
                    for name in ("w", "p/a", "p/b"):
                        (root / str(run) / name).mkdir(parents=True)
                    web.append(await browser_to_python(browser, url, hub, root / str(run) / "w"))
                    python.append(await python_to_python(hub, root / str(run) / "p"))
                if setup:
                    print(
                        f"setup, join to first decrypted audio, responder side, {runs} runs (ms):"
                    )
                    for label, values in (
                        ("browser -> Python", web),
                        ("Python -> Python ", python),
                    ):
                        runs_ms = [round(value) for value in values]
                        print(f"  {label}: median {statistics.median(values):.0f}  {runs_ms}")
                context = await browser.new_context()
                page = await context.new_page()
                await page.goto(url)
                async with page.expect_worker() as started:
                    await page.evaluate(START_WORKER)
                worker = await started.value
                print("SFrame per frame, in the page's SFrame worker:")
                for size in (80, 10_000):
                    result = await worker.evaluate(SFRAME_BENCH, [size, 2000])
                    print(
                        f"  {size:>6} B frame: SFrame protect+unprotect {result['sframe']:.1f} us, "
                        f"bare AES-GCM encrypt+decrypt {result['bare']:.1f} us "
                        f"({result['sframe'] / result['bare']:.2f}x)"
                    )
    await hub.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sframe-only", action="store_true", help="skip the setup timing")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.runs, not arguments.sframe_only))
    sys.exit(0)
