"""Isotropic merging (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025): Iso-C and Iso-CTS.

Per weight matrix in the paper's ``(out, in)`` orientation, ``Δ_TA = Σ_k Δ_k = U Σ Vᵀ``, ``r = min(out, in)``:

* **Iso-C** flattens the spectrum of the summed task matrix to its mean: ``Δ = σ̄ · U Vᵀ``, ``σ̄ = mean(diag Σ)``.
* **Iso-CTS** keeps the top ``c`` directions of ``Δ_TA`` as the common subspace and gives each task ``n``
  directions of its own: ``c0 = int(r·F)`` (``F = common_fraction``), ``c = r − round((r − c0)/K)·K`` (Python's
  round, half to even), ``n = (r − c)/K``. Task k contributes the top ``n`` singular triplets of
  ``Δ_k − U_c U_cᵀ Δ_k`` (its part outside the common left subspace). The ``r`` left and right vectors are
  orthonormalized by orthogonal Procrustes (thin SVD of the ``(out, r)`` / ``(in, r)`` factors) and the
  spectrum is flattened to the mean of all ``r`` kept singular values: ``Δ = σ̄ · U⊥ V⊥ᵀ``.

The merged weight is ``W0 + α·Δ``; every other leaf is ``W0 + α·mean_k T_k``
(:mod:`catmerge_jax.methods.layerwise`). Iso-C is transpose-invariant; Iso-CTS is not (the common subspace is
projected out on the output side), which is why kernels are handed over as ``(out, in)``. With
``common_fraction=1`` Iso-CTS is Iso-C.

>>> import jax.numpy as jnp
>>> import catmerge_jax as cm
>>> w0 = {"dense": {"kernel": jnp.zeros((2, 2))}}
>>> fts = [{"dense": {"kernel": jnp.diag(jnp.array([3.0, 0.0]))}},
...        {"dense": {"kernel": jnp.diag(jnp.array([0.0, 1.0]))}}]
>>> jnp.diag(cm.iso_c_merge(w0, fts)["dense"]["kernel"]).tolist()          # spectrum (3, 1) -> (2, 2)
[2.0, 2.0]
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from catmerge_jax.cat import roles_with_stats
from catmerge_jax.errors import HyperparameterError
from catmerge_jax.methods.layerwise import matrix_merge, polar
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.roles import Overrides
from catmerge_jax.tree import PyTree


def iso_c_layer(tvs: jax.Array) -> jax.Array:
    """Iso-C of one layer: ``(K, out, in)`` → ``σ̄ U Vᵀ`` of the summed task matrix."""
    u, s, vt = jnp.linalg.svd(tvs.sum(0), full_matrices=False)
    return s.mean() * (u @ vt)


def iso_cts_sizes(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(c, n)``: common-subspace size and per-task size for a matrix of rank bound ``rank`` (the paper's
    rounding, so that ``c + K·n = rank``)."""
    c0 = int(rank * common_fraction)
    common = rank - round((rank - c0) / num_tasks) * num_tasks
    if common < 0:
        raise HyperparameterError(f"iso_cts: common_fraction={common_fraction} with K={num_tasks} tasks leaves a "
                                  f"negative common subspace ({common}) for a matrix of rank {rank}; use a larger "
                                  "common_fraction")
    return common, (rank - common) // num_tasks


