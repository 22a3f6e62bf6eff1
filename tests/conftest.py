"""Shared test fixtures: float64 mode, strict numerics, and a recompilation counter."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CLI turns on JAX's persistent compilation cache for its whole process; tests call cli.main in-process, so a
# worker would otherwise keep writing every later test's programs into the user's cache folder. Tests of the cache
# itself set this variable explicitly (tests/test_startup.py).
os.environ.setdefault("CATMERGE_COMPILATION_CACHE", "0")
# The CLI turns JAX's persistent compilation cache on in the user's cache folder; tests must not write there
# (tests/test_startup.py turns it on explicitly, in temporary folders).
os.environ.setdefault("CATMERGE_COMPILATION_CACHE", "0")
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

# Hypothesis draws fresh examples on every run unless derandomized, so a property test could fail on one CI run and
# pass on the next. Derandomized, every run tries the same examples (seeded by each test's name) and stores none;
# HYPOTHESIS_PROFILE=explore draws fresh ones, for looking for new counterexamples by hand.
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass
else:
    _hypothesis_settings.register_profile("ci", derandomize=True, database=None)
    _hypothesis_settings.register_profile("explore", derandomize=False)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


@pytest.fixture(params=["platform", "accelerator"])
def solver_paths(request):
    """Runs the test twice: with the solvers' branches for this platform (CPU: host LAPACK, ``lax.map``), and with the
    GPU/TPU branches forced on it (:func:`catmerge_jax.linalg.accelerator_paths`; docs/accelerators.md). A test
    restricts it with ``@pytest.mark.parametrize("solver_paths", [...], indirect=True)``."""
    from catmerge_jax.linalg import accelerator_paths

    with accelerator_paths(request.param == "accelerator"):
        yield request.param


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
