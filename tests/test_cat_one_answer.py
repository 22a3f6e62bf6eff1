"""CAT gives one answer: the rows and Gram forms of the same data, the plain and fast paths, and a float64
reference agree, also when G_k has fewer than c positive eigenvalues; near-ties below float32 resolution are
warned about and resolved with precision="float64"."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import catmerge_jax as cm
from catmerge_jax.cat import POSITIVE_RTOL, UnresolvedGapWarning
from tests import reference as ref


def _reference_positive_merge(w0, T, X, *, lam, c, alpha, strict=False):
    """Float64: bases = top-c eigenvectors of G_k whose eigenvalue is positive (all c when strict)."""
    A = [x.T @ x for x in X]
    bases = []
    for k in range(len(T)):
        g = ref.conflict_matrix(T, A, lam, k)
        values, vectors = np.linalg.eigh(g)
        order = np.argsort(values)[::-1][:c]
        bound = sum(np.sum((X[k] @ T[i]) ** 2) + lam * np.sum((X[i] @ T[i]) ** 2) for i in range(len(T)) if i != k)
        keep = np.ones(c, bool) if strict else values[order] > POSITIVE_RTOL * bound
        bases.append(vectors[:, order][:, keep])
    return w0 + alpha * sum(ref.apply_linear_sequential(T, bases))


def _few_rows_problem(seed):
    """K = 2 tasks with one exemplar row each: G_k = T_iᵀ(x_kᵀx_k − λ x_iᵀx_i)T_i has rank 2, one positive and
    one negative eigenvalue, so with c = 3 two of the strict top-3 directions are arbitrary null directions."""
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(6, 8))
    T = [0.5 * rng.normal(size=(6, 8)) for _ in range(2)]
    X = [rng.normal(size=(1, 6)) for _ in range(2)]
    return w0, T, X


@pytest.mark.parametrize("fast", [False, True])
def test_rows_form_equals_gram_form_equals_float64_reference_with_few_positive_eigenvalues(x64, fast):
    w0, T, X = _few_rows_problem(0)
    params = {"d": {"kernel": w0}}
    fts = [{"d": {"kernel": w0 + t}} for t in T]
    expected = _reference_positive_merge(w0, T, X, lam=5.0, c=3, alpha=0.5)
    for form in ("rows", "gram"):
        stats = [{"d": {"kernel": cm.linear_stats(x, form=form)}} for x in X]
        got = cm.cat_merge(params, fts, stats, alpha=0.5, lam=5.0, c=3, fast=fast)["d"]["kernel"]
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-7, err_msg=form)


def test_strict_top_c_removes_all_c_directions_and_depends_on_the_null_space_choice(x64):
    w0, T, X = _few_rows_problem(1)
    params = {"d": {"kernel": w0}}
    fts = [{"d": {"kernel": w0 + t}} for t in T]
    merged = {}
    for form in ("rows", "gram"):
        stats = [{"d": {"kernel": cm.linear_stats(x, form=form)}} for x in X]
        merged[form] = np.asarray(cm.cat_merge(params, fts, stats, alpha=1.0, lam=5.0, c=3, strict_top_c=True,
                                               fast=False)["d"]["kernel"])
    # the strict rule trims a 3-dim subspace per task: the update lost more than the positive rule removes
    positive = _reference_positive_merge(w0, T, X, lam=5.0, c=3, alpha=1.0)
    for form, m in merged.items():
        assert np.linalg.norm(m - w0) < np.linalg.norm(positive - w0) - 1e-6, form
    # ...and which null directions it removes is the solver's choice: the two forms disagree
    assert np.max(np.abs(merged["rows"] - merged["gram"])) > 1e-3


def test_positive_directions_matches_the_eigenvalue_sign(x64):
    rng = np.random.default_rng(2)
    T = rng.normal(size=(3, 5, 7))
    X = rng.normal(size=(3, 2, 5))
    bases = np.stack(ref.linear_bases(list(T), [x.T @ x for x in X], 1.0, 4))
    kept = np.asarray(cm.positive_directions(T, X, bases, lam=1.0, form="rows"))
    kept_gram = np.asarray(cm.positive_directions(T, np.einsum("kna,knb->kab", X, X), bases, lam=1.0, form="gram"))
    np.testing.assert_allclose(kept, kept_gram, atol=1e-12)
    for k in range(3):
        g = ref.conflict_matrix(list(T), [x.T @ x for x in X], 1.0, k)
        values = np.einsum("oc,op,pc->c", bases[k], g, bases[k])
        for j in range(4):
            expected = bases[k][:, j] if values[j] > 1e-9 else np.zeros(7)
            np.testing.assert_allclose(kept[k][:, j], expected, atol=1e-12)


@pytest.mark.parametrize("form,strategy", [("rows", "explicit"), ("rows", "low_rank"), ("gram", "explicit")])
def test_the_grouped_solve_keeps_the_directions_positive_directions_keeps(x64, form, strategy):
    """The grouped path decides which directions to keep from the solver's eigenvalues and a bound read off the
    conflict terms (no second pass over the rows); the public positive_directions recomputes bᵀG_kb and
    Σ‖X_kT_i‖² + λ‖X_iT_i‖² from scratch. On a problem where some G_k have fewer positive eigenvalues than c, both
    zero the same columns of the same bases."""
    from catmerge_jax.conflict import linear_group_bases, plan_linear

    rng = np.random.default_rng(4)
    tvs = rng.normal(size=(2, 3, 6, 40))  # (layers, K, in, out)
    rows = rng.normal(size=(2, 3, 1, 6))  # 1 row per task: Σ_{i≠k} Y_kiᵀY_ki has rank ≤ 2, so ≤ 2 of c = 4 are > 0
    data = rows if form == "rows" else np.einsum("lkna,lknb->lkab", rows, rows)
    plan = plan_linear(3, 6, 40, 4, rows=1 if form == "rows" else None, strategy=strategy, solver="eigh")
    assert plan.strategy == strategy
    strict = np.asarray(linear_group_bases(jnp.asarray(tvs), jnp.asarray(data), lam=1.0, c=4, plan=plan,
                                           strict_top_c=True))
    kept = np.asarray(linear_group_bases(jnp.asarray(tvs), jnp.asarray(data), lam=1.0, c=4, plan=plan))
    zeroed = 0
    for layer in range(2):
        want = np.asarray(cm.positive_directions(tvs[layer], data[layer], strict[layer], lam=1.0, form=form))
        np.testing.assert_allclose(kept[layer], want, atol=1e-12)
        zeroed += int(np.sum(np.all(want == 0, axis=1)))
    assert 0 < zeroed < 2 * 3 * 4  # the case has both kinds of columns


def test_the_positive_bound_from_rows_and_from_gram_traces_equals_its_definition(x64):
    """``Σ_{i≠k} ‖X_kT_i‖² + λ‖X_iT_i‖²``: from the rows (positive_bound of Y = X_k T_i) and from the traces of the
    two conflict terms built from Grams, against a NumPy loop over the definition."""
    from catmerge_jax import conflict

    rng = np.random.default_rng(5)
    T, X, lam = rng.normal(size=(3, 6, 9)), rng.normal(size=(3, 4, 6)), 2.5
    want = [sum(np.sum((X[k] @ T[i]) ** 2) + lam * np.sum((X[i] @ T[i]) ** 2) for i in range(3) if i != k)
            for k in range(3)]
    g_rows, from_rows = conflict._rows_conflict_and_bound(jnp.asarray(T), jnp.asarray(X), lam)
    g_gram, from_gram = conflict._grams_conflict_and_bound(jnp.asarray(T), jnp.asarray(np.einsum("kna,knb->kab", X, X)),
                                                          lam)
    np.testing.assert_allclose(np.asarray(from_rows), want, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(from_gram), want, rtol=1e-12)
    for k in range(3):  # and the matrices beside them are G_k
        expected = ref.conflict_matrix(list(T), [x.T @ x for x in X], lam, k)
        np.testing.assert_allclose(np.asarray(g_rows[k]), expected, atol=1e-10)
        np.testing.assert_allclose(np.asarray(g_gram[k]), expected, atol=1e-10)


def _near_tie_problem():
    """G_0 = T_1ᵀ T_1 (λ = 0, X_0 = I) with eigenvalues 9, (2 + 1e-9)², 4, 1 in a random basis: the gap at c = 2 is
    4e-9, far below float32's resolution of ~3e-5·‖G‖ but clear in float64."""
    rng = np.random.default_rng(3)
    q1, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    q2, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    t1 = q1 @ np.diag([3.0, 2.0 + 1e-9, 2.0, 1.0]) @ q2.T
    t0 = 0.1 * rng.normal(size=(4, 4))
    x = [np.eye(4), np.eye(4)]
    return [t0, t1], x


