"""MergeKit's methods with the layers spread over a device mesh (one host's GPUs, or a TPU pod slice).

:func:`mergekit_merge_sharded` is :func:`catmerge_jax.mergekit.pytree.mergekit_merge` with every group of
same-shaped leaves stacked into one ``(L, ...)`` array sharded along its layer axis (``NamedSharding(mesh,
P(axis))``, zero layers padded to a multiple of the axis size): each device merges its own layers (MergeKit's
methods are per tensor, so XLA partitions the vmapped layer axis without communication) and the merged groups come
back replicated, so every process holds the whole merged tree. On many processes, every process calls
``jax.distributed.initialize()``, loads the same inputs and makes this same call with the global mesh
(:func:`catmerge_jax.sharding.layer_mesh`); see docs/mergekit.md.

Inside the mesh every selection (TIES' top-k, Breadcrumbs' window) is found in the graph, and DARE/DELLA's leaf
``j`` draws from ``fold_in(key(seed), j)`` as in the one-device call, so the result equals it.

>>> import jax, jax.numpy as jnp
>>> from catmerge_jax.sharding import layer_mesh
>>> w0 = {"layers": [{"w": jnp.zeros(4)} for _ in range(3)]}
>>> fts = [{"layers": [{"w": jnp.array([1.0, -2.0, 0.5, 0.0])} for _ in range(3)]}]
>>> out = mergekit_merge_sharded("task_arithmetic", w0, fts, mesh=layer_mesh(), weight=0.5)
>>> out["layers"][2]["w"].tolist()
[0.5, -1.0, 0.25, 0.0]
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from catmerge_jax.mergekit.methods import merge_weight
from catmerge_jax.mergekit.pytree import prepare_inputs
from catmerge_jax.tree import PyTree

__all__ = ["mergekit_merge_sharded"]


def mergekit_merge_sharded(name: str, pretrained: PyTree, finetuned: Sequence[PyTree], *, mesh: Mesh | None = None,
                           axis: str = "layers", seed: Any = 0, dtype: Any = None, **params) -> PyTree:
    """MergeKit method ``name`` (``"ties"``, ``"slerp"``, ...) over ``pretrained``/``finetuned`` with the
    same-shaped leaves spread over ``mesh`` along ``axis`` (default: :func:`layer_mesh` of every device).
    Parameters as in :func:`catmerge_jax.mergekit.pytree.mergekit_merge`. Returns the merged tree (replicated)."""
    from catmerge_jax.methods.dare import as_key
    from catmerge_jax.sharding import _auto_mesh, layer_mesh, layer_placement

    method, view, uses_base, resolved, base_leaves, ft_leaves, treedef = prepare_inputs(name, pretrained, finetuned,
                                                                                        params)
    mesh = _auto_mesh(layer_mesh() if mesh is None else mesh)
    size = mesh.shape[axis]
    place = layer_placement(mesh, axis)
    replicated = NamedSharding(mesh, PartitionSpec())
    key = as_key(seed) if method.random else jax.random.key(0)
    groups: dict[tuple, list[int]] = {}
    for j, leaf in enumerate(base_leaves):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            groups.setdefault((tuple(np.shape(leaf)), np.dtype(leaf.dtype).name), []).append(j)
    out = list(base_leaves)
    for (_, leaf_dtype), idx in groups.items():
        pad = (-len(idx)) % size
        rows = idx + [idx[0]] * pad
        compute = np.float64 if leaf_dtype == "float64" else np.float32

        def stack(leaves):
            return place(jnp.stack([jnp.asarray(leaves[j]).astype(compute) for j in rows]))

        inputs = ([stack(base_leaves)] if uses_base else []) + [stack(f) for f in ft_leaves]
        keys = place(jnp.stack([jax.random.fold_in(key, j) for j in rows]))
        work = np.dtype(leaf_dtype) if dtype is None else np.dtype(dtype)

        def one(xs, k):
            return merge_weight(name, list(xs), 0 if uses_base else None, resolved,
                                key=k if method.random else None, work_dtype=work)

        merged = jax.jit(jax.vmap(one), out_shardings=replicated)(inputs, keys)
        for i, j in enumerate(idx):
            out[j] = merged[i].astype(leaf_dtype)
    return view.rebuild(jax.tree.unflatten(treedef, out))
