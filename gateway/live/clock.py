"""The session's clock, injected so the timeline can be tested with simulated time."""
from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic time in seconds and a way to wait for a moment of it."""

    def now(self) -> float:
        """Current time (s, monotonic, arbitrary origin)."""
        ...

    async def sleep_until(self, t: float) -> None:
        """Return once `now() >= t` (at once when it already is)."""
        ...


class MonotonicClock:
    """The real clock: `time.monotonic` and `asyncio.sleep`."""

    def now(self) -> float:
        """`time.monotonic()` (s)."""
        return time.monotonic()

    async def sleep_until(self, t: float) -> None:
        """Sleep `t - now()` seconds (not at all when that is <= 0)."""
        delay = t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
