"""The paper's analyses on the benchmark: exemplar count (Fig. 2a), accuracy vs alpha (Fig. 2b), λ and c
sweeps (Fig. 4), the linear/scale/shift ablation (Table 5), the knowledge-conflict map (Fig. 3), plus
diagnostics of how much task-vector energy CAT removes.

Every function takes an :class:`~experiments.benchmark.evaluate.Evaluator` and plain pytrees; CAT comes from
the library (``catmerge_jax.cat``), never re-implemented here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.cat import (LeafInput, Trimmer, identity_trimmer, linear_projection, merge_with_trimmers,
                              norm_rescaled, restricted, scale_masking, shift_masking, validate_inputs)
from catmerge_jax.roles import Role, classify, is_spec
from catmerge_jax.stats import is_leaf_stats
from catmerge_jax.tree import leaves_with_paths
from experiments.benchmark.evaluate import Evaluator, select_on_validation, summarize, tree_axpy

PyTree = Any


def trimmed_task_vectors(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree] | None,
                         trimmers: Mapping[Role, Trimmer], *, roles: Any = None) -> list[PyTree]:
    """The K trimmed task vectors ``T̃_i`` (one tree each) that :func:`catmerge_jax.cat.merge_with_trimmers` sums.

    Needed where tasks get different scales (the conflict map) and to measure what trimming removes.
    """
    validate_inputs(pretrained, finetuned, stats)
    per_task: list[list[jax.Array]] = [[] for _ in finetuned]
    for leaf in leaf_inputs(pretrained, finetuned, stats, roles=roles):
        trimmer = trimmers.get(leaf.spec.role, identity_trimmer())
        trimmed = trimmer.apply(leaf, trimmer.init(leaf))
        for i in range(len(finetuned)):
            per_task[i].append(trimmed[i])
    return [jax.tree.unflatten(jax.tree.structure(pretrained), leaves) for leaves in per_task]


def leaf_inputs(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree] | None, *,
                roles: Any = None):
    """Every leaf as the :class:`LeafInput` a trimmer sees (float32 task vectors, each task's statistics)."""
    specs = [s for _, s in leaves_with_paths(classify(pretrained, roles), is_leaf=is_spec)]
    paths = [p for p, _ in leaves_with_paths(pretrained)]
    task_leaves = [jax.tree.leaves(t) for t in finetuned]
    stat_leaves = None if stats is None else [jax.tree.leaves(s, is_leaf=is_leaf_stats) for s in stats]
    for j, base in enumerate(jax.tree.leaves(pretrained)):
        base = jnp.asarray(base, jnp.float32)
        tvs = jnp.stack([jnp.asarray(t[j], jnp.float32) - base for t in task_leaves])
        yield LeafInput(paths[j], specs[j], tvs, None if stat_leaves is None else [s[j] for s in stat_leaves])


def pair_terms(task_matrices: jax.Array, grams: jax.Array, basis: jax.Array, k: int, lam: float) -> jax.Array:
    """``g_i(b_j) = b_jᵀT_iᵀ(A_k − λA_i)T_i b_j`` for every task i and column j of task k's basis: ``(K, c)``.

    Their sum over i ≠ k is b_j's eigenvalue of ``G_k`` (the paper's objective for removing b_j).
    """
    tb = jnp.einsum("iab,bj->iaj", task_matrices, basis)  # T_i b_j for every i
    return jnp.einsum("iaj,iab,ibj->ij", tb, grams[k][None] - lam * grams, tb)


def removed_energy(pretrained: PyTree, finetuned: Sequence[PyTree], trimmed: Sequence[PyTree],
                   roles: Any = None) -> list[dict[str, float]]:
    """Per task: ``1 − ‖T̃‖² / ‖T‖²`` over the leaves of each role (the share of the task vector trimmed away)."""
    specs = dict(leaves_with_paths(classify(pretrained, roles), is_leaf=is_spec))
    out = []
    for ft, tt in zip(finetuned, trimmed):
        before: dict[str, float] = {}
        after: dict[str, float] = {}
        for (path, w0), (_, w), (_, t) in zip(leaves_with_paths(pretrained), leaves_with_paths(ft),
                                              leaves_with_paths(tt)):
            role = specs[path].role.name.lower()
            before[role] = before.get(role, 0.0) + float(jnp.sum((jnp.asarray(w) - jnp.asarray(w0)) ** 2))
            after[role] = after.get(role, 0.0) + float(jnp.sum(jnp.asarray(t) ** 2))
        out.append({r: (1.0 - after[r] / before[r]) if before[r] > 0 else 0.0 for r in before})
    return out


def tune_alpha(evaluator: Evaluator, pretrained: PyTree, delta: PyTree, alphas: Sequence[float], *,
               individual_test: Mapping[str, float], test: bool = True) -> dict:
    """Choose alpha for ``W0 + alpha * delta`` on validation; report test accuracy at the chosen alpha."""
    cands = [({"alpha": a}, (lambda a=a: tree_axpy(a, delta, pretrained))) for a in alphas]
    best, val, rows = select_on_validation(evaluator, cands)
    result = {"alpha": best["alpha"], "val": val, "val_mean": float(np.mean(list(val.values()))),
              "val_curve": [(r["hparams"]["alpha"], r["mean"]) for r in rows]}
    if test:
        acc = evaluator.accuracy(tree_axpy(best["alpha"], delta, pretrained), "test")
        result.update(test=acc, summary=summarize(acc, individual_test))
    return result


def alpha_curve(evaluator: Evaluator, pretrained: PyTree, delta: PyTree, alphas: Sequence[float],
                split: str = "test") -> list[tuple[float, float]]:
    """Mean accuracy of ``W0 + alpha * delta`` over ``alphas`` (Fig. 2b)."""
    out = []
    for a in alphas:
        acc = evaluator.accuracy(tree_axpy(a, delta, pretrained), split)
        out.append((float(a), float(np.mean(list(acc.values())))))
    return out


def memoized(trimmer: Trimmer, cache: dict, key: Any) -> Trimmer:
    """``trimmer`` whose ``init`` (the expensive bases/masks) is computed once per ``(key, leaf path)``.

    Variants that share bases (the ablations, the order-free projection, norm rescaling) then cost one basis
    computation in all; ``key`` must identify everything ``init`` depends on (λ, c, the statistics).
    """

    def init(leaf: LeafInput) -> Any:
        k = (key, leaf.path)
        if k not in cache:
            cache[k] = trimmer.init(leaf)
        return cache[k]

    return Trimmer(init, trimmer.apply)


def cat_table(lam: float, c: int, *, cache: dict, stats_key: Any, joint: bool = False,
              normalize_by_count: bool = False, rescale_norm: bool = False, gated: bool = False,
              off: Sequence[Role] = (), linear_only: str | None = None) -> dict[Role, Trimmer]:
    """CAT's ``{Role: Trimmer}`` table (library trimmers) with memoized bases; roles in ``off`` use task arithmetic.

    ``gated`` swaps in :func:`gated_linear_projection` (same bases, so they are shared through the cache).
    ``linear_only`` (a path regex) projects only the matching linear leaves (:func:`catmerge_jax.cat.restricted`).
    """
    linear = (gated_linear_projection(lam, c) if gated
              else linear_projection(lam, c, joint=joint, normalize_by_count=normalize_by_count))
    table = {
        Role.LINEAR: memoized(linear, cache, ("linear", lam, c, normalize_by_count, stats_key)),
        Role.SCALE: memoized(scale_masking(lam, c), cache, ("scale", lam, c, stats_key)),
        Role.SHIFT: memoized(shift_masking(c), cache, ("shift", c, stats_key)),
    }
    if linear_only is not None:
        table[Role.LINEAR] = restricted(table[Role.LINEAR], linear_only)
    if rescale_norm:
        table = {r: norm_rescaled(t) for r, t in table.items()}
    for role in off:
        table[role] = identity_trimmer()
    return table


def table_delta(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree],
                table: Mapping[Role, Trimmer]) -> PyTree:
    """``Σ_i T̃_i`` under ``table`` (the merge at alpha = 1 minus W0: CAT is linear in alpha by construction)."""
    merged = merge_with_trimmers(pretrained, finetuned, stats, table, alpha=1.0)
    return jax.tree.map(lambda m, w: jnp.asarray(m, jnp.float32) - jnp.asarray(w, jnp.float32), merged, pretrained)


