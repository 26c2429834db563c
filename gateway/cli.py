"""`lipsync gateway` and `lipsync up` (the main job).

- ``lipsync gateway``: runs the gateway (gRPC + HTTP/WebSocket + web page) against a Triton that
  is already running (``--triton-url``), until SIGINT/SIGTERM.
- ``lipsync up``: everything on this machine: builds the demo avatar if it is missing, starts
  the local CPU ``tritonserver`` on the CPU model repository (explicit model control), starts
  the gateway against it, logs the page URL and the gRPC address, and on Ctrl-C/SIGTERM stops
  the gateway first, then Triton.

Settings come from `gateway.config.GatewaySettings` (environment ``LIPSYNC_*``, ``.env``); a
CLI option that is given wins over the environment. Registering the parsers imports nothing
heavy; the command functions import the gateway, Triton and export code they need.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from lipsync.contract import (
    GATEWAY_GRPC_PORT,
    GATEWAY_HTTP_PORT,
    TRITON_GRPC_PORT,
    TRITON_HTTP_PORT,
    TRITON_METRICS_PORT,
)

if TYPE_CHECKING:
    from gateway.config import GatewaySettings
    from lipsync.cli import Subparsers
    from lipsync.triton_supervisor import SupervisorView

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 180.0
"""How long `lipsync up` waits for the gateway to report ready before saying it is not (s)."""


class StartupError(RuntimeError):
    """A component could not start (busy port, Triton failed, ...); the message says why."""


# ---------------------------------------------------------------------------------- parsers

_GATEWAY_EPILOG = f"""\
Settings: every option can also be set in the environment (or a .env file) as LIPSYNC_<NAME>,
e.g. LIPSYNC_TRITON_URL=triton:{TRITON_GRPC_PORT}, LIPSYNC_JPEG_QUALITY=90,
LIPSYNC_HTTP_PORT={GATEWAY_HTTP_PORT}; an option given on the command line wins. Port 0 picks a
free port.

Endpoints: http://HOST:HTTP_PORT/ (web page; a WebSocket there is the original clients'
endpoint), /ws (binary WebSocket, full frames), /healthz, /readyz,
/api/avatars, /api/stats, /metrics (Prometheus); gRPC service
optimized_lipsyncsrv.OptimizedLipSyncService on GRPC_PORT (+ grpc.health.v1, reflection).
"""

_UP_EPILOG = """\
What it does, in order:
  1. builds the demo avatar (packages/demo and its Triton models) if it is missing; the first
     build takes a few minutes and uses UNTRAINED weights unless you built it with a checkpoint;
  2. starts the CPU tritonserver (from the nvidia-pytriton wheel) on model_repository/cpu in
     explicit model-control mode, and waits until it is ready; whenever it exits it is started
     again on the same ports after a back-off (1 s doubling to 30 s), and after
     --triton-max-restarts quick failures in a row `lipsync up` stops and exits with status 1;
  3. starts the gateway against it and waits until it is ready;
  4. prints the web page URL and the gRPC address. Ctrl-C (or SIGTERM) stops the gateway, then
     Triton.

