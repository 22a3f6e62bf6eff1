"""TSV-M, Iso-C, Iso-CTS, WUDI and LOT against float64 NumPy references written from the papers' equations.

The references follow the papers (and FusionBench's layout of the same steps: zero-padded ``(out, r)`` factors for
TSV, task-specific blocks before the common block for Iso-CTS, the literal loss gradient and a hand-written Adam
for WUDI, ``np.linalg.pinv`` for LOT); they share no code with the library. Float64 comparisons run under the
``x64`` fixture with tolerances of 1e-9 (SVD/eigh round-off on these ≤ 20-dimensional matrices is ~1e-13).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import catmerge_jax as cm
from catmerge_jax import stats as st
from catmerge_jax.errors import HyperparameterError, MissingStatisticsError
from catmerge_jax.methods import iso, lot, tsv, wudi
from catmerge_jax.methods.registry import get_method
from catmerge_jax.roles import LeafSpec, Role

pytestmark = pytest.mark.usefixtures("strict_numerics")

K = 3
SHAPES = {
    # One (out, in) = (5, 4) matrix shape everywhere (each new shape compiles every method again), read
    # through every leaf layout; the square-free shape makes a missing or extra transpose visible.
    "embed": {"embedding": (5, 4)},                 # 2-D OTHER table: matrix algorithm as stored
    "dense": {"kernel": (4, 5), "bias": (5,)},      # Flax (in, out): the paper sees its transpose
    "attn": {"query": {"kernel": (4, 5, 1)}},       # DenseGeneral (in, heads, head_dim): read as (4, 5)
    "fused": {"kernel": (4, 15)},                   # q|k|v in one kernel: three (4, 5) blocks (roles below)
    "scan": {"kernel": (2, 4, 5)},                  # two stacked (4, 5) layers (roles below)
    "ln": {"scale": (5,), "bias": (5,)},
}
ROLES = {"fused/kernel": LeafSpec(Role.LINEAR, in_axes=1, out_blocks=3),
         "scan/kernel": LeafSpec(Role.LINEAR, in_axes=1, stack_axes=1)}
TOL = 1e-9


def make_models(seed=0, k=K, dtype=np.float64, scale=0.1):
    rng = np.random.default_rng(seed)
    pre = jax.tree.map(lambda s: rng.normal(size=s).astype(dtype), SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    fts = [jax.tree.map(lambda w: (w + scale * rng.normal(size=w.shape)).astype(dtype), pre) for _ in range(k)]
    return pre, fts


# ---------------------------------------------------------------- the leaf layout, written out by hand
def paper_matrices(path, t):
    """The (out, in) matrices the papers see for one leaf's task vector ``t`` (NumPy), or None."""
    if path == "embed/embedding":
        return [t]
    if path == "dense/kernel":
        return [t.T]
    if path == "attn/query/kernel":
        return [t.reshape(4, 5).T]
    if path == "fused/kernel":
        return [t[:, 5 * b:5 * b + 5].T for b in range(3)]
    if path == "scan/kernel":
        return [t[0].T, t[1].T]
    return None


def from_paper(path, mats, shape):
    if path == "embed/embedding":
        return mats[0]
    if path == "dense/kernel":
        return mats[0].T
    if path == "attn/query/kernel":
        return mats[0].T.reshape(shape)
    if path == "fused/kernel":
        return np.concatenate([m.T for m in mats], axis=1)
    if path == "scan/kernel":
        return np.stack([m.T for m in mats])
    raise AssertionError(path)


def reference_merge(pre, fts, layer_ref, alpha, matrices="all_2d", rest="mean"):
    out = {}
    for path, w0 in cm.leaves_with_paths(pre):
        w0 = np.asarray(w0, np.float64)
        tvs = [np.asarray(dict(cm.leaves_with_paths(ft))[path], np.float64) - w0 for ft in fts]
        per_task = [paper_matrices(path, t) for t in tvs]
        if per_task[0] is not None and not (matrices == "linear" and path == "embed/embedding"):
            merged = [layer_ref([p[i] for p in per_task]) for i in range(len(per_task[0]))]
            out[path] = w0 + alpha * from_paper(path, merged, w0.shape)
        else:
            out[path] = w0 + (alpha * np.mean(tvs, axis=0) if rest == "mean" else 0)
    return out


def task_arithmetic_ref(pre, fts, alpha):
    return {p: np.asarray(w, np.float64) + alpha * sum(np.asarray(dict(cm.leaves_with_paths(f))[p], np.float64)
                                                        - np.asarray(w, np.float64) for f in fts)
            for p, w in cm.leaves_with_paths(pre)}


