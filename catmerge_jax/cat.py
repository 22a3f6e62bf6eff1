"""CAT Merging (Conflict-Aware Task Merging, Sun et al., ICML 2025) as pure, jitted, task-vmapped operators.

Layout (SPEC.md): a linear task vector ``T_i`` is ``(in, out)`` (Flax's ``y = x @ W``), the features of task k
are rows ``X_k`` ``(n, in)`` or their Gram ``A_k = X_kᵀX_k`` ``(in, in)``, a removal basis ``B_k`` is
``(out, c)``. K tasks are stacked on a leading axis.

Per layer (paper §5, eqs. 11, 14, 17):

* linear: ``G_k = Σ_{i≠k} T_iᵀ (A_k − λ A_i) T_i``; ``B_k`` = its top-c eigenvectors (largest algebraic
  eigenvalues); ``Φ_k(T_i) = T_i − T_i B_k B_kᵀ``.
* scale: ``g_k = Σ_{i≠k} T_i² ∘ (s_k − λ s_i)`` with ``s`` the per-dimension Σ x̂²; mask the top c.
* shift: the paper's balanced-data rule, the top c of ``Σ_{i≠k} T_i²`` (the count-weighted rule
  ``Σ_{i≠k} T_i² (n_k − λ n_i)`` is available with ``counts=``).

All bases and masks come from the ORIGINAL task vectors; then every ``T_i`` is trimmed by every ``Φ_k``,
``k ≠ i`` — in k order (Algorithm 1, ``"sequential"``) or by one projection onto the complement of the joint
span of all ``B_k`` (``"joint"``, order-free). Finally ``W = W0 + α Σ_i T̃_i``.

A trimming rule is a value, :class:`Trimmer` (``init`` computes bases/masks, ``apply`` edits), and
:func:`merge_with_trimmers` maps a ``{Role: Trimmer}`` table over the params tree, so ablations and variants
are built by swapping table entries or wrapping them (:func:`norm_rescaled`, :func:`restricted`), not by flags.

>>> import jax, jax.numpy as jnp
>>> import catmerge_jax as cm
>>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
>>> w0 = {"dense": {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros(5)}}
>>> fts = [jax.tree.map(lambda x, k=k: x + jax.random.normal(k, x.shape), w0) for k in (k1, k2, k3)]
>>> x = jax.random.normal(k1, (4, 6))
>>> stats = [cm.stats_from_arrays(w0, {"dense/kernel": cm.linear_stats(x), "dense/bias": cm.count_stats(4)})] * 3
>>> merged = cm.cat_merge(w0, fts, stats, alpha=0.3, lam=5.0, c=2)
>>> merged["dense"]["kernel"].shape
(6, 5)
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# cat_linear_bases*, GAP_FLOOR, POSITIVE_RTOL and positive_directions are part of this module's public operators
from catmerge_jax import conflict
from catmerge_jax.conflict import (GAP_FLOOR, POSITIVE_RTOL, cat_linear_bases, cat_linear_bases_from_rows,  # noqa: F401
                                   conflict_matrices_from_grams, layer_bytes, linear_group_bases, plan_linear,
                                   positive_directions, rows_bases_with_gap, top_with_gap)
from catmerge_jax.errors import CatMergeError, HyperparameterError, MissingStatisticsError, TreeMismatchError
from catmerge_jax.linalg import map_batch
from catmerge_jax.roles import (LeafSpec, Overrides, Role, check_spec, classify, is_spec, union_declared, with_declared,
                                with_stacking)
from catmerge_jax.stats import LeafStats, check_stats, is_leaf_stats, stats_declarations
from catmerge_jax.tree import (PyTree, check_finite, check_same_structure, compute_dtype, gather, is_concrete,
                               is_tracer, leaves_with_paths)

# --------------------------------------------------------------------------------------------------------------
# Per-layer operators. Pure functions of stacked (K, ...) arrays; jitted with the basis/mask size static.
# --------------------------------------------------------------------------------------------------------------


def _promote(x: jax.Array) -> jax.Array:
    """At least float32 (bf16/f16 task vectors are scored in float32; float64 stays float64)."""
    return x.astype(compute_dtype(x.dtype))


def _top_c_mask(scores: jax.Array, c: int) -> jax.Array:
    """Bool mask of the c largest entries along the last axis (ties: lower index first, as ``lax.top_k``)."""
    if c == 0:
        return jnp.zeros(scores.shape, bool)
    _, idx = jax.lax.top_k(scores, c)
    return jnp.zeros(scores.shape, bool).at[jnp.arange(scores.shape[0])[:, None], idx].set(True)


@functools.partial(jax.jit, static_argnames=("c",))
def cat_scale_masks(task_vectors: jax.Array, sq_sums: jax.Array, *, lam: float | jax.Array, c: int) -> jax.Array:
    """Removal masks of one normalization scale for every task (paper eq. 14).

    Args:
      task_vectors: ``(K, d)`` scale task vectors.
      sq_sums: ``(K, d)`` per-dimension ``Σ_rows x̂²`` of each task's normalized inputs.
      c: number of removed entries per task (static).
    Returns:
      ``(K, d)`` bool, True at the c largest entries of ``g_k = Σ_{i≠k} T_i² (s_k − λ s_i)``.
    """
    sq = _promote(task_vectors) ** 2
    others = sq.sum(0)[None] - sq  # Σ_{i≠k} T_i²
    weighted = sq * sq_sums
    others_weighted = weighted.sum(0)[None] - weighted  # Σ_{i≠k} T_i² s_i
    return _top_c_mask(sq_sums * others - lam * others_weighted, c)


@functools.partial(jax.jit, static_argnames=("c",))
def cat_shift_masks(task_vectors: jax.Array, *, c: int, counts: jax.Array | None = None,
                    lam: float | jax.Array | None = None) -> jax.Array:
    """Removal masks of one shift (bias, norm offset) for every task.

    The default is the paper's balanced-data rule (§5.3): the c largest entries of ``Σ_{i≠k} T_i²``. With
    ``counts`` (``(K,)`` rows per task) and ``lam``, the unreduced rule ``Σ_{i≠k} T_i² (n_k − λ n_i)`` (eq. 17).

    Args:
      task_vectors: ``(K, d)``.
      c: number of removed entries per task (static).
    Returns:
      ``(K, d)`` bool, True where removed.
    """
    sq = _promote(task_vectors) ** 2
    if counts is None:
        scores = sq.sum(0)[None] - sq
    else:
        if lam is None:
            raise HyperparameterError("cat_shift_masks: counts= needs lam= as well")
        counts = jnp.asarray(counts, sq.dtype)
        weighted = sq * counts[:, None]
        scores = counts[:, None] * (sq.sum(0)[None] - sq) - lam * (weighted.sum(0)[None] - weighted)
    return _top_c_mask(scores, c)


def _sequential_factors(bases: jax.Array, i: int) -> tuple[jax.Array, jax.Array]:
    """``(U (out, K·c), M (K·c, K·c))`` with ``Π_{k≠i} (I − B_k B_kᵀ) = I − U M Uᵀ`` (the product in k order).

    ``U = [B_1 … B_K]`` with ``B_i`` zeroed and M block upper triangular: ``M[:, b] = e_b − M[:, <b] (U_<bᵀ B_b)``.
    Applying it costs two thin products with ``T_i`` instead of K − 1 passes over it (the sequential loop is
    memory-bound on large layers)."""
    num_tasks, out, c = bases.shape
    u = bases * (np.arange(num_tasks) != i).astype(bases.dtype)[:, None, None]
    u = u.transpose(1, 0, 2).reshape(out, num_tasks * c)
    cross = u.T @ u
    m = jnp.zeros_like(cross)
    for b in range(num_tasks):
        col = -m[:, : b * c] @ cross[: b * c, b * c:(b + 1) * c]
        col = col.at[b * c:(b + 1) * c].add(jnp.eye(c, dtype=bases.dtype))
        m = m.at[:, b * c:(b + 1) * c].set(col)
    return u, m


@jax.jit
def apply_cat_linear(task_vectors: jax.Array, bases: jax.Array) -> jax.Array:
    """Trim each ``T_i`` by every ``Φ_k``, ``k ≠ i``, one after another in k order (Algorithm 1).

    Args:
      task_vectors: ``(K, in, out)``.
      bases: ``(K, out, c)`` from :func:`cat_linear_bases`.
    Returns:
      ``(K, in, out)`` trimmed task vectors; ``T̃_i B_k = 0`` for the last applied k.
    """
    trimmed = []
    for i in range(bases.shape[0]):  # K is static: plain products, which XLA:CPU runs faster than batched ones
        u, m = _sequential_factors(bases, i)
        trimmed.append(task_vectors[i] - ((task_vectors[i] @ u) @ m) @ u.T)
    return jnp.stack(trimmed)


BATCHED_UPDATE_BYTES = 64 << 20
"""From this size of one task's matrix on, :func:`cat_linear_update` batches its K products (no sliced copies)."""


@jax.jit
def cat_linear_update(task_vectors: jax.Array, bases: jax.Array) -> jax.Array:
    """``Σ_i T̃_i`` ``(in, out)`` of :func:`apply_cat_linear` without forming the K trimmed matrices: with
    ``W_i = T_i U_i M_i`` (:func:`_sequential_factors`), ``Σ_i T̃_i = Σ_i T_i − [W_1 … W_K] [U_1 … U_K]ᵀ``, one
    product for the whole correction (measured 2–3× faster on CPU than trimming and summing for MiniLM's layers).

    Args / Returns: as :func:`apply_cat_linear`, summed over tasks.
    """
    num_tasks, fan_in = task_vectors.shape[0], task_vectors.shape[1]
    total = task_vectors[0]
    for t in task_vectors[1:]:  # explicit adds: XLA:CPU's reduce over a leading axis of matrices is far slower
        total = total + t
    if task_vectors[0].size * task_vectors.dtype.itemsize < BATCHED_UPDATE_BYTES:
        ws, us = [], []
        for i in range(num_tasks):
            u, m = _sequential_factors(bases, i)
            ws.append((task_vectors[i] @ u) @ m)
            us.append(u)
        return total - jnp.concatenate(ws, axis=1) @ jnp.concatenate(us, axis=1).T
    # A huge layer (an LM head): (T_i U_i) M_i batched over i, leading on both sides, so XLA:CPU reads each T_i in
    # place (a product of the slice T_i copies it first: K copies of the task vectors)
    us, ms = (jnp.stack(f) for f in zip(*(_sequential_factors(bases, i) for i in range(num_tasks))))
    ws = jnp.einsum("iaq,iqr->iar", jnp.einsum("iab,ibq->iaq", task_vectors, us), ms)
    ws = ws.transpose(1, 0, 2).reshape(fan_in, -1)  # [W_1 … W_K]
    return total - ws @ us.transpose(1, 0, 2).reshape(us.shape[1], -1).T


