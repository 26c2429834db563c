"""`RenderAdmission`: which speaking slots of a session get a render.

A speaking slot whose render is not done by its deadline is sent idle and late, and the work
the renderer (Triton) spent on it is lost: Triton cannot stop an execution it has begun. So a
session starts only renders that can finish in time, and never more at once than the renderer
completes in time. `LiveSession` asks `admit` when it plans a speaking slot (a slot refused
is sent idle and late without a render), and reports each render it starts (`started`) and
how it ended (`end`). Two rules:

1. **Window**: at most ``floor(window)`` renders of the session in flight. The window follows
   additive increase, multiplicative decrease, the rule of TCP congestion control (Jacobson
   1988, "Congestion Avoidance and Control"; RFC 5681 s.3.1): +1/window for each render done in
   time, halved (not below 1) for each render that missed its deadline, never above
   ``max_window``, where it starts: while renders make their deadlines nothing changes (a
   TTS burst on a fast renderer renders every slot at once). Why: Triton's dynamic batcher runs the renders in flight
   together as one batch whose time grows with its size (on the CPU profile about linearly:
   ~0.1 s per frame on an idle 2-core machine, 0.4 s and more under load). A session that keeps
   8 renders in flight makes batches that outlast any deadline; all of them are given up, the
   next 8 queue behind the batch Triton is still computing, and nothing is ever shown (the
   0-speaking perf run, perf/results/live_load.md). The window settles at the largest number
   of renders in flight that still make their deadlines, and shrinks when other sessions load
   the same server (each session's window is its share, as TCP flows share a link).
2. **Budget**: a render is not started when the time left to its slot's deadline is shorter
   than the session's recent render latency (exponential moving average, weight 0.3, of the
   time from start to completion of renders done in time): it would miss, and take the
   server's time from renders that can make it. A slot planned late (held back behind slower
   renders) is sent idle at once instead. When renders have recently taken
   longer than a slot's whole budget (``render_timeout_s``), a slot that still has all of it
   is started: a probe, so a stale latency cannot shut the session out (the estimate is only
   updated by renders that finish in time).
"""
from __future__ import annotations

import enum
import math


class RenderEnd(enum.Enum):
    """How a started render ended."""

    IN_TIME = "in_time"
    """Done before its slot was sent: shown speaking."""
    MISSED = "missed"
    """Given up at its deadline: the slot went out idle, late."""
    FAILED = "failed"
    """The renderer or the encoder raised (Triton down, overloaded): says nothing of its pace."""
    DROPPED = "dropped"
    """Cancelled for another reason (`interrupt`): says nothing of its pace."""


LATENCY_WEIGHT: float = 0.3
"""Weight of the newest render in the latency average."""
_EPSILON_S = 1e-6  # a slot planned on time has exactly its whole budget: rounding must not refuse it


class RenderAdmission:
    """The render admission of one session (module doc).

    Args:
        max_window: most renders in flight (`LiveSettings.max_in_flight`), >= 1.
        full_budget_s: the time a slot planned on time has for its render
            (`LiveSettings.render_timeout_s`, s).

    Attributes:
        window: renders in flight allowed (float; ``floor`` of it counts), 1..max_window.
        in_flight: renders started and not yet ended.
        latency_s: recent render latency (s), None before the first render done in time.
    """

    def __init__(self, max_window: int, full_budget_s: float) -> None:
        if max_window < 1:
            raise ValueError(f"max_window must be >= 1, got {max_window}")
        self.max_window = max_window
        self.full_budget_s = full_budget_s
        self.window = float(max_window)
        self.in_flight = 0
        self.latency_s: float | None = None

    def admit(self, now: float, deadline: float) -> bool:
        """Whether to start, at clock time ``now`` (s), the render of a slot due by
        ``deadline`` (s): the window has room and the time left covers the recent latency
        (or is the whole budget: the probe). True: the caller starts it, calls `started`, and
        `end` once when it ends."""
        need = min(self.latency_s or 0.0, self.full_budget_s)
        return self.in_flight < math.floor(self.window) and now < deadline and deadline - now >= need - _EPSILON_S

    def started(self) -> None:
        """A render admitted by `admit` has started."""
        self.in_flight += 1

    def end(self, how: RenderEnd, latency_s: float = 0.0) -> None:
        """A started render ended; ``latency_s``: its start-to-completion time (s), read for
        IN_TIME only (a missed render's latency is unknown: only that it was too long).

        Raises:
            RuntimeError: more ends than starts (a session bug).
        """
        if self.in_flight <= 0:
            raise RuntimeError("a render ended that was never started")
        self.in_flight -= 1
        if how is RenderEnd.IN_TIME:
            self.window = min(float(self.max_window), self.window + 1.0 / self.window)
            self.latency_s = latency_s if self.latency_s is None else (
                (1 - LATENCY_WEIGHT) * self.latency_s + LATENCY_WEIGHT * latency_s)
        elif how is RenderEnd.MISSED:
            self.window = max(1.0, self.window / 2)
