"""`RenderAdmission`: the window of renders in flight (AIMD) and the latency budget."""
from __future__ import annotations

import pytest

from gateway.live.admission import RenderAdmission, RenderEnd


def test_the_window_starts_full_and_limits_the_renders_in_flight() -> None:
    a = RenderAdmission(max_window=3, full_budget_s=1.0)
    for _ in range(3):
        assert a.admit(0.0, 1.0)
        a.started()
    assert not a.admit(0.0, 1.0)  # 3 in flight
    a.end(RenderEnd.FAILED)
    assert a.admit(0.0, 1.0) and a.window == 3.0  # a failure frees its place, says nothing of the pace


def test_a_miss_halves_the_window_and_renders_in_time_grow_it_back() -> None:
    a = RenderAdmission(max_window=8, full_budget_s=1.0)
    for _ in range(4):
        a.started()
    a.end(RenderEnd.MISSED)
    assert a.window == 4.0
    a.end(RenderEnd.MISSED)
    a.end(RenderEnd.MISSED)
    a.end(RenderEnd.MISSED)
    assert a.window == 1.0  # never below one render
    a.started()
    assert not a.admit(0.0, 1.0)  # one in flight, window 1
    a.end(RenderEnd.IN_TIME, 0.2)
    assert a.window == 2.0  # + 1 / window
    for _ in range(30):
        a.started()
        a.end(RenderEnd.IN_TIME, 0.2)
    assert a.window == 8.0  # up to max_window, not beyond


def test_a_render_is_not_started_with_less_time_left_than_renders_take() -> None:
    a = RenderAdmission(max_window=8, full_budget_s=1.0)
    assert a.admit(0.0, 0.01)  # no latency known yet: any time left will do
    a.started()
    a.end(RenderEnd.IN_TIME, 0.4)
    assert a.latency_s == pytest.approx(0.4)
    assert a.admit(10.0, 10.4) and not a.admit(10.0, 10.39)
    a.started()
    a.end(RenderEnd.IN_TIME, 0.6)
    assert a.latency_s == pytest.approx(0.7 * 0.4 + 0.3 * 0.6)  # moving average
    assert not a.admit(10.0, 10.0)  # the deadline itself


def test_renders_slower_than_the_whole_budget_still_probe_with_a_whole_budget() -> None:
    """A stale latency longer than the render deadline must not shut the session out: a slot
    that still has its whole budget is started, one that has less is not."""
    a = RenderAdmission(max_window=8, full_budget_s=1.0)
    a.started()
    a.end(RenderEnd.IN_TIME, 2.5)
    assert a.admit(100.0, 101.0)
    assert not a.admit(100.0, 100.99)


def test_a_missed_or_dropped_render_does_not_change_the_latency() -> None:
    a = RenderAdmission(max_window=8, full_budget_s=1.0)
    a.started()
    a.end(RenderEnd.IN_TIME, 0.3)
    for how in (RenderEnd.MISSED, RenderEnd.DROPPED, RenderEnd.FAILED):
        a.started()
        a.end(how, 5.0)
    assert a.latency_s == pytest.approx(0.3) and a.window == 4.0 and a.in_flight == 0


def test_more_ends_than_starts_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        RenderAdmission(max_window=2, full_budget_s=1.0).end(RenderEnd.IN_TIME, 0.1)
    with pytest.raises(ValueError):
        RenderAdmission(max_window=0, full_budget_s=1.0)