def assert_tree_close(got, want, tol):
    for path, leaf in cm.leaves_with_paths(got):
        np.testing.assert_allclose(np.asarray(leaf, np.float64), want[path], rtol=tol, atol=tol, err_msg=path)


def nearest_orthonormal(a):
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


# ---------------------------------------------------------------- per-layer references from the papers
def tsv_ref(tvs):
    m, n = tvs[0].shape
    r = min(m, n)
    k = r // len(tvs)
    sum_u, sum_s, sum_v = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, t in enumerate(tvs):
        u, s, vt = np.linalg.svd(t)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = vt[:k, :]
    used = len(tvs) * k  # zero padding carries zero singular values; orthonormalize the used block
    uo = nearest_orthonormal(sum_u[:, :used])
    vo = nearest_orthonormal(sum_v[:used].T).T
    return uo @ np.diag(sum_s[:used]) @ vo


def iso_c_ref(tvs):
    u, s, vt = np.linalg.svd(sum(tvs), full_matrices=False)
    return np.mean(s) * u @ vt


def iso_cts_ref(tvs, fraction=0.8):
    m, n = tvs[0].shape
    r, k = min(m, n), len(tvs)
    c = int(r * fraction)
    c = r - round((r - c) / k) * k
    per = (r - c) // k
    u, s, vt = np.linalg.svd(sum(tvs), full_matrices=False)
    us, ss, vs = [], [], []
    for t in tvs:
        ts = t - u[:, :c] @ u[:, :c].T @ t
        a, b, ct = np.linalg.svd(ts, full_matrices=False)
        us.append(a[:, :per]), ss.append(b[:per]), vs.append(ct[:per])
    big_u = np.concatenate(us + [u[:, :c]], axis=1)
    big_s = np.concatenate(ss + [s[:c]])
    big_v = np.concatenate(vs + [vt[:c]], axis=0)
    return np.mean(big_s) * nearest_orthonormal(big_u) @ nearest_orthonormal(big_v.T).T


def wudi_ref(tvs, steps, lr, b1=0.9, b2=0.999, eps=1e-8):
    x = sum(tvs).copy()
    m1, m2 = np.zeros_like(x), np.zeros_like(x)
    for t in range(1, steps + 1):
        g = np.zeros_like(x)
        for tau in tvs:
            prod = (x - tau) @ tau.T                     # (out, out) interference on task-vector "inputs"
            g += 2 * prod @ tau / np.sum(tau * tau)      # d/dx of ‖prod‖² / ‖τ‖²
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        x = x - lr * (m1 / (1 - b1 ** t)) / (np.sqrt(m2 / (1 - b2 ** t)) + eps)
    return x


def wudi_loss_ref(x, tvs):
    return sum(np.sum(((x - t) @ t.T) ** 2) / np.sum(t * t) for t in tvs)


# ---------------------------------------------------------------- against the references
@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "iso_cts_half", "wudi"])
def test_matrix_methods_match_float64_reference(x64, name):
    pre, fts = make_models()
    alpha = 0.7
    if name == "tsv":
        got, ref = cm.tsv_merge(pre, fts, alpha=alpha, roles=ROLES), tsv_ref
    elif name == "iso_c":
        got, ref = cm.iso_c_merge(pre, fts, alpha=alpha, roles=ROLES), iso_c_ref
    elif name == "iso_cts":
        got, ref = cm.iso_cts_merge(pre, fts, alpha=alpha, roles=ROLES), iso_cts_ref
    elif name == "iso_cts_half":
        got = cm.iso_cts_merge(pre, fts, alpha=alpha, common_fraction=0.5, roles=ROLES)
        ref = lambda tvs: iso_cts_ref(tvs, 0.5)  # noqa: E731
    else:
        got = cm.wudi_merge(pre, fts, alpha=alpha, steps=20, lr=1e-2, roles=ROLES)
        ref = lambda tvs: wudi_ref(tvs, 20, 1e-2)  # noqa: E731
    assert_tree_close(got, reference_merge(pre, fts, ref, alpha), TOL)


