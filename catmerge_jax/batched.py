"""CAT Merging with every linear layer of the same shape solved in one batched computation.

:func:`cat_merge_batched` returns :func:`catmerge_jax.cat.cat_merge`'s result (up to float rounding and, with
the iterative solver, the solver tolerance) but

* groups LINEAR leaves by ``(in, out, statistics form, rows)`` and runs each group as ONE jitted call
  vmapped over (layers, tasks), in chunks of at most ``max_group_bytes``;
* picks, per group and by flop count (:func:`catmerge_jax.conflict.plan_linear`), how ``G_k`` is built and
  solved, as one :class:`~catmerge_jax.conflict.LinearPlan` value:

  - ``"gram"``: ``G_k`` from the Grams ``A_k`` (``K²(2·in²·out + 2·in·out²)`` flops);
  - ``"rows"``: ``G_k`` from ``Y_ki = X_k T_i`` (``K²(2·n·in·out + 2·n·out²)``, when rows are stored, n < in);
  - ``"matrix_free"``: never forms ``G_k``; the block Krylov solver applies
    ``v ↦ Σ_{i≠k} Y_kiᵀ Y_ki v − λ Σ_{i≠k} Y_iiᵀ Y_ii v`` directly (``8·K·n·out`` flops per vector);
  - ``"rows_krylov"``: never forms ``G_k`` either; block Krylov on ``Z_kᵀ D Z_k`` (the ``2(K−1)n`` rows of task k)
    with a row-major copy of ``Z_kᵀ`` beside ``Z_k``, so each step is two plain GEMMs (``8(K−1)·n·out`` flops per
    vector); chosen when ``2(K−1)n < out`` (ViT-B/32's MLP-up at K = 8);
  - solver ``"eigh"`` or ``"iterative"`` (:mod:`catmerge_jax.linalg`); non-converged / small-gap matrices
    fall back to eigh on the host side, only for those (layer, task) pairs;

* leaves a ``place`` function on each group's stacked arrays, which :mod:`catmerge_jax.sharding` uses to
  spread layers over a device mesh.

SCALE/SHIFT/OTHER leaves are cheap and go through :mod:`catmerge_jax.cat`'s own trimmers unchanged.

This module is the batched path's public entry; the code lives where it belongs: the merge in
:mod:`catmerge_jax.cat` (it is ``cat_merge``'s default), forming and solving ``G_k`` in :mod:`catmerge_jax.conflict`.

>>> import jax, jax.numpy as jnp
>>> import catmerge_jax as cm
>>> from catmerge_jax.batched import cat_merge_batched
>>> w0 = {"a": {"kernel": jnp.zeros((6, 5))}, "b": {"kernel": jnp.zeros((6, 5))}}
>>> fts = [jax.tree.map(lambda x, s=s: x + jax.random.normal(jax.random.key(s), x.shape), w0) for s in range(3)]
>>> x = jax.random.normal(jax.random.key(9), (4, 6))
>>> st = [cm.stats_from_arrays(w0, {"a/kernel": cm.linear_stats(x), "b/kernel": cm.linear_stats(x)})] * 3
>>> merged = cat_merge_batched(w0, fts, st, alpha=0.3, lam=5.0, c=2)
>>> bool(jnp.allclose(merged["a"]["kernel"], cm.cat_merge(w0, fts, st, c=2)["a"]["kernel"], atol=1e-5))
True
"""

from catmerge_jax.cat import Placement, cat_merge_batched, linear_group_apply
from catmerge_jax.conflict import THIN_PRODUCT_PENALTY, LinearPlan, linear_group_bases, plan_linear

__all__ = ["LinearPlan", "plan_linear", "linear_group_bases", "linear_group_apply", "cat_merge_batched", "Placement",
           "THIN_PRODUCT_PENALTY"]
