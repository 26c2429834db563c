"""Shared pytest setup.

Fixtures live in plugin modules owned by the area that provides them:
- `tests/fixtures_triton.py`: the real CPU tritonserver (`triton_server`, `start_triton`)
- `tests/fixtures_packages.py`: the demo avatar package and model repository (`demo_package`)
- `tests/fixtures_gateway.py`: a running gateway against that Triton (`gateway_server`)
- `tests/fixtures_live.py`: live-session fakes (clock, renderer) and the ONNX Runtime audio encoder

The fast tier is ``python -m pytest -m "not slow"``: every test that needs a real
``tritonserver``, the demo build, an ONNX export, the PyTorch UNet or Chromium is marked
``slow`` here, from the fixtures it uses (`SLOW_FIXTURES`), its ``triton`` / ``browser`` marker
or its module (`SLOW_MODULES`); fuzz and memory tests of tens of seconds carry the marker
themselves. The gateway's logic is
covered there through the in-process fake Triton (`tests/fake_triton.py`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.fixtures_packages",
    "tests.fixtures_triton",
    "tests.fixtures_gateway",
    "tests.fixtures_live",
]

SLOW_FIXTURES = frozenset({
    "triton_server", "start_triton", "demo_package", "gateway_server", "start_gateway", "served_gateway",
    "untrained_onnx", "untrained_model_repo",
})
"""Fixtures that start a real tritonserver, build the demo avatar or export ONNX models."""
SLOW_MARKERS = frozenset({"triton", "browser"})
SLOW_MODULES = frozenset({"test_onnx_export.py", "test_models.py", "test_checkpoint.py", "test_builder.py"})
"""Modules that run the full-size PyTorch UNet (forward passes, ONNX export) or the face
detector on real video: seconds to tens of seconds per test on a 2-core machine."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that uses a `SLOW_FIXTURES` fixture, carries a `SLOW_MARKERS`
    marker or lives in a `SLOW_MODULES` module."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if (
            fixtures & SLOW_FIXTURES
            or any(item.get_closest_marker(name) for name in SLOW_MARKERS)
            or item.path.name in SLOW_MODULES
        ):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Tests that run `lipsync.cli.main` in-process call `setup_logging`, which replaces the
    root handlers with a console handler; put pytest's own handlers back afterwards so later
    tests' logs stay captured."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
