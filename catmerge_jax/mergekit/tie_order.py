"""Which of several *equal* entries a magnitude selection keeps: PyTorch's CPU order, reproduced in NumPy.

MergeKit keeps the top entries of ``|τ|`` with ``torch.argsort(w, descending=True)[:k]`` (TIES),
``torch.sort(w).indices[lo:hi]`` (Breadcrumbs) and ``torch.topk(var, k)`` (SCE). None of these is stable: on CPU
PyTorch calls libstdc++'s ``std::sort`` (introsort: median-of-3 Hoare partitions down to segments of 16, then
insertion sort) and ``std::nth_element`` (introselect) on (value, index) pairs. Both are deterministic, so which
tied entries land before the cut is a function of the data alone, and it can be reproduced without sorting: follow
the partitions only into the segment that holds the cut (quickselect's path, O(n) expected), then order that
last segment as the final insertion sort does (stably). Exactly PyTorch's selection, without PyTorch and faster
than its sort; checked against ``torch`` in ``tests/test_mergekit.py``.

Two orders, a value passed down to the selections (``tie_order=``):

* ``"stable"``: ties to the lower flat index (a stable sort). The jittable in-graph selections use it.
* ``"pytorch"``: PyTorch's CPU order (what MergeKit gets), for concrete arrays on the host.

Keys are ``uint32`` whose ascending order is the wanted one (:func:`ascending_keys`); a comparator on them gives
the same answers as PyTorch's on the float values, so the algorithm takes the same steps.

>>> import numpy as np
>>> w = np.array([1, 2, 2, 2, 0, 2, 3, 2] * 4, np.float32)           # many exact ties at the cut
>>> stable = np.flatnonzero(head_mask(ascending_keys(w, descending=True), 6, "stable"))
>>> ours = np.flatnonzero(head_mask(ascending_keys(w, descending=True), 6, "pytorch"))
>>> stable.tolist(), ours.tolist()                  # ours: torch.argsort(w, descending=True)[:6], as a set
([1, 2, 6, 14, 22, 30], [1, 6, 14, 22, 30, 31])
"""

from __future__ import annotations

import warnings

import numpy as np

from catmerge_jax.errors import HyperparameterError

__all__ = ["TIE_ORDERS", "check_tie_order", "ascending_keys", "head_mask", "topk_mask", "splits_ties"]

TIE_ORDERS = ("stable", "pytorch")

_SORT_LEAF = 16        # libstdc++'s _S_threshold: std::sort leaves segments of at most 16 to insertion sort
_SELECT_LEAF = 3       # std::nth_element insertion-sorts segments of at most 3


def check_tie_order(tie_order: str) -> str:
    """``tie_order`` if it is one of :data:`TIE_ORDERS`; a one-line :class:`HyperparameterError` otherwise."""
    if tie_order not in TIE_ORDERS:
        raise HyperparameterError(f"tie_order: expected one of {', '.join(TIE_ORDERS)}, got {tie_order!r}")
    return tie_order


def ascending_keys(values: np.ndarray, *, descending: bool) -> np.ndarray:
    """Flat ``uint32`` keys of non-negative ``values`` (magnitudes, read as float32 as MergeKit's ``w.float()``)
    whose ascending order is the values' ascending (or ``descending``) order. A (positive) NaN gets the largest
    bits: last ascending, first descending, where PyTorch's comparators put it."""
    w = np.ascontiguousarray(values, np.float32).reshape(-1)
    bits = (w + np.float32(0)).view(np.uint32)          # + 0 turns -0.0 into +0.0 (equal values, equal keys)
    return ~bits if descending else bits


def _stable_head(keys: np.ndarray, m: int) -> tuple[np.ndarray, bool]:
    """Mask of the ``m`` smallest keys, ties to the lower index (linear time: a partition, not a sort), and
    whether that cut splits a group of equal keys (only then does the tie order matter)."""
    if m <= 0 or m >= keys.size:
        return np.full(keys.size, m > 0), False
    cut = np.partition(keys, m - 1)[m - 1]
    mask = keys < cut
    ties = np.flatnonzero(keys == cut)
    room = m - int(np.count_nonzero(mask))
    mask[ties[:room]] = True
    return mask, ties.size > room


def splits_ties(keys: np.ndarray, m: int) -> bool:
    """Whether the ``m`` smallest keys end inside a group of equal keys."""
    return _stable_head(np.asarray(keys).reshape(-1), int(m))[1]


_LOW = np.uint64(0xFFFFFFFF)


def _median_to_first(seg: np.ndarray, a: int, b: int, c: int) -> None:
    """libstdc++'s ``__move_median_to_first(seg, a, b, c)`` on packed ``key << 32 | index`` entries."""
    ka, kb, kc = seg[a] >> 32, seg[b] >> 32, seg[c] >> 32
    if ka < kb:
        pick = b if kb < kc else c if ka < kc else a
    else:
        pick = a if ka < kc else c if kb < kc else b
    seg[[0, pick]] = seg[[pick, 0]]