@jax.jit
def apply_cat_linear_joint(task_vectors: jax.Array, bases: jax.Array) -> jax.Array:
    """Order-free variant: project each ``T_i`` onto the complement of ``span{B_k : k ≠ i}``.

    The bases of the other tasks are orthonormalized together (SVD of their concatenation, keeping the
    non-negligible singular directions), so ``T̃_i B_k = 0`` for every ``k ≠ i`` and the result does not
    depend on the task order.

    Args / Returns: as :func:`apply_cat_linear`.
    """
    num_tasks, _, out = task_vectors.shape
    c = bases.shape[-1]
    if c == 0:
        return task_vectors
    eps = jnp.finfo(bases.dtype).eps

    def trim_one(i, t):
        keep = (jnp.arange(num_tasks) != i).astype(bases.dtype)
        others = (bases * keep[:, None, None]).transpose(1, 0, 2).reshape(out, num_tasks * c)
        u, s, _ = jnp.linalg.svd(others, full_matrices=False)
        significant = (s > max(out, num_tasks * c) * eps * jnp.max(s)).astype(t.dtype)
        return t - ((t @ u) * significant[None, :]) @ u.T

    return jax.vmap(trim_one)(jnp.arange(num_tasks), task_vectors)


@jax.jit
def apply_cat_masks(task_vectors: jax.Array, masks: jax.Array) -> jax.Array:
    """Trim each ``T_i`` by every ``m_k``, ``k ≠ i``: ``T̃_i = T_i ∘ Π_{k≠i} (1 − m_k)`` (masks commute).

    Args:
      task_vectors: ``(K, d)``.
      masks: ``(K, d)`` bool, True where removed.
    Returns:
      ``(K, d)``.
    """
    total = masks.astype(jnp.int32).sum(0)[None]
    removed_by_others = (total - masks.astype(jnp.int32)) > 0
    return jnp.where(removed_by_others, jnp.zeros_like(task_vectors), task_vectors)


# --------------------------------------------------------------------------------------------------------------
# Trimmers: a trimming rule as a value (init computes bases/masks from the original task vectors, apply edits).
# --------------------------------------------------------------------------------------------------------------


class LeafInput(NamedTuple):
    """What a trimmer sees for one leaf: the stacked task vectors and each task's statistics."""

    path: str
    spec: LeafSpec
    task_vectors: jax.Array  # (K, *leaf_shape), float32 or wider
    stats: Sequence[LeafStats] | None


class Trimmer(NamedTuple):
    """A trimming rule: ``init(leaf) -> state`` (bases/masks), ``apply(leaf, state) -> (K, *shape)`` trimmed."""

    init: Callable[[LeafInput], Any]
    apply: Callable[[LeafInput, Any], jax.Array]


def identity_trimmer() -> Trimmer:
    """Leaves task vectors untouched (plain task arithmetic for that role)."""
    return Trimmer(init=lambda leaf: None, apply=lambda leaf, state: leaf.task_vectors)


def check_c(c: int, dim: int, path: str) -> None:
    """Raise :class:`HyperparameterError` unless ``c`` is an int in ``[0, dim]`` (``path`` names the leaf)."""
    if not isinstance(c, (int, np.integer)) or isinstance(c, bool):
        raise HyperparameterError(f"c must be an int, got {c!r}")
    if c < 0:
        raise HyperparameterError(f"c must be >= 0, got {c}")
    if c > dim:
        raise HyperparameterError(f"leaf '{path}': c={c} is larger than the dimension {dim} it selects from")


def _stat_arrays(leaf: LeafInput, field: str) -> list[Any]:
    """Each task's statistic ``field`` of this leaf; a clear error when one is missing.

    The presence check is structural (works under ``jit``); a zero row count is caught when counts are concrete.
    """
    if leaf.stats is None:
        raise MissingStatisticsError(f"leaf '{leaf.path}': needs exemplar statistics, none given")
    values = []
    for k, s in enumerate(leaf.stats):
        value = getattr(s, field) if field != "linear" else (s if s.has_linear else None)
        empty = s.count is None or (not is_tracer(s.count) and float(np.max(np.asarray(s.count), initial=0)) <= 0)
        if value is None or empty:
            raise MissingStatisticsError(
                f"leaf '{leaf.path}': task {k} has no {'input rows/Gram' if field == 'linear' else field} statistics "
                f"(was the layer in the forward path of the exemplars?)")
        values.append(value)
    return values


def _per_layer(x: Any, spec: LeafSpec, trailing: int) -> jax.Array:
    """A statistic with the leaf's stack axes leading, ``(*stack, *rest)`` → ``(layers, *rest)``.

    ``trailing`` is the number of per-layer axes; output blocks of a fused projection share their input, so the
    statistic repeats for each block (layer index = stack index · blocks + block, as ``LeafSpec.matrices``).
    """
    xp = np if on_one_cpu(x) else jnp  # NumPy moves concrete data without compiling a program per shape
    x = xp.asarray(x)
    rest = x.shape[x.ndim - trailing:] if trailing else ()
    x = x.reshape((-1,) + tuple(rest))
    return xp.repeat(x, spec.out_blocks, axis=0) if spec.out_blocks > 1 else x


def _row_counts(leaf: LeafInput, per_task: Sequence[LeafStats]) -> list[jax.Array]:
    return [_per_layer(s.count, leaf.spec, 0) for s in per_task]


def linear_inputs(leaf: LeafInput, normalize: bool = False) -> tuple[str, jax.Array]:
    """Each task's layer inputs per layer of a LINEAR leaf, in the cheaper form.

    Returns:
      ``("rows", (K, layers, n_max, in))`` when every task stores rows and ``n_max < in`` (tasks with fewer
      rows are zero-padded; zero rows add nothing), else ``("gram", (K, layers, in, in))``. With
      ``normalize``, each task's rows/Gram are divided by its row count (per-row means).
    """
    per_task = _stat_arrays(leaf, "linear")
    fan_in = leaf.spec.matrix_shape(leaf.task_vectors.shape[1:])[0]
    dtype = leaf.task_vectors.dtype
    for k, s in enumerate(per_task):
        got = (np.shape(s.gram) if s.gram is not None else np.shape(s.rows))[-1]
        if got != fan_in:
            raise TreeMismatchError(f"leaf '{leaf.path}': task {k} statistics have input dimension {got}, the kernel "
                                    f"expects {fan_in}")
    if all(s.rows is not None for s in per_task):
        n_max = max(np.shape(s.rows)[-2] for s in per_task)
        if n_max < fan_in:
            if not normalize and on_one_cpu([s.rows for s in per_task]):
                return "rows", _stacked_rows_on_host([s.rows for s in per_task], spec=leaf.spec, n_max=n_max,
                                                     dtype=jnp.dtype(dtype))
            return "rows", _stacked_rows([s.rows for s in per_task], [s.count for s in per_task] if normalize else None,
                                         spec=leaf.spec, n_max=n_max, dtype=jnp.dtype(dtype))
    counts = _row_counts(leaf, per_task)
    grams = []
    for s, n in zip(per_task, counts):
        if s.gram is not None:
            g = _per_layer(s.gram, leaf.spec, 2).astype(dtype)
        else:
            r = _per_layer(s.rows, leaf.spec, 2).astype(dtype)
            g = jnp.einsum("lna,lnb->lab", r, r)
        grams.append(g / n.astype(dtype)[:, None, None] if normalize else g)
    grams = jnp.stack(grams)
    fan_out = leaf.spec.matrix_shape(leaf.task_vectors.shape[1:])[1]
    if fan_out > conflict.MAX_EXPLICIT_OUT:
        # An (out, out) G_k of a vocabulary-sized layer does not fit in memory; the rows plans never form it. A Gram
        # is the Gram of its own square-root rows (A = RᵀR, R = diag(√w) Vᵀ from A = V diag(w) Vᵀ), so the same
        # statistics go to those plans as `in` exact rows per task.
        return "rows", _gram_square_root_rows(grams)
    return "gram", grams


@jax.jit
def _gram_square_root_rows(grams: jax.Array) -> jax.Array:
    """``(..., in, in)`` symmetric PSD Grams → rows ``R (..., in, in)`` with ``RᵀR = A`` (rounding-level negative
    eigenvalues clipped to 0)."""
    w, v = jnp.linalg.eigh(grams)
    return jnp.swapaxes(v * jnp.sqrt(jnp.clip(w, 0.0))[..., None, :], -1, -2)


@functools.partial(jax.jit, static_argnames=("spec", "n_max", "dtype"))
def _stacked_rows(rows: list[Any], counts: list[Any] | None, *, spec: LeafSpec, n_max: int, dtype: Any) -> jax.Array:
    """``(K, layers, n_max, in)``: each task's rows per layer, zero-padded to ``n_max`` rows, divided by the square
    root of the row count when ``counts`` are given; one dispatch per leaf."""
    out = []
    for k, r in enumerate(rows):
        r = _per_layer(r, spec, 2).astype(dtype)
        if counts is not None:
            r = r / jnp.sqrt(_per_layer(counts[k], spec, 0).astype(dtype))[:, None, None]
        out.append(jnp.pad(r, ((0, 0), (0, n_max - r.shape[1]), (0, 0))))
    return jnp.stack(out)


def _stacked_rows_on_host(rows: list[Any], *, spec: LeafSpec, n_max: int, dtype: Any) -> np.ndarray:
    """:func:`_stacked_rows` without ``counts``, by NumPy (see :func:`on_one_cpu`): the same rows, casts and zero
    padding, exactly."""
    layers = [np.asarray(_per_layer(r, spec, 2)) for r in rows]
    out = np.zeros((len(rows), layers[0].shape[0], n_max, layers[0].shape[-1]), np.dtype(dtype))
    for k, r in enumerate(layers):
        out[k, :, :r.shape[1]] = r
    return out


def gram_inputs(leaf: LeafInput, normalize: bool) -> tuple[str, jax.Array]:
    """:func:`linear_inputs` of a single-layer leaf whose task vectors are already ``(K, in, out)`` matrices."""
    spec = LeafSpec(Role.LINEAR, in_axes=1)
    form, data = linear_inputs(leaf._replace(spec=spec), normalize)
    return form, data[:, 0]


def _single_layer(spec: LeafSpec) -> bool:
    return spec.stack_axes == 0 and spec.out_blocks == 1


def _stop(x: Any) -> Any:
    # Bases and masks are piecewise-constant or eigenspace functions of the task vectors: their derivative does
    # not exist at eigenvalue ties (e.g. the null space when a task has fewer rows than inputs) and eigh's
    # gradient is NaN there. Gradients flow through the trimming (T_i − T_i B Bᵀ) with the bases held fixed.
    return jax.lax.stop_gradient(x)


class UnresolvedGapWarning(UserWarning):
    """A top-c eigengap of ``G_k`` is below the working precision's resolution (see :data:`GAP_FLOOR`)."""


