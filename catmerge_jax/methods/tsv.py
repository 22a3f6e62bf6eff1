"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025).

Per weight matrix, in the paper's ``(out, in)`` orientation, with task matrices ``Δ_k = U_k Σ_k V_kᵀ``
(``r = min(out, in)``):

1. keep each task's top ``k = ⌊r/K⌋`` singular triplets (``U_k[:, :k]``, ``σ_k[:k]``, ``V_k[:, :k]``);
2. concatenate them: ``U = [U_1 … U_K]`` ``(out, K·k)``, ``Σ = diag(σ_1 … σ_K)``, ``V = [V_1 … V_K]`` ``(in, K·k)``;
3. decorrelate: replace ``U`` and ``V`` by their nearest matrices with orthonormal columns (orthogonal
   Procrustes: ``U⊥ = P Qᵀ`` for ``U = P S Qᵀ``, a thin SVD of the ``(out, K·k)`` factor);
4. ``Δ = U⊥ Σ V⊥ᵀ``; the merged weight is ``W0 + α·Δ``.

Every other leaf is ``W0 + α·mean_k T_k`` (:mod:`catmerge_jax.methods.layerwise` says which leaves are
matrices). K = 1 gives task arithmetic (all ``r`` triplets, already orthonormal); the result does not depend on
the task order (Procrustes commutes with a permutation of columns); TSV is transpose-invariant.

>>> import jax, jax.numpy as jnp
>>> import catmerge_jax as cm
>>> w0 = {"dense": {"kernel": jnp.zeros((4, 4))}}
>>> fts = [{"dense": {"kernel": jnp.diag(jnp.array([3.0, 1, 0, 0]))}},
...        {"dense": {"kernel": jnp.diag(jnp.array([0.0, 0, 2, 1]))}}]
>>> jnp.diag(cm.tsv_merge(w0, fts)["dense"]["kernel"]).round(6).tolist()   # each task keeps its top 2
[3.0, 1.0, 2.0, 1.0]
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.cat import roles_with_stats
from catmerge_jax.methods.layerwise import matrix_merge, polar
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.roles import Overrides
from catmerge_jax.tree import PyTree


TALL = 2
"""A factor with at least ``TALL`` times more rows than columns is reduced to its ``n × n`` triangle ``R`` first."""


