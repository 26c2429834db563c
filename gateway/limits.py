"""Per-client limits (issue 11): one client cannot take every slot, and work outside frame
rendering cannot starve the frames.

Three limits, next to the pipeline's own (`gateway.pipeline.AdmissionControl`: frames in flight
in the whole gateway; `gateway.pipeline.ConnectionLimiter`: frames in flight on one connection):

- `PeerLimiter`: frames in flight from one **peer**, the client's network address without its
  port (`peer_address`), over all its connections and calls of both protocols
  (``max_in_flight_per_peer``). The per-connection limit alone lets one client open many
  connections (or, in gRPC, make many unary calls, each its own "connection") and take every
  global slot; with a per-peer cap below the global one, other clients keep room. Behind a
  reverse proxy every client has the proxy's address: raise the cap to the global one there.
- `ClientLimiter`: what an adapter holds per connection or call: a `ConnectionLimiter` whose
  every slot also holds one of its peer's.
- `AuxiliaryWork`: work that is not a frame render (``GetVideoFrame``'s JPEGs, the mel
  spectrogram + audio-encoder call of ``GenerateBatchWithAudio``, the live-audio mel of a
  WebSocket frame) runs on its own thread pool (``aux_threads``), never in the composite pool's
  queue; the jobs a caller may start are capped (``max_aux_in_flight``, refused at once with
  `Overloaded` beyond it), so that pool's queue is bounded too. A flood of them is answered
  ``overloaded`` while live streams keep their composite threads.

gRPC connection limits (concurrent RPCs, streams per connection, keepalive, idle and age) are
server options: `grpc_server_options`.

Refusals by these limits are counted in ``lipsync_gateway_limit_refusals_total{limit}``
(``peer`` | ``aux``), beside the outcome counters of `gateway.metrics`.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from gateway.errors import Overloaded
from gateway.pipeline import ConnectionLimiter

if TYPE_CHECKING:
    from gateway.config import GatewaySettings
    from gateway.metrics import GatewayMetrics

T = TypeVar("T")

_INT32_MAX = 2**31 - 1
"""gRPC core's "unlimited" for its millisecond channel arguments."""


def peer_address(peer: str) -> str:
    """The client's address without its port: the key of `PeerLimiter`.

    Args:
        peer: a gRPC peer string (``context.peer()``: ``ipv4:10.0.0.7:51234``,
            ``ipv6:[::1]:51234``, ``ipv6:%5B::1%5D:51234``, ``unix:/path``) or an HTTP remote
            address (``request.remote``: ``10.0.0.7``, ``::1``, None-like ``""``).

    Returns:
        ``ipv4:10.0.0.7``, ``ipv6:[::1]`` (brackets decoded), ``unix:/path``; an address with no
        scheme (aiohttp gives no port) gets the scheme of its family, so both protocols name one
        client the same way; an empty peer is ``unknown``.
    """
    if not peer:
        return "unknown"
    scheme, sep, rest = peer.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        host = rest.replace("%5B", "[").replace("%5D", "]")
        has_port = "]:" in host if scheme == "ipv6" else host.count(":") == 1
        return f"{scheme}:{host.rsplit(':', 1)[0] if has_port else host}"
    if sep and scheme == "unix":
        return peer
    if ":" in peer:  # a bare IPv6 address from aiohttp
        return f"ipv6:[{peer.strip('[]')}]"
    return f"ipv4:{peer}"


@dataclass
class _PeerSlots:
    sem: asyncio.Semaphore
    held: int = 0
    """Slots held."""
    users: int = 0
    """Holders and waiters: the entry is dropped when it reaches 0 (the map stays as small as
    the set of peers with frames in flight)."""


class PeerLimiter:
    """Cap on frames in flight per peer (module doc), shared by all of a gateway's adapters.

    Args:
        limit: most frames one peer may have in flight (``max_in_flight_per_peer``).
        metrics: where refusals are counted (optional).

    Raises:
        ValueError: ``limit < 1``.
    """

    def __init__(self, limit: int, metrics: GatewayMetrics | None = None) -> None:
        if limit < 1:
            raise ValueError(f"per-peer limit must be >= 1, got {limit}")
        self.limit = limit
        self._metrics = metrics
        self._peers: dict[str, _PeerSlots] = {}

    def in_flight(self, peer: str) -> int:
        """Frames ``peer`` (a `peer_address`) has in flight now."""
        slots = self._peers.get(peer)
        return 0 if slots is None else slots.held

    def peers(self) -> int:
        """Peers with frames in flight or waiting."""
        return len(self._peers)

    async def acquire(self, peer: str, *, wait: bool) -> None:
        """Take one of ``peer``'s slots; with ``wait=False`` raise `Overloaded` if none is free.

        Raises:
            Overloaded: ``wait=False`` and the peer has ``limit`` frames in flight.
        """
        slots = self._peers.get(peer)
        if slots is None:
            slots = self._peers[peer] = _PeerSlots(asyncio.Semaphore(self.limit))
        if not wait and slots.sem.locked():
            if self._metrics is not None:
                self._metrics.limit_refusals.labels(limit="peer").inc()
            raise Overloaded(
                f"your address already has {self.limit} frames in flight (limit per client, "
                "all connections together); wait for answers before sending more"
            )
        slots.users += 1
        try:
            await slots.sem.acquire()
        except BaseException:
            self._drop_user(peer, slots)
            raise
        slots.held += 1

    def release(self, peer: str) -> None:
        """Give one of ``peer``'s slots back."""
        slots = self._peers[peer]
        slots.held -= 1
        slots.sem.release()
        self._drop_user(peer, slots)

    def _drop_user(self, peer: str, slots: _PeerSlots) -> None:
        slots.users -= 1
        if slots.users == 0:
            del self._peers[peer]


