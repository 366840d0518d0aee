"""The browser peer's JavaScript runs the published vectors in Chromium, byte for byte.

tests/web/vectors.js runs in the page ``blindhub web`` serves (its Content-Security-Policy in
force) and imports client/web/protocol.js and client/web/sframe.js as the page does: the whole
key agreement of tests/vectors/handshake.json from both sides (every message, the SAS, T, every
key of epochs 0 and 1, the sealed message and the signed rekey) and every header, AES-CTR-HMAC
and SFrame case of tests/vectors/sframe/test-vectors.json (RFC 9605).
"""

import json
from pathlib import Path

from tests.browser import chromium, require_chromium, web_server
from tests.vectors.make_handshake_vectors import seeded_random

VECTORS = Path(__file__).parent / "vectors"
CHECK = Path(__file__).parent / "web" / "vectors.js"
GROUP_CHECK = Path(__file__).parent / "web" / "group_vectors.js"


def random_stream(label: str, blocks: int) -> list[str]:
    """The first ``blocks`` 32-byte draws of ``seeded_random(label)``, as the vectors made them."""
    draw = seeded_random(label)
    return [draw(32).hex() for _ in range(blocks)]


def as_text(case: dict[str, object]) -> dict[str, object]:
    # KIDs and CTRs run to 2^64 - 1, past a JavaScript number: the page reads them as BigInts.
    return {key: str(value) if key in ("kid", "ctr") else value for key, value in case.items()}


async def test_the_javascript_runs_every_published_vector():
    executable = require_chromium()
    handshake = json.loads((VECTORS / "handshake.json").read_text())
    sframe = json.loads((VECTORS / "sframe" / "test-vectors.json").read_text())
    inputs = handshake["inputs"]
    arguments = {
        "handshake": handshake,
        # Each party draws its ephemeral, its nonce, then one key per rekey: three blocks.
        "randomStreams": {
            inputs[label]: random_stream(inputs[label], 3)
            for label in ("initiator_random_label", "responder_random_label")
        },
        "sframe": {
            "header": [as_text(case) for case in sframe["header"]],
            "aes_ctr_hmac": sframe["aes_ctr_hmac"],
            "sframe": [as_text(case) for case in sframe["sframe"]],
        },
    }
    with web_server("ws://127.0.0.1:9") as url:
        async with chromium(executable) as browser:
            page = await browser.new_page()
            await page.goto(url)
            result = await page.evaluate(CHECK.read_text(), arguments)
    assert result["mismatches"] == []
    # Every case was compared: 289 headers twice, 3 + 5 SFrame cases, the key agreement.
    assert result["checked"] > 2 * 289 + 2 * 3 + 5 * 5 + 40, result["checked"]


async def test_the_javascript_runs_the_group_vectors():
    """tests/vectors/group/ through client/web/senderkeys.js: every ratchet step, KID, key and
    salt, the frame under a ratcheted key (followed, held and released, refused as before the
    join), the sealed sender-key plaintexts and the group security code."""
    executable = require_chromium()
    group = json.loads((VECTORS / "group" / "group.json").read_text())
    with web_server("ws://127.0.0.1:9") as url:
        async with chromium(executable) as browser:
            page = await browser.new_page()
            await page.goto(url)
            result = await page.evaluate(GROUP_CHECK.read_text(), group)
    assert result["mismatches"] == []
    # 8 KIDs, 5 suites x 4 steps x 5 values, the frame, the messages and the code.
    assert result["checked"] > 8 + 5 * 4 * 5 + 10, result["checked"]
