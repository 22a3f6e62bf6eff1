"""CAT Merging with every linear layer of the same shape solved in one batched computation.

:func:`cat_merge_batched` returns :func:`catmerge_jax.cat.cat_merge`'s result (up to float rounding and, with
the iterative solver, the solver tolerance) but

* groups LINEAR leaves by ``(in, out, statistics form, rows)`` and runs each group as ONE jitted call
  vmapped over (layers, tasks), in chunks of at most ``max_group_bytes``;
* picks, per group and by flop count (:func:`plan_linear`), how ``G_k`` is built and solved:

  - ``"gram"``: ``G_k`` from the Grams ``A_k`` (``K²(2·in²·out + 2·in·out²)`` flops);
  - ``"rows"``: ``G_k`` from ``Y_ki = X_k T_i`` (``K²(2·n·in·out + 2·n·out²)``, when rows are stored, n < in);
  - ``"matrix_free"``: never forms ``G_k``; the block Krylov solver applies
    ``v ↦ Σ_{i≠k} Y_kiᵀ Y_ki v − λ Σ_{i≠k} Y_iiᵀ Y_ii v`` directly (``8·K·n·out`` flops per vector);
  - solver ``"eigh"`` or ``"iterative"`` (:mod:`catmerge_jax.linalg`); non-converged / small-gap matrices
    fall back to eigh on the host side, only for those (layer, task) pairs;

* leaves a ``place`` function on each group's stacked arrays, which :mod:`catmerge_jax.sharding` uses to
  spread layers over a device mesh.

SCALE/SHIFT/OTHER leaves are cheap and go through :mod:`catmerge_jax.cat`'s own trimmers unchanged.

>>> import jax, jax.numpy as jnp
>>> import catmerge_jax as cm
>>> from catmerge_jax.batched import cat_merge_batched
>>> w0 = {"a": {"kernel": jnp.zeros((6, 5))}, "b": {"kernel": jnp.zeros((6, 5))}}
>>> fts = [jax.tree.map(lambda x, s=s: x + jax.random.normal(jax.random.key(s), x.shape), w0) for s in range(3)]
>>> x = jax.random.normal(jax.random.key(9), (4, 6))
>>> st = [cm.stats_from_arrays(w0, {"a/kernel": cm.linear_stats(x), "b/kernel": cm.linear_stats(x)})] * 3
>>> merged = cat_merge_batched(w0, fts, st, alpha=0.3, lam=5.0, c=2)
>>> bool(jnp.allclose(merged["a"]["kernel"], cm.cat_merge(w0, fts, st, c=2)["a"]["kernel"], atol=1e-5))
True
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax import cat
from catmerge_jax.linalg import (block_krylov_top, choose_solver, eigh_flops, eigh_top, krylov_config,
                                 krylov_flops, map_batch, MIN_ITERATIVE_N)
from catmerge_jax.roles import Overrides, Role, classify, is_spec
from catmerge_jax.stats import is_leaf_stats
from catmerge_jax.tree import PyTree, compute_dtype, is_concrete, leaves_with_paths

__all__ = ["LinearPlan", "plan_linear", "linear_group_bases", "linear_group_apply", "cat_merge_batched"]

Placement = Callable[[jax.Array], jax.Array]


THIN_PRODUCT_PENALTY = 4.0


class LinearPlan(NamedTuple):
    """How one group of linear layers is solved (all static).

    form: ``"gram"`` or ``"rows"`` — what the statistics are given as.
    strategy: ``"explicit"`` (build ``G_k``), ``"matrix_free"`` (rows only, Krylov on ``Zᵀ D Z``) or
      ``"low_rank"`` (rows only, exact small eigenproblem in ``range(Zᵀ)``).
    solver: ``"eigh"`` or ``"iterative"``.
    flops: estimated flops per layer.
    """

    form: str
    strategy: str
    solver: str
    flops: float


def plan_linear(num_tasks: int, fan_in: int, fan_out: int, c: int, *, rows: int | None,
                solver: str = "auto", strategy: str = "auto") -> LinearPlan:
    """The cheapest way (by flop count) to get the bases of one ``(in, out)`` layer with K tasks.

    Args:
      rows: rows per task when the statistics are stored as rows (``None``: Grams only).
      solver: ``"auto"``, ``"eigh"`` or ``"iterative"``.
      strategy: ``"auto"``, ``"explicit"``, ``"matrix_free"`` or ``"low_rank"`` (both need rows; low_rank is
        exact and possible when ``2(K−1)·rows + c < out``).
    """
    k, a, b = num_tasks, fan_in, fan_out
    candidates = []
    gram_build = k * k * (2.0 * a * a * b + 2.0 * a * b * b)
    rows_y = None if rows is None else k * k * 2.0 * rows * a * b
    builds = [("gram", gram_build)] + ([] if rows is None else [("rows", rows_y + k * k * 2.0 * rows * b * b)])
    if strategy in ("auto", "explicit"):
        for form, build in builds:
            for s in (("eigh", "iterative") if solver == "auto" else (solver,)):
                if s == "iterative" and choose_solver(b, max(c, 1)) == "eigh" and solver == "auto":
                    continue
                cfg = krylov_config(max(c, 1), b)
                solve = eigh_flops(b) if s == "eigh" else krylov_flops(b, cfg)
                candidates.append(LinearPlan(form, "explicit", s, build + k * solve))
    if rows is not None and strategy in ("auto", "matrix_free") and solver != "eigh" and c > 0:
        # Thin (p-column) products stream the whole operator per Krylov step: memory-bound, several times less
        # efficient per flop than the fat GEMMs that build G_k (measured ≈ 4–5× on CPU for 768 → 3072, K = 8).
        per_col = THIN_PRODUCT_PENALTY * 8.0 * k * rows * b
        cfg = krylov_config(c, b)
        if strategy == "matrix_free" or (cfg.block * (cfg.steps + 1) < b // 2 and b >= MIN_ITERATIVE_N):
            candidates.append(LinearPlan("rows", "matrix_free", "iterative",
                                         rows_y + k * krylov_flops(b, cfg, per_col)))
    if rows is not None and strategy in ("auto", "low_rank") and 2 * (k - 1) * rows + c < b:
        # exact: eigenvectors of G_k = Zᵀ D Z inside range(Zᵀ) plus c null directions (cat._low_rank_bases)
        m = 2 * (k - 1) * rows + c
        candidates.append(LinearPlan("rows", "low_rank", "eigh", rows_y + k * (4.0 * b * m * m + eigh_flops(m))))
    if not candidates:
        raise ValueError(f"no way to solve a ({a}, {b}) layer with strategy={strategy!r}, solver={solver!r}, "
                         f"rows={rows}")
    return min(candidates, key=lambda p: p.flops)


# ------------------------------------------------------------------------------------------------------------
# One group: (L, K, in, out) task vectors, (L, K, n, in) rows or (L, K, in, in) Grams.
# ------------------------------------------------------------------------------------------------------------


def _rows_operator(y: jax.Array, k: jax.Array, lam: Any) -> tuple[jax.Array, jax.Array]:
    """``(Z (2K·n, out), s (2K·n,))`` with ``G_k = Zᵀ diag(s) Z`` from ``y[k, i] = X_k T_i`` (K, K, n, out)."""
    num_tasks, _, n, out = y.shape
    others = (jnp.arange(num_tasks) != k).astype(y.dtype)
    own = jnp.einsum("iinb->inb", y)
    z = jnp.concatenate([y[k], own]).reshape(2 * num_tasks * n, out)
    s = jnp.repeat(jnp.concatenate([others, -lam * others]), n)
    return z, s


@functools.partial(jax.jit, static_argnames=("c", "plan", "batch_mode", "min_gap"))
def _group_bases(tvs: jax.Array, data: jax.Array, lam: Any, *, c: int, plan: LinearPlan, batch_mode: str = "auto",
                 min_gap: float | None = None):
    """``(bases (L, K, out, c), converged (L, K), unresolved (L, K))`` for one group (non-converged entries still
    to be fixed; ``unresolved``: the top-c eigengap is below the working precision's resolution)."""
    num_tasks, out = tvs.shape[1], tvs.shape[-1]
    config = krylov_config(c, out) if min_gap is None else krylov_config(c, out, min_gap=min_gap)

    def krylov_unresolved(res):
        floor = cat.GAP_FLOOR * jnp.finfo(res.values.dtype).eps * res.scale
        return (res.values[..., c - 1] > floor) & (res.gap <= floor)

    if plan.strategy == "low_rank":
        bases, unresolved = jax.vmap(lambda t, rows: cat._low_rank_bases_with_gap(t, rows, lam, c))(tvs, data)
        return bases, jnp.ones(bases.shape[:2], bool), unresolved

    if plan.strategy == "matrix_free":
        def layer(t, rows):
            y = jnp.einsum("kna,iab->kinb", rows, t)

            def task(k):
                z, s = _rows_operator(y, k, lam)
                return block_krylov_top(lambda v: z.T @ (s[:, None] * (z @ v)), c, n=out, config=config)

            res = map_batch(task, jnp.arange(num_tasks), mode=batch_mode)
            return res.vectors, res.converged, krylov_unresolved(res)

        return map_batch(lambda args: layer(*args), (tvs, data), mode=batch_mode)

    build = cat._conflict_matrices_from_rows if plan.form == "rows" else cat._conflict_matrices_from_grams
    g = jax.vmap(lambda t, d: build(t, d, lam))(tvs, data)  # (L, K, out, out)
    if plan.solver == "eigh":
        bases, unresolved = cat._top_with_gap(g, c)
        return bases, jnp.ones(g.shape[:2], bool), unresolved
    flat = g.reshape((-1,) + g.shape[2:])
    res = map_batch(lambda m: block_krylov_top(m, c, config=config), flat, mode=batch_mode)
    return (res.vectors.reshape(g.shape[:2] + res.vectors.shape[1:]), res.converged.reshape(g.shape[:2]),
            krylov_unresolved(res).reshape(g.shape[:2]))


def _conflict_one(t: jax.Array, d: jax.Array, k: jax.Array, lam: Any, form: str) -> jax.Array:
    """``G_k`` (out, out) of one layer for one task only (the fallback needs no other task's matrix)."""
    num_tasks = t.shape[0]
    others = (jnp.arange(num_tasks) != k).astype(t.dtype)
    if form == "rows":
        y = jnp.einsum("kna,iab->kinb", d, t)
        z, s = _rows_operator(y, k, lam)
        return z.T @ (s[:, None] * z)
    # Σ_{i≠k} T_iᵀ (A_k − λ A_i) T_i, one task-weighted Gram per i.
    mixed = d[k][None] - lam * d  # (K, in, in)
    return jnp.einsum("iab,iac,icd,i->bd", t, mixed, t, others)


@functools.partial(jax.jit, static_argnames=("c", "form"))
def _fallback_bases(tvs: jax.Array, data: jax.Array, tasks: jax.Array, lam: Any, *, c: int, form: str):
    """Eigh bases of ``G_k`` for the (layer, task) pairs given by ``tvs``/``data`` (M, K, ...) and ``tasks`` (M,)."""
    return jax.lax.map(lambda args: eigh_top(_conflict_one(*args, lam, form), c), (tvs, data, tasks))


def linear_group_bases(tvs: jax.Array, data: jax.Array, *, lam: float, c: int, plan: LinearPlan,
                       valid_layers: int | None = None, batch_mode: str = "auto",
                       counts: dict | None = None, min_gap: float | None = None,
                       strict_top_c: bool = False) -> jax.Array:
    """Removal bases ``(L, K, out, c)`` of a group of L same-shape linear layers.

    Args:
      tvs: ``(L, K, in, out)`` task vectors.
      data: ``(L, K, n, in)`` rows (``plan.form == "rows"``) or ``(L, K, in, in)`` Grams.
      plan: from :func:`plan_linear`.
      valid_layers: only the first this many layers are real (the rest is padding, never sent to eigh).
      batch_mode: ``"auto"``/``"vmap"``/``"map"`` for the iterative solves (:func:`catmerge_jax.linalg.map_batch`).
      counts: if a dict, ``"solves"`` and ``"fallbacks"`` (eigh re-solves) are added to it.
      min_gap: overrides :class:`catmerge_jax.linalg.KrylovConfig`'s ``min_gap`` (default 0: accept every
        subspace that converged to the working-precision floor with a resolvable gap; e.g. 1e-3 also defers
        near-tied matrices to eigh, reproducing the plain path's tie-breaking at eigh's cost).
      strict_top_c: keep every top-c direction even with eigenvalue ≤ 0 (default: :func:`cat.positive_directions`).
    Returns:
      The bases; every (layer, task) whose iterative solve did not converge is recomputed with eigh. When
      ``counts`` is a dict, ``counts["unresolved"]`` collects the ``(layer, task)`` pairs whose eigengap is below the
      working precision's resolution (concrete inputs only).
    """
    if c == 0:
        return jnp.zeros(tvs.shape[:2] + (tvs.shape[-1], 0), tvs.dtype)
    bases, converged, unresolved = _group_bases(tvs, data, lam, c=c, plan=plan, batch_mode=batch_mode,
                                                min_gap=min_gap)
    real = tvs.shape[0] if valid_layers is None else valid_layers
    if counts is not None and is_concrete(unresolved):
        counts.setdefault("unresolved", []).extend(
            (int(a), int(b)) for a, b in np.argwhere(np.asarray(_gather(unresolved))) if a < real)
    if counts is not None:
        counts["solves"] = counts.get("solves", 0) + real * tvs.shape[1]
    if plan.solver != "eigh":  # eigh solves are exact: nothing to check or redo
        if not is_concrete(converged):
            raise ValueError("solver='iterative' decides its eigh fallbacks on the host and needs concrete inputs; "
                             "under jax.jit/vmap/grad use solver='eigh' (the default there)")
        bad = np.argwhere(~np.asarray(_gather(converged)))
        bad = bad[bad[:, 0] < real]
        if counts is not None:
            counts["fallbacks"] = counts.get("fallbacks", 0) + len(bad)
        if len(bad):
            layers, tasks = bad[:, 0], bad[:, 1]
            fixed = _fallback_bases(tvs[layers], data[layers], jnp.asarray(tasks), lam, c=c, form=plan.form)
            bases = bases.at[layers, tasks].set(fixed)
    # once, on the final bases (fallbacks included)
    return bases if strict_top_c else _positive(tvs, data, bases, lam, form=plan.form)


@functools.partial(jax.jit, static_argnames=("form",))
def _positive(tvs: jax.Array, data: jax.Array, bases: jax.Array, lam: Any, *, form: str) -> jax.Array:
    """:func:`catmerge_jax.cat.positive_directions` for every layer of a group ``(L, K, ...)``."""
    return jax.vmap(lambda t, d, b: cat.positive_directions(t, d, b, lam=lam, form=form))(tvs, data, bases)


@functools.partial(jax.jit, static_argnames=("joint",))
def linear_group_apply(tvs: jax.Array, bases: jax.Array, *, joint: bool = False) -> jax.Array:
    """Trimmed task vectors ``(L, K, in, out)`` (sequential Algorithm 1, or the order-free ``joint`` projection)."""
    apply = cat.apply_cat_linear_joint if joint else cat.apply_cat_linear
    return jax.vmap(apply)(tvs, bases)


# ------------------------------------------------------------------------------------------------------------
# Whole tree.
# ------------------------------------------------------------------------------------------------------------


class _LinearLeaf(NamedTuple):
    index: tuple[int, int]  # (leaf, layer within the leaf)
    shape: tuple[int, ...]
    tvs: jax.Array  # (K, in, out)
    form: str
    data: jax.Array


def _chunks(items: list, per_item_bytes: int, budget: int, multiple: int) -> list[list]:
    size = max(1, budget // max(per_item_bytes, 1))
    size = max(multiple, size - size % multiple) if multiple > 1 else size
    return [items[i:i + size] for i in range(0, len(items), size)]


def _gather(x: jax.Array) -> jax.Array:
    """A sharded group result as one array on the default device (all processes' shards on multi-host)."""
    if x.is_fully_addressable:
        return jnp.asarray(np.asarray(x))
    from jax.experimental import multihost_utils

    return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))


