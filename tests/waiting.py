"""Waiting in tests for a condition to hold, with a deadline that fails the test readably.

- `wait_until`: blocking (``time.sleep`` between polls), for tests that drive real processes
  and servers from the test's thread;
- `until`: the same on an event loop (``await asyncio.sleep`` between polls), for tests whose
  body is a coroutine, so that the code under test runs while the test waits.

Both check the condition first (no sleep when it already holds), return the seconds they
waited, and on timeout fail the test with ``"<what>: not within <timeout_s> s"``, naming what
was awaited. The condition is any callable whose result is tested for truth.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest


def _misses(predicate: Callable[[], object], what: str, timeout_s: float, t0: float) -> Iterator[None]:
    """Yield each time ``predicate()`` is false before the deadline ``t0 + timeout_s``
    (monotonic s); stop once it is true; fail the test once it is false past the deadline."""
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s:g} s")
        yield


def wait_until(
    predicate: Callable[[], object], what: str, *, timeout_s: float, step_s: float = 0.05
) -> float:
    """Block until ``predicate()`` is true, polling it every ``step_s`` s.

    Args:
        predicate: the condition; called in this thread.
        what: what is awaited, for the failure message (``"the gateway sees it down"``).
        timeout_s: the deadline (s) from the call.
        step_s: the pause between polls (s).

    Returns:
        The seconds from the call until ``predicate()`` held.

    Raises:
        pytest.fail.Exception: ``predicate()`` was still false after ``timeout_s``.
    """
    t0 = time.monotonic()
    for _ in _misses(predicate, what, timeout_s, t0):
        time.sleep(step_s)
    return time.monotonic() - t0


async def until(
    predicate: Callable[[], object], what: str, *, timeout_s: float, step_s: float = 0.01
) -> float:
    """`wait_until` on the running event loop: ``await asyncio.sleep(step_s)`` between polls,
    so the loop's other tasks run while the test waits. Same arguments, result and failure;
    ``predicate`` is called on the loop, so it must not block."""
    t0 = time.monotonic()
    for _ in _misses(predicate, what, timeout_s, t0):
        await asyncio.sleep(step_s)
    return time.monotonic() - t0
