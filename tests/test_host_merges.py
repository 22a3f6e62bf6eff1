"""The NumPy host paths of TIES and TSV (concrete float32 inputs on the CPU, what ``catmerge merge`` runs).

* TSV's host layer replaces every float32 SVD by the float64 ``eigh`` of a Gram: checked against float64 NumPy SVDs
  from the definition, and required to be at least as accurate as the float32 SVD route it replaces.
* TIES's host path must give bit for bit what the compiled programs give (they are what the PyTorch job matches):
  checked against the XLA path (``accelerator_paths``, which turns the host paths off) and against a plain NumPy
  transcription of the definition.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import catmerge_jax as cm
from catmerge_jax.linalg import accelerator_paths
from catmerge_jax.methods import layerwise, tsv

sys.path.insert(0, str(Path(__file__).parent))
from test_tsv_tall import tasks, tsv_reference  # noqa: E402  (the float64 definition of TSV-M)


def _relative(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


# ------------------------------------------------------------------------------------------------------------------
# TSV


@pytest.mark.parametrize("k,m,n,spread", [(3, 200, 16, 1.0), (2, 12, 120, 1.0), (4, 50, 9, 1.0), (3, 40, 40, 1.0),
                                          (3, 60, 24, 1e-3)])
def test_tsv_host_layer_is_at_least_as_accurate_as_the_float32_svd(k, m, n, spread):
    # tall, wide, barely tall, square; the last with column scales over three decades (σ_min/σ_max ≈ 1e-3, where a
    # Gram loses most): the float64 Gram keeps the error at the float32 rounding of the inputs (~1e-7), the float32
    # SVD route has ~eps32·‖T‖/gap (1e-6 to 1e-5 here)
    rng = np.random.default_rng(k * m + n)
    t = rng.standard_normal((k, m, n)) * np.geomspace(1.0, spread, n) if spread != 1.0 else tasks(rng, k, m, n)
    t32 = t.astype(np.float32)
    want = tsv_reference(t32.astype(np.float64))                 # the float32 inputs, exactly, in float64
    host = _relative(tsv.tsv_layer_host(t32), want)
    xla = _relative(tsv.tsv_layer(jnp.asarray(t32)), want)
    assert host <= 1e-6 and host <= xla, (host, xla)


def test_tsv_host_layer_ill_conditioned_polar():
    # three tasks that share most of their top subspace: the concatenated V has cond ≈ 3·10⁴ (MiniLM's layer 5
    # attention output has such a V). The polar factor must keep every direction, as the SVD's P Qᵀ does: a
    # float32-style rank cut-off there drops one and errs by percents; the float32 SVD route errs by eps32·cond
    rng = np.random.default_rng(11)
    t = (rng.standard_normal((48, 48))[None] + 0.01 * rng.standard_normal((3, 48, 48))).astype(np.float32)
    want = tsv_reference(t.astype(np.float64))
    host, xla = _relative(tsv.tsv_layer_host(t), want), _relative(tsv.tsv_layer(jnp.asarray(t)), want)
    assert host <= 1e-6 and host <= xla, (host, xla)


def test_tsv_host_layer_chunked_gram(monkeypatch):
    # a tall factor's Gram is summed over row blocks (the embedding table): same result as one block
    t = tasks(np.random.default_rng(5), 3, 300, 12).astype(np.float32)
    whole = tsv.tsv_layer_host(t)
    monkeypatch.setattr(tsv, "GRAM_ROWS", 64)
    np.testing.assert_allclose(tsv.tsv_layer_host(t), whole, rtol=0, atol=1e-6 * np.abs(whole).max())
    assert _relative(whole, tsv_reference(t.astype(np.float64))) <= 1e-6


def test_tsv_host_layer_rank_deficient_and_zero():
    # K = 1 keeps every triplet (task arithmetic) also when σ = 0; a zero layer merges to zero
    rng = np.random.default_rng(2)
    t = (rng.standard_normal((1, 80, 2)) @ rng.standard_normal((1, 2, 10))).astype(np.float32)   # rank 2
    np.testing.assert_allclose(tsv.tsv_layer_host(t), t[0], atol=1e-5 * np.abs(t).max())
    assert not tsv.tsv_layer_host(np.zeros((3, 80, 10), np.float32)).any()
    assert not tsv.tsv_layer_host(np.ones((3, 2, 10), np.float32)).any()      # ⌊2/3⌋ = 0 triplets kept


def _tree(rng, scale=1.0, dtype=np.float32):
    return {"dense": {"kernel": (scale * rng.standard_normal((24, 16))).astype(dtype),
                      "bias": (scale * rng.standard_normal(16)).astype(dtype)},
            "embed": {"embedding": (scale * rng.standard_normal((40, 8))).astype(dtype)},
            "LayerNorm_0": {"scale": (scale * rng.standard_normal(16)).astype(dtype)}}


def test_tsv_merge_host_path_matches_the_xla_path():
    rng = np.random.default_rng(3)
    base = _tree(rng)
    fts = [jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), base) for _ in range(3)]
    got = cm.tsv_merge(base, fts, alpha=0.7)
    with accelerator_paths():                                     # the compiled route, host paths off
        want = cm.tsv_merge(base, fts, alpha=0.7)
    for g, w, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(base)):
        assert isinstance(g, np.ndarray) and g.dtype == b.dtype and g.shape == b.shape
        # both within float32 SVD error (~1e-5 of the update) of the same merge; the update is 0.1·‖W0‖
        np.testing.assert_allclose(g, np.asarray(w), rtol=0, atol=3e-5 * np.abs(np.asarray(w)).max())
    # JAX arrays in, JAX arrays out
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(cm.tsv_merge(jax.tree.map(jnp.asarray, base), fts)))


# ------------------------------------------------------------------------------------------------------------------
# TIES


def ties_reference(base: list, fts: list[list], k: float, alpha: float, per_tensor: bool) -> list[np.ndarray]:
    """TIES from the definition in float32 NumPy (the PyTorch job's formulas): trim by the ⌈kN⌉-th largest |T|,
    elect the sign of Σ T̃, average the agreeing entries."""
    tvs = [[np.asarray(w, np.float32) - np.asarray(b, np.float32) for w, b in zip(ft, base)] for ft in fts]

    def threshold(leaves):
        flat = np.sort(np.concatenate([np.abs(x).ravel() for x in leaves]))
        n_keep = int(np.ceil(k * flat.size))
        return np.float32(np.inf) if n_keep == 0 else flat[flat.size - n_keep]

    trimmed = []
    for task in tvs:
        cuts = [threshold([x]) for x in task] if per_tensor else [threshold(task)] * len(task)
        trimmed.append([np.where(np.abs(x) >= c, x, np.float32(0)) for x, c in zip(task, cuts)])
    out = []
    for j, b in enumerate(base):
        t = np.stack([tr[j] for tr in trimmed])
        total = t[0].copy()
        for x in t[1:]:
            total = total + x
        sign = np.sign(total)
        agree = (np.sign(t) == sign) & (t != 0)
        summed = np.zeros_like(total)
        for i in range(len(t)):
            summed = summed + np.where(agree[i], t[i], np.float32(0))
        count = agree.sum(0)
        tau = np.where(count > 0, summed / np.maximum(count, 1).astype(np.float32), np.float32(0))
        out.append((np.asarray(b, np.float32) + np.float32(alpha) * tau).astype(np.asarray(b).dtype))
    return out


@pytest.mark.parametrize("k,per_tensor,num", [(0.2, False, 3), (0.5, True, 4), (0.0, False, 2), (1.0, True, 3)])
def test_ties_host_path_is_bit_identical(k, per_tensor, num, monkeypatch):
    from catmerge_jax.methods import basic

    monkeypatch.setattr(basic, "CHUNK", 100)       # several pieces per leaf, spread over the worker threads
    rng = np.random.default_rng(7)
    base = _tree(rng)
    # repeated magnitudes (entries equal to the threshold are kept), exact zeros and −0.0 in the task vectors
    fts = [jax.tree.map(lambda x: x + np.round(rng.standard_normal(x.shape), 1).astype(x.dtype), base)
           for _ in range(num)]
    fts[0]["dense"]["bias"] = base["dense"]["bias"].copy()
    got = cm.ties_merge(base, fts, k=k, alpha=0.8, per_tensor=per_tensor)
    with accelerator_paths():
        want = cm.ties_merge(base, fts, k=k, alpha=0.8, per_tensor=per_tensor)
    ref = ties_reference(jax.tree.leaves(base), [jax.tree.leaves(f) for f in fts], k, 0.8, per_tensor)
    for g, w, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), ref):
        assert isinstance(g, np.ndarray)
        assert np.array_equal(g.view(np.uint32), np.asarray(w).view(np.uint32))
        assert np.array_equal(g.view(np.uint32), r.view(np.uint32))
    trimmed = cm.ties_trim(base, fts, k=k, per_tensor=per_tensor)
    with accelerator_paths():
        trimmed_xla = cm.ties_trim(base, fts, k=k, per_tensor=per_tensor)
    for g, w in zip(jax.tree.leaves(trimmed), jax.tree.leaves(trimmed_xla)):
        assert np.array_equal(np.asarray(g).view(np.uint32), np.asarray(w).view(np.uint32))


def test_ties_host_path_keeps_input_kinds():
    rng = np.random.default_rng(8)
    base = _tree(rng, dtype=jnp.bfloat16)                      # bf16 leaves compute in float32, stay bf16
    fts = [jax.tree.map(lambda x: (x.astype(np.float32) + rng.standard_normal(x.shape)).astype(x.dtype), base)
           for _ in range(2)]
    got = cm.ties_merge(base, fts)
    with accelerator_paths():
        want = cm.ties_merge(base, fts)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == jnp.bfloat16 and np.array_equal(np.asarray(g), np.asarray(w))
    as_jax = cm.ties_merge(jax.tree.map(jnp.asarray, base), fts)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(as_jax))


def test_each_layer_keeps_order_and_raises():
    problems = [np.full((n, 2), float(n)) for n in (1, 5, 3, 2)]
    assert [float(x) for x in layerwise.each_layer(np.sum, problems, threads=2)] == [2.0, 50.0, 18.0, 8.0]

    def fail(p):
        raise ValueError("bad layer")

    with pytest.raises(ValueError, match="bad layer"):
        layerwise.each_layer(fail, problems, threads=2)