def _host_bases_float64(t: jax.Array, data: jax.Array, lam: Any, c: int, form: str, strict: bool) -> jax.Array:
    """``(K, out, c)`` bases from a float64 ``eigh`` on the host (``precision="float64"``)."""
    t64 = np.asarray(t, np.float64)
    d64 = np.asarray(data, np.float64)
    grams = np.einsum("kna,knb->kab", d64, d64) if form == "rows" else d64
    out = []
    for k in range(t64.shape[0]):
        g = sum(t64[i].T @ (grams[k] - float(lam) * grams[i]) @ t64[i] for i in range(t64.shape[0]) if i != k)
        if not isinstance(g, np.ndarray):  # K = 1: no other task
            g = np.zeros((t64.shape[-1],) * 2)
        values, vectors = np.linalg.eigh((g + g.T) / 2)
        top = vectors[:, ::-1][:, :c]
        if not strict:
            bound = sum(np.sum((d64[k] @ t64[i]) ** 2 if form == "rows" else grams[k] * (t64[i] @ t64[i].T))
                        + float(lam) * np.sum((d64[i] @ t64[i]) ** 2 if form == "rows"
                                              else grams[i] * (t64[i] @ t64[i].T))
                        for i in range(t64.shape[0]) if i != k)
            top = top * (values[::-1][:c] > POSITIVE_RTOL * bound)[None, :]
        out.append(top)
    return jnp.asarray(np.stack(out), t.dtype)


def linear_projection(lam: float = 5.0, c: int = 3, *, joint: bool = False, normalize_by_count: bool = False,
                      strict_top_c: bool = False, precision: str = "working") -> Trimmer:
    """The paper's linear-weight trimming (eq. 11) for LINEAR leaves.

    The state is the bases ``(K, out, c)`` for a single-layer leaf, ``(layers, K, out, c)`` for a stacked leaf
    or a fused projection (``LeafSpec.stack_axes`` / ``out_blocks``: every layer and block has its own bases).
    The bases are computed without gradient (see :func:`cat_trim`).

    Args:
      lam: λ ≥ 0.
      c: basis size per task.
      joint: order-free projection (:func:`apply_cat_linear_joint`) instead of Algorithm 1's sequential one.
      normalize_by_count: use per-row means ``A_k / n_k`` instead of sums (a variant; the paper uses sums).
      strict_top_c: remove all c top eigenvectors even where their eigenvalue is ≤ 0 (the paper's literal rule);
        by default such directions are kept (:func:`positive_directions`): removing them cannot lower the
        objective, and which null-space directions a solver returns is arbitrary.
      precision: ``"working"`` (the task vectors' dtype, jit-compatible) or ``"float64"`` (the bases from a
        float64 ``eigh`` on the host, for eigengaps below float32 resolution; concrete inputs only).
    """
    if precision not in ("working", "float64"):
        raise HyperparameterError(f"precision must be 'working' or 'float64', got {precision!r}")

    def init(leaf: LeafInput) -> jax.Array:
        t = _stop(leaf.spec.matrices(leaf.task_vectors, lead=1))  # (K, L, in, out)
        check_c(c, t.shape[-1], leaf.path)
        form, data = linear_inputs(leaf, normalize_by_count)
        data = _stop(data)
        if precision == "float64":
            if not is_concrete((t, data, lam)):
                raise HyperparameterError(f"leaf '{leaf.path}': precision='float64' computes the bases on the host "
                                          "and needs concrete inputs (not under jax.jit/vmap/grad)")
            bases = jnp.stack([_host_bases_float64(t[:, layer], data[:, layer], lam, c, form, strict_top_c)
                               for layer in range(t.shape[1])])
        else:
            solve = rows_bases_with_gap if form == "rows" else (
                lambda tl, dl, lm, cc: top_with_gap(conflict_matrices_from_grams(tl, dl, lm), cc))
            bases, unresolved = jax.vmap(lambda tl, dl: solve(tl, dl, _stop(lam), c), in_axes=(1, 1))(t, data)
            if not strict_top_c:
                bases = jax.vmap(lambda tl, dl, bl: positive_directions(tl, dl, bl, lam=_stop(lam), form=form),
                                 in_axes=(1, 1, 0))(t, data, bases)
            if is_concrete(unresolved) and bool(np.any(np.asarray(unresolved))):
                warnings.warn(UnresolvedGapWarning(leaf.path), stacklevel=2)
        return bases[0] if _single_layer(leaf.spec) else bases

    def apply(leaf: LeafInput, bases: jax.Array) -> jax.Array:
        t = leaf.spec.matrices(leaf.task_vectors, lead=1)  # (K, L, in, out)
        bases = bases[None] if _single_layer(leaf.spec) else bases
        trim = apply_cat_linear_joint if joint else apply_cat_linear
        trimmed = jax.vmap(trim, in_axes=(1, 0), out_axes=1)(t, bases)
        return leaf.spec.from_matrices(trimmed, leaf.task_vectors.shape[1:])

    return Trimmer(init, apply)


def _flat(leaf: LeafInput) -> jax.Array:
    """``(K, layers, d)``: the task vectors of a SCALE/SHIFT leaf per layer."""
    return leaf.spec.vectors(host_view(leaf.task_vectors), lead=1)


def _mask_apply(leaf: LeafInput, masks: jax.Array) -> jax.Array:
    num = leaf.task_vectors.shape[0]
    trimmed = apply_cat_masks(host_view(leaf.task_vectors).reshape(num, -1), host_view(masks).reshape(num, -1))
    trimmed = host_view(trimmed)
    if isinstance(trimmed, np.ndarray):
        return to_device(trimmed.reshape(leaf.task_vectors.shape))
    return trimmed.reshape(leaf.task_vectors.shape)


def host_view(x: Any) -> Any:
    """``x`` as a NumPy view of its CPU buffer when it is concrete and the backend is one CPU device
    (:func:`on_one_cpu`), else ``x``: reshapes and stacks of the merge's glue then compile no program per shape."""
    return np.asarray(x) if on_one_cpu(x) else x


def scale_masking(lam: float = 5.0, c: int = 3, *, per_row_mean: bool = False) -> Trimmer:
    """The paper's norm-scale trimming (eq. 14) for SCALE leaves (per layer for stacked leaves).

    ``per_row_mean`` scores with ``s_k / n_k`` (the authors' code reportedly uses a per-token mean).
    """

    def init(leaf: LeafInput) -> jax.Array:
        t = _stop(_flat(leaf))  # (K, L, d)
        check_c(c, t.shape[-1], leaf.path)
        sums = _stat_arrays(leaf, "sq_sum")
        size = int(np.prod(leaf.task_vectors.shape[1:], dtype=np.int64))
        for k, sq in enumerate(sums):
            if np.size(sq) * leaf.spec.out_blocks != size:
                raise TreeMismatchError(f"leaf '{leaf.path}': task {k} sq_sum has {np.size(sq)} entries, expected "
                                        f"{size}")
        counts = _row_counts(leaf, leaf.stats)
        xp = np if on_one_cpu((t, sums)) and not per_row_mean else jnp  # (a NumPy division may round otherwise)
        sq = xp.stack([_per_layer(s, leaf.spec, 1).reshape(t.shape[1:]).astype(t.dtype)
                       / (n.astype(t.dtype)[:, None] if per_row_mean else 1.0) for s, n in zip(sums, counts)])
        return _layer_scale_masks(t, _stop(sq), _stop(lam), c=c)

    return Trimmer(init, _mask_apply)


@functools.partial(jax.jit, static_argnames=("c",))
def _layer_scale_masks(t: jax.Array, sq: jax.Array, lam: Any, *, c: int) -> jax.Array:
    """:func:`cat_scale_masks` of every layer, ``(K, L, d)`` in and out (jitted once per shape, not traced per leaf)."""
    return jax.vmap(lambda tl, sl: cat_scale_masks(tl, sl, lam=lam, c=c), in_axes=(1, 1), out_axes=1)(t, sq)


@functools.partial(jax.jit, static_argnames=("c",))
def _layer_shift_masks(t: jax.Array, counts: jax.Array | None, lam: Any, *, c: int) -> jax.Array:
    """:func:`cat_shift_masks` of every layer, ``(K, L, d)`` in and out; ``counts (K, L)`` or None (balanced)."""
    if counts is None:
        return jax.vmap(lambda tl: cat_shift_masks(tl, c=c), in_axes=1, out_axes=1)(t)
    return jax.vmap(lambda tl, nl: cat_shift_masks(tl, c=c, counts=nl, lam=lam), in_axes=(1, 1), out_axes=1)(t, counts)


def shift_masking(c: int = 3, *, lam: float | None = None) -> Trimmer:
    """Shift trimming for SHIFT leaves: the paper's balanced rule, or with ``lam`` the count-weighted eq. 17."""

    def init(leaf: LeafInput) -> jax.Array:
        t = _stop(_flat(leaf))  # (K, L, d)
        check_c(c, t.shape[-1], leaf.path)
        if lam is None:
            return _layer_shift_masks(t, None, None, c=c)
        _stat_arrays(leaf, "count")
        counts = jnp.stack(_row_counts(leaf, leaf.stats)).astype(t.dtype)  # (K, L)
        return _layer_shift_masks(t, _stop(counts), _stop(lam), c=c)

    return Trimmer(init, _mask_apply)