def test_wudi_lowers_its_loss_and_default_steps_move_little(x64):
    rng = np.random.default_rng(3)
    tvs = rng.normal(size=(K, 5, 4))
    start = tvs.sum(0)
    out = np.asarray(wudi.wudi_layer(jnp.asarray(tvs), steps=50, lr=1e-2))
    assert wudi_loss_ref(out, list(tvs)) < 0.8 * wudi_loss_ref(start, list(tvs))   # 37.1 -> 26.2 here
    np.testing.assert_allclose(float(wudi.wudi_loss(jnp.asarray(out), jnp.asarray(tvs))), wudi_loss_ref(out, list(tvs)),
                               rtol=1e-10)
    # Adam moves each entry by at most ~lr per step: 400 steps of 1e-5 stay within 4e-3 of Σ_k τ_k
    out = np.asarray(wudi.wudi_layer(jnp.asarray(tvs)))
    assert 0 < np.max(np.abs(out - start)) <= 400 * 1e-5 * 1.01


def test_matrices_linear_and_rest_pretrained_options(x64):
    pre, fts = make_models()
    got = cm.tsv_merge(pre, fts, alpha=0.5, matrices="linear", roles=ROLES)
    assert_tree_close(got, reference_merge(pre, fts, tsv_ref, 0.5, matrices="linear"), TOL)
    got = cm.wudi_merge(pre, fts, alpha=0.5, steps=5, lr=1e-2, roles=ROLES, **wudi.AUTHORS_VIT)
    want = reference_merge(pre, fts, lambda t: wudi_ref(t, 5, 1e-2), 0.5, matrices="linear", rest="pretrained")
    assert_tree_close(got, want, TOL)
    np.testing.assert_array_equal(np.asarray(got["embed"]["embedding"]), pre["embed"]["embedding"])


def test_iso_cts_sizes_follow_the_papers_rounding():
    assert iso.iso_cts_sizes(384, 6, 0.8) == (306, 13)      # c0 = 307, round(77/6) = 13
    assert iso.iso_cts_sizes(10, 4, 0.8) == (10, 0)         # round(0.5) = 0 (half to even)
    assert iso.iso_cts_sizes(6, 4, 0.5) == (2, 1)           # round(0.75) = 1
    with pytest.raises(HyperparameterError, match="negative common subspace"):
        iso.iso_cts_sizes(2, 3, 0.0)


# ---------------------------------------------------------------- LOT
def lot_stats(pre, rows_per_task, form, rng):
    """Exemplar statistics: rows X_k for every linear leaf (its matrix input dim), sq_sum for the norm scale."""
    out = []
    for n in rows_per_task:
        by_path = {}
        for path, w in cm.leaves_with_paths(pre):
            if path in ("dense/kernel", "fused/kernel", "scan/kernel"):
                by_path[path] = st.linear_stats(rng.normal(size=(n, 4)), form=form)
            elif path == "attn/query/kernel":
                by_path[path] = st.linear_stats(rng.normal(size=(n, 4)), form=form)
            elif path == "ln/scale":
                by_path[path] = st.scale_stats(rng.normal(size=(n, 5)))
            else:
                by_path[path] = st.count_stats(n)
        out.append(st.stats_from_arrays(pre, by_path))
    return out


def lot_reference(pre, fts, stats, alpha, rcond):
    out = {}
    for path, w0 in cm.leaves_with_paths(pre):
        w0 = np.asarray(w0, np.float64)
        tvs = [np.asarray(dict(cm.leaves_with_paths(ft))[path], np.float64) - w0 for ft in fts]
        s = [dict(cm.leaves_with_paths(t, is_leaf=st.is_leaf_stats))[path] for t in stats]
        if path in ("dense/kernel", "fused/kernel", "scan/kernel", "attn/query/kernel"):
            grams = [np.asarray(x.gram, np.float64) if x.gram is not None
                     else np.asarray(x.rows, np.float64).T @ np.asarray(x.rows, np.float64) for x in s]
            mats = [t.reshape(t.shape[0], -1) if path != "scan/kernel" else t for t in tvs]
            cut = rcond if rcond is not None else 4 * np.finfo(np.float64).eps   # the library's in·eps default
            g_inv = np.linalg.pinv(sum(grams), rcond=cut, hermitian=True)
            if path == "scan/kernel":
                merged = np.stack([g_inv @ sum(g @ m[i] for g, m in zip(grams, mats)) for i in range(2)])
            else:
                merged = g_inv @ sum(g @ m for g, m in zip(grams, mats))   # blocks split columns: same solve
            out[path] = w0 + alpha * merged.reshape(w0.shape)
        elif path == "ln/scale":
            sq = [np.asarray(x.sq_sum, np.float64) for x in s]
            out[path] = w0 + alpha * sum(q * t for q, t in zip(sq, tvs)) / sum(sq)
        else:
            out[path] = w0 + alpha * np.mean(tvs, axis=0)
    return out


