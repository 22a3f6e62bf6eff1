"""Exact selections by rank inside ``jit``: the ``m`` smallest entries of a vector, ties to the lower index.

MergeKit sorts a whole tensor to keep its top entries (``argsort`` of ``|τ|``). A sort of tens of millions of
entries is slow on CPU, and ``lax.top_k`` slower still, so the rank of the cut is found with a radix selection on
the float bits instead: a 65536-bin histogram of the top 16 bits finds the bin holding the ``m``-th entry, a second
histogram of the low 16 bits inside that bin finds its exact value, and the same selection over the positions of
the entries equal to it breaks ties by position. A few linear passes, any ``m`` (traced or not), the same answer
as a stable sort.

>>> import jax.numpy as jnp
>>> smallest_mask(jnp.array([3.0, 1.0, 2.0, 1.0, 5.0]), 2).tolist()
[False, True, False, True, False]
>>> largest_mask(jnp.array([3.0, 1.0, 3.0, 3.0, 5.0]), 2).tolist()    # ties at the cut go to the lower index
[True, False, False, False, True]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Cut", "order_keys", "order_keys_host", "rank_cut", "rank_cut_host", "below_cut", "smallest_mask",
           "largest_mask", "smallest_key_mask", "key_at_rank", "value_at_rank"]

_BINS = 1 << 16


def order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with the order of float32 ``x`` (negatives: all bits flipped; others: sign bit set)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 != 0, ~bits, bits | jnp.uint32(0x80000000))


def _from_keys(keys: jax.Array) -> jax.Array:
    bits = jnp.where(keys >> 31 != 0, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _histogram(index: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    ones = jnp.ones(index.shape, jnp.int32) if weight is None else weight.astype(jnp.int32)
    return jnp.zeros(_BINS, jnp.int32).at[index.astype(jnp.int32)].add(ones, mode="drop")


def key_at_rank(keys: jax.Array, rank: jax.Array) -> jax.Array:
    """The key at 0-based ascending ``rank`` (clipped to the vector) of a flat uint32 ``keys`` vector."""
    keys = keys.reshape(-1)
    rank = jnp.clip(jnp.asarray(rank, jnp.int32), 0, keys.size - 1)
    high = keys >> 16
    cum = jnp.cumsum(_histogram(high))
    bin_ = jnp.searchsorted(cum, rank, side="right").astype(jnp.uint32)
    below = jnp.where(bin_ > 0, cum[jnp.maximum(bin_.astype(jnp.int32) - 1, 0)], 0)
    cum_low = jnp.cumsum(_histogram(keys & jnp.uint32(0xFFFF), high == bin_))
    low = jnp.searchsorted(cum_low, rank - below, side="right").astype(jnp.uint32)
    return (bin_ << 16) | low


def value_at_rank(x: jax.Array, rank: jax.Array) -> jax.Array:
    """The entry at 0-based ascending ``rank`` of ``x`` (flattened), as float32: ``jnp.sort(x.ravel())[rank]``."""
    return _from_keys(key_at_rank(order_keys(x.reshape(-1)), rank))


class Cut(NamedTuple):
    """Where a selection of the ``m`` smallest keys ends: every key below ``key``, and the keys equal to it up
    to flat index ``last`` (``-1``: none of them). Arrays of any batch shape (one cut per row)."""

    key: Any
    last: Any


def rank_cut(keys: jax.Array, m: jax.Array) -> Cut:
    """The :class:`Cut` of the ``m`` smallest entries of flat uint32 ``keys`` (traceable; two histograms each)."""
    flat = keys.reshape(-1)
    m = jnp.clip(jnp.asarray(m, jnp.int32), 0, flat.size)
    cut = key_at_rank(flat, m - 1)
    ties = flat == cut
    room = m - jnp.sum(flat < cut, dtype=jnp.int32)
    # the room-th tie by position, found by the same selection over the ties' indices (a running count over
    # millions of entries is far slower on XLA:CPU than two histograms)
    index = jnp.arange(flat.size, dtype=jnp.uint32)
    last = key_at_rank(jnp.where(ties, index, jnp.uint32(0xFFFFFFFF)), room - 1).astype(jnp.int32)
    return Cut(cut, jnp.where((room > 0) & (m > 0), last, -1))


def rank_cut_host(keys: np.ndarray, m: int) -> Cut:
    """:func:`rank_cut` of a concrete array with NumPy (``np.partition``: linear time, ~50x faster on CPU)."""
    flat = np.asarray(keys).reshape(-1)
    m = int(min(max(int(m), 0), flat.size))
    if m == 0:
        return Cut(np.uint32(0), np.int32(-1))
    cut = np.partition(flat, m - 1)[m - 1]
    room = m - int(np.count_nonzero(flat < cut))
    return Cut(np.uint32(cut), np.int32(np.flatnonzero(flat == cut)[room - 1]))


def below_cut(keys: jax.Array, cut: Cut) -> jax.Array:
    """Mask (shape of ``keys``) of the entries a :class:`Cut` selects."""
    index = jnp.arange(keys.size, dtype=jnp.int32).reshape(keys.shape)
    return (keys < cut.key) | ((keys == cut.key) & (index <= cut.last))


def smallest_key_mask(keys: jax.Array, m: jax.Array) -> jax.Array:
    """Boolean mask (shape of ``keys``) of the ``m`` smallest uint32 keys, ties to the lower flat index."""
    return below_cut(keys, rank_cut(keys, m))


def smallest_mask(x: jax.Array, m: jax.Array) -> jax.Array:
    """Mask of the ``m`` smallest entries of ``x`` (any shape, read flat), ties to the lower flat index."""
    return smallest_key_mask(order_keys(x), m)


def largest_mask(x: jax.Array, m: jax.Array) -> jax.Array:
    """Mask of the ``m`` largest entries of ``x``, ties to the lower flat index (a stable descending sort's
    first ``m``)."""
    return smallest_key_mask(~order_keys(x), m)


def order_keys_host(x: np.ndarray) -> np.ndarray:
    """:func:`order_keys` in NumPy."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return np.where(bits >> 31 != 0, ~bits, bits | np.uint32(0x80000000))
