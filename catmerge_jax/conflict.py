"""The conflict matrices ``G_k`` of CAT Merging and their top eigenvectors: how ``G_k`` is formed and solved.

``G_k = Σ_{i≠k} T_iᵀ (A_k − λ A_i) T_i`` (paper eq. 11) can be formed from the Grams ``A_k = X_kᵀX_k``
(``"gram"``), from the exemplar rows ``X_k`` (``"rows"``, cheaper when there are fewer rows than inputs), or never
formed (``"matrix_free"``, a block Krylov solve against ``v ↦ G_k v``); its top-c eigenvectors come from ``eigh`` or
the iterative solver. :func:`plan_linear` chooses all of this by flop count and returns it as ONE value, a
:class:`LinearPlan`, which :func:`linear_group_bases` executes for a group of same-shape layers. The merge itself
(:mod:`catmerge_jax.cat`) only hands plans to this module; nothing here depends on it.

>>> import jax, jax.numpy as jnp
>>> from catmerge_jax import conflict
>>> tvs = jax.random.normal(jax.random.key(0), (3, 6, 5))          # (K, in, out)
>>> rows = jax.random.normal(jax.random.key(1), (3, 4, 6))         # (K, n, in)
>>> grams = jnp.einsum("kna,knb->kab", rows, rows)
>>> a = conflict.cat_linear_bases(tvs, grams, lam=5.0, c=2)
>>> b = conflict.cat_linear_bases_from_rows(tvs, rows, lam=5.0, c=2)
>>> bool(jnp.allclose(a @ a.transpose(0, 2, 1), b @ b.transpose(0, 2, 1), atol=1e-4))  # same subspaces
True
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.linalg import (block_krylov_top, choose_solver, eigh_flops, eigh_largest, factored_largest,
                                 krylov_config, krylov_flops, map_batch, MIN_ITERATIVE_N)
from catmerge_jax.tree import gather, is_concrete

__all__ = ["GAP_FLOOR", "POSITIVE_RTOL", "LinearPlan", "plan_linear", "cat_linear_bases", "cat_linear_bases_from_rows",
           "conflict_matrices_from_grams", "conflict_matrices_from_rows", "top_with_gap", "gap_flags",
           "low_rank_bases", "positive_directions", "positive_bound", "keep_positive", "linear_group_bases"]

# --------------------------------------------------------------------------------------------------------------
# G_k of one layer, for every task. Pure functions of stacked (K, ...) arrays.
# --------------------------------------------------------------------------------------------------------------

def _others_weight(k: jax.Array, num_tasks: int, dtype: Any) -> jax.Array:
    """``(K,)``: 1 for every task i ≠ k, 0 for k."""
    return (jnp.arange(num_tasks) != k).astype(dtype)


@functools.partial(jax.jit, static_argnames=("c",))
def cat_linear_bases(task_vectors: jax.Array, grams: jax.Array, *, lam: float | jax.Array, c: int) -> jax.Array:
    """Removal bases of one linear layer for every task.

    Args:
      task_vectors: ``(K, in, out)`` task vectors ``T_i`` of the layer.
      grams: ``(K, in, in)`` input Grams ``A_k = X_kᵀ X_k`` of each task's exemplars.
      lam: λ ≥ 0, weight of the knowledge-preservation term.
      c: number of basis vectors (static), ``0 <= c <= out``.
    Returns:
      ``(K, out, c)``: ``B_k`` with orthonormal columns, the eigenvectors of
      ``G_k = Σ_{i≠k} T_iᵀ (A_k − λ A_i) T_i`` for its c largest eigenvalues (paper eq. 11).
    """
    return top_with_gap(conflict_matrices_from_grams(task_vectors, grams, lam), c)[0]


GAP_FLOOR = 32.0
"""An eigengap ``θ_c − θ_{c+1}`` below ``GAP_FLOOR · eps · ‖G‖`` cannot be resolved in the working precision: the
top-c subspace is then decided by rounding (warned about; ``precision="float64"`` resolves it)."""

POSITIVE_RTOL = 100.0 * float(np.finfo(np.float32).eps)
"""A direction counts as positive (worth removing) when its eigenvalue exceeds ``POSITIVE_RTOL`` times
``Σ_{i≠k} ‖X_k T_i‖² + λ‖X_i T_i‖²`` (an upper bound of ‖G_k‖). Exemplar statistics are stored in float32, whose
rounding makes a rank-deficient Gram slightly indefinite (eigenvalues ≈ 1e-7·‖G‖ either side of 0): 100 float32
epsilons keeps such noise from counting, also when the merge itself runs in float64."""


def gap_flags(values_desc: jax.Array, c: int, scale: jax.Array) -> jax.Array:
    """``(...,)`` True where the c-th eigenvalue is positive and its gap to the next one is unresolvable.

    ``values_desc``: ``(..., m)`` the largest eigenvalues in decreasing order (m ≥ c; with m == c there is no next
    one); ``scale``: ``(...,)`` ``‖G‖₂``, the largest absolute eigenvalue.
    """
    if c == 0 or values_desc.shape[-1] <= c:
        return jnp.zeros(values_desc.shape[:-1], bool)
    floor = GAP_FLOOR * jnp.finfo(values_desc.dtype).eps * scale
    theta_c, theta_next = values_desc[..., c - 1], values_desc[..., c]
    return (theta_c > floor) & (theta_c - theta_next <= floor)


def top_with_gap(matrix: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """Top-c eigenvectors ``(..., n, c)`` (exact, :func:`catmerge_jax.linalg.eigh_largest`) and the
    unresolvable-gap flags ``(...,)``."""
    vectors, _, unresolved = _top_values_gap(matrix, c)
    return vectors, unresolved


def _top_values_gap(matrix: jax.Array, c: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`top_with_gap` with the c eigenvalues ``(..., c)`` between: ``(vectors, values, unresolved)``."""
    if c == 0:
        return (jnp.zeros(matrix.shape[:-1] + (0,), matrix.dtype), jnp.zeros(matrix.shape[:-2] + (0,), matrix.dtype),
                jnp.zeros(matrix.shape[:-2], bool))
    values, vectors, scale = eigh_largest(matrix, min(c + 1, matrix.shape[-1]))  # one more: the gap
    return vectors[..., :c], values[..., :c], gap_flags(values, c, scale)


