"""TATR — Task Arithmetic in Trust Region (Sun et al., 2025).

Adding task vector ``τ_j`` changes task i's loss by about ``∇L_i · τ_j`` (first order). TATR scores every
parameter by how much the other tasks' vectors can move each task's loss through it::

    Ω = Σ_i Σ_{j≠i} |g_i| ∘ |τ_j|        (elementwise over the whole model)

and merges only inside the *trust region*, the parameters with small Ω::

    M = [Ω ≤ t],   t = the ⌈q·P⌉-th smallest Ω over all P parameters,     W = W0 + α Σ_k M ∘ τ_k

* gradient mode: ``g_i`` is a per-task gradient of task i's loss at the pretrained model, given as a tree
  (e.g. :func:`mean_abs_gradient`, FusionBench's mean of per-example |∇|);
* zero-shot mode: fine-tuning accumulates ``τ_i ≈ −η Σ ∇L_i``, so ``|τ_i|`` stands in for ``|g_i|`` and no data
  is needed.

Defaults (α = 0.3, q = 0.99: the 1% most conflicting parameters leave the merge) follow the FusionBench port of
the authors' method. The threshold is global over the model; ties with it are kept, so a parameter with zero
conflict is always inside the trust region. (A public port keyed its per-task gradients by a loop variable, so
the K tasks collapsed to one dictionary entry, Ω was all zeros and a strict ``Ω < t`` removed every parameter —
silently returning the pretrained model. Here Ω = 0 keeps everything, and the gradients are a K-list by
construction.) With K = 1 there is nothing to conflict with and TATR is task arithmetic.

>>> import jax.numpy as jnp
>>> from catmerge_jax.methods.tatr import tatr_merge
>>> w0 = {"w": jnp.zeros(4)}
>>> fts = [{"w": jnp.array([1.0, 0.0, 2.0, 0.0])}, {"w": jnp.array([0.0, 1.0, 2.0, 0.0])}]
>>> tatr_merge(w0, fts, alpha=1.0, quantile=0.75)["w"].tolist()   # zero-shot: index 2 conflicts most
[1.0, 1.0, 0.0, 0.0]

Under ``jax.jit``/``vmap``/``grad``: params, ``grads`` and ``alpha`` may be traced; ``quantile`` fixes which order
statistic is the threshold (an array position) and stays a static Python number. The mask is piecewise constant,
so ``d/dα`` is ``Σ_k M ∘ τ_k``. NaN/Inf checks on weights and gradients run only on concrete inputs.

>>> import jax
>>> jax.grad(lambda a: tatr_merge(w0, fts, alpha=a, quantile=0.75)["w"].sum())(0.5).tolist()
2.0
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.cat import check_scalar
from catmerge_jax.errors import HyperparameterError, MissingStatisticsError
from catmerge_jax.methods.fisher import per_example_gradient_mean
from catmerge_jax.methods.pcb import flatten_tasks, merge_inputs, order_statistics, per_task_trees, static_number
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.tree import PyTree, check_finite, check_same_structure


def _compute_dtype(x: Any) -> np.dtype:
    """float32 for narrower floats (bf16/f16 are computed in float32), else the leaf's own float dtype."""
    dt = np.dtype(jnp.result_type(x))
    return dt if jnp.issubdtype(dt, jnp.floating) and dt.itemsize >= 4 else np.dtype(np.float32)


def mean_abs_gradient(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, examples: PyTree, *,
                      batch_size: int | None = None, progress: bool = False) -> PyTree:
    """``(1/N) Σ_n |∇θ ℓ(θ, x_n)|``: one task's gradient magnitude for TATR's gradient mode (``vmap(grad)``).

    Call it once per task with that task's loss and examples at the pretrained params.
    """
    return per_example_gradient_mean(loss_fn, params, examples, transform=jnp.abs, batch_size=batch_size,
                                     progress=progress)


@jax.jit
def conflict_scores(abs_grads: jax.Array, abs_task_vectors: jax.Array) -> jax.Array:
    """``Ω = Σ_i |g_i| ∘ Σ_{j≠i} |τ_j|`` for one leaf.

    Args:
      abs_grads: ``(K, ...)`` |g_i|.
      abs_task_vectors: ``(K, ...)`` |τ_j|.
    Returns:
      ``(...)`` conflict scores Ω ≥ 0.
    """
    others = abs_task_vectors.sum(0)[None] - abs_task_vectors
    return jnp.sum(abs_grads * others, axis=0)


def trust_region_threshold(scores: Sequence[jax.Array], quantile: float) -> jax.Array:
    """The ``⌈q·P⌉``-th smallest of all ``P`` entries of ``scores`` (−inf when that is zero entries)."""
    flat = flatten_tasks([s[None] for s in scores])
    n_keep = min(int(math.ceil(quantile * flat.size)), flat.size)
    if n_keep <= 0:
        return jnp.asarray(-jnp.inf, flat.dtype)
    return order_statistics(flat, [n_keep - 1])[0, 0]


def trust_region_masks(pretrained: PyTree, finetuned: Sequence[PyTree], grads: Sequence[PyTree] | None = None, *,
                       quantile: float = 0.99) -> PyTree:
    """The boolean trust-region mask ``M``, zero-shot when ``grads`` is None.

    Inputs as :func:`tatr_merge`. The mask is a plain tree like the params tree (for a module:
    ``nnx.state(m, nnx.Param)`` / ``eqx.filter(m, eqx.is_inexact_array)``), as ``cm.cat_trim``'s outputs are.
    """
    view, fts = merge_inputs(pretrained, finetuned)
    return _masks(view.params, fts, _gradient_trees(view.params, grads, len(fts)), quantile)


