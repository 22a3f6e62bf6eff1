"""WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging
via Task Vectors", ICML 2025).

The rows of a linear layer's task matrix ``τ_k`` ``(out, in)`` approximately span the inputs that task k feeds
that layer, so the interference of a merged matrix ``τ`` on task k is measured without data as
``‖(τ − τ_k) τ_kᵀ‖²_F``. Per matrix, WUDI minimizes

    L(τ) = Σ_k ‖(τ − τ_k) τ_kᵀ‖²_F / ‖τ_k‖²_F

by Adam (lr 1e-5, no weight decay) from ``τ = Σ_k τ_k`` for a fixed number of steps (400 here), and merges
``W0 + α·τ``. The gradient ``∇L = 2 Σ_k (τ − τ_k) τ_kᵀτ_k / ‖τ_k‖²`` is affine in ``τ``, so it is formed
from two matrices computed once, ``H = Σ_k τ_kᵀτ_k/‖τ_k‖²`` ``(in, in)`` and ``R = Σ_k τ_k τ_kᵀτ_k/‖τ_k‖²``,
as ``2(τH − R)``: one ``(out, in)·(in, in)`` product per step instead of K ``out × out`` ones. All layers of
one shape run in one jitted, vmapped ``lax.fori_loop`` (optax's Adam, whose update equals PyTorch's).

Leaves are chosen as in :mod:`catmerge_jax.methods.layerwise` (FusionBench: every 2-D matrix optimized, other
leaves ``W0 + α·mean_k T_k``). The authors' ViT code optimizes only the linear weights and leaves everything
else at ``W0``: ``wudi_merge(..., matrices="linear", rest="pretrained")`` (:data:`AUTHORS_VIT`).

At K = 1 the start ``τ_1`` is the minimizer (zero gradient in exact arithmetic); Adam divides each gradient entry
by its own running size, so rounding-level gradients there still move entries by up to ``lr`` per step.

>>> import jax.numpy as jnp
>>> import catmerge_jax as cm
>>> w0 = {"dense": {"kernel": jnp.zeros((3, 2))}}
>>> fts = [{"dense": {"kernel": jnp.ones((3, 2))}}]
>>> bool((cm.wudi_merge(w0, fts, steps=10)["dense"]["kernel"] == 1).all())
True
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from catmerge_jax.cat import roles_with_stats
from catmerge_jax.errors import HyperparameterError
from catmerge_jax.methods.layerwise import matrix_merge
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.roles import Overrides
from catmerge_jax.tree import PyTree

#: The options that reproduce the authors' ViT code: only linear weights are optimized, the rest stays at W0.
AUTHORS_VIT = {"matrices": "linear", "rest": "pretrained"}


def wudi_loss(merged: jax.Array, tvs: jax.Array) -> jax.Array:
    """``Σ_k ‖(τ − τ_k) τ_kᵀ‖² / ‖τ_k‖²`` for ``merged`` ``(out, in)`` and ``tvs`` ``(K, out, in)`` (for checks;
    the optimizer uses the closed-form gradient)."""
    norms = jnp.sum(tvs * tvs, axis=(1, 2))
    prod = jnp.einsum("mi,kni->kmn", merged, tvs) - jnp.einsum("kmi,kni->kmn", tvs, tvs)
    return jnp.sum(jnp.sum(prod * prod, axis=(1, 2)) / jnp.where(norms > 0, norms, 1))


def wudi_layer(tvs: jax.Array, steps: int = 400, lr: float = 1e-5) -> jax.Array:
    """WUDI of one layer: ``(K, out, in)`` → the optimized merged task matrix ``(out, in)``."""
    norms = jnp.sum(tvs * tvs, axis=(1, 2))
    # A zero task matrix contributes nothing (its loss term is 0/0 in the paper's form; 0 here).
    inv = jnp.where(norms > 0, 1 / jnp.where(norms > 0, norms, 1), 0)
    grams = jnp.einsum("kmi,kmj->kij", tvs, tvs)                        # τ_kᵀτ_k (K, in, in)
    h = jnp.einsum("k,kij->ij", inv, grams)
    r = jnp.einsum("k,kmi,kij->mj", inv, tvs, grams)
    import optax  # here, not at the top: importing optax costs the CLI's other methods ~0.3 s

    opt = optax.adam(lr)
    start = tvs.sum(0)

    def step(_, carry):
        x, state = carry
        # optax's bias correction mixes its int32 step count with floats: allow that under a caller's strict
        # promotion setting (our own arithmetic above stays strict-clean)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(2 * (x @ h - r), state, x)
        return optax.apply_updates(x, updates), state

    merged, _ = jax.lax.fori_loop(0, steps, step, (start, opt.init(start)))
    return merged


def _check(steps: Any, lr: Any) -> tuple[int, float]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise HyperparameterError(f"wudi steps must be a non-negative int, got {steps!r}")
    value = float(lr)  # static: part of the compiled loop
    if not (math.isfinite(value) and value > 0):
        raise HyperparameterError(f"wudi lr must be a finite number > 0, got {lr!r}")
    return steps, value


def wudi_merge(pretrained: PyTree, finetuned: Sequence[PyTree], *, alpha: Any = 1.0, steps: int = 400,
               lr: float = 1e-5, matrices: str = "all_2d", rest: str = "mean", roles: Overrides = None,
               progress: bool = False) -> PyTree:
    """WUDI-Merging: per matrix, Adam on the task-vector interference loss from ``Σ_k τ_k``.

    Args:
      alpha: scale of the optimized task vector (1.0; may be traced).
      steps: Adam steps (400; static).
      lr: Adam learning rate (1e-5; static), no weight decay.
      matrices, rest, roles, progress: as :func:`catmerge_jax.methods.layerwise.matrix_merge`;
        ``**AUTHORS_VIT`` gives the authors' ViT code (linear weights only, the rest at ``W0``).
    Raises:
      HyperparameterError: ``steps`` not a non-negative int, ``lr`` not a positive finite number.
    """
    steps, lr = _check(steps, lr)
    return matrix_merge(pretrained, finetuned, wudi_layer, alpha=alpha, options={"steps": steps, "lr": lr},
                        matrices=matrices, rest=rest, roles=roles, progress=progress, desc="WUDI")


def _merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
    """Registry adapter for :func:`wudi_merge` (needs no statistics)."""
    return wudi_merge(pretrained, finetuned, roles=roles_with_stats(roles, stats), progress=progress, **hparams)


register(MergeMethod("wudi", _merge, {"alpha": 1.0, "steps": 400, "lr": 1e-5}, scale_name="alpha",
                     description="WUDI-Merging (Cheng et al., 2025): data-free per-layer interference minimization"))

__all__ = ["wudi_merge", "wudi_layer", "wudi_loss", "AUTHORS_VIT"]