def test_an_unresolvable_gap_is_warned_about_and_float64_precision_resolves_it():
    T, X = _near_tie_problem()
    w0 = np.zeros((4, 4), np.float32)
    params = {"layer": {"kernel": w0}}
    fts = [{"layer": {"kernel": (w0 + t).astype(np.float32)}} for t in T]
    stats = [{"layer": {"kernel": cm.linear_stats(x.astype(np.float32), form="gram")}} for x in X]
    for fast in (False, True):
        with pytest.warns(UnresolvedGapWarning, match="layer/kernel"):
            cm.cat_merge(params, fts, stats, alpha=1.0, lam=0.0, c=2, fast=fast)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnresolvedGapWarning)
        exact = cm.cat_merge(params, fts, stats, alpha=1.0, lam=0.0, c=2, precision="float64")
    T32 = [np.asarray(f["layer"]["kernel"], np.float64) for f in fts]  # the float32-rounded task vectors
    expected = _reference_positive_merge(np.zeros((4, 4)), T32, X, lam=0.0, c=2, alpha=1.0)
    np.testing.assert_allclose(np.asarray(exact["layer"]["kernel"]), expected, atol=2e-6)
    with pytest.raises(cm.HyperparameterError, match="concrete"):
        jax.jit(lambda f: cm.cat_merge(params, f, stats, c=2, precision="float64"))(fts)


