"""PCB-Merging — Parameter Competition Balancing (Du et al., NeurIPS 2024).

Each task vector entry gets a balancing score from how it competes within its own task (intra) and with the
other tasks (inter); low scores are dropped and the rest weight a per-parameter average. The rules, exactly as
in the authors' released ``pcb-merging.py`` (their "key steps" file; every quantity is taken over the whole
model, all P parameters of a task concatenated):

1. outlier clipping: ``a_i = clip(|τ_i|, lo_i, hi_i)`` with ``lo_i``/``hi_i`` the ``⌊P·c⌋``-th smallest and
   ``⌊P(1−c)⌋``-th smallest entries of ``|τ_i|`` (``c`` = ``clip_ratio``, 1e-4); ``τ̂_i = sign(τ_i) a_i``;
2. intra-balancing: ``β_intra,i = exp(K · Norm(a_i)²)`` — the paper's ``Softmax(K · Norm(τ_i ∘ τ_i))`` up to a
   per-task constant, which step 5 cancels (``Norm`` is min–max over the task's P entries);
3. inter-balancing: ``β_inter,i = tanh(τ_i ∘ Σ_j τ_j)`` (the released form of the paper's sum over j of
   ``Softmax(Norm(τ_i ∘ τ_j))``: positive where τ_i agrees with the other tasks, negative where it fights them);
4. ``β_i = β_intra,i ∘ β_inter,i``;
5. drop and rescale: ``t_i`` = the ``⌊P(1−r)⌋``-th smallest β_i (r = ``keep_ratio``, 0.1);
   ``s_i = (max(β_i, t_i) − t_i) / (max β_i − t_i)`` — zero for every entry at or below ``t_i``, so about a
   fraction r of each task survives (exactly ``P − ⌊P(1−r)⌋ − 1`` entries when scores are distinct);
6. ``τ_m = Σ_i s_i ∘ τ̂_i / max(Σ_i s_i, 1e-12)`` and ``W = W0 + α τ_m`` (α = 1: τ_m is a weighted mean).

(The paper speaks of a *drop* ratio; the released code's ``pcb_ratio`` — our ``keep_ratio`` — is the fraction
*kept*, 0.1 by default, 0.05 in their ViT script.)

>>> import jax.numpy as jnp
>>> from catmerge_jax.methods.pcb import pcb_merge
>>> w0 = {"w": jnp.zeros(8)}
>>> fts = [{"w": jnp.arange(8.0)}, {"w": jnp.arange(8.0)[::-1]}]
>>> m = pcb_merge(w0, fts, keep_ratio=0.5, clip_ratio=0.0)
>>> m["w"].tolist()          # each task keeps its 3 largest entries (P − ⌊P·0.5⌋ − 1)
[7.0, 6.0, 5.0, 0.0, 0.0, 5.0, 6.0, 7.0]

Under ``jax.jit``/``vmap``/``grad``: params and ``alpha`` may be traced; ``keep_ratio`` and ``clip_ratio`` fix which
order statistics are read (array positions) and stay static Python numbers. Traced inputs sort on the device
instead of the host's linear-time selection (same entries, exact); the NaN/Inf checks run only on concrete inputs.

>>> import jax
>>> merge = jax.jit(lambda a: pcb_merge(w0, fts, keep_ratio=0.5, clip_ratio=0.0, alpha=a))
>>> [round(v, 5) for v in merge(0.5)["w"].tolist()]           # float32 rounding of a fused computation
[3.5, 3.0, 2.5, 0.0, 0.0, 2.5, 3.0, 3.5]
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.cat import ParamsView, check_scalar, finetuned_list, params_view, validate_inputs
from catmerge_jax.errors import HyperparameterError, MissingStatisticsError
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.tree import PyTree, is_tracer


def _compute_dtype(x: Any) -> np.dtype:
    """float32 for narrower floats (bf16/f16 are computed in float32), else the leaf's own float dtype."""
    dt = np.dtype(jnp.result_type(x))
    return dt if jnp.issubdtype(dt, jnp.floating) and dt.itemsize >= 4 else np.dtype(np.float32)


def static_number(name: str, value: Any, why: str) -> float:
    """``float(value)`` for a hyperparameter that must be a static Python number; one-line error for a tracer.

    ``why`` says what the value decides (e.g. "how many entries are kept"), so a user who passed it through
    ``jax.jit`` learns to mark it static instead of reading a ``ConcretizationTypeError``.
    """
    if is_tracer(value):
        raise HyperparameterError(f"{name} decides {why}, so it must be a static Python number, not a traced value "
                                  "(pass it through jax.jit as a static argument or close over it)")
    return float(value)


def merge_inputs(pretrained: Any, finetuned: Sequence[Any]) -> tuple[ParamsView, list[PyTree]]:
    """The base as a :class:`~catmerge_jax.cat.ParamsView` and the K fine-tuned params trees, validated.

    nnx and equinox modules are split into their params tree (:func:`catmerge_jax.cat.params_view`), so a method
    works on plain trees and hands its result to ``view.rebuild`` to return the caller's kind of object. A single
    tree where a list is expected is a one-line error (:func:`catmerge_jax.cat.finetuned_list`).
    """
    view = params_view(pretrained)
    fts = [params_view(f).params for f in finetuned_list(finetuned)]
    validate_inputs(view.params, fts)
    return view, fts