class ClientLimiter(ConnectionLimiter):
    """A `ConnectionLimiter` whose every slot also holds one of its peer's (`PeerLimiter`).

    A slot is the connection's, then the peer's; with ``wait=False`` either being full refuses
    at once with `Overloaded` (the connection's slot is given back), with ``wait=True`` it
    waits for both.

    Args:
        limit: the connection's own cap (``max_in_flight_per_connection``).
        peers: the gateway's per-peer limiter.
        peer: this connection's `peer_address`.
    """

    def __init__(self, limit: int, peers: PeerLimiter, peer: str) -> None:
        super().__init__(limit)
        self.peers = peers
        self.peer = peer

    async def acquire(self, *, wait: bool = True) -> None:
        """Take the connection's slot, then the peer's (see class doc).

        Raises:
            Overloaded: ``wait=False`` and either is full.
        """
        await super().acquire(wait=wait)
        try:
            await self.peers.acquire(self.peer, wait=wait)
        except BaseException:
            super().release()
            raise

    def release(self) -> None:
        """Give both slots back."""
        self.peers.release(self.peer)
        super().release()


@dataclass
class AuxiliaryWork:
    """Bounded work beside frame rendering (module doc): a capped number of jobs on
    their own pool.

    Attributes:
        executor: the pool its CPU work runs on (``aux_threads`` threads).
        limit: most jobs in flight (``max_aux_in_flight``); more are refused at once.
        metrics: where refusals are counted (optional).
        in_flight: jobs in flight now.
    """

    executor: ThreadPoolExecutor
    limit: int
    metrics: GatewayMetrics | None = None
    in_flight: int = field(default=0, init=False)

    @classmethod
    def create(cls, threads: int, limit: int, metrics: GatewayMetrics | None = None) -> AuxiliaryWork:
        """With a new pool of ``threads`` threads (named ``aux``)."""
        return cls(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="aux"), limit, metrics)

    @contextlib.contextmanager
    def slot(self, what: str) -> Iterator[None]:
        """Hold one job slot for the block.

        Args:
            what: the work, for the refusal's message (``"GetVideoFrame"``, ...).

        Raises:
            Overloaded: ``limit`` jobs are in flight.
        """
        if self.in_flight >= self.limit:
            if self.metrics is not None:
                self.metrics.limit_refusals.labels(limit="aux").inc()
            raise Overloaded(
                f"{what}: the gateway already runs {self.in_flight} jobs beside frame rendering "
                f"(limit {self.limit}); retry later"
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the pool (the caller holds a `slot`, or is otherwise admitted)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        """Shut the pool down (queued jobs are cancelled)."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def _ms(seconds: float | None) -> int:
    """Seconds -> gRPC milliseconds; None (or anything past int32) is gRPC's unlimited."""
    if seconds is None:
        return _INT32_MAX
    return min(_INT32_MAX, int(seconds * 1000))


def grpc_server_options(settings: GatewaySettings) -> list[tuple[str, int]]:
    """The gRPC core channel arguments of the gateway's server, from its settings.

    - ``grpc.max_concurrent_streams``: streams (calls) open at once on one HTTP/2 connection
      (``grpc_max_streams_per_connection``); a client opening more waits for one to end.
    - ``grpc.keepalive_time_ms`` / ``grpc.keepalive_timeout_ms``: the server pings a connection
      quiet for ``grpc_keepalive_time_s`` and drops it when no ack comes within
      ``grpc_keepalive_timeout_s`` (a vanished client frees its streams).
    - ``grpc.max_connection_idle_ms``: a connection with no call for that long is closed
      (GOAWAY).
    - ``grpc.max_connection_age_ms`` / ``grpc.max_connection_age_grace_ms``: after
      ``grpc_max_connection_age_s`` a connection gets GOAWAY (new calls go to a new
      connection, so load balancers can rebalance); calls open then may run on for the grace
      (unset: until they end, so a long ``StreamInference`` is never cut).

    ``maximum_concurrent_rpcs`` (calls open in the whole server) is an argument of
    ``grpc.aio.server``, not a channel argument: see `gateway.grpc_service.build_grpc_server`.
    """
    s = settings
    return [
        ("grpc.max_concurrent_streams", s.grpc_max_streams_per_connection),
        ("grpc.keepalive_time_ms", _ms(s.grpc_keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(s.grpc_keepalive_timeout_s)),
        ("grpc.max_connection_idle_ms", _ms(s.grpc_max_connection_idle_s)),
        ("grpc.max_connection_age_ms", _ms(s.grpc_max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(s.grpc_max_connection_age_grace_s)),
    ]