def positive_bound(y: jax.Array, lam: Any) -> jax.Array:
    """``(K,)``: ``Σ_{i≠k} ‖X_k T_i‖² + λ‖X_i T_i‖²`` (≥ ‖G_k‖₂, the scale of :data:`POSITIVE_RTOL`) from
    ``y[k, i] = X_k T_i`` ``(K, K, n, out)``."""
    return _bound_from_squares(jnp.sum(jnp.square(y), axis=(2, 3)), lam)


def keep_positive(bases: jax.Array, values: jax.Array, bound: jax.Array) -> jax.Array:
    """``bases (..., out, c)`` with each column whose eigenvalue ``values (..., c)`` is not above
    ``POSITIVE_RTOL · bound (...)`` zeroed: the rule of :func:`positive_directions`, from the solver's eigenvalues
    (``θ = bᵀ G_k b`` for an eigenvector) instead of recomputing ``bᵀ G_k b``."""
    keep = values > POSITIVE_RTOL * bound[..., None]
    return bases * keep[..., None, :].astype(bases.dtype)


def conflict_matrices_from_grams(task_vectors: jax.Array, grams: jax.Array, lam: Any) -> jax.Array:
    """``(K, out, out)``: every ``G_k`` from ``(K, in, out)`` task vectors and ``(K, in, in)`` Grams."""
    return _grams_conflict_and_bound(task_vectors, grams, lam)[0]


def _grams_conflict_and_bound(task_vectors: jax.Array, grams: jax.Array, lam: Any) -> tuple[jax.Array, jax.Array]:
    """Every ``G_k`` and its :func:`positive_bound` ``(K,)``, read off the traces of the two terms."""
    num_tasks = task_vectors.shape[0]
    # own[i] = T_iᵀ A_i T_i, the knowledge-preservation term of each task.
    own = jnp.einsum("iab,iac,icd->ibd", task_vectors, grams, task_vectors)
    own_total = own.sum(0)
    own_trace = jnp.trace(own, axis1=-2, axis2=-1)  # ‖X_i T_i‖²

    def one(k, gram_k):
        w = _others_weight(k, num_tasks, task_vectors.dtype)
        conflict = jnp.einsum("iab,ac,icd,i->bd", task_vectors, gram_k, task_vectors, w)
        bound = jnp.trace(conflict) + lam * (own_trace.sum() - own_trace[k])
        return conflict - lam * (own_total - own[k]), bound

    return jax.vmap(one)(jnp.arange(num_tasks), grams)


@functools.partial(jax.jit, static_argnames=("c",))
def cat_linear_bases_from_rows(task_vectors: jax.Array, rows: jax.Array, *, lam: float | jax.Array,
                               c: int) -> jax.Array:
    """:func:`cat_linear_bases` from the feature rows instead of their Grams (cheaper when ``n < in``).

    With ``Y_ki = X_k T_i`` (``n × out``), ``G_k = Σ_{i≠k} Y_kiᵀY_ki − λ Y_iiᵀY_ii = Z_kᵀ D Z_k`` where ``Z_k``
    stacks those ``m = 2(K−1)n`` rows and ``D = diag(1, …, −λ, …)``. When ``m + c < out`` the top-c eigenvectors
    are found exactly in the small invariant subspace ``range(Z_kᵀ)`` (plus c directions of the null space,
    which hold the eigenvalue 0 when fewer than c eigenvalues are positive): a thin QR and an
    ``(m + c)``-square ``eigh`` instead of an ``out``-square one. Otherwise ``G_k`` is formed and solved densely.

    Args:
      task_vectors: ``(K, in, out)``.
      rows: ``(K, n, in)`` feature rows ``X_k``; tasks with fewer rows are zero-padded (zero rows add nothing).
    Returns:
      ``(K, out, c)``, the same bases as from ``A_k = X_kᵀX_k``.
    """
    return rows_bases_with_gap(task_vectors, rows, lam, c)[0]


def rows_bases_with_gap(task_vectors: jax.Array, rows: jax.Array, lam: Any, c: int):
    num_tasks, n = rows.shape[0], rows.shape[1]
    out = task_vectors.shape[-1]
    if 2 * (num_tasks - 1) * n + c < out:
        return low_rank_bases_with_gap(task_vectors, rows, lam, c)
    return top_with_gap(conflict_matrices_from_rows(task_vectors, rows, lam), c)


def low_rank_bases(task_vectors: jax.Array, rows: jax.Array, lam: Any, c: int) -> jax.Array:
    """Exact top-c eigenvectors of every ``G_k = Z_kᵀ D Z_k`` inside ``range(Z_kᵀ)`` plus c null directions."""
    return low_rank_bases_with_gap(task_vectors, rows, lam, c)[0]


def low_rank_bases_with_gap(task_vectors: jax.Array, rows: jax.Array, lam: Any, c: int):
    """``(bases (K, out, c), unresolved (K,))`` by the low-rank path."""
    if c == 0:
        num_tasks, out = task_vectors.shape[0], task_vectors.shape[-1]
        return jnp.zeros((num_tasks, out, 0), task_vectors.dtype), jnp.zeros((num_tasks,), bool)
    z, d, _ = _low_rank_factors(task_vectors, rows, lam, c)
    bases, _, unresolved = _factored_top(z, d, c)
    return bases, unresolved