@pytest.mark.parametrize("rows,rcond", [((7, 8, 9), 1e-10), ((1, 1, 1), 1e-5)], ids=["full_rank", "rank_deficient"])
def test_lot_matches_pinv_reference_in_both_statistics_forms(x64, rows, rcond):
    pre, fts = make_models()
    gram_stats = lot_stats(pre, rows, "gram", np.random.default_rng(5))
    rows_stats = lot_stats(pre, rows, "rows", np.random.default_rng(5))       # the same exemplar rows
    # the float32 statistics are the data; each reference reads the same float32 numbers in float64
    got_gram = cm.lot_merge(pre, fts, gram_stats, alpha=0.8, rcond=rcond, roles=ROLES)
    got_rows = cm.lot_merge(pre, fts, rows_stats, alpha=0.8, rcond=rcond, roles=ROLES)
    assert_tree_close(got_gram, lot_reference(pre, fts, gram_stats, 0.8, rcond), 1e-9)
    assert_tree_close(got_rows, lot_reference(pre, fts, rows_stats, 0.8, rcond), 1e-9)
    # the two forms differ only by the float32 rounding of the stored Gram (relative 6e-8 per entry); with a
    # null space (rank-deficient case) the cutoff rcond=1e-5 removes the rounding's spurious eigenvalues
    assert_tree_close(got_rows, {p: np.asarray(w) for p, w in cm.leaves_with_paths(got_gram)}, 1e-5)


def test_lot_k1_full_rank_is_task_arithmetic_and_normalize_reweights(x64):
    pre, fts = make_models(k=1)
    stats = lot_stats(pre, (12,), "gram", np.random.default_rng(1))
    assert_tree_close(cm.lot_merge(pre, fts, stats, alpha=0.6, roles=ROLES), task_arithmetic_ref(pre, fts, 0.6), 1e-9)
    pre, fts = make_models()
    stats = lot_stats(pre, (7, 8, 9), "gram", np.random.default_rng(2))
    scaled = [jax.tree.map(lambda x, c=c: x / c, s) for s, c in zip(stats, (7, 8, 9))]  # count too: a no-op below
    want = lot_reference(pre, fts, scaled, 1.0, rcond=1e-10)
    assert_tree_close(cm.lot_merge(pre, fts, stats, normalize=True, rcond=1e-10, roles=ROLES), want, 1e-6)


def test_lot_errors_name_the_leaf_and_task():
    pre, fts = make_models(dtype=np.float32)
    stats = lot_stats(pre, (3, 3, 3), "gram", np.random.default_rng(0))
    with pytest.raises(MissingStatisticsError, match="needs exemplar statistics"):
        cm.lot_merge(pre, fts, None)
    broken = list(stats)
    broken[1] = st.stats_from_arrays(pre, {"ln/scale": st.scale_stats(np.ones((2, 5)))})
    with pytest.raises(MissingStatisticsError, match=r"leaf 'attn/query/kernel': task 1"):
        cm.lot_merge(pre, fts, broken, roles=ROLES)
    with pytest.raises(HyperparameterError, match="rcond"):
        cm.lot_merge(pre, fts, stats, rcond=-1.0, roles=ROLES)


# ---------------------------------------------------------------- invariants
def run(name, pre, fts, stats=None, **kw):
    if name == "wudi":
        kw = {"steps": 10, "lr": 1e-3, **kw}
    return get_method(name).merge(pre, fts, stats=stats, roles=ROLES, **kw)


def test_k1_tsv_is_task_arithmetic(x64):
    # (WUDI at K = 1 starts at its minimizer, but Adam divides rounding-level gradients by their own size, so it
    # drifts by up to lr per step there: not an identity worth asserting.)
    name = "tsv"
    pre, fts = make_models(k=1)
    assert_tree_close(run(name, pre, fts, alpha=0.9), task_arithmetic_ref(pre, fts, 0.9), 1e-10)


def test_iso_cts_with_full_common_subspace_is_iso_c(x64):
    pre, fts = make_models()
    want = {p: np.asarray(w) for p, w in cm.leaves_with_paths(cm.iso_c_merge(pre, fts, roles=ROLES))}
    assert_tree_close(cm.iso_cts_merge(pre, fts, common_fraction=1.0, roles=ROLES), want, 1e-10)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "wudi", "lot"])
