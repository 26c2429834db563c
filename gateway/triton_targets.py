"""Where the gateway's Tritons are: ``LIPSYNC_TRITON_URL`` parsed into targets, and a target's
host name resolved into endpoints.

``LIPSYNC_TRITON_URL`` (`gateway.config.GatewaySettings.triton_url`) holds one or more targets
``host:port`` separated by commas: ``triton:8001``, ``10.0.0.5:8001,10.0.0.6:8001``,
``[fd00::5]:8001``. A target whose host is an IP address is one endpoint, as written. A host
name is resolved to every address it has, each address one endpoint ``address:port``: a
Kubernetes headless Service answers with one address per ready Triton pod, a docker-compose
service name with its container's address, ``localhost`` with the loopback address.

`system_resolver` asks the system resolver (``getaddrinfo`` through the event loop's thread
pool, so ``/etc/hosts`` and the cluster DNS both apply) and keeps one address family: IPv4 when
the name has any IPv4 address, else IPv6. A dual-stack pod has one address of each family, and
``localhost`` both ``127.0.0.1`` and ``::1``; counting both would make two endpoints of one
server. `gateway.endpoint_pool.EndpointPool` resolves names again periodically and applies the
changes.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``resolver(host, port)`` -> the IP addresses to use for ``host``, in order (an empty answer
means none). Raises `OSError` (``socket.gaierror``) when the name cannot be resolved."""


@dataclass(frozen=True)
class Target:
    """One entry of ``LIPSYNC_TRITON_URL``.

    Attributes:
        host: a host name or an IP address (IPv6 without brackets).
        port: TCP port of Triton's gRPC endpoint.
    """

    host: str
    port: int

    @property
    def is_address(self) -> bool:
        """Whether ``host`` is an IP address (the target is its one endpoint, not resolved)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def endpoint(self, address: str) -> str:
        """The endpoint ``address:port`` (``[address]:port`` for IPv6) of one of its addresses."""
        return endpoint_url(address, self.port)

    def __str__(self) -> str:
        return endpoint_url(self.host, self.port)


def endpoint_url(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address (gRPC's target syntax)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_targets(value: str) -> tuple[Target, ...]:
    """Parse ``LIPSYNC_TRITON_URL``: comma-separated ``host:port`` (``[v6]:port``), spaces
    around the commas allowed, duplicates dropped.

    Raises:
        ValueError: an empty list, an entry without a port, a port outside 1..65535, an empty
            host, or a scheme (``grpc://``, ``dns:///``: write ``host:port``).
    """
    targets: list[Target] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if "/" in entry:
            raise ValueError(f"Triton target {entry!r}: write host:port, without a scheme or path")
        host, sep, port_text = entry.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"Triton target {entry!r}: write an IPv6 address in brackets, [addr]:port")
        if not sep or not host:
            raise ValueError(f"Triton target {entry!r} is not host:port")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"Triton target {entry!r}: port {port_text!r} is not a number") from None
        if not 0 < port < 65536:
            raise ValueError(f"Triton target {entry!r}: port {port} is outside 1..65535")
        target = Target(host, port)
        if target not in targets:
            targets.append(target)
    if not targets:
        raise ValueError(f"no Triton target in {value!r} (expected host:port[,host:port...])")
    return tuple(targets)


async def system_resolver(host: str, port: int) -> list[str]:
    """`Resolver` over the system's ``getaddrinfo`` (TCP): the addresses of one family, IPv4 if
    any (module doc), in the resolver's order, without duplicates.

    Raises:
        OSError: ``socket.gaierror`` when the name does not resolve.
    """
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    by_family: dict[int, list[str]] = {socket.AF_INET: [], socket.AF_INET6: []}
    for family, _, _, _, sockaddr in infos:
        address = str(sockaddr[0])
        if family in by_family and address not in by_family[family]:
            by_family[family].append(address)
    return by_family[socket.AF_INET] or by_family[socket.AF_INET6]
