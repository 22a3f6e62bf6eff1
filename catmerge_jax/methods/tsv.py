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

from catmerge_jax.cat import roles_with_stats
from catmerge_jax.methods.layerwise import matrix_merge, polar
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.roles import Overrides
from catmerge_jax.tree import PyTree


def tsv_layer(tvs: jax.Array) -> jax.Array:
    """TSV-M of one layer: ``(K, out, in)`` task matrices → ``(out, in)`` merged task matrix."""
    k_tasks, m, n = tvs.shape
    keep = min(m, n) // k_tasks
    if keep == 0:
        return jnp.zeros((m, n), tvs.dtype)
    u, s, vt = jnp.linalg.svd(tvs, full_matrices=False)               # (K, m, r), (K, r), (K, r, n)
    u_cat = u[:, :, :keep].transpose(1, 0, 2).reshape(m, k_tasks * keep)
    s_cat = s[:, :keep].reshape(k_tasks * keep)
    v_cat = vt[:, :keep, :].transpose(2, 0, 1).reshape(n, k_tasks * keep)
    return (polar(u_cat) * s_cat[None, :]) @ polar(v_cat).T


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
                        progress=progress, desc="TSV-M")


def _merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
    """Registry adapter for :func:`tsv_merge` (needs no statistics; the specs statistics declare still apply)."""
    return tsv_merge(pretrained, finetuned, roles=roles_with_stats(roles, stats), progress=progress, **hparams)


register(MergeMethod("tsv", _merge, {"alpha": 1.0}, scale_name="alpha",
                     description="TSV-Merge (Gargiulo et al., 2025): per-task top singular vectors, decorrelated"))

__all__ = ["tsv_merge", "tsv_layer"]
