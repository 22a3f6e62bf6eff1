"""MergeKit's interpolating methods on one weight: ``linear``, ``slerp``, ``nuslerp``, ``multislerp``, ``karcher``,
``model_stock``, ``nearswap``, ``passthrough`` (``mergekit/merge_methods/*.py`` of 0.1.5), as jittable JAX.

Each takes the stacked inputs ``models (K, ...)`` (and ``base`` where the method uses one) as float32 (float64 with
x64) and the working dtype MergeKit computes in; ``r`` rounds to it where PyTorch rounds (most methods compute in
the inputs' dtype; ``linear``, ``slerp`` and ``karcher``'s norms use float32).

>>> import jax.numpy as jnp
>>> linear(jnp.array([[1.0, 2.0], [3.0, 6.0]]), weight=[1.0, 3.0]).tolist()
[2.5, 5.0]
>>> [round(v, 4) for v in slerp(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), t=0.5).tolist()]  # on the circle
[0.7071, 0.7071]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.mergekit.precision import rounder, sum0

__all__ = ["linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "passthrough"]


def _vec(value: Any, k: int) -> jax.Array:
    if isinstance(value, (list, tuple)):
        return jnp.stack([jnp.asarray(v, jnp.float32) for v in value])
    value = jnp.asarray(value, jnp.float32)
    return jnp.broadcast_to(value, (k,)) if value.ndim == 0 else value


def _norm(x, axis=None, keepdims=False):
    return jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=keepdims))


def linear(models: jax.Array, *, weight: Any, normalize: bool = True, work_dtype: Any = np.float32) -> jax.Array:
    """``Σ_k w_k W_k`` (``/ Σ_k w_k`` when ``normalize``), in float32, rounded once to ``work_dtype``."""
    w = _vec(weight, models.shape[0]).astype(models.dtype).reshape((-1,) + (1,) * (models.ndim - 1))
    out = sum0(w * models)
    if normalize:
        out = out / w.sum()
    return rounder(work_dtype)(out)


def slerp(v0: jax.Array, v1: jax.Array, *, t: Any, dot_threshold: float = 0.9995, eps: float = 1e-8,
          work_dtype: Any = np.float32) -> jax.Array:
    """Spherical interpolation from ``v0`` (the base) to ``v1`` over the whole flattened weight: ``t = 0`` is
    ``v0``. Near-parallel (``|cos| > 0.9995``) pairs interpolate linearly. The unnormalized vectors are combined
    with the spherical coefficients (MergeKit's ``slerp``)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    t = jnp.asarray(t, a.dtype)
    na, nb = _norm(a), _norm(b)
    na, nb = jnp.where(na > eps, na, 1), jnp.where(nb > eps, nb, 1)
    dot = jnp.clip(jnp.sum((a / na) * (b / nb)), -1, 1)
    lin = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(lin, 0, dot))
    sin_theta = jnp.where(lin, 1, jnp.sin(theta))
    ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    cb = jnp.where(lin, t, jnp.sin(t * theta) / sin_theta)
    return rounder(work_dtype)(ca * a + cb * b).reshape(v0.shape)


def _nuslerp(t, v0, v1, axis: int, flatten: bool, r):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif axis != -1:
        v0, v1 = jnp.swapaxes(v0, axis, -1), jnp.swapaxes(v1, axis, -1)

    def unit(x):
        return r(x / jnp.maximum(r(_norm(x, axis=-1, keepdims=True)), r(jnp.asarray(1e-7, x.dtype))))

    u0, u1 = unit(v0), unit(v1)
    cos = jnp.clip(r(jnp.sum(r(u0 * u1), axis=-1, keepdims=True)), -1, 1)
    colinear = r(1 - r(cos * cos)) <= 1e-16
    theta = r(jnp.arccos(jnp.where(colinear, 0, cos)))
    sin_theta = r(jnp.sin(theta))
    ca, cb = r(jnp.sin(r((1 - t) * theta))), r(jnp.sin(r(t * theta)))
    spherical = r(r(r(ca * v0) + r(cb * v1)) / jnp.where(colinear, 1, sin_theta))
    out = jnp.where(colinear, r(r((1 - t) * v0) + r(t * v1)), spherical)
    if axis != -1 and not flatten:
        out = jnp.swapaxes(out, axis, -1)
    return out.reshape(shape)