def restricted(trimmer: Trimmer, where: str | Callable[[str], bool]) -> Trimmer:
    """``trimmer`` on the leaves whose path matches ``where``; every other leaf passes through untouched.

    ``where`` is a regular expression searched in the leaf path (``"layer/[0-3]/"``) or a predicate on the
    path. For per-layer studies (which layers' trimming helps) and for trimming only part of a model.

    >>> import jax.numpy as jnp
    >>> halve = Trimmer(lambda leaf: None, lambda leaf, state: leaf.task_vectors / 2)
    >>> leaf = LeafInput("enc/layer/1/kernel", None, jnp.ones((2, 3)), None)
    >>> t = restricted(halve, "layer/0/")
    >>> t.apply(leaf, t.init(leaf)).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    if isinstance(where, str):
        pattern = re.compile(where)
        keep = lambda path: pattern.search(path) is not None  # noqa: E731
    elif callable(where):
        keep = where
    else:
        raise TypeError(f"where must be a regex string or a predicate on the leaf path, got {type(where).__name__}")

    def init(leaf: LeafInput) -> Any:
        return trimmer.init(leaf) if keep(leaf.path) else None

    def apply(leaf: LeafInput, state: Any) -> jax.Array:
        return trimmer.apply(leaf, state) if keep(leaf.path) else leaf.task_vectors

    return Trimmer(init, apply)


def norm_rescaled(trimmer: Trimmer) -> Trimmer:
    """Wrap ``trimmer`` so each trimmed ``T̃_i`` is rescaled back to ``‖T_i‖`` (a variant from the authors' code)."""

    def apply(leaf: LeafInput, state: Any) -> jax.Array:
        trimmed = trimmer.apply(leaf, state)
        axes = tuple(range(1, trimmed.ndim))
        before = jnp.sqrt(jnp.sum(leaf.task_vectors ** 2, axis=axes, keepdims=True))
        after = jnp.sqrt(jnp.sum(trimmed ** 2, axis=axes, keepdims=True))
        return jnp.where(after > 0, trimmed * before / jnp.where(after > 0, after, 1.0), trimmed)

    return Trimmer(trimmer.init, apply)


def cat_trimmers(lam: float = 5.0, c: int = 3, *, scale_lam: float | None = None, scale_c: int | None = None,
                 shift_c: int | None = None, shift_lam: float | None = None, joint: bool = False,
                 normalize_by_count: bool = False, scale_per_row_mean: bool = False,
                 rescale_norm: bool = False, strict_top_c: bool = False,
                 precision: str = "working") -> dict[Role, Trimmer]:
    """The ``{Role: Trimmer}`` table of CAT Merging; defaults are the paper's.

    ``scale_*``/``shift_*`` default to ``lam``/``c``; ``shift_lam`` switches the shift rule from the paper's
    balanced one to the count-weighted one. Replace an entry by :func:`identity_trimmer` to switch a part off.
    """
    table = {
        Role.LINEAR: linear_projection(lam, c, joint=joint, normalize_by_count=normalize_by_count,
                                       strict_top_c=strict_top_c, precision=precision),
        Role.SCALE: scale_masking(lam if scale_lam is None else scale_lam, c if scale_c is None else scale_c,
                                  per_row_mean=scale_per_row_mean),
        Role.SHIFT: shift_masking(c if shift_c is None else shift_c, lam=shift_lam),
        Role.OTHER: identity_trimmer(),
    }
    if rescale_norm:
        table = {role: (t if role is Role.OTHER else norm_rescaled(t)) for role, t in table.items()}
    return table


# --------------------------------------------------------------------------------------------------------------
# Whole-tree merging.
# --------------------------------------------------------------------------------------------------------------


def check_scalar(name: str, value: Any, *, minimum: float | None = None, allow_tree: bool = False) -> None:
    """Check a real hyperparameter: numeric, finite and ``>= minimum``; one-line :class:`HyperparameterError`.

    A traced value (inside ``jit``/``vmap``/``grad``) is checked for being a real number type only; its value
    does not exist at trace time, so the finiteness and range checks run only on concrete inputs.
    ``allow_tree`` accepts a pytree of coefficients (per-leaf alphas) and checks each leaf.
    """
    if value is None:
        return
    leaves = jax.tree.leaves(value) if allow_tree else [value]
    for v in leaves:
        if isinstance(v, bool) or not (isinstance(v, (int, float, np.number)) or hasattr(v, "dtype")):
            raise HyperparameterError(f"{name} must be a real number, got {v!r} ({type(v).__name__})")
        dtype = np.dtype(getattr(v, "dtype", np.float64))
        if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)) or dtype == np.bool_:
            raise HyperparameterError(f"{name} must be a real number, got an array of dtype {dtype}")
        if is_tracer(v):
            continue
        arr = np.asarray(v, np.float64)
        if not np.all(np.isfinite(arr)):
            raise HyperparameterError(f"{name} must be finite, got {v}")
        if minimum is not None and np.any(arr < minimum):
            raise HyperparameterError(f"{name} must be >= {minimum}, got {v}")


def check_hparams(alpha: Any, lam: Any) -> None:
    """CAT's scalar hyperparameters: ``alpha`` finite (a scalar or a per-leaf tree), ``lam`` finite and ≥ 0."""
    check_scalar("alpha", alpha, allow_tree=True)
    check_scalar("lam", lam, minimum=0.0)


def finetuned_list(finetuned: Any) -> list[PyTree]:
    """``finetuned`` as a list of K trees; a clear error when a single tree is passed instead of a list."""
    if isinstance(finetuned, (list, tuple)) and not hasattr(finetuned, "_fields"):
        return list(finetuned)
    raise TreeMismatchError(f"finetuned must be a list of K fine-tuned parameter trees (one per task), got a single "
                            f"{type(finetuned).__name__}; for one task pass [finetuned]")


def validate_inputs(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree] | None = None) -> None:
    """Check K ≥ 1, matching trees, finite weights and statistics; raise naming the offending leaf.

    Structure and shapes are always checked. Float leaves may differ in dtype between the base and a
    fine-tuned tree (bf16 task models over an fp32 base are merged in the base's dtype); non-float leaves may
    not. NaN/Inf checks run on concrete values only: under ``jax.jit``/``vmap``/``grad`` the values do not
    exist at trace time and those checks are skipped (run the eager call, or ``jax.experimental.checkify``
    around your own code, to check traced values).
    """
    finetuned = finetuned_list(finetuned)
    if len(finetuned) < 1:
        raise HyperparameterError("need at least one fine-tuned model (K >= 1), got K = 0")
    check_finite(pretrained, what="pretrained")
    base_leaves = leaves_with_paths(pretrained)
    for k, tree in enumerate(finetuned):
        check_same_structure(pretrained, tree, what=f"finetuned[{k}]", check_dtype=False)
        for (path, x), y in zip(base_leaves, jax.tree.leaves(tree)):
            dx, dy = jnp.result_type(x), jnp.result_type(y)
            if dx != dy and not (jnp.issubdtype(dx, jnp.inexact) and jnp.issubdtype(dy, jnp.inexact)):
                raise TreeMismatchError(f"finetuned[{k}]: leaf '{path}' has dtype {dy}, expected {dx}")
        check_finite(tree, what=f"finetuned[{k}]")
    if stats is None:
        return
    if not isinstance(stats, (list, tuple)):
        raise MissingStatisticsError(f"stats must be a list of K statistics trees (one per task), got "
                                     f"{type(stats).__name__}")
    if len(stats) != len(finetuned):
        raise MissingStatisticsError(f"got statistics for {len(stats)} task(s) but {len(finetuned)} fine-tuned "
                                     "model(s); need one stats tree per task")
    param_paths = [p for p, _ in base_leaves]
    for k, s in enumerate(stats):
        stat_paths = [p for p, _ in leaves_with_paths(s, is_leaf=is_leaf_stats)]
        if stat_paths != param_paths:
            missing = [p for p in param_paths if p not in set(stat_paths)]
            detail = f"leaf '{missing[0]}' has no entry" if missing else "the structure differs"
            raise TreeMismatchError(f"stats[{k}] does not mirror the params tree: {detail}")
        check_stats(s, what=f"stats[{k}]")


class ParamsView(NamedTuple):
    """A merge input seen as a plain params pytree: ``params``, the specs it declares (``{leaf path: LeafSpec}``
    from its module types or a :class:`~catmerge_jax.roles.ParamsWithRoles`; ``None`` for plain trees) and
    ``rebuild(params) -> the same kind of object`` (an equinox or nnx module, a ``ParamsWithRoles``, the tree)."""

    params: PyTree
    roles: Mapping[str, LeafSpec] | None
    rebuild: Callable[[PyTree], Any]


def params_view(obj: Any) -> ParamsView:
    """``obj`` (linen params, nnx ``State`` or ``Module``, equinox ``Module``, any pytree) as a :class:`ParamsView`."""
    try:
        from catmerge_jax.modules import split_params
    except ImportError:  # pragma: no cover - modules.py is part of the package
        return ParamsView(obj, None, lambda p: p)
    view = split_params(obj)
    return ParamsView(*view)


def _combined_roles(module_roles: Mapping[str, LeafSpec] | None, user: Overrides,
                    stats: Sequence[PyTree] | None = None) -> Overrides:
    """The overrides a merge classifies with: the user's, reconciled with the specs the inputs declare (the params'
    module types or wrapper, and every stats tree's ``LeafStats.spec``); then the path defaults.

    An explicit override that contradicts a declared spec, or two declarations that differ, raise
    :class:`~catmerge_jax.errors.RoleConflictError` naming the leaf (see :func:`catmerge_jax.roles.reconcile`).
    """
    return with_declared(union_declared([("the params", module_roles), *stats_declarations(stats)]), user,
                         source="the params")


def roles_with_stats(roles: Overrides, stats: Sequence[PyTree] | None) -> Overrides:
    """``roles`` over the specs K stats trees declare: what a registry adapter passes to a method that reads roles
    but no statistics (TSV, Iso, WUDI), so their leaves are read as the model computes them."""
    return with_declared(union_declared(stats_declarations(stats)), roles, source="the statistics")


class TreeInputs(NamedTuple):
    """Every leaf of a merge, ready for the per-leaf rules (see :func:`tree_inputs`)."""

    leaves: list[LeafInput]  # one per params leaf, task vectors (K, *shape) in the compute dtype
    bases: list[jax.Array]   # W0 leaves
    treedef: Any
    rebuild: Callable[[PyTree], Any]


def _compute_dtype(dtype: Any) -> Any:
    return compute_dtype(dtype)


def tree_inputs(pretrained: Any, finetuned: Sequence[Any], stats: Sequence[PyTree] | None = None, *,
                roles: Overrides = None) -> TreeInputs:
    """Validate the inputs of a merge and give every leaf as a :class:`LeafInput`.

    Accepts linen params, nnx ``State``/``Module`` and equinox ``Module`` trees (roles then come from the module
    types, overridable by ``roles``). A leaf whose statistics hold per-layer counts (a stacked leaf captured from
    a scanned model) is read as stacked layers unless its spec says otherwise.
    """
    view = params_view(pretrained)
    fts = [params_view(f).params for f in finetuned_list(finetuned)]
    validate_inputs(view.params, fts, stats)
    specs = classify(view.params, _combined_roles(view.roles, roles, stats))
    base_leaves, treedef = jax.tree.flatten(view.params)
    paths = [p for p, _ in leaves_with_paths(view.params)]
    spec_leaves = [sp for _, sp in leaves_with_paths(specs, is_leaf=is_spec)]
    task_leaves = [jax.tree.leaves(t) for t in fts]
    stat_leaves = None if stats is None else [jax.tree.leaves(s, is_leaf=is_leaf_stats) for s in stats]
    bases = [on_device(base) for base in base_leaves]
    per_leaf = [list(t) for t in zip(*task_leaves)]
    if on_one_cpu((bases, per_leaf)) and all(jnp.issubdtype(b.dtype, jnp.floating) for b in bases):
        all_tvs = _stacked_task_vectors_on_host(bases, per_leaf)
    else:
        all_tvs = _stacked_task_vectors(bases, per_leaf)
    leaves = []
    for j, base in enumerate(bases):
        spec = spec_leaves[j]
        leaf_stats = None if stat_leaves is None else [s[j] for s in stat_leaves]
        if leaf_stats and leaf_stats[0].count is not None and np.ndim(leaf_stats[0].count) > 0:
            spec = with_stacking(spec, base.shape, np.ndim(leaf_stats[0].count))
            check_spec(paths[j], base.shape, spec)
        leaves.append(LeafInput(paths[j], spec, all_tvs[j], leaf_stats))
    return TreeInputs(leaves, bases, treedef, view.rebuild)


def on_device(x: Any) -> jax.Array:
    """``jnp.asarray(x)``, without compiling: JAX stages a NumPy array through a small compiled identity program
    per shape (a few dozen programs for a model's leaves), ``jax.device_put`` copies it as it is."""
    return jax.device_put(x) if isinstance(x, np.ndarray) else jnp.asarray(x)


