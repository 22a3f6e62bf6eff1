"""Consensus Merging with TALL masks (Wang et al., ICML 2024, "Localizing Task Information for Improved Model
Merging and Compression").

A TALL mask marks the parameters where task t's own vector matters more than what the other tasks add there::

    m_t = [ |τ_t| > λ_t |τ_MTL − τ_t| ],        τ_MTL = the multi-task vector (Σ_t τ_t, or the TIES vector)

A parameter used by fewer than k tasks is either *selfish* (used by one task only) or *catastrophic* (by none);
Consensus Merging removes both from the multi-task vector::

    M = [ Σ_t m_t ≥ k ],        W = W0 + α (M ∘ τ_MTL)

Defaults: k = 2 (the paper's choice, removing selfish and catastrophic weights); λ = 0.4 for every task (the
authors pick λ_t per task on validation data from {0.2, …, 0.6}; without validation data we use the middle of
that grid — pass a list of K values to set each); α = 0.3, the task-arithmetic scale. The comparison is the
strict ``>`` of the authors' released code (the paper prints ``≥``; they differ only on exact ties, where the
strict form does not count a parameter that task t never changed as "used by t").

With ``base="ties"`` the multi-task vector is TIES-Merging's (top ``ties_k`` of each task by magnitude over the
whole model, elected sign, disjoint ``ties_agg`` — "sum" as the released consensus code, or "mean").

>>> import jax.numpy as jnp
>>> from catmerge_jax.methods.consensus import consensus_merge
>>> w0 = {"w": jnp.zeros(3)}
>>> fts = [{"w": jnp.array([1.0, 1.0, 0.0])}, {"w": jnp.array([1.0, 0.0, 1.0])}, {"w": jnp.array([1.0, 0.0, 0.0])}]
>>> consensus_merge(w0, fts, k=2, lam=0.4, alpha=1.0)["w"].tolist()   # entries 1, 2 are selfish
[3.0, 0.0, 0.0]

Under ``jax.jit``/``vmap``/``grad``: params, ``alpha`` and ``lam`` (one value or K) may be traced; ``k``, ``base``,
``ties_k`` and ``ties_agg`` stay static Python values (``ties_k`` fixes which order statistic trims each task). The
masks are piecewise constant, so ``d/dα`` is the masked multi-task vector and ``d/dλ`` is zero almost everywhere.
NaN/Inf and ``lam >= 0`` checks run only on concrete inputs.

>>> import jax
>>> jax.jit(lambda lam: consensus_merge(w0, fts, k=2, lam=lam, alpha=1.0))(0.4)["w"].tolist()
[3.0, 0.0, 0.0]
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.cat import check_scalar
from catmerge_jax.errors import HyperparameterError
from catmerge_jax.methods.basic import ties_disjoint_merge
from catmerge_jax.methods.pcb import flatten_tasks, merge_inputs, order_statistics, stack_task_vectors, static_number
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.tree import PyTree, is_tracer


@jax.jit
def tall_mask(task_vectors: jax.Array, mtl_vector: jax.Array, lam: jax.Array) -> jax.Array:
    """TALL masks of one leaf.

    Args:
      task_vectors: ``(K, ...)`` τ_t.
      mtl_vector: ``(...)`` τ_MTL.
      lam: ``(K,)`` λ_t.
    Returns:
      ``(K, ...)`` bool: ``|τ_t| > λ_t |τ_MTL − τ_t|``.
    """
    lam = lam.reshape((-1,) + (1,) * (task_vectors.ndim - 1))
    return jnp.abs(task_vectors) > lam * jnp.abs(mtl_vector[None] - task_vectors)


@jax.jit
def consensus_mask(masks: jax.Array, k: int | jax.Array) -> jax.Array:
    """``(K, ...)`` bool TALL masks → ``(...)`` bool: used by at least ``k`` tasks."""
    return masks.sum(0) >= k


def _ties_vectors(tvs: list[jax.Array], keep: float, agg: str) -> list[jax.Array]:
    """TIES multi-task vector per leaf from ``(K, ...)`` task vectors: model-wide top-``keep`` trim, elect, merge."""
    flat = jnp.abs(flatten_tasks(tvs))
    n_keep = int(math.ceil(keep * flat.shape[1]))
    if n_keep <= 0:
        return [jnp.zeros(t.shape[1:], t.dtype) for t in tvs]
    threshold = order_statistics(flat, [flat.shape[1] - n_keep])[:, 0]   # the n_keep-th largest |τ| per task
    del flat
    return [_ties_leaf(t, threshold, agg=agg) for t in tvs]


@functools.partial(jax.jit, static_argnames=("agg",))
def _ties_leaf(task_vectors: jax.Array, threshold: jax.Array, *, agg: str) -> jax.Array:
    trimmed = jnp.where(jnp.abs(task_vectors) >= threshold.reshape((-1,) + (1,) * (task_vectors.ndim - 1)),
                        task_vectors, 0)
    if agg == "mean":
        return ties_disjoint_merge(trimmed)
    sign = jnp.sign(trimmed.sum(0))
    agree = (jnp.sign(trimmed) == sign[None]) & (trimmed != 0)
    return jnp.where(agree, trimmed, 0).sum(0)


def _lambdas(lam: float | Sequence[float] | jax.Array, num_tasks: int) -> jax.Array:
    """``(K,)`` λ_t from one value or K values (a list, an array, or a traced array; its values checked if concrete)."""
    expected = f"TALL-mask lam must be one value >= 0 or {num_tasks} values >= 0 (one per task), got {lam!r}"
    try:
        values = jnp.stack([jnp.asarray(v) for v in lam]) if isinstance(lam, (list, tuple)) else jnp.asarray(lam)
    except (TypeError, ValueError):
        raise HyperparameterError(expected) from None
    if values.size == 1:
        values = jnp.broadcast_to(values.reshape(()), (num_tasks,))
    if values.shape != (num_tasks,):
        raise HyperparameterError(expected)
    if not (jnp.issubdtype(values.dtype, jnp.floating) or jnp.issubdtype(values.dtype, jnp.integer)) or \
            values.dtype == jnp.bool_:
        raise HyperparameterError(expected)
    if not is_tracer(values):
        host = np.asarray(values, np.float64)
        if not np.all(np.isfinite(host)) or np.any(host < 0):
            raise HyperparameterError(expected)
    return values


def _task_vector_columns(pretrained: PyTree, finetuned: Sequence[PyTree]) -> tuple[list, Any, list[jax.Array]]:
    base_leaves, treedef = jax.tree.flatten(pretrained)
    columns = list(zip(*[jax.tree.leaves(t) for t in finetuned]))
    tvs = [stack_task_vectors(jnp.asarray(b), col) for b, col in zip(base_leaves, columns)]
    return base_leaves, treedef, tvs


def _mtl_vectors(tvs: list[jax.Array], base: str, ties_k: float, ties_agg: str) -> list[jax.Array]:
    if base not in ("task_arithmetic", "ties"):
        raise HyperparameterError(f"consensus base must be 'task_arithmetic' or 'ties', got {base!r}")
    if base == "ties":
        if not 0.0 <= static_number("ties_k", ties_k, "how many entries of each task TIES keeps") <= 1.0:
            raise HyperparameterError(f"ties_k (fraction kept) must be in [0, 1], got {ties_k}")
        if ties_agg not in ("sum", "mean"):
            raise HyperparameterError(f"ties_agg must be 'sum' or 'mean', got {ties_agg!r}")
    if base == "task_arithmetic":
        return [_task_sum(t) for t in tvs]
    return _ties_vectors(tvs, float(ties_k), ties_agg)


@jax.jit
def _task_sum(task_vectors: jax.Array) -> jax.Array:
    return task_vectors.sum(0)


@jax.jit
def _consensus_leaf(base: jax.Array, tvs: jax.Array, mtl: jax.Array, lam: jax.Array, k: int,
                    alpha: float | jax.Array) -> jax.Array:
    keep = consensus_mask(tall_mask(tvs, mtl, lam.astype(tvs.dtype)), k)
    scale = jnp.asarray(alpha).astype(tvs.dtype)
    return (base.astype(tvs.dtype) + scale * jnp.where(keep, mtl, 0)).astype(base.dtype)


def tall_masks(pretrained: PyTree, finetuned: Sequence[PyTree], *, lam: float | Sequence[float] = 0.4,
               base: str = "task_arithmetic", ties_k: float = 0.2, ties_agg: str = "sum") -> list[PyTree]:
    """The K TALL masks, ``m_t = |τ_t| > λ_t |τ_MTL − τ_t|``.

    Inputs as :func:`consensus_merge`. Each mask is a plain bool tree like the params tree (for a module:
    ``nnx.state(m, nnx.Param)`` / ``eqx.filter(m, eqx.is_inexact_array)``), as ``cm.cat_trim``'s outputs are.
    """
    view, fts = merge_inputs(pretrained, finetuned)
    lams = _lambdas(lam, len(fts))
    _, treedef, tvs = _task_vector_columns(view.params, fts)
    mtl = _mtl_vectors(tvs, base, ties_k, ties_agg)
    per_leaf = [tall_mask(t, v, lams.astype(t.dtype)) for t, v in zip(tvs, mtl)]
    return [jax.tree.unflatten(treedef, [m[k] for m in per_leaf]) for k in range(len(fts))]


def consensus_merge(pretrained: PyTree, finetuned: Sequence[PyTree], *, k: int = 2,
                    lam: float | Sequence[float] = 0.4, alpha: float = 0.3, base: str = "task_arithmetic",
                    ties_k: float = 0.2, ties_agg: str = "sum", progress: bool = False) -> PyTree:
    """Consensus Merging: ``W0 + α ([Σ_t m_t ≥ k] ∘ τ_MTL)``.

    Args:
      pretrained: W0: a params pytree, an ``nnx.Module`` or an ``equinox.Module``.
      finetuned: K trees of the same kind.
      k: minimum number of tasks whose TALL mask must hold a parameter (integer ≥ 0; 0 keeps everything, k > K
        removes everything).
      lam: λ ≥ 0 of the TALL masks, one value or K values; may be traced.
      alpha: scale of the masked multi-task vector; may be traced (``jit``/``vmap``/``grad``).
      base: ``"task_arithmetic"`` (τ_MTL = Σ τ_t) or ``"ties"``.
      ties_k, ties_agg: TIES fraction kept and disjoint aggregation when ``base="ties"``.
      progress: tqdm bar over leaves.
    Returns:
      The merged params, same structure and dtypes as ``pretrained`` (a module for a module).
    """
    view, fts = merge_inputs(pretrained, finetuned)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise HyperparameterError(f"consensus k (minimum number of tasks) must be a static Python integer >= 0, "
                                  f"got {k!r}")
    check_scalar("alpha", alpha)
    lams = _lambdas(lam, len(fts))
    base_leaves, treedef, tvs = _task_vector_columns(view.params, fts)
    mtl = _mtl_vectors(tvs, base, ties_k, ties_agg)
    indices = range(len(base_leaves))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="consensus merge", unit="leaf")
    merged = [_consensus_leaf(jnp.asarray(base_leaves[j]), tvs[j], mtl[j], lams, int(k), alpha) for j in indices]
    return view.rebuild(jax.tree.unflatten(treedef, merged))


def _merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
    """Registry adapter for :func:`consensus_merge` (needs no statistics)."""
    return consensus_merge(pretrained, finetuned, progress=progress, **hparams)


register(MergeMethod("consensus", _merge, {"k": 2, "lam": 0.4, "alpha": 0.3, "base": "task_arithmetic"},
                     description="Consensus Merging with TALL masks (Wang et al., 2024)", scale_name="alpha"))

__all__ = ["consensus_merge", "tall_masks", "tall_mask", "consensus_mask"]
