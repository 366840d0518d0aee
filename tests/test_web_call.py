"""Browser peers in real calls through a real hub: browser to browser, and browser to the
Python peer (``blindhub call``) in both directions.

Each Chromium peer is a context of one headless Chromium whose fake microphone plays a tone WAV
the test wrote; the page shows the strongest frequency it receives (a WebAudio analyser on the
decrypted remote track), which the test reads. Both sides must show the same SAS, and every
frame must decrypt.
"""

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest

from client.experiment.analysis import dominant_frequency
from tests.browser import chromium, fake_media_args, require_chromium, web_server, write_tone

pytestmark = pytest.mark.slow

DOCS = Path(__file__).parent.parent / "docs"
BROWSER_TONE = 660.0
PYTHON_TONE = 440.0
TOLERANCE = 5.0
SAS = re.compile(r"SAS to read aloud: (\d{5} \d{5} \d{5})")


async def open_peer(browser, url: str, room: str, name: str):
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"{url}?room={room}&name={name}&autojoin=1")
    return page


async def confirm_sas(page) -> str:
    await page.locator("#sas-box").wait_for(state="visible", timeout=20_000)
    sas = await page.locator("#sas").text_content()
    await page.locator("#sas-yes").click()
    return sas or ""


async def hearing(page, expected: float, timeout: float = 20.0) -> float:
    """The frequency the page hears from its peer, once it is within the tolerance."""
    cell = page.locator("#roster tbody td.decrypted").first
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    heard = ""
    while loop.time() < deadline:
        heard = await cell.get_attribute("data-hearing") or ""
        if heard and abs(float(heard) - expected) <= TOLERANCE:
            return float(heard)
        await asyncio.sleep(0.25)
    raise AssertionError(f"the page heard {heard or 'nothing'} Hz, not {expected} Hz")


async def counters(page) -> dict[str, int]:
    """The page's frame counters for its peer, once frames have gone both ways (the worker
    reports them twice a second)."""
    row = page.locator("#roster tbody tr").first
    seen: dict[str, int] = {}
    for _ in range(40):
        seen = {
            name: int(await row.locator(f"td.{name}").text_content() or "0")
            for name in ("sent", "decrypted", "failed")
        }
        if seen["sent"] and seen["decrypted"]:
            break
        await asyncio.sleep(0.25)
    return seen


async def secure_state(page) -> str:
    state = page.locator("#state.state-secure")
    await state.wait_for(timeout=20_000)
    return await state.text_content() or ""


async def test_browser_to_browser(hub, tmp_path):
    executable = require_chromium()
    tone = write_tone(tmp_path / "tone.wav", BROWSER_TONE)
    with web_server(hub.url) as url:
        async with chromium(executable, fake_media_args(tone)) as browser:
            alice = await open_peer(browser, url, "b2b", "alice")
            await alice.locator("#state", has_text="Waiting for a peer").wait_for()
            bob = await open_peer(browser, url, "b2b", "bob")
            sas_alice, sas_bob = await asyncio.gather(confirm_sas(alice), confirm_sas(bob))
            assert sas_alice == sas_bob and re.fullmatch(r"\d{5} \d{5} \d{5}", sas_alice)
            for page, peer in ((alice, "bob"), (bob, "alice")):
                state = await secure_state(page)
                assert f"End-to-end encrypted (AES_128_GCM_SHA256_128) with {peer}, VERIFIED" in state
                assert sas_alice in state
                await hearing(page, BROWSER_TONE)
            shot = DOCS / "howto" / "browser-peer-call.png"
            await alice.screenshot(path=str(shot), full_page=True)
            assert "End-to-end encrypted" in (await alice.locator("#state").text_content() or "")
            for page in (alice, bob):
                seen = await counters(page)
                assert seen["sent"] > 0 and seen["decrypted"] > 0 and seen["failed"] == 0, seen