def on_one_cpu(tree: PyTree) -> bool:
    """Whether ``tree`` is concrete and the backend is one CPU device: then the merge's glue arithmetic (stacking,
    gathering, the final sum) runs in NumPy on the same memory, the same operations in the same dtypes, without a
    program to trace and compile for every new model (most of a small model's first merge)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and is_concrete(tree)


def to_device(x: np.ndarray) -> jax.Array:
    """A NumPy array as a JAX array on the CPU device, sharing its memory where JAX can (no second copy of a
    model-sized array)."""
    try:
        return jax.device_put(x, may_alias=True)
    except TypeError:  # a JAX before device_put's may_alias (0.4.36)
        return jax.device_put(x)


def _stacked_task_vectors_on_host(bases: list[jax.Array], tasks: list[list[Any]]) -> list[jax.Array]:
    """:func:`_stacked_task_vectors` by NumPy (see :func:`on_one_cpu`): every input first takes the dtype JAX
    would give it (``jax.dtypes.canonicalize_dtype``), so the result is the compiled program's, bit for bit."""
    out = []
    for base, per_task in zip(bases, tasks):
        compute = np.dtype(_compute_dtype(base.dtype))
        b = np.asarray(base).astype(compute, copy=False)
        stacked = np.empty((len(per_task),) + b.shape, compute)
        for k, t in enumerate(per_task):
            t = np.asarray(t)
            t = t.astype(jax.dtypes.canonicalize_dtype(t.dtype), copy=False).astype(compute, copy=False)
            np.subtract(t, b, out=stacked[k])
        out.append(to_device(stacked))
    return out


@jax.jit
def _stacked_task_vectors(bases: list[jax.Array], tasks: list[list[Any]]) -> list[jax.Array]:
    """Per leaf ``(K, *shape)`` task vectors ``W_k − W0`` in the leaf's compute dtype; one call for the whole tree
    (the host transfers and subtractions of every leaf run in one dispatch instead of several per leaf)."""
    out = []
    for base, per_task in zip(bases, tasks):
        compute = _compute_dtype(base.dtype)
        out.append(jnp.stack([jnp.asarray(t).astype(compute) - base.astype(compute) for t in per_task]))
    return out


