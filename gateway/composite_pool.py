"""`CompositePool`: the threads that composite frames for the event loop, with a light hand-off.

Every rendered frame hops to a pool thread for paste back + JPEG and back (`gateway.pipeline`).
With ``loop.run_in_executor`` on a `concurrent.futures.ThreadPoolExecutor` each hop costs a
`concurrent.futures.Future` (its condition variable and lock), the executor's locks and
thread-count check, an asyncio future chained to it by two callbacks, and one write to the
event loop's self-pipe per finished job (one wake-up and read of the loop each); on a
2-core host, at 500 frames/s, that was about 4 % of the event loop's samples and 6 % of the
pool's (py-spy of the gateway under ``perf.capacity``'s 880x720 load; issue 9). `CompositePool.run` instead:

1. puts ``(function, arguments, asyncio future)`` on a `queue.SimpleQueue` (no lock of ours);
2. a pool thread runs the function unless the future was cancelled meanwhile (its client went
   away), and appends the outcome to a deque;
3. the first outcome appended while no wake-up is pending schedules one
   (``loop.call_soon_threadsafe``); that callback settles every outcome queued by then, so
   frames finishing while the loop is busy share one wake-up.

A `concurrent.futures.Executor` too (``submit``), for ``loop.run_in_executor`` callers that
need no speed. Threads are named ``<name>_<k>`` like the executor's (the capacity benchmark
reads the names) and started at construction.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(slots=True)
class _Job:
    """One function call for a pool thread; ``done`` is an asyncio future (`CompositePool.run`)
    or a `concurrent.futures.Future` (`CompositePool.submit`)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    done: asyncio.Future[Any] | Future[Any]


class CompositePool(Executor):
    """A fixed pool of threads for blocking CPU work of the event loop (module doc).

    Args:
        threads: how many threads (``jpeg_threads``).
        name: thread name prefix.
        loop: the event loop whose `run` calls it serves (where outcomes are delivered).

    Raises:
        ValueError: ``threads < 1``.
    """

    def __init__(self, threads: int, name: str, loop: asyncio.AbstractEventLoop) -> None:
        if threads < 1:
            raise ValueError(f"need at least one thread, got {threads}")
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._outcomes: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = (
            collections.deque()
        )
        self._wake_pending = False
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{k}", daemon=True) for k in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args)`` on a pool thread, awaited (module doc). Cancelling the caller skips the
        call if no thread has started it yet.

        Raises:
            RuntimeError: the pool is shut down.
            whatever ``fn`` raises.
        """
        if kwargs:
            raise TypeError("CompositePool.run takes positional arguments only")
        future: asyncio.Future[T] = self._loop.create_future()
        self._put(_Job(fn, args, future))
        return await future

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """`concurrent.futures.Executor.submit` (for ``loop.run_in_executor``).

        Raises:
            RuntimeError: the pool is shut down.
        """
        future: Future[T] = Future()
        self._put(_Job(lambda: fn(*args, **kwargs), (), future))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the threads once the queued jobs ran (or, with ``cancel_futures``, cancel the
        jobs no thread has started); call from the event loop's thread."""
        if self._closed:
            return
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.done.cancel()
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _put(self, job: _Job) -> None:
        if self._closed:
            raise RuntimeError("the composite pool is shut down")
        self._jobs.put(job)

    def _work(self) -> None:
        """A pool thread: run jobs until the shutdown's sentinel."""
        while (job := self._jobs.get()) is not None:
            done = job.done
            if isinstance(done, Future):
                if done.set_running_or_notify_cancel():
                    try:
                        done.set_result(job.fn(*job.args))
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        done.set_exception(exc)
                continue
            if done.cancelled():  # read across threads: at worst a cancelled frame is composited
                continue
            try:
                result = job.fn(*job.args)
            except StopIteration as exc:  # an asyncio future refuses it (as run_in_executor's does)
                self._deliver(done, None, RuntimeError(f"StopIteration raised in a pool job: {exc!r}"))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._deliver(done, None, exc)
            else:
                self._deliver(done, result, None)

    def _deliver(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        """Queue an outcome; wake the loop unless a wake-up is pending already (module doc)."""
        self._outcomes.append((future, result, exc))
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits it any more
                self._loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        """On the loop: settle every queued outcome (a cancelled future is left alone)."""
        self._wake_pending = False  # before draining: an outcome appended from now on wakes again
        outcomes = self._outcomes
        while outcomes:
            future, result, exc = outcomes.popleft()
            if future.done():
                continue
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)