Gateway settings come from LIPSYNC_* environment variables as for `lipsync gateway`.
"""


def _add_gateway_options(parser: argparse.ArgumentParser, *, with_triton_url: bool) -> None:
    g = parser.add_argument_group("gateway (default: LIPSYNC_* environment, then built-in)")
    if with_triton_url:
        g.add_argument(
            "--triton-url",
            help=f"Triton gRPC endpoints host:port[,host:port...]; a host name is spread over all "
            f"its addresses (default localhost:{TRITON_GRPC_PORT})",
        )
    g.add_argument("--host", help="interface to bind (default 0.0.0.0)")
    g.add_argument(
        "--grpc-port", type=int, help=f"gRPC port (default {GATEWAY_GRPC_PORT}; 0 = free port)"
    )
    g.add_argument(
        "--http-port", type=int, help=f"HTTP/WebSocket port (default {GATEWAY_HTTP_PORT}; 0 = free)"
    )
    g.add_argument("--packages-root", type=Path, help="avatar packages folder (default packages/)")
    g.add_argument("--jpeg-quality", type=int, help="JPEG quality 1-100 (default 85)")
    g.add_argument(
        "--max-in-flight-per-connection",
        type=int,
        help="frames one WebSocket/gRPC stream may have in flight (default 8)",
    )
    g.add_argument(
        "--max-in-flight-total",
        type=int,
        help="frames in flight in one gateway process (each worker); more are refused as overloaded "
        "(default 64)",
    )
    g.add_argument(
        "--triton-timeout-s", type=float, help="Triton call deadline, queueing included, s (default 30)"
    )
    g.add_argument(
        "--workers",
        type=int,
        help="gateway worker processes sharing the ports (SO_REUSEPORT), restarted when they die "
        "(default 1: one process; how many per GPU: docs/ARCHITECTURE.md)",
    )


_SETTING_OPTIONS = (
    "triton_url", "host", "grpc_port", "http_port", "packages_root", "jpeg_quality",
    "max_in_flight_per_connection", "max_in_flight_total", "triton_timeout_s", "workers",
)


def register(subparsers: Subparsers) -> None:
    """Add ``lipsync gateway`` and ``lipsync up`` to the top-level ``subparsers``."""
    gw = subparsers.add_parser(
        "gateway",
        help="run the gateway (gRPC + WebSocket + web page) against a running Triton",
        description=(
            "Run the lip-sync gateway: loads every avatar package under the packages root,\n"
            "asks Triton (explicit model control) to load their models, and serves frames\n"
            "over gRPC and the binary WebSocket, with a web page, JSON endpoints and\n"
            "Prometheus metrics on the HTTP port. Runs until Ctrl-C / SIGTERM."
        ),
        epilog=_GATEWAY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_gateway_options(gw, with_triton_url=True)
    gw.set_defaults(func=run_gateway_command)

    up = subparsers.add_parser(
        "up",
        help="the main job: demo avatar if missing, CPU Triton and the gateway; Ctrl-C stops",
        description=(
            "Set up and start the whole service on this machine: the demo avatar (built if\n"
            "missing), the local CPU tritonserver and the gateway. Prints the web page URL\n"
            "and the gRPC address; Ctrl-C stops the gateway, then Triton."
        ),
        epilog=_UP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_gateway_options(up, with_triton_url=False)
    t = up.add_argument_group("local Triton")
    for flag, what, default in (
        ("--triton-http-port", "Triton HTTP port", TRITON_HTTP_PORT),
        ("--triton-grpc-port", "Triton gRPC port", TRITON_GRPC_PORT),
        ("--triton-metrics-port", "Triton metrics port", TRITON_METRICS_PORT),
    ):
        t.add_argument(flag, type=int, default=default, help=f"{what} ({default})")
    t.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="Triton model repository (default model_repository/cpu, generated)",
    )
    t.add_argument(
        "--triton-log",
        type=Path,
        default=None,
        help="file for Triton's log (default .cache/triton-up.log)",
    )
    t.add_argument(
        "--triton-start-timeout-s",
        type=float,
        default=300.0,
        help="how long to wait for Triton to load its models, s (default 300)",
    )
    from lipsync.triton_supervisor import add_restart_options

    add_restart_options(t)
    up.add_argument(
        "--skip-demo",
        action="store_true",
        help="do not build the demo avatar; serve the packages that exist",
    )
    up.set_defaults(func=run_up_command)


# ---------------------------------------------------------------------------------- helpers


def settings_from_args(args: argparse.Namespace, **extra: Any) -> GatewaySettings:
    """`GatewaySettings` from the environment, overridden by the options given (and ``extra``).

    Raises:
        pydantic.ValidationError: an out-of-range value (the message names the field).
    """
    from gateway.config import GatewaySettings

    overrides = {
        k: getattr(args, k) for k in _SETTING_OPTIONS if getattr(args, k, None) is not None
    }
    overrides.update(extra)
    return GatewaySettings(**overrides)


def check_port_free(host: str, port: int, what: str, hint: str) -> None:
    """Fail early with a clear message if ``port`` is taken (0 = any port: always fine).

    Raises:
        StartupError: the port cannot be bound (in use, or not permitted).
    """
    if port == 0:
        return
    bind_host = "" if host in ("0.0.0.0", "", "::") else host
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                reason = "is already in use"
            else:
                reason = f"cannot be bound ({exc.strerror})"
            raise StartupError(f"{what} port {port} {reason}; {hint}") from exc


def check_gateway_ports(settings: GatewaySettings) -> None:
    """`check_port_free` for the gateway's HTTP and gRPC ports.

    Raises:
        StartupError: one of them is taken (the message says which and how to change it).
    """
    for what, port, option in (
        ("HTTP", settings.http_port, "http-port"),
        ("gRPC", settings.grpc_port, "grpc-port"),
    ):
        env = "LIPSYNC_" + option.replace("-", "_").upper()
        check_port_free(settings.host, port, what, f"pass --{option} or set {env}")


def _display_host(host: str) -> str:
    return "localhost" if host in ("0.0.0.0", "", "::") else host


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises KeyboardInterrupt, so `finally` blocks clean up."""

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_as_event() -> Iterator[threading.Event]:
    """While active, SIGINT and SIGTERM set the yielded event instead of raising
    KeyboardInterrupt: a wait on another thread's lock (`TritonSupervisor.wait_running`) is
    then never cut short between taking the lock and the ``with`` that releases it."""
    event = threading.Event()

    def _set(signum: int, frame: FrameType | None) -> None:
        event.set()

    previous = {sig: signal.signal(sig, _set) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _loop_signals_as_event() -> Iterator[asyncio.Event]:
    """While active, SIGINT and SIGTERM set the yielded event (the running loop's signal
    handlers, removed on exit: a signal then acts as before, e.g. Ctrl-C raises)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def serve_gateway(
    settings: GatewaySettings,
    *,
    wait_ready_s: float = 0.0,
    banner: str = "",
    supervisor: SupervisorView | None = None,
) -> None:
    """Start `gateway.server.GatewayServer`, log its addresses, serve until SIGINT/SIGTERM.

    With ``settings.workers`` > 1 this process starts that many gateway workers instead and
    supervises them (`gateway.workers`); with 1 it is the gateway itself (no supervisor).

    Args:
        settings: the gateway configuration.
        wait_ready_s: if > 0, wait up to this long (s) for readiness and log the outcome.
        banner: extra lines logged with the addresses (``lipsync up`` adds Triton's).
        supervisor: the supervisor of the gateway's tritonserver (``lipsync up``); None for
            ``lipsync gateway``.

    Raises:
        StartupError: a port could not be bound, or a TLS file cannot be used; with workers,
            also a worker that failed to start or kept failing.
    """
    if settings.workers > 1:
        await _serve_workers(settings, wait_ready_s=wait_ready_s, banner=banner, supervisor=supervisor)
        return
    from gateway.server import GatewayServer
    from gateway.tls import TlsConfigError

    server = GatewayServer(settings, supervisor=supervisor)
    try:
        with _loop_signals_as_event() as stop:
            try:
                await server.start()
            except TlsConfigError as exc:
                raise _tls_error(exc) from exc
            except (OSError, RuntimeError) as exc:  # grpc raises RuntimeError on a busy port
                raise _bind_error(settings, exc) from exc
            host = _display_host(settings.host)
            log.info(
                "gateway serving: web page %s://%s:%d/  gRPC %s:%d  (Ctrl-C stops)%s",
                _scheme(settings), host, server.http_port, host, server.grpc_port, banner,
            )
            if wait_ready_s > 0:
                await _wait_ready(server, wait_ready_s, stop)
            await stop.wait()
            log.info("stopping the gateway ...")
    finally:
        await server.stop()  # logs "gateway stopped"


def _tls_error(exc: BaseException) -> StartupError:
    return StartupError(f"the gateway's TLS settings cannot be used: {exc}")


def _bind_error(settings: GatewaySettings, exc: BaseException) -> StartupError:
    health = f", health {settings.health_port}" if settings.health_port is not None else ""
    return StartupError(
        f"the gateway could not bind its ports (HTTP {settings.http_port}, gRPC "
        f"{settings.grpc_port}{health}): {exc}; pass --http-port/--grpc-port or set "
        "LIPSYNC_HTTP_PORT/LIPSYNC_GRPC_PORT (LIPSYNC_HEALTH_PORT)"
    )


async def _serve_workers(
    settings: GatewaySettings, *, wait_ready_s: float, banner: str, supervisor: SupervisorView | None
) -> None:
    """`serve_gateway` with ``settings.workers`` > 1: `gateway.workers.WorkerSupervisor` runs the
    workers in child processes until SIGINT/SIGTERM, or until it gives up on one.

    Raises:
        StartupError: a port could not be bound, a TLS file cannot be used, a worker failed to
            start, or the supervisor gave up on a worker that kept failing (the message says
            which and how).
    """
    from gateway.tls import TlsConfigError, grpc_server_credentials, http_ssl_context
    from gateway.workers import WorkerStartError, WorkerSupervisor

    try:  # the files every worker will read, checked once here
        grpc_server_credentials(settings)
        http_ssl_context(settings)
    except TlsConfigError as exc:
        raise _tls_error(exc) from exc
    workers = WorkerSupervisor(settings, triton=supervisor)
    try:
        with _loop_signals_as_event() as stop:
            try:
                await workers.start()
            except OSError as exc:
                raise _bind_error(settings, exc) from exc
            except WorkerStartError as exc:
                raise StartupError(str(exc)) from exc
            host = _display_host(settings.host)
            log.info(
                "gateway serving with %d workers: web page %s://%s:%d/  gRPC %s:%d  (Ctrl-C stops)%s",
                settings.workers, _scheme(settings), host, workers.http_port, host, workers.grpc_port,
                banner,
            )
            gave_up = asyncio.ensure_future(workers.wait_given_up())
            stopped = asyncio.ensure_future(stop.wait())
            try:
                if wait_ready_s > 0:
                    await _wait_workers_ready(workers, wait_ready_s, stop)
                await asyncio.wait({gave_up, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                gave_up.cancel()
            if workers.gave_up_message is not None:
                raise StartupError(workers.gave_up_message)
            log.info("stopping the gateway workers ...")
    finally:
        await workers.stop()  # logs "gateway workers stopped"


async def _poll_until(done: Callable[[], bool], timeout_s: float, stop: asyncio.Event) -> None:
    """Return once ``done()`` is true, ``stop`` is set or ``timeout_s`` s have passed (checked
    every 0.5 s)."""
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline and not stop.is_set():
        await asyncio.sleep(0.5)


async def _wait_workers_ready(workers: Any, timeout_s: float, stop: asyncio.Event) -> None:
    await _poll_until(lambda: workers.all_ready() or workers.gave_up_message is not None, timeout_s, stop)
    host = _display_host(workers.settings.host)
    if workers.all_ready():
        log.info(
            "ready: %d workers; open %s://%s:%d/ and press Play",
            len(workers.slots), _scheme(workers.settings), host, workers.http_port,
        )
    elif not stop.is_set() and workers.gave_up_message is None:
        log.warning("not every worker is ready after %.0f s; see /readyz", timeout_s)


def _scheme(settings: GatewaySettings) -> str:
    """``https`` when the gateway serves TLS, else ``http``."""
    from gateway.tls import tls_enabled

    return "https" if tls_enabled(settings) else "http"


async def _wait_ready(server: Any, timeout_s: float, stop: asyncio.Event) -> None:
    ctx = server.ctx
    await _poll_until(ctx.ready, timeout_s, stop)
    if ctx.ready():
        names = ", ".join(ctx.store.names())
        log.info("ready: avatars %s; open %s://%s:%d/ and press Play",
                 names, _scheme(server.settings), _display_host(server.settings.host), server.http_port)
    elif not stop.is_set():
        snapshot = ctx.lifecycle.snapshot()
        log.warning(
            "not ready after %.0f s (%s; avatars %s); see /readyz",
            timeout_s, snapshot.reason() or "Triton ready", ctx.store.names() or "none",
        )


def _ensure_demo(packages_root: Path, model_repo_cpu: Path) -> None:
    """Build the demo avatar and its Triton models if missing (`export.demo.ensure_demo`).

    Raises:
        StartupError: the build failed (missing demo media, no face found, export error).
    """
    from export.demo import DemoMediaError, ensure_demo
    from export.package_builder import BuildError
    from lipsync.package import PackageError

    log.info("checking the demo avatar (built on first run, a few minutes) ...")
    try:
        demo = ensure_demo(packages_root=packages_root, model_repo_cpu=model_repo_cpu)
    except (DemoMediaError, BuildError, PackageError) as exc:
        raise StartupError(
            f"the demo avatar could not be built: {exc} (run scripts/setup.sh, or pass "
            "--skip-demo to serve the packages that exist)"
        ) from exc
    log.info("demo avatar ready at %s", demo)


# ---------------------------------------------------------------------------------- commands


def run_gateway_command(args: argparse.Namespace) -> int:
    """``lipsync gateway``: serve until SIGINT/SIGTERM; exit status 0, or 1 on a start error."""
    settings = settings_from_args(args)
    try:
        check_gateway_ports(settings)
        asyncio.run(serve_gateway(settings))
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0


def run_up_command(args: argparse.Namespace) -> int:
    """``lipsync up``: demo avatar, CPU Triton, gateway; stops both on Ctrl-C/SIGTERM.

    Returns:
        0 after a clean stop; 1 when something could not start or Triton failed too often in
        a row (the log says what).
    """
    from lipsync.paths import CACHE_DIR, MODEL_REPOSITORY_CPU
    from lipsync.triton_supervisor import (
        TritonGaveUp,
        TritonSupervisor,
        restart_policy_from_args,
        serve_until_given_up,
    )

    repo: Path = args.model_repository or MODEL_REPOSITORY_CPU
    triton_ports = {
        "Triton HTTP": (args.triton_http_port, "--triton-http-port"),
        "Triton gRPC": (args.triton_grpc_port, "--triton-grpc-port"),
        "Triton metrics": (args.triton_metrics_port, "--triton-metrics-port"),
    }
    try:
        base = settings_from_args(args)
        policy = restart_policy_from_args(args)
        # Fail before any slow step if a port is taken.
        check_gateway_ports(base)
        for what, (port, flag) in triton_ports.items():
            check_port_free("127.0.0.1", port, what, f"pass {flag} (or stop the other Triton)")
    except (StartupError, ValueError) as exc:
        log.error("%s", exc)
        return 1

    with sigterm_as_keyboard_interrupt():
        supervisor = None
        try:
            if not args.skip_demo:
                _ensure_demo(base.packages_root, repo)
            from lipsync.triton_local import TritonServer, TritonStartError

            log_file = args.triton_log or CACHE_DIR / "triton-up.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            triton = TritonServer(
                repo,
                http_port=args.triton_http_port,
                grpc_port=args.triton_grpc_port,
                metrics_port=args.triton_metrics_port,
                model_control_mode="explicit",
                log_file=log_file,
            )
            timeout_s = args.triton_start_timeout_s
            supervisor = TritonSupervisor(triton, policy, start_timeout_s=timeout_s)
            log.info("starting the CPU tritonserver on %s (log: %s) ...", repo, log_file)
            with signals_as_event() as interrupted:
                try:
                    supervisor.start()  # restarts it when it exits, gives up after quick failures
                    supervisor.wait_running(cancel=interrupted)
                except TritonStartError as exc:
                    if not interrupted.is_set():
                        log.error("Triton did not start: %s", exc)
                        return 1
            if interrupted.is_set():
                raise KeyboardInterrupt
            settings = settings_from_args(args, triton_url=triton.grpc_url)
            banner = f"  Triton {triton.grpc_url} (gRPC), {triton.metrics_url} (metrics)"
            gateway = serve_gateway(
                settings, wait_ready_s=READY_TIMEOUT_S, banner=banner, supervisor=supervisor
            )
            asyncio.run(serve_until_given_up(gateway, supervisor))
        except TritonGaveUp as exc:
            log.error("%s; stopped the gateway", exc)
            return 1
        except StartupError as exc:
            log.error("%s", exc)
            return 1
        except KeyboardInterrupt:
            log.info("interrupted")
        finally:
            # Cleanup must not be cut short by a second Ctrl-C/SIGTERM (Triton would be left).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if supervisor is not None:
                log.info("stopping Triton ...")
                supervisor.stop()
                log.info("Triton stopped")
    return 0
