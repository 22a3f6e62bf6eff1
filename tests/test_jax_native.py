"""The merges as JAX functions: jit, vmap and grad of the front doors, cat_trim + combine, AdaMerging, stacked,
out-first and fused leaves, and the errors that replace silent no-ops (issue: JAX-native)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import catmerge_jax as cm
from catmerge_jax.roles import LeafSpec, Role
from tests import reference as ref
from tests.test_cat_merge import ft_get, make_problem, reference_merge


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _tree_rel(a, b):
    return max(_rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# make_problem's statistics are stored in float32 (as capture stores them); the float64 reference forms its Grams
# from the same float32 numbers in another order, so float64 merges agree to the features' float32 rounding
# (measured ≤ 4e-8 relative), not to float64 precision.
FEATURE_ROUNDING = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Traced front doors


@pytest.mark.parametrize("fast", [False, True])
def test_cat_merge_under_jit_vmap_grad_matches_the_float64_reference(x64, fast):
    w0, fts, stats, raw = make_problem(seed=3)
    traces = []

    def merge(p, f, s, alpha, lam):
        traces.append(1)
        return cm.cat_merge(p, f, s, alpha=alpha, lam=lam, c=2, fast=fast)

    jitted = jax.jit(merge)
    for alpha, lam in ((0.3, 5.0), (0.7, 1.0)):
        expected = reference_merge(w0, fts, raw, alpha=alpha, lam=lam, c=2)
        got = jitted(w0, fts, stats, alpha, lam)
        assert _tree_rel(got, expected) < FEATURE_ROUNDING
    assert len(traces) == 1  # new alpha/lam values reuse the compiled merge

    alphas = jnp.array([0.1, 0.5])
    batched = jax.vmap(lambda a: cm.cat_merge(w0, fts, stats, alpha=a, lam=5.0, c=2, fast=fast))(alphas)
    for i, a in enumerate([0.1, 0.5]):
        expected = reference_merge(w0, fts, raw, alpha=a, lam=5.0, c=2)
        assert _tree_rel(jax.tree.map(lambda x: x[i], batched), expected) < FEATURE_ROUNDING

    # d/dα Σ_leaves Σ w ⊙ (W0 + α ΣT̃) = Σ w ⊙ ΣT̃, with ΣT̃ from the float64 reference at α = 1 minus W0
    weights = jax.tree.map(lambda x: np.random.default_rng(0).normal(size=np.shape(x)), w0)
    update = jax.tree.map(lambda r, b: r - np.asarray(b, np.float64),
                          reference_merge(w0, fts, raw, alpha=1.0, lam=5.0, c=2), w0)
    expected_grad = sum(float(np.sum(w * u)) for w, u in zip(jax.tree.leaves(weights), jax.tree.leaves(update)))
    grad = jax.grad(lambda a: sum(jnp.sum(w * m) for w, m in zip(
        jax.tree.leaves(weights), jax.tree.leaves(cm.cat_merge(w0, fts, stats, alpha=a, c=2, fast=fast)))))(0.3)
    assert abs(float(grad) - expected_grad) <= FEATURE_ROUNDING * abs(expected_grad)


BASIC_TRACED = ["task_arithmetic", "ties", "average"]


@pytest.mark.parametrize("name", BASIC_TRACED)
def test_basic_front_doors_trace_with_params_and_alpha(name):
    w0, fts, _, _ = make_problem(seed=4, dtype=np.float32)
    method = cm.get_method(name)
    hp = {k: v for k, v in method.defaults.items() if k != "alpha"}
    takes_alpha = "alpha" in method.defaults
    eager = method.merge(w0, fts, **hp, **({"alpha": 0.4} if takes_alpha else {}))
    jitted = jax.jit(lambda p, f, a: method.merge(p, f, **hp, **({"alpha": a} if takes_alpha else {})))(
        w0, fts, jnp.float32(0.4))
    assert _tree_rel(jitted, eager) <= 1e-5
    if takes_alpha:
        direction = method.merge(w0, fts, **hp, alpha=1.0)
        expected = sum(float(np.sum(np.asarray(d, np.float64) - np.asarray(b, np.float64)))
                       for d, b in zip(jax.tree.leaves(direction), jax.tree.leaves(w0)))
        grad = jax.grad(lambda a: sum(jnp.sum(x) for x in jax.tree.leaves(method.merge(w0, fts, **hp, alpha=a))))(
            0.4)
        assert abs(float(grad) - expected) <= 1e-4 * abs(expected)


def test_every_registered_method_has_a_traced_equality_test():
    """Each registered method is run under ``jax.jit`` (params, statistics, extras and alpha traced) and compared with
    its eager call or a float64 reference by one of the parametrized tests listed here; a method added to the registry
    without one fails this test. (Running them all again here took ~1 min of compilation for no new check.)"""
    from tests import test_mergekit, test_methods_field, test_traced_baselines

    covered = {
        "cat": "test_cat_merge_under_jit_vmap_grad_matches_the_float64_reference",
        **{n: "test_basic_front_doors_trace_with_params_and_alpha" for n in BASIC_TRACED},
        **{n: "test_traced_baselines.py::test_jit_equals_eager_without_retracing" for n in test_traced_baselines.CASES},
        **{n: "test_methods_field.py::test_jit_vmap_and_grad_over_alpha" for n in test_methods_field.TRACED},
        **{f"mergekit.{n}": "test_mergekit.py::test_method_matches_float64_reference (eager and jitted)"
           for n in test_mergekit.TRACED},
    }
    missing = sorted(set(cm.available_methods()) - set(covered))
    assert not missing, f"registered methods without a traced test: {missing}"


def test_value_checks_run_eagerly_and_are_skipped_under_tracing():
    w0, fts, stats, _ = make_problem(seed=6, dtype=np.float32)
    bad = jax.tree.map(lambda x: x, fts[0])
    bad["head"]["kernel"] = bad["head"]["kernel"].copy()
    bad["head"]["kernel"][0, 0] = np.nan
    with pytest.raises(cm.NonFiniteError, match="head/kernel"):
        cm.cat_merge(w0, [bad] + fts[1:], stats, c=2)
    with pytest.raises(cm.HyperparameterError, match="alpha must be finite"):
        cm.task_arithmetic(w0, fts, alpha=float("inf"))
    with pytest.raises(cm.HyperparameterError, match="lam must be >= 0"):
        cm.cat_merge(w0, fts, stats, lam=-1.0)
    # traced: the trace completes and NaN propagates instead of raising inside the trace
    out = jax.jit(lambda f: cm.cat_merge(w0, f, stats, c=2))([bad] + fts[1:])
    assert np.isnan(np.asarray(out["head"]["kernel"])).any()
    with pytest.raises(cm.TreeMismatchError, match="head/kernel"):  # structure checks still run when traced
        broken = [jax.tree.map(lambda x: x, f) for f in fts]
        broken[1]["head"]["kernel"] = np.zeros((3, 3), np.float32)
        jax.jit(lambda f: cm.cat_merge(w0, f, stats, c=2))(broken)


# ---------------------------------------------------------------------------------------------------------------
# cat_trim and combine


@pytest.mark.parametrize("fast", [True, False], ids=["batched", "per_leaf"])
def test_cat_trim_recombines_to_cat_merge_and_coefficient_gradients_are_exact(x64, fast):
    w0, fts, stats, raw = make_problem(seed=7)
    timings = {} if fast else None
    trimmed = cm.cat_trim(w0, fts, stats, lam=5.0, c=2, fast=fast, timings=timings)
    assert len(trimmed) == 3
    if fast:  # the batched path ran (it reports its linear groups)
        assert timings["solves"] > 0 and timings["groups"]
    assert _tree_rel(cm.combine(w0, trimmed, 0.3), reference_merge(w0, fts, raw, alpha=0.3, lam=5.0, c=2)) < FEATURE_ROUNDING

    # layer-wise coefficients: ∂/∂λ[leaf][k] Σ w ⊙ merged = Σ w ⊙ T̃_k[leaf]
    rng = np.random.default_rng(1)
    weights = jax.tree.map(lambda x: rng.normal(size=np.shape(x)), w0)
    coefs = jax.tree.map(lambda _: jnp.array([0.2, 0.5, 0.9]), w0)
    grad = jax.grad(lambda co: sum(jnp.sum(w * m) for w, m in zip(
        jax.tree.leaves(weights), jax.tree.leaves(cm.combine(w0, trimmed, co)))))(coefs)
    for (path, g), w in zip(cm.leaves_with_paths(grad), jax.tree.leaves(weights)):
        expected = [float(np.sum(w * np.asarray(ft_get(t, path)))) for t in trimmed]
        np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-10, atol=1e-12)


def test_gradients_through_cat_trim_are_finite_with_fewer_rows_than_inputs(x64):
    # the head kernel has 2 + k rows for 7 inputs: G_k has a multiple zero eigenvalue (eigh's gradient is NaN there)
    w0, fts, stats, _ = make_problem(seed=8)
    grads = jax.grad(lambda f: sum(jnp.sum(jnp.sin(x)) for t in cm.cat_trim(w0, f, stats, c=3)
                                   for x in jax.tree.leaves(t)))(fts)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # with the bases held fixed the gradient of T_i ↦ T_i − T_i B Bᵀ is (I − B Bᵀ)-projected: check one leaf
    head = next(leaf for leaf in cm.tree_inputs(w0, fts, stats).leaves if leaf.path == "head/kernel")
    bases = cm.cat_trimmers(5.0, 3)[Role.LINEAR].init(head)
    path_leaves = dict(cm.leaves_with_paths(grads[0]))
    assert "head/kernel" in path_leaves
    g = np.asarray(path_leaves["head/kernel"])
    t_all = [np.asarray(f["head"]["kernel"]) - np.asarray(w0["head"]["kernel"]) for f in fts]
    b = [np.asarray(x) for x in bases]
    expected = np.cos(ref.apply_linear_sequential(t_all, b)[0])
    p = np.eye(6)  # T̃_0 = T_0 P with P = (I − B_1B_1ᵀ)(I − B_2B_2ᵀ), so ∂/∂T_0 = cos(T̃_0) Pᵀ
    for k in (1, 2):
        p = p @ (np.eye(6) - b[k] @ b[k].T)
    np.testing.assert_allclose(g, expected @ p.T, rtol=1e-9, atol=1e-12)


def test_combine_rejects_coefficients_of_the_wrong_shape():
    w0, fts, _, _ = make_problem(seed=9, dtype=np.float32)
    tvs = cm.task_vectors(w0, fts)
    with pytest.raises(cm.TreeMismatchError, match="coefficients"):
        cm.combine(w0, tvs, {"head": jnp.ones(3)})
    with pytest.raises(cm.HyperparameterError, match="coefficients must be a real number"):
        cm.combine(w0, tvs, "0.3")


# ---------------------------------------------------------------------------------------------------------------
# AdaMerging


def test_adamerging_finds_the_known_task_wise_optimum():
    """Two inputs with binary margins λ·m and (1 − λ)·m: the summed entropy is symmetric in λ ↔ 1 − λ and, for a
    large margin, minimal at λ = 1/2 (2·H(m/2) < ln 2 + H(m)): the coefficient must converge there."""
    m = 8.0
    w0 = {"w": jnp.array([[0.0, 0.0], [0.0, m]])}  # input 2 has margin m at λ = 0
    tvs = [{"w": jnp.array([[0.0, m], [0.0, -m]])}]  # λ moves margin m onto input 1 and off input 2
    x = jnp.eye(2)
    result = cm.adamerging(w0, tvs, lambda p, b: b @ p["w"], x, granularity="task", init=0.2, steps=300,
                           optimizer=optax.sgd(0.5))
    np.testing.assert_allclose(np.asarray(result.coefficients), [0.5], atol=1e-3)
    np.testing.assert_allclose(np.asarray(result.params["w"]), [[0.0, 4.0], [0.0, 4.0]], atol=1e-2)
    assert result.losses[-1] < result.losses[0]


def test_adamerging_layer_wise_keeps_the_sharpening_vector_and_drops_the_flattening_one():
    """Layer-wise: in leaf "a" task vector 0 sharpens every prediction and task vector 1 flattens them, in leaf
    "b" the roles swap; entropy minimisation within [0, 1] must give λ_a = (1, 0), λ_b = (0, 1)."""
    # every matrix is a multiple of I, so the logits are s·x with s = (0.1 + 0.3λ_a0 − 0.1λ_a1)(0.1 − 0.1λ_b0 +
    # 0.3λ_b1) ≥ 0; the entropy falls as s grows, and s is largest at that corner of [0, 1]⁴. Small weights keep
    # the predictions soft, so the gradient never vanishes before the corner is reached.
    w0 = {"a": 0.1 * jnp.eye(2), "b": 0.1 * jnp.eye(2)}
    tvs = [{"a": 0.3 * jnp.eye(2), "b": -0.1 * jnp.eye(2)}, {"a": -0.1 * jnp.eye(2), "b": 0.3 * jnp.eye(2)}]
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.5]])
    result = cm.adamerging(w0, tvs, lambda p, b: (b @ p["a"]) @ p["b"], x, granularity="layer", steps=400,
                           learning_rate=0.05)
    np.testing.assert_allclose(np.asarray(result.coefficients["a"]), [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(result.coefficients["b"]), [0.0, 1.0], atol=1e-6)


def test_adamerging_step_compiles_once_and_works_over_cat_trimmed_vectors():
    w0, fts, stats, _ = make_problem(seed=10, dtype=np.float32)
    trimmed = cm.cat_trim(w0, fts, stats, c=2)
    traces = []

    def logits(p, batch):
        traces.append(1)
        return batch @ p["head"]["kernel"]

    batches = [np.random.default_rng(i).normal(size=(4, 7)).astype(np.float32) for i in range(5)]
    result = cm.adamerging(w0, trimmed, logits, lambda step: batches[step % 5], granularity="layer", steps=10)
    assert len(traces) == 1
    # the merged params are W0 + Σ_k λ_k T̃_k with the learned coefficients (an independent recombination)
    head = np.asarray(w0["head"]["kernel"], np.float64) + sum(
        float(result.coefficients["head"]["kernel"][k]) * np.asarray(trimmed[k]["head"]["kernel"], np.float64)
        for k in range(3))
    np.testing.assert_allclose(np.asarray(result.params["head"]["kernel"]), head, rtol=1e-5, atol=1e-6)
    with pytest.raises(cm.HyperparameterError, match="granularity"):
        cm.adamerging(w0, trimmed, logits, batches[0], granularity="block")


# ---------------------------------------------------------------------------------------------------------------
# Stacked, out-first and fused leaves


def test_stacked_leaf_equals_its_unrolled_layers_in_both_paths(x64):
    rng = np.random.default_rng(11)
    layers, K = 3, 3
    w0 = {"blocks": {"kernel": rng.normal(size=(layers, 5, 6)), "scale": rng.normal(size=(layers, 6)),
                     "bias": rng.normal(size=(layers, 6))}}
    fts = [jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape), w0) for _ in range(K)]
    rows = [[rng.normal(size=(3, 5)) for _ in range(layers)] for _ in range(K)]
    normed = [[rng.normal(size=(8, 6)) for _ in range(layers)] for _ in range(K)]
    stats = [{"blocks": {"kernel": cm.LeafStats(count=np.full(layers, 3.0), rows=np.stack(rows[k])),
                         "scale": cm.LeafStats(count=np.full(layers, 8.0),
                                               sq_sum=np.stack([np.sum(x ** 2, 0) for x in normed[k]])),
                         "bias": cm.LeafStats(count=np.full(layers, 8.0))}} for k in range(K)]
    for fast in (False, True):
        merged = cm.cat_merge(w0, fts, stats, alpha=0.4, lam=2.0, c=2, fast=fast)
        for l in range(layers):
            T = [f["blocks"]["kernel"][l] - w0["blocks"]["kernel"][l] for f in fts]
            A = [rows[k][l].T @ rows[k][l] for k in range(K)]
            kernel = w0["blocks"]["kernel"][l] + 0.4 * sum(
                ref.apply_linear_sequential(T, ref.linear_bases(T, A, 2.0, 2, positive=True)))
            np.testing.assert_allclose(np.asarray(merged["blocks"]["kernel"][l]), kernel, rtol=1e-9, atol=1e-10)
            Ts = [f["blocks"]["scale"][l] - w0["blocks"]["scale"][l] for f in fts]
            S = [np.sum(normed[k][l] ** 2, 0) for k in range(K)]
            scale = w0["blocks"]["scale"][l] + 0.4 * sum(ref.apply_masks(Ts, ref.scale_masks(Ts, S, 2.0, 2)))
            np.testing.assert_allclose(np.asarray(merged["blocks"]["scale"][l]), scale, rtol=1e-12)


def test_out_first_kernels_merge_like_their_transpose(x64):
    w0, fts, stats, _ = make_problem(seed=12)
    flip = lambda t: {**t, "head": {**t["head"], "kernel": np.asarray(t["head"]["kernel"]).T}}  # noqa: E731
    spec = {"head/kernel": LeafSpec(Role.LINEAR, in_axes=1, out_first=True)}
    merged = cm.cat_merge(flip(w0), [flip(f) for f in fts], stats, c=2, roles=spec)
    expected = cm.cat_merge(w0, fts, stats, c=2)
    np.testing.assert_allclose(np.asarray(merged["head"]["kernel"]).T, np.asarray(expected["head"]["kernel"]),
                               rtol=1e-12)


def test_fused_projection_blocks_equal_separate_projections(x64):
    """A q|k|v kernel (d, 3d) with out_blocks=3 (and its bias) merges exactly like three separate leaves."""
    rng = np.random.default_rng(13)
    d, K = 4, 3
    parts = ("q", "k", "v")
    sep0 = {p: {"kernel": rng.normal(size=(d, d)), "bias": rng.normal(size=d)} for p in parts}
    seps = [jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape), sep0) for _ in range(K)]
    xs = [rng.normal(size=(3, d)) for _ in range(K)]
    sep_stats = [{p: {"kernel": cm.linear_stats(xs[k]), "bias": cm.count_stats(3)} for p in parts}
                 for k in range(K)]
    fuse = lambda t: {"qkv": {"kernel": np.concatenate([t[p]["kernel"] for p in parts], 1),  # noqa: E731
                              "bias": np.concatenate([t[p]["bias"] for p in parts])}}
    fused_stats = [{"qkv": {"kernel": cm.linear_stats(xs[k]), "bias": cm.count_stats(3)}} for k in range(K)]
    roles = {"qkv/kernel": LeafSpec(Role.LINEAR, out_blocks=3), "qkv/bias": LeafSpec(Role.SHIFT, out_blocks=3)}
    for fast in (False, True):
        fused = cm.cat_merge(fuse(sep0), [fuse(s) for s in seps], fused_stats, c=2, roles=roles, fast=fast)
        separate = fuse(cm.cat_merge(sep0, seps, sep_stats, c=2, fast=fast))
        np.testing.assert_allclose(fused["qkv"]["kernel"], separate["qkv"]["kernel"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fused["qkv"]["bias"], separate["qkv"]["bias"], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# No silent no-ops


def test_clear_errors_and_warnings_instead_of_silent_no_ops():
    w0, fts, stats, _ = make_problem(seed=14, dtype=np.float32)
    with pytest.raises(cm.TreeMismatchError, match="list of K fine-tuned"):
        cm.cat_merge(w0, fts[0], stats)
    with pytest.raises(cm.TreeMismatchError, match="list of K fine-tuned"):
        cm.task_arithmetic(w0, fts[0])
    with pytest.raises(cm.TreeMismatchError, match="'params'"):
        cm.task_arithmetic(w0, [{"params": f} for f in fts])
    with pytest.raises(cm.HyperparameterError, match="alpha must be a real number"):
        cm.cat_merge(w0, fts, stats, alpha="0.3")
    no_linear = {"embed": w0["embed"]}
    with pytest.warns(UserWarning, match="no leaf has the role 'linear'"):
        cm.cat_merge(no_linear, [{"embed": f["embed"]} for f in fts],
                     [cm.stats_from_arrays(no_linear, {}) for _ in fts], c=1)


def test_mixed_dtypes_merge_in_the_base_dtype():
    w0, fts, stats, raw = make_problem(seed=15, dtype=np.float32)
    bf16 = [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), f) for f in fts]
    merged = cm.cat_merge(w0, bf16, stats, c=2)
    assert all(np.asarray(m).dtype == np.float32 for m in jax.tree.leaves(merged))
    rounded = [jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.float32)), f) for f in bf16]
    expected = reference_merge(w0, rounded, raw, alpha=0.3, lam=5.0, c=2)
    assert _tree_rel(merged, expected) < 1e-4
    ta = cm.task_arithmetic(w0, bf16, alpha=0.3)
    assert all(np.asarray(m).dtype == np.float32 for m in jax.tree.leaves(ta))


# ---------------------------------------------------------------------------------------------------------------
# README recipe: orbax save / restore of merged params


def test_orbax_round_trip_of_merged_params(tmp_path):
    import orbax.checkpoint as ocp

    w0, fts, stats, _ = make_problem(seed=16, dtype=np.float32)
    merged = cm.cat_merge(w0, fts, stats, alpha=0.3, c=2)
    path = tmp_path / "merged"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, merged)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, jax.tree.map(np.zeros_like, merged))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
