"""Time as a seam: deadlines and durations come from a ``Clock``, never from ``time.time()``.

Production code takes a ``Clock``; tests pass ``ManualClock`` to step time by hand.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds for deadlines, and wall-clock seconds for records."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, durations)."""

    def wall(self) -> float:
        """Unix seconds (timestamps in records shipped upstream)."""


class SystemClock:
    """The real clocks of this machine."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to (for tests and simulations)."""

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        self._now += seconds
