"""The routing hub's media server without a call: what becomes of a task of its that fails."""

import asyncio
import logging

import pytest

from signaling.media_server import MediaServer
from signaling.protocol import PeerId


async def test_a_task_that_fails_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    server = MediaServer(logger=logging.getLogger("blindhub.hub"))
    server.start(lambda deliveries: None)

    async def fails() -> None:
        raise RuntimeError("broken")

    waiting: list[asyncio.Task[object]] = []
    started = asyncio.Event()

    async def is_cancelled() -> None:
        task = asyncio.current_task()
        assert task is not None
        waiting.append(task)
        started.set()
        await asyncio.Event().wait()

    with caplog.at_level(logging.INFO, logger="blindhub.hub"):
        server._spawn("failing", PeerId("p"), fails())
        server._spawn("waiting", PeerId("q"), is_cancelled())
        await started.wait()
        [task] = waiting
        task.cancel()  # a cancelled task is no failure
        await server.close()
    [record] = [r for r in caplog.records if r.getMessage() == "media-task-failed"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    fields = record.__dict__["fields"]
    assert fields == {"task": "failing", "peer": "p", "error": "RuntimeError: broken"}
    assert "blindhub_media_task_failures_total 1" in server.metric_lines()
