"""`Subscribers`: the callbacks told of every new value of some state (the observer list).

The Triton supervisor (`lipsync.triton_supervisor`), each Triton endpoint's model lifecycle
(`gateway.model_lifecycle`), the endpoint pool (`gateway.endpoint_pool`) and a gateway worker's
view of the supervisor (`gateway.worker`) publish their state the same way: a subscriber gets
every new value, can unsubscribe at any time (twice is harmless), and a subscriber that raises is
logged and does not stop the others, nor the publisher.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

_T = TypeVar("_T")


class Subscribers(Generic[_T]):
    """Callbacks called with every published value, in subscription order.

    Thread-safe: `subscribe`, the unsubscribe function and `publish` may run on any thread;
    the callbacks run on the publishing thread, outside the lock (so a callback may subscribe
    or unsubscribe).

    Args:
        what: what the values are, for the log line of a callback that raised (``Triton
            supervisor status``).
        logger: where that line goes (the publisher's module logger).
    """

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self._what = what
        self._logger = logger
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[_T], None]] = []

    def subscribe(self, callback: Callable[[_T], None]) -> Callable[[], None]:
        """Call ``callback(value)`` with every value published from now on.

        Returns:
            A function that unsubscribes ``callback`` (calling it again does nothing).
        """
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def publish(self, value: _T) -> None:
        """Call every subscriber with ``value``; one that raises is logged with its traceback."""
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(value)
            except Exception:  # one broken subscriber must not stop the others or the publisher
                self._logger.exception("a subscriber to %s (%r) failed", self._what, callback)
