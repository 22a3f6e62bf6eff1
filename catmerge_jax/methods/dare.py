"""DARE — Drop And REscale (Yu et al., ICML 2024, "Language Models are Super Mario"), then task arithmetic.

Each task vector entry is dropped with probability p and the survivors are scaled by ``1/(1−p)``, which keeps the
expected task vector (and, to first order, the layer outputs) unchanged::

    τ̃_k = (m_k ∘ τ_k) / (1 − p),   m_k ~ Bernoulli(1 − p) elementwise,     W = W0 + α Σ_k τ̃_k

Randomness is explicit: task k, leaf j draws from ``fold_in(fold_in(key, k), j)`` with ``key = jax.random.key(seed)``
(or a key you pass), so a merge is reproducible and does not depend on the order of evaluation. Defaults:
p = 0.9 (the paper's headline drop rate) and α = 0.3 (task arithmetic's), so p = 0 is exactly task arithmetic.

>>> import jax.numpy as jnp
>>> from catmerge_jax.methods.dare import dare_merge
>>> w0 = {"w": jnp.zeros(5)}
>>> fts = [{"w": jnp.ones(5)}]
>>> dare_merge(w0, fts, p=0.0, alpha=1.0)["w"].tolist()
[1.0, 1.0, 1.0, 1.0, 1.0]
>>> sorted(set(dare_merge(w0, fts, p=0.5, alpha=1.0, seed=3)["w"].tolist())) in ([0.0, 2.0], [0.0], [2.0])
True

Under ``jax.jit``/``vmap``/``grad``: params, ``alpha``, the drop rate ``p`` and the key may all be traced (``p`` only
sets the Bernoulli probability and the rescale, never a shape); ``seed`` may be a Python int, an integer scalar
array (traced or not) or a ``jax.random`` key (typed or raw ``uint32[2]``); ``rescale`` is static. The draws are
the same as the eager call's for the same key. The range check ``0 <= p < 1`` and NaN/Inf checks run only on
concrete inputs.

>>> import jax
>>> jax.jit(lambda p, key: dare_merge(w0, fts, p=p, alpha=1.0, seed=key))(0.0, jax.random.key(3))["w"].tolist()
[1.0, 1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.cat import check_scalar, params_view
from catmerge_jax.errors import HyperparameterError
from catmerge_jax.methods.pcb import merge_inputs
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.tree import PyTree, is_tracer


def _compute_dtype(x: Any) -> np.dtype:
    """float32 for narrower floats (bf16/f16 are computed in float32), else the leaf's own float dtype."""
    dt = np.dtype(jnp.result_type(x))
    return dt if jnp.issubdtype(dt, jnp.floating) and dt.itemsize >= 4 else np.dtype(np.float32)