def nuslerp(base: jax.Array | None, models: jax.Array, *, weight: Any, nuslerp_row_wise: bool = False,
            nuslerp_flatten: bool = True, work_dtype: Any = np.float32) -> jax.Array:
    """SLERP of two models (of their task vectors when there is a base) with ``t = w_2 / (w_1 + w_2)`` (0.5 if
    the weights sum to ~0); over the flattened weight, or along rows/columns with ``nuslerp_flatten=False``."""
    r = rounder(work_dtype)
    w = _vec(weight, 2)
    total = w[0] + w[1]
    t = jnp.where(jnp.abs(total) < 1e-6, 0.5, w[1] / jnp.where(jnp.abs(total) < 1e-6, 1, total)).astype(models.dtype)
    axis = 0 if nuslerp_row_wise else -1
    if base is None:
        return _nuslerp(t, models[0], models[1], axis, nuslerp_flatten, r)
    return r(base + _nuslerp(t, r(models[0] - base), r(models[1] - base), axis, nuslerp_flatten, r))


def multislerp(base: jax.Array | None, models: jax.Array, *, weight: Any, normalize_weights: bool = True,
               eps: float = 1e-8, work_dtype: Any = np.float32) -> jax.Array:
    """Barycentric interpolation on the hypersphere (MergeKit's ``multislerp``): project the (task) vectors to the
    unit sphere, average in the tangent space at their weighted mean direction, map back, scale by the weighted
    mean norm. Antipodal inputs whose weights cancel: linear interpolation for two models, NaN for more (MergeKit
    raises)."""
    r = rounder(work_dtype)
    k = models.shape[0]
    if k == 1:
        return models[0]
    tv = models if base is None else r(models - base[None])
    flat = tv.reshape(k, -1)
    w = r(_vec(weight, k).astype(models.dtype))
    if normalize_weights:
        w = r(w / r(w.sum()))
    norms = r(_norm(flat, axis=-1, keepdims=True))
    units = r(flat / r(norms + eps))
    mean = r(sum0(r(units * w[:, None])))
    mean_norm = r(_norm(mean))
    degenerate = mean_norm < eps
    mean = r(mean / jnp.where(degenerate, 1, mean_norm))
    dots = r(jnp.sum(r(units * mean), -1, keepdims=True))
    tangent = r(units - r(dots * mean))
    tres = r(sum0(r(tangent * w[:, None])))
    tn = r(r(_norm(tres)) + eps)
    out = r(r(mean * r(jnp.cos(tn))) + r(tres * r(r(jnp.sin(tn)) / tn)))
    out = r(out * r(jnp.sum(r(norms[:, 0] * w))))
    out = out.reshape(tv.shape[1:])
    fallback = r(r(tv[0] * w[0]) + r(tv[1] * w[1])) if k == 2 else jnp.full(out.shape, jnp.nan, out.dtype)
    out = jnp.where(degenerate, fallback, out)
    return out if base is None else r(out + base)


