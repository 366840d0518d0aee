"""The SFrame worker's send keys (client/web/worker.js), run by Node.js outside a browser.

tests/web/worker_send_keys.mjs drives the worker's message handler and a video send transform,
holding one sender key's import back: the page's switches take effect in the order it asked for
them, and a group rekey drops no frame while the new key is imported.
"""

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from playwright._impl._driver import compute_driver_executable

ROOT = Path(__file__).parent.parent
HARNESS = Path(__file__).parent / "web" / "worker_send_keys.mjs"


def run(scenario: str) -> dict[str, Any]:
    # The Node.js that Playwright ships: there whenever the browser tests can run.
    node = compute_driver_executable()[0]
    done = subprocess.run(
        [node, str(HARNESS), str(ROOT / "client" / "web"), scenario],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize(
    ("scenario", "kids"),
    [
        # Key 1's import finishes after key 2's: frames go under key 2, the one asked for last.
        ("overtaken", [2]),
        # A frame given while key 2 is imported goes under key 1, not dropped.
        ("rekey", [1]),
    ],
)
def test_group_send_keys_switch_in_order_and_drop_no_frame(scenario: str, kids: list[int]) -> None:
    result = run(scenario)
    assert result == {"kids": kids, "dropped": {"audio": 0, "video": 0}}, result