def _low_rank_factors(task_vectors: jax.Array, rows: jax.Array, lam: Any, c: int):
    """``(Z (K, m, out), d (K, m), bound (K,))`` with ``G_k = Z_kᵀ diag(d_k) Z_k``, ``m = 2(K−1)n + c``: the c extra
    rows of weight 0 make the factored subspace contain c null-space directions of ``G_k``, so the eigenvalue 0 is
    represented whenever it belongs to the top c. Fixed, so results are deterministic."""
    extra = jax.random.normal(jax.random.key(0), (c, task_vectors.shape[-1]), task_vectors.dtype)
    return _rows_factors(task_vectors, rows, lam, extra)


def _outputs_by_task(task_vectors: jax.Array, rows: jax.Array) -> jax.Array:
    """``(K_i, K_k, n, out)``: ``[i, k] = X_k T_i``, as one ``(K·n, in) @ (in, out)`` product per task vector.
    XLA:CPU runs these plain products 1.7–2.3× faster than the single batched einsum ``kna,iab->kinb``, whose
    operand and result transposes it materializes (measured for MiniLM's three layer shapes, K = 3, n = 96)."""
    num_tasks, n, fan_in = rows.shape
    flat = rows.reshape(num_tasks * n, fan_in)
    return jnp.stack([flat @ task_vectors[i] for i in range(num_tasks)]).reshape(num_tasks, num_tasks, n, -1)


def _bound_from_squares(sq: jax.Array, lam: Any) -> jax.Array:
    """:func:`positive_bound` from ``sq[k, i] = ‖X_k T_i‖²`` ``(K, K)``."""
    own = jnp.diagonal(sq)
    return sq.sum(1) - own + lam * (own.sum() - own)


def _rows_factors(task_vectors: jax.Array, rows: jax.Array, lam: Any, extra: jax.Array | None = None):
    """``(Z (K, m, out), d (K, m), bound (K,))`` with ``G_k = Z_kᵀ diag(d_k) Z_k``: the ``m = 2(K−1)n`` rows
    ``X_k T_i`` (weight 1) and ``X_i T_i`` (weight −λ) of the K − 1 other tasks, then ``extra`` rows of weight 0."""
    num_tasks, n = rows.shape[0], rows.shape[1]
    y = _outputs_by_task(task_vectors, rows)  # y[i, k] = X_k T_i
    dtype = y.dtype
    tail = [] if extra is None else [extra]
    # Only the K − 1 other tasks' rows: both terms exclude i = k, and every row left in costs the solve (the size
    # the plan's cost model assumes). K is static: plain slices, no gathers.
    z = jnp.stack([jnp.concatenate([y[i, k] for i in range(num_tasks) if i != k]
                                   + [y[i, i] for i in range(num_tasks) if i != k] + tail)
                   for k in range(num_tasks)])
    ones = jnp.ones(((num_tasks - 1) * n,), dtype)
    d = jnp.concatenate([ones, -lam * ones] + [jnp.zeros((len(t),), dtype) for t in tail])
    sq = jnp.sum(jnp.square(y), axis=(2, 3)).T  # [k, i] = ‖X_k T_i‖²
    return z, jnp.broadcast_to(d, z.shape[:2]), _bound_from_squares(sq, lam)


def _factored_top(z: jax.Array, d: jax.Array, c: int):
    """``(bases (..., out, c), values (..., c), unresolved (...))`` of ``Zᵀ diag(d) Z`` (:func:`_rows_factors`)."""
    values, vectors, scale = factored_largest(z, d, min(c + 1, *z.shape[-2:]))  # one more: the gap
    return vectors[..., :c], values[..., :c], gap_flags(values, c, scale)


@functools.partial(jax.jit, static_argnames=("form",))
def positive_directions(task_vectors: jax.Array, data: jax.Array, bases: jax.Array, *, lam: float | jax.Array,
                        form: str) -> jax.Array:
    """The bases with every direction whose eigenvalue of ``G_k`` is not positive zeroed (inert).

    Removing ``b`` from every ``T_i`` (i ≠ k) changes the paper's objective (eq. 10) by exactly ``bᵀ G_k b``, so a
    direction with eigenvalue ≤ 0 cannot lower it; when ``G_k`` has fewer than c positive eigenvalues (few
    exemplar rows, small K) such columns are arbitrary null-space directions that depend on the solver. A column
    is kept when ``bᵀG_kb > POSITIVE_RTOL · Σ_{i≠k} (‖X_kT_i‖² + λ‖X_iT_i‖²)``.

    Args:
      task_vectors: ``(K, in, out)``.
      data: ``(K, n, in)`` rows (``form="rows"``) or ``(K, in, in)`` Grams (``form="gram"``).
      bases: ``(K, out, c)``.
    Returns:
      ``(K, out, c)``.
    """
    num_tasks = task_vectors.shape[0]
    tb = jnp.einsum("iab,kbc->kiac", task_vectors, bases)  # T_i B_k
    if form == "rows":
        y_cross = jnp.einsum("kna,kiac->kinc", data, tb)  # X_k T_i B_k
        y_own = jnp.einsum("ina,kiac->kinc", data, tb)  # X_i T_i B_k
        cross, own = jnp.sum(y_cross ** 2, axis=2), jnp.sum(y_own ** 2, axis=2)  # (k, i, c)
        fro_cross = jnp.einsum("kna,iab->kinb", data, task_vectors)
        fro_cross = jnp.sum(fro_cross ** 2, axis=(2, 3))  # ‖X_k T_i‖² (k, i)
    else:
        cross = jnp.einsum("kiac,kab,kibc->kic", tb, data, tb)  # (T_iB_k)ᵀ A_k (T_iB_k)
        own = jnp.einsum("kiac,iab,kibc->kic", tb, data, tb)  # (T_iB_k)ᵀ A_i (T_iB_k)
        fro_cross = jnp.einsum("kab,iab->ki", data, jnp.einsum("iac,ibc->iab", task_vectors, task_vectors))
    others = (jnp.arange(num_tasks)[:, None] != jnp.arange(num_tasks)[None, :]).astype(bases.dtype)  # (k, i)
    fro_own = jnp.diagonal(fro_cross)  # ‖X_i T_i‖²
    value = jnp.einsum("ki,kic->kc", others, cross - lam * own)
    bound = jnp.einsum("ki,ki->k", others, fro_cross + lam * fro_own[None, :])
    keep = value > POSITIVE_RTOL * bound[:, None]
    return bases * keep[:, None, :].astype(bases.dtype)