def karcher(models: jax.Array, *, max_iter: int = 10, tol: float = 1e-5, work_dtype: Any = np.float32) -> jax.Array:
    """The equal-weight Karcher (Riemannian) mean of the inputs' directions on the unit sphere, scaled by their
    mean norm (MergeKit's ``karcher``: at most ``max_iter`` steps, stopping when the tangent step is below
    ``tol``; inputs with norm ≤ ``tol`` are left out of the direction)."""
    r = rounder(work_dtype)
    k = models.shape[0]
    if k == 1:
        return models[0]
    flat = models.reshape(k, -1)
    norms = _norm(flat, axis=-1)
    units = jnp.where(norms[:, None] == 0, 0, r(flat / jnp.where(norms == 0, 1, norms)[:, None]))
    valid = norms > tol
    n_valid = jnp.sum(valid)
    alphas = jnp.where(valid, 1.0 / jnp.maximum(n_valid, 1), 0).astype(flat.dtype)
    mean = jnp.zeros_like(flat[0])
    for i in range(k):
        mean = jnp.where(valid[i], r(mean + r(alphas[i] * units[i])), mean)
    mean_norm = _norm(mean)
    first_valid = units[jnp.argmax(valid)]
    mean = jnp.where(mean_norm < tol, first_valid, r(mean / jnp.where(mean_norm < tol, 1, mean_norm)))

    def step(_, state):
        mean, done = state
        tangent = jnp.zeros_like(mean)
        for i in range(k):
            dot = jnp.clip(r(jnp.dot(mean, units[i])), -1, 1)
            theta = r(jnp.arccos(dot))
            skip = (~valid[i]) | (theta < tol)
            ratio = r(theta / jnp.where(skip, 1, r(jnp.sin(theta))))
            update = r(r(alphas[i] * ratio) * r(units[i] - r(dot * mean)))
            tangent = jnp.where(skip, tangent, r(tangent + update))
        tn = _norm(tangent)
        stop = done | (tn < tol)
        # PyTorch rounds a 0-dim float32 *left* operand to the tensor's dtype (``cos(tn) * mean``), not a right one
        moved = r(r(r(jnp.cos(tn)) * mean) + r(r(jnp.sin(tn)) * r(tangent / jnp.where(tn == 0, 1, tn))))
        un = _norm(moved)
        moved = jnp.where(un > tol, r(moved / jnp.where(un > tol, un, 1)), moved)
        return jnp.where(stop, mean, moved), stop

    mean, _ = jax.lax.fori_loop(0, int(max_iter), step, (mean, jnp.asarray(False)))
    alpha = jnp.asarray(1 / k, norms.dtype)
    scale = norms[0] * alpha                  # Σ_k α·‖W_k‖ in order, as MergeKit's Python sum()
    for i in range(1, k):
        scale = scale + norms[i] * alpha
    out = r(r(scale) * mean).reshape(models.shape[1:])
    return jnp.where(n_valid == 0, jnp.zeros_like(out), out)


def model_stock(base: jax.Array, models: jax.Array, *, filter_wise: bool = False,
                work_dtype: Any = np.float32) -> jax.Array:
    """Model Stock (Jang et al., 2024): with ``cos θ`` the mean pairwise cosine of the task vectors (per row
    when ``filter_wise``), ``t = Kcos θ / (1 + (K−1)cos θ)`` and ``W = t·mean(W_k) + (1−t)·W0`` (the base where
    the denominator vanishes). Needs K ≥ 2 models besides the base."""
    r = rounder(work_dtype)
    k = models.shape[0]
    if filter_wise:
        w0 = base[None] if base.ndim == 1 else base
        ws = models[:, None] if base.ndim == 1 else models
    else:
        w0, ws = base.reshape(-1), models.reshape(k, -1)
    offsets = r(ws - w0[None])
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            num = r(jnp.sum(r(offsets[i] * offsets[j]), axis=-1))
            den = jnp.maximum(r(r(_norm(offsets[i], axis=-1)) * r(_norm(offsets[j], axis=-1))), 1e-6)
            cosines.append(jnp.clip(r(num / den), -1, 1))
    cos = r(jnp.mean(jnp.stack(cosines), 0))[..., None]
    den = r(1 + r((k - 1) * cos))
    singular = jnp.abs(den) < 1e-6
    t = jnp.where(singular, 0, r(r(k * cos) / jnp.where(singular, 1, den)))
    total = ws[0]
    for i in range(1, k):
        total = r(total + ws[i])
    average = r(total / k)
    return r(r(t * average) + r(r(1 - t) * w0)).reshape(base.shape)


def nearswap(base: jax.Array, other: jax.Array, *, t: Any, work_dtype: Any = np.float32) -> jax.Array:
    """Take ``other`` where it is within ``t`` of the base, interpolate with weight ``t / |base − other|``
    beyond (MergeKit's ``nearswap``)."""
    r = rounder(work_dtype)
    diff = r(jnp.abs(r(base - other)))
    # PyTorch's scalar / tensor is reciprocal(tensor) * scalar: two roundings in bf16
    w = jnp.clip(r(r(1 / jnp.maximum(diff, r(jnp.asarray(1e-6, base.dtype)))) * jnp.asarray(t, base.dtype)), 0, 1)
    return r(r(w * other) + r(r(1 - w) * base))


def passthrough(x: jax.Array, *, scale: Any = None, work_dtype: Any = np.float32) -> jax.Array:
    """The single input, times ``scale`` when given (MergeKit's ``passthrough``: layer stacking with slices)."""
    if scale is None:
        return x
    return rounder(work_dtype)(x * jnp.asarray(scale, x.dtype))
