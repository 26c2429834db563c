"""`RenderAdmission`: the window of renders in flight (AIMD) and the latency budget."""
from __future__ import annotations

import pytest

from gateway.live.admission import RenderAdmission


def test_the_window_starts_full_and_limits_the_renders_in_flight() -> None:
    a = RenderAdmission(max_window=3, full_budget_s=1.0)
    assert a.window == 3.0
    assert a.admit(0.0, 1.0, in_flight=2)
    assert not a.admit(0.0, 1.0, in_flight=3)


def test_a_miss_halves_the_window_and_renders_in_time_grow_it_back() -> None:
    a = RenderAdmission(max_window=8, full_budget_s=1.0)
    a.missed(0.5, running_at_start=0)
    assert a.window == 4.0 and a.admit(0.0, 1.0, in_flight=3) and not a.admit(0.0, 1.0, in_flight=4)
    for _ in range(3):
        a.missed(0.5, running_at_start=0)
    assert a.window == 1.0  # never below one render
    assert a.admit(0.0, 1.0, in_flight=0) and not a.admit(0.0, 1.0, in_flight=1)
    a.rendered(0.2, 0)
    assert a.window == 2.0  # + 1 / window
    a.rendered(0.2, 0)
    assert a.window == 2.5
    for _ in range(30):
        a.rendered(0.2, 0)
    assert a.window == 8.0  # up to max_window, not beyond


def test_a_render_is_not_started_with_less_time_left_than_it_is_expected_to_take() -> None:
    a = RenderAdmission(max_window=8, full_budget_s=1.0)
    assert a.admit(0.0, 0.01, in_flight=0)  # nothing known yet: any time left will do
    a.rendered(2.0, running_at_start=1)  # 2 s with one render ahead: 1 s per render
    assert a.service_s == pytest.approx(0.3)  # a moving average from 0: a cold start weighs 0.3
    assert a.admit(10.0, 10.3, in_flight=0) and not a.admit(10.0, 10.29, in_flight=0)
    assert a.admit(10.0, 10.9, in_flight=2) and not a.admit(10.0, 10.89, in_flight=2)
    a.rendered(0.2, running_at_start=0)
    assert a.service_s == pytest.approx(0.7 * 0.3 + 0.3 * 0.2)
    a.missed(0.5, running_at_start=0)  # took longer than 0.5 s alone: at least that per render
    assert a.service_s == pytest.approx(0.5)
    a.missed(0.6, running_at_start=3)  # 0.15 s per render: says less than what is known
    assert a.service_s == pytest.approx(0.5)
    assert not a.admit(10.0, 10.0, in_flight=0)  # the deadline itself


def test_renders_slower_than_the_whole_budget_still_probe() -> None:
    """A stale estimate longer than the render deadline must not shut the session out: a slot
    that still has (nearly) its whole budget is started, one that has less is not."""
    a = RenderAdmission(max_window=8, full_budget_s=1.0)
    a.missed(1.0009, running_at_start=0)  # given up at its deadline, a hair after it
    assert a.service_s > 1.0
    assert a.admit(100.0, 100.999, in_flight=0)  # planned on time, a ms late
    assert a.admit(100.0, 100.9, in_flight=0)
    assert not a.admit(100.0, 100.89, in_flight=0)


def test_a_window_needs_at_least_one_render() -> None:
    with pytest.raises(ValueError):
        RenderAdmission(max_window=0, full_budget_s=1.0)