@contextlib.contextmanager
def one_gap_warning():
    """Collect the per-leaf :class:`UnresolvedGapWarning` of one merge into one warning naming the leaves."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    leaves = [str(w.message) for w in caught if issubclass(w.category, UnresolvedGapWarning)]
    for w in caught:
        if not issubclass(w.category, UnresolvedGapWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if leaves:
        shown = ", ".join(leaves[:6]) + (f" and {len(leaves) - 6} more" if len(leaves) > 6 else "")
        warnings.warn(UnresolvedGapWarning(
            f"{len(leaves)} linear leaf/leaves have a top-c eigengap below the working precision's resolution "
            f"({shown}): their bases are decided by rounding; pass precision='float64' for exact bases"),
            stacklevel=3)


def _trimmed_leaves(inputs: TreeInputs, trimmers: Mapping[Role, Trimmer], progress: bool, desc: str):
    identity = identity_trimmer()
    iterator = inputs.leaves
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=desc, unit="leaf")
    for leaf in iterator:
        trimmer = trimmers.get(leaf.spec.role, identity)
        yield trimmer.apply(leaf, trimmer.init(leaf))


def _scaled_sum(base: jax.Array, trimmed: jax.Array, alpha: Any) -> jax.Array:
    compute = trimmed.dtype
    return (base.astype(compute) + jnp.asarray(alpha, compute) * trimmed.sum(0)).astype(base.dtype)


def merge_with_trimmers(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree] | None,
                        trimmers: Mapping[Role, Trimmer], *, alpha: Any = 0.3, roles: Overrides = None,
                        progress: bool = False) -> PyTree:
    """``W0 + α Σ_i T̃_i`` with each leaf's task vectors trimmed by ``trimmers[role of the leaf]``.

    Args:
      pretrained: the params pytree ``W0`` (linen dict, nnx ``State``/``Module``, equinox ``Module``, any pytree).
      finetuned: a list of K pytrees of the same structure and shapes (float dtypes may differ from the base's).
      stats: K statistics trees (:mod:`catmerge_jax.stats`) or None when no trimmer needs them.
      trimmers: ``{Role: Trimmer}``; roles absent from the table use task arithmetic.
      alpha: merge scale α (a Python or traced scalar).
      roles: overrides for :func:`catmerge_jax.roles.classify`.
      progress: show a progress bar over leaves.
    Returns:
      The merged params, same structure and dtypes as ``pretrained`` (the same kind of object).
    """
    check_hparams(alpha, None)
    inputs = tree_inputs(pretrained, finetuned, stats, roles=roles)
    with one_gap_warning():
        merged = [_scaled_sum(base, trimmed, alpha)
                  for base, trimmed in zip(inputs.bases, _trimmed_leaves(inputs, trimmers, progress, "CAT merge"))]
    return inputs.rebuild(jax.tree.unflatten(inputs.treedef, merged))


def trim_with_trimmers(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree] | None,
                       trimmers: Mapping[Role, Trimmer], *, roles: Overrides = None,
                       progress: bool = False) -> list[PyTree]:
    """The K trimmed task-vector trees ``[T̃_1, …, T̃_K]`` (leaves in the compute dtype, at least float32).

    ``combine(pretrained, trimmed, alpha)`` equals :func:`merge_with_trimmers` with the same arguments.
    """
    inputs = tree_inputs(pretrained, finetuned, stats, roles=roles)
    with one_gap_warning():
        stacks = list(_trimmed_leaves(inputs, trimmers, progress, "CAT trim"))
    num = len(finetuned_list(finetuned))
    return [jax.tree.unflatten(inputs.treedef, [t[k] for t in stacks]) for k in range(num)]


def combine(pretrained: Any, task_vectors: Sequence[PyTree], coefficients: Any = 1.0) -> Any:
    """``W0 + Σ_k λ_k ⊙ τ_k``: task vectors added back with task-wise or layer-wise coefficients.

    Args:
      pretrained: ``W0`` (any params pytree or module, as the merges accept).
      task_vectors: K trees of task vectors (e.g. :func:`cat_trim`'s output or ``cm.task_vectors``).
      coefficients: a scalar (one α for everything), a ``(K,)`` array (one per task), or a pytree with the
        params' structure whose leaves are ``(K,)`` arrays or scalars (one per task and leaf, AdaMerging's
        layer-wise coefficients). Traced values are fine: this is what ``jax.grad`` differentiates.
    Returns:
      The merged params in the base's dtypes (the same kind of object as ``pretrained``).

    >>> import jax.numpy as jnp
    >>> w0 = {"w": jnp.zeros(2)}
    >>> combine(w0, [{"w": jnp.ones(2)}, {"w": 2 * jnp.ones(2)}], jnp.array([0.5, 0.25]))["w"].tolist()
    [1.0, 1.0]
    """
    view = params_view(pretrained)
    tvs = finetuned_list(task_vectors)
    for k, t in enumerate(tvs):
        check_same_structure(view.params, t, what=f"task_vectors[{k}]", check_dtype=False)
    base_leaves, treedef = jax.tree.flatten(view.params)
    coef_structure = jax.tree.structure(coefficients)
    if coef_structure == treedef:
        coef_leaves = jax.tree.leaves(coefficients)
    elif coef_structure.num_leaves == 1 and coef_structure.num_nodes == 1:
        coef_leaves = [coefficients] * len(base_leaves)
    else:
        raise TreeMismatchError(f"coefficients must be a scalar, a (K,) array or a tree with the params' structure "
                                f"({treedef.num_leaves} leaves); got a tree with {coef_structure.num_leaves} leaves")
    check_scalar("coefficients", coefficients, allow_tree=True)
    task_leaves = [jax.tree.leaves(t) for t in tvs]
    merged = _combine_leaves(base_leaves, task_leaves, coef_leaves)
    return view.rebuild(jax.tree.unflatten(treedef, merged))


@jax.jit
def _combine_leaves(base_leaves: list, task_leaves: list[list], coef_leaves: list) -> list[jax.Array]:
    """:func:`combine`'s arithmetic, one compiled program for the whole tree (leaf by leaf, eagerly, it was a
    dozen small programs and dispatches per leaf); coefficients are traced, so new values do not recompile."""
    num = len(task_leaves)
    merged = []
    for j, base in enumerate(base_leaves):
        base = jnp.asarray(base)
        compute = _compute_dtype(base.dtype)
        coef = jnp.broadcast_to(jnp.asarray(coef_leaves[j], compute), (num,))
        update = sum(coef[k] * jnp.asarray(task_leaves[k][j]).astype(compute) for k in range(num))
        merged.append((base.astype(compute) + update).astype(base.dtype))
    return merged


def _cat_table(lam: Any, c: int, *, scale_lam, scale_c, shift_lam, shift_c, joint, normalize_by_count,
               scale_per_row_mean, rescale_norm, trim_linear, trim_scale, trim_shift, strict_top_c=False,
               precision="working") -> dict[Role, Trimmer]:
    check_hparams(None, lam)
    for name, value in (("c", c), ("scale_c", scale_c), ("shift_c", shift_c)):
        if value is not None:
            check_c(value, np.iinfo(np.int64).max, name)
    for name, value in (("scale_lam", scale_lam), ("shift_lam", shift_lam)):
        check_scalar(name, value, minimum=0.0)
    table = cat_trimmers(lam, c, scale_lam=scale_lam, scale_c=scale_c, shift_c=shift_c, shift_lam=shift_lam,
                         joint=joint, normalize_by_count=normalize_by_count, scale_per_row_mean=scale_per_row_mean,
                         rescale_norm=rescale_norm, strict_top_c=strict_top_c, precision=precision)
    for role, keep in ((Role.LINEAR, trim_linear), (Role.SCALE, trim_scale), (Role.SHIFT, trim_shift)):
        if not keep:
            table[role] = identity_trimmer()
    return table


def _warn_if_no_linear(inputs_or_params: Any, roles: Overrides, trim_linear: bool,
                       stats: Sequence[PyTree] | None = None) -> None:
    if not trim_linear:
        return
    view = params_view(inputs_or_params)
    specs = classify(view.params, _combined_roles(view.roles, roles, stats))
    if not any(sp.role is Role.LINEAR for _, sp in leaves_with_paths(specs, is_leaf=is_spec)):
        warnings.warn("CAT merge: no leaf has the role 'linear', so no linear projection runs and linear weights "
                      "get plain task arithmetic; check cm.role_table(params) or pass roles=", UserWarning,
                      stacklevel=3)


# --------------------------------------------------------------------------------------------------------------
# The grouped path (the default): every linear layer of one shape solved in one batched call, as a plan says.
# --------------------------------------------------------------------------------------------------------------

Placement = Callable[[jax.Array], jax.Array]


@functools.partial(jax.jit, static_argnames=("joint",))
def linear_group_apply(tvs: jax.Array, bases: jax.Array, *, joint: bool = False) -> jax.Array:
    """Trimmed task vectors ``(L, K, in, out)`` (sequential Algorithm 1, or the order-free ``joint`` projection);
    layer by layer on CPU (:func:`catmerge_jax.linalg.map_batch`: XLA:CPU runs plain products faster than batched
    ones), batched on accelerators."""
    apply = apply_cat_linear_joint if joint else apply_cat_linear
    return map_batch(lambda args: apply(*args), (tvs, bases))


# ------------------------------------------------------------------------------------------------------------
# Whole tree.
# ------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("picks", "pad"))
def _stack_layers(arrays: tuple[jax.Array, ...], picks: tuple[tuple[int, int], ...], pad: int) -> jax.Array:
    """``(len(picks) + pad, K, ...)``: layer ``l`` of ``arrays[a]`` (each ``(K, layers, ...)``) for every ``(a, l)``
    in ``picks``, then ``pad`` zero layers; one dispatch for a whole chunk of a group."""
    layers = [arrays[a][:, layer] for a, layer in picks]
    return jnp.stack(layers + [jnp.zeros_like(layers[0])] * pad)


def _pad_rows(data: jax.Array, n: int, traced: bool) -> jax.Array:
    """Rows ``(K, layers, n_own, in)`` with zero rows appended up to ``n`` (NumPy for concrete arrays: no program
    to compile)."""
    missing = n - data.shape[2]
    if missing == 0:
        return data
    widths = ((0, 0), (0, 0), (0, missing), (0, 0))
    if traced:
        return jnp.pad(data, widths)
    return jax.device_put(np.pad(np.asarray(data), widths))


def _stack_layers_on_host(arrays: tuple[jax.Array, ...], picks: tuple[tuple[int, int], ...], pad: int) -> jax.Array:
    """:func:`_stack_layers` of concrete arrays on one CPU device, by NumPy: a copy either way, but no program to
    compile for every chunk of every group (a dozen for a small model's first merge)."""
    if jax.default_backend() != "cpu":
        return _stack_layers(arrays, picks, pad)
    host = {a: np.asarray(arrays[a]) for a in dict.fromkeys(a for a, _ in picks)}  # views of the CPU buffers
    layers = [host[a][:, layer] for a, layer in picks]
    if len(layers) == 1 and not pad and layers[0].flags.c_contiguous:
        # a one-layer leaf (an LM head: GiBs for K tasks) is used in place, not copied twice
        return to_device(layers[0][None])
    return jax.device_put(np.stack(layers + [np.zeros_like(layers[0])] * pad))


@functools.partial(jax.jit, static_argnames=("picks", "specs", "shapes", "per_task"))
def _leaf_updates(chunks: tuple[jax.Array, ...], picks: tuple[tuple[tuple[int, int], ...], ...],
                  specs: tuple[LeafSpec, ...], shapes: tuple[tuple[int, ...], ...], per_task: bool) -> list[jax.Array]:
    """Every linear leaf's update from the group results: leaf ``j`` gathers its layers ``chunks[c][row]`` for
    ``(c, row)`` in ``picks[j]`` (in layer order) and takes its own shape (``(K, *shape)`` with ``per_task``)."""
    out = []
    for leaf_picks, spec, shape in zip(picks, specs, shapes):
        stacked = jnp.stack([chunks[c][row] for c, row in leaf_picks])  # (layers, [K,] in, out)
        if per_task:
            stacked = jnp.moveaxis(stacked, 0, 1)  # (K, layers, in, out)
        out.append(spec.from_matrices(stacked, shape))
    return out


def _leaf_updates_on_host(chunks: tuple[jax.Array, ...], picks: tuple[tuple[tuple[int, int], ...], ...],
                          specs: tuple[LeafSpec, ...], shapes: tuple[tuple[int, ...], ...],
                          per_task: bool) -> list[jax.Array]:
    """:func:`_leaf_updates` by NumPy (see :func:`on_one_cpu`): the same rows gathered, exactly."""
    host = [np.asarray(chunk) for chunk in chunks]  # views of the CPU buffers
    out = []
    for leaf_picks, spec, shape in zip(picks, specs, shapes):
        stacked = np.stack([host[c][row] for c, row in leaf_picks])
        if per_task:
            stacked = np.moveaxis(stacked, 0, 1)
        out.append(to_device(np.ascontiguousarray(spec.from_matrices(stacked, shape))))
    return out


def _chunks(items: list, per_item_bytes: int, budget: int, multiple: int) -> list[list]:
    """``items`` in consecutive chunks of at most ``budget`` bytes (at least one item, a multiple of ``multiple``),
    as even as possible: equal chunks share one compiled program."""
    size = max(1, budget // max(per_item_bytes, 1))
    count = -(-len(items) // size)
    size = -(-len(items) // max(count, 1))
    size = max(multiple, size - size % multiple) if multiple > 1 else size
    return [items[i:i + size] for i in range(0, len(items), size)]


def _rescale(before: jax.Array, trimmed: jax.Array) -> jax.Array:
    axes = tuple(range(1, trimmed.ndim))
    b = jnp.sqrt(jnp.sum(before ** 2, axis=axes, keepdims=True))
    a = jnp.sqrt(jnp.sum(trimmed ** 2, axis=axes, keepdims=True))
    return jnp.where(a > 0, trimmed * b / jnp.where(a > 0, a, 1.0), trimmed)


@functools.partial(jax.jit, static_argnames=("joint", "rescale_norm", "per_task"))
def _group_update(tvs: jax.Array, bases: jax.Array, *, joint: bool, rescale_norm: bool,
                  per_task: bool = False) -> jax.Array:
    """``Σ_i T̃_i`` per layer ``(L, in, out)``, or with ``per_task`` the trimmed stack ``(L, K, in, out)``.

    Trimming, optional norm rescaling and the task sum run in one call, so for a merge the ``(L, K, in, out)``
    trimmed stack never leaves the computation (it is K times the output's size)."""
    bases = jax.lax.stop_gradient(bases)
    if not (per_task or rescale_norm or joint):
        return map_batch(lambda args: cat_linear_update(*args), (tvs, bases))
    trimmed = linear_group_apply(tvs, bases, joint=joint)
    if rescale_norm:
        trimmed = jax.vmap(_rescale)(tvs, trimmed)
    if per_task:
        return trimmed
    # An explicit loop of adds: XLA:CPU's reduce over this middle axis ran ~25× slower (0.2 s for 8 × 768 × 3072).
    return jax.lax.fori_loop(1, trimmed.shape[1], lambda k, acc: acc + trimmed[:, k], trimmed[:, 0])


@jax.jit
def _sum_tasks(stack: jax.Array) -> jax.Array:
    """``Σ_k stack[k]`` as explicit adds: XLA:CPU's reduce over the leading axis first copied the whole ``(K, ...)``
    stack into a transposed buffer (GiBs for an LLM's embedding table)."""
    total = stack[0]
    for t in stack[1:]:
        total = total + t
    return total


def sum_tasks(stack: Any) -> Any:
    """:func:`_sum_tasks`, by NumPy for a concrete stack on one CPU device (:func:`on_one_cpu`): the same adds in the
    same order, so the same result, without a program compiled per leaf shape."""
    if not on_one_cpu(stack):
        return _sum_tasks(stack)
    stack = np.asarray(stack)
    total = stack[0]
    for t in stack[1:]:
        total = total + t
    return to_device(np.ascontiguousarray(total))


@jax.jit
def _combine(bases: list[jax.Array], updates: list[jax.Array], alpha: jax.Array) -> list[jax.Array]:
    """``W0 + α Σ_i T̃_i`` per leaf in the wider of the leaf dtype and float32, cast back (all leaves in one
    dispatch)."""
    merged = []
    for base, update in zip(bases, updates):
        compute = compute_dtype(base.dtype) if jnp.issubdtype(base.dtype, jnp.floating) else jnp.dtype(jnp.float32)
        merged.append((base.astype(compute) + alpha.astype(compute) * update.astype(compute)).astype(base.dtype))
    return merged


# 64 MiB per batched call: each call's arrays then stay in the low tens of MiB, which the allocator reuses from
# call to call, instead of fresh pages that every call faults in again (glibc maps blocks above 32 MiB anew each
# time). MiniLM's K = 3 merge: 1.26–1.44 s in 2–4 calls per group against 1.43–1.61 s in one call per group (1 GiB),
# 2 cores; a large model's layer costs seconds, next to which a few more calls are noise.
GROUP_BYTES = 64 << 20

PARALLEL_BYTES = 256 << 20
"""Linear task vectors up to this size (all layers, all tasks) are solved by two worker threads on a CPU backend.
Such a merge spends most of its time compiling one program pair per group, and XLA compiles (and runs) without
the GIL, so one group compiles while another runs (MiniLM, K = 3: 130 MB; the example's K = 5: 216 MB). Larger
merges (one ViT-L/14 block with K = 8: 403 MB) are dominated by their arithmetic, which XLA and LAPACK already
spread over the cores: they stay sequential, with one group's memory in flight and stage seconds (``timings=``)
that are wall seconds rather than two threads' overlapping ones."""


def is_small_merge(linear_bytes: int, *, traced: bool) -> bool:
    """Whether a batched merge with ``linear_bytes`` of linear task vectors is small enough to be mostly compiling
    (:data:`PARALLEL_BYTES`), on concrete inputs and a CPU backend: its groups then run on two threads, and each
    group as one compiled program pair."""
    return not traced and linear_bytes <= PARALLEL_BYTES and jax.default_backend() == "cpu"


def parallel_workers(num_chunks: int, linear_bytes: int, *, traced: bool) -> int:
    """Worker threads for the groups of a batched merge: 2 for a small, concrete merge on a multi-core CPU backend
    with several chunks (see :data:`PARALLEL_BYTES`), else 1. Each chunk is solved the same way either way, so the
    merge's result does not depend on it.

    JAX's configuration context managers (``jax.enable_x64``, ``jax.default_matmul_precision``, ...) hold for
    the calling thread only; a merge called inside one stays on that thread (:func:`_thread_local_overrides`)."""
    import os

    if num_chunks < 2 or not is_small_merge(linear_bytes, traced=traced):
        return 1
    if _thread_local_overrides():
        return 1
    return min(2, os.cpu_count() or 1)


def _thread_local_overrides() -> bool:
    """Whether this thread runs under a JAX configuration context a new thread would not see (compared through
    JAX's trace context; if this JAX does not expose it, assume so)."""
    import threading

    try:
        from jax._src.config import trace_context
    except ImportError:
        return True
    seen = []
    worker = threading.Thread(target=lambda: seen.append(trace_context()))
    worker.start()
    worker.join()
    return not seen or seen[0] != trace_context()


class GroupSolve(NamedTuple):
    """How the batched path solves its groups of same-shaped linear layers (:func:`cat_merge_batched`'s options of
    the same names; the defaults are ``cat_merge``'s and ``cat_trim``'s)."""

    solver: str = "auto"
    strategy: str = "auto"
    max_group_bytes: int = GROUP_BYTES
    place: Placement | None = None
    layer_multiple: int = 1
    batch_mode: str = "auto"
    min_gap: float | None = None


def cat_merge_batched(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree], *,
                      alpha: float = 0.3, lam: float = 5.0, c: int = 3, roles: Overrides = None,
                      joint: bool = False, rescale_norm: bool = False, scale_lam: float | None = None,
                      scale_c: int | None = None, shift_lam: float | None = None, shift_c: int | None = None,
                      normalize_by_count: bool = False, scale_per_row_mean: bool = False,
                      trim_linear: bool = True, trim_scale: bool = True, trim_shift: bool = True,
                      solver: str = "auto", strategy: str = "auto", max_group_bytes: int = GROUP_BYTES,
                      place: Placement | None = None, layer_multiple: int = 1, batch_mode: str = "auto",
                      min_gap: float | None = None, strict_top_c: bool = False,
                      progress: bool = False,
                      timings: dict | None = None) -> PyTree:
    """:func:`catmerge_jax.cat.cat_merge` with batched linear layers and cost-chosen fast paths.

    Args (beyond ``cat_merge``'s, which mean the same):
      solver: ``"auto"`` | ``"eigh"`` | ``"iterative"`` top-c solver for the linear bases.
      strategy: ``"auto"`` | ``"explicit"`` | ``"matrix_free"`` (see module docstring).
      max_group_bytes: memory budget of one batched call (layers are chunked to fit, by
        :func:`catmerge_jax.conflict.layer_bytes`; default :data:`GROUP_BYTES`).
      place: applied to every stacked group array ``(L, ...)`` before the batched calls (e.g.
        :func:`catmerge_jax.sharding.layer_placement`), identity when None.
      layer_multiple: chunks hold a multiple of this many layers, zero-padded (the device count when sharding).
      min_gap: smallest relative eigengap the iterative solver accepts (see :func:`linear_group_bases`).
      batch_mode: how iterative solves are batched (``"vmap"`` when sharding; ``"auto"``: sequential on CPU).
      progress: progress bar over groups.
      timings: if a dict, receives seconds spent in ``"prepare"``, ``"bases"`` (incl. masks), ``"apply"``, the
        number of linear ``"solves"`` and of iterative ones that fell back to eigh (``"fallbacks"``), and per
        linear group (``"groups"``: shape, layer count, chosen plan, fallbacks, bases seconds). When a small
        merge solves its groups on two threads (:func:`parallel_workers`), ``"bases"`` and ``"apply"`` add up
        both threads' seconds, which overlap.
    Returns:
      The merged params (same structure and dtypes as ``pretrained``).
    """
    table = _cat_table(lam, c, scale_lam=scale_lam, scale_c=scale_c, shift_lam=shift_lam, shift_c=shift_c,
                       joint=joint, normalize_by_count=normalize_by_count, scale_per_row_mean=scale_per_row_mean,
                       rescale_norm=rescale_norm, trim_linear=trim_linear, trim_scale=trim_scale,
                       trim_shift=trim_shift)
    check_hparams(alpha, None)
    _warn_if_no_linear(pretrained, roles, trim_linear, stats)
    inputs = tree_inputs(pretrained, finetuned, stats, roles=roles)
    clock: dict = {}
    solve = GroupSolve(solver, strategy, max_group_bytes, place, layer_multiple, batch_mode, min_gap)
    updates, traced = _batched_updates(inputs, stats, table, solve, values=(alpha, lam), c=c, joint=joint,
                                       rescale_norm=rescale_norm, normalize_by_count=normalize_by_count,
                                       trim_linear=trim_linear, strict_top_c=strict_top_c, progress=progress,
                                       per_task=False, clock=clock)
    t0 = time.perf_counter()
    alpha_arr = jnp.asarray(alpha)
    merged = _combine(list(inputs.bases), list(updates), alpha_arr)
    if not traced:
        jax.block_until_ready(merged)
    clock["apply"] += time.perf_counter() - t0
    if timings is not None:
        timings.update(clock)
    return inputs.rebuild(jax.tree.unflatten(inputs.treedef, merged))


def _batched_updates(inputs: TreeInputs, stats: Sequence[PyTree], table: Mapping[Role, Trimmer], solve: GroupSolve,
                     *, values: tuple, c: int, joint: bool, rescale_norm: bool, normalize_by_count: bool,
                     trim_linear: bool, strict_top_c: bool, progress: bool, per_task: bool,
                     clock: dict) -> tuple[list[jax.Array], bool]:
    """Every leaf's trimmed update, linear layers solved in same-shaped groups (the body of the fast path).

    ``values``: the scalar hyperparameters, ``lam`` last (the solves use it); if any is traced, so is the merge.
    Returns ``(updates, traced)``: per leaf ``Σ_i T̃_i`` (``per_task=False``, the leaf's shape) or the trimmed
    stack ``(K, *shape)`` (``per_task=True``); ``clock`` receives the stage seconds and per-group plans."""
    t_start = time.perf_counter()
    # Under jit/vmap/grad the plan stays shape-based, but the iterative solver's acceptance and eigh fallback are
    # host-side decisions on values: traced merges solve with eigh (or the exact low-rank path).
    lam = values[-1]
    solver, strategy, max_group_bytes, place, layer_multiple, batch_mode, min_gap = solve
    traced = not is_concrete(([leaf.task_vectors for leaf in inputs.leaves], stats, values))
    if traced and solver == "auto":
        solver = "eigh"
    clock.update({"prepare": 0.0, "bases": 0.0, "apply": 0.0, "solves": 0, "fallbacks": 0, "groups": []})
    reduce = (lambda x: x) if per_task else sum_tasks

    update_by_index: dict[int, jax.Array] = {}
    unresolved_leaves: set[str] = set()
    linear_leaves: list[int] = []  # leaf indices, in the order of `matrices`/`inputs_data`
    other_leaves: list[int] = []  # scale, shift and other leaves: masks, computed beside the linear groups
    first_error: tuple[int, Exception] | None = None  # (leaf index, error) of the first bad linear leaf
    matrices, inputs_data = [], []  # per linear leaf: (K, layers, in, out) and (K, layers, ...)
    groups: dict[tuple, list[tuple[int, int]]] = {}  # -> members (position in linear_leaves, layer)
    for j, leaf in enumerate(inputs.leaves):
        if leaf.spec.role is Role.LINEAR and trim_linear:
            # (K, layers, in, out); on one CPU device as NumPy views of the task vectors (a JAX reshape is a copy)
            on_host = not traced and place is None and jax.default_backend() == "cpu"
            mats = leaf.spec.matrices(np.asarray(leaf.task_vectors) if on_host else leaf.task_vectors, lead=1)
            try:
                check_c(c, mats.shape[-1], leaf.path)
                form, data = linear_inputs(leaf, normalize_by_count)  # (K, layers, ...)
            except CatMergeError as e:  # raised below, after the other leaves before it (errors in leaf order)
                first_error = first_error or (j, e)
                continue
            position = len(linear_leaves)
            linear_leaves.append(j)
            matrices.append(mats)
            inputs_data.append(data)
            # rows of any count share a group (padded below), Grams group by their shape
            shape = data.shape[:1] + data.shape[3:] if form == "rows" else data.shape[:1] + data.shape[2:]
            key = (form, (mats.shape[0],) + mats.shape[2:], shape, str(mats.dtype))
            groups.setdefault(key, []).extend((position, layer) for layer in range(mats.shape[1]))
        else:
            other_leaves.append(j)
    clock["prepare"] += time.perf_counter() - t_start

    def other_updates(before: int | None = None) -> None:
        t0 = time.perf_counter()
        for j in other_leaves:
            if before is not None and j > before:
                break
            trimmer = table.get(inputs.leaves[j].spec.role, identity_trimmer())
            update_by_index[j] = reduce(trimmer.apply(inputs.leaves[j], trimmer.init(inputs.leaves[j])))
        clock["bases"] += time.perf_counter() - t0

    if first_error is not None:
        other_updates(before=first_error[0])  # a bad leaf before it is reported first
        raise first_error[1]

    sharded = place is not None
    place = (lambda x: x) if place is None else place
    for (form, _, _, _), members in groups.items():
        # Layers whose inputs have fewer rows (a pooler sees one token per exemplar, the layers below see them all)
        # join their shape's group with zero rows added: zero rows add nothing to any G_k, so the merge is the same,
        # and the group compiles its programs once instead of once per row count.
        if form == "rows":
            positions = sorted({position for position, _ in members})
            n_max = max(inputs_data[p].shape[2] for p in positions)
            for p in positions:
                inputs_data[p] = _pad_rows(inputs_data[p], n_max, traced or sharded)
    matrices, inputs_data = tuple(matrices), tuple(inputs_data)

    def solve_chunk(chunk: list[tuple[int, int]], plan, size: int) -> tuple[jax.Array, dict, float, float]:
        """One chunk of a group, zero-padded to ``size`` layers: its bases and its update; returns ``(update, counts,
        bases s, apply s)``."""
        counts: dict = {}
        t0 = time.perf_counter()
        pad = size - len(chunk)
        stack = _stack_layers if sharded or traced else _stack_layers_on_host
        tvs = place(stack(matrices, tuple(chunk), pad))
        data = place(stack(inputs_data, tuple(chunk), pad))
        bases = linear_group_bases(tvs, data, lam=lam, c=c, plan=plan, valid_layers=len(chunk),
                                   batch_mode=batch_mode, counts=counts, min_gap=min_gap,
                                   strict_top_c=strict_top_c)
        if not traced:
            bases.block_until_ready()
        t1 = time.perf_counter()
        update = _group_update(tvs, bases, joint=joint, rescale_norm=rescale_norm, per_task=per_task)
        if not traced:
            update.block_until_ready()
        return update, counts, t1 - t0, time.perf_counter() - t1

    linear_bytes = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in matrices)
    small = is_small_merge(linear_bytes, traced=traced or sharded)
    jobs = []  # (group index, chunk, plan, padded size), groups in order
    plans = []
    for (form, (num_tasks, fan_in, fan_out), _, _), members in groups.items():
        first = inputs_data[members[0][0]]
        data_shape = first.shape[:1] + first.shape[2:]  # (K, n, in) rows or (K, in, in) Grams
        plan = plan_linear(num_tasks, fan_in, fan_out, c, rows=data_shape[1] if form == "rows" else None,
                           solver=solver, strategy=strategy)
        if form == "gram" and plan.form == "rows":  # rows are not available for this group
            plan = plan_linear(num_tasks, fan_in, fan_out, c, rows=None, solver=solver, strategy="explicit")
        per_layer = layer_bytes(plan, num_tasks, fan_in, fan_out, int(np.prod(data_shape)), c)
        plans.append(((fan_in, fan_out), len(members), plan))
        chunks = _chunks(members, per_layer, max_group_bytes, layer_multiple)
        # A small merge is mostly compiling: its shorter last chunk is padded with zero layers (never sent to an
        # eigensolver) to the others' size, so the whole group runs one compiled program pair.
        sizes = [len(chunk) + (-len(chunk)) % layer_multiple for chunk in chunks]
        if small:
            sizes = [max(sizes)] * len(chunks)
        jobs.extend((len(plans) - 1, chunk, plan, size) for chunk, size in zip(chunks, sizes))
    workers = parallel_workers(len(jobs), linear_bytes, traced=traced or sharded)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plans), desc="CAT trim (batched groups)" if per_task else "CAT merge (batched groups)",
                   unit="group")
    if workers > 1:
        # A small model's merge is mostly compiling: each group's programs compile while another group's run or
        # compile on the other core (XLA releases the GIL), and the scale/shift masks are traced meanwhile.
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(workers, thread_name_prefix="cat-group")
        try:
            futures = [pool.submit(solve_chunk, chunk, plan, size) for _, chunk, plan, size in jobs]
            other_updates()
            results = [f.result() for f in futures]
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # a bad leaf (or Ctrl-C) stops the groups not started
            raise
        pool.shutdown()
    else:
        other_updates()
        results = (solve_chunk(chunk, plan, size) for _, chunk, plan, size in jobs)

    chunk_updates: list[jax.Array] = []
    layer_sources: dict[int, dict[int, tuple[int, int]]] = {p: {} for p in range(len(linear_leaves))}
    per_group = [{"bases_seconds": 0.0, "fallbacks": 0} for _ in plans]
    remaining = [0] * len(plans)
    for g, _, _, _ in jobs:
        remaining[g] += 1
    for (g, chunk, _, _), (update, counts, bases_s, apply_s) in zip(jobs, results):
        clock["bases"] += bases_s
        clock["apply"] += apply_s
        clock["solves"] += counts.get("solves", 0)
        clock["fallbacks"] += counts.get("fallbacks", 0)
        per_group[g]["bases_seconds"] += bases_s
        per_group[g]["fallbacks"] += counts.get("fallbacks", 0)
        if sharded:
            update = gather(update)
        for row, (position, layer) in enumerate(chunk):
            layer_sources[position][layer] = (len(chunk_updates), row)
        chunk_updates.append(update)
        for layer_in_chunk, _task in counts.get("unresolved", []):
            unresolved_leaves.add(inputs.leaves[linear_leaves[chunk[layer_in_chunk][0]]].path)
        remaining[g] -= 1
        if bar is not None and remaining[g] == 0:
            bar.update(1)
    if bar is not None:
        bar.close()
    for (shape, layers, plan), done in zip(plans, per_group):
        clock["groups"].append({"shape": shape, "layers": layers, "form": plan.form, "strategy": plan.strategy,
                                "solver": plan.solver, "fallbacks": done["fallbacks"],
                                "bases_seconds": done["bases_seconds"]})

    t0 = time.perf_counter()
    if linear_leaves:
        picks = tuple(tuple(layer_sources[p][layer] for layer in range(len(layer_sources[p])))
                      for p in range(len(linear_leaves)))
        leaves = [inputs.leaves[j] for j in linear_leaves]
        gather_updates = _leaf_updates_on_host if on_one_cpu(chunk_updates) else _leaf_updates
        updates = gather_updates(tuple(chunk_updates), picks, tuple(leaf.spec for leaf in leaves),
                                 tuple(leaf.task_vectors.shape[1:] for leaf in leaves), per_task)
        update_by_index.update(zip(linear_leaves, updates))
    clock["apply"] += time.perf_counter() - t0
    if unresolved_leaves:
        with one_gap_warning():
            for path in sorted(unresolved_leaves):
                warnings.warn(UnresolvedGapWarning(path))
    return [update_by_index[j] for j in range(len(inputs.leaves))], traced


