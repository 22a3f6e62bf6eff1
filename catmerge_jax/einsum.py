"""Flax ``nn.Einsum`` and ``nn.DenseGeneral`` kernels as the matrices they apply, for capture and roles.

JAX LLM codebases (gemma, MaxText, EasyDeL) write projections as einsums with kernels such as
``(heads, d_model, head_dim)`` (``"BTD,NDH->BTNH"``), or as ``DenseGeneral`` over several input/output axes. Either
is one linear map: the kernel's *contracted* axes (in the kernel's order) are its input, its other axes its output,
and the kernel read in that axis order and reshaped is the ``(in, out)`` matrix. This module says so in the two
places that need it:

* :func:`einsum_inputs` — what :func:`catmerge_jax.capture.einsum_rule` hands to capture: the input with its row
  axes (those the kernel does not touch, e.g. batch and tokens) leading and the contracted axes flattened last, in
  the kernel's order, so ``rows @ matrix`` is the layer's output.
* :func:`einsum_spec` / :func:`dense_general_spec` — the :class:`~catmerge_jax.roles.LeafSpec` of such a kernel
  (``in_axes`` and, when the contracted axes are not the leading ones, the reading order ``axes``);
  :func:`module_specs` finds every ``Einsum``/``DenseGeneral`` of a linen model by tracing it once (abstractly) and
  returns ``{leaf path: LeafSpec}`` for its kernels, stacked layers (``nn.scan``) included. Return it from the
  model's ``param_roles()`` (then captured statistics carry it and every merge reads it), or pass it as ``roles=``.

Axes shared by the input, the kernel and the output (a per-expert kernel, ``"ebd,edf->ebf"``) make one map per
entry, not one linear map: they are refused (:class:`~catmerge_jax.capture.CaptureError`); give such a layer a
custom rule.

>>> spec = einsum_spec("BTD,NDH->BTNH", 3, (4, 16, 8))        # q projection: 4 heads of 8 from d_model 16
>>> spec.in_axes, spec.axes, spec.matrix_shape((4, 16, 8))
(1, (1, 0, 2), (16, 32))
>>> einsum_spec("BTNH,NHD->BTD", 4, (4, 8, 16)).matrix_shape((4, 8, 16))    # output projection
(32, 16)
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Mapping, NamedTuple

import numpy as np

from catmerge_jax.errors import CatMergeError
from catmerge_jax.roles import LeafSpec, Role

__all__ = ["EinsumAxes", "einsum_axes", "einsum_inputs", "einsum_spec", "dense_general_spec", "module_specs"]


class EinsumAxes(NamedTuple):
    """An einsum ``lhs,rhs->out`` with ellipses expanded: ``rows`` (input axes the kernel does not touch, in input
    order), ``contracted`` and ``outputs`` (kernel axes, in kernel order), as subscript letters."""

    lhs: str
    rhs: str
    out: str
    rows: str
    contracted: str
    outputs: str


def _expand(term: str, ndim: int, fill: str) -> str:
    if "..." not in term:
        return term
    extra = ndim - (len(term) - 3)
    if extra < 0:
        raise CatMergeError(f"einsum term {term!r} has more axes than its operand's {ndim}")
    return term.replace("...", fill[:extra])


def einsum_axes(einsum_str: str, input_ndim: int, kernel_ndim: int) -> EinsumAxes:
    """Parse a two-operand ``nn.Einsum`` equation (input first, kernel second) into its roles of axes."""
    eq = einsum_str.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise CatMergeError(f"einsum {einsum_str!r}: expected 'input,kernel->output'")
    operands, out = eq.split("->")
    lhs, rhs = operands.split(",")
    unused = "".join(c for c in string.ascii_letters if c not in eq)
    lhs = _expand(lhs, input_ndim, unused)
    rhs = _expand(rhs, kernel_ndim, unused)
    out = _expand(out, max(len(lhs), 0), unused) if "..." in out else out
    if len(lhs) != input_ndim or len(rhs) != kernel_ndim:
        raise CatMergeError(f"einsum {einsum_str!r} does not fit an input of rank {input_ndim} and a kernel of rank "
                            f"{kernel_ndim}")
    shared = [c for c in rhs if c in lhs and c in out]
    if shared:
        raise CatMergeError(f"einsum {einsum_str!r}: kernel axis '{shared[0]}' is also an input and output axis, so "
                            "the kernel is one map per entry, not one linear map; give the layer a custom rule")
    summed = [c for c in rhs if c not in lhs and c not in out]
    if summed:
        raise CatMergeError(f"einsum {einsum_str!r}: kernel axis '{summed[0]}' is summed away, not a linear map")
    return EinsumAxes(lhs, rhs, out, rows="".join(c for c in lhs if c not in rhs),
                      contracted="".join(c for c in rhs if c in lhs), outputs="".join(c for c in rhs if c in out))


def einsum_inputs(einsum_str: str, x: Any, kernel_shape: tuple[int, ...]) -> tuple[tuple[int, ...], Any]:
    """``(rows_shape, rows)``: ``x`` with its row axes leading and the contracted axes flattened last, in the kernel's
    order; ``rows @ kernel-as-matrix`` (see :func:`einsum_spec`) is the einsum's output, reshaped."""
    ax = einsum_axes(einsum_str, x.ndim, len(kernel_shape))
    order = [ax.lhs.index(c) for c in ax.rows] + [ax.lhs.index(c) for c in ax.contracted]
    moved = x.transpose(order)
    rows_shape = tuple(moved.shape[: len(ax.rows)])
    return rows_shape, moved.reshape(rows_shape + (-1,))


