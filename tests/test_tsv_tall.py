"""TSV's tall-factor route (QR to the n × n triangle, left vectors by a matmul) against float64 NumPy SVDs.

Raw singular vectors are not unique, so the checks are invariants: singular values, the projector ``V Vᵀ`` and
the reconstruction ``(a V) Vᵀ = a``, and TSV's merged matrix, which is unique when the singular values are
distinct (both polar factors are then unique).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catmerge_jax.methods import tsv


def tsv_reference(tvs: np.ndarray) -> np.ndarray:
    """TSV-M from the definition, float64 NumPy: full SVDs, top ⌊r/K⌋ triplets per task, Procrustes on both sides."""
    k_tasks, m, n = tvs.shape
    keep = min(m, n) // k_tasks
    us, ss, vs = [], [], []
    for t in tvs:
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        us.append(u[:, :keep]), ss.append(s[:keep]), vs.append(vt[:keep].T)
    u, s, v = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)

    def polar(a):
        p, _, qt = np.linalg.svd(a, full_matrices=False)
        return p @ qt

    return polar(u) @ np.diag(s) @ polar(v).T


def tasks(rng, k, m, n):
    # distinct column scales: well separated singular values, so the merged matrix is well determined
    return rng.standard_normal((k, m, n)) * np.linspace(1.0, 3.0, n)


@pytest.mark.parametrize("k,m,n", [(3, 120, 12), (2, 12, 120), (4, 50, 9), (3, 16, 16)])
def test_tsv_layer_matches_float64_definition(x64, k, m, n):
    # tall (QR route), wide (transposed to tall), barely tall (4·9 ≤ 50) and square (direct SVDs)
    t = tasks(np.random.default_rng(k * m + n), k, m, n)
    got = np.asarray(jax.jit(tsv.tsv_layer)(jnp.asarray(t)))
    want = tsv_reference(t)
    assert np.linalg.norm(got - want) <= 1e-11 * np.linalg.norm(want)


def test_tsv_layer_float32_is_float32_accurate():
    # float32 SVDs differ from float64 by ~eps32 × (‖T‖ / singular-value gap) ≈ 1e-6 here (the old gesdd route
    # measured 3.0e-6 on these matrices, the QR route 2.9e-6); 3e-5 leaves room without hiding a wrong formula
    t = tasks(np.random.default_rng(0), 3, 200, 16)
    got = np.asarray(tsv.tsv_layer(jnp.asarray(t, jnp.float32)), np.float64)
    want = tsv_reference(t)
    assert np.linalg.norm(got - want) <= 3e-5 * np.linalg.norm(want)


def test_right_factors_invariants(x64):
    a = tasks(np.random.default_rng(1), 1, 90, 10)[0]
    s, v = (np.asarray(x) for x in tsv._right_factors(jnp.asarray(a)))
    np.testing.assert_allclose(s, np.linalg.svd(a, compute_uv=False), rtol=1e-12)
    np.testing.assert_allclose(v.T @ v, np.eye(10), atol=1e-12)
    np.testing.assert_allclose((a @ v) @ v.T, a, atol=1e-12 * np.abs(a).max())
    # the columns are the right singular vectors: a v_i has norm σ_i
    np.testing.assert_allclose(np.linalg.norm(a @ v, axis=0), s, rtol=1e-12)


def test_rank_deficient_single_task_is_the_task_matrix(x64):
    # K = 1 keeps every triplet: TSV is task arithmetic, also when σ = 0 (those columns get 1/σ := 0) and for zeros
    rng = np.random.default_rng(2)
    t = rng.standard_normal((1, 80, 2)) @ rng.standard_normal((1, 2, 10))     # rank 2
    np.testing.assert_allclose(np.asarray(tsv.tsv_layer(jnp.asarray(t))), t[0], atol=1e-12 * np.abs(t).max())
    assert not np.asarray(tsv.tsv_layer(jnp.zeros((3, 80, 10)))).any()
