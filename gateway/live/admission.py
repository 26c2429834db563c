"""`RenderAdmission`: which speaking slots of a session get a render.

A speaking slot whose render is not done by its deadline is sent idle and late, and the work
the renderer (Triton) spent on it is lost: Triton cannot stop an execution it has begun. So a
session starts only renders that can finish in time, and never more at once than the renderer
completes in time. `LiveSession` asks `admit` when it plans a speaking slot, telling it how
many of its renders are running (a slot refused is sent idle and late without a render), and
reports each render done in time (`rendered`) and each one given up at its deadline
(`missed`); a render that failed (Triton down) or was interrupted says nothing of the pace.
Two rules:

1. **Window**: at most ``floor(window)`` renders of the session in flight. The window follows
   additive increase, multiplicative decrease, the rule of TCP congestion control (Jacobson
   1988, "Congestion Avoidance and Control"; RFC 5681 s.3.1): +1/window for each render done in
   time, halved (not below 1) for each render that missed its deadline, never above
   ``max_window``, where it starts: while renders make their deadlines nothing changes (a TTS
   burst on a fast renderer renders every slot at once). Why: Triton's dynamic batcher runs
   the renders in flight together as one batch whose time grows with its size (CPU profile:
   about linearly, ~0.1 s per frame on an idle 2-core machine, 0.4 s and more under load). A
   session that keeps 8 renders in flight makes batches that outlast any deadline; all of them
   are given up, the next 8 queue behind the batch Triton is still computing, and nothing is
   ever shown (the 0-speaking perf run, perf/results/live_load.md). The window settles at the largest number
   of renders in flight that still make their deadlines, and shrinks when other sessions load
   the same server (each session's window is its share, as TCP flows share a link).
2. **Budget**: a render is not started when the time left to its slot's deadline is shorter
   than the render is expected to take: ``(j + 1) x service_s`` with ``j`` renders of the
   session running. ``service_s`` is the time a render takes per render ahead of it (on a
   server that runs one batch at a time, cost growing with its size): the exponential moving
   average (weight 0.3, from 0, so one slow first render, Triton's cold start, does not shut
   out the next ones) of ``latency / (k + 1)`` over renders done in time, ``latency`` being the
   time from a render's start to its completion and ``k`` the renders running when it started;
   a render given up at its deadline raises it to at least ``waited / (k + 1)``. Such a render
   would miss, and take the server's time from renders that can make it: a slot planned late
   (held back behind slower renders) is sent idle at once instead. When renders are expected
   to take longer than ``PROBE_BUDGET`` (90 %) of a slot's whole budget (``render_timeout_s``),
   a slot that still has that much is started: a probe, so a stale estimate cannot shut the
   session out (a slot planned on time has its whole budget, or a few ms less).
"""
from __future__ import annotations

import math

SERVICE_WEIGHT: float = 0.3
"""Weight of the newest render in the service-time average."""
PROBE_BUDGET: float = 0.9
"""Share of the whole budget a slot needs at most to be started (the probe, module doc)."""


class RenderAdmission:
    """The render admission of one session (module doc).

    Args:
        max_window: most renders in flight (`LiveSettings.max_in_flight`), >= 1.
        full_budget_s: the time a slot planned on time has for its render
            (`LiveSettings.render_timeout_s`, s).

    Attributes:
        window: renders in flight allowed (float; ``floor`` of it counts), 1..max_window.
        service_s: recent render time per render in flight (s, module doc), 0 before the
            first render done in time.
    """

    def __init__(self, max_window: int, full_budget_s: float) -> None:
        if max_window < 1:
            raise ValueError(f"max_window must be >= 1, got {max_window}")
        self.max_window = max_window
        self.full_budget_s = full_budget_s
        self.window = float(max_window)
        self.service_s = 0.0

    def admit(self, now: float, deadline: float, in_flight: int) -> bool:
        """Whether to start, at clock time ``now`` (s), the render of a slot due by
        ``deadline`` (s) while ``in_flight`` renders of the session are running: the window has
        room and the time left covers the expected time (or 90 % of the whole budget: the
        probe)."""
        need = min(self.service_s * (in_flight + 1), PROBE_BUDGET * self.full_budget_s)
        return in_flight < math.floor(self.window) and now < deadline and deadline - now >= need

    def rendered(self, latency_s: float, running_at_start: int) -> None:
        """A render was done in time, ``latency_s`` (s) after it started with
        ``running_at_start`` other renders of the session running: the window grows by
        1/window (up to ``max_window``), the service time takes it in (module doc)."""
        self.window = min(float(self.max_window), self.window + 1.0 / self.window)
        service = latency_s / (running_at_start + 1)
        self.service_s = (1 - SERVICE_WEIGHT) * self.service_s + SERVICE_WEIGHT * service

    def missed(self, waited_s: float, running_at_start: int) -> None:
        """A render was given up at its deadline, ``waited_s`` (s) after it started with
        ``running_at_start`` other renders running: the window halves (not below 1), and the
        service time is at least ``waited_s / (running_at_start + 1)`` (the render would have
        taken longer than that)."""
        self.window = max(1.0, self.window / 2)
        self.service_s = max(self.service_s, waited_s / (running_at_start + 1))
