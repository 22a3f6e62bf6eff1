"""The batched CAT merge (every strategy and solver) against an independent float64 NumPy reference.

Two kinds of data:

* random trees (``_problem``) whose conflict matrices have a clear eigengap at c and c positive top eigenvalues, so
  the top-c subspace is well defined and every path must reproduce the float64 merge;
* layers with a DESIGNED spectrum (``_designed``): K = 2, λ = 0, task vectors with orthonormal rows, so
  ``G_0 = T_1ᵀ A_0 T_1`` has exactly the eigenvalues chosen for ``A_0`` (plus zeros). That is how the tests put the
  Krylov space well below ``out``, and an exact tie at c where no solver can decide the subspace in float32.

Float32 tolerances: the library works in float32 on the same float32 inputs the reference reads; the computed
top-c projector is then off by about ``eps32·‖G‖ / gap`` (Davis–Kahan). With the relative gaps ≥ 1e-2 asserted
below that is ≤ 1e-5; the bounds used (2e-4 of a merged update, 1e-4 of a projector) leave a margin of 10.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import catmerge_jax as cm
from catmerge_jax import conflict
from catmerge_jax.batched import cat_merge_batched, linear_group_bases, plan_linear
from catmerge_jax.linalg import krylov_config
from tests import reference as ref
from tests import tree_reference as tr

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


def _assert_well_posed(w0, fts, stats, lam, c):
    """The test's premise: every G_k has c positive top eigenvalues and a relative gap ≥ 1e-2 at c."""
    leaves = dict(cm.leaves_with_paths(w0))
    for path in ("l0/kernel", "l1/kernel", "down/kernel"):
        T = [np.asarray(dict(cm.leaves_with_paths(f))[path], np.float64) - leaves[path] for f in fts]
        A = [tr.gram64(dict(cm.leaves_with_paths(s, is_leaf=lambda x: isinstance(x, cm.LeafStats)))[path])
             for s in stats]
        for k in range(K):
            G = ref.conflict_matrix(T, A, lam, k)
            w = np.sort(np.linalg.eigvalsh(G))[::-1]
            assert w[c - 1] > 1e-2 * np.abs(w).max() and tr.eigengap(G, c) > 1e-2, (path, k, w[:c + 1])


@pytest.mark.parametrize("joint", [False, True])
def test_eigh_path_equals_float64_reference(solver_paths, joint):
    w0, fts, st = _problem()
    _assert_well_posed(w0, fts, st, 2.0, 2)
    want = tr.reference_cat_merge(w0, fts, st, alpha=0.4, lam=2.0, c=2, joint=joint)
    out = cat_merge_batched(w0, fts, st, alpha=0.4, lam=2.0, c=2, joint=joint, solver="eigh", max_group_bytes=1)
    assert jax.tree.structure(out) == jax.tree.structure(w0)
    _, upd = tr.compare(out, want, w0)
    assert upd < 2e-4
    # and the reference is not trivially close to task arithmetic: CAT's trimming is a visible part of the update
    _, ta = tr.compare(cm.task_arithmetic(w0, fts, alpha=0.4), want, w0)
    assert ta > 0.05


def test_low_rank_strategy_is_exact(solver_paths):
    """rows=10, K=3, c=2: 2(K-1)·10 + 2 = 42 < 80, so the 24→80 layers take the exact low-rank path: their bases
    span the float64 eigh subspace of the full G_k, and the merge equals the float64 reference."""
    w0, fts, st = _problem()
    _assert_well_posed(w0, fts, st, 2.0, 2)
    plan = plan_linear(K, 24, 80, 2, rows=10, strategy="low_rank")
    assert plan.strategy == "low_rank"
    leaves = dict(cm.leaves_with_paths(w0))
    for path in ("l0/kernel", "l1/kernel"):
        T = [np.asarray(dict(cm.leaves_with_paths(f))[path], np.float64) - leaves[path] for f in fts]
        rows = [np.asarray(dict(cm.leaves_with_paths(s, is_leaf=lambda x: isinstance(x, cm.LeafStats)))[path].rows)
                for s in st]
        bases = linear_group_bases(jnp.asarray(np.stack(T)[None], jnp.float32), jnp.asarray(np.stack(rows)[None]),
                                   lam=2.0, c=2, plan=plan)
        want = ref.linear_bases(T, [r.astype(np.float64).T @ r for r in rows], 2.0, 2)
        for k in range(K):
            got = np.asarray(bases[0, k], np.float64)
            np.testing.assert_allclose(got @ got.T, want[k] @ want[k].T, atol=1e-4, err_msg=f"{path} task {k}")
    want = tr.reference_cat_merge(w0, fts, st, alpha=0.4, lam=2.0, c=2)
    timings = {}
    out = cat_merge_batched(w0, fts, st, alpha=0.4, lam=2.0, c=2, strategy="auto", timings=timings)
    assert ("low_rank" in {g["strategy"] for g in timings["groups"]})
    assert tr.compare(out, want, w0)[1] < 2e-4
    assert tr.compare(cm.cat_merge(w0, fts, st, alpha=0.4, lam=2.0, c=2, fast=True), want, w0)[1] < 2e-4