def symmetric_gram(z: jax.Array) -> jax.Array:
    """``zᵀz`` for ``z (rows, d)``; for wide ``d`` from three of its four column blocks (¾ of the flops)."""
    d = z.shape[-1]
    if d < 1024:
        return z.T @ z
    h = d // 2
    a, b = z[:, :h], z[:, h:]
    upper = a.T @ b
    return jnp.block([[a.T @ a, upper], [upper.T, b.T @ b]])


def conflict_matrices_from_rows(task_vectors: jax.Array, rows: jax.Array, lam: Any) -> jax.Array:
    """``(K, out, out)``: every ``G_k`` from ``(K, in, out)`` task vectors and ``(K, n, in)`` rows."""
    return _rows_conflict_and_bound(task_vectors, rows, lam)[0]


def _rows_conflict_and_bound(task_vectors: jax.Array, rows: jax.Array, lam: Any) -> tuple[jax.Array, jax.Array]:
    """Every ``G_k`` and its :func:`positive_bound` ``(K,)``."""
    num_tasks, out = task_vectors.shape[0], task_vectors.shape[-1]
    # Y[k, i] = X_k T_i  (K, K, n, out): the outputs each task-i edit causes on task k's exemplars.
    y = jnp.einsum("kna,iab->kinb", rows, task_vectors)
    own = jnp.einsum("iinb->inb", y)  # Y_ii
    own_total = symmetric_gram(own.reshape(-1, out))  # Σ_i Y_iiᵀ Y_ii

    def one(k):
        # Σ_{i≠k} Y_kiᵀ Y_ki as ONE ((K−1)·n)-deep product over the other tasks' blocks: a single large GEMM runs
        # several times faster on CPU than K − 1 separate n-deep ones (measured 5.7× at out = 3072).
        others = (k + 1 + jnp.arange(num_tasks - 1)) % num_tasks
        y_k = jnp.take(y[k], others, axis=0).reshape(-1, out)
        return symmetric_gram(y_k) - lam * (own_total - own[k].T @ own[k])

    # lax.map: one (out, out) product in flight at a time instead of K.
    return jax.lax.map(one, jnp.arange(num_tasks)), positive_bound(y, lam)


# --------------------------------------------------------------------------------------------------------------
# The plan and a group of same-shape layers (L, K, ...) solved in one call.
# --------------------------------------------------------------------------------------------------------------

THIN_PRODUCT_PENALTY = 4.0

ROWS_KRYLOV_PENALTY = 1.25
"""Cost per flop of the ``"rows_krylov"`` plan's thin (p = 16 column) products against a fat GEMM: about even with
both operands row-major (measured on 2 CPU cores, (2100, 3072) Z_k)."""

ROWS_KRYLOV_MAX_BYTES = 2 << 30
"""``"rows_krylov"`` holds every ``Y_ki = X_k T_i`` of a layer (``4·K²·n·out`` bytes); above this it is not chosen
by ``"auto"`` (the matrix-free plan forms nothing of that size)."""

MATRIX_FREE_OUTPUTS_BYTES = 256 << 20
"""The matrix-free plan applies ``G_k`` through the K² products ``Y_ki = X_k T_i`` only while they fit in this (and
are the cheaper way: fewer than ``in / 2`` rows); otherwise through the task vectors, forming nothing K-wide."""

MAX_EXPLICIT_OUT = 16384
"""Above this output width a layer whose statistics are rows is never solved through an explicit ``(out, out)``
``G_k`` (≥ 1 GiB of float32 per task), whatever the flop count says: an LLM's LM head (``(d, vocab)``, vocab 32 k –
256 k) takes the matrix-free or exact low-rank rows plan."""


class LinearPlan(NamedTuple):
    """How one group of linear layers is solved (all static).

    form: ``"gram"`` or ``"rows"`` — what the statistics are given as.
    strategy: ``"explicit"`` (build ``G_k``), ``"matrix_free"`` (rows only, Krylov on ``Zᵀ D Z``),
      ``"rows_krylov"`` (rows only, Krylov on ``Z_kᵀ D Z_k`` with ``Z_k`` and a row-major ``Z_kᵀ`` both stored: plain
      GEMMs per step, no ``(out, out)`` matrix) or ``"low_rank"`` (rows only, exact small eigenproblem in
      ``range(Zᵀ)``).
    solver: ``"eigh"`` or ``"iterative"``.
    flops: estimated flops per layer.
    """

    form: str
    strategy: str
    solver: str
    flops: float