def einsum_spec(einsum_str: str, input_ndim: int, kernel_shape: tuple[int, ...], stack_axes: int = 0) -> LeafSpec:
    """The :class:`LeafSpec` of an ``nn.Einsum`` kernel of (unstacked) shape ``kernel_shape``: linear, input = the
    contracted axes, read in the order contracted-then-output (``axes`` when that is not the stored order)."""
    ax = einsum_axes(einsum_str, input_ndim, len(kernel_shape))
    order = tuple(ax.rhs.index(c) for c in ax.contracted + ax.outputs)
    return LeafSpec(Role.LINEAR, in_axes=len(ax.contracted), stack_axes=stack_axes,
                    axes=None if order == tuple(range(len(order))) else order)


def dense_general_spec(module: Any, stack_axes: int = 0) -> LeafSpec:
    """The :class:`LeafSpec` of an ``nn.DenseGeneral`` kernel ``(*in_dims, *features)``: ``in_axes = len(axis)``."""
    if tuple(module.batch_dims):
        raise CatMergeError(f"DenseGeneral with batch_dims={module.batch_dims} has one kernel per batch entry and is "
                            "not a single linear map; give it a custom rule")
    axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    return LeafSpec(Role.LINEAR, in_axes=len(axis), stack_axes=stack_axes)


def module_specs(model: Any, params: Mapping, *inputs: Any, **kwargs: Any) -> dict[str, LeafSpec]:
    """``{kernel path: LeafSpec}`` of every ``nn.Einsum`` and ``nn.DenseGeneral`` a linen ``model`` calls on
    ``inputs`` (one abstract trace, ``jax.eval_shape``; nothing computed). A kernel whose params leaf has more axes
    than the module sees (``nn.scan``/``nn.vmap`` stacks) gets them as ``stack_axes``.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> model = nn.Einsum((4, 16, 8), "BTD,NDH->BTNH", use_bias=False)
    >>> x = jnp.ones((2, 3, 16))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> module_specs(model, params, x)["kernel"].axes
    (1, 0, 2)
    """
    import flax.linen as nn
    import jax

    from catmerge_jax.tree import leaves_with_paths

    leaves = dict(leaves_with_paths(params))
    found: dict[str, LeafSpec] = {}

    def interceptor(next_fun, args, kw, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Einsum, nn.DenseGeneral)):
            path = "/".join(module.path)
            leaf = f"{path}/kernel" if path else "kernel"
            if leaf in leaves:
                x = args[0] if args else kw["inputs"]
                if isinstance(module, nn.Einsum):
                    eq = kw.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
                    inner = len(module.shape)
                    spec = einsum_spec(eq, x.ndim, tuple(module.shape))
                else:
                    axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
                    features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
                    inner = len(axis) + len(features)
                    spec = dense_general_spec(module)
                found[leaf] = dataclasses.replace(spec, stack_axes=np.ndim(leaves[leaf]) - inner)
        return next_fun(*args, **kw)

    def trace(params, inputs):
        with nn.intercept_methods(interceptor):
            model.apply({"params": params}, *inputs, **kwargs)
        return 0

    jax.eval_shape(trace, params, inputs)
    return found
