"""Shared test fixtures: float64 mode, strict numerics, and a recompilation counter."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# XLA:CPU's multi-threaded Eigen pool can wedge (all threads parked, the caller waiting forever on a result) on
# small machines; it hung this suite on 2 cores (PyAutoFit#1528 measured the same and this flag as the cure).
# Set before jax is imported; subprocesses started by tests inherit it.
if "--xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax
import pytest


@contextlib.contextmanager
def _config(name: str, value):
    old = getattr(jax.config, name)
    jax.config.update(name, value)
    try:
        yield
    finally:
        jax.config.update(name, old)


@pytest.fixture
def x64():
    """Run the test with float64 enabled (tight tolerances against the NumPy reference)."""
    with _config("jax_enable_x64", True):
        yield


@pytest.fixture
def strict_numerics():
    """Like equinox's test setup: no implicit dtype or rank promotion, so silent upcasts/broadcasts fail loudly."""
    with _config("jax_numpy_dtype_promotion", "strict"), _config("jax_numpy_rank_promotion", "raise"):
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still part of the default run)")
