"""Poll pacing: under load, the hub gathers more messages for each poll of its sockets.

A hub that goes back to the kernel as soon as it has relayed a message polls, reads, writes
and is woken up once per message, and so is the client it writes to: on this machine that
was most of the difference between the hub's CPU per relayed message and PeerJS's
(docs/benchmarks/hub.md). When it sends at least two messages per window, the hub instead
waits out the rest of a short window (``Limits.batch_window``) after each turn of its event
loop that sent something, before it polls again: what arrived meanwhile is read in one read
per connection and written in one write per recipient. A message then waits at most one
window more for each turn of the loop it needs (one for a relay within one process, more in a
cluster); a hub below that rate, and an idle one, answers at once.

Sans-I/O: `PollPacer` is told the time and the messages of each turn and says how long to
wait; the event loop's edge (signaling.connections) waits.
"""

import math
from typing import Final

# The load that turns pacing on: this many messages per window (fewer and a wait would mostly
# cost a wake-up of its own), as a rate averaged over about RATE_SECONDS.
BUSY_MESSAGES_PER_WINDOW: Final = 2
RATE_SECONDS: Final = 0.01
# The longest window: beyond, the wait would be felt in a call's setup rather than spare the
# machine.
MAX_WINDOW: Final = 0.01


def check_window(window: float) -> None:
    """Raise ``ValueError`` unless ``window`` (seconds) is one the hub takes."""
    if not 0 <= window <= MAX_WINDOW:  # NaN is refused too
        raise ValueError(f"the batch window must be from 0 to {MAX_WINDOW} seconds")


class PollPacer:
    """How long to wait after each turn before the next poll, for a ``window`` in seconds
    (0: never wait)."""

    def __init__(self, window: float) -> None:
        check_window(window)
        self.window = window
        # The messages of the last RATE_SECONDS or so, each counted less as it ages.
        self._recent = 0.0
        self._busy_level = BUSY_MESSAGES_PER_WINDOW * RATE_SECONDS / window if window else 0.0
        self._polled_at = -math.inf  # when the last turn ended, its wait included
        self.waits = 0  # turns after which it waited
        self.waited = 0.0  # seconds, in all

    @property
    def busy(self) -> bool:
        """Whether messages come fast enough that the hub waits out its window."""
        return self.window > 0 and self._recent >= self._busy_level

    def after_turn(self, now: float, messages: int) -> float:
        """A turn that sent ``messages`` ended at ``now`` (monotonic seconds): the seconds to
        wait before polling again, 0 to poll at once."""
        self._recent = self._recent * math.exp((self._polled_at - now) / RATE_SECONDS) + messages
        # (At most the window even if ``now`` came before the last poll.)
        wait = min(self.window, self.window - (now - self._polled_at)) if self.busy else 0.0
        if wait <= 0.0:
            wait = 0.0
        else:
            self.waits += 1
            self.waited += wait
        self._polled_at = now + wait
        return wait

    def metric_lines(self) -> list[str]:
        """Its counters in the Prometheus text format (the hub's ``/metrics``)."""
        return [
            "# HELP blindhub_poll_waits_total Turns after which the busy hub waited to poll.",
            "# TYPE blindhub_poll_waits_total counter",
            f"blindhub_poll_waits_total {self.waits}",
            "# HELP blindhub_poll_wait_seconds_total Seconds the busy hub waited to poll.",
            "# TYPE blindhub_poll_wait_seconds_total counter",
            f"blindhub_poll_wait_seconds_total {self.waited:.6f}",
        ]
