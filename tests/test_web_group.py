"""A browser in a three-party group call through a real routing hub, with two Python members.

The hub (``MediaServer`` + ``HubServer``, as tests/test_group_call.py starts it) routes every
frame; alice (Python) is in the room first, then the browser joins (it answers alice's key
agreement), then bob (Python; the browser starts that one). The browser's fake microphone plays
660 Hz, alice and bob their own tones. Everyone must hear everyone within 5 Hz (the page with
its WebAudio analyser on each member's slot, as the two-party tests read it), the page and both
Python members must show the same group security code, and no frame may fail anywhere. Every
frame the page decodes must have gone through its worker: per slot, Chromium's decoded count
never exceeds what the worker decrypted and passed on.
"""

import asyncio
import json
from typing import Any

import pytest

from client.experiment.analysis import dominant_frequency
from client.group_call import GroupCall
from signaling.protocol import PeerId
from tests.browser import chromium, fake_media_args, require_chromium, web_server, write_tone
from tests.conftest import wait_for
from tests.test_group_call import AUDIO_SAMPLES, TONES, member, start_routed_hub  # noqa: F401

pytestmark = pytest.mark.slow

BROWSER_TONE = 660.0
TOLERANCE = 5.0
# The Python members send 20 ms Opus frames at 48 kHz.
OPUS_FRAME_SAMPLES = 960


async def member_row(page, name: str):
    """The page's roster row of the member named ``name``, once it is on the roster."""
    row = page.locator("#roster tbody tr", has=page.locator("td.peer", has_text=name))
    await row.wait_for(timeout=30_000)
    return row


async def hears(page, name: str, expected: float, timeout: float = 30.0) -> float:
    cell = (await member_row(page, name)).locator("td.decrypted")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    heard = ""
    history = []
    while loop.time() < deadline:
        heard = await cell.get_attribute("data-hearing") or ""
        history.append(heard)
        # Three readings in a row (0.75 s): noise peaks anywhere, so one reading could hit.
        if all(h and abs(float(h) - expected) <= TOLERANCE for h in history[-3:]) and (
            len(history) >= 3
        ):
            return float(heard)
        await asyncio.sleep(0.25)
    counted = await page.locator("#roster").get_attribute("data-counters")
    log = await page.locator("#log").inner_text()
    raise AssertionError(
        f"the page heard {heard or 'nothing'} Hz from {name}, not {expected}: {history}\n"
        f"{counted}\n{log}"
    )


async def audit_once_decoded(page) -> dict[str, Any]:
    """The page's last audit (Chromium's counts against its worker's) once every slot that
    receives media decoded something: ``sent`` by kind (``left``: audio packets or video frames
    Chromium sent, ``encrypted``: frames the worker encrypted) and ``slots`` by mid (kind,
    packets, frames the worker was given and passed on, frames or audio samples decoded)."""
    audit: dict[str, Any] = {}
    for _ in range(120):
        audit = json.loads(await page.locator("#roster").get_attribute("data-audit") or "{}")
        audit["slots"] = {
            mid: slot for mid, slot in audit.get("slots", {}).items() if slot["packets"]
        }
        if len(audit["slots"]) == 4 and all(s["decoded"] > 0 for s in audit["slots"].values()):
            return audit
        await asyncio.sleep(0.25)
    raise AssertionError(f"not every slot decoded: {audit}")


async def confirm_every_sas(page, count: int) -> None:
    """Answer the page's SAS question for each new member: it asks one at a time."""
    for _ in range(count):
        await page.locator("#sas-box").wait_for(state="visible", timeout=30_000)
        asked = await page.locator("#sas-peer").text_content()
        await page.locator("#sas-yes").click()
        await page.wait_for_function(
            "(asked) => document.getElementById('sas-box').hidden || "
            "document.getElementById('sas-peer').textContent !== asked",
            arg=asked,
        )


