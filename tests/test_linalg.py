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


def test_eigh_matches_numpy_projector(solver_paths):
    m = _healthy()
    b = np.asarray(top_eigenvectors(jnp.asarray(m, jnp.float32), C, "eigh"), np.float64)
    np.testing.assert_allclose(b @ b.T, _projector_f64(m, C), atol=1e-5)
    assert top_eigenvectors(jnp.eye(4), 0).shape == (4, 0)


def test_iterative_matches_eigh_projector_batched_and_matrix_free(solver_paths):
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


# the platform's branches only: the vmapped Krylov solve and the traced eigh fallback run under both settings in
# test_iterative_matches_eigh_projector_batched_and_matrix_free and tests/test_batched.py (3.6 s of CPU saved)
@pytest.mark.parametrize("solver_paths", ["platform"], indirect=True)
def test_degenerate_gap_is_flagged_and_falls_back_to_eigh(solver_paths):
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
def test_eigh_largest_float64_equals_numpy(x64, solver_paths, n, k):
    from catmerge_jax.linalg import eigh_largest

    rng = np.random.default_rng(n)
    m = _matrix(np.concatenate([[9.0, 6.0, 4.0, 3.5][:min(k, n)], rng.uniform(-40.0, 1.0, max(n - k, 0))])[:n], n)
    values, vectors, scale = jax.jit(lambda a: eigh_largest(a, k))(jnp.asarray(m))
    assert values.dtype == jnp.float64 and vectors.shape == (n, k)
    _check_largest(m, values, vectors, scale, k, value_tol=1e-12, subspace_tol=1e-10)


def test_eigh_largest_float32_batched_vmapped_and_split_tridiagonal(solver_paths):
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
    for j in range(3):  # vmap's batch (another program: compared with the truth, not bit for bit with the jit's)
        _check_largest(ms[j], mapped[0][j], mapped[1][j], mapped[2][j], k, value_tol=1e-5, subspace_tol=1e-4)
    # the top-2 subspace of the repeated eigenvalue 5, not two particular vectors
    p = np.asarray(vectors[1][:, :2], np.float64)
    w, v = np.linalg.eigh(repeated)
    np.testing.assert_allclose(p @ p.T, v[:, -2:] @ v[:, -2:].T, atol=1e-5)


def test_eigh_largest_runs_lapacks_selected_route_on_cpu_and_differentiates_like_eigh(monkeypatch):
    import catmerge_jax.linalg as linalg

    calls = []
    real = linalg.hostlapack.symmetric_largest
    monkeypatch.setattr(linalg.hostlapack, "symmetric_largest", lambda m, k: calls.append(m.shape) or real(m, k))
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