def test_open_clip_and_hf_layouts_of_the_same_clip_weights_merge_to_the_same_weights():
    """open_clip fuses q|k|v into one in_proj and keeps a bare proj; HF has separate q/k/v leaves and a
    visual_projection Dense. The model's own roles (fused blocks trimmed independently, proj linear) and capture
    of the bare projection make the two layouts give the same CAT merge."""
    from catmerge_jax.models.clip_vit import (ClipVisionConfig, ClipVisionModel, hf_to_open_clip_params,
                                              open_clip_to_hf_params)

    cfg = ClipVisionConfig(image_size=16, patch_size=8, width=16, layers=2, heads=2, mlp_dim=32, output_dim=8)
    hf, oc = ClipVisionModel(cfg, layout="hf"), ClipVisionModel(cfg, layout="open_clip")
    images = [np.asarray(jax.random.normal(jax.random.key(20 + k), (2, 16, 16, 3))) for k in range(3)]
    base = hf.init(jax.random.key(0), images[0])["params"]
    tasks = [jax.tree.map(lambda w, k=k: w + 0.05 * jax.random.normal(jax.random.key(k), w.shape), base)
             for k in range(3)]
    merged = {}
    for layout, model, convert in (("hf", hf, lambda p: p), ("open_clip", oc, hf_to_open_clip_params)):
        b, ts = convert(base), [convert(t) for t in tasks]
        stats = [cm.capture_stats(model, t, x) for t, x in zip(ts, images)]
        out = cm.cat_merge(b, ts, stats, alpha=0.5, lam=5.0, c=3, roles=model.param_roles())
        merged[layout] = out if layout == "hf" else open_clip_to_hf_params(out)
    assert cm.role_table(hf_to_open_clip_params(base), ClipVisionModel(cfg, layout="open_clip").param_roles()) \
        .count(" linear ") == cm.role_table(base).count(" linear ") - 2 * 2  # q,k,v → one fused leaf per layer
    for (path, a), b in zip(cm.leaves_with_paths(merged["hf"]), jax.tree.leaves(merged["open_clip"])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(a)), 1e-12), path
    # not trivially equal: CAT changed the q projection and the visual projection relative to task arithmetic
    ta = cm.task_arithmetic(base, tasks, alpha=0.5)
    for path in ("vision_model/encoder/layers/0/self_attn/q_proj/kernel", "visual_projection/kernel"):
        node_m, node_t = merged["hf"], ta
        for key in path.split("/"):
            node_m, node_t = node_m[key], node_t[key]
        assert np.max(np.abs(np.asarray(node_m) - np.asarray(node_t))) > 1e-4, path
