"""LAPACK on the host for the CPU backend: the selected-eigenpair and factored solves behind
:func:`catmerge_jax.linalg.eigh_largest` and :func:`catmerge_jax.linalg.factored_largest`, spread over the cores.

A merge hands the host a batch of independent problems (every layer of a group, every task). Two things decide how
fast they run on a small CPU:

* **Whole problems per core.** LAPACK's tridiagonalisation (``sytrd``) is half matrix-vector products, which a
  multithreaded BLAS splits poorly at CAT's sizes; one problem per core with a single-threaded BLAS runs 2.2×
  faster on 2 cores (72 ``sytrd`` of 384 × 384: 0.11 s against 0.24 s for the batch in sequence with 2 BLAS
  threads). So :func:`each_problem` gives each worker thread its share of the batch and sets the BLAS libraries to
  one thread (``threadpoolctl``) while they run, restoring the count afterwards.
* **No GIL in the heavy calls.** SciPy's ``scipy.linalg.lapack`` wrappers hold the GIL, so threads calling them
  take turns. The heavy kernels (``sytrd``, ``geqrf``, ``syrk``) are called through the C entry points that
  ``scipy.linalg.cython_lapack``/``cython_blas`` export (the LAPACK SciPy links, whatever it is), with ``ctypes``,
  which releases the GIL for the call. The light ones (bisection, inverse iteration, applying reflectors) keep
  SciPy's wrappers.

Everything here takes and returns NumPy arrays; the JAX side is in :mod:`catmerge_jax.linalg`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["lower_largest", "symmetric_largest", "weighted_gram_lower", "factored_one", "each_problem", "workers",
           "spread"]

_INT = ctypes.POINTER(ctypes.c_int)
_PTR = ctypes.c_void_p
# One limited section at a time: the BLAS thread count is process-wide, and two overlapping set/restore pairs could
# restore in the wrong order and leave it at one thread. Concurrent batches would compete for the same cores anyway.
_ONE_AT_A_TIME = threading.Lock()


@functools.lru_cache(maxsize=None)
def _entry(module: str, name: str, *argtypes) -> Callable:
    """The C function ``name`` exported by ``scipy.linalg.<module>`` (a capsule of its ``__pyx_capi__``) as a
    ``ctypes`` function, which releases the GIL while it runs."""
    import importlib

    capsule = importlib.import_module(f"scipy.linalg.{module}").__pyx_capi__[name]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return ctypes.CFUNCTYPE(None, *argtypes)(api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule)))


def _prefix(dtype: np.dtype) -> str:
    if dtype == np.float32:
        return "s"
    if dtype == np.float64:
        return "d"
    raise TypeError(f"host LAPACK takes float32 or float64, got {dtype}")


def _ints(*values: int):
    return [ctypes.byref(ctypes.c_int(v)) for v in values]


def _sytrd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(d, e, tau, info)``: ``a`` (Fortran order, lower triangle; overwritten by the reflectors) reduced to
    tridiagonal form."""
    n = a.shape[0]
    d, e, tau = np.empty(n, a.dtype), np.empty(max(n - 1, 1), a.dtype), np.empty(max(n - 1, 1), a.dtype)
    lwork = 64 * n  # LAPACK's blocked reduction wants n·nb; 64 ≥ every nb ilaenv picks
    work, info = np.empty(lwork, a.dtype), ctypes.c_int(0)
    fn = _entry("cython_lapack", _prefix(a.dtype) + "sytrd", ctypes.c_char_p, _INT, _PTR, _INT, _PTR, _PTR, _PTR,
                _PTR, _INT, _INT)
    n_ref, lda, lwork_ref = _ints(n, n, lwork)
    fn(b"L", n_ref, a.ctypes.data, lda, d.ctypes.data, e.ctypes.data, tau.ctypes.data, work.ctypes.data, lwork_ref,
       ctypes.byref(info))
    return d, e[:n - 1], tau[:n - 1], info.value