def iso_cts_layer(tvs: jax.Array, common_fraction: float = 0.8) -> jax.Array:
    """Iso-CTS of one layer: ``(K, out, in)`` → ``(out, in)``."""
    k_tasks, m, n = tvs.shape
    rank = min(m, n)
    common, per_task = iso_cts_sizes(rank, k_tasks, common_fraction)
    u, s, vt = jnp.linalg.svd(tvs.sum(0), full_matrices=False)
    u_c, s_c, vt_c = u[:, :common], s[:common], vt[:common]
    lefts, values, rights = [u_c], [s_c], [vt_c.T]
    if per_task > 0:
        specific = tvs - jnp.einsum("mc,kcn->kmn", u_c, jnp.einsum("mc,kmn->kcn", u_c, tvs))
        ut, st, vtt = jnp.linalg.svd(specific, full_matrices=False)   # (K, m, r), (K, r), (K, r, n)
        lefts.append(ut[:, :, :per_task].transpose(1, 0, 2).reshape(m, k_tasks * per_task))
        values.append(st[:, :per_task].reshape(-1))
        rights.append(vtt[:, :per_task, :].transpose(2, 0, 1).reshape(n, k_tasks * per_task))
    left = polar(jnp.concatenate(lefts, axis=1))
    right = polar(jnp.concatenate(rights, axis=1))
    return jnp.concatenate(values).mean() * (left @ right.T)


def _check_fraction(common_fraction: float) -> float:
    value = float(common_fraction)  # static: it sets subspace sizes
    if not 0.0 <= value <= 1.0:
        raise HyperparameterError(f"iso_cts common_fraction must be in [0, 1], got {common_fraction}")
    return value


def iso_c_merge(pretrained: PyTree, finetuned: Sequence[PyTree], *, alpha: Any = 1.0, matrices: str = "all_2d",
                rest: str = "mean", roles: Overrides = None, progress: bool = False) -> PyTree:
    """Iso-C: per matrix, the summed task matrix with its singular spectrum flattened to its mean.

    Args:
      alpha: scale of the merged task vector (1.0; may be traced).
      matrices, rest, roles, progress: as :func:`catmerge_jax.methods.layerwise.matrix_merge`.
    """
    return matrix_merge(pretrained, finetuned, iso_c_layer, alpha=alpha, matrices=matrices, rest=rest, roles=roles,
                        progress=progress, desc="Iso-C")


def iso_cts_merge(pretrained: PyTree, finetuned: Sequence[PyTree], *, alpha: Any = 1.0,
                  common_fraction: float = 0.8, matrices: str = "all_2d", rest: str = "mean",
                  roles: Overrides = None, progress: bool = False) -> PyTree:
    """Iso-CTS: common subspace of the summed task matrix plus task-specific directions, isotropic spectrum.

    Args:
      alpha: scale of the merged task vector (1.0; may be traced).
      common_fraction: share ``F`` of the rank given to the common subspace (0.8; static, sets sizes).
      matrices, rest, roles, progress: as :func:`catmerge_jax.methods.layerwise.matrix_merge`.
    Raises:
      HyperparameterError: ``common_fraction`` outside [0, 1], or too small for K (negative common size).
    """
    fraction = _check_fraction(common_fraction)
    return matrix_merge(pretrained, finetuned, iso_cts_layer, alpha=alpha, options={"common_fraction": fraction},
                        matrices=matrices, rest=rest, roles=roles, progress=progress, desc="Iso-CTS")


def _merge_c(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
    """Registry adapter for :func:`iso_c_merge` (needs no statistics)."""
    return iso_c_merge(pretrained, finetuned, roles=roles_with_stats(roles, stats), progress=progress, **hparams)


def _merge_cts(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
    """Registry adapter for :func:`iso_cts_merge` (needs no statistics)."""
    return iso_cts_merge(pretrained, finetuned, roles=roles_with_stats(roles, stats), progress=progress, **hparams)


register(MergeMethod("iso_c", _merge_c, {"alpha": 1.0}, scale_name="alpha",
                     description="Iso-C (Marczak et al., 2025): isotropic spectrum of the summed task matrix"))
register(MergeMethod("iso_cts", _merge_cts, {"alpha": 1.0, "common_fraction": 0.8}, scale_name="alpha",
                     description="Iso-CTS (Marczak et al., 2025): common + task-specific subspaces, isotropic"))

__all__ = ["iso_c_merge", "iso_cts_merge", "iso_c_layer", "iso_cts_layer", "iso_cts_sizes"]
