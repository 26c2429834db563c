"""Shared pytest setup.

Fixtures live in plugin modules owned by the area that provides them:
- `tests/fixtures_triton.py`: the real CPU tritonserver (`triton_server`, `start_triton`)
- `tests/fixtures_packages.py`: the demo avatar package and model repository (`demo_package`)
- `tests/fixtures_gateway.py`: a running gateway against that Triton (`gateway_server`)
- `tests/fixtures_live.py`: live-session fakes (clock, renderer) and the ONNX Runtime audio encoder
"""
pytest_plugins = [
    "tests.fixtures_packages",
    "tests.fixtures_triton",
    "tests.fixtures_gateway",
    "tests.fixtures_live",
]

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """Tests that run `lipsync.cli.main` in-process call `setup_logging`, which replaces the
    root handlers with a console handler; put pytest's own handlers back afterwards so later
    tests' logs stay captured."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