def test_task_order_does_not_matter(x64, name):
    pre, fts = make_models()
    stats = lot_stats(pre, (4, 5, 6), "gram", np.random.default_rng(0)) if name == "lot" else None
    order = [2, 0, 1]
    a = run(name, pre, fts, stats)
    b = run(name, pre, [fts[i] for i in order], [stats[i] for i in order] if stats else None)
    assert_tree_close(b, {p: np.asarray(w) for p, w in cm.leaves_with_paths(a)}, 1e-9)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "wudi", "lot"])
def test_shapes_and_dtypes_kept_with_bf16_leaves(name):
    pre, fts = make_models(dtype=np.float32)
    pre = dict(pre, dense={"kernel": jnp.asarray(pre["dense"]["kernel"], jnp.bfloat16), "bias": pre["dense"]["bias"]})
    fts = [dict(f, dense={"kernel": jnp.asarray(f["dense"]["kernel"], jnp.bfloat16), "bias": f["dense"]["bias"]})
           for f in fts]
    stats = lot_stats(pre, (4, 5, 6), "rows", np.random.default_rng(0)) if name == "lot" else None
    out = run(name, pre, fts, stats)
    for (path, a), (_, b) in zip(cm.leaves_with_paths(out), cm.leaves_with_paths(pre)):
        assert a.shape == b.shape and a.dtype == jnp.result_type(b), path
        assert bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))), path


REFS = {"tsv": tsv_ref, "iso_c": iso_c_ref, "iso_cts": iso_cts_ref, "wudi": lambda tvs: wudi_ref(tvs, 10, 1e-3)}
TRACED = ["tsv", "iso_c", "iso_cts", "wudi", "lot"]


@pytest.mark.parametrize("name", TRACED)
def test_jit_vmap_and_grad_over_alpha(x64, name):
    """The whole merge under jit with α (and params, stats) traced, vmapped over α, and differentiated in α."""
    pre, fts = make_models()
    stats = lot_stats(pre, (4, 5, 6), "gram", np.random.default_rng(0)) if name == "lot" else None
    alphas = (0.4, 1.0)
    batch = jax.jit(jax.vmap(lambda p, f, s, a: run(name, p, f, s, alpha=a), in_axes=(None, None, None, 0)))(
        pre, fts, stats, jnp.asarray(alphas))
    for i, a in enumerate(alphas):
        want = (lot_reference(pre, fts, stats, a, rcond=None) if name == "lot"
                else reference_merge(pre, fts, REFS[name], a))
        assert_tree_close(jax.tree.map(lambda x, i=i: x[i], batch), want, 1e-9)
    # the merge is affine in α: d/dα Σ merged = Σ (merged(1) − merged(0)) of the reference
    total = lambda a: sum(jnp.sum(x) for x in jax.tree.leaves(run(name, pre, fts, stats, alpha=a)))  # noqa: E731
    zero, one = [reference_merge(pre, fts, REFS[name], a) if name != "lot" else lot_reference(pre, fts, stats, a, None)
                 for a in (0.0, 1.0)]
    np.testing.assert_allclose(float(jax.grad(total)(0.3)), sum(np.sum(one[p] - zero[p]) for p in one), rtol=1e-9)


def test_bad_hyperparameters_raise_one_line_errors():
    pre, fts = make_models(dtype=np.float32)
    cases = [
        (lambda: cm.iso_cts_merge(pre, fts, common_fraction=1.5), "common_fraction must be in"),
        (lambda: cm.wudi_merge(pre, fts, steps=-1), "steps must be a non-negative int"),
        (lambda: cm.wudi_merge(pre, fts, lr=0.0), "lr must be a finite number > 0"),
        (lambda: cm.tsv_merge(pre, fts, matrices="some"), "matrices must be one of"),
        (lambda: cm.iso_c_merge(pre, fts, rest="zero"), "rest must be one of"),
        (lambda: cm.tsv_merge(pre, fts, alpha=float("nan")), "alpha must be finite"),
        (lambda: cm.tsv_merge(pre, []), "K >= 1"),
    ]
    for fn, message in cases:
        with pytest.raises(HyperparameterError, match=message) as info:
            fn()
        assert "\n" not in str(info.value)


def test_registry_entries_and_defaults():
    assert get_method("tsv").defaults == {"alpha": 1.0}
    assert get_method("iso_c").defaults == {"alpha": 1.0}
    assert get_method("iso_cts").defaults == {"alpha": 1.0, "common_fraction": 0.8}
    assert get_method("wudi").defaults == {"alpha": 1.0, "steps": 400, "lr": 1e-5}
    assert get_method("lot").defaults == {"alpha": 1.0} and get_method("lot").needs_stats
    assert tsv.tsv_merge is cm.tsv_merge and lot.lot_merge is cm.lot_merge