def per_task_trees(trees: Any, name: str, num_tasks: int, what: str) -> list[PyTree]:
    """K per-task input trees (Fishers, gradients) as plain params trees, modules split like the params.

    Args:
      trees: a list or tuple of K trees (params-like dicts, nnx ``State``/``Module``, equinox ``Module`` or its
        ``eqx.filter(..., eqx.is_inexact_array)`` tree).
      name: the argument's name in messages (``"fishers"``).
      num_tasks: K, the number of fine-tuned models.
      what: what one tree is, for messages (``"Fisher tree"``).
    Raises:
      MissingStatisticsError: ``trees`` is None, a single tree, or holds another number of trees than K.
    """
    if trees is None or not isinstance(trees, (list, tuple)) or hasattr(trees, "_fields"):
        got = "none" if trees is None else f"a single {type(trees).__name__}"
        raise MissingStatisticsError(f"{name} must be a list of {num_tasks} {what}s (one per fine-tuned model), "
                                     f"got {got}")
    if len(trees) != num_tasks:
        raise MissingStatisticsError(f"{name}: need one {what} per fine-tuned model: got {len(trees)} for "
                                     f"{num_tasks} model(s)")
    return [params_view(t).params for t in trees]


def order_statistics(x: Any, positions: Sequence[int]) -> jax.Array:
    """``(R, len(positions))``: the entries at ascending ``positions`` of each row of ``x`` ``(R, P)``.

    Model-wide thresholds need a few order statistics of millions of entries. XLA's CPU sort is slow for that
    (seconds for ~10M entries), so concrete arrays that live on the CPU use ``np.partition`` (linear time); arrays on
    an accelerator, and traced arrays (inside ``jit``/``vmap``/``grad``, where the host cannot read them), are sorted
    with ``jnp.sort``. Both give the exact same entries. ``positions`` are static Python ints.
    """
    positions = [int(i) for i in positions]
    if is_tracer(x):
        return jnp.sort(x, axis=1)[:, np.asarray(positions)]
    devices = x.devices() if isinstance(x, jax.Array) else set()
    if all(d.platform == "cpu" for d in devices):
        host = np.asarray(x)
        return jnp.asarray(np.partition(host, positions, axis=1)[:, positions])
    return jnp.sort(x, axis=1)[:, jnp.asarray(positions)]


@jax.jit
def flatten_tasks(leaves: Sequence[jax.Array]) -> jax.Array:
    """``(K, P)``: per-leaf ``(K, ...)`` arrays concatenated along one parameter axis."""
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)


def _per_task(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)


class PCBScores(NamedTuple):
    """PCB's balancing per leaf: clipped task vectors ``τ̂`` and rescaling weights ``s``, both ``(K, ...)``."""

    clipped: list[jax.Array]
    weights: list[jax.Array]


def pcb_scores(task_vectors: Sequence[jax.Array], *, keep_ratio: float = 0.1, clip_ratio: float = 1e-4) -> PCBScores:
    """Steps 1–5 over a model given as a list of per-leaf stacked task vectors ``(K, *leaf_shape)``.

    Args:
      task_vectors: one ``(K, ...)`` array per leaf (all leaves together form the model's P parameters).
      keep_ratio: r ∈ (0, 1], fraction of each task's entries kept.
      clip_ratio: c ∈ [0, 0.5), fraction clipped at each end of ``|τ_i|``.
    Returns:
      :class:`PCBScores` with per-leaf ``τ̂`` and weights ``s`` (0 where dropped).
    """
    _check(keep_ratio, clip_ratio)
    task_vectors = list(task_vectors)
    size = sum(int(np.prod(np.shape(t)[1:], dtype=np.int64)) for t in task_vectors)
    # Positions in Python float64 arithmetic, exactly as the reference code indexes its sorted arrays.
    bounds = order_statistics(jnp.abs(flatten_tasks(task_vectors)),
                              [int(size * clip_ratio), int(size * (1 - clip_ratio)) - 1])
    lo, hi = bounds[:, 0], bounds[:, 1]
    balance = [_balance(t, lo, hi) for t in task_vectors]
    flat = flatten_tasks(balance)
    threshold = order_statistics(flat, [int(size * (1 - keep_ratio))])[:, 0]
    top = flat.max(axis=1)
    del flat
    parts = [_clip_and_weigh(t, b, lo, hi, threshold, top) for t, b in zip(task_vectors, balance)]
    return PCBScores([c for c, _ in parts], [w for _, w in parts])


