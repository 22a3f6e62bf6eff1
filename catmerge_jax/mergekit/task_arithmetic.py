"""MergeKit's generalized task arithmetic: one function, two switches, nine methods.

For one weight with base ``W0`` and models ``W_1..W_K`` (MergeKit's ``GeneralizedTaskArithmeticMerge``)::

    τ_k  = sparsify(W_k − W0, density_k)                  (none, magnitude, random, magnitude_outliers, della)
    τ_k ← weight_k · τ_k
    mask = sign(τ_k) == elected sign                       (consensus "sum": sign of Σ_k τ_k; "count": of Σ sign)
    τ    = Σ_k mask·τ_k,   divisor = Σ_k mask·weight_k     (no consensus: every τ_k, divisor Σ_k weight_k)
    τ   ← τ / divisor if normalize;  τ ← λ·τ
    W    = W0 + τ

:data:`VARIANTS` is MergeKit's table of the nine methods built on it (which sparsification, which consensus, and
the defaults of ``normalize`` and ``rescale``). Every step rounds to the working dtype where PyTorch rounds in
MergeKit (:mod:`catmerge_jax.mergekit.precision`), so bf16 merges choose the same entries and signs.

>>> import jax.numpy as jnp
>>> w0 = jnp.zeros(4)
>>> ws = jnp.array([[1.0, -2.0, 0.5, 0.0], [1.0, 1.0, -0.1, 0.0]])
>>> generalized_task_arithmetic(w0, ws, weight=[1.0, 1.0], density=[0.5, 0.5], **VARIANTS["ties"]._asdict()).tolist()
[1.0, -2.0, 0.0, 0.0]
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.errors import HyperparameterError
from catmerge_jax.mergekit import sparsify as sp
from catmerge_jax.mergekit.precision import rounder, sum0, widen
from catmerge_jax.mergekit.selection import Cut, rank_cut_host
from catmerge_jax.mergekit.tie_order import check_tie_order, head_mask
from catmerge_jax.tree import is_tracer

__all__ = ["Variant", "VARIANTS", "generalized_task_arithmetic", "consensus_mask"]


class Variant(NamedTuple):
    """One of MergeKit's generalized-task-arithmetic methods: its switches and defaults."""

    sparsification: str | None
    consensus: str | None
    normalize: bool
    rescale: bool


VARIANTS: dict[str, Variant] = {
    "task_arithmetic": Variant(None, None, False, False),
    "ties": Variant("magnitude", "sum", True, False),
    "dare_ties": Variant("random", "sum", False, True),
    "dare_linear": Variant("random", None, False, True),
    "breadcrumbs": Variant("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": Variant("magnitude_outliers", "sum", False, False),
    "della": Variant("della_magprune", "sum", True, True),
    "della_linear": Variant("della_magprune", None, False, True),
}
"""MergeKit 0.1.5's registry entries of :class:`GeneralizedTaskArithmeticMerge` (``int8_mask`` only changes the
dtype MergeKit stores its sign mask in, so it is accepted and has no effect here)."""


def consensus_mask(deltas: jax.Array, method: str, r=lambda x: x) -> jax.Array:
    """``(K, ...)`` bool: which entries agree with the elected sign (TIES' "sum": the sign of the summed deltas,
    ties to +; "count": the majority of signs). Zero entries never agree."""
    sign = jnp.sign(deltas)
    if method == "sum":
        elected = jnp.where(r(sum0(deltas)) >= 0, 1, -1)
    elif method == "count":
        elected = jnp.where(sum0(sign) >= 0, 1, -1)
    else:
        raise ValueError(f"unknown consensus method {method!r}; expected 'sum' or 'count'")
    return sign == elected.astype(sign.dtype)


def _per_model(value: Any, k: int, name: str) -> Any:
    """``(K,)`` float32 values: NumPy when concrete (no device dispatch per call), jnp when traced."""
    values = list(value) if isinstance(value, (list, tuple)) else None
    if values is not None and len(values) != k:
        raise ValueError(f"{name}: {len(values)} values for {k} models")
    if not any(is_tracer(v) for v in (values if values is not None else [value])):
        out = np.asarray(values if values is not None else value, np.float32)
        return np.broadcast_to(out, (k,)) if out.ndim == 0 else out
    if values is not None:
        return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])
    value = jnp.asarray(value, jnp.float32)
    return jnp.broadcast_to(value, (k,)) if value.ndim == 0 else value


def _ints(values):
    if any(is_tracer(v) for v in values):
        return jnp.stack([jnp.asarray(v, jnp.int32) for v in values])
    return np.asarray(values, np.int32)