def _geqrf(a: np.ndarray) -> tuple[np.ndarray, int]:
    """``(tau, info)``: the Householder QR of ``a`` (Fortran order ``(rows, cols)``, overwritten by R and the
    reflectors), blocked."""
    rows, cols = a.shape
    tau = np.empty(min(rows, cols), a.dtype)
    lwork = 64 * cols
    work, info = np.empty(lwork, a.dtype), ctypes.c_int(0)
    fn = _entry("cython_lapack", _prefix(a.dtype) + "geqrf", _INT, _INT, _PTR, _INT, _PTR, _PTR, _INT, _INT)
    m_ref, n_ref, lda, lwork_ref = _ints(rows, cols, rows, lwork)
    fn(m_ref, n_ref, a.ctypes.data, lda, tau.ctypes.data, work.ctypes.data, lwork_ref, ctypes.byref(info))
    return tau, info.value


def _syrk_lower(alpha: float, a: np.ndarray, c: np.ndarray) -> None:
    """``c += alpha · a aᵀ`` in the lower triangle of ``c`` (Fortran order ``(n, n)``), for Fortran-ordered ``a``
    ``(n, k)``."""
    n, depth = a.shape
    scalar = ctypes.c_float if a.dtype == np.float32 else ctypes.c_double
    fn = _entry("cython_blas", _prefix(a.dtype) + "syrk", ctypes.c_char_p, ctypes.c_char_p, _INT, _INT, _PTR, _PTR,
                _INT, _PTR, _PTR, _INT)
    n_ref, k_ref, lda, ldc = _ints(n, depth, n, n)
    fn(b"L", b"N", n_ref, k_ref, ctypes.byref(scalar(alpha)), a.ctypes.data, lda, ctypes.byref(scalar(1.0)),
       c.ctypes.data, ldc)