def _rescale(before: jax.Array, trimmed: jax.Array) -> jax.Array:
    axes = tuple(range(1, trimmed.ndim))
    b = jnp.sqrt(jnp.sum(before ** 2, axis=axes, keepdims=True))
    a = jnp.sqrt(jnp.sum(trimmed ** 2, axis=axes, keepdims=True))
    return jnp.where(a > 0, trimmed * b / jnp.where(a > 0, a, 1.0), trimmed)


@functools.partial(jax.jit, static_argnames=("joint", "rescale_norm"))
def _group_update(tvs: jax.Array, bases: jax.Array, *, joint: bool, rescale_norm: bool) -> jax.Array:
    """``Σ_i T̃_i`` per layer ``(L, in, out)``: trimming, optional norm rescaling and the task sum in one call, so
    the ``(L, K, in, out)`` trimmed stack never leaves the computation (it is K times the output's size)."""
    trimmed = linear_group_apply(tvs, bases, joint=joint)
    if rescale_norm:
        trimmed = jax.vmap(_rescale)(tvs, trimmed)
    # An explicit loop of adds: XLA:CPU's reduce over this middle axis ran ~25× slower (0.2 s for 8 × 768 × 3072).
    return jax.lax.fori_loop(1, trimmed.shape[1], lambda k, acc: acc + trimmed[:, k], trimmed[:, 0])


