"""The gateway of an earlier git revision, for `perf.capacity` variants ``NAME@REV:ENV``.

`checkout_revision` resolves the revision to its commit in this repository, exports that
commit's tree with ``git archive`` (no worktree bookkeeping) into a cache folder named by the
full commit hash (reused by later runs), and checks with this Python that the tree's gateway
can run: ``gateway`` and ``lipsync`` import from the tree, ``python -m lipsync gateway --help``
works, and its ``gateway.config.GatewaySettings`` takes the settings the harness gives every
gateway (`perf.capacity_report.HARNESS_KEYS`). `revision_environment` puts the tree first on
``PYTHONPATH``, so ``python -m lipsync gateway`` started with it runs that revision's code with
this checkout's virtual environment (packages, tritonserver).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from perf.capacity_report import HARNESS_KEYS

_PROBE = (
    "import json, gateway, lipsync\n"
    "from gateway.config import GatewaySettings\n"
    "from gateway.ws_protocol import encode_frame_reply\n"
    "reply = encode_frame_reply(0, 0.0, b'', (0.0, 0.0, 1.0, 1.0))\n"
    "print(json.dumps({'gateway': gateway.__file__, 'lipsync': lipsync.__file__,\n"
    "                  'fields': sorted(GatewaySettings.model_fields),\n"
    "                  'bounds_len': int.from_bytes(reply[-20:-16], 'little')}))\n"
)
"""Run in the exported tree: where ``gateway`` and ``lipsync`` import from, the fields of its
`GatewaySettings` (pydantic-settings 2: ``model_fields``), and the ``bounds_len`` its
WebSocket success reply writes for 4 bounds (16 = bytes, 4 = a count: before c528de5)."""

READ_BY_LOG = frozenset({"LIPSYNC_LOG_LEVEL"})
"""``LIPSYNC_*`` keys a gateway reads outside `GatewaySettings` (`lipsync.log`)."""


def settings_keys(fields: Iterable[str]) -> frozenset[str]:
    """The ``LIPSYNC_*`` environment keys a gateway reads: one per field of its
    `GatewaySettings` (``fields``, e.g. ``model_fields``), plus `READ_BY_LOG`."""
    return frozenset(f"LIPSYNC_{name.upper()}" for name in fields) | READ_BY_LOG


class RevisionError(RuntimeError):
    """A revision that cannot be measured: not a commit of this repository, not exportable, or
    its gateway cannot run with this Python; the message says which and why."""


@dataclass(frozen=True, slots=True)
class RevisionCheckout:
    """An exported revision whose gateway runs with this Python.

    Attributes:
        revision: the revision as given (``9aa7bb8``, ``main~3``, ...).
        commit: its full commit hash (40 hex digits).
        describe: ``<short hash> <committer date, ISO 8601> <subject>``.
        root: the exported tree (holds ``gateway/``, ``lipsync/``, ``proto/``).
        settings: the ``LIPSYNC_*`` keys that revision's gateway reads.
        ws_count_bounds: its WebSocket success replies give ``bounds_len`` as a count of
            float32 values, not bytes (`perf.clients.decode_count_bounds_reply`).
    """

    revision: str
    commit: str
    describe: str
    root: Path
    settings: frozenset[str]
    ws_count_bounds: bool


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RevisionError(f"git {' '.join(args)} in {repo} failed: {exc}") from exc


def resolve_commit(repo: Path, revision: str) -> tuple[str, str]:
    """The full hash of `revision` in the git repository `repo`, and its one-line description.

    Raises:
        RevisionError: `repo` is not a git checkout, or `revision` names no commit of it (a
            shallow clone lacks old commits).
    """
    if revision.startswith("-"):
        raise RevisionError(f"revision {revision!r}: may not start with '-'")
    done = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}^{{commit}}")
    if done.returncode != 0:
        inside = _git(repo, "rev-parse", "--is-shallow-repository")
        if inside.returncode != 0:
            raise RevisionError(f"revision {revision!r}: {repo} is not a git checkout "
                                f"({inside.stderr.strip()})")
        shallow = " (this clone is shallow: `git fetch --unshallow` may bring it)" \
            if inside.stdout.strip() == "true" else ""
        raise RevisionError(f"revision {revision!r} is not a commit of {repo}{shallow}")
    commit = done.stdout.strip()
    shown = _git(repo, "show", "-s", "--format=%h %cI %s", commit)
    return commit, shown.stdout.strip()


def export_tree(repo: Path, commit: str, cache: Path) -> Path:
    """``cache/<commit>``: the commit's tree from ``git archive``, exported once (into a
    temporary folder renamed at the end, so a folder under its hash is always complete).

    Raises:
        RevisionError: ``git archive`` failed.
    """
    dest = cache / commit
    if dest.is_dir():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{commit}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tar = tmp.with_suffix(".tar")
    try:
        done = _git(repo, "archive", "--format=tar", f"--output={tar}", commit)
        if done.returncode != 0:
            raise RevisionError(f"git archive {commit} failed: {done.stderr.strip()}")
        with tarfile.open(tar) as archive:
            archive.extractall(tmp, filter="data")
        tmp.rename(dest)
    except OSError as exc:
        raise RevisionError(f"exporting {commit} into {dest} failed: {exc}") from exc
    finally:
        tar.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def revision_environment(env: Mapping[str, str], root: Path) -> dict[str, str]:
    """`env` with `root` first on ``PYTHONPATH`` (before any hook folder already there), so
    ``python -m lipsync ...`` imports that tree's ``gateway``, ``lipsync`` and ``proto``
    ahead of this checkout's (which the virtual environment puts on ``sys.path``)."""
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), out.get("PYTHONPATH", "")) if p)
    return out


