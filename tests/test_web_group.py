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
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from client.experiment.analysis import dominant_frequency
from client.group_call import GroupCall, GroupStats
from signaling.protocol import PeerId
from signaling.server import HubServer
from tests.browser import (
    OPUS_FRAME_SAMPLES,
    RECORD_CONNECTIONS,
    assert_everything_went_through_the_worker,
    audit_once_decoded,
    bypass_and_time_the_end,
    chromium,
    fake_media_args,
    require_chromium,
    web_server,
    write_tone,
)
from tests.conftest import wait_for
from tests.test_group_call import AUDIO_SAMPLES, TONES, member, start_routed_hub  # noqa: F401

pytestmark = pytest.mark.slow

BROWSER_TONE = 660.0
TOLERANCE = 5.0
# What the page receives from its two members.
GROUP_RECEIVERS = ["audio", "audio", "video", "video"]


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


@dataclass
class BrowserInGroup:
    """The page between two Python members, alice and bob; ``summaries`` (alice's, bob's) once
    both hung up."""

    page: Any
    alice: GroupCall
    bob: GroupCall
    tasks: list[asyncio.Task[GroupStats]]
    summaries: list[GroupStats] = field(default_factory=list)


@contextlib.asynccontextmanager
async def browser_between_alice_and_bob(
    hub: HubServer, tmp_path: Path, init_script: str | None = None, bypass_csp: bool = False
) -> AsyncIterator[BrowserInGroup]:
    """alice (Python) in the room first, then the page (it answers alice's key agreement), then
    bob (Python; the page starts that one), every SAS confirmed on the page; ``init_script``
    runs in the page before its own scripts."""
    executable = require_chromium()
    tone = write_tone(tmp_path / "tone.wav", BROWSER_TONE)
    alice = GroupCall(member(hub, "alice"))
    bob = GroupCall(member(hub, "bob"))
    tasks = [asyncio.create_task(alice.run())]
    group: BrowserInGroup | None = None
    try:
        with web_server(hub.url) as url:
            async with chromium(executable, fake_media_args(tone)) as browser:
                await wait_for(lambda: alice.session is not None)
                context = await browser.new_context(bypass_csp=bypass_csp)
                if init_script is not None:
                    await context.add_init_script(init_script)
                page = await context.new_page()
                await page.goto(f"{url}?room=group&name=browser&autojoin=1")
                await page.locator("#log", has_text="joined room group").wait_for()
                tasks.append(asyncio.create_task(bob.run()))
                await confirm_every_sas(page, 2)
                group = BrowserInGroup(page, alice, bob, tasks)
                yield group
    finally:
        for call in (alice, bob):
            call.hangup("done")
        summaries = await asyncio.gather(*tasks)
    if group is not None:
        group.summaries = summaries


async def test_a_browser_in_a_three_party_routed_call(start_routed_hub, tmp_path):  # noqa: F811
    hub = await start_routed_hub()
    async with browser_between_alice_and_bob(hub, tmp_path) as group:
        page, alice, bob = group.page, group.alice, group.bob

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
        assert_everything_went_through_the_worker(await audit_once_decoded(page, GROUP_RECEIVERS))
        await page.locator("#leave").click()
        await page.locator("#state", has_text="Group call ended").wait_for()
    for call, summary in zip((alice, bob), group.summaries, strict=True):
        [(peer, stats)] = [(p, m) for p, m in summary.members.items() if m.name == "browser"]
        media = call.received[PeerId(peer)]
        heard = dominant_frequency(media.samples, media.sample_rate)
        assert abs(heard - BROWSER_TONE) <= TOLERANCE, (call.config.name, heard)
        assert stats.audio["frames"] > 0 and stats.audio["failed"] == 0, stats.audio
        assert stats.video.get("frames", 0) > 0 and stats.video.get("failed", 0) == 0, stats.video
        others = [m for m in summary.members.values() if m.name not in ("browser", None)]
        assert all(m.audio["failed"] == 0 for m in others), others


# -- the page's audit, tripped: Chromium made to send or decode around the page's worker


async def bypass_once_decoded(page, side: str, kind: str, how: str) -> str:
    """Bypass the worker once every slot decoded, and return the state line the page shows
    when it ends the call (within AUDIT_BOUND_MS)."""
    await audit_once_decoded(page, GROUP_RECEIVERS)
    return await bypass_and_time_the_end(page, side, kind, how)