def plan_linear(num_tasks: int, fan_in: int, fan_out: int, c: int, *, rows: int | None,
                solver: str = "auto", strategy: str = "auto") -> LinearPlan:
    """The cheapest way (by flop count) to get the bases of one ``(in, out)`` layer with K tasks.

    Args:
      rows: rows per task when the statistics are stored as rows (``None``: Grams only).
      solver: ``"auto"``, ``"eigh"`` or ``"iterative"``.
      strategy: ``"auto"``, ``"explicit"``, ``"matrix_free"``, ``"rows_krylov"`` or ``"low_rank"`` (the last three
        need rows; low_rank is exact and possible when ``2(K−1)·rows + c < out``; ``"auto"`` considers rows_krylov
        when ``2(K−1)·rows < out`` and its ``K²`` row products fit :data:`ROWS_KRYLOV_MAX_BYTES`).
    """
    k, a, b = num_tasks, fan_in, fan_out
    candidates = []
    gram_build = k * k * (2.0 * a * a * b + 2.0 * a * b * b)
    rows_y = None if rows is None else k * k * 2.0 * rows * a * b
    too_wide = strategy == "auto" and solver != "eigh" and rows is not None and c > 0 and b > MAX_EXPLICIT_OUT
    if strategy == "explicit" or (strategy == "auto" and not too_wide):
        for form in ("gram",) + (() if rows is None else ("rows",)):
            for s in (("eigh", "iterative") if solver == "auto" else (solver,)):
                if s == "iterative" and choose_solver(b, max(c, 1)) == "eigh" and solver == "auto":
                    continue
                if form == "gram":
                    build = gram_build
                elif s == "eigh":  # G_k by syrk over its 2(K−1)·rows rows, inside the solve's host call
                    build = rows_y + k * 2.0 * (k - 1) * rows * b * b
                else:
                    build = rows_y + k * k * 2.0 * rows * b * b
                cfg = krylov_config(max(c, 1), b)
                solve = eigh_flops(b) if s == "eigh" else krylov_flops(b, cfg)
                candidates.append(LinearPlan(form, "explicit", s, build + k * solve))
    if rows is not None and strategy in ("auto", "matrix_free") and solver != "eigh" and c > 0:
        # Thin (p-column) products stream the whole operator per Krylov step: memory-bound, several times less
        # efficient per flop than the fat GEMMs that build G_k (measured ≈ 4–5× on CPU for 768 → 3072, K = 8).
        per_col = THIN_PRODUCT_PENALTY * 8.0 * k * rows * b
        cfg = krylov_config(c, b)
        if strategy == "matrix_free" or (cfg.block * (cfg.steps + 1) < b // 2 and b >= MIN_ITERATIVE_N):
            candidates.append(LinearPlan("rows", "matrix_free", "iterative",
                                         rows_y + k * krylov_flops(b, cfg, per_col)))
    if (rows is not None and strategy in ("auto", "rows_krylov") and solver != "eigh" and c > 0
            and (strategy == "rows_krylov" or (b < MAX_EXPLICIT_OUT and b >= MIN_ITERATIVE_N
                                               and 2 * (k - 1) * rows < b  # Z_k narrower than G_k (else: no gain,
                                               # measured on L/14's MLP-up, m = 10794 rows vs out = 4096)
                                               and 4.0 * k * k * rows * b <= ROWS_KRYLOV_MAX_BYTES))):
        # Krylov on G_k = Z_kᵀ D Z_k with Z_k AND a row-major copy of Z_kᵀ: both products of a step are then plain
        # (m, out) @ (out, p) / (out, m) @ (m, p) GEMMs, which XLA:CPU runs at the fat-product rate (measured 5–6×
        # faster than Z_kᵀ read transposed); no (out, out) G_k is built.
        per_col = ROWS_KRYLOV_PENALTY * 4.0 * 2 * (k - 1) * rows * b
        candidates.append(LinearPlan("rows", "rows_krylov", "iterative",
                                     rows_y + k * (krylov_flops(b, krylov_config(c, b), per_col)
                                                   + 2.0 * 2 * (k - 1) * rows * b)))
    if rows is not None and strategy in ("auto", "low_rank") and 2 * (k - 1) * rows + c < b:
        # exact: eigenvectors of G_k = Zᵀ D Z inside range(Zᵀ) plus c null directions (low_rank_bases)
        m = 2 * (k - 1) * rows + c
        candidates.append(LinearPlan("rows", "low_rank", "eigh", rows_y + k * (4.0 * b * m * m + eigh_flops(m))))
    if not candidates:
        raise ValueError(f"no way to solve a ({a}, {b}) layer with strategy={strategy!r}, solver={solver!r}, "
                         f"rows={rows}")
    return min(candidates, key=lambda p: p.flops)


def _solved_from_rows(plan: LinearPlan) -> bool:
    """Whether an explicit plan hands its row factors to the exact host solve, which builds ``G_k`` there by syrk."""
    return plan.form == "rows" and plan.strategy == "explicit" and plan.solver == "eigh"


def layer_bytes(plan: LinearPlan, num_tasks: int, fan_in: int, fan_out: int, data_size: int, c: int,
                itemsize: int = 4) -> int:
    """Bytes one layer of a group holds while it is solved under ``plan``: its task vectors ``(K, in, out)``, its
    statistics (``data_size`` elements: ``K·n·in`` rows or ``K·in²`` Grams), the solver's operand (the rows
    ``Z_k`` of the factored and explicit-rows routes, ``G_k`` otherwise, ``Y`` for matrix-free Krylov) and its
    update ``(in, out)``; what :func:`catmerge_jax.cat.cat_merge_batched` chunks a group by."""
    k, out = num_tasks, fan_out
    rows = data_size // (k * fan_in) if plan.form == "rows" else 0
    if plan.strategy == "low_rank":
        operand = k * (2 * (k - 1) * rows + c) * out
    elif plan.strategy == "matrix_free":  # the K² products Y_ki while they are small, else only (in, in) Grams
        y = k * k * rows * out
        operand = y if fan_in > 2 * rows and 4 * y <= MATRIX_FREE_OUTPUTS_BYTES else 2 * k * fan_in * fan_in
    elif plan.strategy == "rows_krylov":  # all Y_ki, then one task's Z_k and its transposed copy at a time
        operand = k * k * rows * out + 2 * 2 * (k - 1) * rows * out
    elif _solved_from_rows(plan):
        operand = k * 2 * (k - 1) * rows * out
    else:
        operand = k * out * out
    return itemsize * (k * fan_in * fan_out + data_size + operand + fan_in * fan_out)


# ------------------------------------------------------------------------------------------------------------
# One group: (L, K, in, out) task vectors, (L, K, n, in) rows or (L, K, in, in) Grams.
# ------------------------------------------------------------------------------------------------------------


def _rows_operator(y: jax.Array, k: jax.Array, lam: Any) -> tuple[jax.Array, jax.Array]:
    """``(Z (2K·n, out), s (2K·n,))`` with ``G_k = Zᵀ diag(s) Z`` from ``y[k, i] = X_k T_i`` (K, K, n, out)."""
    num_tasks, _, n, out = y.shape
    others = (jnp.arange(num_tasks) != k).astype(y.dtype)
    own = jnp.einsum("iinb->inb", y)
    z = jnp.concatenate([y[k], own]).reshape(2 * num_tasks * n, out)
    s = jnp.repeat(jnp.concatenate([others, -lam * others]), n)
    return z, s


@functools.partial(jax.jit, static_argnames=("c", "plan", "batch_mode", "min_gap"))
def _group_bases(tvs: jax.Array, data: jax.Array, lam: Any, *, c: int, plan: LinearPlan, batch_mode: str = "auto",
                 min_gap: float | None = None):
    """``(bases (L, K, out, c), values (L, K, c), converged (L, K), unresolved (L, K), bound (L, K))`` for one
    group: the solver's eigenvalues and the :func:`positive_bound` decide which directions are kept; non-converged
    entries are still to be fixed; ``unresolved``: the top-c eigengap is below the working precision's
    resolution."""
    num_tasks, out = tvs.shape[1], tvs.shape[-1]
    config = krylov_config(c, out) if min_gap is None else krylov_config(c, out, min_gap=min_gap)
    # The merge holds its bases fixed under differentiation (eigenspaces have no derivative at ties), so nothing
    # here needs a tangent.
    tvs, data, lam = jax.lax.stop_gradient((tvs, data, lam))

    def krylov_unresolved(res):
        floor = GAP_FLOOR * jnp.finfo(res.values.dtype).eps * res.scale
        return (res.values[..., c - 1] > floor) & (res.gap <= floor)

    if plan.strategy == "low_rank" or _solved_from_rows(plan):
        # The factors layer by layer (a loop on CPU keeps one layer's K² products alive at a time), then ONE
        # factored solve for the whole group (on CPU one host call for all its (layer, task) pairs, which also
        # builds each explicit G_k there, by syrk into the triangle LAPACK reads).
        z, d, bound = _exact_operands(tvs, data, lam, c, plan, batch_mode)
        bases, values, unresolved = _factored_top(z, d, c)
        return bases, values, jnp.ones(bases.shape[:2], bool), unresolved, bound

    if plan.strategy == "rows_krylov":
        def rows_layer(t, rows):
            y = _outputs_by_task(t, rows)  # y[i, k] = X_k T_i (K, K, n, out)
            n = rows.shape[1]
            own = jnp.einsum("iinb->inb", y)  # Y_ii (K, n, out)
            weights = jnp.concatenate([jnp.ones(((num_tasks - 1) * n,), t.dtype),
                                       -lam * jnp.ones(((num_tasks - 1) * n,), t.dtype)])[:, None]

            def task(k):
                others = (k + 1 + jnp.arange(num_tasks - 1)) % num_tasks
                z = jnp.concatenate([jnp.take(y[:, k], others, axis=0), jnp.take(own, others, axis=0)])
                z = z.reshape(-1, out)  # Z_k (m, out), m = 2(K−1)n: G_k = Z_kᵀ diag(weights) Z_k
                # A row-major copy of Z_kᵀ (the barrier keeps XLA from folding it back into a transposed read).
                zt = jax.lax.optimization_barrier(jnp.swapaxes(z, 0, 1))
                return block_krylov_top(lambda v: zt @ (weights * (z @ v)), c, n=out, config=config)

            res = map_batch(task, jnp.arange(num_tasks), mode=batch_mode)
            sq = jnp.sum(jnp.square(y), axis=(2, 3)).T  # [k, i] = ‖X_k T_i‖²
            return res.vectors, res.values, res.converged, krylov_unresolved(res), _bound_from_squares(sq, lam)

        return map_batch(lambda args: rows_layer(*args), (tvs, data), mode=batch_mode)

    if plan.strategy == "matrix_free":
        def layer_through_outputs(t, rows):
            y = jnp.einsum("kna,iab->kinb", rows, t)

            def task(k):
                z, s = _rows_operator(y, k, lam)
                return block_krylov_top(lambda v: z.T @ (s[:, None] * (z @ v)), c, n=out, config=config)

            res = map_batch(task, jnp.arange(num_tasks), mode=batch_mode)
            return res.vectors, res.values, res.converged, krylov_unresolved(res), positive_bound(y, lam)

        def layer(t, rows):
            # G_k v = Σ_{i≠k} T_iᵀ (A_k − λ A_i) T_i v with A_i = X_iᵀX_i (in, in): applied through the task vectors
            # themselves, so nothing of the output's width but (out, p) blocks is ever formed (the rows products
            # Y_ki = X_k T_i are (n, out) each: K² of them are GiBs for an LM head, out = vocab). The same flops as
            # through Y when n ≈ in / 2; fewer in total, as no Y is built first.
            grams = jnp.einsum("ina,inc->iac", rows, rows)
            outer = jnp.einsum("iab,icb->iac", t, t)  # T_i T_iᵀ (K, in, in)
            sq = jnp.einsum("kac,iac->ki", grams, outer)  # ‖X_k T_i‖² = ⟨A_k, T_i T_iᵀ⟩ (k, i)
            flat = t.reshape(-1, out)  # (K·in, out)

            def task(k):
                w = _others_weight(k, num_tasks, t.dtype)[:, None, None]
                mixed = w * (grams[k][None] - lam * grams)  # (K, in, in), zero for i = k

                def operator(v):
                    u = (flat @ v).reshape(num_tasks, -1, v.shape[-1])  # T_i v (K, in, p)
                    m = jnp.einsum("iac,icp->iap", mixed, u).reshape(flat.shape[0], -1)
                    # (mᵀ T)ᵀ over the flat (K·in, out) T: XLA:CPU reads T in place (an einsum over (i, a) got
                    # T transposed into a copy)
                    return (m.T @ flat).T

                return block_krylov_top(operator, c, n=out, config=config)

            res = map_batch(task, jnp.arange(num_tasks), mode=batch_mode)
            return res.vectors, res.values, res.converged, krylov_unresolved(res), _bound_from_squares(sq, lam)

        n = data.shape[2]
        if tvs.shape[2] > 2 * n and 4 * num_tasks * num_tasks * n * out <= MATRIX_FREE_OUTPUTS_BYTES:
            # few rows: applying G_k through the K² products Y_ki (8·K·n·out flops per column) is cheaper than
            # through T (4·K·in·out), and they are small
            layer = layer_through_outputs
        if tvs.shape[0] == 1:  # one layer (an LM head): no loop, whose sliced operand would be a copy of the layer
            return jax.tree.map(lambda x: x[None], layer(tvs[0], data[0]))
        return map_batch(lambda args: layer(*args), (tvs, data), mode=batch_mode)

    if plan.solver == "eigh":
        g, bound = _exact_operands(tvs, data, lam, c, plan, batch_mode)  # (L, K, out, out), (L, K)
        bases, values, unresolved = _top_values_gap(g, c)
        return bases, values, jnp.ones(g.shape[:2], bool), unresolved, bound
    build = _rows_conflict_and_bound if plan.form == "rows" else _grams_conflict_and_bound
    g, bound = jax.vmap(lambda t, d: build(t, d, lam))(tvs, data)  # (L, K, out, out), (L, K)
    flat = g.reshape((-1,) + g.shape[2:])
    res = map_batch(lambda m: block_krylov_top(m, c, config=config), flat, mode=batch_mode)
    lead = g.shape[:2]
    return (res.vectors.reshape(lead + res.vectors.shape[1:]), res.values.reshape(lead + (c,)),
            res.converged.reshape(lead), krylov_unresolved(res).reshape(lead), bound)


def _exact_operands(tvs: jax.Array, data: jax.Array, lam: Any, c: int, plan: LinearPlan, batch_mode: str):
    """What an exact (``solver="eigh"``) group solve factorizes: the row factors ``(Z (L, K, m, out), d (L, K, m),
    bound (L, K))`` with ``G_k = Zᵀ diag(d) Z`` (low-rank and explicit-rows plans), else ``(G (L, K, out, out),
    bound (L, K))``."""
    if plan.strategy == "low_rank" or _solved_from_rows(plan):
        if plan.strategy == "low_rank":
            factors = lambda t, x: _low_rank_factors(t, x, lam, c)  # noqa: E731
        else:
            factors = lambda t, x: _rows_factors(t, x, lam)  # noqa: E731
        return map_batch(lambda args: factors(*args), (tvs, data), mode=batch_mode)
    build = _rows_conflict_and_bound if plan.form == "rows" else _grams_conflict_and_bound
    return jax.vmap(lambda t, d: build(t, d, lam))(tvs, data)


# Programs that hold a host callback are never written to JAX's persistent compilation cache (the callback is a
# pointer into this process), and the group solves are a merge's largest programs. So where the solve runs on the
# host anyway (CPU, concrete inputs, one device), the operands are one compiled program and the LAPACK calls run
# between programs, on NumPy arrays: a second run then loads every program of the merge from the cache.
@functools.partial(jax.jit, static_argnames=("c", "plan", "batch_mode"))
def _exact_operands_program(tvs: jax.Array, data: jax.Array, lam: Any, *, c: int, plan: LinearPlan,
                            batch_mode: str = "auto"):
    tvs, data, lam = jax.lax.stop_gradient((tvs, data, lam))
    return _exact_operands(tvs, data, lam, c, plan, batch_mode)


def _solves_between_programs(tvs: Any, data: Any, lam: Any, plan: LinearPlan) -> bool:
    """Whether :func:`_group_bases_on_host` applies: an exact plan, the CPU's host LAPACK, concrete inputs on one
    device."""
    from catmerge_jax.linalg import accelerator_paths_enabled

    if plan.solver != "eigh" or plan.strategy == "matrix_free" or accelerator_paths_enabled():
        return False
    if jax.default_backend() != "cpu" or not is_concrete((tvs, data, lam)):
        return False
    sharding = getattr(tvs, "sharding", None)
    return sharding is None or len(sharding.device_set) == 1


def _group_bases_on_host(tvs: jax.Array, data: jax.Array, lam: Any, *, c: int, plan: LinearPlan,
                         batch_mode: str = "auto"):
    """:func:`_group_bases` for an exact plan with the host LAPACK solve outside the compiled program (same
    operands, same :mod:`catmerge_jax.hostlapack` calls, same outputs)."""
    from catmerge_jax import hostlapack

    *operands, bound = (np.asarray(x) for x in _exact_operands_program(tvs, data, lam, c=c, plan=plan,
                                                                        batch_mode=batch_mode))
    if len(operands) == 2:  # factored: Zᵀ diag(d) Z
        z, d = operands
        operands, solve, core, k = [z, d.astype(z.dtype)], hostlapack.factored_one, (2, 1), min(c + 1, *z.shape[-2:])
    else:
        solve, core, k = hostlapack.symmetric_largest, (2,), min(c + 1, operands[0].shape[-1])
    first = operands[0]
    lead, n = first.shape[:first.ndim - core[0]], first.shape[-1]
    flat = [a.reshape((-1,) + a.shape[a.ndim - nd:]) for a, nd in zip(operands, core)]
    values, vectors, scale = hostlapack.each_problem(solve, k, n, lead, first.dtype, *flat)
    if values.shape[-1] > c:
        floor = GAP_FLOOR * np.finfo(values.dtype).eps * scale
        unresolved = (values[..., c - 1] > floor) & (values[..., c - 1] - values[..., c] <= floor)
    else:
        unresolved = np.zeros(lead, bool)
    # device_put, not jnp.asarray: the latter compiles a small program per shape for NumPy input
    return jax.device_put((np.ascontiguousarray(vectors[..., :c]), np.ascontiguousarray(values[..., :c]),
                           np.ones(lead, bool), unresolved, bound))


def _conflict_one(t: jax.Array, d: jax.Array, k: jax.Array, lam: Any, form: str) -> jax.Array:
    """``G_k`` (out, out) of one layer for one task only (the fallback needs no other task's matrix)."""
    num_tasks = t.shape[0]
    others = (jnp.arange(num_tasks) != k).astype(t.dtype)
    if form == "rows":
        y = jnp.einsum("kna,iab->kinb", d, t)
        z, s = _rows_operator(y, k, lam)
        return z.T @ (s[:, None] * z)
    # Σ_{i≠k} T_iᵀ (A_k − λ A_i) T_i, one task-weighted Gram per i.
    mixed = d[k][None] - lam * d  # (K, in, in)
    return jnp.einsum("iab,iac,icd,i->bd", t, mixed, t, others)


@functools.partial(jax.jit, static_argnames=("c", "form"))
def _fallback_bases(tvs: jax.Array, data: jax.Array, tasks: jax.Array, lam: Any, *, c: int, form: str):
    """``(bases (M, out, c), values (M, c))``: exact top-c eigenpairs of ``G_k`` for the (layer, task) pairs given
    by ``tvs``/``data`` (M, K, ...) and ``tasks`` (M,)."""

    # the matrices in a loop, then one exact solve for all (on CPU one host call)
    values, vectors, _ = eigh_largest(jax.lax.map(lambda args: _conflict_one(*args, lam, form), (tvs, data, tasks)),
                                      c)
    return vectors, values


def linear_group_bases(tvs: jax.Array, data: jax.Array, *, lam: float, c: int, plan: LinearPlan,
                       valid_layers: int | None = None, batch_mode: str = "auto",
                       counts: dict | None = None, min_gap: float | None = None,
                       strict_top_c: bool = False) -> jax.Array:
    """Removal bases ``(L, K, out, c)`` of a group of L same-shape linear layers.

    Args:
      tvs: ``(L, K, in, out)`` task vectors.
      data: ``(L, K, n, in)`` rows (``plan.form == "rows"``) or ``(L, K, in, in)`` Grams.
      plan: from :func:`plan_linear`.
      valid_layers: only the first this many layers are real (the rest is padding, never sent to eigh).
      batch_mode: ``"auto"``/``"vmap"``/``"map"`` for the iterative solves (:func:`catmerge_jax.linalg.map_batch`).
      counts: if a dict, ``"solves"`` and ``"fallbacks"`` (eigh re-solves) are added to it.
      min_gap: overrides :class:`catmerge_jax.linalg.KrylovConfig`'s ``min_gap`` (default 0: accept every
        subspace that converged to the working-precision floor with a resolvable gap; e.g. 1e-3 also defers
        near-tied matrices to eigh, reproducing the plain path's tie-breaking at eigh's cost).
      strict_top_c: keep every top-c direction even with eigenvalue ≤ 0 (default: :func:`positive_directions`'s rule,
        applied to the solver's eigenvalues by :func:`keep_positive`).
    Returns:
      The bases; every (layer, task) whose iterative solve did not converge is recomputed with eigh. When
      ``counts`` is a dict, ``counts["unresolved"]`` collects the ``(layer, task)`` pairs whose eigengap is below the
      working precision's resolution (concrete inputs only).
    """
    if c == 0:
        return jnp.zeros(tvs.shape[:2] + (tvs.shape[-1], 0), tvs.dtype)
    solve = _group_bases_on_host if _solves_between_programs(tvs, data, lam, plan) else functools.partial(
        _group_bases, min_gap=min_gap)
    bases, values, converged, unresolved, bound = solve(tvs, data, lam, c=c, plan=plan, batch_mode=batch_mode)
    real = tvs.shape[0] if valid_layers is None else valid_layers
    if counts is not None and is_concrete(unresolved):
        counts.setdefault("unresolved", []).extend(
            (int(a), int(b)) for a, b in np.argwhere(np.asarray(gather(unresolved))) if a < real)
    if counts is not None:
        counts["solves"] = counts.get("solves", 0) + real * tvs.shape[1]
    if plan.solver != "eigh":  # eigh solves are exact: nothing to check or redo
        if not is_concrete(converged):
            raise ValueError("solver='iterative' decides its eigh fallbacks on the host and needs concrete inputs; "
                             "under jax.jit/vmap/grad use solver='eigh' (the default there)")
        bad = np.argwhere(~np.asarray(gather(converged)))
        bad = bad[bad[:, 0] < real]
        if counts is not None:
            counts["fallbacks"] = counts.get("fallbacks", 0) + len(bad)
        if len(bad):
            layers, tasks = bad[:, 0], bad[:, 1]
            fixed, fixed_values = _fallback_bases(tvs[layers], data[layers], jnp.asarray(tasks), lam, c=c,
                                                  form=plan.form)
            bases = bases.at[layers, tasks].set(fixed)
            values = values.at[layers, tasks].set(fixed_values)
    # once, on the final bases (fallbacks included)
    return bases if strict_top_c else _keep_positive(bases, values, bound)


_keep_positive = jax.jit(keep_positive)