def neighbours(alphas: Sequence[float], center: float) -> list[float]:
    """``center`` and its neighbours in the sorted grid ``alphas`` (a cheap local alpha search for sweeps)."""
    grid = sorted(alphas)
    i = grid.index(center) if center in grid else int(np.argmin([abs(a - center) for a in grid]))
    return grid[max(0, i - 1): i + 2]


def cat_sweep(evaluator: Evaluator, pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree],
              tables: Sequence[tuple[dict, Mapping[Role, Trimmer]]], alphas: Sequence[float],
              individual_test: Mapping[str, float], on_step: Callable[[], None] | None = None) -> list[dict]:
    """CAT under each ``(setting, table)``, alpha tuned on validation over ``alphas``; test at the chosen alpha."""
    rows = []
    for setting, table in tables:
        delta = table_delta(pretrained, finetuned, stats, table)
        rows.append({"setting": setting, **tune_alpha(evaluator, pretrained, delta, alphas,
                                                       individual_test=individual_test)})
        if on_step is not None:
            on_step()
    return rows


def conflict_map(evaluator: Evaluator, pretrained: PyTree, vectors: Sequence[PyTree], raw: Sequence[PyTree],
                 tasks: Sequence[str], grid: Sequence[float], split: str = "val") -> np.ndarray:
    """Knowledge conflict (paper eq. 3 / Fig. 3) of two tasks a, b over a grid of their scales.

    ``C[p, q] = L_a(W0 + α_p T̃_a + α_q T̃_b) − L_a(W0 + α_p T_a) + L_b(W0 + α_p T̃_a + α_q T̃_b) − L_b(W0 + α_q T_b)``:
    the loss each task gains from the other's (trimmed) vector, against its own untrimmed model at the same
    scale. ``vectors`` are the trimmed ``(T̃_a, T̃_b)`` (the raw ones for task arithmetic), ``raw`` ``(T_a, T_b)``.
    """
    a, b = tasks
    own_a = {al: evaluator.evaluate(tree_axpy(al, raw[0], pretrained), split, [a])[a]["loss"] for al in grid}
    own_b = {al: evaluator.evaluate(tree_axpy(al, raw[1], pretrained), split, [b])[b]["loss"] for al in grid}
    out = np.zeros((len(grid), len(grid)))
    for p, ap in enumerate(grid):
        for q, aq in enumerate(grid):
            w = tree_axpy(aq, vectors[1], tree_axpy(ap, vectors[0], pretrained))
            r = evaluator.evaluate(w, split, [a, b])
            out[p, q] = r[a]["loss"] - own_a[ap] + r[b]["loss"] - own_b[aq]
    return out