def _host_cuts(base, models, work_dtype, counts, descending, tie_order="stable"):
    """Per-model selections found with NumPy (concrete CPU arrays only): ``(cuts, masks)``, the cuts for each
    list of counts, and with ``tie_order="pytorch"`` the K kept-entry masks where a cut splits tied entries
    (None where no cut does: the cuts then select the same entries)."""
    deltas = [np.asarray(tau) for tau in _deltas(base, models, np.dtype(work_dtype).name)]
    cuts, keys = [], []
    for k, tau in enumerate(deltas):
        keys.append(~sp.outlier_keys_host(tau) if descending else sp.outlier_keys_host(tau))
        cuts.append([rank_cut_host(keys[-1], c[k]) for c in counts])
    stacked = [tuple(np.stack([c[i][j] for c in cuts]) for j in range(2)) for i in range(len(counts))]
    if tie_order == "stable" or not any(_splits(keys[k], cut) for k in range(len(deltas)) for cut in cuts[k]):
        return stacked, None
    masks = []
    for k, tau in enumerate(deltas):            # MergeKit: argsort(|τ|.float(), descending)[:count], sort(...)[lo:hi]
        heads = [head_mask(keys[k], int(c[k]), tie_order) for c in counts]
        mask = heads[0] if descending else heads[1] & ~heads[0]
        masks.append(mask.reshape(tau.shape))
    return stacked, tuple(masks)


def _splits(keys: np.ndarray, cut: Cut) -> bool:
    """Whether a stable cut leaves out an entry equal to its last kept one (the tie order then matters)."""
    return int(cut.last) >= 0 and bool(np.any(keys.reshape(-1)[int(cut.last) + 1:] == cut.key))


@functools.partial(jax.jit, static_argnames=("work_dtype",))
def _deltas(base, models, work_dtype):
    base = widen(base)
    return tuple(rounder(work_dtype)(widen(m) - base) for m in models)


def _on_cpu(*xs) -> bool:
    for x in xs:
        if is_tracer(x):
            return False
        if isinstance(x, jax.Array) and any(d.platform != "cpu" for d in x.devices()):
            return False
    return True


def generalized_task_arithmetic(base: jax.Array, models: jax.Array, *, weight: Any, density: Any = 1.0,
                                gamma: Any = 0.01, epsilon: Any = 0.15, normalize: bool = False,
                                rescale: bool = False, lam: Any = 1.0, sparsification: str | None = None,
                                consensus: str | None = None, key: jax.Array | None = None,
                                work_dtype: Any = np.float32, tie_order: str = "stable") -> jax.Array:
    """MergeKit's generalized task arithmetic on one weight.

    Args:
      base: ``W0``, any shape, any float dtype (bf16/f16 are widened to float32 inside the computation).
      models: ``(K, *base.shape)`` or a sequence of K arrays, the other models.
      weight, density, gamma, epsilon: per model: a scalar (every model) or K values; may be traced.
      normalize, rescale: static switches (divide by the summed weights; L1-rescale after sparsifying).
      lam: MergeKit's ``lambda``, scale of the merged task vector; may be traced.
      sparsification: None, "magnitude", "random", "magnitude_outliers" or "della_magprune" (static).
      consensus: None, "sum" or "count" (static).
      key: ``jax.random`` key for "random" and "della_magprune" (model k draws from ``fold_in(key, k)``).
      work_dtype: the dtype MergeKit computes in (the inputs' dtype, or the recipe's ``dtype``): results are
        rounded to it where PyTorch rounds.
      tie_order: which of entries tied at a magnitude cut are kept (:mod:`~catmerge_jax.mergekit.tie_order`):
        "stable" (the lower index) or "pytorch" (MergeKit's; selected on the host, so traced inputs raise).
    Returns:
      the merged weight, shape of ``base``, in ``base``'s dtype (rounded to ``work_dtype``).
    """
    models = tuple(models) if isinstance(models, (list, tuple)) else tuple(models[i] for i in range(models.shape[0]))
    k, n = len(models), int(np.prod(base.shape, dtype=np.int64))
    weight = _per_model(weight, k, "weight")
    density_list = density if isinstance(density, (list, tuple)) else [density] * k
    gamma_list = gamma if isinstance(gamma, (list, tuple)) else [gamma] * k
    counts = None
    if sparsification == "magnitude":
        counts = [_ints([sp.keep_count(d, n) for d in density_list])]
    elif sparsification == "magnitude_outliers":
        pairs = [sp.outlier_counts(d, g, n) for d, g in zip(density_list, gamma_list)]
        counts = [_ints([p[0] for p in pairs]), _ints([p[1] for p in pairs])]
    cuts = masks = None
    host = counts is not None and _on_cpu(base, models, *counts)
    if check_tie_order(tie_order) == "pytorch" and counts is not None:
        host = not any(is_tracer(x) for x in (base, *models, *counts))
        if not host:
            raise HyperparameterError("tie_order='pytorch' needs concrete arrays (it selects on the host), not "
                                      "traced ones; use tie_order='stable' inside jit")
    if host and n > 0:
        cuts, masks = _host_cuts(base, models, work_dtype, [np.asarray(c) for c in counts],
                                 sparsification == "magnitude", tie_order)
    if sparsification in ("random", "della_magprune") and key is None:
        raise ValueError(f"sparsification {sparsification!r} draws random masks: pass key=")
    return _gta(base, models, weight, _per_model(density, k, "density"), _per_model(gamma, k, "gamma"),
                _per_model(epsilon, k, "epsilon"), lam if is_tracer(lam) else np.float32(lam), counts, cuts, masks, key,
                sparsification=sparsification, consensus=consensus, normalize=bool(normalize),
                rescale=bool(rescale), work_dtype=np.dtype(work_dtype).name)