async def test_a_browser_in_a_three_party_routed_call(start_routed_hub, tmp_path):  # noqa: F811
    executable = require_chromium()
    hub = await start_routed_hub()
    tone = write_tone(tmp_path / "tone.wav", BROWSER_TONE)
    alice = GroupCall(member(hub, "alice"))
    bob = GroupCall(member(hub, "bob"))
    tasks = [asyncio.create_task(alice.run())]
    try:
        with web_server(hub.url) as url:
            async with chromium(executable, fake_media_args(tone)) as browser:
                await wait_for(lambda: alice.session is not None)
                page = await (await browser.new_context()).new_page()
                await page.goto(f"{url}?room=group&name=browser&autojoin=1")
                await page.locator("#log", has_text="joined room group").wait_for()
                tasks.append(asyncio.create_task(bob.run()))
                await confirm_every_sas(page, 2)

                # The same code on the three screens, over the three members.
                def python_codes() -> set[str | None]:
                    return {alice.stats.security_code, bob.stats.security_code}

                code = ""
                for _ in range(120):
                    code = await page.locator("#group-code").text_content() or ""
                    rows = await page.locator("#roster tbody tr").count()
                    if rows == 2 and python_codes() == {code}:
                        break
                    await asyncio.sleep(0.25)
                assert python_codes() == {code}, (code, python_codes())
                state = await page.locator("#state.state-secure").text_content() or ""
                assert "End-to-end encrypted (AES_128_GCM_SHA256_128) with alice" in state
                assert "bob" in state and code in state

                await hears(page, "alice", TONES["alice"])
                await hears(page, "bob", TONES["bob"])

                def heard_browser(call: GroupCall) -> bool:
                    return any(
                        call.stats.members.get(peer) is not None
                        and call.stats.members[peer].name == "browser"
                        and len(media.samples) >= AUDIO_SAMPLES
                        for peer, media in call.received.items()
                    )

                await wait_for(lambda: heard_browser(alice) and heard_browser(bob), timeout=30)
                for name in ("alice", "bob"):
                    row = await member_row(page, name)
                    for kind in ("audio", "video"):
                        # Both kinds decrypt, and none fails.
                        cell = await row.locator("td.decrypted").element_handle()
                        try:
                            await page.wait_for_function(
                                "([cell, kind]) => Number(cell.dataset[kind]) > 0", arg=[cell, kind]
                            )
                        except Exception:
                            raise AssertionError(
                                (await page.locator("#roster").get_attribute("data-counters") or "")
                                + await page.locator("#log").inner_text()
                            ) from None
                        failed = await row.locator("td.failed").get_attribute(f"data-{kind}")
                        assert failed == "0", (name, kind, failed)
                audit = await audit_once_decoded(page)
                slots = audit["slots"]
                assert sorted(slot["kind"] for slot in slots.values()) == [
                    "audio",
                    "audio",
                    "video",
                    "video",
                ], slots
                for mid, slot in slots.items():
                    # Every frame a decoder got went through the worker, which decrypted it.
                    assert slot["given"] >= slot["passed"] > 0, (mid, slot)
                    per_frame = 1 if slot["kind"] == "video" else OPUS_FRAME_SAMPLES
                    assert slot["decoded"] <= slot["passed"] * per_frame, (mid, slot)
                for kind in ("audio", "video"):
                    # And nothing left that the worker did not encrypt.
                    sent = audit["sent"][kind]
                    assert sent["encrypted"] >= sent["left"] > 0, (kind, audit["sent"])
                await page.locator("#leave").click()
                await page.locator("#state", has_text="Group call ended").wait_for()
    finally:
        for call in (alice, bob):
            call.hangup("done")
        summaries = await asyncio.gather(*tasks)
    for call, summary in zip((alice, bob), summaries, strict=True):
        [(peer, stats)] = [(p, m) for p, m in summary.members.items() if m.name == "browser"]
        media = call.received[PeerId(peer)]
        heard = dominant_frequency(media.samples, media.sample_rate)
        assert abs(heard - BROWSER_TONE) <= TOLERANCE, (call.config.name, heard)
        assert stats.audio["frames"] > 0 and stats.audio["failed"] == 0, stats.audio
        assert stats.video.get("frames", 0) > 0 and stats.video.get("failed", 0) == 0, stats.video
        others = [m for m in summary.members.values() if m.name not in ("browser", None)]
        assert all(m.audio["failed"] == 0 for m in others), others