def cat_trim(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree], *, lam: Any = 5.0,
             c: int = 3, roles: Overrides = None, joint: bool = False, rescale_norm: bool = False,
             scale_lam: Any = None, scale_c: int | None = None, shift_lam: Any = None, shift_c: int | None = None,
             normalize_by_count: bool = False, scale_per_row_mean: bool = False, trim_linear: bool = True,
             trim_scale: bool = True, trim_shift: bool = True, strict_top_c: bool = False,
             precision: str = "working", progress: bool = False, fast: bool = True,
             timings: dict | None = None) -> list[PyTree]:
    """CAT's trimmed task vectors ``[T̃_1, …, T̃_K]``, one params-shaped tree per task.

    ``combine(pretrained, cat_trim(...), alpha)`` (i.e. ``W0 + α Σ_k T̃_k``) equals :func:`cat_merge` with the same
    options; weight tasks and layers yourself with :func:`combine`'s coefficients (AdaMerging does).
    Options and inputs as :func:`cat_merge`: ``fast`` (the default) solves same-shaped linear layers together as
    :func:`cat_merge_batched` does, ``fast=False`` runs the plain per-leaf reference path. Leaves come in the
    compute dtype (float32 for bf16/f16 params).

    Differentiation: gradients with respect to the task vectors flow through the trimming ``T_i − T_i B Bᵀ``
    with the bases and masks held fixed (``stop_gradient``): an eigenspace has no derivative where eigenvalues
    tie (always the case in the null space when a task has fewer exemplar rows than inputs), so the bases are
    explicitly stopped; gradients are never NaN. Gradients with respect to :func:`combine`'s coefficients are
    exact.
    """
    table = _cat_table(lam, c, scale_lam=scale_lam, scale_c=scale_c, shift_lam=shift_lam, shift_c=shift_c,
                       joint=joint, normalize_by_count=normalize_by_count, scale_per_row_mean=scale_per_row_mean,
                       rescale_norm=rescale_norm, trim_linear=trim_linear, trim_scale=trim_scale,
                       trim_shift=trim_shift, strict_top_c=strict_top_c, precision=precision)
    _warn_if_no_linear(pretrained, roles, trim_linear, stats)
    if not (fast and precision == "working"):
        if timings is not None:
            raise HyperparameterError("timings= reports the stages of the batched path (fast=True, "
                                      "precision='working')")
        return trim_with_trimmers(pretrained, finetuned, stats, table, roles=roles, progress=progress)
    inputs = tree_inputs(pretrained, finetuned, stats, roles=roles)
    clock: dict = {}
    stacks, _ = _batched_updates(inputs, stats, table, GroupSolve(), values=(lam,), c=c, joint=joint,
                                 rescale_norm=rescale_norm, normalize_by_count=normalize_by_count,
                                 trim_linear=trim_linear, strict_top_c=strict_top_c, progress=progress,
                                 per_task=True, clock=clock)
    if timings is not None:
        timings.update(clock)
    num = len(finetuned_list(finetuned))
    return [jax.tree.unflatten(inputs.treedef, [t[k] for t in stacks]) for k in range(num)]