async def the_others_keep_their_call(alice: GroupCall, bob: GroupCall) -> None:
    """alice and bob see the page leave, and each goes on hearing the other."""

    def browser_left(call: GroupCall) -> bool:
        return any(m.name == "browser" and m.left for m in call.stats.members.values())

    def heard(call: GroupCall, name: str) -> int:
        members = call.stats.members
        return sum(
            len(media.samples)
            for peer, media in call.received.items()
            if peer in members and members[peer].name == name
        )

    await wait_for(lambda: browser_left(alice) and browser_left(bob), timeout=15)
    before = heard(alice, "bob"), heard(bob, "alice")
    # A further second of each other's audio.
    await wait_for(
        lambda: (
            heard(alice, "bob") >= before[0] + 48_000 and heard(bob, "alice") >= before[1] + 48_000
        ),
        timeout=10,
    )
    assert not any(m.left for m in alice.stats.members.values() if m.name == "bob")
    assert not any(m.left for m in bob.stats.members.values() if m.name == "alice")


@pytest.mark.parametrize(
    ("kind", "how", "unit"),
    [("video", "removed", "frames"), ("audio", "passed-through", "bytes")],
    ids=["camera-transform-removed", "microphone-passed-through"],
)
async def test_the_audit_ends_the_call_when_media_leaves_unencrypted(
    start_routed_hub,  # noqa: F811
    tmp_path,
    kind,
    how,
    unit,
):
    """Mid-call, Chromium's sender of one kind stops going through the page's worker: its
    frames leave in clear. The page ends its call within a few audits, saying so; alice and
    bob keep their call.

    (With the audio sender's transform removed, Chromium 150 sends no audio at all: nothing
    leaves, nothing to catch, so the microphone is bypassed with a transform of the test's.
    With the camera's removed, Chromium 150 also sends nothing, but goes on counting the
    frames as sent: the audit catches that count, and alice and bob get no clear frame.)"""
    hub = await start_routed_hub()
    async with browser_between_alice_and_bob(
        hub, tmp_path, RECORD_CONNECTIONS, bypass_csp=how == "passed-through"
    ) as group:
        state = await bypass_once_decoded(group.page, "send", kind, how)
        found = re.fullmatch(
            r"NOT end-to-end encrypted: the group call failed \(CallFailed\): the browser sent "
            rf"(\d+) {kind} {unit} from (\d+) {unit} (?:given to|encrypted by) our worker: "
            r"media left "
            r"unencrypted\. No media is sent\.",
            state,
        )
        assert found is not None, state
        assert int(found[1]) > int(found[2]), state
        await the_others_keep_their_call(group.alice, group.bob)
    if kind == "video":
        # Chromium counts the camera's frames as sent (framesSent, which the audit reads) but
        # puts none of them on the wire once the transform is removed: its packetsSent stops
        # and the hub receives no further video packet from the page. So no clear VP8 frame
        # reaches alice or bob, and nothing of the page's video fails there. (A clear VP8
        # frame that did arrive would parse as an SFrame header, and about half of them under
        # a KID of the page's generation, which fail: see
        # tests/test_group_call.py::test_a_members_video_in_clear_is_refused_and_never_decoded.)
        for summary in group.summaries:
            [browser] = [m for m in summary.members.values() if m.name == "browser"]
            assert browser.video["failed"] == 0, browser.video


async def test_the_audit_ends_the_call_when_ciphertext_reaches_an_audio_decoder(
    start_routed_hub,  # noqa: F811
    tmp_path,
):
    """Mid-call, the members' audio slots stop going through the page's worker: Chromium's
    Opus decoder takes the SFrame ciphertext as audio and makes noise of it. The page ends its
    call within a few audits, saying so, however long the call had lasted; alice and bob keep
    theirs.

    Not tested, as nothing there can be caught: a receiver's transform set to null (Chromium
    150 then gives its decoder nothing at all), and ciphertext passed on to a video slot (no
    VP8 frame decodes from it, so Chromium counts none decoded)."""
    hub = await start_routed_hub()
    async with browser_between_alice_and_bob(
        hub, tmp_path, RECORD_CONNECTIONS, bypass_csp=True
    ) as group:
        state = await bypass_once_decoded(group.page, "receive", "audio", "passed-through")
        found = re.fullmatch(
            r"NOT end-to-end encrypted: the group call failed \(CallFailed\): the browser decoded "
            r"(\d+) audio samples on slot (\d+) from (\d+) frames our worker decrypted: media "
            r"reached a decoder without being decrypted\. No media is sent\.",
            state,
        )
        assert found is not None, state
        assert int(found[1]) > int(found[3]) * OPUS_FRAME_SAMPLES, state
        await the_others_keep_their_call(group.alice, group.bob)