def _gradient_trees(params: PyTree, grads: Any, num_tasks: int) -> list[PyTree] | None:
    if grads is None:
        return None
    grads = per_task_trees(grads, "grads (TATR gradient mode)", num_tasks, "gradient tree")
    for k, g in enumerate(grads):
        check_same_structure(params, g, what=f"grads[{k}]", check_dtype=False)
        check_finite(g, what=f"grads[{k}]")
    return grads


def _masks(params: PyTree, finetuned: list[PyTree], grads: list[PyTree] | None, quantile: float) -> PyTree:
    q = static_number("TATR quantile", quantile, "how many parameters are inside the trust region")
    if not 0.0 <= q <= 1.0:
        raise HyperparameterError(f"TATR quantile (fraction of parameters in the trust region) must be in [0, 1], "
                                  f"got {quantile}")
    base_leaves, treedef = jax.tree.flatten(params)
    columns = list(zip(*[jax.tree.leaves(t) for t in finetuned]))
    grad_columns = None if grads is None else list(zip(*[jax.tree.leaves(g) for g in grads]))
    scores = [_leaf_scores(base, columns[j], None if grad_columns is None else grad_columns[j])
              for j, base in enumerate(base_leaves)]
    threshold = trust_region_threshold(scores, q)
    return jax.tree.unflatten(treedef, [s <= threshold.astype(s.dtype) for s in scores])


@jax.jit
def _leaf_scores(base: jax.Array, weights: Sequence[jax.Array], grads: Sequence[jax.Array] | None) -> jax.Array:
    dt = _compute_dtype(base)
    tau = jnp.abs(jnp.stack([w.astype(dt) - base.astype(dt) for w in weights]))
    g = tau if grads is None else jnp.abs(jnp.stack([x.astype(dt) for x in grads]))
    return conflict_scores(g, tau)


@jax.jit
def _masked_task_arithmetic(base: jax.Array, weights: Sequence[jax.Array], mask: jax.Array,
                            alpha: float | jax.Array) -> jax.Array:
    dt = _compute_dtype(base)
    w0 = base.astype(dt)
    total = sum(w.astype(dt) - w0 for w in weights)
    return (w0 + jnp.asarray(alpha).astype(dt) * jnp.where(mask, total, 0)).astype(base.dtype)


def tatr_merge(pretrained: PyTree, finetuned: Sequence[PyTree], grads: Sequence[PyTree] | None = None, *,
               alpha: float = 0.3, quantile: float = 0.99, progress: bool = False) -> PyTree:
    """``W0 + α Σ_k M ∘ τ_k`` with the trust-region mask M.

    Args:
      pretrained: W0: a params pytree, an ``nnx.Module`` or an ``equinox.Module``.
      finetuned: K trees of the same kind.
      grads: K gradient trees (gradient mode; their absolute values are used) or None (zero-shot mode: |τ_i|).
        For module inputs: modules holding the gradients, or their params trees (``nnx.state(m, nnx.Param)``,
        ``eqx.filter(m, eqx.is_inexact_array)``).
      alpha: task-arithmetic scale α; may be traced (``jit``/``vmap``/``grad``).
      quantile: fraction q ∈ [0, 1] of parameters inside the trust region (0.99); a static Python number.
      progress: tqdm bar over leaves while merging.
    Returns:
      The merged params, same structure and dtypes as ``pretrained`` (a module for a module).
    """
    check_scalar("alpha", alpha)
    view, fts = merge_inputs(pretrained, finetuned)
    masks = jax.tree.leaves(_masks(view.params, fts, _gradient_trees(view.params, grads, len(fts)), quantile))
    base_leaves, treedef = jax.tree.flatten(view.params)
    columns = list(zip(*[jax.tree.leaves(t) for t in fts]))
    indices = range(len(base_leaves))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="TATR merge", unit="leaf")
    merged = [_masked_task_arithmetic(jnp.asarray(base_leaves[j]), columns[j], masks[j], alpha)
              for j in indices]
    return view.rebuild(jax.tree.unflatten(treedef, merged))


def _merge_gradient(pretrained, finetuned, *, stats=None, roles=None, progress=False, grads=None, **hparams):
    """Registry adapter, gradient mode: ``grads=[g_1, ..., g_K]`` is required."""
    if grads is None:
        raise MissingStatisticsError("TATR gradient mode needs grads=[g_1, ..., g_K] (per-task gradient trees at the "
                                     "pretrained model, e.g. catmerge_jax.methods.tatr.mean_abs_gradient); use "
                                     "'tatr_zero_shot' without data")
    return tatr_merge(pretrained, finetuned, grads, progress=progress, **hparams)


def _merge_zero_shot(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
    """Registry adapter, zero-shot mode (|τ| as the gradient proxy)."""
    return tatr_merge(pretrained, finetuned, None, progress=progress, **hparams)


register(MergeMethod("tatr", _merge_gradient, {"alpha": 0.3, "quantile": 0.99}, extras=("grads",), scale_name="alpha",
                     description="Task Arithmetic in Trust Region (Sun et al., 2025), gradient mode"))
register(MergeMethod("tatr_zero_shot", _merge_zero_shot, {"alpha": 0.3, "quantile": 0.99}, scale_name="alpha",
                     description="Task Arithmetic in Trust Region, zero-shot mode (|task vector| as gradient proxy)"))

__all__ = ["tatr_merge", "trust_region_masks", "trust_region_threshold", "conflict_scores", "mean_abs_gradient"]
