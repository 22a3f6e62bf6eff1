"""cat_merge over whole pytrees: the paper's pipeline against the float64 reference, special cases, variants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import catmerge_jax as cm
from tests import reference as ref
from tests import tree_reference as tr


def make_problem(seed=0, K=3, dtype=np.float64, n=6):
    """A small model tree with every role: Dense, Conv (4-D kernel), LayerNorm, embedding, and its stats."""
    rng = np.random.default_rng(seed)
    w0 = {
        "embed": {"embedding": rng.normal(size=(11, 4))},
        "conv": {"kernel": rng.normal(size=(2, 2, 3, 5)), "bias": rng.normal(size=5)},
        "block": {"dense": {"kernel": rng.normal(size=(5, 7)), "bias": rng.normal(size=7)},
                  "norm": {"scale": rng.normal(size=7), "bias": rng.normal(size=7)}},
        "head": {"kernel": rng.normal(size=(7, 6)), "bias": rng.normal(size=6)},
    }
    w0 = jax.tree.map(lambda x: np.asarray(x, dtype), w0)
    finetuned = [jax.tree.map(lambda x: (x + 0.3 * rng.normal(size=x.shape)).astype(dtype), w0) for _ in range(K)]
    stats, raw = [], []
    for k in range(K):
        patches = rng.normal(size=(n, 12))  # conv input rows: unfolded 2x2x3 patches
        dense_in = rng.normal(size=(n + 2, 5))
        normed = rng.normal(size=(n + 2, 7))
        head_in = rng.normal(size=(2 + k, 7))  # fewer rows than inputs: stored as rows
        raw.append({"conv": patches, "dense": dense_in, "norm": normed, "head": head_in})
        stats.append(cm.stats_from_arrays(w0, {
            "conv/kernel": cm.linear_stats(patches), "conv/bias": cm.count_stats(n),
            "block/dense/kernel": cm.linear_stats(dense_in), "block/dense/bias": cm.count_stats(n + 2),
            "block/norm/scale": cm.scale_stats(normed), "block/norm/bias": cm.count_stats(n + 2),
            "head/kernel": cm.linear_stats(head_in), "head/bias": cm.count_stats(2 + k),
        }))
    return w0, finetuned, stats, raw


def reference_merge(w0, finetuned, raw, *, alpha, lam, c, joint=False, strict=False):
    K = len(finetuned)
    tv = lambda path: [np.asarray(ft_get(ft, path), np.float64) - np.asarray(ft_get(w0, path), np.float64)
                       for ft in finetuned]
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), w0)

    def linear(path, rows_key, matrix_shape):
        T = [t.reshape(matrix_shape) for t in tv(path)]
        # the stats store float32 Grams/rows; the reference sees the same rounded features, multiplied in float64
        # (gram_matrix() multiplies stored rows in float32, whose rounding depends on the CPU's dot kernel)
        A = [tr.gram64(cm.linear_stats(raw[k][rows_key])) for k in range(K)]
        B = ref.linear_bases(T, A, lam, c, positive=not strict)
        trimmed = (ref.apply_linear_joint if joint else ref.apply_linear_sequential)(T, B)
        return sum(trimmed).reshape(ft_get(w0, path).shape)

    def shift(path):
        T = tv(path)
        return sum(ref.apply_masks(T, ref.shift_masks(T, c).astype(float)))

    updates = {
        "conv/kernel": linear("conv/kernel", "conv", (12, 5)),
        "block/dense/kernel": linear("block/dense/kernel", "dense", (5, 7)),
        "head/kernel": linear("head/kernel", "head", (7, 6)),
        "conv/bias": shift("conv/bias"), "block/dense/bias": shift("block/dense/bias"),
        "block/norm/bias": shift("block/norm/bias"), "head/bias": shift("head/bias"),
        "embed/embedding": sum(tv("embed/embedding")),
    }
    T = tv("block/norm/scale")
    S = [np.asarray(cm.scale_stats(raw[k]["norm"]).sq_sum, np.float64) for k in range(K)]
    updates["block/norm/scale"] = sum(ref.apply_masks(T, ref.scale_masks(T, S, lam, c).astype(float)))
    for path, delta in updates.items():
        ft_set(out, path, np.asarray(ft_get(w0, path), np.float64) + alpha * delta)
    return out


def ft_get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def ft_set(tree, path, value):
    keys = path.split("/")
    for key in keys[:-1]:
        tree = tree[key]
    tree[keys[-1]] = value


@pytest.mark.parametrize("joint", [False, True])
def test_cat_merge_matches_reference_pipeline(x64, joint):
    w0, fts, stats, raw = make_problem()
    merged = cm.cat_merge(w0, fts, stats, alpha=0.4, lam=3.0, c=2, joint=joint)
    expected = reference_merge(w0, fts, raw, alpha=0.4, lam=3.0, c=2, joint=joint)
    # float64 on the same data: rounding ≈ eps64·‖G_k‖/gap ≈ 1e-15 relative here (measured 7e-16 at most)
    for (path, got), (_, want) in zip(cm.leaves_with_paths(merged), cm.leaves_with_paths(expected)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-12, err_msg=path)


def test_cat_merge_float32_close_to_float64_reference():
    w0, fts, stats, raw = make_problem(seed=3, dtype=np.float32)
    merged = cm.cat_merge(w0, fts, stats, alpha=0.3, lam=5.0, c=2)
    expected = reference_merge(w0, fts, raw, alpha=0.3, lam=5.0, c=2)
    for (path, got), (_, want) in zip(cm.leaves_with_paths(merged), cm.leaves_with_paths(expected)):
        assert got.dtype == np.float32, path
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3, err_msg=path)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(0.0, 10.0), alpha=st.floats(0.05, 1.0))
def test_single_task_and_c_zero_equal_task_arithmetic(seed, lam, alpha):
    with jax.enable_x64(True):
        w0, fts, stats, _ = make_problem(seed=seed)
        ta = cm.task_arithmetic(w0, fts, alpha=alpha)
        assert cm.tree_allclose(cm.cat_merge(w0, fts, stats, alpha=alpha, lam=lam, c=0), ta, rtol=1e-12, atol=1e-12)
        ta1 = cm.task_arithmetic(w0, fts[:1], alpha=alpha)
        assert cm.tree_allclose(cm.cat_merge(w0, fts[:1], stats[:1], alpha=alpha, lam=lam, c=2), ta1, rtol=1e-12,
                                atol=1e-12)


def test_permuting_tasks_leaves_joint_merge_unchanged(x64):
    w0, fts, stats, _ = make_problem(seed=8, K=4)
    perm = [2, 0, 3, 1]
    a = cm.cat_merge(w0, fts, stats, c=2, joint=True)
    b = cm.cat_merge(w0, [fts[p] for p in perm], [stats[p] for p in perm], c=2, joint=True)
    assert cm.tree_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_sequential_and_joint_differ_but_only_in_linear_leaves(x64):
    w0, fts, stats, _ = make_problem(seed=4, K=4)
    seq = cm.cat_merge(w0, fts, stats, c=2)
    joint = cm.cat_merge(w0, fts, stats, c=2, joint=True)
    diff = cm.tree_max_abs_diff(seq, joint)
    assert diff["block/dense/kernel"] > 1e-6  # projections onto different subspaces do not commute
    assert diff["block/norm/scale"] == 0.0 and diff["embed/embedding"] == 0.0  # masks commute


def test_switching_parts_off_and_custom_trimmer_tables(x64):
    w0, fts, stats, _ = make_problem(seed=5)
    ta = cm.task_arithmetic(w0, fts, alpha=0.3)
    full = cm.cat_merge(w0, fts, stats, c=2)
    no_linear = cm.cat_merge(w0, fts, stats, c=2, trim_linear=False)
    assert np.allclose(no_linear["block"]["dense"]["kernel"], ta["block"]["dense"]["kernel"])
    assert np.allclose(no_linear["block"]["norm"]["scale"], full["block"]["norm"]["scale"])
    table = cm.cat_trimmers(5.0, 2)
    table[cm.Role.SHIFT] = cm.identity_trimmer()
    via_table = cm.merge_with_trimmers(w0, fts, stats, table, alpha=0.3)
    assert cm.tree_allclose(via_table, cm.cat_merge(w0, fts, stats, c=2, trim_shift=False))
    assert np.allclose(via_table["head"]["bias"], ta["head"]["bias"])


def test_restricted_trimmer_projects_only_the_matching_leaves(x64):
    w0, fts, stats, _ = make_problem(seed=6)
    ta = cm.task_arithmetic(w0, fts, alpha=0.3)
    full = cm.cat_merge(w0, fts, stats, c=2)
    for where in ("^block/", lambda path: path.startswith("block/")):
        table = cm.cat_trimmers(5.0, 2)
        table[cm.Role.LINEAR] = cm.restricted(table[cm.Role.LINEAR], where)
        merged = cm.merge_with_trimmers(w0, fts, stats, table, alpha=0.3)
        np.testing.assert_allclose(merged["block"]["dense"]["kernel"], full["block"]["dense"]["kernel"], rtol=1e-12)
        np.testing.assert_allclose(merged["head"]["kernel"], ta["head"]["kernel"], rtol=1e-12)  # linear, unmatched
        np.testing.assert_allclose(merged["conv"]["kernel"], ta["conv"]["kernel"], rtol=1e-12)
        np.testing.assert_allclose(merged["head"]["bias"], full["head"]["bias"], rtol=1e-12)  # shifts still masked
    assert not np.allclose(full["head"]["kernel"], ta["head"]["kernel"])
    with pytest.raises(TypeError, match="where must be"):
        cm.restricted(cm.identity_trimmer(), 3)


def test_rescale_norm_restores_task_vector_norms(x64):
    w0, fts, stats, _ = make_problem(seed=6, K=2)
    merged = cm.cat_merge(w0, fts[:1] * 1, stats[:1], alpha=1.0, c=2, rescale_norm=True)
    assert cm.tree_allclose(merged, fts[0], rtol=1e-12, atol=1e-12)  # K=1: nothing trimmed, norms unchanged
    t = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 3)))
    leaf = cm.LeafInput("x/kernel", cm.LeafSpec(cm.Role.LINEAR), t, None)
    halve = cm.Trimmer(init=lambda leaf: None, apply=lambda leaf, s: leaf.task_vectors * 0.5)
    out = cm.norm_rescaled(halve).apply(leaf, None)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out).reshape(2, -1), axis=1),
                               np.linalg.norm(np.asarray(t).reshape(2, -1), axis=1), rtol=1e-12)


def test_role_overrides_change_what_is_trimmed(x64):
    w0, fts, stats, _ = make_problem(seed=7)
    ta = cm.task_arithmetic(w0, fts, alpha=0.3)
    merged = cm.cat_merge(w0, fts, stats, c=2, roles={"block/*": cm.Role.OTHER, "head/bias": "other"})
    for path in ("block/dense/kernel", "block/norm/scale", "head/bias"):
        np.testing.assert_allclose(ft_get(merged, path), ft_get(ta, path), rtol=1e-12)
    assert not np.allclose(merged["head"]["kernel"], ta["head"]["kernel"])


def test_row_and_gram_statistics_give_the_same_merge(x64):
    w0, fts, stats, raw = make_problem(seed=9)
    as_grams = [jax.tree.map(lambda s: s.to_gram(), st_, is_leaf=lambda x: isinstance(x, cm.LeafStats))
                for st_ in stats]
    assert stats[0]["head"]["kernel"].rows is not None and as_grams[0]["head"]["kernel"].rows is None
    # statistics are stored in float32, so the Gram form is rounded once more than the rows: 1e-6 relative
    assert cm.tree_allclose(cm.cat_merge(w0, fts, stats, c=2), cm.cat_merge(w0, fts, as_grams, c=2), rtol=1e-6,
                            atol=1e-7)


def test_same_shaped_leaves_share_one_compilation():
    rng = np.random.default_rng(0)
    w0 = {f"layer{j}": {"kernel": rng.normal(size=(9, 13)).astype(np.float32)} for j in range(4)}
    fts = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), w0) for _ in range(3)]
    stats = [cm.stats_from_arrays(w0, {f"layer{j}/kernel": cm.linear_stats(rng.normal(size=(20, 9)))
                                       for j in range(4)}) for _ in range(3)]
    cm.cat_merge(w0, fts, stats, c=2)
    sizes = (cm.cat_linear_bases._cache_size(), cm.apply_cat_linear._cache_size())
    cm.cat_merge(w0, fts, stats, c=2, lam=2.0, alpha=0.5)
    assert (cm.cat_linear_bases._cache_size(), cm.apply_cat_linear._cache_size()) == sizes


def test_progress_bar_can_be_shown_and_silenced(capsys):
    w0, fts, stats, _ = make_problem(seed=1, dtype=np.float32)
    cm.cat_merge(w0, fts, stats, c=2, progress=False)
    assert "CAT merge" not in capsys.readouterr().err
    cm.cat_merge(w0, fts, stats, c=2, progress=True)
    assert "CAT merge" in capsys.readouterr().err


def test_dtypes_are_preserved_for_bf16_weights():
    w0, fts, stats, _ = make_problem(seed=2, dtype=np.float32)
    to_bf16 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)
    merged = cm.cat_merge(to_bf16(w0), [to_bf16(f) for f in fts], stats, c=2)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))