@jax.jit
def _balance(task_vectors: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Steps 1–4 for one leaf: ``β = exp(K · Norm(a)²) · tanh(τ ∘ Σ_j τ_j)`` with ``a = clip(|τ|, lo, hi)``."""
    num_tasks = task_vectors.shape[0]
    a = jnp.clip(jnp.abs(task_vectors), _per_task(lo, task_vectors), _per_task(hi, task_vectors))
    # min/max of the clipped magnitudes are lo/hi themselves (both are entries of |τ_i|).
    intra = jnp.exp(num_tasks * jnp.square(_safe_div(a - _per_task(lo, a), _per_task(hi - lo, a))))
    inter = jnp.tanh(task_vectors * task_vectors.sum(0, keepdims=True))
    return intra * inter


@jax.jit
def _clip_and_weigh(task_vectors: jax.Array, balance: jax.Array, lo: jax.Array, hi: jax.Array,
                    threshold: jax.Array, top: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Step 5 for one leaf: ``(τ̂, s)``."""
    a = jnp.clip(jnp.abs(task_vectors), _per_task(lo, task_vectors), _per_task(hi, task_vectors))
    t = _per_task(threshold, balance)
    weights = _safe_div(jnp.maximum(balance, t) - t, _per_task(top, balance) - t)
    return jnp.sign(task_vectors) * a, weights


def _check(keep_ratio: float, clip_ratio: float) -> None:
    keep_ratio = static_number("PCB keep_ratio", keep_ratio, "how many entries of each task are kept")
    clip_ratio = static_number("PCB clip_ratio", clip_ratio, "which order statistics clip |τ|")
    if not (0.0 < keep_ratio <= 1.0):
        raise HyperparameterError(f"PCB keep_ratio (fraction of each task vector kept) must be in (0, 1], "
                                  f"got {keep_ratio}")
    if not (0.0 <= clip_ratio < 0.5):
        raise HyperparameterError(f"PCB clip_ratio (outlier fraction clipped at each end) must be in [0, 0.5), "
                                  f"got {clip_ratio}")


def pcb_merge(pretrained: PyTree, finetuned: Sequence[PyTree], *, keep_ratio: float = 0.1, clip_ratio: float = 1e-4,
              alpha: float = 1.0, progress: bool = False) -> PyTree:
    """PCB-Merging: ``W0 + α Σ_i s_i ∘ τ̂_i / Σ_i s_i`` (see the module docstring for ``s`` and ``τ̂``).

    Args:
      pretrained: W0: a params pytree, an ``nnx.Module`` or an ``equinox.Module``.
      finetuned: K trees of the same kind.
      keep_ratio: fraction r of each task's parameters kept by balanced score (0.1).
      clip_ratio: fraction of ``|τ_i|`` clipped at each end before scoring (1e-4; 0 disables).
      alpha: scale of the merged (weighted-mean) task vector (1.0); may be traced (``jit``/``vmap``/``grad``).
      progress: tqdm bar over leaves for the final merge.
    Returns:
      The merged params, same structure and dtypes as ``pretrained`` (the same kind of object: a module for a
      module).
    """
    view, fts = merge_inputs(pretrained, finetuned)
    check_scalar("alpha", alpha)
    _check(keep_ratio, clip_ratio)
    base_leaves, treedef = jax.tree.flatten(view.params)
    columns = list(zip(*[jax.tree.leaves(t) for t in fts]))
    tvs = [stack_task_vectors(jnp.asarray(b), col) for b, col in zip(base_leaves, columns)]
    scores = pcb_scores(tvs, keep_ratio=float(keep_ratio), clip_ratio=float(clip_ratio))
    indices = range(len(base_leaves))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="PCB merge", unit="leaf")
    merged = [_combine(jnp.asarray(base_leaves[j]), scores.clipped[j], scores.weights[j], alpha) for j in indices]
    return view.rebuild(jax.tree.unflatten(treedef, merged))


@jax.jit
def stack_task_vectors(base: jax.Array, weights: Sequence[jax.Array]) -> jax.Array:
    """``(K, ...)``: the K task vectors ``W_k − W0`` of one leaf, in float32 or wider."""
    dt = _compute_dtype(base)
    return jnp.stack([w.astype(dt) - base.astype(dt) for w in weights])


@jax.jit
def _combine(base: jax.Array, clipped: jax.Array, weights: jax.Array, alpha: float | jax.Array) -> jax.Array:
    tau = (weights * clipped).sum(0) / jnp.maximum(weights.sum(0), 1e-12)
    return (base.astype(tau.dtype) + jnp.asarray(alpha).astype(tau.dtype) * tau).astype(base.dtype)


def _merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
    """Registry adapter for :func:`pcb_merge` (needs no statistics)."""
    return pcb_merge(pretrained, finetuned, progress=progress, **hparams)


register(MergeMethod("pcb", _merge, {"keep_ratio": 0.1, "clip_ratio": 1e-4, "alpha": 1.0}, scale_name="alpha",
                     description="PCB-Merging (Du et al., 2024): parameter competition balancing"))

__all__ = ["pcb_merge", "pcb_scores", "PCBScores", "order_statistics", "flatten_tasks", "stack_task_vectors",
           "static_number", "merge_inputs", "per_task_trees"]