def _partition(seg: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """libstdc++'s ``__unguarded_partition_pivot`` of a whole segment, vectorized: ``(cut, lo, hi)``, the
    positions the partition swaps pairwise (``lo`` all below ``cut``, ``hi`` all at or above); the swaps are left
    to the caller, which only builds the side it descends into.

    The left scan stops at keys ≥ pivot, the right one at keys ≤ pivot, and the k-th stops of the two scans are
    swapped until they cross. The scans only read entries no swap has touched yet, so the stops are those of the
    segment before any swap."""
    _median_to_first(seg, 1, seg.size // 2, seg.size - 1)
    pivot = seg[0] >> 32
    keys = seg[1:] >> 32
    left = np.flatnonzero(keys >= pivot)
    right = np.flatnonzero(keys <= pivot)[::-1]
    n = min(left.size, right.size)
    crossed = np.flatnonzero(left[:n] >= right[:n])
    k = int(crossed[0]) if crossed.size else n
    # the k-th left scan stops at its k-th stop, or at the (k−1)-th right stop (now holding a key ≥ pivot)
    cut = min(int(left[k]) if k < left.size else seg.size, int(right[k - 1]) if k > 0 else seg.size)
    return cut + 1, left[:k] + 1, right[:k] + 1


def _index(packed: np.ndarray) -> np.ndarray:
    return (packed & _LOW).view(np.int64)


def _first_m(keys: np.ndarray, m: int, leaf: int) -> np.ndarray | None:
    """Mask of the entries at positions ``< m`` after libstdc++'s introsort (``leaf=16``) or introselect of
    ``nth = m − 1`` (``leaf=3``) of ``keys``: the two run the same partitions and differ only in where they stop,
    and the final insertion sort is stable. Follows only the segment holding position ``m``; None where
    libstdc++ would switch to heapsort (depth budget spent)."""
    n = keys.size
    seg = keys.astype(np.uint64)
    seg <<= np.uint64(32)
    seg |= np.arange(n, dtype=np.uint64)
    mask = np.zeros(n, bool)
    start, depth = 0, _depth_limit(n)            # seg holds positions [start, start + seg.size) ∋ m
    while seg.size > leaf:
        if depth == 0:
            return None
        depth -= 1
        cut, lo, hi = _partition(seg)
        if m < start + cut:                      # descend left: the swaps bring hi's entries down
            child = seg[:cut].copy()
            child[lo] = seg[hi]
        else:                                    # the left part ends before m: all of it is kept
            mask[_index(seg[:cut])] = True
            mask[_index(seg[lo])] = False
            mask[_index(seg[hi])] = True
            if m == start + cut:
                return mask
            child = seg[cut:].copy()
            child[hi - cut] = seg[lo]
            start += cut
        seg = child
    order = np.argsort(seg >> np.uint64(32), kind="stable")
    mask[_index(seg[order[:m - start]])] = True
    return mask


def _depth_limit(n: int) -> int:
    return 2 * (int(n).bit_length() - 1)       # 2·⌊log2 n⌋, libstdc++'s introsort/introselect budget


def _torch_order(keys: np.ndarray, m: int, select: bool) -> np.ndarray:
    """PyTorch itself, where libstdc++ leaves quicksort's partitions (heapsort once introsort's depth budget is
    spent; ``std::partial_sort`` for a ``topk`` of under 1/64 of the entries). Without PyTorch (the optional
    ``[torch]`` extra): the stable order, with a warning."""
    try:
        import torch
    except ImportError:
        warnings.warn("tie_order='pytorch' needs PyTorch for this selection (heapsort/partial_sort case); "
                      "keeping ties to the lower index", RuntimeWarning, stacklevel=3)
        return _stable_head(keys, m)[0]

    t = torch.from_numpy(keys.astype(np.float64))     # exact, same comparisons: same steps
    order = torch.topk(-t, m).indices if select else torch.sort(t).indices[:m]
    mask = np.zeros(keys.size, bool)
    mask[order.numpy()] = True
    return mask


def head_mask(keys: np.ndarray, m: int, tie_order: str = "pytorch") -> np.ndarray:
    """Boolean mask (flat) of the first ``m`` entries of ``keys`` sorted ascending: ``np.argsort(keys,
    kind="stable")[:m]`` for ``"stable"``; for ``"pytorch"`` the first ``m`` of ``std::sort`` (what
    ``torch.sort``/``torch.argsort`` return on CPU for the float values the keys were made from)."""
    keys = np.asarray(keys, np.uint32).reshape(-1)
    m = int(min(max(m, 0), keys.size))
    stable, split = _stable_head(keys, m)
    if check_tie_order(tie_order) == "stable" or not split:
        return stable                          # no tie straddles the cut: every order keeps the same entries
    mask = _first_m(keys, m, _SORT_LEAF)
    return _torch_order(keys, m, select=False) if mask is None else mask


def topk_mask(keys: np.ndarray, k: int, tie_order: str = "pytorch") -> np.ndarray:
    """Boolean mask (flat) of the ``k`` smallest ``keys`` as ``torch.topk`` picks them on CPU (``"pytorch"``:
    ``std::nth_element``, which it uses when ``64·k > n``; ``std::partial_sort`` otherwise, run by PyTorch itself
    here) or to the lower index (``"stable"``)."""
    keys = np.asarray(keys, np.uint32).reshape(-1)
    k = int(min(max(k, 0), keys.size))
    stable, split = _stable_head(keys, k)
    if check_tie_order(tie_order) == "stable" or not split:
        return stable
    mask = None if 64 * k <= keys.size else _first_m(keys, k, _SELECT_LEAF)
    return _torch_order(keys, k, select=True) if mask is None else mask
