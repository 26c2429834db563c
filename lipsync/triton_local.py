"""The local CPU `tritonserver`: the real binary shipped in the nvidia-pytriton wheel.

`TritonServer` starts it on a model repository of the CPU profile (Python-backend models running
ONNX Runtime, written by `export/model_repo.py`), waits until it is ready, streams its log, and
stops it. `lipsync triton` runs it in the foreground until Ctrl-C / SIGTERM.

How the wheel's server is made to run (docs/ARCHITECTURE.md "Two serving profiles"):
- binary `pytriton/tritonserver/bin/tritonserver`, its shared libraries in the wheel's
  `nvidia_pytriton.libs/` (put on `LD_LIBRARY_PATH`);
- a backend folder (`CACHE_DIR/triton_backends/python/`) holding the wheel's
  `libtriton_python.so`, `triton_python_backend_utils.py` and the stub built for this
  interpreter's Python version (`python_backend_stubs/<major.minor>/triton_python_backend_stub`),
  passed as `--backend-directory`;
- the stub embeds CPython in *isolated* mode, so it ignores `PYTHONPATH`; it derives its prefix
  from the first `python3` on `PATH`. Putting this environment's `bin/` first on `PATH` makes it
  read the venv's `pyvenv.cfg` and import numpy/onnxruntime from the venv's site-packages (the
  same mechanism pytriton itself uses). The stub links the system `libpython3.<minor>.so.1.0`.
- Without a GPU the server logs CUDA/NVML/DCGM warnings and serves normally; those lines are
  logged at DEBUG here.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Literal

from lipsync import paths

if TYPE_CHECKING:
    from lipsync.cli import Subparsers

logger = logging.getLogger(__name__)
server_log = logger.getChild("server")

ModelControlMode = Literal["none", "explicit"]

_LOG_TAIL_LINES = 60
_NO_GPU_NOISE = (
    "CUDA driver",
    "CudaDriverHelper",
    "NVML",
    "DCGM",
    "pinned memory",
    "CUDA memory pool",
    "cuda_memory_manager",
    "Unable to find CUDA",
)
_MODEL_FILES = ("model.py", "model.onnx", "model.plan")


class TritonStartError(RuntimeError):
    """tritonserver could not be started: missing binary or models, busy port, early exit or
    not ready in time. The message says which, and includes the tail of Triton's log.

    Attributes:
        summary: one line saying what went wrong.
        report: Triton's error lines and the tail of its log ("" when it was not spawned).
    """

    def __init__(self, summary: str, report: str = "") -> None:
        super().__init__(f"{summary} {report}" if report else summary)
        self.summary = summary
        self.report = report


class TritonStartCancelled(TritonStartError):
    """`TritonServer.start` was cancelled (its `cancel` event was set) before Triton was ready;
    the process it had spawned is stopped."""


@dataclass(frozen=True)
class TritonInstall:
    """Files of the tritonserver shipped in the nvidia-pytriton wheel.

    Attributes:
        binary: the `tritonserver` executable.
        libs_dir: the wheel's `nvidia_pytriton.libs/` (for `LD_LIBRARY_PATH`).
        python_backend: `libtriton_python.so`.
        backend_utils: `triton_python_backend_utils.py`.
        stub: `triton_python_backend_stub` built for this interpreter's Python version.
    """

    binary: Path
    libs_dir: Path
    python_backend: Path
    backend_utils: Path
    stub: Path


def find_triton_install() -> TritonInstall:
    """Locate the tritonserver of the nvidia-pytriton wheel through `importlib`.

    Raises:
        TritonStartError: the wheel is not installed, or a file it should hold is missing.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError(
            "the tritonserver binary comes from the nvidia-pytriton wheel, which is not "
            "installed in this environment: pip install -e '.[triton]'"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    server = package / "tritonserver"
    install = TritonInstall(
        binary=server / "bin" / "tritonserver",
        libs_dir=package.parent / "nvidia_pytriton.libs",
        python_backend=server / "backends" / "python" / "libtriton_python.so",
        backend_utils=server / "backends" / "python" / "triton_python_backend_utils.py",
        stub=server / "python_backend_stubs" / version / "triton_python_backend_stub",
    )
    for what, path in (
        ("tritonserver binary", install.binary),
        ("tritonserver libraries", install.libs_dir),
        ("Python backend", install.python_backend),
        ("Python backend utilities", install.backend_utils),
        (f"Python backend stub for Python {version}", install.stub),
    ):
        if not path.exists():
            raise TritonStartError(
                f"{what} not found at {path}: the nvidia-pytriton wheel in {package.parent} "
                "is incomplete or does not support this Python; reinstall it "
                "(pip install --force-reinstall nvidia-pytriton)"
            )
    return install


def check_stub_libraries(install: TritonInstall) -> None:
    """Check with `ldd` that the backend stub finds its shared libraries (notably the system's
    `libpython3.<minor>.so.1.0`, which it embeds). Skipped where `ldd` is not available.

    Raises:
        TritonStartError: naming the libraries that are not found.
    """
    ldd = shutil.which("ldd")
    if ldd is None:
        return
    env = {**os.environ, "LD_LIBRARY_PATH": str(install.libs_dir)}
    done = subprocess.run(
        [ldd, str(install.stub)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    missing = [line.split()[0] for line in done.stdout.splitlines() if "not found" in line]
    if missing:
        hint = "install the missing libraries"
        for name in missing:
            if name.startswith("libpython"):
                version = name[len("libpython") :].split(".so")[0]
                hint = (
                    f"it embeds the system's shared Python {version} library (on Debian: "
                    f"apt-get install libpython{version})"
                )
        raise TritonStartError(
            f"the Python backend stub {install.stub} cannot load {', '.join(missing)}; {hint}"
        )


def prepare_backend_dir(install: TritonInstall, root: Path | None = None) -> Path:
    """Assemble the `--backend-directory` folder: `<root>/python/` with the Python backend
    library, its utilities and the stub for this Python. Idempotent; files are replaced
    atomically, so concurrent callers are safe.

    Args:
        root: the backend directory (default `CACHE_DIR / "triton_backends"`).

    Returns:
        The backend directory to pass to tritonserver.
    """
    root = Path(root) if root is not None else paths.CACHE_DIR / "triton_backends"
    target_dir = root / "python"
    target_dir.mkdir(parents=True, exist_ok=True)
    for source, name in (
        (install.python_backend, "libtriton_python.so"),
        (install.backend_utils, "triton_python_backend_utils.py"),
        (install.stub, "triton_python_backend_stub"),
    ):
        target = target_dir / name
        if target.exists() and target.stat().st_size == source.stat().st_size:
            continue
        staging = target_dir / f".{name}.{os.getpid()}.tmp"
        shutil.copy2(source, staging)
        os.replace(staging, target)
    return root


def server_environment(install: TritonInstall) -> dict[str, str]:
    """Environment for tritonserver: its libraries on `LD_LIBRARY_PATH`, and this Python
    environment's `bin/` first on `PATH` so the backend stub finds the venv (module docstring)."""
    env = os.environ.copy()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(install.libs_dir), env.get("LD_LIBRARY_PATH", "")) if p
    )
    bin_dir = Path(sys.prefix) / "bin"
    if not (bin_dir / "python3").exists():
        bin_dir = Path(sys.executable).parent
    env["PATH"] = os.pathsep.join(p for p in (str(bin_dir), env.get("PATH", "")) if p)
    return env


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on `host:port` (TCP); a TIME_WAIT leftover does not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that are free now (bound to port 0 together, then released)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def check_model_repository(repo: Path, load_models: Sequence[str]) -> list[str]:
    """Check that a model repository holds the models to load; return their names.

    Args:
        repo: the model repository folder.
        load_models: model names, or ("*",) for every model folder in `repo`.

    Raises:
        TritonStartError: the folder is missing, holds no model, or a named model has no
            config.pbtxt or no version folder with a model file.
    """
    hint = "build it with `lipsync package demo` or `lipsync export model-repo`"
    if not repo.is_dir():
        raise TritonStartError(f"model repository {repo} does not exist; {hint}")
    available = sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = available if tuple(load_models) == ("*",) else list(load_models)
    if not names:
        raise TritonStartError(f"model repository {repo} holds no model folders; {hint}")
    for name in names:
        folder = repo / name
        if not folder.is_dir():
            raise TritonStartError(
                f"model '{name}' is not in {repo} (it holds: {', '.join(available) or 'nothing'})"
            )
        if not (folder / "config.pbtxt").is_file():
            raise TritonStartError(f"model '{name}': {folder / 'config.pbtxt'} is missing; {hint}")
        versions = [v for v in folder.iterdir() if v.is_dir() and v.name.isdigit()]
        if not any((v / f).is_file() for v in versions for f in _MODEL_FILES):
            raise TritonStartError(
                f"model '{name}': no version folder in {folder} holds a model file "
                f"({', '.join(_MODEL_FILES)}); {hint}"
            )
    return names


class TritonServer:
    """A tritonserver process on the CPU profile (context manager: starts and stops it).

    Args:
        model_repository: the model repository (e.g. `paths.MODEL_REPOSITORY_CPU`).
        http_port, grpc_port, metrics_port: TCP ports (must differ and be free).
        model_control_mode: "explicit" (load `load_models` at start, more via the API) or
            "none" (load every model in the repository).
        load_models: models to load at start in explicit mode; ("*",) = every model folder.
        log_file: when given, Triton's log is appended to it as well as to the logger.
        host: the address Triton binds (HTTP, gRPC and metrics); default loopback only.
        extra_args: further `tritonserver` flags, appended to the command as given (e.g.
            `--grpc-restricted-protocol=model-repository:<header>=<key>`, as the GPU host's
            docker-compose.yml passes them).
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        http_port: int,
        grpc_port: int,
        metrics_port: int,
        model_control_mode: ModelControlMode = "explicit",
        load_models: Sequence[str] = ("*",),
        log_file: Path | None = None,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
    ) -> None:
        if model_control_mode not in ("none", "explicit"):
            raise ValueError(
                f"model_control_mode must be 'none' or 'explicit', not {model_control_mode!r}"
            )
        self.model_repository = Path(model_repository).resolve()
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.model_control_mode = model_control_mode
        self.load_models = tuple(load_models)
        self.log_file = Path(log_file) if log_file is not None else None
        self.host = host
        self.extra_args = tuple(extra_args)
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._errors: collections.deque[str] = collections.deque(maxlen=10)
        self._reaped = False

    # ------------------------------------------------------------------ addresses and state
    @property
    def grpc_url(self) -> str:
        """gRPC endpoint for tritonclient.grpc, "localhost:PORT"."""
        return f"localhost:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """HTTP endpoint, "http://localhost:PORT"."""
        return f"http://localhost:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus metrics, "http://localhost:PORT/metrics"."""
        return f"http://localhost:{self.metrics_port}/metrics"

    @property
    def is_running(self) -> bool:
        """True while the tritonserver process is alive."""
        return self._process is not None and self._process.poll() is None

    def poll(self) -> int | None:
        """Reap tritonserver if it has exited, and return its exit status.

        Never blocks. Once the process has exited it is reaped (`waitpid`, so no zombie is
        left) and what is left of its process group (Python-backend stubs) is SIGKILLed.

        Returns:
            None while it runs (or when it was never started, or not spawned by the last
            `start`); else its exit status as `subprocess.Popen.returncode` gives it: >= 0 an
            exit code, < 0 the number of the signal that killed it, negated.
        """
        if self._process is None or self._process.poll() is None:
            return None
        self._reap()
        return self._process.returncode

    @property
    def pid(self) -> int | None:
        """Process id of tritonserver, or None when not started. tritonserver leads its own
        process group (its Python-backend stubs are in it), so this is also the group id."""
        return self._process.pid if self._process is not None else None

    def log_tail(self, lines: int = 25) -> str:
        """The last `lines` lines Triton printed."""
        return "\n".join(list(self._tail)[-lines:])

    def failure_report(self) -> str:
        """Triton's error lines (if any) and the tail of its log, for error messages."""
        report = ""
        if self._errors:
            report += "Errors it logged:\n" + "\n".join(self._errors) + "\n"
        return report + "Its log ends with:\n" + self.log_tail(15)

    # ------------------------------------------------------------------------- lifecycle
    def _command(self, install: TritonInstall, backend_dir: Path) -> list[str]:
        command = [
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--model-control-mode={self.model_control_mode}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
            # Python-backend shared memory: a UNet batch of 8 moves ~5 MiB each way.
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
        ]
        if self.model_control_mode == "explicit":
            command += [f"--load-model={name}" for name in self.load_models]
        return command + list(self.extra_args)

    def _check_ports(self) -> None:
        ports = {"HTTP": self.http_port, "gRPC": self.grpc_port, "metrics": self.metrics_port}
        if len(set(ports.values())) != len(ports):
            raise TritonStartError(f"Triton's ports must differ, got {ports}")
        for what, port in ports.items():
            if not 0 < port < 65536:
                raise TritonStartError(f"Triton {what} port {port} is not a valid TCP port")
            if port_in_use(port, self.host):
                raise TritonStartError(
                    f"Triton {what} port {port} on {self.host} is already in use (another "
                    "tritonserver?); stop that process or choose another port"
                )

    def _pump_log(self, stream: IO[bytes]) -> None:
        """Reader thread: Triton's stdout+stderr -> tail buffer, log file, logger."""
        log_handle = self.log_file.open("a", encoding="utf-8") if self.log_file else None
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip()
                if not line:
                    continue
                self._tail.append(line)
                level = _level_of(line)
                if level >= logging.ERROR:
                    self._errors.append(line)
                if log_handle is not None:
                    log_handle.write(line + "\n")
                    log_handle.flush()
                server_log.log(level, "%s", line)
        finally:
            if log_handle is not None:
                log_handle.close()

    def check(self) -> list[str]:
        """Check what `start` needs before it spawns the process: the tritonserver install and
        its stub's libraries, the model repository and the models to load, free ports.

        Returns:
            The names of the models tritonserver will load.

        Raises:
            TritonStartError: saying what is missing or busy.
        """
        install = find_triton_install()
        check_stub_libraries(install)
        load = self.load_models if self.model_control_mode == "explicit" else ("*",)
        names = check_model_repository(self.model_repository, load)
        self._check_ports()
        return names

    def start(self, timeout_s: float = 120.0, *, cancel: threading.Event | None = None) -> None:
        """Start tritonserver and wait until `/v2/health/ready` answers 200.

        Args:
            timeout_s: how long to wait for readiness (model loading included), s.
            cancel: when given and set while waiting, the start is abandoned within about
                1 s (one readiness request): the process is stopped and
                `TritonStartCancelled` raised.

        Raises:
            TritonStartError: missing binary, missing model repository or model files, busy
                port, the process exiting early, or not ready within `timeout_s` seconds (the
                process is then stopped). The message includes the tail of Triton's log.
            TritonStartCancelled: `cancel` was set first.
        """
        if self.is_running:
            raise TritonStartError(f"tritonserver (pid {self.pid}) is already running")
        if self._process is not None:  # a previous run that exited: reap its group, forget it
            self._reap()
            self._process = None
        names = self.check()
        install = find_triton_install()
        backend_dir = prepare_backend_dir(install)
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
        command = self._command(install, backend_dir)
        logger.info(
            "starting tritonserver (models %s from %s; HTTP %d, gRPC %d, metrics %d)",
            ", ".join(names),
            self.model_repository,
            self.http_port,
            self.grpc_port,
            self.metrics_port,
        )
        logger.debug("command: %s", " ".join(command))
        self._tail.clear()
        self._errors.clear()
        self._reaped = False
        self._process = subprocess.Popen(
            command,
            env=server_environment(install),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: Ctrl-C reaches us, not Triton's stubs
        )
        self._reader = threading.Thread(
            target=self._pump_log,
            args=(self._process.stdout,),
            name="tritonserver-log",
            daemon=True,
        )
        self._reader.start()
        try:
            self._wait_ready(timeout_s, cancel)
        except BaseException:  # Ctrl-C or any error while waiting: leave no server behind
            self.stop()
            raise
        logger.info(
            "tritonserver ready (pid %d): gRPC %s, HTTP %s", self.pid, self.grpc_url, self.http_url
        )

    def _wait_ready(self, timeout_s: float, cancel: threading.Event | None) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.host}:{self.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                raise TritonStartCancelled("tritonserver start cancelled before it was ready")
            code = self._process.poll()
            if code is not None:
                self._reap()
                raise TritonStartError(
                    f"tritonserver {describe_exit(code)} before it was ready.",
                    self.failure_report(),
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if cancel is not None:
                cancel.wait(0.2)
            else:
                time.sleep(0.2)
        self.stop()
        raise TritonStartError(
            f"tritonserver was not ready after {timeout_s:.0f} s (stopped it).",
            self.failure_report(),
        )

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5.0)

    def _signal_group(self, sig: signal.Signals) -> None:
        """Send `sig` to Triton's process group (tritonserver and its backend stubs)."""
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, sig)

    def _reap(self) -> None:
        """After tritonserver exited: SIGKILL what is left of its process group (stubs), once."""
        if self._process is None or self._reaped:
            return
        self._signal_group(signal.SIGKILL)
        self._process.wait()
        self._reaped = True
        self._join_reader()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop tritonserver: SIGTERM, then SIGKILL to its process group (the Python-backend
        stubs included) after `timeout_s` seconds. Safe to call when not running."""
        if self._process is None or self._reaped:
            return
        if self._process.poll() is None:
            logger.info("stopping tritonserver (pid %d)", self._process.pid)
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not exit in %.0f s; killing it", timeout_s)
        self._reap()

    def kill(self) -> None:
        """SIGKILL tritonserver and its stubs at once (simulates a crash)."""
        if self._process is None or self._reaped:
            return
        logger.warning("killing tritonserver (pid %d)", self._process.pid)
        self._reap()

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def describe_exit(returncode: int) -> str:
    """How a process ended, from its `subprocess.Popen.returncode`: "exited with status 1",
    or "was killed by SIGKILL" for a negative code (the signal number, negated)."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"


