"""Shared test fixtures: float64 mode, strict numerics, and a recompilation counter."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Single-threaded Eigen (XLA:CPU's matmuls): two xdist workers already fill the 2 CI cores, and it is the cure
# PyAutoFit#1528 found for a similar pool wedge. Alone it did not stop ours (below). Set before jax starts its
# backend; subprocesses started by tests inherit it.
if "--xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

# XLA:CPU's older (non-MLIR) fusion emitters compile a tiny model's programs much faster: a compile-bound script of
# BERT-tiny forward/grad, three CAT merges and small eager ops took 18 s instead of 27–30 s.
if "--xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

# The tests run tiny models, where XLA's compile time dwarfs run time: compiling with most optimizations off took
# 25% off three of the slowest tests (197 s → 149 s in one process, same results). Subprocesses inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

import jax
import pytest

# The hang behind those 0%-CPU stalls, seen with gdb: both of XLA:CPU's 2 pool threads inside jaxlib's LAPACK
# ParallelBatchMap (batched QR/eigh), each waiting for sub-tasks that need a free pool thread. Two such calls run at
# once when computations overlap; running each computation inline on the calling thread (tests and their
# subprocesses) made it rarer in a reproducer but did not end it (see tests/test_bench_outputs.py's _run_script).
os.environ.setdefault("JAX_CPU_ENABLE_ASYNC_DISPATCH", "false")
jax.config.update("jax_cpu_enable_async_dispatch", False)


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
    config.addinivalue_line("markers", "xla_optimized: compile with XLA's optimizations on (run time dominates)")


@pytest.fixture(autouse=True)
def _xla_optimizations(request):
    """Tests marked ``xla_optimized`` compile with XLA's optimizations (the suite's default turns most off):
    the full `catmerge example` test (five MiniLM fine-tunings) took 166 s unoptimized and 103 s with this marker
    alone on 2 cores, while the compile-bound tests on tiny models ran 20–30% slower optimized (measured on seven
    of them)."""
    if request.node.get_closest_marker("xla_optimized") is None:
        yield
        return
    # a flag, not a config state: jax.config has no attribute to read it back by
    from jax._src import compiler

    old = compiler._DISABLE_MOST_OPTIMIZATIONS.value
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)
