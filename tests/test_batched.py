"""cat_merge_batched equals cat.cat_merge (both projection modes, all solver/strategy paths)."""

import jax
import numpy as np
import pytest

import catmerge_jax as cm
from catmerge_jax.batched import cat_merge_batched, plan_linear

K = 3


def _problem(rows=10, seed=0):
    rng = np.random.default_rng(seed)

    def tree(scale):
        t = {f"l{i}": {"kernel": rng.standard_normal((24, 80)), "bias": rng.standard_normal(80)} for i in range(2)}
        t["down"] = {"kernel": rng.standard_normal((80, 24))}
        t["ln"] = {"scale": rng.standard_normal(24), "bias": rng.standard_normal(24)}
        t["emb"] = rng.standard_normal((5, 24))
        return jax.tree.map(lambda x: (x * scale).astype(np.float32), t)

    w0 = tree(1.0)
    fts = [jax.tree.map(lambda a, b: a + b, w0, tree(0.1)) for _ in range(K)]

    def stats():
        x = lambda d: rng.standard_normal((rows, d))  # noqa: E731
        return cm.stats_from_arrays(w0, {"l0/kernel": cm.linear_stats(x(24)), "l1/kernel": cm.linear_stats(x(24)),
                                         "l0/bias": cm.count_stats(rows), "l1/bias": cm.count_stats(rows),
                                         "down/kernel": cm.linear_stats(x(80)), "ln/scale": cm.scale_stats(x(24)),
                                         "ln/bias": cm.count_stats(rows)})

    return w0, fts, [stats() for _ in range(K)]


def _max_rel(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max() / (np.abs(np.asarray(y)).max() + 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("joint", [False, True])
def test_eigh_path_equals_cat_merge(joint):
    w0, fts, st = _problem()
    ref = cm.cat_merge(w0, fts, st, alpha=0.4, lam=2.0, c=2, joint=joint)
    out = cat_merge_batched(w0, fts, st, alpha=0.4, lam=2.0, c=2, joint=joint, solver="eigh", max_group_bytes=1)
    assert jax.tree.structure(out) == jax.tree.structure(ref)
    assert _max_rel(out, ref) < 1e-6


def test_iterative_paths_equal_cat_merge_and_gram_form():
    w0, fts, st = _problem()
    ref = cm.cat_merge(w0, fts, st, alpha=0.4, lam=2.0, c=2)
    timings = {}
    out = cat_merge_batched(w0, fts, st, alpha=0.4, lam=2.0, c=2, solver="iterative", strategy="matrix_free",
                            timings=timings)
    assert _max_rel(out, ref) < 1e-4
    assert timings["solves"] == 3 * K and 0 <= timings["fallbacks"] <= timings["solves"]
    assert set(timings) >= {"bases", "apply", "prepare"}
    # Grams instead of rows (more rows than input dims): the explicit Gram path.
    w0, fts, st = _problem(rows=100, seed=1)
    ref = cm.cat_merge(w0, fts, st, c=2)
    assert _max_rel(cat_merge_batched(w0, fts, st, c=2, solver="eigh"), ref) < 1e-5


def test_plan_prefers_cheap_forms():
    # ViT-B/32 MLP-up with 3 × 50 exemplar tokens: building G_k from X_k T_i rows beats the thin matrix-free products
    assert plan_linear(8, 768, 3072, 3, rows=150)[:3] == ("rows", "explicit", "iterative")
    # very wide layers with many rows: never form the 16384² G_k
    assert plan_linear(8, 1024, 16384, 3, rows=1200).strategy == "matrix_free"
    # few rows: the exact small eigenproblem in range(Zᵀ)
    assert plan_linear(8, 1024, 16384, 3, rows=50).strategy == "low_rank"
    assert plan_linear(8, 768, 3072, 3, rows=None).form == "gram"
    assert plan_linear(8, 64, 64, 3, rows=16).solver == "eigh"
    assert plan_linear(8, 4096, 1024, 3, rows=150, solver="eigh").solver == "eigh"
    with pytest.raises(ValueError):
        plan_linear(8, 64, 64, 3, rows=None, strategy="matrix_free")


def test_bad_inputs_raise_naming_the_leaf():
    w0, fts, st = _problem()
    with pytest.raises(cm.HyperparameterError, match="l0/kernel|down/kernel|c="):
        cat_merge_batched(w0, fts, st, c=500)
    with pytest.raises(cm.HyperparameterError):
        cat_merge_batched(w0, fts, st, lam=-1.0)


def test_low_rank_strategy_is_exact():
    """rows=10, K=3, c=2: 2(K-1)·10 + 2 = 42 < 80, so the 24→80 layers can take the exact low-rank path."""
    w0, fts, st = _problem()
    assert plan_linear(K, 24, 80, 2, rows=10, strategy="low_rank").strategy == "low_rank"
    ref = cm.cat_merge(w0, fts, st, alpha=0.4, lam=2.0, c=2)
    out = cat_merge_batched(w0, fts, st, alpha=0.4, lam=2.0, c=2, strategy="auto")
    assert _max_rel(out, ref) < 1e-5
    assert _max_rel(cm.cat_merge(w0, fts, st, alpha=0.4, lam=2.0, c=2, fast=True), ref) < 1e-5