def test_matrix_free_and_gram_forms_equal_float64_reference(solver_paths):
    w0, fts, st = _problem()
    want = tr.reference_cat_merge(w0, fts, st, alpha=0.4, lam=2.0, c=2)
    timings = {}
    out = cat_merge_batched(w0, fts, st, alpha=0.4, lam=2.0, c=2, solver="iterative", strategy="matrix_free",
                            timings=timings)
    assert tr.compare(out, want, w0)[1] < 2e-4
    # three linear layers (out 80, 80, 24) × K tasks; a Krylov block of 16 spans their whole range: all converge
    assert timings["solves"] == 3 * K and timings["fallbacks"] == 0
    assert set(timings) >= {"bases", "apply", "prepare"}
    # Grams instead of rows (more rows than input dims): the explicit Gram path.
    w0, fts, st = _problem(rows=100, seed=1)
    _assert_well_posed(w0, fts, st, 0.5, 2)
    want = tr.reference_cat_merge(w0, fts, st, alpha=0.3, lam=0.5, c=2)
    assert tr.compare(cat_merge_batched(w0, fts, st, lam=0.5, c=2, solver="eigh"), want, w0)[1] < 2e-4


def test_rows_krylov_equals_float64_reference(solver_paths):
    """The rows-Krylov plan (block Lanczos on G_k = Z_kᵀ D Z_k, Z_k and Z_kᵀ both stored) gives the float64
    reference's merge, on CPU and on the accelerator branches."""
    w0, fts, st = _problem()
    _assert_well_posed(w0, fts, st, 2.0, 2)
    want = tr.reference_cat_merge(w0, fts, st, alpha=0.4, lam=2.0, c=2)
    timings = {}
    out = cat_merge_batched(w0, fts, st, alpha=0.4, lam=2.0, c=2, solver="iterative", strategy="rows_krylov",
                            timings=timings)
    assert {g["strategy"] for g in timings["groups"]} == {"rows_krylov"}
    assert timings["solves"] == 3 * K and timings["fallbacks"] == 0
    assert tr.compare(out, want, w0)[1] < 2e-4


# ---------------------------------------------------------------------------------------------------------------
# Designed spectra: the Krylov space well below `out`, acceptance by the residual test, and the eigh fallback.
# ---------------------------------------------------------------------------------------------------------------

FAN_IN, FAN_OUT, C = 256, 384, 3


def _orthogonal(rng, n):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _spectrum(tie):
    """Descending eigenvalues of A (FAN_IN,), gap 0.3 at c = 3, or an exact tie straddling c (θ_3 = θ_4)."""
    tail = 2.3 * (1 - np.arange(FAN_IN - 4) / FAN_IN) ** 2
    return np.concatenate([[3.0, 2.8, 2.5, 2.5] if tie else [3.0, 2.8, 2.6, 2.35], tail])