def removal_diagnostics(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree],
                        linear: Trimmer, lam: float, *, roles: Any = None) -> list[dict[str, float]]:
    """Per task k: how many of CAT's removal directions the paper's own objective actually supports.

    For each linear leaf and each basis vector ``b`` of ``B_k`` (from ``linear.init``, so memoized bases are
    reused), the per-pair terms ``g_i(b) = bᵀT_iᵀ(A_k − λA_i)T_i b`` (i ≠ k) sum to b's eigenvalue of ``G_k``.
    Reported: ``nonpositive_directions`` — share of b with ``Σ_i g_i(b) ≤ 1e-6 · Σ_i |g_i(b)|`` (the top-c
    eigenvalue is not positive: removing b does not lower the objective, yet the paper's rule removes it), and
    ``negative_pair_terms`` — share of (b, i) with ``g_i(b) < −1e-6 · Σ_i |g_i(b)|`` (removing b from T_i costs
    task i more than it helps task k; what the ``gated`` variant skips).
    """
    num = len(finetuned)
    counts = np.zeros((num, 4))  # nonpositive, directions, negative pair terms, pair terms
    for leaf in leaf_inputs(pretrained, finetuned, stats, roles=roles):
        if leaf.spec.role is not Role.LINEAR:
            continue
        bases = linear.init(leaf)  # (K, out, c)
        t = leaf.task_vectors.reshape(num, *leaf.spec.matrix_shape(leaf.task_vectors.shape[1:]))
        grams = jnp.stack([jnp.asarray(s.gram_matrix(), jnp.float32) for s in leaf.stats])
        for k in range(num):
            terms = np.delete(np.asarray(pair_terms(t, grams, bases[k], k, lam), np.float64), k, axis=0)
            net, gross = terms.sum(0), np.abs(terms).sum(0)
            # float32 rounding makes exact zeros (b in a null space) come out as ±tiny: compare against the gross
            counts[k] += [np.sum(net <= 1e-6 * gross), net.size, np.sum(terms < -1e-6 * gross), terms.size]
    return [{"nonpositive_directions": float(a / max(b, 1)), "negative_pair_terms": float(cn / max(d, 1))}
            for a, b, cn, d in counts]


def gated_linear_projection(lam: float = 5.0, c: int = 3) -> Trimmer:
    """A variant of CAT's linear trimming (proposed here, not the paper's): per-task sign gating.

    The paper removes every direction of ``B_k`` from every ``T_i`` (i ≠ k), although ``B_k`` was chosen for the
    SUM ``G_k = Σ_{i≠k} T_iᵀ(A_k − λA_i)T_i``. For one ``T_i`` a basis vector ``b`` can carry a negative term
    ``bᵀT_iᵀ(A_k − λA_i)T_i b < 0``: removing it from ``T_i`` costs task i more (λ-weighted) than it helps task k,
    by the paper's own objective. This variant removes ``b`` from ``T_i`` only where that term is positive, so
    each removal lowers the paper's per-pair objective. Bases are the library's (:func:`linear_projection`'s
    ``init``); Algorithm 1's order of application is kept; the gate uses the original task vectors.
    """
    base = linear_projection(lam, c)

    def apply(leaf: LeafInput, bases: jax.Array) -> jax.Array:
        shape = leaf.task_vectors.shape
        t = leaf.task_vectors.reshape(shape[0], *leaf.spec.matrix_shape(shape[1:]))
        grams = jnp.stack([jnp.asarray(s.gram_matrix(), t.dtype) for s in leaf.stats])  # (K, in, in)
        num = t.shape[0]
        # scores[k][i, j]: the per-pair term of b_j ∈ B_k for T_i, from the original task vectors
        scores = [pair_terms(t, grams, bases[k], k, lam) for k in range(num)]
        out = []
        for i in range(num):
            ti = t[i]
            for k in range(num):
                if k == i:
                    continue
                b = bases[k] * (scores[k][i] > 0)[None, :]
                ti = ti - (ti @ b) @ b.T
            out.append(ti)
        return jnp.stack(out).reshape(shape)

    return Trimmer(base.init, apply)
