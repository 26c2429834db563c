"""`perf.servers.child_process`: the child and what it started are stopped together on exit."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from perf.servers import child_process
from tests.fixtures_triton import group_gone

# A child that starts a grandchild (in its process group) and waits; it says when both run.
PARENT = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print('started', flush=True)\n"
    "time.sleep(120)\n"
)


def test_the_whole_group_is_stopped_on_exit(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    with child_process([sys.executable, "-c", PARENT], os.environ, log) as proc:
        deadline = time.monotonic() + 30
        while b"started" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert os.getpgid(proc.pid) == proc.pid  # a group of its own
    assert proc.returncode is not None
    assert group_gone(proc.pid), "the grandchild outlived the context"


def test_a_group_whose_leader_already_exited_is_no_error(tmp_path: Path) -> None:
    with child_process([sys.executable, "-c", "pass"], os.environ, tmp_path / "l") as proc:
        proc.wait(timeout=30)
    assert proc.returncode == 0
