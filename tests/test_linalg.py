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