def cat_merge(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree], *, alpha: Any = 0.3,
              lam: Any = 5.0, c: int = 3, roles: Overrides = None, joint: bool = False,
              rescale_norm: bool = False, scale_lam: Any = None, scale_c: int | None = None,
              shift_lam: Any = None, shift_c: int | None = None, normalize_by_count: bool = False,
              scale_per_row_mean: bool = False, trim_linear: bool = True, trim_scale: bool = True,
              trim_shift: bool = True, strict_top_c: bool = False, precision: str = "working",
              progress: bool = False, fast: bool = True, timings: dict | None = None) -> PyTree:
    """CAT Merging of K fine-tuned models (paper Algorithm 1); defaults are the paper's rules.

    Composes with JAX: ``jax.jit`` (params, statistics, ``alpha``, ``lam`` traced; ``c`` static), ``jax.vmap``
    over ``alpha`` and ``jax.grad`` with respect to ``alpha`` (see :func:`cat_trim` for gradients through the
    bases). Value checks (NaN/Inf, ranges) run when the inputs are concrete and are skipped under tracing.

    Args:
      pretrained: ``W0``: linen params, an nnx ``State``/``Module`` or an equinox ``Module`` (roles then come from
        the module types), any pytree of arrays.
      finetuned: a list of K fine-tuned trees ``W_k`` (same structure and shapes).
      stats: K exemplar-statistics trees; ``stats[k]`` from the task-k model ``W0 + T_k`` on task k's exemplars.
      alpha: merge scale α in ``W0 + α Σ T̃_k``.
      lam: λ ≥ 0, the knowledge-preservation weight.
      c: basis size (linear) and mask size (scale/shift); 0 gives task arithmetic. Static.
      roles: leaf-role overrides (see :func:`catmerge_jax.roles.classify`).
      joint: order-free projection onto the complement of all other tasks' bases (default: Algorithm 1's order).
      rescale_norm: rescale every trimmed task vector to its original norm (authors'-code variant).
      scale_lam, scale_c, shift_lam, shift_c: separate λ/c for scales and shifts (default: ``lam``/``c``;
        ``shift_lam=None`` keeps the paper's balanced shift rule).
      normalize_by_count, scale_per_row_mean: per-row means instead of sums (variants).
      trim_linear, trim_scale, trim_shift: switch a part off (task arithmetic for that role), for ablations.
      progress: progress bar over leaves.
      strict_top_c: remove all c top eigenvectors even where their eigenvalue is ≤ 0 (the paper's literal
        rule); by default such directions are kept, see :func:`positive_directions`.
      precision: ``"working"`` or ``"float64"`` (bases from a float64 eigh on the host, for eigengaps below float32
        resolution — warned about when found; concrete inputs only; runs the plain per-leaf path).
      fast: the default: same-shaped linear layers solved together with cost-chosen exact fast paths
        (:func:`cat_merge_batched`); ``fast=False`` runs the plain per-leaf reference path.
        Both give the same merge to solver precision (tested against the float64 reference).
      timings: with the fast path, a dict that receives per-stage seconds and the per-group plans.
    Returns:
      The merged params (the same kind of object as ``pretrained``). K = 1 or c = 0 equals task arithmetic.
    """
    if fast and precision == "working":
        return cat_merge_batched(pretrained, finetuned, stats, alpha=alpha, lam=lam, c=c, roles=roles, joint=joint,
                                 rescale_norm=rescale_norm, scale_lam=scale_lam, scale_c=scale_c,
                                 shift_lam=shift_lam, shift_c=shift_c, normalize_by_count=normalize_by_count,
                                 scale_per_row_mean=scale_per_row_mean, trim_linear=trim_linear,
                                 trim_scale=trim_scale, trim_shift=trim_shift, strict_top_c=strict_top_c,
                                 progress=progress, timings=timings)
    if timings is not None:
        raise HyperparameterError("timings= reports the stages of the batched path (fast=True, precision='working')")
    table = _cat_table(lam, c, scale_lam=scale_lam, scale_c=scale_c, shift_lam=shift_lam, shift_c=shift_c,
                       joint=joint, normalize_by_count=normalize_by_count, scale_per_row_mean=scale_per_row_mean,
                       rescale_norm=rescale_norm, trim_linear=trim_linear, trim_scale=trim_scale,
                       trim_shift=trim_shift, strict_top_c=strict_top_c, precision=precision)
    _warn_if_no_linear(pretrained, roles, trim_linear, stats)
    return merge_with_trimmers(pretrained, finetuned, stats, table, alpha=alpha, roles=roles, progress=progress)
