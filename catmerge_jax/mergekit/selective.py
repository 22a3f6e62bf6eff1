"""MergeKit's selective methods on one weight: ``sce``, ``ram``, ``ramplus_tl``, ``arcee_fusion``.

>>> import jax.numpy as jnp
>>> w0 = jnp.zeros(3)
>>> ram(w0, jnp.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])).tolist()    # shared entries averaged, unique ones kept
[2.0, 2.0, 0.0]
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.mergekit.precision import rounder, sum0, widen
from catmerge_jax.mergekit.selection import largest_mask, value_at_rank
from catmerge_jax.mergekit.task_arithmetic import consensus_mask

__all__ = ["sce", "sce_variance", "ram", "ramplus_tl", "arcee_fusion"]


def _variance(tvs, r):
    return r(jnp.var(tvs, axis=0))


@functools.partial(jax.jit, static_argnames=("work_dtype",))
def sce_variance(base: jax.Array, models: Sequence[jax.Array], work_dtype: str) -> jax.Array:
    """SCE's selection score: the variance over the K task vectors of each entry (``torch.var(unbiased=False)``
    in the working dtype), shape of ``base``."""
    r = rounder(work_dtype)
    base = widen(base)
    return _variance(r(jnp.stack([widen(m) for m in models]) - base[None]), r)


def sce(base: jax.Array, models: jax.Array, *, select_topk: Any = 1.0, work_dtype: Any = np.float32,
        keep: jax.Array | None = None) -> jax.Array:
    """SCE (Wan et al., 2024): Select the ``select_topk`` fraction of entries with the largest variance across
    the task vectors (of those with nonzero variance), Calculate per-model weights ``mean(τ_k²)`` normalized to sum
    1, Erase entries against the elected sign; the weighted mean of the rest is added to the base.

    ``keep`` (bool, shape of ``base``): the selection, if made elsewhere (on the host in PyTorch's tie order);
    without it the entries tied at the cut are kept to the lower index."""
    r = rounder(work_dtype)
    k = models.shape[0]
    tvs = r(models - base[None])
    d = jnp.asarray(select_topk, jnp.float32)
    if keep is None:
        var = _variance(tvs, r)
        count = jnp.floor(jnp.sum(var != 0) * d).astype(jnp.int32)
        keep = jnp.where(d >= 1, True, jnp.where(d <= 0, False, largest_mask(jnp.abs(var), count)))
    tvs = jnp.where(keep[None], tvs, 0)
    erase = consensus_mask(tvs, "sum", r)
    weights = r(jnp.mean(r(tvs * tvs).reshape(k, -1), axis=1))
    total = r(jnp.sum(weights))
    weights = jnp.where(jnp.abs(total) < 1e-6, r(jnp.full((k,), 1.0 / k, tvs.dtype)), r(weights / total))
    erased = jnp.where(erase, weights.reshape((k,) + (1,) * base.ndim), 0)
    merged = r(sum0(r(tvs * erased)))
    final = r(merged / jnp.maximum(r(sum0(erased)), 1e-6))
    return r(base + final)


def _ram_parts(base, models, epsilon, r):
    tv = r(models - base[None]).reshape(models.shape[0], -1)
    # PyTorch compares a bf16 tensor with a Python scalar in bf16: epsilon is rounded first
    nonzero = jnp.abs(tv) > r(jnp.asarray(epsilon, tv.dtype))
    counts = sum0(nonzero.astype(jnp.int32))
    return tv, nonzero, counts, counts > 1, counts == 1


def ram(base: jax.Array, models: jax.Array, *, epsilon: Any = 1e-5, work_dtype: Any = np.float32) -> jax.Array:
    """RAM: entries of the task vectors above ``epsilon`` in magnitude; one model's entry is kept, entries
    several models change are averaged over those models."""
    r = rounder(work_dtype)
    tv, nonzero, counts, overlap, unique = _ram_parts(base, models, epsilon, r)
    z = jnp.where(nonzero, tv, 0)
    terms = jnp.where(unique, z, 0) + r(jnp.where(overlap, z, 0) / jnp.maximum(counts, 1))
    return r(base + r(sum0(terms)).reshape(base.shape))


def ramplus_tl(base: jax.Array, models: jax.Array, *, r: Any = 0.1, alpha: Any = 0.2, epsilon: Any = 1e-5,
               work_dtype: Any = np.float32) -> jax.Array:
    """RAM+ (tensor-local): as :func:`ram`, with model k's unique entries scaled by
    ``1 + r·clip(shared_k / unique_k, 0, alpha)`` (its counts of shared and unique entries in this tensor).
    MergeKit computes this one in float32 (its scale promotes), rounded only at the end here."""
    rnd = rounder(work_dtype)
    tv, nonzero, counts, overlap, unique = _ram_parts(base, models, epsilon, rnd)
    shared_k = jnp.sum(nonzero & overlap, 1).astype(jnp.float32)
    unique_k = jnp.sum(nonzero & unique, 1).astype(jnp.float32)
    rho = shared_k / jnp.maximum(unique_k, epsilon)
    lam = (1 + jnp.asarray(r, jnp.float32) * jnp.clip(rho, 0, alpha)).astype(tv.dtype)
    z = jnp.where(nonzero, tv, 0)
    terms = jnp.where(unique, z, 0) * lam[:, None] + rnd(jnp.where(overlap, z, 0) / jnp.maximum(counts, 1))
    return rnd(base + sum0(terms).reshape(base.shape))


def arcee_fusion(base: jax.Array, other: jax.Array, *, work_dtype: Any = np.float32) -> jax.Array:
    """Arcee Fusion: importance ``|W − W0| · KL(softmax W ‖ softmax W0)`` (rows along the last axis); entries
    whose importance reaches ``median + 1.5·IQR`` take the model's value, the rest keep the base's. Quantiles are
    exact here (MergeKit estimates them from 1M random samples on larger tensors, so its cut varies run to run)."""
    r = rounder(work_dtype)
    diff = r(other - base)
    p = r(r(jax.nn.softmax(other, axis=-1)) + 1e-8)
    q = r(r(jax.nn.softmax(base, axis=-1)) + 1e-8)
    kl = r(jnp.sum(r(p * r(jnp.log(r(p / q)))), axis=-1, keepdims=True))
    importance = r(r(jnp.abs(diff)) * kl)
    n = importance.size
    ranks = jnp.floor(jnp.asarray([0.25, 0.5, 0.75], jnp.float32) * (n - 1)).astype(jnp.int32)
    q1, med, q3 = (value_at_rank(importance, ranks[i]) for i in range(3))
    threshold = r(med + r(1.5 * r(q3 - q1)))
    return r(base + jnp.where(importance >= threshold, diff, 0))