def test_host_solvers_keep_float64_inside_an_enable_x64_context_and_a_loop():
    """``with jax.enable_x64(True)`` is thread-local, and XLA:CPU may run a host callback on a worker thread, where
    JAX would read float64 operands as float32 (and refuse float64 results; seen in the K = 1 merge test of
    test_cat_merge, depending on the program). host_call moves them as uint32 bit patterns: this checks that the
    round trip gives float64 answers to float64 accuracy (eigenvalues 1e-11 apart), also inside lax.map."""
    from catmerge_jax import linalg

    rng = np.random.default_rng(7)
    mats = np.stack([_matrix(np.concatenate([[3.0, 2.0, 2.0 - 1e-11], rng.uniform(-9.0, 1.0, 9)]), s)
                     for s in range(4)])
    z, w = _factored_problem((4,), 5, 12, positive=4, seed=3)
    with jax.enable_x64(True):
        values, _, _ = jax.jit(lambda a: jax.lax.map(lambda m: linalg.eigh_largest(m, 3), a))(jnp.asarray(mats))
        f_values, _, _ = jax.jit(lambda a, b: jax.lax.map(lambda x: linalg.factored_largest(x[0], x[1], 2), (a, b)))(
            jnp.asarray(z), jnp.asarray(w))
    assert values.dtype == f_values.dtype == jnp.float64
    for j in range(4):
        theta = np.linalg.eigvalsh(mats[j])[::-1]
        np.testing.assert_allclose(np.asarray(values[j]), theta[:3], atol=1e-12)  # 1e-11 apart: float64 only
        np.testing.assert_allclose(np.asarray(f_values[j]), np.linalg.eigvalsh((z[j].T * w[j]) @ z[j])[::-1][:2],
                                   rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# factored_largest: top eigenpairs of Zᵀ diag(w) Z from the QR of Zᵀ, against the dense float64 matrix.
# ----------------------------------------------------------------------------------------------------------------


def _factored_problem(lead, m, n, positive, seed):
    """Full-row-rank Z (…, m, n) and weights with `positive` positive entries: by Sylvester's law of inertia G has
    exactly that many positive eigenvalues, so its top ones are in range(Zᵀ) (the rest of the space holds 0)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(lead + (m, n)) * np.geomspace(1.0, 1e-2, m)[:, None]  # graded rows, as CAT's Y blocks
    w = -rng.uniform(1.0, 5.0, lead + (m,))
    w[..., :positive] = rng.uniform(0.5, 2.0, lead + (positive,))
    return z, w


@pytest.mark.parametrize("m,n,zeros", [(9, 40, 0), (40, 12, 3), (12, 12, 0)],
                         ids=["fewer-rows:QR", "more-rows:syrk", "square:syrk"])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
def test_factored_largest_equals_the_dense_eigenpairs(x64, solver_paths, dtype, tol, m, n, zeros):
    """Values to ``tol·‖G‖`` and each vector an eigenvector of the dense float64 G (float32: the QR or rank-updates
    and the tridiagonal route carry ~1e-6 relative rounding, amplified by the graded rows' 1e2 spread and the
    gaps). With ``m ≥ n`` the host builds G by one syrk per sign and skips the rows of weight 0."""
    from catmerge_jax.linalg import factored_largest

    k = 4
    z, w = _factored_problem((2, 3), m, n, positive=6, seed=0)
    w[..., m - zeros:] = 0.0
    values, vectors, scale = jax.jit(lambda a, b: factored_largest(a, b, k))(jnp.asarray(z, dtype),
                                                                         jnp.asarray(w, dtype))
    assert values.dtype == dtype and vectors.shape == (2, 3, n, k) and scale.shape == (2, 3)
    for idx in np.ndindex(2, 3):
        g = (z[idx].T * w[idx]) @ z[idx]
        theta, basis = np.linalg.eigh(g)
        norm = np.abs(theta).max()
        np.testing.assert_allclose(np.asarray(values[idx], np.float64), theta[::-1][:k], atol=tol * norm)
        assert float(scale[idx]) == pytest.approx(norm, rel=tol)
        b = np.asarray(vectors[idx], np.float64)
        np.testing.assert_allclose(b.T @ b, np.eye(k), atol=tol)
        top = basis[:, ::-1][:, :k]
        np.testing.assert_allclose(b @ b.T, top @ top.T, atol=tol * 10)  # the same top-k subspace


def test_factored_largest_sees_the_null_space_only_through_rows_of_weight_zero(solver_paths):
    """With fewer positive weights than k the top-k of G include its eigenvalue 0, which lives outside range(Zᵀ)
    unless rows of weight 0 span some of it (what CAT's low-rank path adds); the values then match the dense G."""
    from catmerge_jax.linalg import factored_largest

    z, w = _factored_problem((), 5, 12, positive=1, seed=1)
    extra = np.random.default_rng(2).standard_normal((3, 12))
    values = np.asarray(factored_largest(jnp.asarray(np.vstack([z, extra]), jnp.float32),
                                         jnp.asarray(np.concatenate([w, np.zeros(3)]), jnp.float32), 3)[0])
    theta = np.linalg.eigvalsh((z.T * w) @ z)[::-1]
    np.testing.assert_allclose(values, theta[:3], atol=1e-5 * np.abs(theta).max())
    assert theta[0] > 0 and abs(theta[1]) < 1e-9  # one positive eigenvalue, then the null space's zeros
    with pytest.raises(ValueError, match="k must be in"):
        factored_largest(jnp.ones((2, 4)), jnp.ones((2,)), 3)
    with pytest.raises(ValueError, match="k must be in"):
        factored_largest(jnp.ones((6, 4)), jnp.ones((6,)), 5)
    with pytest.raises(ValueError, match="weights must have shape"):
        factored_largest(jnp.ones((6, 4)), jnp.ones((4,)), 1)
