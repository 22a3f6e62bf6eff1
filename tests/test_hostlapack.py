"""The host LAPACK kernels called GIL-free through SciPy's cython entry points, and the batch spread over threads,
against float64 NumPy written from the definitions (factorization invariants, eigh)."""

import numpy as np
import pytest
from catmerge_jax import hostlapack


def _reflectors_product(packed, taus, below):
    """``Q = H(0) H(1) … H(r−1)`` in float64 from LAPACK's packed Householder vectors: ``H(i) = I − τ_i v_i v_iᵀ`` with
    ``v_i`` zero above row ``i + below``, 1 there, and ``packed[i + below + 1:, i]`` under it (``below`` = 1 for
    ``sytrd``'s lower form, 0 for ``geqrf``). Formed here, independently of LAPACK's ``orgtr``/``orgqr``."""
    rows = packed.shape[0]
    q = np.eye(rows)
    for i, tau in enumerate(np.asarray(taus, np.float64)):
        v = np.zeros(rows)
        v[i + below] = 1.0
        v[i + below + 1:] = packed[i + below + 1:, i]
        q -= tau * np.outer(q @ v, v)  # q ← q H(i)
    return q


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_native_sytrd_geqrf_syrk_give_valid_factorizations(dtype):
    """The raw outputs of ``sytrd``/``geqrf`` (d, e, τ, reflectors) are not unique: blocked and unblocked code, BLAS
    kernels and threads round differently (float32 entries differed by 5.7e-4 on another CPU). What every correct
    result satisfies is checked instead, against float64 NumPy: the reflectors are orthonormal, they reconstruct
    the input, and T has the input's eigenvalues.

    Tolerances (u = eps/2): a Householder reduction by r ≤ n reflectors is backward stable,
    ``Q (T or R) = A + ΔA`` with ``‖ΔA‖_F ≤ r·γ̃_{cn}‖A‖_F ≈ c·n²·u‖A‖_F`` (Higham, Accuracy and Stability, 2nd ed.,
    Lemma 19.3, Thm 19.4); each float32 reflector is orthogonal to ``|τ‖v‖² − 2| ≲ c·n·u``, so ``‖QᵀQ − I‖_F ≲ c·n²·u``;
    Weyl moves each eigenvalue by at most ``‖ΔA‖₂ ≤ ‖ΔA‖_F``. With c = 2, ``n²·eps`` (n the larger dimension)
    bounds all three: 1.6e-4 relative for n = 37 in float32, while a wrong reflector or layout is off by O(1)."""
    eps = np.finfo(dtype).eps
    rng = np.random.default_rng(0)
    n = 37
    a = rng.standard_normal((n, n)).astype(dtype)
    a = a + a.T
    packed = np.asfortranarray(a)
    d, e, tau, info = hostlapack._sytrd(packed)
    assert info == 0 and d.shape == (n,) and e.shape == tau.shape == (n - 1,)
    a64, bound = a.astype(np.float64), n * n * eps
    q = _reflectors_product(packed, tau, below=1)
    t = np.diag(d.astype(np.float64)) + np.diag(e.astype(np.float64), 1) + np.diag(e.astype(np.float64), -1)
    assert np.linalg.norm(q.T @ q - np.eye(n)) <= bound
    assert np.linalg.norm(q @ t @ q.T - a64) <= bound * np.linalg.norm(a64)
    np.testing.assert_allclose(np.linalg.eigvalsh(t), np.linalg.eigvalsh(a64), rtol=0,
                               atol=bound * np.linalg.norm(a64))

    rows, cols = 50, 12
    z = rng.standard_normal((rows, cols)).astype(dtype)
    packed = np.asfortranarray(z)
    taus, info = hostlapack._geqrf(packed)
    assert info == 0 and taus.shape == (cols,)
    q = _reflectors_product(packed, taus, below=0)[:, :cols]
    r = np.triu(packed[:cols].astype(np.float64))
    bound = rows * rows * eps
    assert np.linalg.norm(q.T @ q - np.eye(cols)) <= bound
    assert np.linalg.norm(q @ r - z.astype(np.float64)) <= bound * np.linalg.norm(z.astype(np.float64))

    gram = np.zeros((cols, cols), dtype, order="F")
    hostlapack._syrk_lower(-2.0, np.asfortranarray(z.T), gram)  # c += −2 zᵀz, lower triangle only
    z64 = z.astype(np.float64)
    # any order of summing `rows` products (blocked, FMA, threads): |error| ≤ γ_rows·(|z|ᵀ|z|) entrywise (Higham §3.1,
    # γ_m = m·u / (1 − m·u)); scaling by −2 is exact
    gamma = rows * (eps / 2) / (1 - rows * eps / 2)
    error = np.abs(np.tril(gram) - np.tril(-2.0 * z64.T @ z64))
    assert np.all(error <= 2.0 * gamma * np.abs(z64).T @ np.abs(z64))
    assert not np.triu(gram, 1).any()  # the upper triangle is never written
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
