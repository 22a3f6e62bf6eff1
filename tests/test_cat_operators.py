"""The per-layer CAT operators against the float64 NumPy reference, optimality, invariants, recompilation.

Tolerances: rtol 1e-5 in float64 mode (differences are eigen-solver round-off); 1e-3 in float32, where a
projector built from eigenvectors of an ``out × out`` matrix loses about ``cond · eps32 ≈ 1e-4`` relative accuracy
on these sizes, so 1e-3 leaves a 10× margin without hiding real errors (a wrong eigenvector is off by O(1)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import catmerge_jax as cm
from tests import reference as ref

SHAPES = [(2, 5, 4, 7), (3, 8, 6, 3), (4, 6, 9, 12), (5, 10, 10, 4)]  # (K, in, out, n)


def _problem(seed, K, d_in, d_out, n):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(K, d_in, d_out))
    X = rng.normal(size=(K, n, d_in)) * rng.uniform(0.5, 2.0, size=(K, 1, d_in))
    A = np.einsum("kna,knb->kab", X, X)
    return T, X, A


def _projectors(B):
    return np.einsum("koc,kpc->kop", B, B)


@pytest.mark.parametrize("K,d_in,d_out,n", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 1.0, 5.0])
def test_linear_bases_match_reference_float64(x64, K, d_in, d_out, n, lam):
    T, X, A = _problem(K * 100 + d_out, K, d_in, d_out, n)
    c = min(3, d_out)
    B = np.asarray(cm.cat_linear_bases(jnp.asarray(T), jnp.asarray(A), lam=lam, c=c))
    assert B.shape == (K, d_out, c) and B.dtype == np.float64
    np.testing.assert_allclose(np.einsum("koc,kod->kcd", B, B), np.broadcast_to(np.eye(c), (K, c, c)), atol=1e-10)
    expected = np.stack(ref.linear_bases(list(T), list(A), lam, c))
    np.testing.assert_allclose(_projectors(B), _projectors(expected), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("K,d_in,d_out,n", SHAPES + [(3, 6, 40, 3), (4, 9, 64, 2), (2, 30, 25, 4)])
def test_linear_bases_from_rows_equal_gram_path(x64, K, d_in, d_out, n):
    """Includes sizes where the exact low-rank path (2(K-1)n + c < out) is taken."""
    T, X, A = _problem(7 + K, K, d_in, d_out, n)
    X_padded = X.copy()
    X_padded[0, n // 2:] = 0.0  # task 0 has fewer rows: zero padding must not change anything
    A_padded = np.einsum("kna,knb->kab", X_padded, X_padded)
    by_rows = cm.cat_linear_bases_from_rows(jnp.asarray(T), jnp.asarray(X_padded), lam=2.0, c=2)
    by_gram = cm.cat_linear_bases(jnp.asarray(T), jnp.asarray(A_padded), lam=2.0, c=2)
    np.testing.assert_allclose(_projectors(np.asarray(by_rows)), _projectors(np.asarray(by_gram)), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("lam", [0.0, 5.0, 1e4])
def test_low_rank_path_when_fewer_positive_eigenvalues_than_c(x64, lam):
    """With λ huge, G_k has fewer than c positive eigenvalues: the top c then include the eigenvalue 0, and the
    objective tr(BᵀG_kB) must still equal the sum of the c largest eigenvalues of G_k."""
    T, X, A = _problem(17, 3, 5, 30, 2)
    B = np.asarray(cm.cat_linear_bases_from_rows(jnp.asarray(T), jnp.asarray(X), lam=lam, c=3))
    np.testing.assert_allclose(np.einsum("koc,kod->kcd", B, B), np.broadcast_to(np.eye(3), (3, 3, 3)), atol=1e-10)
    for k in range(3):
        G = ref.conflict_matrix(list(T), list(A), lam, k)
        best = np.sort(np.linalg.eigvalsh(G))[::-1][:3].sum()
        scale = np.abs(np.linalg.eigvalsh(G)).max()
        assert np.trace(B[k].T @ G @ B[k]) == pytest.approx(best, abs=1e-9 * scale)


def test_linear_bases_float32_tolerance():
    T, X, A = _problem(3, 4, 12, 10, 20)
    B = np.asarray(cm.cat_linear_bases(jnp.asarray(T, jnp.float32), jnp.asarray(A, jnp.float32), lam=5.0, c=3))
    assert B.dtype == np.float32
    expected = np.stack(ref.linear_bases(list(T), list(A), 5.0, 3))
    np.testing.assert_allclose(_projectors(B), _projectors(expected), rtol=1e-3, atol=1e-3)


def test_linear_basis_maximizes_objective_11(x64):
    rng = np.random.default_rng(0)
    T, X, A = _problem(11, 3, 6, 5, 4)
    lam, c = 2.0, 2
    B = np.asarray(cm.cat_linear_bases(jnp.asarray(T), jnp.asarray(A), lam=lam, c=c))
    for k in range(3):
        best = ref.linear_objective(list(X), list(T), B[k], lam, k)
        for _ in range(300):
            Q, _ = np.linalg.qr(rng.normal(size=(5, c)))
            assert ref.linear_objective(list(X), list(T), Q, lam, k) <= best + 1e-9


@pytest.mark.parametrize("lam", [0.0, 0.7, 5.0])
def test_scale_masks_match_reference_and_are_optimal(x64, lam):
    rng = np.random.default_rng(int(lam * 10))
    K, d, n, c = 3, 8, 5, 3
    T = rng.normal(size=(K, d))
    Xhat = rng.normal(size=(K, n, d)) * rng.uniform(0.2, 2.0, size=(K, 1, d))
    S = np.sum(Xhat ** 2, axis=1)
    masks = np.asarray(cm.cat_scale_masks(jnp.asarray(T), jnp.asarray(S), lam=lam, c=c))
    np.testing.assert_array_equal(masks, ref.scale_masks(list(T), list(S), lam, c))
    assert masks.dtype == bool and np.all(masks.sum(1) == c)
    for k in range(K):
        ours = ref.scale_objective(list(Xhat), list(T), masks[k].astype(float), lam, k)
        best = max(ref.scale_objective(list(Xhat), list(T), m, lam, k) for m in ref.all_masks(d, c))
        assert ours == pytest.approx(best, rel=1e-10)


def test_shift_masks_balanced_rule_and_count_rule(x64):
    rng = np.random.default_rng(5)
    K, d, c = 4, 9, 2
    T = rng.normal(size=(K, d))
    balanced = np.asarray(cm.cat_shift_masks(jnp.asarray(T), c=c))
    np.testing.assert_array_equal(balanced, ref.shift_masks(list(T), c))
    counts = np.array([3.0, 10.0, 5.0, 7.0])
    weighted = np.asarray(cm.cat_shift_masks(jnp.asarray(T), c=c, counts=jnp.asarray(counts), lam=0.5))
    np.testing.assert_array_equal(weighted, ref.shift_masks(list(T), c, counts, 0.5))
    for k in range(K):
        # the balanced rule maximizes Σ_{i≠k} ‖T_i∘m‖² (eq. 17 with n_k = n_i and λ < 1); the count rule maximizes eq. 17
        ours = ref.shift_objective(list(T), balanced[k].astype(float), k, np.ones(K), 0.0)
        assert ours == pytest.approx(max(ref.shift_objective(list(T), m, k, np.ones(K), 0.0)
                                         for m in ref.all_masks(d, c)), rel=1e-12)
        ours = ref.shift_objective(list(T), weighted[k].astype(float), k, counts, 0.5)
        assert ours == pytest.approx(max(ref.shift_objective(list(T), m, k, counts, 0.5)
                                         for m in ref.all_masks(d, c)), rel=1e-12)


@pytest.mark.parametrize("K,d_in,d_out,n", SHAPES)
def test_apply_linear_matches_algorithm_1(x64, K, d_in, d_out, n):
    T, X, A = _problem(K, K, d_in, d_out, n)
    c = min(2, d_out)
    B = np.asarray(cm.cat_linear_bases(jnp.asarray(T), jnp.asarray(A), lam=5.0, c=c))
    seq = np.asarray(cm.apply_cat_linear(jnp.asarray(T), jnp.asarray(B)))
    np.testing.assert_allclose(seq, np.stack(ref.apply_linear_sequential(list(T), list(B))), rtol=1e-5, atol=1e-10)
    joint = np.asarray(cm.apply_cat_linear_joint(jnp.asarray(T), jnp.asarray(B)))
    np.testing.assert_allclose(joint, np.stack(ref.apply_linear_joint(list(T), list(B))), rtol=1e-5, atol=1e-10)


def test_apply_masks_matches_reference(x64):
    rng = np.random.default_rng(2)
    T = rng.normal(size=(4, 7))
    masks = rng.random((4, 7)) < 0.3
    np.testing.assert_array_equal(np.asarray(cm.apply_cat_masks(jnp.asarray(T), jnp.asarray(masks))),
                                  np.stack(ref.apply_masks(list(T), list(masks.astype(float)))))


def test_vmapped_operators_equal_per_task_loop(x64):
    """One batched call equals K separate single-task computations written with plain jnp."""
    T, X, A = _problem(21, 4, 7, 6, 9)
    Tj, Aj = jnp.asarray(T), jnp.asarray(A)
    batched = np.asarray(cm.cat_linear_bases(Tj, Aj, lam=3.0, c=2))
    for k in range(4):
        G = sum(Tj[i].T @ (Aj[k] - 3.0 * Aj[i]) @ Tj[i] for i in range(4) if i != k)
        w, v = jnp.linalg.eigh(G)
        single = np.asarray(v[:, ::-1][:, :2])
        np.testing.assert_allclose(batched[k] @ batched[k].T, single @ single.T, rtol=1e-6, atol=1e-9)


def test_operators_do_not_recompile_across_calls():
    T, X, A = _problem(1, 3, 5, 4, 6)
    args = jnp.asarray(T, jnp.float32), jnp.asarray(A, jnp.float32)
    cm.cat_linear_bases(*args, lam=1.0, c=2).block_until_ready()
    before = cm.cat_linear_bases._cache_size()
    for lam in (2.0, 3.5, 5.0):  # new values, same shapes: no new compilation
        cm.cat_linear_bases(args[0] * lam, args[1], lam=lam, c=2).block_until_ready()
    assert cm.cat_linear_bases._cache_size() == before
    B = cm.cat_linear_bases(*args, lam=1.0, c=2)
    cm.apply_cat_linear(args[0], B)
    n_apply = cm.apply_cat_linear._cache_size()
    cm.apply_cat_linear(args[0] + 1.0, B)
    assert cm.apply_cat_linear._cache_size() == n_apply


def test_operators_run_under_strict_numerics(strict_numerics):
    T, X, A = _problem(4, 3, 6, 5, 7)
    Tj, Aj = jnp.asarray(T, jnp.float32), jnp.asarray(A, jnp.float32)
    B = cm.cat_linear_bases(Tj, Aj, lam=5.0, c=2)
    assert cm.apply_cat_linear(Tj, B).dtype == jnp.float32
    assert cm.apply_cat_linear_joint(Tj, B).dtype == jnp.float32
    S = jnp.abs(Tj[:, 0, :])
    masks = cm.cat_scale_masks(Tj[:, 0, :], S, lam=5.0, c=2)
    assert cm.apply_cat_masks(Tj[:, 0, :], masks).dtype == jnp.float32
    assert cm.cat_shift_masks(Tj[:, 0, :], c=2).shape == (3, 5)


@settings(max_examples=25, deadline=None)
@given(K=st.integers(2, 5), d_in=st.integers(2, 7), d_out=st.integers(2, 7), c=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_projection_removes_exactly_the_last_basis(K, d_in, d_out, c, seed):
    c = min(c, d_out)
    with jax.enable_x64(True):
        T, X, A = _problem(seed, K, d_in, d_out, 4)
        B = cm.cat_linear_bases(jnp.asarray(T), jnp.asarray(A), lam=5.0, c=c)
        seq = np.asarray(cm.apply_cat_linear(jnp.asarray(T), B))
        joint = np.asarray(cm.apply_cat_linear_joint(jnp.asarray(T), B))
        B = np.asarray(B)
    scale = max(1.0, np.abs(T).max())
    for i in range(K):
        last = K - 1 if i != K - 1 else K - 2
        np.testing.assert_allclose(seq[i] @ B[last], 0.0, atol=1e-9 * scale)
        for k in range(K):
            if k != i:
                np.testing.assert_allclose(joint[i] @ B[k], 0.0, atol=1e-9 * scale)
        # what is removed lies in the span of the other tasks' bases: the joint edit is an orthogonal projection
        removed = T[i] - joint[i]
        np.testing.assert_allclose(np.sum(removed * joint[i]), 0.0, atol=1e-8 * scale ** 2 * d_in * d_out)


@settings(max_examples=20, deadline=None)
@given(K=st.integers(2, 4), seed=st.integers(0, 2**31 - 1), perm_seed=st.integers(0, 1000))
def test_joint_mode_is_permutation_equivariant(K, seed, perm_seed):
    with jax.enable_x64(True):
        T, X, A = _problem(seed, K, 5, 6, 3)
        perm = np.random.default_rng(perm_seed).permutation(K)
        B = cm.cat_linear_bases(jnp.asarray(T), jnp.asarray(A), lam=2.0, c=2)
        out = np.asarray(cm.apply_cat_linear_joint(jnp.asarray(T), B))
        Bp = cm.cat_linear_bases(jnp.asarray(T[perm]), jnp.asarray(A[perm]), lam=2.0, c=2)
        out_p = np.asarray(cm.apply_cat_linear_joint(jnp.asarray(T[perm]), Bp))
        S = np.abs(T[:, 0, :]) + 0.1
        masks = cm.cat_scale_masks(jnp.asarray(T[:, 0, :]), jnp.asarray(S), lam=1.0, c=2)
        masks_p = cm.cat_scale_masks(jnp.asarray(T[perm, 0, :]), jnp.asarray(S[perm]), lam=1.0, c=2)
    np.testing.assert_allclose(out_p, out[perm], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(masks_p), np.asarray(masks)[perm])


@settings(max_examples=30, deadline=None)
@given(K=st.integers(1, 6), d_in=st.integers(1, 6), d_out=st.integers(1, 9), c=st.integers(0, 3),
       seed=st.integers(0, 2**31 - 1))
def test_factored_sequential_projection_equals_the_loop(K, d_in, d_out, c, seed):
    # apply_cat_linear applies Π_{k≠i} (I − B_k B_kᵀ) in k order as one factored I − U M Uᵀ; the bases of different
    # tasks overlap (no orthogonality between tasks), so any ordering mistake would show.
    c = min(c, d_out)
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(K, d_in, d_out))
    B = np.stack([np.linalg.qr(rng.normal(size=(d_out, d_out)))[0][:, :c] for _ in range(K)])
    with jax.enable_x64(True):
        got = np.asarray(cm.apply_cat_linear(jnp.asarray(T), jnp.asarray(B)))
    np.testing.assert_allclose(got, np.stack(ref.apply_linear_sequential(list(T), list(B))), rtol=1e-10, atol=1e-10)
