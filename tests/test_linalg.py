"""Top-c eigenvectors: eigh path, block Krylov path (explicit and matrix-free), convergence flag, fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catmerge_jax.linalg import (MIN_ITERATIVE_N, KrylovConfig, block_krylov_top, choose_solver, eigh_top,
                                 krylov_config, top_eigenvectors)

N, C = 96, 3
CFG = KrylovConfig(block=8, steps=5, restarts=4)  # basis of 48 < N: a real Krylov solve, not a full one


def _matrix(eigenvalues, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigenvalues),) * 2))
    return (q * np.asarray(eigenvalues)) @ q.T


def _healthy(seed=0):
    # Indefinite, large negative part (as CAT's G_k with λ > 0), top three well separated from the rest.
    rest = np.random.default_rng(seed + 1).uniform(-40.0, 1.0, N - C)
    return _matrix(np.concatenate([[9.0, 6.0, 4.0], rest]), seed)


def _projector_f64(m, c):
    w, v = np.linalg.eigh(m)
    return v[:, -c:] @ v[:, -c:].T


def test_eigh_matches_numpy_projector():
    m = _healthy()
    b = np.asarray(top_eigenvectors(jnp.asarray(m, jnp.float32), C, "eigh"), np.float64)
    np.testing.assert_allclose(b @ b.T, _projector_f64(m, C), atol=1e-5)
    assert top_eigenvectors(jnp.eye(4), 0).shape == (4, 0)


def test_iterative_matches_eigh_projector_batched_and_matrix_free():
    ms = np.stack([_healthy(s) for s in range(3)])
    b = np.asarray(top_eigenvectors(jnp.asarray(ms, jnp.float32), C, "iterative", config=CFG), np.float64)
    for m, bk in zip(ms, b):
        np.testing.assert_allclose(bk.T @ bk, np.eye(C), atol=1e-5)
        np.testing.assert_allclose(bk @ bk.T, _projector_f64(m, C), atol=1e-4)
    a = jnp.asarray(ms[0], jnp.float32)
    res = jax.jit(lambda a: block_krylov_top(lambda v: a @ v, C, n=N, config=CFG))(a)
    assert bool(res.converged)
    np.testing.assert_allclose(np.asarray(res.values), [9.0, 6.0, 4.0], rtol=1e-4)
    v = np.asarray(res.vectors, np.float64)
    np.testing.assert_allclose(v @ v.T, _projector_f64(ms[0], C), atol=1e-4)


def test_degenerate_gap_is_flagged_and_falls_back_to_eigh():
    # λ_3 = λ_4: the top-3 subspace is ill-defined, so the solver must refuse and defer to eigh.
    rest = np.random.default_rng(5).uniform(-40.0, 1.0, N - 4)
    m = jnp.asarray(_matrix(np.concatenate([[9.0, 6.0, 4.0, 4.0], rest]), 3), jnp.float32)
    res = jax.jit(lambda a: block_krylov_top(a, C, config=CFG))(m)
    assert not bool(res.converged)
    np.testing.assert_array_equal(np.asarray(top_eigenvectors(m[None], C, "iterative", config=CFG))[0],
                                  np.asarray(eigh_top(m, C)))


def test_near_tie_resolvable_in_float32_is_accepted_as_accurately_as_eigh():
    # CAT-like: a large negative part makes ‖G‖ ≈ 400 while λ_3 − λ_4 = 0.02 (5e-5 of ‖G‖). The gap is small
    # relative to the norm but resolvable in float32, so the converged Krylov subspace is accepted; it must be
    # as close to the float64 truth as float32 eigh's own subspace (both ≈ eps·‖G‖/gap from it).
    rest = np.random.default_rng(7).uniform(-400.0, 1.0, N - 4)
    m64 = _matrix(np.concatenate([[9.0, 6.0, 4.02, 4.0], rest]), 11)
    m = jnp.asarray(m64, jnp.float32)
    res = jax.jit(lambda a: block_krylov_top(a, C, config=CFG))(m)
    assert bool(res.converged)
    assert float(res.gap / res.scale) < 1e-3  # the old fixed threshold would have refused it
    truth = _projector_f64(m64, C)
    v = np.asarray(res.vectors, np.float64)
    e = np.asarray(eigh_top(m, C), np.float64)
    err_eigh = np.abs(e @ e.T - truth).max()
    assert np.abs(v @ v.T - truth).max() <= 10 * err_eigh + 1e-5
    # A user-set min_gap restores eigh's tie-breaking for such matrices.
    strict = jax.jit(lambda a: block_krylov_top(a, C, config=CFG._replace(min_gap=1e-3)))(m)
    assert not bool(strict.converged)


def test_solver_choice_and_errors():
    assert choose_solver(128, 3) == "eigh"
    assert choose_solver(4096, 3) == "iterative"
    assert choose_solver(MIN_ITERATIVE_N - 1, 3) == "eigh"
    cfg = krylov_config(3, 4096)
    assert cfg.block > 3 and cfg.block * (cfg.steps + 1) < 4096
    with pytest.raises(ValueError, match="method"):
        top_eigenvectors(jnp.eye(3), 1, "lanczos")
    with pytest.raises(ValueError, match="c must be"):
        top_eigenvectors(jnp.eye(3), 4)
    with pytest.raises(ValueError, match="n="):
        block_krylov_top(lambda v: v, 1)


# ----------------------------------------------------------------------------------------------------------------
# eigh_largest: the exact top-k eigenpairs (LAPACK's selected-eigenpair route on CPU) against float64 NumPy.
# ----------------------------------------------------------------------------------------------------------------


def _check_largest(m64, values, vectors, scale, k, *, value_tol, subspace_tol):
    w, v = np.linalg.eigh(m64)
    norm = np.abs(w).max()
    np.testing.assert_allclose(np.asarray(values, np.float64), w[::-1][:k], atol=value_tol * norm)
    assert float(scale) == pytest.approx(norm, rel=value_tol)
    b = np.asarray(vectors, np.float64)
    np.testing.assert_allclose(b.T @ b, np.eye(k), atol=subspace_tol)  # orthonormal
    # each vector is an eigenvector of its value: ‖G b − θ b‖ at rounding level
    np.testing.assert_allclose(m64 @ b - b * np.asarray(values, np.float64), 0.0, atol=subspace_tol * norm)


@pytest.mark.parametrize("n,k", [(1, 1), (2, 2), (7, 3), (96, 4), (300, 4)])
def test_eigh_largest_float64_equals_numpy(x64, n, k):
    from catmerge_jax.linalg import eigh_largest

    rng = np.random.default_rng(n)
    m = _matrix(np.concatenate([[9.0, 6.0, 4.0, 3.5][:min(k, n)], rng.uniform(-40.0, 1.0, max(n - k, 0))])[:n], n)
    values, vectors, scale = jax.jit(lambda a: eigh_largest(a, k))(jnp.asarray(m))
    assert values.dtype == jnp.float64 and vectors.shape == (n, k)
    _check_largest(m, values, vectors, scale, k, value_tol=1e-12, subspace_tol=1e-10)


def test_eigh_largest_float32_batched_vmapped_and_split_tridiagonal():
    from catmerge_jax.linalg import eigh_largest

    # A block-diagonal matrix reduces to a tridiagonal matrix that splits into blocks, where LAPACK's bisection
    # orders eigenvalues by block, not globally (the wrapper sorts); plus a repeated top eigenvalue.
    blocks = np.zeros((40, 40))
    blocks[:20, :20] = _matrix(np.linspace(-5.0, 2.0, 20), 1)
    blocks[20:, 20:] = _matrix(np.concatenate([[7.0, 3.0], np.linspace(-9.0, 1.0, 18)]), 2)
    repeated = _matrix(np.concatenate([[5.0, 5.0, 1.0], np.linspace(-30.0, 0.5, 37)]), 3)
    ms = np.stack([blocks, repeated, np.diag(np.linspace(-3.0, 4.0, 40))])
    k = 3
    # float32: eigenpair residuals ~ n·eps·‖G‖ (here ≈ 40 × 1.2e-7 × 30); tolerance 1e-4 relative
    values, vectors, scale = jax.jit(lambda a: eigh_largest(a, k))(jnp.asarray(ms, jnp.float32))
    for j in range(3):
        _check_largest(ms[j], values[j], vectors[j], scale[j], k, value_tol=1e-5, subspace_tol=1e-4)
    np.testing.assert_allclose(values[0], [7.0, 3.0, 2.0], rtol=1e-5)
    mapped = jax.vmap(lambda a: eigh_largest(a, k))(jnp.asarray(ms, jnp.float32))
    np.testing.assert_array_equal(np.asarray(mapped[0]), np.asarray(values))
    # the top-2 subspace of the repeated eigenvalue 5, not two particular vectors
    p = np.asarray(vectors[1][:, :2], np.float64)
    w, v = np.linalg.eigh(repeated)
    np.testing.assert_allclose(p @ p.T, v[:, -2:] @ v[:, -2:].T, atol=1e-5)


def test_eigh_largest_runs_lapacks_selected_route_on_cpu_and_differentiates_like_eigh(monkeypatch):
    import catmerge_jax.linalg as linalg

    calls = []
    real = linalg._tridiagonal_largest
    monkeypatch.setattr(linalg, "_tridiagonal_largest", lambda m, k: calls.append(m.shape) or real(m, k))
    m = jnp.asarray(_healthy(), jnp.float32)
    values, _, _ = linalg.eigh_largest(m, 2)
    assert calls == [(N, N)]  # the host route ran, once, for this one matrix
    # Derivative of the sum of the top-2 eigenvalues is v1 v1ᵀ + v2 v2ᵀ (symmetric input)
    grad = jax.grad(lambda a: linalg.eigh_largest(a, 2)[0].sum())(m)
    w, v = np.linalg.eigh(np.asarray(m, np.float64))
    np.testing.assert_allclose(np.asarray(grad), v[:, -2:] @ v[:, -2:].T, atol=1e-5)
    # NaN in, NaN out (as a traced eigh): the merge's own checks name the leaf
    bad = m.at[0, 0].set(jnp.nan)
    assert np.isnan(np.asarray(linalg.eigh_largest(bad, 2)[1])).all()
    with pytest.raises(ValueError, match="k must be in"):
        linalg.eigh_largest(m, 0)
