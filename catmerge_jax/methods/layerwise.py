"""The leaf plumbing shared by the matrix merges (TSV-M, Iso-C, Iso-CTS, WUDI): which leaf gets what.

A matrix merge is a function of one layer's stacked task matrices in the papers' ``(out, in)`` orientation,
``layer_fn(tvs: (K, out, in)) -> (out, in)``, the merged task vector of that layer. :func:`matrix_merge` maps
it over a params tree the way FusionBench (the reference implementations these methods are compared with) does:

* every LINEAR leaf (:mod:`catmerge_jax.roles`: Dense/DenseGeneral/Conv kernels, stacked ``nn.scan`` layers,
  equinox ``(out, in)`` weights, fused ``q|k|v`` blocks) is read as its per-layer ``(in, out)`` matrices by
  :meth:`~catmerge_jax.roles.LeafSpec.matrices` and handed to ``layer_fn`` transposed, i.e. as PyTorch's
  ``(out, in)`` weight, the orientation of the papers (Iso-CTS and WUDI are not transpose-invariant);
* with ``matrices="all_2d"`` (the default) every other 2-D leaf of role OTHER — embedding tables, position
  tables — gets ``layer_fn`` too, as stored: Flax's ``Embed`` table ``(vocab, dim)`` is laid out as PyTorch's
  ``nn.Embedding.weight``, so no transpose; ``matrices="linear"`` keeps those on the rule below;
* every other leaf becomes ``W0 + α·mean_k T_k`` (``rest="mean"``), or stays at ``W0`` (``rest="pretrained"``,
  the variant of WUDI's ViT code, which merges only linear weights).

The merged matrix leaf is ``W0 + α·layer_fn(T)``. Layers of one shape — across leaves and across the stacked
layers of a leaf — run as one ``vmap`` of ``layer_fn`` inside one ``jit``, so a 12-block model compiles each
distinct layer shape once. Everything is traceable: the whole merge runs under ``jax.jit`` with params and α
traced, under ``vmap`` over α and under ``grad`` w.r.t. α.

>>> import jax.numpy as jnp
>>> from catmerge_jax.methods.layerwise import matrix_merge
>>> w0 = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
>>> fts = [{"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}] * 2
>>> merged = matrix_merge(w0, fts, lambda tvs: tvs.sum(0), alpha=0.5)   # task arithmetic, written as a layer_fn
>>> merged["dense"]["kernel"][0].tolist(), merged["dense"]["bias"].tolist()
([1.0, 1.0], [0.5, 0.5])
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.cat import _combined_roles, finetuned_list, params_view, validate_inputs
from catmerge_jax.errors import HyperparameterError
from catmerge_jax.roles import LeafSpec, Overrides, Role, classify, is_spec
from catmerge_jax.tree import PyTree, is_concrete, leaves_with_paths

LayerFn = Callable[[jax.Array], jax.Array]

MATRICES = ("all_2d", "linear")
REST = ("mean", "pretrained")


def compute_dtype(x: Any) -> np.dtype:
    """float32 for bf16/f16 leaves (SVDs and Adam run in float32), else the leaf's own float dtype."""
    dt = np.dtype(jnp.result_type(x))
    return dt if jnp.issubdtype(dt, jnp.floating) and dt.itemsize >= 4 else np.dtype(np.float32)


def polar(a: jax.Array) -> jax.Array:
    """The orthonormal polar factor ``P Qᵀ`` of ``a = P S Qᵀ`` ``(..., m, p)``, ``m ≥ p``: the closest matrix with
    orthonormal columns (orthogonal Procrustes). One thin SVD of the ``(m, p)`` factor, never an ``m × m`` one."""
    p, _, qt = jnp.linalg.svd(a, full_matrices=False)
    return p @ qt


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise HyperparameterError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_alpha(alpha: Any, method: str) -> None:
    """α is a scale; a concrete NaN/Inf is a user error (a traced α is checked by nobody: it has no value)."""
    if is_concrete(alpha) and not bool(np.isfinite(np.asarray(alpha, np.float64)).all()):
        raise HyperparameterError(f"{method} alpha must be finite, got {alpha}")


def _matrix_view(spec: LeafSpec, leaf: Any, matrices: str) -> str | None:
    """``"linear"`` (kernel, transposed to (out, in)), ``"table"`` (2-D OTHER leaf, as stored) or None."""
    if spec.role is Role.LINEAR:
        return "linear"
    if matrices == "all_2d" and spec.role is Role.OTHER and np.ndim(leaf) == 2:
        return "table"
    return None