@functools.partial(jax.jit, static_argnames=("sparsification", "consensus", "normalize", "rescale", "work_dtype"))
def _gta(base, models, weight, density, gamma, epsilon, lam, counts, cuts, masks, key, *, sparsification,
         consensus, normalize, rescale, work_dtype):
    # The K models stay separate arrays (a Python loop over K): every step is elementwise, so XLA fuses the whole
    # merge into one pass over the inputs; a stacked (K, ...) array would be materialized between the steps.
    del gamma  # folded into the counts
    r = rounder(work_dtype)
    base, models = widen(base), [widen(m) for m in models]
    dt = base.dtype
    k = len(models)
    deltas = [r(m - base) for m in models]
    if sparsification is not None:
        out = []
        for i, tau in enumerate(deltas):
            if masks is not None and sparsification in ("magnitude", "magnitude_outliers"):
                tau = sp.rescaled(tau, masks[i], rescale, r)          # kept entries chosen on the host
            elif sparsification == "magnitude":
                cut = None if cuts is None else _cut_of(cuts[0], i)
                tau = sp.magnitude(tau, counts[0][i], rescale=rescale, r=r, cut=cut)
            elif sparsification == "magnitude_outliers":
                pair = None if cuts is None else (_cut_of(cuts[0], i), _cut_of(cuts[1], i))
                tau = sp.magnitude_outliers(tau, counts[0][i], counts[1][i], rescale=rescale, r=r, cuts=pair)
            elif sparsification == "random":
                tau = sp.bernoulli(tau, density[i], jax.random.fold_in(key, i), rescale=rescale,
                                   work_dtype=work_dtype)
            elif sparsification == "della_magprune":
                tau = sp.della_magprune(tau, density[i], epsilon[i], jax.random.fold_in(key, i), rescale=rescale,
                                        work_dtype=work_dtype)
            else:
                raise ValueError(f"unknown sparsification {sparsification!r}; expected one of {sp.SPARSIFICATIONS}")
            out.append(r(tau))
        deltas = out
    w = [r(weight[i].astype(dt)) for i in range(k)]      # torch.tensor(weights, dtype=deltas.dtype)
    deltas = [r(d * wi) for d, wi in zip(deltas, w)]
    if consensus is not None:
        signs = [jnp.sign(d) for d in deltas]
        if consensus == "sum":
            elected = jnp.where(r(_total(deltas)) >= 0, 1, -1).astype(dt)
        elif consensus == "count":
            elected = jnp.where(_total(signs) >= 0, 1, -1).astype(dt)
        else:
            raise ValueError(f"unknown consensus method {consensus!r}; expected 'sum' or 'count'")
        agree = [s == elected for s in signs]
        mixed = r(_total([jnp.where(a, d, 0) for a, d in zip(agree, deltas)]))
        divisor = r(_total([jnp.where(a, wi, 0) for a, wi in zip(agree, w)]))
        divisor = jnp.where(divisor == 0, 1, divisor)
    else:
        mixed = r(_total(deltas))
        divisor = r(_total(w))
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1, divisor)
    if normalize:
        mixed = r(mixed / divisor)
    mixed = jnp.where(lam != 1, r(mixed * lam.astype(dt)), mixed)
    return r(base + mixed).astype(dt)


def _total(xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _cut_of(cuts, i):
    return Cut(cuts[0][i], cuts[1][i])