def _designed(rng, ties, rows=None):
    """``(tvs (L, 2, in, out), data, G (L, 2, out, out) float64)`` for K = 2, λ = 0.

    ``ties[l][k]``: whether ``G_k`` of layer l has a tie at c. ``T_i`` has orthonormal rows, so
    ``G_0 = T_1ᵀ A_0 T_1`` has the eigenvalues of ``A_0`` and zeros; with ``rows`` (< in) the statistics are
    ``X_k (rows, in)`` with ``X_kᵀX_k = A_k`` restricted to its top ``rows`` eigenpairs.
    """
    tvs, data, gs = [], [], []
    for layer_ties in ties:
        T = [_orthogonal(rng, FAN_OUT)[:FAN_IN] for _ in range(2)]
        per_task, A = [], []
        for tie in layer_ties:
            a, Q = _spectrum(tie), _orthogonal(rng, FAN_IN)
            if rows is None:
                per_task.append((Q * a) @ Q.T)
                A.append(per_task[-1])
            else:
                X = np.sqrt(a[:rows])[:, None] * Q[:, :rows].T
                per_task.append(X)
                A.append(X.T @ X)
        tvs.append(np.stack(T))
        data.append(np.stack(per_task))
        gs.append([ref.conflict_matrix(T, A, 0.0, k) for k in range(2)])
    return (jnp.asarray(np.stack(tvs), jnp.float32), jnp.asarray(np.stack(data), jnp.float32), gs)


def _top(G, c):
    return np.linalg.eigh(G)[1][:, ::-1][:, :c]


def test_krylov_space_much_smaller_than_out_is_accepted_by_the_residual_test():
    """384 outputs, G_k of rank 256: a Krylov basis of block·(steps+1) = 208 columns cannot be exact, so whether a
    solve is accepted is decided by its residuals (Davis–Kahan bound ≤ tol·gap). Every solve must be accepted,
    none falls back, and the subspace equals float64 eigh's (projector error ≤ 1e-4: the solver accepts
    sin∠ ≲ 1e-4)."""
    cfg = krylov_config(C, FAN_OUT)
    assert cfg.block * (cfg.steps + 1) < FAN_IN < FAN_OUT
    rng = np.random.default_rng(0)
    tvs, grams, gs = _designed(rng, [(False, False)])
    plan = plan_linear(2, FAN_IN, FAN_OUT, C, rows=None, solver="iterative", strategy="explicit")
    assert plan[:3] == ("gram", "explicit", "iterative")
    counts = {}
    bases = linear_group_bases(tvs, grams, lam=0.0, c=C, plan=plan, counts=counts)
    assert counts["solves"] == 2 and counts["fallbacks"] == 0
    for k in range(2):
        want = _top(gs[0][k], C)
        got = np.asarray(bases[0, k], np.float64)
        np.testing.assert_allclose(got @ got.T, want @ want.T, atol=1e-4, err_msg=f"task {k}")


# the accelerator branches (the matrix-free Krylov solves vmapped over layers and tasks, the traced eigh fallback)
# with the rows form only: the Gram form's vmapped Krylov on 384² matrices costs 9 s of CPU on top, for the same
# map_batch and eigh_largest calls
FALLBACK_CASES = [("gram", "platform"), ("rows", "platform"), ("rows", "accelerator")]


@pytest.mark.parametrize("form,solver_paths", FALLBACK_CASES, indirect=["solver_paths"])
def test_eigh_fallback_runs_exactly_for_unresolvable_gaps(monkeypatch, form, solver_paths):
    """An exact tie θ_c = θ_{c+1} cannot be resolved: the Krylov solve must be rejected and re-solved by the
    host-side eigh fallback for exactly those (layer, task) pairs; the others keep the Krylov bases, equal to
    float64 eigh's subspace. In a tie every solver returns some c-subspace between the top c − 1 and the top
    c + 1 eigenvectors; that is checked too."""
    ties = [(True, False), (False, True)]
    rng = np.random.default_rng(1)
    tvs, data, gs = _designed(rng, ties, rows=None if form == "gram" else 64)
    # rows: the matrix-free Krylov operator Zᵀ D Z and the fallback that rebuilds G_k from the rows
    strategy = "explicit" if form == "gram" else "matrix_free"
    plan = plan_linear(2, FAN_IN, FAN_OUT, C, rows=None if form == "gram" else 64, solver="iterative",
                       strategy=strategy)
    assert plan[:3] == (form, strategy, "iterative")
    calls = []
    original = conflict._fallback_bases

    def recording(tvs_, data_, tasks, *args, **kwargs):
        calls.append((np.asarray(tvs_), np.asarray(tasks)))
        return original(tvs_, data_, tasks, *args, **kwargs)

    monkeypatch.setattr(conflict, "_fallback_bases", recording)
    counts = {}
    bases = linear_group_bases(tvs, data, lam=0.0, c=C, plan=plan, counts=counts)
    expected = [(layer, k) for layer, row in enumerate(ties) for k, tie in enumerate(row) if tie]
    assert counts["solves"] == 4 and counts["fallbacks"] == len(expected) == 2
    (sent_tvs, sent_tasks), = calls
    layers = [int(np.argmin([np.abs(np.asarray(tvs[j]) - t).max() for j in range(len(ties))])) for t in sent_tvs]
    assert sorted(zip(layers, sent_tasks.tolist())) == expected
    assert sorted(counts["unresolved"]) == expected
    for layer, row in enumerate(ties):
        for k, tie in enumerate(row):
            got = np.asarray(bases[layer, k], np.float64)
            P = got @ got.T
            vectors = _top(gs[layer][k], C + 1)
            if tie:
                inner, outer = vectors[:, :C - 1], vectors
                np.testing.assert_allclose(P @ inner, inner, atol=1e-4)
                np.testing.assert_allclose(outer @ (outer.T @ got), got, atol=1e-4)
            else:
                want = vectors[:, :C]
                np.testing.assert_allclose(P, want @ want.T, atol=1e-4, err_msg=f"layer {layer} task {k}")