@functools.partial(jax.jit, static_argnames=("layer_fn", "options"))
def _run_group(stack: jax.Array, layer_fn: LayerFn, options: tuple) -> jax.Array:
    """``(K, L, out, in) -> (L, out, in)``: one layer function vmapped over L same-shape layers."""
    return jax.vmap(functools.partial(layer_fn, **dict(options)), in_axes=1)(stack)


def matrix_merge(pretrained: PyTree, finetuned: Sequence[PyTree], layer_fn: LayerFn, *, alpha: Any = 1.0,
                 options: dict | None = None, matrices: str = "all_2d", rest: str = "mean",
                 roles: Overrides = None, progress: bool = False, desc: str = "merge") -> PyTree:
    """``W0 + α·layer_fn(T)`` on matrix leaves, ``W0 + α·mean_k T_k`` (or ``W0``) elsewhere.

    Args:
      pretrained: ``W0``; fixes structure, roles and output dtypes.
      finetuned: K trees of the same structure.
      layer_fn: ``(K, out, in) -> (out, in)``, pure and traceable; a module-level function, so that compiled
        groups are cached across calls.
      options: static keyword arguments of ``layer_fn`` (ranks, step counts: Python values).
      alpha: scale of the merged task vector (may be traced).
      matrices: ``"all_2d"`` (LINEAR leaves and 2-D OTHER leaves such as embedding tables) or ``"linear"``.
      rest: ``"mean"`` (``W0 + α·mean_k T_k``) or ``"pretrained"`` (``W0``) for every leaf that is not a matrix.
      roles: overrides for :func:`catmerge_jax.roles.classify`.
      progress: a tqdm bar over the groups of same-shape layers.
    Returns:
      The merged params: same structure, shapes and dtypes as ``pretrained``.
    """
    check_choice("matrices", matrices, MATRICES)
    check_choice("rest", rest, REST)
    inputs = params_view(pretrained)
    finetuned = [params_view(f).params for f in finetuned_list(finetuned)]
    pretrained = inputs.params
    validate_inputs(pretrained, finetuned)
    check_alpha(alpha, desc)
    specs = [s for _, s in leaves_with_paths(classify(pretrained, _combined_roles(inputs.roles, roles)),
                                             is_leaf=is_spec)]
    base_leaves, treedef = jax.tree.flatten(pretrained)
    columns = list(zip(*[jax.tree.leaves(ft) for ft in finetuned]))

    out: list[Any] = [None] * len(base_leaves)
    # group key (out, in, dtype) -> [(leaf index, view, (K, L, out, in) stack)]
    groups: dict[tuple, list[tuple[int, str, jax.Array]]] = {}
    for j, (base, spec) in enumerate(zip(base_leaves, specs)):
        base = jnp.asarray(base)
        dt = compute_dtype(base)
        tvs = jnp.stack([jnp.asarray(w).astype(dt) - base.astype(dt) for w in columns[j]])
        view = _matrix_view(spec, base, matrices)
        if view is None:
            delta = tvs.mean(0) if rest == "mean" else jnp.zeros_like(tvs[0])
            out[j] = (base.astype(dt) + alpha * delta).astype(base.dtype)
            continue
        if view == "linear":
            stack = spec.matrices(tvs, lead=1).swapaxes(-1, -2)       # (K, layers, out, in)
        else:
            stack = tvs[:, None]                                       # (K, 1, rows, cols) as stored
        groups.setdefault((stack.shape[-2], stack.shape[-1], dt), []).append((j, view, stack))

    items = list(groups.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=desc, unit="shape")
    for _, members in items:
        stack = jnp.concatenate([m[2] for m in members], axis=1)
        merged = _run_group(stack, layer_fn, tuple(sorted((options or {}).items())))  # (L_total, out, in)
        start = 0
        for j, view, part in members:
            n = part.shape[1]
            delta = merged[start:start + n]
            start += n
            base = jnp.asarray(base_leaves[j])
            if view == "linear":
                delta = specs[j].from_matrices(delta.swapaxes(-1, -2), base.shape)
            else:
                delta = delta[0]
            out[j] = (base.astype(delta.dtype) + alpha * delta).astype(base.dtype)
    return inputs.rebuild(jax.tree.unflatten(treedef, out))


__all__ = ["matrix_merge", "polar", "compute_dtype", "check_choice", "check_alpha", "MATRICES", "REST"]
