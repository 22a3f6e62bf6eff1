"""MergeKit's four sparsifications of one task vector (``mergekit/sparsify.py``), as jittable JAX.

* ``magnitude`` (TIES): keep the ``max(1, ⌊density·n⌋)`` entries of largest ``|τ|`` (all if density ≥ 1, none if
  density ≤ 0).
* ``magnitude_outliers`` (Model Breadcrumbs): drop the ``⌊γ·n⌋`` largest entries and then the smallest, keeping
  ``⌊density·n⌋`` (fewer outliers dropped when both do not fit).
* ``random`` (DARE): keep each entry with probability ``density`` (rounded to the working dtype, as PyTorch's
  ``full_like`` does).
* ``della_magprune`` (DELLA): keep entry ``j`` of a row with probability ``density − ε + 2ε·(rank_j − 1)/(n − 1)``,
  ``rank`` its position by ``|τ|`` within the row.

With ``rescale`` the kept entries are scaled so the L1 norm of the task vector is unchanged (MergeKit's
``RescaleNorm.l1``; not DARE's ``1/density``). Ranks here break ties by position (a stable sort); MergeKit's
``argsort`` is not stable, and the recipe runner reproduces its choice among entries tied at the cut on the host
(:mod:`catmerge_jax.mergekit.tie_order`), passing the kept entries in as a mask.

The selections take an optional precomputed :class:`~catmerge_jax.mergekit.selection.Cut` (found with NumPy for
concrete CPU arrays, much faster than any sort under XLA:CPU); without one they are found in the graph.

>>> import jax.numpy as jnp
>>> tau = jnp.array([0.5, -2.0, 0.1, 1.0])
>>> magnitude(tau, keep_count(0.5, 4)).tolist()
[0.0, -2.0, 0.0, 1.0]
>>> magnitude_outliers(tau, *outlier_counts(0.5, 0.25, 4)).tolist()     # the largest (|-2|) is an outlier
[0.5, 0.0, 0.0, 1.0]
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.mergekit.selection import Cut, below_cut, rank_cut
from catmerge_jax.tree import is_tracer

__all__ = ["SPARSIFICATIONS", "keep_count", "outlier_counts", "magnitude", "magnitude_outliers", "bernoulli",
           "della_magprune", "rescaled", "magnitude_keys", "outlier_keys", "outlier_keys_host"]

SPARSIFICATIONS = ("magnitude", "random", "magnitude_outliers", "della_magprune")

Round = Callable[[jax.Array], jax.Array]


def _identity(x):
    return x


def _concrete(*xs) -> bool:
    return not any(is_tracer(x) for x in xs)


def keep_count(density: Any, n: int) -> Any:
    """``magnitude``'s number of kept entries: n if density ≥ 1, 0 if ≤ 0, else ``max(1, int(density·n))``.

    Exact (Python floats) for a concrete density; a traced one is evaluated in its own precision."""
    if _concrete(density):
        d = float(np.asarray(density))
        return n if d >= 1 else 0 if d <= 0 else max(1, int(d * n))
    d = jnp.asarray(density)
    return jnp.where(d >= 1, n, jnp.where(d <= 0, 0, jnp.maximum(1, jnp.floor(d * n)))).astype(jnp.int32)


def outlier_counts(density: Any, gamma: Any, n: int) -> tuple[Any, Any]:
    """``magnitude_outliers``' ascending-rank window ``[n_bot, n_bot + target)``: ``(n_bot, n_bot + target)``."""
    if _concrete(density, gamma):
        d, g = float(np.asarray(density)), float(np.asarray(gamma))
        if d >= 1:
            return 0, n
        target, top = int(d * n), int(g * n)
        bottom = max(0, n - target - top)
        return bottom, bottom + target
    d, g = jnp.asarray(density), jnp.asarray(gamma)
    target = jnp.floor(d * n).astype(jnp.int32)
    bottom = jnp.maximum(0, n - target - jnp.floor(g * n).astype(jnp.int32))
    return jnp.where(d >= 1, 0, bottom), jnp.where(d >= 1, n, bottom + target)


def outlier_keys(tau: jax.Array) -> jax.Array:
    """uint32 keys whose ascending order is ascending ``|τ|`` (the bits of a non-negative float are in order)."""
    return jax.lax.bitcast_convert_type(jnp.abs(tau).astype(jnp.float32), jnp.uint32)


