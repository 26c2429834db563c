"""`lipsync.subscribers.Subscribers`: what every state publisher of the gateway relies on."""
from __future__ import annotations

import logging
import threading

import pytest

from lipsync.subscribers import Subscribers

log = logging.getLogger("tests.subscribers")


def test_every_subscriber_gets_every_value_in_order_until_it_unsubscribes() -> None:
    subs = Subscribers[int]("numbers", log)
    seen: list[tuple[str, int]] = []
    stop_a = subs.subscribe(lambda v: seen.append(("a", v)))
    subs.subscribe(lambda v: seen.append(("b", v)))
    subs.publish(1)
    stop_a()
    stop_a()  # twice is harmless
    subs.publish(2)
    assert seen == [("a", 1), ("b", 1), ("b", 2)]


def test_a_failing_subscriber_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    subs = Subscribers[str]("Triton state", log)
    seen: list[str] = []

    def broken(value: str) -> None:
        raise RuntimeError(f"bug on {value}")

    subs.subscribe(broken)
    subs.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="tests.subscribers"):
        subs.publish("ready")  # does not raise
    assert seen == ["ready"]
    [record] = caplog.records
    assert "a subscriber to Triton state" in record.getMessage() and record.exc_info is not None
    assert "bug on ready" in str(record.exc_info[1])


def test_a_callback_may_subscribe_or_unsubscribe_while_a_value_is_published() -> None:
    subs = Subscribers[int]("numbers", log)
    late: list[int] = []
    seen: list[int] = []

    def first(v: int) -> None:
        seen.append(v)
        if v == 1:
            subs.subscribe(late.append)  # joins from the next value on
            stop_first()

    stop_first = subs.subscribe(first)
    subs.publish(1)
    subs.publish(2)
    assert seen == [1] and late == [2]


def test_subscribing_and_publishing_from_several_threads() -> None:
    subs = Subscribers[int]("numbers", log)
    counts = [0] * 8
    lock = threading.Lock()

    def counter(k: int) -> None:
        def add(_: int) -> None:
            with lock:
                counts[k] += 1
        subs.subscribe(add)

    for k in range(8):
        counter(k)
    def publish_200() -> None:
        for i in range(200):
            subs.publish(i)

    threads = [threading.Thread(target=publish_200) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == [800] * 8
