"""LOT Merging (Sun et al., "Towards Minimizing Feature Drift in Model Merging: Layer-wise Task Vector Fusion for
Adaptive Knowledge Integration", NeurIPS 2025, arXiv 2505.23859 — by the CAT Merging authors).

LOT picks, layer by layer, the merged task vector ``T`` that minimizes the drift of each layer's output on every
task's own exemplar features, from the same statistics CAT collects (:mod:`catmerge_jax.stats`):

* linear kernel (``y = x W``, Flax ``(in, out)``), inputs ``X_k`` of task k:
  ``min_T Σ_k ‖X_k T − X_k T_k‖²``, solved by the pseudo-inverse (minimum-norm) solution
  ``T = (Σ_k X_kᵀX_k)⁺ Σ_k X_kᵀX_k T_k``. With the Gram form it is an ``eigh`` of the ``(in, in)`` sum; with
  the rows form (fewer rows than inputs) a thin SVD of the stacked ``(N, in)`` rows, ``T = Z⁺ [X_1T_1; …]``.
  Eigenvalues of ``Σ_k X_kᵀX_k`` at or below ``rcond·λ_max`` count as zero in both forms (default
  ``rcond = in·eps`` of the working dtype), so the two forms give the same answer;
* normalization scale (``y = x̂ ∘ γ``), ``s_k = Σ_rows x̂²`` of task k:
  ``min_t Σ_k ‖x̂ ∘ (t − t_k)‖²`` is per dimension ``t = Σ_k s_k t_k / Σ_k s_k`` (the feature-norm-weighted
  mean; a dimension no exemplar excites takes the plain mean);
* every other leaf (biases, norm shifts, embeddings): the mean of the task vectors ``mean_k T_k`` (for a bias
  this is the drift minimizer ``Σ_k n_k‖b − b_k‖²`` when the tasks bring equal row counts).

The merged model is ``W0 + α·T`` (α = 1: the paper's closed form; α is the same validation knob every method
gets). ``normalize=True`` divides each task's statistics by its row count first, so that tasks with more
exemplar tokens do not weigh more; the paper's objective (``False``) uses the raw sums.

>>> import numpy as np, jax.numpy as jnp
>>> import catmerge_jax as cm
>>> w0 = {"dense": {"kernel": jnp.zeros((2, 1))}}
>>> fts = [{"dense": {"kernel": jnp.array([[1.0], [0.0]])}}, {"dense": {"kernel": jnp.array([[0.0], [1.0]])}}]
>>> xs = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]     # each task uses its own input
>>> stats = [cm.stats_from_arrays(w0, {"dense/kernel": cm.linear_stats(x, form="gram")}) for x in xs]
>>> cm.lot_merge(w0, fts, stats)["dense"]["kernel"].ravel().tolist()
[1.0, 1.0]
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.cat import _combined_roles, finetuned_list, params_view, validate_inputs
from catmerge_jax.errors import HyperparameterError, MissingStatisticsError
from catmerge_jax.methods.layerwise import check_alpha, compute_dtype
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.roles import LeafSpec, Overrides, Role, classify, is_spec, with_stacking
from catmerge_jax.stats import LeafStats, is_leaf_stats
from catmerge_jax.tree import PyTree, leaves_with_paths


def _cutoff(rcond: float | None, fan_in: int, dtype: Any) -> float:
    return float(fan_in * np.finfo(dtype).eps) if rcond is None else float(rcond)


def lot_linear(tvs: jax.Array, grams: jax.Array, rcond: float) -> jax.Array:
    """``(Σ_k G_k)⁺ Σ_k G_k T_k`` for one layer: ``tvs`` ``(K, in, out)``, ``grams`` ``(K, in, in)``."""
    total = grams.sum(0)
    rhs = jnp.einsum("kab,kbo->ao", grams, tvs)
    w, q = jnp.linalg.eigh(total)
    keep = w > rcond * jnp.max(w)
    inv = jnp.where(keep, 1 / jnp.where(keep, w, 1), 0)
    return q @ (inv[:, None] * (q.T @ rhs))


def lot_linear_rows(tvs: jax.Array, rows: Sequence[jax.Array], rcond: float) -> jax.Array:
    """The same solution from the rows ``X_k`` ``(n_k, in)``: ``Z⁺ Y`` with ``Z = [X_1; …]``, ``Y = [X_1T_1; …]``.

    Singular values with ``σ² ≤ rcond·σ_max²`` are dropped (the Gram form's eigenvalue cutoff)."""
    z = jnp.concatenate(rows, axis=0)
    y = jnp.concatenate([x @ t for x, t in zip(rows, tvs)], axis=0)
    u, s, vt = jnp.linalg.svd(z, full_matrices=False)
    keep = s * s > rcond * jnp.max(s) ** 2
    inv = jnp.where(keep, 1 / jnp.where(keep, s, 1), 0)
    return vt.T @ (inv[:, None] * (u.T @ y))


def lot_scale(tvs: jax.Array, sq_sums: jax.Array) -> jax.Array:
    """``Σ_k s_k T_k / Σ_k s_k`` per dimension (``(K, d)`` each); dimensions with ``Σ_k s_k = 0``: the mean."""
    total = sq_sums.sum(0)
    weighted = (sq_sums * tvs).sum(0) / jnp.where(total > 0, total, 1)
    return jnp.where(total > 0, weighted, tvs.mean(0))


@functools.partial(jax.jit, static_argnames=("rcond",))
def _solve_grams(mats: jax.Array, grams: jax.Array, rcond: float) -> jax.Array:
    """``(K, layers, in, out)``, ``(K, layers, in, in)`` → ``(layers, in, out)``."""
    return jax.vmap(lambda t, g: lot_linear(t, g, rcond), in_axes=(1, 1))(mats, grams)


@functools.partial(jax.jit, static_argnames=("rcond",))
def _solve_rows(mats: jax.Array, rows: list[jax.Array], rcond: float) -> jax.Array:
    """``(K, layers, in, out)`` with rows shared by all layers → ``(layers, in, out)``."""
    return jax.vmap(lambda t: lot_linear_rows(t, rows, rcond), in_axes=1)(mats)


def _per_layer(x: jax.Array, layers: int, blocks: int, tail: tuple[int, ...]) -> jax.Array:
    """Statistics of a leaf → one entry per layer of :meth:`LeafSpec.matrices`: shared ``tail``-shaped stats are
    broadcast, stacked ``(*stack, *tail)`` ones repeat once per output block."""
    x = x.reshape((-1,) + tail)
    if x.shape[0] != layers:
        x = jnp.repeat(x, blocks, axis=0) if x.shape[0] * blocks == layers else jnp.broadcast_to(x, (layers,) + tail)
    return x


def _linear_leaf(path: str, spec: LeafSpec, base: jax.Array, tvs: jax.Array, per_task: Sequence[LeafStats],
                 rcond: float | None, normalize: bool) -> jax.Array:
    mats = spec.matrices(tvs, lead=1)                                   # (K, layers, in, out)
    k_tasks, layers, fan_in, _ = mats.shape
    dt = mats.dtype
    for k, s in enumerate(per_task):
        if not s.has_linear or s.count is None:
            raise MissingStatisticsError(f"leaf '{path}': task {k} has no input rows/Gram statistics (LOT needs the "
                                         "layer inputs of every task; was the layer in the exemplars' forward path?)")
    cut = _cutoff(rcond, fan_in, dt)
    scales = [(1 / jnp.maximum(jnp.asarray(s.count, dt), 1)) if normalize else jnp.asarray(1, dt) for s in per_task]
    if all(s.rows is not None for s in per_task):
        rows = [jnp.sqrt(c) * jnp.asarray(s.rows, dt).reshape(-1, fan_in) for c, s in zip(scales, per_task)]
        if layers != 1 and any(np.shape(s.rows)[:-2] for s in per_task):
            raise MissingStatisticsError(f"leaf '{path}': per-layer rows of a stacked leaf are not supported; "
                                         "store Grams (form='gram')")
        merged = _solve_rows(mats, rows, cut)
    else:
        grams = jnp.stack([c * _per_layer(s.gram_matrix().astype(dt), layers, spec.out_blocks, (fan_in, fan_in))
                           for c, s in zip(scales, per_task)])         # (K, layers, in, in)
        merged = _solve_grams(mats, grams, cut)
    return spec.from_matrices(merged, base.shape)


def _scale_leaf(path: str, spec: LeafSpec, base: jax.Array, tvs: jax.Array,
                per_task: Sequence[LeafStats], normalize: bool) -> jax.Array:
    present = [s.sq_sum is not None for s in per_task]
    if not any(present):
        return tvs.mean(0)              # a norm the exemplars never reached: no drift to weigh by
    if not all(present):
        k = present.index(False)
        raise MissingStatisticsError(f"leaf '{path}': task {k} has no normalized-feature statistics (sq_sum) for "
                                     "this norm scale while other tasks do")
    vecs = spec.vectors(tvs, lead=1)                                    # (K, layers, d)
    dt = vecs.dtype
    sq = jnp.stack([_per_layer(jnp.asarray(s.sq_sum, dt), vecs.shape[1], 1, (vecs.shape[2],))
                    * ((1 / jnp.maximum(jnp.asarray(s.count, dt), 1)) if normalize else 1) for s in per_task])
    return jax.vmap(lot_scale, in_axes=(1, 1))(vecs, sq).reshape(base.shape)


def lot_merge(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree], *, alpha: Any = 1.0,
              rcond: float | None = None, normalize: bool = False, roles: Overrides = None,
              progress: bool = False) -> PyTree:
    """LOT Merging: the closed-form, feature-drift-minimizing task vector per layer, ``W0 + α·T``.

    Args:
      pretrained: ``W0`` (structure, roles, dtypes).
      finetuned: K fine-tuned trees.
      stats: K statistics trees (:func:`catmerge_jax.capture_stats`, the ones CAT uses): linear kernels need
        rows or Grams, norm scales ``sq_sum``, in every task.
      alpha: scale of the merged task vector (1.0; may be traced).
      rcond: relative eigenvalue cutoff of the pseudo-inverse (None: ``in·eps`` of the working dtype; static).
      normalize: divide each task's statistics by its row count (False: the paper's raw sums).
      roles: overrides for :func:`catmerge_jax.roles.classify`.
      progress: tqdm bar over leaves.
    Returns:
      Merged params, same structure and dtypes as ``pretrained``.
    Raises:
      MissingStatisticsError: no stats, or a linear/scale leaf without statistics for some task (names both).
      HyperparameterError: a negative or non-finite ``rcond``.
    """
    if stats is None:
        raise MissingStatisticsError("LOT Merging needs exemplar statistics: stats=[s_1, ..., s_K] from "
                                     "capture_stats (the same ones CAT uses)")
    if rcond is not None and not (np.isfinite(float(rcond)) and float(rcond) >= 0):
        raise HyperparameterError(f"lot rcond must be a finite number >= 0 or None, got {rcond!r}")
    view = params_view(pretrained)
    finetuned = [params_view(f).params for f in finetuned_list(finetuned)]
    pretrained = view.params
    validate_inputs(pretrained, finetuned, stats)
    check_alpha(alpha, "LOT")
    specs = [s for _, s in leaves_with_paths(classify(pretrained, _combined_roles(view.roles, roles, stats)),
                                             is_leaf=is_spec)]
    paths_leaves = leaves_with_paths(pretrained)
    stat_columns = list(zip(*[[s for _, s in leaves_with_paths(t, is_leaf=is_leaf_stats)] for t in stats]))
    columns = list(zip(*[jax.tree.leaves(ft) for ft in finetuned]))
    # a leaf whose statistics hold per-layer counts (captured from a scanned model) is stacked layers
    specs = [with_stacking(sp, np.shape(paths_leaves[j][1]), np.ndim(stat_columns[j][0].count))
             if stat_columns[j][0].count is not None else sp for j, sp in enumerate(specs)]
    indices = range(len(paths_leaves))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="LOT", unit="leaf")
    merged = []
    for j in indices:
        path, base = paths_leaves[j]
        base = jnp.asarray(base)
        dt = compute_dtype(base)
        tvs = jnp.stack([jnp.asarray(w).astype(dt) - base.astype(dt) for w in columns[j]])
        role = specs[j].role
        if role is Role.LINEAR:
            delta = _linear_leaf(path, specs[j], base, tvs, stat_columns[j], rcond, normalize)
        elif role is Role.SCALE:
            delta = _scale_leaf(path, specs[j], base, tvs, stat_columns[j], normalize)
        else:
            delta = tvs.mean(0)
        merged.append((base.astype(dt) + alpha * delta).astype(base.dtype))
    return view.rebuild(jax.tree.unflatten(jax.tree.structure(pretrained), merged))


def _merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
    """Registry adapter for :func:`lot_merge`."""
    return lot_merge(pretrained, finetuned, stats, roles=roles, progress=progress, **hparams)


register(MergeMethod("lot", _merge, {"alpha": 1.0}, needs_stats=True, scale_name="alpha",
                     description="LOT Merging (Sun et al., 2025): closed-form feature-drift minimization per layer"))

__all__ = ["lot_merge", "lot_linear", "lot_linear_rows", "lot_scale"]
