"""RegMean (Jin et al., 2023): merge each linear layer by least squares on the tasks' layer inputs.

For a linear kernel ``W`` (``y = x @ W``, ``(in, out)``), RegMean picks the ``W`` whose outputs on every task's
inputs are closest to that task's own model: ``min_W Σ_k ‖X_k W − X_k W_k‖²``, solved by

    W = (Σ_k G̃_k)⁻¹ Σ_k G̃_k W_k,        G̃_k = diag(G_k) + α (G_k − diag(G_k))

with ``G_k = X_kᵀX_k`` the input Gram of task k (the same statistics CAT collects) and ``α ∈ [0, 1]`` shrinking
the off-diagonal entries (α = 1: exact least squares; α = 0: a per-input-row weighted average). The system is
solved with ``jnp.linalg.solve`` (no explicit inverse). Every other leaf (biases, norms, embeddings) is the plain
mean of the fine-tuned models, as in the paper.

Grams are divided by each task's row count by default (``normalize=True``), as the reference implementations do
(RegMean's released code and FusionBench store ``XᵀX / n``), so a task with longer exemplars does not dominate;
``normalize=False`` uses the raw sums of the least-squares objective. An input dimension that no task's exemplars
ever excite (zero Gram row in every task) leaves its kernel row undetermined; that row is the plain mean. With
α < 1 and every input excited, ``Σ_k G̃_k`` is positive definite; α = 1 needs ``Σ_k X_kᵀX_k`` nonsingular (at least
``in`` independent exemplar rows) and a singular system raises :class:`~catmerge_jax.errors.NonFiniteError`.

Every LINEAR leaf is read through :meth:`catmerge_jax.roles.LeafSpec.matrices` as a stack of ``(in, out)``
matrices, one per layer: a Conv kernel over unfolded patches, an equinox ``Linear`` weight stored ``(out, in)``
(roles from the module types), a stacked ``(L, in, out)`` kernel of a scanned model (per-layer statistics:
``count (L,)``, ``gram (L, in, in)`` or ``rows (L, n, in)``, as :func:`catmerge_jax.capture.capture_stats` gives
them; each layer is its own least-squares problem) and a fused ``q|k|v`` projection (``out_blocks``; the blocks
share their input statistics, and each block is solved independently, which for RegMean is the same as one solve).
nnx and equinox modules go in and come out as modules (:func:`catmerge_jax.cat.params_view`).

>>> import numpy as np, jax.numpy as jnp
>>> import catmerge_jax as cm
>>> from catmerge_jax.methods.regmean import regmean_merge
>>> w0 = {"dense": {"kernel": jnp.zeros((2, 1)), "bias": jnp.zeros(1)}}
>>> fts = [{"dense": {"kernel": jnp.array([[1.0], [0.0]]), "bias": jnp.ones(1)}},
...        {"dense": {"kernel": jnp.array([[0.0], [1.0]]), "bias": jnp.zeros(1)}}]
>>> xs = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]      # task 1 only uses input 0, task 2 input 1
>>> stats = [cm.stats_from_arrays(w0, {"dense/kernel": cm.linear_stats(x, form="gram")}) for x in xs]
>>> merged = regmean_merge(w0, fts, stats)
>>> merged["dense"]["kernel"].ravel().tolist(), merged["dense"]["bias"].tolist()
([1.0, 1.0], [0.5])

Under ``jax.jit``/``vmap``/``grad``: params, statistics (Grams, rows and counts) and ``alpha`` may be traced;
``normalize`` is static. ``d/dα`` is the derivative of the solution, ``W' = (Σ G̃)⁻¹ (Σ_k O_k W_k − (Σ_k O_k) W)``
with ``O_k`` the off-diagonal part of ``G_k``. Grams are formed in the compute dtype (float32 for float32 or
narrower weights) at the highest matmul precision. Checks that need values run only on concrete inputs: NaN/Inf,
``0 <= alpha <= 1``, a zero row count, the α = 1 rank test, and the singular-system check after the solve; under
tracing a singular system (α = 1 with too few rows) gives NaN/Inf in that leaf instead of an error.

>>> import jax
>>> jax.jit(lambda a: regmean_merge(w0, fts, stats, alpha=a))(0.5)["dense"]["kernel"].ravel().tolist()
[1.0, 1.0]
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.cat import (LeafInput, _combined_roles, check_scalar, finetuned_list, linear_inputs, params_view,
                              validate_inputs)
from catmerge_jax.errors import HyperparameterError, MissingStatisticsError, NonFiniteError
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.roles import LeafSpec, Overrides, Role, check_spec, classify, is_spec, with_stacking
from catmerge_jax.stats import LeafStats, is_leaf_stats
from catmerge_jax.tree import PyTree, is_concrete, leaves_with_paths

_HIGHEST = jax.lax.Precision.HIGHEST


def _compute_dtype(x: Any) -> np.dtype:
    """float32 for narrower floats (bf16/f16 are computed in float32), else the leaf's own float dtype."""
    dt = np.dtype(jnp.result_type(x))
    return dt if jnp.issubdtype(dt, jnp.floating) and dt.itemsize >= 4 else np.dtype(np.float32)