def as_key(seed: Any) -> jax.Array:
    """A ``jax.random`` key from an int seed (Python or an integer scalar array, possibly traced) or a key."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    dtype = getattr(seed, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return seed
    if dtype is not None and jnp.issubdtype(dtype, jnp.integer) and dtype != jnp.bool_:
        if np.shape(seed) == ():
            return jax.random.key(seed)
        if np.shape(seed) == (2,) and dtype == jnp.uint32:     # a raw (legacy) PRNGKey
            return seed
    raise HyperparameterError(f"seed must be an int, an integer scalar array or a jax.random key, got {seed!r}")


def _check_p(p: float | jax.Array) -> float | jax.Array:
    """``p`` itself; its range ``[0, 1)`` is checked when it is concrete (a traced rate is only type-checked)."""
    check_scalar("DARE drop rate p", p)
    if not is_tracer(p) and not 0.0 <= float(np.asarray(p)) < 1.0:
        raise HyperparameterError(f"DARE drop rate p must be in [0, 1), got {p}")
    return p


@functools.partial(jax.jit, static_argnames=("rescale",))
def dare_leaf(task_vector: jax.Array, key: jax.Array, p: float | jax.Array, rescale: bool = True) -> jax.Array:
    """Drop each entry of one task-vector leaf with probability ``p``; rescale survivors by ``1/(1−p)``.

    ``p = 0`` keeps every entry (a Bernoulli(1) draw is always 1), so DARE then is the identity.
    """
    # The draw compares float32 uniforms with 1 − p whatever the dtype of p or of the leaf: the same key gives the
    # same mask for a Python-float p (eager) and a traced float64 p (jit), in x64 mode or not.
    keep = jax.random.bernoulli(key, 1.0 - jnp.asarray(p).astype(jnp.float32), task_vector.shape)
    kept = jnp.where(keep, task_vector, 0)
    return (kept / (1.0 - jnp.asarray(p).astype(task_vector.dtype))).astype(task_vector.dtype) if rescale else kept


def dare_sparsify(task_vector: PyTree, *, p: float = 0.9, seed: Any = 0, rescale: bool = True) -> PyTree:
    """DARE on one task-vector tree; leaf j uses ``fold_in(key, j)``.

    ``task_vector`` may be a params pytree or an nnx/equinox module holding task-vector values; the result is
    the same kind of object.
    """
    value = _check_p(p)
    key = as_key(seed)
    view = params_view(task_vector)
    leaves, treedef = jax.tree.flatten(view.params)
    return view.rebuild(jax.tree.unflatten(treedef, [dare_leaf(x, jax.random.fold_in(key, j), value, rescale)
                                                     for j, x in enumerate(leaves)]))


@functools.partial(jax.jit, static_argnames=("rescale",))
def _dare_leaf_merge(base: jax.Array, weights: Sequence[jax.Array], task_keys: jax.Array, leaf_index: int,
                     p: float | jax.Array, alpha: float | jax.Array, *, rescale: bool) -> jax.Array:
    dt = _compute_dtype(base)
    w0 = base.astype(dt)
    task_vectors = jnp.stack([w.astype(dt) - w0 for w in weights])
    keys = jax.vmap(lambda k: jax.random.fold_in(k, leaf_index))(task_keys)
    # vmapped over tasks: one Bernoulli draw per task key, the same numbers as dare_leaf on each task alone.
    dropped = jax.vmap(lambda t, k: dare_leaf(t, k, p, rescale))(task_vectors, keys)
    return (w0 + jnp.asarray(alpha).astype(dt) * dropped.sum(0)).astype(base.dtype)


def dare_merge(pretrained: PyTree, finetuned: Sequence[PyTree], *, p: float = 0.9, alpha: float = 0.3,
               seed: Any = 0, rescale: bool = True, progress: bool = False) -> PyTree:
    """``W0 + α Σ_k DARE_p(τ_k)``; task k uses ``fold_in(key(seed), k)``.

    Args:
      pretrained: W0: a params pytree, an ``nnx.Module`` or an ``equinox.Module``.
      finetuned: K trees of the same kind.
      p: drop rate in [0, 1); may be traced.
      alpha: task-arithmetic scale α; may be traced (``jit``/``vmap``/``grad``).
      seed: int, integer scalar array or ``jax.random`` key; may be traced.
      rescale: scale survivors by ``1/(1−p)`` (the paper's rule; False: drop only); static.
      progress: tqdm bar over leaves.
    Returns:
      The merged params, same structure and dtypes as ``pretrained`` (a module for a module). Leaf ``j`` is
      the ``j``-th leaf of the params tree (``jax.tree.leaves`` order), so the draws depend on the tree's layout:
      the same weights as a linen dict, an nnx module or an equinox module (transposed, other leaf order) get
      other masks, with the same distribution.
    """
    view, fts = merge_inputs(pretrained, finetuned)
    value = _check_p(p)
    check_scalar("alpha", alpha)
    key = as_key(seed)
    task_keys = jnp.stack([jax.random.fold_in(key, k) for k in range(len(fts))])
    base_leaves, treedef = jax.tree.flatten(view.params)
    columns = list(zip(*[jax.tree.leaves(t) for t in fts]))
    indices = range(len(base_leaves))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="DARE merge", unit="leaf")
    merged = [_dare_leaf_merge(jnp.asarray(base_leaves[j]), columns[j], task_keys, j, value, alpha,
                               rescale=bool(rescale)) for j in indices]
    return view.rebuild(jax.tree.unflatten(treedef, merged))


def _merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
    """Registry adapter for :func:`dare_merge` (needs no statistics)."""
    return dare_merge(pretrained, finetuned, progress=progress, **hparams)


register(MergeMethod("dare", _merge, {"p": 0.9, "alpha": 0.3, "seed": 0},
                     description="DARE (Yu et al., 2024): random drop and rescale, then task arithmetic",
                     scale_name="alpha"))

__all__ = ["dare_merge", "dare_sparsify", "dare_leaf", "as_key"]