def _numpy_largest(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    values, vectors = np.linalg.eigh(m)
    return values[::-1][:k], vectors[:, ::-1][:, :k], float(max(abs(values[-1]), abs(values[0])))


def lower_largest(lower: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The k largest eigenpairs ``(values (k,) decreasing, vectors (n, k), ‖G‖₂)`` of the symmetric matrix held in
    the lower triangle of ``lower`` (Fortran order; overwritten), by LAPACK's selected-eigenpair route (what
    ``syevx`` does): Householder tridiagonalisation (``sytrd``), bisection for the wanted eigenvalues (``stebz``,
    at the most accurate tolerance), inverse iteration for their vectors (``stein``), back-transformation
    (``ormqr``). The bisection also gives the smallest eigenvalue, so ``‖G‖₂`` comes for free. A non-finite matrix
    gives NaN (as a traced eigh does; the merge's value checks name the leaf)."""
    from scipy.linalg import get_lapack_funcs

    lower = np.asfortranarray(lower)  # (LAPACK's layout: a copy only if it is not already)
    n = lower.shape[0]
    triangle = np.tril(lower)
    if not np.all(np.isfinite(triangle)):
        return np.full((k,), np.nan, lower.dtype), np.full((n, k), np.nan, lower.dtype), float("nan")

    def full_decomposition():
        return _numpy_largest(triangle + np.tril(triangle, -1).T, k)

    if k == n:  # nothing to select (and LAPACK's wrappers want n > 1)
        return full_decomposition()
    d, e, tau, info = _sytrd(lower)
    stebz, stein, ormqr = get_lapack_funcs(("stebz", "stein", "ormqr"), (lower,))
    tol = 2.0 * np.finfo(lower.dtype).tiny
    found, w, iblock, isplit, info_values = stebz(d, e, 3, 0.0, 0.0, n - k + 1, n, tol, "B")
    vectors, info_vectors = stein(d, e, w[:found], iblock, isplit)
    if info or info_values or info_vectors or found != k:  # LAPACK could not do it this way
        return full_decomposition()
    # T = Qᵀ m Q with Q = H(1)…H(n−1) stored below the subdiagonal of `lower` (LAPACK's orgtr layout); n > k ≥ 1
    vectors[1:] = ormqr("L", "N", lower[1:, :-1], tau, vectors[1:], 64 * k)[0]
    lowest = stebz(d, e, 3, 0.0, 0.0, 1, 1, tol, "E")[1][0]
    w = w[:found]
    order = np.argsort(-w, kind="stable")
    return w[order], vectors[:, order], float(max(abs(w[order[0]]), abs(lowest)))


def symmetric_largest(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`lower_largest` of a full matrix ``(n, n)``, symmetrized first."""
    m = 0.5 * (m + m.T)
    return lower_largest(m.T, k)  # the transpose of a symmetric C-ordered array: Fortran order, no copy


def weighted_gram_lower(z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``Zᵀ diag(w) Z`` ``(n, n)`` for ``z (m, n)``, Fortran order, in its lower triangle only (the upper one is
    zero): one symmetric rank-update (``syrk``, half a product's flops) per sign of ``w``; rows of weight 0 cost
    nothing."""
    n = z.shape[1]
    gram = np.zeros((n, n), z.dtype, order="F")
    for sign in (1.0, -1.0):
        picked = sign * weights > 0
        if picked.any():
            rows = np.ascontiguousarray(z[picked] * np.sqrt(sign * weights[picked]).astype(z.dtype)[:, None])
            _syrk_lower(sign, rows.T, gram)  # rows.T: the Fortran-ordered (n, rows) operand, no copy
    return gram


def factored_one(z: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The k largest eigenpairs of ``Zᵀ diag(w) Z`` for ONE ``z (m, n)`` (see
    :func:`catmerge_jax.linalg.factored_largest`): with ``m ≥ n`` the matrix itself (:func:`weighted_gram_lower`);
    otherwise the QR ``Zᵀ = QR`` (``geqrf``), the core ``R diag(w) Rᵀ``, and Q's reflectors applied to the k
    vectors only (``ormqr``)."""
    from scipy.linalg import get_lapack_funcs

    z = np.ascontiguousarray(z)
    m, n = z.shape
    if m >= n:  # nothing to gain from a QR
        return lower_largest(weighted_gram_lower(z, weights), k)
    packed = z.T.copy(order="F")  # (n, m), overwritten by R and the reflectors
    taus, info = _geqrf(packed)
    # the core Σ_j w_j r_j r_jᵀ over the columns r_j of R, by the same rank-updates
    values, small, scale = lower_largest(weighted_gram_lower(np.triu(packed[:m]).T, weights), k)
    padded = np.zeros((n, k), z.dtype, order="F")
    padded[:m] = small
    ormqr = get_lapack_funcs("ormqr", (packed,))
    vectors, _, info_apply = ormqr("L", "N", packed, taus, padded, lwork=64 * k)
    if info or info_apply:  # pragma: no cover - only for invalid arguments, which the shapes above rule out
        raise RuntimeError(f"LAPACK geqrf/ormqr failed (info {info}, {info_apply})")
    return values, vectors, scale


def workers() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def each_problem(solve: Callable, k: int, n: int, lead: tuple[int, ...], dtype: np.dtype, *flat: np.ndarray,
                 threads: int | None = None):
    """``solve(*operands_j, k) -> (values (k,), vectors (n, k), scale)`` for every problem j of the flattened
    operands ``flat`` (leading axis j), stacked back to ``(values (*lead, k), vectors (*lead, n, k), scale (*lead))``.

    With more than one problem and core, ``threads`` (default: :func:`workers`) threads take the problems in turn,
    each with a one-thread BLAS (set through ``threadpoolctl`` for the duration, then restored)."""
    count = flat[0].shape[0]
    values, vectors, scale = np.empty((count, k), dtype), np.empty((count, n, k), dtype), np.empty((count,), dtype)

    def run(j):
        values[j], vectors[j], scale[j] = solve(*(x[j] for x in flat), k)

    spread(run, range(count), min(workers() if threads is None else threads, count))
    return values.reshape(lead + (k,)), vectors.reshape(lead + (n, k)), scale.reshape(lead)


def spread(run: Callable[[int], Any], order: Sequence[int], threads: int) -> None:
    """``run(j)`` for every ``j`` of ``order``: in turn when ``threads <= 1``, else on ``threads`` worker threads
    (taking ``order`` in order) with a one-thread BLAS for the duration, then restored. A worker's exception is
    raised here."""
    if threads <= 1:
        for j in order:
            run(j)
        return
    from threadpoolctl import threadpool_limits

    with _ONE_AT_A_TIME, threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, order))  # list(): re-raises a worker's exception here
