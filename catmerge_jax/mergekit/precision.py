"""MergeKit's working precision: it computes in the inputs' own dtype (bf16 for a bf16 model) unless a recipe says
``dtype``; we compute in float32 and round to that dtype at the points where PyTorch rounds.

Rounding matters beyond the last ulp: TIES keeps the top entries of ``|τ|`` and elects signs, so a task vector
rounded to bf16 (as MergeKit forms it) can keep a different entry than the exact one. ``rounder(bf16)`` is
``lax.reduce_precision`` (an explicit rounding XLA never drops), so the same code is exact float32 arithmetic for
float32 inputs and PyTorch's per-operation bf16 rounding for bf16 ones.

>>> import jax.numpy as jnp, numpy as np, ml_dtypes
>>> r = rounder(ml_dtypes.bfloat16)
>>> float(r(jnp.float32(1.0 + 2.0 ** -9)))     # bf16 keeps 8 significant bits: the tie rounds to even
1.0
>>> float(rounder(np.float32)(jnp.float32(0.1))) == float(jnp.float32(0.1))
True
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["rounder", "compute_dtype", "work_dtype_name", "sum0", "widen"]


def rounder(work_dtype: Any) -> Callable[[jax.Array], jax.Array]:
    """``x -> x`` rounded (nearest even) to ``work_dtype``'s precision and range, kept in its compute dtype.

    The identity for float32 and wider work dtypes (the computation already runs in them)."""
    dt = np.dtype(work_dtype)
    if dt.itemsize >= 4:
        return lambda x: x
    info = jnp.finfo(dt)
    return lambda x: jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def compute_dtype(work_dtype: Any) -> np.dtype:
    """float64 for float64 work (MergeKit keeps float64 inputs in float64), else float32."""
    return np.dtype(np.float64) if np.dtype(work_dtype) == np.float64 else np.dtype(np.float32)


_NAMES = {"float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32", "float16": "float16",
          "fp16": "float16", "f16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float64": "float64", "fp64": "float64", "f64": "float64", "double": "float64"}


def work_dtype_name(name: str) -> str | None:
    """MergeKit's dtype spelling (``bfloat16``, ``float16``, ``float32``, ``bf16``, ...) as a NumPy name, or None."""
    return _NAMES.get(str(name).lower().removeprefix("torch."))


def sum0(x: jax.Array) -> jax.Array:
    """``x.sum(0)`` over the (few) models of a stacked ``(K, ...)`` array, as K−1 elementwise adds: XLA:CPU's
    reduction over a leading axis is ~10x slower than the fused adds."""
    out = x[0]
    for i in range(1, x.shape[0]):
        out = out + x[i]
    return out


def widen(x: jax.Array) -> jax.Array:
    """``x`` in its compute dtype: float32 for bf16/f16 (exact), else itself. Kernels widen inside ``jit``, so a
    bf16 checkpoint is never copied to float32 outside the fused computation."""
    return x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x
