"""The host LAPACK kernels called GIL-free through SciPy's cython entry points, and the batch spread over threads,
against SciPy's own wrappers and NumPy's float64 eigh (independent implementations)."""

import numpy as np
import pytest
from scipy.linalg import lapack

from catmerge_jax import hostlapack


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_native_sytrd_geqrf_syrk_equal_scipys_wrappers(dtype, tol):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 37)).astype(dtype)
    a = a + a.T
    ours = np.asfortranarray(a)
    d, e, tau, info = hostlapack._sytrd(ours)
    ref = (lapack.ssytrd if dtype == np.float32 else lapack.dsytrd)(a, lower=1)
    assert info == 0 and ref[-1] == 0
    for mine, theirs in zip((d, e, tau, np.tril(ours)), (ref[1], ref[2], ref[3], np.tril(ref[0]))):
        np.testing.assert_allclose(mine, theirs, rtol=tol, atol=tol * 10)

    z = rng.standard_normal((50, 12)).astype(dtype)
    packed = np.asfortranarray(z)
    taus, info = hostlapack._geqrf(packed)
    ref = (lapack.sgeqrf if dtype == np.float32 else lapack.dgeqrf)(z)
    assert info == 0
    np.testing.assert_allclose(packed, ref[0], rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(taus, ref[1], rtol=tol, atol=tol * 10)

    gram = np.zeros((12, 12), dtype, order="F")
    hostlapack._syrk_lower(-2.0, np.asfortranarray(z.T), gram)  # c += −2 zᵀz, lower triangle only
    expected = -2.0 * z.astype(np.float64).T @ z.astype(np.float64)
    np.testing.assert_allclose(gram, np.tril(expected), rtol=tol, atol=tol * 100)
    with pytest.raises(TypeError, match="float32 or float64"):
        hostlapack._prefix(np.dtype(np.int32))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_each_problem_equals_numpy_eigh_whatever_the_thread_count(threads):
    """Every problem lands in its own slot whether one thread or several take them (and with more threads than
    problems); the BLAS thread count is restored afterwards."""
    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(1)
    mats = rng.standard_normal((5, 2, 30, 30))
    mats = mats + np.swapaxes(mats, -1, -2)
    before = [lib["num_threads"] for lib in threadpool_info()]
    values, vectors, scale = hostlapack.each_problem(hostlapack.symmetric_largest, 3, 30, (5, 2), np.float64,
                                                     mats.reshape(10, 30, 30), threads=threads)
    assert [lib["num_threads"] for lib in threadpool_info()] == before
    for idx in np.ndindex(5, 2):
        w, v = np.linalg.eigh(mats[idx])
        np.testing.assert_allclose(values[idx], w[::-1][:3], rtol=1e-12, atol=1e-12)
        assert scale[idx] == pytest.approx(np.abs(w).max(), rel=1e-12)
        top = v[:, ::-1][:, :3]
        np.testing.assert_allclose(vectors[idx] @ vectors[idx].T, top @ top.T, atol=1e-10)


def test_a_worker_error_reaches_the_caller():
    def broken(m, k):
        raise RuntimeError("problem failed")

    with pytest.raises(RuntimeError, match="problem failed"):
        hostlapack.each_problem(broken, 1, 4, (3,), np.float64, np.zeros((3, 4, 4)), threads=2)


def test_lower_largest_reads_only_the_lower_triangle_and_nan_gives_nan():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((20, 20))
    a = a + a.T
    garbage_above = np.tril(a) + np.triu(np.full((20, 20), 1e6), 1)
    values, _, _ = hostlapack.lower_largest(np.asfortranarray(garbage_above), 2)
    np.testing.assert_allclose(values, np.linalg.eigvalsh(a)[::-1][:2], rtol=1e-12)
    a[3, 1] = np.nan
    values, vectors, scale = hostlapack.lower_largest(np.asfortranarray(a), 2)
    assert np.isnan(values).all() and np.isnan(vectors).all() and np.isnan(scale)


def test_concurrent_batches_leave_the_blas_thread_count_as_it_was():
    """Two callers at once (e.g. two merges in two threads): each result is right and the count is restored."""
    import threading

    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(3)
    mats = rng.standard_normal((2, 6, 25, 25))
    mats = mats + np.swapaxes(mats, -1, -2)
    before = [lib["num_threads"] for lib in threadpool_info()]
    results = [None, None]

    def solve(i):
        results[i] = hostlapack.each_problem(hostlapack.symmetric_largest, 2, 25, (6,), np.float64, mats[i],
                                             threads=2)

    workers = [threading.Thread(target=solve, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [lib["num_threads"] for lib in threadpool_info()] == before
    for i in range(2):
        for j in range(6):
            np.testing.assert_allclose(results[i][0][j], np.linalg.eigvalsh(mats[i, j])[::-1][:2], rtol=1e-12)