def _right_factors(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular values ``(n,)`` (descending) and right singular vectors ``(n, n)`` (columns) of ``a`` ``(m, n)``.

    For a tall ``a`` (``m ≥ TALL·n``: MiniLM's ``30522 × 384`` embedding table) they are those of ``R`` from
    ``a = QR`` (Householder, ``Q`` never formed): ``RᵀR = aᵀa``, so same σ and V, and both factorizations are
    backward stable, so the error is the float32 SVD's own; the ``m``-sized work is one ``geqrf`` instead of
    ``gesdd``'s QR, ``Q``, bidiagonal reduction and ``U = Q·U_R``.
    """
    m, n = a.shape[-2:]
    r = jnp.linalg.qr(a, mode="r") if m >= TALL * n else a
    _, s, vt = jnp.linalg.svd(r, full_matrices=False)
    return s, jnp.swapaxes(vt, -1, -2)


def _inverse(s: jax.Array, rows: int) -> jax.Array:
    """``1/σ``, with 0 for the σ below the numerical rank (``σ ≤ σ_max·rows·eps``, as ``pinv``): their left vectors
    are not determined by ``a`` at all, and the merged matrix gets nothing from them (σ ≈ 0 scales them)."""
    tol = s[..., :1] * rows * jnp.finfo(s.dtype).eps
    return jnp.where(s > tol, 1 / jnp.where(s > tol, s, 1), 0)


def _top_triplets(t: jax.Array, keep: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``U[:, :keep] (m, keep)``, ``σ[:keep]``, ``V[:, :keep] (n, keep)`` of ``t`` ``(m, n)``, ``m ≥ n``.

    Tall ``t``: σ and V from :func:`_right_factors`, ``U = t V Σ⁻¹`` (a matmul; column ``i``'s error is
    ``eps·‖t‖/σ_i``, the bound a direct SVD's left vectors have too)."""
    m, n = t.shape
    if m < TALL * n:
        u, s, vt = jnp.linalg.svd(t, full_matrices=False)
        return u[:, :keep], s[:keep], vt[:keep].T
    s, v = _right_factors(t)
    s, v = s[:keep], v[:, :keep]
    return (t @ v) * _inverse(s, m)[None, :], s, v


def _polar(a: jax.Array) -> jax.Array:
    """:func:`~catmerge_jax.methods.layerwise.polar` of ``a`` ``(m, p)``; for tall ``a`` without an ``m × p`` SVD:
    ``polar(a) = a W Σ⁻¹ Wᵀ`` with ``a``'s σ and right vectors ``W`` from :func:`_right_factors` (error
    ``eps·cond(a)``, as the SVD route's; directions with σ ≈ 0 get nothing, the partial isometry)."""
    m, p = a.shape
    if m < TALL * p:
        return polar(a)
    s, w = _right_factors(a)
    return a @ ((w * _inverse(s, m)[None, :]) @ w.T)


def tsv_layer(tvs: jax.Array) -> jax.Array:
    """TSV-M of one layer: ``(K, out, in)`` task matrices → ``(out, in)`` merged task matrix.

    Works on the tall orientation (TSV is transpose-invariant), where tall factors skip their big SVDs
    (:func:`_top_triplets`, :func:`_polar`)."""
    k_tasks, m, n = tvs.shape
    if m < n:
        return tsv_layer(jnp.swapaxes(tvs, -1, -2)).T
    keep = n // k_tasks
    if keep == 0:
        return jnp.zeros((m, n), tvs.dtype)
    u, s, v = jax.vmap(lambda t: _top_triplets(t, keep))(tvs)        # (K, m, keep), (K, keep), (K, n, keep)
    u_cat = u.transpose(1, 0, 2).reshape(m, k_tasks * keep)
    s_cat = s.reshape(k_tasks * keep)
    v_cat = v.transpose(1, 0, 2).reshape(n, k_tasks * keep)
    return (_polar(u_cat) * s_cat[None, :]) @ _polar(v_cat).T


# ---------------------------------------------------------------------------------------------------------------
# The same layer on the host, for concrete float32 inputs on the CPU (matrix_merge's host path)
# ---------------------------------------------------------------------------------------------------------------

GRAM_ROWS = 4096
"""Rows of a tall factor cast to float64 at a time while its Gram is summed (a reused buffer, no big copy)."""


def _gram64(a: np.ndarray) -> np.ndarray:
    """``aᵀa`` ``(n, n)`` in float64 for a float32 ``a`` ``(m, n)``: the products of float32 numbers are exact in
    float64, so the only error is float64 summation (``≤ m·eps64·‖a‖²``, far below float32's ``eps32·‖a‖²``).
    NumPy forms ``bᵀb`` by a symmetric rank update (``syrk``)."""
    m, n = a.shape
    if m <= GRAM_ROWS:
        b = a.astype(np.float64)
        return b.T @ b
    gram = np.zeros((n, n))
    buffer = np.empty((GRAM_ROWS, n))
    for start in range(0, m, GRAM_ROWS):
        rows = min(GRAM_ROWS, m - start)
        block = buffer[:rows]
        np.copyto(block, a[start:start + rows])
        gram += block.T @ block
    return gram


def _gram_factors(a: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Singular values ``(n,)`` (descending), right singular vectors ``(n, n)`` and ``1/σ`` (0 for ``σ ≤ cutoff·σ₁``)
    of ``a`` ``(m, n)``, from the float64 ``eigh`` of ``aᵀa``.

    Accuracy against the float32 SVD this replaces: an eigenvalue of the float64 Gram is off by ``≈ n·eps64·σ₁²``,
    so ``σ_i`` by ``n·eps64·σ₁²/σ_i``, and a vector by ``n·eps64·σ₁²/((σ_i − σ_j)(σ_i + σ_j))``; the float32 SVD's
    errors are ``eps32·σ₁`` and ``eps32·σ₁/(σ_i − σ_j)``. The Gram's are smaller whenever
    ``σ_i > n·(eps64/eps32)·σ₁ ≈ 2·10⁻⁹·n·σ₁``."""
    values, vectors = np.linalg.eigh(_gram64(a))
    s = np.sqrt(np.maximum(values[::-1], 0.0))
    v = vectors[:, ::-1]
    tol = s[0] * cutoff
    return s, v, np.where(s > tol, 1.0 / np.where(s > tol, s, 1.0), 0.0)


def _polar_map(a: np.ndarray) -> np.ndarray:
    """``M`` with ``polar(a) = a M``, ``M = W Σ⁻¹ Wᵀ`` ``(p, p)`` float64 from the Gram of ``a`` ``(m, p)``.

    Like the SVD's ``P Qᵀ`` (:func:`~catmerge_jax.methods.layerwise.polar`) every direction counts, down to the
    Gram's own resolution ``σ ≤ sqrt(p·eps64)·σ₁ ≈ 3·10⁻⁷·σ₁`` (p = 384), below which a float32 SVD's direction is
    rounding noise as well, and gets nothing here. The error is ``≈ p·eps64·cond(a)²``, below the float32 SVD
    route's ``eps32·cond(a)`` while ``cond(a) < 10⁶`` (the polar factor of a worse conditioned ``a`` is not
    determined by float32 data)."""
    _, w, inverse = _gram_factors(a, float(np.sqrt(a.shape[1] * np.finfo(np.float64).eps)))
    return (w * inverse[None, :]) @ w.T


def tsv_layer_host(tvs: np.ndarray) -> np.ndarray:
    """:func:`tsv_layer` in NumPy for float32 ``(K, out, in)`` task matrices: every SVD replaced by the float64
    ``eigh`` of the ``n × n`` Gram (:func:`_gram_factors`; ``n`` the short side), no compiled program.

    Each task's top triplets are ``σ_i, v_i`` from its Gram and ``u_i = t v_i / σ_i``; the polar factors are
    ``U_cat M_U`` and ``V_cat M_V`` (:func:`_polar_map`), and the merged matrix
    ``U_cat (M_U Σ (V_cat M_V)ᵀ)``: one product with ``out`` rows besides the ``u_i``. Float64 throughout except
    the products with the tall factor (float32, as the float32 SVD's own ``U``).

    >>> import numpy as np
    >>> tvs = np.stack([np.diag([3.0, 1, 0, 0]), np.diag([0.0, 0, 2, 1])]).astype(np.float32)
    >>> np.diag(tsv_layer_host(tvs)).round(6).tolist()
    [3.0, 1.0, 2.0, 1.0]
    """
    k_tasks, m, n = tvs.shape
    if m < n:
        return tsv_layer_host(np.swapaxes(tvs, -1, -2)).T
    keep = n // k_tasks
    dtype = tvs.dtype
    if keep == 0:
        return np.zeros((m, n), dtype)
    rank_cutoff = m * float(np.finfo(dtype).eps)     # a task's σ below it give nothing, as :func:`_inverse`
    small = m < TALL * n                  # square-ish: every product in float64 costs little
    work = np.float64 if small else dtype
    us, ss, vs = [], [], []
    for t in tvs:
        s, v, inverse = _gram_factors(t, rank_cutoff)
        v = v[:, :keep]
        us.append((t.astype(work, copy=False) @ v.astype(work)) * inverse[None, :keep].astype(work))
        ss.append(s[:keep])
        vs.append(v)
    u_cat, s_cat, v_cat = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
    m_u, m_v = _polar_map(u_cat), _polar_map(v_cat)
    core = (m_u * s_cat[None, :]) @ (v_cat @ m_v).T               # (K·keep, n), float64
    return (u_cat @ core.astype(work)).astype(dtype)


def tsv_merge(pretrained: PyTree, finetuned: Sequence[PyTree], *, alpha: Any = 1.0, matrices: str = "all_2d",
              rest: str = "mean", roles: Overrides = None, progress: bool = False) -> PyTree:
    """TSV-Merge: per matrix, each task's top ⌊r/K⌋ singular triplets, decorrelated by orthogonal Procrustes.

    Args:
      pretrained: ``W0``.
      finetuned: K fine-tuned trees.
      alpha: scale of the merged task vector (1.0, the paper's default; may be traced).
      matrices: ``"all_2d"`` (linear kernels and 2-D tables, FusionBench's choice) or ``"linear"``.
      rest: other leaves: ``"mean"`` (``W0 + α·mean_k T_k``) or ``"pretrained"`` (``W0``).
      roles: overrides for :func:`catmerge_jax.roles.classify`.
      progress: tqdm bar over layer shapes.
    Returns:
      Merged params, same structure and dtypes as ``pretrained``.
    """
    return matrix_merge(pretrained, finetuned, tsv_layer, alpha=alpha, matrices=matrices, rest=rest, roles=roles,
                        progress=progress, desc="TSV-M", host_layer_fn=tsv_layer_host)


def _merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
    """Registry adapter for :func:`tsv_merge` (needs no statistics; the specs statistics declare still apply)."""
    return tsv_merge(pretrained, finetuned, roles=roles_with_stats(roles, stats), progress=progress, **hparams)


register(MergeMethod("tsv", _merge, {"alpha": 1.0}, scale_name="alpha",
                     description="TSV-Merge (Gargiulo et al., 2025): per-task top singular vectors, decorrelated"))

__all__ = ["tsv_merge", "tsv_layer", "tsv_layer_host"]