def probe_gateway(root: Path, python: str = sys.executable) -> tuple[frozenset[str], bool]:
    """The ``LIPSYNC_*`` keys the gateway in `root` reads and whether its WebSocket replies
    count the bounds (`RevisionCheckout`), after checking that it runs with `python`:
    ``gateway`` and ``lipsync`` import from `root`, ``python -m lipsync gateway --help`` exits 0.

    Raises:
        RevisionError: with the failing step and the tail of its output.
    """
    env = revision_environment({k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")},
                               root)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([python, *args], cwd=root, env=env, capture_output=True,
                                  text=True, check=False, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RevisionError(f"{root}: {python} {args[0]} failed: {exc}") from exc

    probe = run("-c", _PROBE)
    if probe.returncode != 0:
        raise RevisionError(f"{root}: its gateway settings and WebSocket replies do not import "
                            "with this Python (gateway.config.GatewaySettings, "
                            f"gateway.ws_protocol.encode_frame_reply):\n{probe.stderr[-2000:]}")
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    for module in ("gateway", "lipsync"):
        if not Path(found[module]).resolve().is_relative_to(root.resolve()):
            raise RevisionError(f"{root}: `{module}` imports from {found[module]}, not from the tree")
    cli = run("-m", "lipsync", "gateway", "--help")
    if cli.returncode != 0:
        raise RevisionError(f"{root}: `python -m lipsync gateway --help` exited {cli.returncode} "
                            f"(no gateway command of this form):\n{cli.stderr[-2000:]}")
    if found["bounds_len"] not in (4, 16):
        raise RevisionError(f"{root}: its WebSocket reply gives bounds_len {found['bounds_len']} "
                            "for 4 bounds, neither bytes (16) nor a count (4)")
    keys = settings_keys(found["fields"])
    return keys, found["bounds_len"] == 4


def checkout_revision(repo: Path, revision: str, cache: Path,
                      python: str = sys.executable) -> RevisionCheckout:
    """Resolve, export (cached by full hash) and probe `revision` (module docstring).

    Raises:
        RevisionError: any step failed, or the revision's gateway lacks a setting the harness
            must give it (`HARNESS_KEYS`: where Triton, its ports and the packages are).
    """
    commit, describe = resolve_commit(repo, revision)
    root = export_tree(repo, commit, cache)
    settings, ws_count_bounds = probe_gateway(root, python)
    missing = sorted(HARNESS_KEYS - settings)
    if missing:
        raise RevisionError(f"revision {revision!r} ({describe}): its gateway does not read "
                            f"{', '.join(missing)}, which the harness sets to point it at its "
                            "Triton, ports and packages")
    return RevisionCheckout(revision, commit, describe, root, settings, ws_count_bounds)