@jax.jit
def _combine(base: jax.Array, update: jax.Array, alpha: jax.Array) -> jax.Array:
    """``W0 + α Σ_i T̃_i`` in the wider of the leaf dtype and float32, cast back."""
    compute = compute_dtype(base.dtype) if jnp.issubdtype(base.dtype, jnp.floating) else jnp.dtype(jnp.float32)
    return (base.astype(compute) + alpha.astype(compute) * update.astype(compute)).astype(base.dtype)


def cat_merge_batched(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree], *,
                      alpha: float = 0.3, lam: float = 5.0, c: int = 3, roles: Overrides = None,
                      joint: bool = False, rescale_norm: bool = False, scale_lam: float | None = None,
                      scale_c: int | None = None, shift_lam: float | None = None, shift_c: int | None = None,
                      normalize_by_count: bool = False, scale_per_row_mean: bool = False,
                      trim_linear: bool = True, trim_scale: bool = True, trim_shift: bool = True,
                      solver: str = "auto", strategy: str = "auto", max_group_bytes: int = 1 << 30,
                      place: Placement | None = None, layer_multiple: int = 1, batch_mode: str = "auto",
                      min_gap: float | None = None, strict_top_c: bool = False,
                      progress: bool = False,
                      timings: dict | None = None) -> PyTree:
    """:func:`catmerge_jax.cat.cat_merge` with batched linear layers and cost-chosen fast paths.

    Args (beyond ``cat_merge``'s, which mean the same):
      solver: ``"auto"`` | ``"eigh"`` | ``"iterative"`` top-c solver for the linear bases.
      strategy: ``"auto"`` | ``"explicit"`` | ``"matrix_free"`` (see module docstring).
      max_group_bytes: memory budget of one batched call (layers are chunked to fit).
      place: applied to every stacked group array ``(L, ...)`` before the batched calls (e.g.
        :func:`catmerge_jax.sharding.layer_placement`), identity when None.
      layer_multiple: chunks hold a multiple of this many layers, zero-padded (the device count when sharding).
      min_gap: smallest relative eigengap the iterative solver accepts (see :func:`linear_group_bases`).
      batch_mode: how iterative solves are batched (``"vmap"`` when sharding; ``"auto"``: sequential on CPU).
      progress: progress bar over groups.
      timings: if a dict, receives seconds spent in ``"prepare"``, ``"bases"`` (incl. masks), ``"apply"``, the
        number of linear ``"solves"`` and of iterative ones that fell back to eigh (``"fallbacks"``), and per
        linear group (``"groups"``: shape, layer count, chosen plan, fallbacks, bases seconds).
    Returns:
      The merged params (same structure and dtypes as ``pretrained``).
    """
    t_start = time.perf_counter()
    table = cat._cat_table(lam, c, scale_lam=scale_lam, scale_c=scale_c, shift_lam=shift_lam, shift_c=shift_c,
                           joint=joint, normalize_by_count=normalize_by_count, scale_per_row_mean=scale_per_row_mean,
                           rescale_norm=rescale_norm, trim_linear=trim_linear, trim_scale=trim_scale,
                           trim_shift=trim_shift)
    cat._check_hparams(alpha, None)
    cat._warn_if_no_linear(pretrained, roles, trim_linear)
    inputs = cat.tree_inputs(pretrained, finetuned, stats, roles=roles)
    # Under jit/vmap/grad the plan stays shape-based, but the iterative solver's acceptance and eigh fallback are
    # host-side decisions on values: traced merges solve with eigh (or the exact low-rank path).
    traced = not is_concrete(([leaf.task_vectors for leaf in inputs.leaves], stats, alpha, lam))
    if traced and solver == "auto":
        solver = "eigh"
    clock: dict = {"prepare": 0.0, "bases": 0.0, "apply": 0.0, "solves": 0, "fallbacks": 0, "groups": []}

    update_by_index: dict[int, jax.Array] = {}  # Σ_i T̃_i per leaf
    unresolved_leaves: set[str] = set()
    layer_updates: dict[int, dict[int, jax.Array]] = {}  # per multi-layer leaf: layer -> Σ_i T̃_i (in, out)
    groups: dict[tuple, list[_LinearLeaf]] = {}
    for j, leaf in enumerate(inputs.leaves):
        if leaf.spec.role is Role.LINEAR and trim_linear:
            mats = leaf.spec.matrices(leaf.task_vectors, lead=1)  # (K, layers, in, out)
            cat._check_c(c, mats.shape[-1], leaf.path)
            form, data = cat.linear_inputs(leaf, normalize_by_count)  # (K, layers, ...)
            layer_updates[j] = {}
            for layer in range(mats.shape[1]):
                key = (form, (mats.shape[0],) + mats.shape[2:], data.shape[:1] + data.shape[2:], str(mats.dtype))
                groups.setdefault(key, []).append(_LinearLeaf((j, layer), leaf.task_vectors.shape, mats[:, layer],
                                                              form, data[:, layer]))
        else:
            t0 = time.perf_counter()
            trimmer = table.get(leaf.spec.role, cat.identity_trimmer())
            update_by_index[j] = trimmer.apply(leaf, trimmer.init(leaf)).sum(0)
            clock["bases"] += time.perf_counter() - t0
    clock["prepare"] += time.perf_counter() - t_start - clock["bases"]

    iterator = list(groups.items())
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="CAT merge (batched groups)", unit="group")
    sharded = place is not None
    place = (lambda x: x) if place is None else place
    for (form, (num_tasks, fan_in, fan_out), data_shape, _), members in iterator:
        plan = plan_linear(num_tasks, fan_in, fan_out, c, rows=data_shape[1] if form == "rows" else None,
                           solver=solver, strategy=strategy)
        if form == "gram" and plan.form == "rows":  # rows are not available for this group
            plan = plan_linear(num_tasks, fan_in, fan_out, c, rows=None, solver=solver, strategy="explicit")
        per_layer = 4 * num_tasks * (3 * fan_in * fan_out + int(np.prod(data_shape)) + 2 * fan_out * fan_out)
        group_start, fallbacks_before = clock["bases"], clock["fallbacks"]
        for chunk in _chunks(members, per_layer, max_group_bytes, layer_multiple):
            t0 = time.perf_counter()
            pad = (-len(chunk)) % layer_multiple
            tvs = jnp.stack([m.tvs for m in chunk] + [jnp.zeros_like(chunk[0].tvs)] * pad)
            data = jnp.stack([m.data for m in chunk] + [jnp.zeros_like(chunk[0].data)] * pad)
            tvs, data = place(tvs), place(data)
            bases = linear_group_bases(tvs, data, lam=lam, c=c, plan=plan, valid_layers=len(chunk),
                                       batch_mode=batch_mode, counts=clock,
                                       min_gap=min_gap, strict_top_c=strict_top_c)
            if not traced:
                bases.block_until_ready()
            t1 = time.perf_counter()
            update = _group_update(tvs, bases, joint=joint, rescale_norm=rescale_norm)
            if not traced:
                update.block_until_ready()
            clock["bases"] += t1 - t0
            clock["apply"] += time.perf_counter() - t1
            if sharded:
                update = _gather(update)
            for i, m in enumerate(chunk):
                leaf_index, layer = m.index
                layer_updates[leaf_index][layer] = update[i]
            for layer_in_chunk, _task in clock.pop("unresolved", []):
                unresolved_leaves.add(inputs.leaves[chunk[layer_in_chunk].index[0]].path)
        clock["groups"].append({"shape": (fan_in, fan_out), "layers": len(members), "form": plan.form,
                                "strategy": plan.strategy, "solver": plan.solver,
                                "fallbacks": clock["fallbacks"] - fallbacks_before,
                                "bases_seconds": clock["bases"] - group_start})

    t0 = time.perf_counter()
    for j, parts in layer_updates.items():
        stacked = jnp.stack([parts[layer] for layer in range(len(parts))])  # (layers, in, out)
        update_by_index[j] = inputs.leaves[j].spec.from_matrices(stacked, inputs.leaves[j].task_vectors.shape[1:])
    alpha_arr = jnp.asarray(alpha)
    merged = [_combine(base, update_by_index[j], alpha_arr) for j, base in enumerate(inputs.bases)]
    if not traced:
        jax.block_until_ready(merged)
    clock["apply"] += time.perf_counter() - t0
    if unresolved_leaves:
        with cat.one_gap_warning():
            for path in sorted(unresolved_leaves):
                warnings.warn(cat.UnresolvedGapWarning(path))
    if timings is not None:
        timings.update(clock)
    return inputs.rebuild(jax.tree.unflatten(inputs.treedef, merged))
