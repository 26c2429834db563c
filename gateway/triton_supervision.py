"""`TritonSupervision`: what the gateway shows of the supervisor that keeps its tritonserver
running (`lipsync up`, `lipsync.triton_supervisor`): restarts in /metrics, in /readyz, and the
"model server restarting" reason the web page shows instead of a wall of errors.

The series are computed from `SupervisorView.status()`, a thread-safe snapshot, at each scrape
(a collector of the gateway's `scrape_registry`), as is everything else; so with several gateway
workers each shows the supervisor's own counts once (a worker's view is relayed by the
supervisor of the workers, `gateway.worker.RelayedSupervisorView`). ``lipsync gateway`` (Triton run
by someone else) has no supervisor: the gateway then has no `TritonSupervision` and none of this
appears.

Series (`gateway.metrics` registry):

- ``lipsync_gateway_triton_restarts_total``: starts of tritonserver after the first one
  (`SupervisorStatus.restarts`);
- ``lipsync_gateway_triton_supervisor_state{lipsync_gateway_triton_supervisor_state=...}``: 1
  for the supervisor's current state (`SupervisorState`), 0 for the others;
- ``lipsync_gateway_triton_last_exit_info{reason, returncode}``: how the last run ended.

Restarting (`TritonSupervision.restarting`): tritonserver ended and the gateway has not been
ready since: the supervisor waits to start it again or is starting it (the gateway may not have
noticed the exit yet), or it runs again and the gateway is reloading the avatars' models into
it. The gateway tells `note_ready` when it is ready (`GatewayContext.watch_ready`).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)

from lipsync.triton_supervisor import SupervisorState, SupervisorView


class TritonSupervision:
    """Follows one `SupervisorView` for a gateway (module doc).

    Args:
        supervisor: the supervisor of the gateway's tritonserver.
        registry: the gateway's Prometheus registry (the series are added to it).

    Call `close` when the gateway stops (the supervisor outlives it in ``lipsync up``).
    """

    def __init__(self, supervisor: SupervisorView, registry: CollectorRegistry) -> None:
        self.supervisor = supervisor
        self._ready_at = 0.0  # when the gateway was last seen ready, Unix time (s)
        self._registry: CollectorRegistry | None = registry
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """The series (module doc), from the supervisor's status now."""
        status = self.supervisor.status()
        yield CounterMetricFamily(
            "lipsync_gateway_triton_restarts",
            "Starts of the supervised tritonserver after the first one (lipsync up)",
            value=status.restarts,
        )
        yield StateSetMetricFamily(
            "lipsync_gateway_triton_supervisor_state",
            "State of the supervisor of tritonserver (lipsync up)",
            value={s.value: s is status.state for s in SupervisorState},
        )
        if status.last_exit is not None:
            yield InfoMetricFamily(
                "lipsync_gateway_triton_last_exit",
                "How the supervised tritonserver's last run ended (lipsync up)",
                value={"reason": status.last_exit.reason, "returncode": str(status.last_exit.returncode)},
            )

    def note_ready(self, ready: bool) -> None:
        """The gateway's readiness changed (a `GatewayContext.watch_ready` watcher)."""
        if ready:
            self._ready_at = time.time()

    def restarting(self, gateway_ready: bool) -> bool:
        """Whether tritonserver is being restarted as far as clients can tell (module doc)."""
        status = self.supervisor.status()
        if status.last_exit is None:
            return False
        if status.state in (SupervisorState.BACKING_OFF, SupervisorState.STARTING):
            return True  # no tritonserver runs, whether or not the gateway noticed yet
        return (
            status.state is SupervisorState.RUNNING
            and not gateway_ready
            and status.last_exit.at > self._ready_at
        )

    def reason(self, gateway_ready: bool) -> str | None:
        """One line for /readyz when the supervisor explains why the gateway is not ready:
        "model server restarting (<state>: <how it ended>)", or that it gave up or stopped;
        None when the supervisor has nothing to say (tritonserver runs, or runs again and the
        gateway has been ready since)."""
        status = self.supervisor.status()
        if self.restarting(gateway_ready):
            last = status.last_exit.reason if status.last_exit is not None else status.message
            return f"model server restarting ({status.state.value}: {last})"
        if status.state is SupervisorState.GIVEN_UP:
            return f"model server not restarted: {status.message}"
        if status.state in (SupervisorState.STOPPING, SupervisorState.STOPPED):
            return "model server stopped"
        return None

    def to_json(self, gateway_ready: bool) -> dict[str, Any]:
        """The supervisor for /readyz: `SupervisorStatus.to_json` (state, restarts, last exit's
        reason, ...) plus ``restarting``."""
        return {**self.supervisor.status().to_json(), "restarting": self.restarting(gateway_ready)}

    def close(self) -> None:
        """Take the series out of the registry."""
        if self._registry is not None:
            self._registry.unregister(self)
            self._registry = None
