"""`gateway.composite_pool.CompositePool`: every job's outcome reaches its caller, in a pool
thread, with cancellation and shutdown as the pipeline relies on."""
from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.composite_pool import CompositePool


def _thread_name(k: int) -> tuple[int, str]:
    return k, threading.current_thread().name


def test_many_concurrent_jobs_all_get_their_own_result_from_a_pool_thread() -> None:
    """Outcomes finishing together share wake-ups: none may be lost or swapped."""

    async def body() -> None:
        pool = CompositePool(2, "composite", asyncio.get_running_loop())
        try:
            got = await asyncio.gather(*(pool.run(_thread_name, k) for k in range(2000)))
            assert [k for k, _ in got] == list(range(2000))
            assert {name for _, name in got} <= {"composite_0", "composite_1"}
        finally:
            pool.shutdown()

    asyncio.run(body())


def test_an_exception_reaches_the_caller_and_the_pool_goes_on() -> None:
    def fail(message: str) -> None:
        raise ValueError(message)

    async def body() -> None:
        pool = CompositePool(1, "composite", asyncio.get_running_loop())
        try:
            with pytest.raises(ValueError, match="bad shape"):
                await pool.run(fail, "bad shape")
            assert await pool.run(_thread_name, 7) == (7, "composite_0")
            # run_in_executor callers (concurrent.futures protocol)
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(pool, _thread_name, 8) == (8, "composite_0")
            with pytest.raises(ValueError, match="also"):
                await loop.run_in_executor(pool, fail, "also")
        finally:
            pool.shutdown()

    asyncio.run(body())


def test_a_job_cancelled_before_a_thread_took_it_is_not_run() -> None:
    """A frame whose client went away while it waited for a thread costs no compositing."""
    ran: list[int] = []
    gate = threading.Event()

    def blocker() -> None:
        gate.wait(5.0)

    async def body() -> None:
        pool = CompositePool(1, "composite", asyncio.get_running_loop())
        try:
            first = asyncio.ensure_future(pool.run(blocker))
            queued = asyncio.ensure_future(pool.run(ran.append, 1))
            await asyncio.sleep(0.05)
            queued.cancel()
            gate.set()
            await first
            await pool.run(ran.append, 2)
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert ran == [2]
        finally:
            pool.shutdown()

    asyncio.run(body())


def test_shutdown_cancels_queued_jobs_and_refuses_new_ones() -> None:
    gate = threading.Event()

    async def body() -> None:
        pool = CompositePool(1, "composite", asyncio.get_running_loop())
        first = asyncio.ensure_future(pool.run(gate.wait, 5.0))
        queued = asyncio.ensure_future(pool.run(_thread_name, 1))
        await asyncio.sleep(0.05)
        pool.shutdown(wait=False, cancel_futures=True)
        gate.set()
        assert await first is True  # the job already running finishes
        with pytest.raises(asyncio.CancelledError):
            await queued
        with pytest.raises(RuntimeError, match="shut down"):
            await pool.run(_thread_name, 2)

    asyncio.run(body())


def test_at_least_one_thread() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="at least one thread"):
            CompositePool(0, "composite", loop)
    finally:
        loop.close()