def magnitude_keys(tau: jax.Array) -> jax.Array:
    """Keys whose ascending order is descending ``|τ|`` (ties: lower index first)."""
    return ~outlier_keys(tau)


def outlier_keys_host(tau: np.ndarray) -> np.ndarray:
    """:func:`outlier_keys` in NumPy."""
    return np.abs(np.asarray(tau, np.float32)).view(np.uint32)


def rescaled(tau: jax.Array, mask: jax.Array, rescale: bool, r: Round = _identity) -> jax.Array:
    """``τ·mask``, scaled to ``τ``'s L1 norm when ``rescale`` (unless either norm is below 1e-7), rounded as PyTorch
    rounds in the working dtype."""
    masked = jnp.where(mask, tau, 0).astype(tau.dtype)
    if not rescale:
        return masked
    before = r(jnp.sum(jnp.abs(tau)))
    after = r(jnp.sum(jnp.abs(masked)))
    small = (before < 1e-7) | (after < 1e-7)
    scale = r(before / jnp.where(small, 1, after))
    return jnp.where(small, masked, r(masked * scale))


def magnitude(tau: jax.Array, count: Any, *, rescale: bool = False, r: Round = _identity,
              cut: Cut | None = None) -> jax.Array:
    """TIES' trim: the ``count`` entries of largest magnitude (:func:`keep_count`), optionally L1-rescaled."""
    keys = magnitude_keys(tau)
    mask = below_cut(keys, rank_cut(keys, count) if cut is None else cut)
    return rescaled(tau, mask, rescale, r)


def magnitude_outliers(tau: jax.Array, low: Any, high: Any, *, rescale: bool = False, r: Round = _identity,
                       cuts: tuple[Cut, Cut] | None = None) -> jax.Array:
    """Breadcrumbs: entries with ascending-|τ| rank in ``[low, high)`` (:func:`outlier_counts`)."""
    keys = outlier_keys(tau)
    lo, hi = (rank_cut(keys, low), rank_cut(keys, high)) if cuts is None else cuts
    mask = below_cut(keys, hi) & ~below_cut(keys, lo)
    return rescaled(tau, mask, rescale, r)


def _sample_rounding(work_dtype: Any) -> Round:
    """MergeKit draws its random masks in bf16 for bf16 tensors and in float32 otherwise (also for float16)."""
    from catmerge_jax.mergekit.precision import rounder

    return rounder(work_dtype) if np.dtype(work_dtype) == jnp.bfloat16 else _identity


def bernoulli(tau: jax.Array, density: Any, key: jax.Array, *, rescale: bool = False,
              work_dtype: Any = np.float32) -> jax.Array:
    """DARE's drop: keep each entry with probability ``density`` (all when density ≥ 1); L1-rescale if asked."""
    r = _sample_rounding(work_dtype)
    p = r(jnp.asarray(density, tau.dtype))
    mask = jax.random.uniform(key, tau.shape, tau.dtype) < p
    out = rescaled(tau, mask, rescale, r)
    return jnp.where(p >= 1, tau, out)


def della_magprune(tau: jax.Array, density: Any, epsilon: Any, key: jax.Array, *, rescale: bool = False,
                   work_dtype: Any = np.float32) -> jax.Array:
    """DELLA's MAGPRUNE: per row (a vector is one row), keep probabilities rising linearly with the rank of |τ|
    from ``density − ε`` to ``density + ε``; all kept if density ≥ 1, none if ≤ 0. ``density ± ε`` must lie in
    (0, 1) (checked by the callers, where the values are concrete)."""
    r = _sample_rounding(work_dtype)
    rows = tau.reshape(1, -1) if tau.ndim < 2 else tau
    order = jnp.argsort(jnp.abs(rows), axis=1, stable=True)
    ranks = r((jnp.argsort(order, axis=1, stable=True) + 1).astype(tau.dtype))
    n = rows.shape[1]
    span = r(jnp.asarray(n - 1, tau.dtype))
    rank_norm = jnp.clip(r(r(ranks - 1) / span), 0, 1)
    d = jnp.asarray(density, tau.dtype)
    e = jnp.asarray(epsilon, tau.dtype)
    probs = r((d - e) + r(r(rank_norm * 2) * e))
    mask = jax.random.uniform(key, rows.shape, tau.dtype) < probs
    out = rescaled(rows, mask, rescale, r).reshape(tau.shape)
    return jnp.where(d >= 1, tau, jnp.where(d <= 0, 0, out)).astype(tau.dtype)