def _level_of(line: str) -> int:
    """Logging level for one Triton log line (`I...`, `W...`, `E...`; tables are DEBUG)."""
    if any(noise in line for noise in _NO_GPU_NOISE):
        return logging.DEBUG
    head = line[:1]
    if head == "E" and line[1:2].isdigit():
        return logging.ERROR
    if head == "W" and line[1:2].isdigit():
        return logging.WARNING
    if head == "I" and ("successfully loaded" in line or "Started " in line):
        return logging.INFO
    if line.startswith("error:"):
        return logging.ERROR
    return logging.DEBUG


# --------------------------------------------------------------------------------------- CLI


def _cmd_triton(args: argparse.Namespace) -> int:
    server = TritonServer(
        args.model_repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        load_models=args.load_model or ("*",),
        log_file=args.log_file,
        host=args.host,
    )
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop_requested.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start(timeout_s=args.timeout)
        logger.info(
            "Triton is serving: gRPC %s, HTTP %s, metrics %s. Ctrl-C stops it.",
            server.grpc_url,
            server.http_url,
            server.metrics_url,
        )
        while not stop_requested.wait(0.5):
            if not server.is_running:
                logger.error("tritonserver exited unexpectedly. %s", server.failure_report())
                return 1
        return 0
    except TritonStartError as exc:
        logger.error("%s", exc)
        return 2
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def register(subparsers: Subparsers) -> None:
    """Add `lipsync triton` (run the local CPU tritonserver in the foreground)."""
    # Imported here: the launcher itself needs the standard library only (no numpy).
    from lipsync.contract import TRITON_GRPC_PORT, TRITON_HTTP_PORT, TRITON_METRICS_PORT

    parser = subparsers.add_parser(
        "triton",
        help="run the local CPU tritonserver (nvidia-pytriton wheel) on the CPU model repository",
        description=(
            "Start the tritonserver from the nvidia-pytriton wheel on a CPU-profile model "
            "repository, wait until it is ready, stream its log, and stop it on Ctrl-C/SIGTERM."
        ),
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=paths.MODEL_REPOSITORY_CPU,
        help=f"CPU-profile model repository (default {paths.MODEL_REPOSITORY_CPU})",
    )
    for flag, default in (
        ("--http-port", TRITON_HTTP_PORT),
        ("--grpc-port", TRITON_GRPC_PORT),
        ("--metrics-port", TRITON_METRICS_PORT),
    ):
        parser.add_argument(flag, type=int, default=default, help=f"default {default}")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--model-control-mode", choices=("explicit", "none"), default="explicit")
    parser.add_argument(
        "--load-model",
        action="append",
        metavar="NAME",
        help="model to load at start in explicit mode (repeatable; default: every model, '*')",
    )
    parser.add_argument("--log-file", type=Path, default=None, help="also append Triton's log here")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for ready")
    parser.set_defaults(func=_cmd_triton)