def test_plan_prefers_cheap_forms():
    # ViT-B/32 MLP-up with 3 × 50 exemplar tokens: Krylov on Z_kᵀ D Z_k (both layouts stored) beats building the
    # 3072² G_k; the square and MLP-down layers still build G_k
    assert plan_linear(8, 768, 3072, 3, rows=150)[:3] == ("rows", "rows_krylov", "iterative")
    assert plan_linear(8, 768, 768, 3, rows=150)[:3] == ("rows", "explicit", "iterative")
    assert plan_linear(8, 3072, 768, 3, rows=150)[:3] == ("rows", "explicit", "iterative")
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


def test_groups_on_two_threads_equal_the_sequential_merge(monkeypatch):
    """A small merge on a CPU backend solves its groups on two worker threads (``parallel_workers``); each chunk is
    solved the same way either way, so the result must equal the one-thread merge bit for bit (a chunk's update
    landing in another chunk's layers, or a lost task-local setting, would change it)."""
    from catmerge_jax import cat

    w0, fts, stats = _problem(seed=5)
    chosen = []
    original = cat.parallel_workers
    monkeypatch.setattr(cat, "parallel_workers", lambda *a, **k: chosen.append(original(*a, **k)) or chosen[-1])
    threaded = cat_merge_batched(w0, fts, stats, alpha=0.4, lam=2.0, c=2)
    if jax.default_backend() == "cpu" and (__import__("os").cpu_count() or 1) > 1:
        assert chosen == [2]  # the premise: this merge did use two threads
    monkeypatch.setattr(cat, "parallel_workers", lambda *a, **k: 1)
    sequential = cat_merge_batched(w0, fts, stats, alpha=0.4, lam=2.0, c=2)
    for (path, got), (_, want) in zip(cm.leaves_with_paths(threaded), cm.leaves_with_paths(sequential)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=path)


def test_merge_inside_a_jax_config_context_stays_on_its_thread():
    """``jax.enable_x64`` holds for the calling thread only: a worker thread would compute in float32. A merge
    called inside such a context is solved on the caller's thread, in float64: it agrees with the float64
    reference to float64 rounding (1e-9 of the update), far below float32's ~1e-7 that a worker would give."""
    import os

    from catmerge_jax import cat

    threads = 2 if jax.default_backend() == "cpu" and (os.cpu_count() or 1) > 1 else 1
    assert cat.parallel_workers(4, 1 << 20, traced=False) == threads
    with jax.enable_x64(True):
        assert cat.parallel_workers(4, 1 << 20, traced=False) == 1
        w0, fts, stats = _problem(seed=6)
        w0, fts = jax.tree.map(lambda x: x.astype(np.float64), (w0, fts))
        merged = cat_merge_batched(w0, fts, stats, alpha=0.4, lam=2.0, c=2, solver="eigh")
        want = tr.reference_cat_merge(w0, fts, stats, alpha=0.4, lam=2.0, c=2)
        _, upd = tr.compare(merged, want, w0)
    assert upd < 1e-9