def shrink_off_diagonal(gram: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """``diag(G) + α (G − diag(G))`` for ``(..., n, n)`` Grams (``α`` in the Grams' dtype; may be traced)."""
    eye = jnp.eye(gram.shape[-1], dtype=bool)
    return jnp.where(eye, gram, jnp.asarray(alpha).astype(gram.dtype) * gram)


@jax.jit
def regmean_linear(kernels: jax.Array, grams: jax.Array, alpha: float | jax.Array = 0.9) -> jax.Array:
    """RegMean for one linear layer.

    Args:
      kernels: ``(K, in, out)`` fine-tuned kernels ``W_k``.
      grams: ``(K, in, in)`` input Grams ``G_k`` (already count-normalized if wanted).
      alpha: off-diagonal shrinkage α ∈ [0, 1].
    Returns:
      ``(in, out)``: ``(Σ_k G̃_k)⁻¹ Σ_k G̃_k W_k``; rows whose input no task excites are the mean of the ``W_k``.
    """
    shrunk = shrink_off_diagonal(grams, alpha)
    lhs = shrunk.sum(0)
    # Solve for the deviation from the plain mean: the same W when Σ G̃ is nonsingular, better conditioned in
    # floating point, and exactly W_1 for K = 1 (a zero right-hand side).
    mean = _task_sum(kernels) / kernels.shape[0]
    # Σ_k G̃_k (W_k − W̄) one task at a time (a loop: one product alive at a time): as one einsum over (k, in),
    # XLA:CPU first copied the whole (K, in, out) difference, transposed (GiBs for an LLM's LM head)
    rhs = jax.lax.fori_loop(0, kernels.shape[0], lambda k, acc: acc + jnp.matmul(shrunk[k], kernels[k] - mean,
                                                                               precision=_HIGHEST),
                            jnp.zeros_like(mean))
    # A zero diagonal entry of Σ G̃ means that input is zero on every exemplar of every task (its Gram row and
    # column vanish too): the system says nothing about that kernel row, which stays at the plain mean.
    dead = jnp.diagonal(lhs) <= 0
    lhs = jnp.where(jnp.eye(lhs.shape[0], dtype=bool) & dead[:, None], 1, lhs)
    rhs = jnp.where(dead[:, None], 0, rhs)
    return mean + jnp.linalg.solve(lhs, rhs)


def _task_sum(stack: Any) -> jax.Array:
    """``Σ_k stack[k]`` as explicit adds (XLA:CPU's reduce over a leading axis first copies the stack transposed)."""
    total = stack[0]
    for k in range(1, len(stack)):
        total = total + stack[k]
    return total


@functools.partial(jax.jit, static_argnames=("dtype",))
def _stacked_task_vectors(base: jax.Array, tasks: list[Any], dtype: Any) -> jax.Array:
    """``(K, *shape)``: ``W_k − W0`` in ``dtype``, written straight into the stack (one program, no K temporaries)."""
    return jnp.stack([jnp.asarray(t).astype(dtype) - base.astype(dtype) for t in tasks])


class _Inputs(NamedTuple):
    leaves: list[LeafInput]
    bases: list[jax.Array]
    treedef: Any
    rebuild: Callable[[PyTree], Any]


def _leaf_inputs(pretrained: Any, finetuned: Sequence[Any], stats: Sequence[PyTree], roles: Overrides) -> _Inputs:
    """Every leaf as a :class:`~catmerge_jax.cat.LeafInput` (task vectors ``(K, *shape)`` in the compute dtype).

    The reading of :func:`catmerge_jax.cat.tree_inputs`: modules split by ``params_view``, roles from the module
    types under the user's ``roles``, a leaf whose statistics have per-layer counts read as stacked layers.
    (Not ``tree_inputs`` itself: its compute dtype comes from ``jnp.promote_types(dtype, float32)``, which has no
    float64/float32 path under strict dtype promotion, and RegMean runs under it in the tests.)
    """
    view = params_view(pretrained)
    fts = [params_view(f).params for f in finetuned_list(finetuned)]
    validate_inputs(view.params, fts, stats)
    specs = [sp for _, sp in leaves_with_paths(classify(view.params, _combined_roles(view.roles, roles, stats)),
                                               is_leaf=is_spec)]
    paths_leaves = leaves_with_paths(view.params)
    treedef = jax.tree.structure(view.params)
    task_leaves = [jax.tree.leaves(t) for t in fts]
    stat_leaves = [jax.tree.leaves(s, is_leaf=is_leaf_stats) for s in stats]
    leaves, bases = [], []
    for j, (path, base) in enumerate(paths_leaves):
        base = jnp.asarray(base)
        dt = _compute_dtype(base)
        per_task = [s[j] for s in stat_leaves]
        spec = specs[j]
        if per_task[0].count is not None and np.ndim(per_task[0].count) > 0:
            spec = with_stacking(spec, base.shape, np.ndim(per_task[0].count))
            check_spec(path, base.shape, spec)
        tvs = _stacked_task_vectors(base, [t[j] for t in task_leaves], np.dtype(dt))
        leaves.append(LeafInput(path, spec, tvs, per_task))
        bases.append(base)
    return _Inputs(leaves, bases, treedef, view.rebuild)


def _check_counts(leaf: LeafInput) -> None:
    """Every task and every stacked layer of a LINEAR leaf saw at least one row (when the counts are concrete)."""
    for k, s in enumerate(leaf.stats or ()):
        if s.count is not None and is_concrete(s.count):
            count = np.asarray(s.count).reshape(-1)
            empty = np.flatnonzero(count <= 0)
            if count.size > 1 and empty.size:
                raise MissingStatisticsError(f"leaf '{leaf.path}': task {k} has no input rows for stacked layer "
                                             f"{int(empty[0])} (RegMean needs the layer inputs of every task and "
                                             "layer)")


@jax.jit
def _grams_from_rows(rows: jax.Array) -> jax.Array:
    """``(K, layers, n, in) -> (K, layers, in, in)``: ``XᵀX`` per task and layer (zero padding rows add nothing)."""
    return jnp.einsum("klna,klnb->klab", rows, rows, precision=_HIGHEST)


def layer_grams(leaf: LeafInput, normalize: bool) -> jax.Array:
    """``(K, layers, in, in)`` input Grams of one LINEAR leaf, per task and per layer, in the leaf's compute dtype.

    The statistics are read by :func:`catmerge_jax.cat.linear_inputs` (the same reading as CAT: stacked leaves
    with per-layer statistics, fused ``out_blocks`` projections sharing their input, rows or Gram form), so
    presence and widths are checked with the same errors naming the leaf.
    """
    _check_counts(leaf)
    form, data = linear_inputs(leaf, normalize)
    return data if form == "gram" else _grams_from_rows(data)


@functools.partial(jax.jit, static_argnames=("spec",))
def _regmean_leaf(base: jax.Array, task_vectors: jax.Array, grams: jax.Array, alpha: float | jax.Array, *,
                  spec: LeafSpec) -> jax.Array:
    """``W0 + RegMean(T_1..T_K)`` for one LINEAR leaf, every layer of a stack (and output block) on its own.

    RegMean commutes with adding ``W0`` to every model (``(Σ G̃)⁻¹ Σ G̃_k (W0 + T_k) = W0 + (Σ G̃)⁻¹ Σ G̃_k T_k``,
    and a dead row's plain mean is ``W0 + mean T``), so the solve runs on the task vectors.
    """
    dt = task_vectors.dtype
    mats = spec.matrices(task_vectors, lead=1)                         # (K, layers, in, out_per_block)
    solved = jax.vmap(regmean_linear, in_axes=(1, 1, None))(mats, grams.astype(dt), alpha)
    return (base.astype(dt) + spec.from_matrices(solved, base.shape)).astype(base.dtype)


@jax.jit
def _mean_leaf(base: jax.Array, task_vectors: jax.Array) -> jax.Array:
    dt = task_vectors.dtype
    return (base.astype(dt) + _task_sum(task_vectors) / task_vectors.shape[0]).astype(base.dtype)


def _check_determined(path: str, grams: jax.Array, per_task: Sequence[LeafStats]) -> None:
    """With α = 1, ``Σ_k X_kᵀX_k`` has rank ≤ Σ_k n_k: fewer rows than excited inputs is surely singular.

    A host check per layer of ``grams`` ``(K, layers, in, in)``: the caller runs it only on concrete Grams and counts.
    """
    layers = grams.shape[1]
    blocks = layers // max(int(np.prod(np.shape(per_task[0].count), dtype=np.int64)), 1)
    rows = sum(np.repeat(np.asarray(s.count, np.float64).reshape(-1), blocks) for s in per_task)
    live = np.sum(np.diagonal(np.asarray(grams).sum(0), axis1=-2, axis2=-1) > 0, axis=-1)
    short = np.flatnonzero(rows < live)
    if short.size:
        where = f" (layer {int(short[0])})" if layers > 1 else ""
        raise HyperparameterError(f"leaf '{path}'{where}: RegMean with alpha=1 solves Σ_k X_kᵀX_k W = ..., which is "
                                  f"singular with {rows[short[0]]:g} exemplar rows for {int(live[short[0]])} excited "
                                  "inputs; use alpha < 1 (0.9 by default) or more exemplars")


def regmean_merge(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree], *, alpha: float = 0.9,
                  normalize: bool = True, roles: Overrides = None, progress: bool = False) -> PyTree:
    """RegMean over a params tree: LINEAR leaves by :func:`regmean_linear`, every other leaf averaged.

    Args:
      pretrained: W0 (fixes structure, roles and output dtypes; RegMean itself merges whole weights): a params
        pytree, an ``nnx.Module`` or an ``equinox.Module`` (roles then come from the module types, e.g. an
        equinox ``Linear`` weight is read as ``(out, in)``).
      finetuned: K fine-tuned trees of the same kind.
      stats: K statistics trees (:mod:`catmerge_jax.stats`) mirroring the params tree (for modules:
        ``nnx.state(m, nnx.Param)`` / ``eqx.filter(m, eqx.is_inexact_array)``); every LINEAR leaf needs linear
        statistics (rows or Gram) in every task. A leaf whose statistics have per-layer counts (``count (L,)``,
        ``gram (L, in, in)`` or ``rows (L, n, in)``: stacked layers captured from a scanned model) is solved
        layer by layer.
      alpha: off-diagonal shrinkage α ∈ [0, 1] (0.9 by default); may be traced (``jit``/``vmap``/``grad``).
      normalize: divide each task's Gram by its row count (default, as the reference code); False: raw sums.
        Static.
      roles: overrides for :func:`catmerge_jax.roles.classify` (before the module types' roles).
      progress: tqdm bar over leaves.
    Returns:
      The merged params, same structure and dtypes as ``pretrained`` (a module for a module).
    Raises:
      MissingStatisticsError: a LINEAR leaf has no linear statistics for some task (names the leaf and task).
    """
    if stats is None:
        raise MissingStatisticsError("RegMean needs exemplar statistics: stats=[s_1, ..., s_K] with input Grams of "
                                     "every linear layer")
    check_scalar("RegMean alpha (off-diagonal scale)", alpha)
    alpha_value = None if not is_concrete(alpha) else float(np.asarray(alpha))   # None: traced
    if alpha_value is not None and not 0.0 <= alpha_value <= 1.0:
        raise HyperparameterError(f"RegMean alpha (off-diagonal scale) must be in [0, 1], got {alpha}")
    inputs = _leaf_inputs(pretrained, finetuned, stats, roles)

    pairs = zip(inputs.leaves, inputs.bases)
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc="RegMean", unit="leaf", total=len(inputs.bases))
    merged = []
    for leaf, base in pairs:
        if leaf.spec.role is not Role.LINEAR:
            merged.append(_mean_leaf(base, leaf.task_vectors))
            continue
        grams = layer_grams(leaf, normalize)
        if alpha_value == 1.0 and is_concrete((grams, [s.count for s in leaf.stats])):
            _check_determined(leaf.path, grams, leaf.stats)
        out = _regmean_leaf(base, leaf.task_vectors, grams, alpha, spec=leaf.spec)
        if is_concrete(out) and not bool(jnp.all(jnp.isfinite(out))):
            raise NonFiniteError(f"leaf '{leaf.path}': RegMean's linear system is singular (Σ_k G̃_k has no inverse: "
                                 f"too few exemplar rows for alpha={alpha_value}); use alpha < 1")
        merged.append(out)
    return inputs.rebuild(jax.tree.unflatten(inputs.treedef, merged))


def _merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
    """Registry adapter for :func:`regmean_merge`."""
    return regmean_merge(pretrained, finetuned, stats, roles=roles, progress=progress, **hparams)


# No merge scale: its alpha is the Gram off-diagonal shrinkage (W solves least squares; it is not W0 + α·τ).
register(MergeMethod("regmean", _merge, {"alpha": 0.9}, needs_stats=True, scale_name=None,
                     description="RegMean (Jin et al., 2023): per-layer least squares on exemplar input Grams"))

__all__ = ["regmean_merge", "regmean_linear", "shrink_off_diagonal"]
