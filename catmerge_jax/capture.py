"""Exemplar statistics from any linen, nnx or equinox model, captured generically by module type.

:func:`capture_stats` runs a model on exemplars and returns a stats tree mirroring its params (a
:class:`~catmerge_jax.stats.LeafStats` at every leaf, see :mod:`catmerge_jax.stats`). Nothing here knows a model
family: ``flax.linen.intercept_methods`` sees every ``__call__`` of every module, and a table of *capture rules*
(module type → how to read its input) says what each parameterized module type receives:

==================  ==========================================================================================
``nn.Dense``        ``kernel``: input rows ``(..., in)``
``nn.DenseGeneral`` ``kernel``: input with the contracted ``axis`` moved last and flattened, ``(..., prod(in))``
``nn.Einsum``       ``kernel``: input rows (axes the kernel does not touch) with the contracted axes flattened last
                    in the kernel's order (roles: :func:`catmerge_jax.einsum.module_specs`)
``nn.Conv``         ``kernel``: unfolded input patches ``(N, *out_spatial, prod(window) * in)``, ordered like
                    ``kernel.reshape(-1, out)`` (window-major, channel-minor)
``nn.LayerNorm``    ``scale``: normalized input ``x̂ = (x − mean) / sqrt(var + ε)`` (the module's own ε, axes,
                    ``use_fast_variance``)
``nn.RMSNorm``      ``scale``: ``x̂ = x / sqrt(mean(x²) + ε)``
``nn.BatchNorm``    ``scale``: ``x̂`` from the running statistics (inference mode only)
``nn.GroupNorm``    ``scale``: ``x̂`` normalized per group
``nn.Embed``        row count only (its ids)
==================  ==========================================================================================

Every parameter leaf of an intercepted module gets the row count; kernels get the input Gram ``XᵀX`` (or the rows
``X`` while there are fewer rows than input dims, ``form="auto"``); norm scales get ``Σ_rows x̂²``. The statistics are
keyed by the module's scope path, which is where linen puts its parameters, so they land on the params' own paths.
A module called several times (shared weights) accumulates all its calls.

**Your own linen model** works as is when its parameters live in the modules above (subclasses included: the rule
is looked up along the class's MRO). A custom module that creates a kernel with ``self.param`` needs a rule: a
function ``rule(module, args, kwargs) -> Captured | None`` that reads the call's arguments and returns the arrays
the module's parameters act on, with the row axes leading. Pass it with ``rules={MyLayer: my_rule}`` (merged over
:data:`DEFAULT_RULES`; ``{nn.Embed: None}`` switches a type off)::

    def my_rule(module, args, kwargs):
        x = args[0]                                 # (batch, seq, in), the kernel is (in, out)
        return Captured(rows_shape=x.shape[:-1], linear={"kernel": x})

Rows are real tokens only: ``token_mask`` (bool, e.g. ``(batch, seq)``) is applied to every captured input whose
leading axes equal the mask's shape; an input whose leading axes do not (e.g. a pooler fed the first token,
``(batch, d)``, or image patches) keeps all its rows.

**nnx and equinox.** ``capture_stats(nnx_module, *inputs)`` and ``capture_stats(eqx_module, *inputs)`` use the
same machinery with their own rule tables (``nnx.Linear``, ``LinearGeneral``, ``Conv``, ``LayerNorm``, ``RMSNorm``,
``BatchNorm``, ``Embed``; ``eqx.nn.Linear``, ``Conv*``, ``LayerNorm``, ``RMSNorm``, ``Embedding`` — attention
projections are ``Linear`` submodules), extended the same way with ``rules=``. nnx modules are merged inside the
traced function and the ``__call__`` of the captured classes is wrapped while it is traced (restored afterwards);
linen modules inside ``nnx.bridge.ToNNX`` are seen by the linen interceptor under the bridge's path. Equinox
submodules are replaced by a recording wrapper, and the model is mapped over the exemplar axis (equinox layers act
on one example). Exemplars of the wrong width raise :class:`CaptureError` naming the layer and both widths.

**Lifted transforms and stacked layers.** Modules inside ``nn.scan``, ``nn.remat``, ``nn.vmap`` (and ``nnx.scan``,
``nnx.remat``, ``nnx.vmap``, or a ``jax.lax.scan`` over equinox layers stacked with ``eqx.filter_vmap``) run in an
inner trace. Each call's sums (row count, Gram or rows, Σx̂²) are computed in that trace and handed to the host by a
``jax.debug.callback``, which every transform keeps; the forward pass runs under ``jax.jit``. The layer a call
belongs to is data, not call order: every captured module carries its layer index as a float array shaped like its
stack axes, stored beside its parameters (a linen params entry, an nnx ``Param``, a field of the equinox wrapper),
so a scan slices it exactly like the weights. A first abstract pass (``jax.eval_shape``) learns each module's stack
axes (its outer parameter rank minus the rank it sees). Under ``jax.vmap`` the callback is a ``custom_vmap``
function that keeps the mapped axes instead of unrolling: axes along which the layer index is mapped (an ensemble)
stay separate layers, all others fold into rows. A leaf stacking ``L`` layers gets ``count (L,)``, ``gram
(L, in, in)`` or ``rows (L, n, in)``, ``sq_sum (L, d)``; :func:`catmerge_jax.modules.stacked_spec` turns that into
the leaf's ``LeafSpec.stack_axes`` without any user override. Not supported: a linen module inside ``nnx.bridge``
that is itself inside a lifted transform over stacked parameters (a clear error), and modules of other frameworks
nested inside the captured one (``nnx.bridge.ToLinen``): when nothing at all is captured a warning says so.

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> from catmerge_jax.capture import capture_stats
>>> model = nn.Sequential([nn.Dense(4), nn.LayerNorm()])
>>> x = jnp.ones((2, 3, 5))
>>> params = model.init(jax.random.key(0), x)["params"]
>>> stats = capture_stats(model, params, x, token_mask=jnp.array([[1, 1, 0], [1, 0, 0]], bool))
>>> float(stats["layers_0"]["kernel"].count), stats["layers_1"]["scale"].sq_sum.shape
(3.0, (4,))
"""

from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import _conv_dimension_numbers, canonicalize_padding

from catmerge_jax.errors import CatMergeError
from catmerge_jax.roles import LeafSpec, Overrides, Role, classify, declared_specs, default_spec, is_spec, with_declared
from catmerge_jax.stats import LeafStats, stats_add, stats_from_arrays, with_specs
from catmerge_jax.tree import PyTree, leaves_with_paths

_HIGHEST = jax.lax.Precision.HIGHEST


class CaptureError(CatMergeError):
    """The model cannot be captured as asked (unsupported module configuration, inputs that do not batch)."""


class Captured(NamedTuple):
    """What one call of a module feeds its parameters. Every array's leading axes are ``rows_shape``.

    Attributes:
      rows_shape: shape of the row axes, e.g. ``(batch, seq)``; every parameter leaf counts these rows.
      linear: ``{param name: (*rows_shape, in)}`` inputs of linear kernels.
      scale: ``{param name: (*rows_shape, *feature_shape)}`` normalized inputs of norm scales.
    """

    rows_shape: tuple[int, ...]
    linear: Mapping[str, jax.Array] = types.MappingProxyType({})
    scale: Mapping[str, jax.Array] = types.MappingProxyType({})


Rule = Callable[[nn.Module, tuple, dict], Optional[Captured]]


def _axes(ndim: int, axes: Any) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted({a % ndim for a in axes}))


def _features_last(x: jax.Array, feature_axes: Sequence[int]) -> jax.Array:
    """``x`` with ``feature_axes`` moved to the end (in the given order)."""
    rest = [a for a in range(x.ndim) if a not in feature_axes]
    return jnp.transpose(x, rest + list(feature_axes))


def _has_param(module: nn.Module, name: str) -> bool:
    return module.has_variable("params", name)


def dense_rule(module: nn.Dense, args: tuple, kwargs: dict) -> Captured:
    """``nn.Dense``: the kernel ``(in, out)`` sees the input rows ``(..., in)``."""
    x = args[0] if args else kwargs["inputs"]
    return Captured(rows_shape=tuple(x.shape[:-1]), linear={"kernel": x})


def dense_general_rule(module: nn.DenseGeneral, args: tuple, kwargs: dict) -> Captured:
    """``nn.DenseGeneral``: the contracted ``axis`` (in the module's order) flattened to one input axis.

    The kernel ``(*in_dims, *features)`` read with ``in_axes = len(axis)`` is ``(prod(in_dims), prod(features))``,
    and flattening the input's contracted axes in the same order gives matching feature indices.
    """
    x = args[0] if args else kwargs["inputs"]
    if tuple(module.batch_dims):
        raise CaptureError(f"module '{'/'.join(module.path)}': DenseGeneral with batch_dims={module.batch_dims} "
                           "has one kernel per batch entry and is not a single linear map; give it a custom rule")
    axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    axis = [a % x.ndim for a in axis]
    rest = [a for a in range(x.ndim) if a not in axis]
    moved = jnp.transpose(x, rest + axis)
    rows_shape = tuple(moved.shape[: len(rest)])
    return Captured(rows_shape=rows_shape, linear={"kernel": moved.reshape(rows_shape + (-1,))})


def conv_patches(module: nn.Conv, x: jax.Array) -> jax.Array:
    """Unfolded input patches of a ``nn.Conv``, ``(N, *out_spatial, prod(window) * in)``.

    The feature order matches ``kernel.reshape(-1, features)`` so that ``patches @ kernel_matrix + bias`` equals the
    convolution; padding, strides and dilations follow ``nn.Conv.__call__``.
    """
    kernel_size = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    n = len(kernel_size)

    def broadcast(v):
        v = 1 if v is None else v
        return (v,) * n if isinstance(v, int) else tuple(v)

    if x.ndim != n + 2:  # nn.Conv folds any number of batch axes into one
        x = x.reshape((-1,) + x.shape[x.ndim - n - 1:])
    strides, in_dil, k_dil = broadcast(module.strides), broadcast(module.input_dilation), broadcast(module.kernel_dilation)
    padding = canonicalize_padding(module.padding, n)
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, k_dil)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        x = jnp.pad(x, [(0, 0), (k_dil[0] * (kernel_size[0] - 1), 0), (0, 0)])
        padding = "VALID"
    patches = jax.lax.conv_general_dilated_patches(
        x, kernel_size, strides, padding, lhs_dilation=in_dil, rhs_dilation=k_dil,
        dimension_numbers=_conv_dimension_numbers(x.shape), precision=_HIGHEST)
    # lax orders the patch features channel-major (in, *window); the kernel is (*window, in, out).
    channels = x.shape[-1]
    patches = patches.reshape(patches.shape[:-1] + (channels,) + kernel_size)
    patches = jnp.moveaxis(patches, -n - 1, -1)
    return patches.reshape(patches.shape[: n + 1] + (-1,))


def conv_rule(module: nn.Conv, args: tuple, kwargs: dict) -> Captured:
    """``nn.Conv``: the kernel ``(*window, in, out)`` is a linear map on unfolded patches."""
    x = args[0] if args else kwargs["inputs"]
    if module.feature_group_count != 1:
        raise CaptureError(f"module '{'/'.join(module.path)}': grouped convolution (feature_group_count="
                           f"{module.feature_group_count}) is a different linear map per group; give it a custom rule")
    patches = conv_patches(module, x)
    return Captured(rows_shape=tuple(patches.shape[:-1]), linear={"kernel": patches})


def _normalized(x: jax.Array, reduction_axes: tuple[int, ...], epsilon: float, *, use_mean: bool,
                use_fast_variance: bool, mask: Any = None) -> jax.Array:
    """``(x − mean) / sqrt(var + ε)`` exactly as flax's normalization layers compute it (float32 at least)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    where = None if mask is None else jnp.asarray(mask, bool)
    if use_mean and use_fast_variance:
        mu = x.mean(reduction_axes, where=where, keepdims=True)
        var = jnp.maximum(0.0, (x * x).mean(reduction_axes, where=where, keepdims=True) - mu * mu)
    elif use_mean:
        mu = x.mean(reduction_axes, where=where, keepdims=True)
        var = ((x - mu) ** 2).mean(reduction_axes, where=where, keepdims=True)
    else:
        mu = jnp.zeros((), x.dtype)
        var = (x * x).mean(reduction_axes, where=where, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + epsilon)


def _norm_captured(module: nn.Module, xhat: jax.Array, feature_axes: tuple[int, ...]) -> Captured:
    """Rows are the non-feature axes; the scale (when the module has one) sees ``x̂`` with features last."""
    moved = _features_last(xhat, feature_axes)
    rows_shape = tuple(moved.shape[: xhat.ndim - len(feature_axes)])
    if not _has_param(module, "scale"):  # use_scale=False: only the bias, which needs just the row count
        return Captured(rows_shape=rows_shape)
    return Captured(rows_shape=rows_shape, scale={"scale": moved})


def layer_norm_rule(module: nn.LayerNorm, args: tuple, kwargs: dict) -> Captured:
    """``nn.LayerNorm``: the scale sees ``x̂`` over the module's reduction axes; rows are the non-feature axes."""
    x = args[0] if args else kwargs["x"]
    xhat = _normalized(x, _axes(x.ndim, module.reduction_axes), module.epsilon, use_mean=True,
                       use_fast_variance=module.use_fast_variance, mask=kwargs.get("mask"))
    return _norm_captured(module, xhat, _axes(x.ndim, module.feature_axes))


def rms_norm_rule(module: nn.RMSNorm, args: tuple, kwargs: dict) -> Captured:
    """``nn.RMSNorm``: the scale sees ``x / sqrt(mean(x²) + ε)``."""
    x = args[0] if args else kwargs["x"]
    xhat = _normalized(x, _axes(x.ndim, module.reduction_axes), module.epsilon, use_mean=False,
                       use_fast_variance=module.use_fast_variance, mask=kwargs.get("mask"))
    return _norm_captured(module, xhat, _axes(x.ndim, module.feature_axes))


def batch_norm_rule(module: nn.BatchNorm, args: tuple, kwargs: dict) -> Captured:
    """``nn.BatchNorm`` in inference mode: ``x̂ = (x − running mean) / sqrt(running var + ε)``."""
    x = args[0] if args else kwargs["x"]
    call_flag = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    use_running = nn.merge_param("use_running_average", module.use_running_average, call_flag)
    if not use_running:
        raise CaptureError(f"module '{'/'.join(module.path)}': BatchNorm must run in inference mode "
                           "(use_running_average=True) to capture statistics")
    feature_axes = _axes(x.ndim, module.axis)
    shape = [x.shape[a] if a in feature_axes else 1 for a in range(x.ndim)]
    mean = jnp.reshape(module.get_variable("batch_stats", "mean"), shape)
    var = jnp.reshape(module.get_variable("batch_stats", "var"), shape)
    xhat = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + module.epsilon)
    return _norm_captured(module, xhat, feature_axes)


def group_norm_rule(module: nn.GroupNorm, args: tuple, kwargs: dict) -> Captured:
    """``nn.GroupNorm``: ``x̂`` normalized within each channel group (channels last)."""
    x = args[0] if args else kwargs["x"]
    reduction_axes = (list(range(1, x.ndim - 1)) + [-1]) if module.reduction_axes is None else module.reduction_axes
    reduction_axes = _axes(x.ndim, reduction_axes)
    channels = x.shape[-1]
    groups = module.num_groups if module.group_size is None else channels // module.group_size
    grouped = x.reshape(x.shape[:-1] + (groups, channels // groups))
    mask = kwargs.get("mask")
    if mask is not None:
        mask = mask.reshape(mask.shape[:-1] + (groups, channels // groups))
    axes = tuple(a for a in reduction_axes[:-1]) + (grouped.ndim - 1,)
    xhat = _normalized(grouped, axes, module.epsilon, use_mean=True, use_fast_variance=module.use_fast_variance,
                       mask=mask).reshape(x.shape)
    return _norm_captured(module, xhat, (x.ndim - 1,))


def einsum_rule(module: nn.Einsum, args: tuple, kwargs: dict) -> Captured:
    """``nn.Einsum``: the kernel is one linear map from its contracted axes to its other axes; the input rows are
    the input's axes the kernel does not touch, the contracted axes flattened last in the kernel's order
    (:func:`catmerge_jax.einsum.einsum_inputs`; its roles: :func:`catmerge_jax.einsum.module_specs`)."""
    from catmerge_jax.einsum import einsum_inputs

    x = args[0] if args else kwargs["inputs"]
    eq = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
    try:
        rows_shape, rows = einsum_inputs(eq, x, tuple(module.shape))
    except CatMergeError as e:
        raise CaptureError(f"module '{'/'.join(module.path)}': {e}") from None
    return Captured(rows_shape=rows_shape, linear={"kernel": rows})


def embed_rule(module: nn.Embed, args: tuple, kwargs: dict) -> Captured:
    """``nn.Embed``: a lookup table (task arithmetic), so only the row count of its ids."""
    ids = args[0] if args else kwargs["inputs"]
    return Captured(rows_shape=tuple(ids.shape))


DEFAULT_RULES: Mapping[type, Rule] = types.MappingProxyType({
    nn.Dense: dense_rule,
    nn.DenseGeneral: dense_general_rule,
    nn.Einsum: einsum_rule,
    nn.Conv: conv_rule,
    nn.LayerNorm: layer_norm_rule,
    nn.RMSNorm: rms_norm_rule,
    nn.BatchNorm: batch_norm_rule,
    nn.GroupNorm: group_norm_rule,
    nn.Embed: embed_rule,
})
"""Module type → capture rule. Read-only; extend per call with ``rules=``."""


def _rule_for(module_type: type, rules: Mapping[type, Rule | None]) -> Rule | None:
    for cls in module_type.__mro__:
        if cls in rules:
            return rules[cls]
    # A module type may carry its own rule (a static ``capture_rule(module, args, kwargs)``), so models that hold a
    # parameter outside the standard layers (e.g. a bare projection matrix) are captured without a rules= table.
    return getattr(module_type, "capture_rule", None)



# ---------------------------------------------------------------------------------------------------------------
# nnx and equinox rules. nnx layers take batches like linen; equinox layers act on one example (a Linear on a
# vector ``(in,)``), so their rows_shape is usually ``()`` and the batch axes come from vmap (see _emit below).


def _arg(args: tuple, kwargs: dict, *names: str) -> Any:
    if args:
        return args[0]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    raise CaptureError(f"cannot find the input among the call's arguments (looked for {names})")


def _norm_scale(has_scale: bool, name: str, xhat: jax.Array, feature_axes: tuple[int, ...]) -> Captured:
    moved = _features_last(xhat, feature_axes)
    rows_shape = tuple(moved.shape[: xhat.ndim - len(feature_axes)])
    return Captured(rows_shape=rows_shape, scale={name: moved} if has_scale else {})


def nnx_linear_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``nnx.Linear``: the kernel ``(in, out)`` sees the input rows ``(..., in)``."""
    x = _arg(args, kwargs, "inputs", "x")
    return Captured(rows_shape=tuple(x.shape[:-1]), linear={"kernel": x})


def nnx_linear_general_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``nnx.LinearGeneral``: the contracted ``axis`` flattened to one input axis (kernel ``(*in, *out)``)."""
    x = _arg(args, kwargs, "inputs", "x")
    if len(module.batch_axis):
        raise CaptureError(f"LinearGeneral with batch_axis={dict(module.batch_axis)} has one kernel per batch entry "
                           "and is not a single linear map; give it a custom rule")
    axis = [a % x.ndim for a in module.axis]
    rest = [a for a in range(x.ndim) if a not in axis]
    moved = jnp.transpose(x, rest + axis)
    rows_shape = tuple(moved.shape[: len(rest)])
    return Captured(rows_shape=rows_shape, linear={"kernel": moved.reshape(rows_shape + (-1,))})


def nnx_conv_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``nnx.Conv``: the kernel ``(*window, in, out)`` is a linear map on unfolded patches."""
    x = _arg(args, kwargs, "inputs", "x")
    if module.feature_group_count != 1:
        raise CaptureError(f"grouped convolution (feature_group_count={module.feature_group_count}) is a different "
                           "linear map per group; give it a custom rule")
    patches = conv_patches(module, x)
    return Captured(rows_shape=tuple(patches.shape[:-1]), linear={"kernel": patches})


def nnx_layer_norm_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``nnx.LayerNorm``: the scale sees ``x̂`` over the module's reduction axes."""
    x = _arg(args, kwargs, "x")
    xhat = _normalized(x, _axes(x.ndim, module.reduction_axes), module.epsilon, use_mean=True,
                       use_fast_variance=module.use_fast_variance, mask=kwargs.get("mask"))
    return _norm_scale(module.scale is not None, "scale", xhat, _axes(x.ndim, module.feature_axes))


def nnx_rms_norm_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``nnx.RMSNorm``: the scale sees ``x / sqrt(mean(x²) + ε)``."""
    x = _arg(args, kwargs, "x")
    xhat = _normalized(x, _axes(x.ndim, module.reduction_axes), module.epsilon, use_mean=False,
                       use_fast_variance=module.use_fast_variance, mask=kwargs.get("mask"))
    return _norm_scale(module.scale is not None, "scale", xhat, _axes(x.ndim, module.feature_axes))


def nnx_batch_norm_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``nnx.BatchNorm`` in inference mode: ``x̂ = (x − running mean) / sqrt(running var + ε)``."""
    x = _arg(args, kwargs, "x")
    flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    use_running = module.use_running_average if flag is None else flag
    if not use_running:
        raise CaptureError("BatchNorm must run in inference mode (use_running_average=True) to capture statistics")
    feature_axes = _axes(x.ndim, module.axis)
    shape = [x.shape[a] if a in feature_axes else 1 for a in range(x.ndim)]
    mean = jnp.reshape(module.mean[...], shape)
    var = jnp.reshape(module.var[...], shape)
    xhat = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + module.epsilon)
    return _norm_scale(module.scale is not None, "scale", xhat, feature_axes)


def nnx_embed_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``nnx.Embed``: a lookup table (task arithmetic), so only the row count of its ids."""
    ids = _arg(args, kwargs, "inputs", "x")
    return Captured(rows_shape=tuple(ids.shape))


def _nnx_rules() -> dict[type, Rule]:
    from flax import nnx

    return {nnx.Linear: nnx_linear_rule, nnx.LinearGeneral: nnx_linear_general_rule, nnx.Conv: nnx_conv_rule,
            nnx.LayerNorm: nnx_layer_norm_rule, nnx.RMSNorm: nnx_rms_norm_rule, nnx.BatchNorm: nnx_batch_norm_rule,
            nnx.Embed: nnx_embed_rule}


def eqx_linear_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``eqx.nn.Linear``: the weight ``(out, in)`` sees the input vector ``(in,)`` (one row per call)."""
    x = _arg(args, kwargs, "x")
    if module.in_features == "scalar":
        x = x[..., None]
    return Captured(rows_shape=tuple(x.shape[:-1]), linear={"weight": x})


def eqx_conv_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``eqx.nn.Conv*``: the weight ``(out, in, *window)`` is a linear map on the unfolded patches of the
    channel-first input ``(in, *spatial)``; patch features are ordered channel-major like
    ``weight.reshape(out, -1)``. Rows are the output positions."""
    x = _arg(args, kwargs, "x")
    if module.groups != 1:
        raise CaptureError(f"grouped convolution (groups={module.groups}) is a different linear map per group; "
                           "give it a custom rule")
    padding = tuple(tuple(p) for p in module.padding)
    if module.padding_mode != "ZEROS":
        mode = {"REFLECT": "reflect", "REPLICATE": "edge", "CIRCULAR": "wrap"}[module.padding_mode]
        x = jnp.pad(x, ((0, 0),) + padding, mode=mode)
        padding = ((0, 0),) * module.num_spatial_dims
    n = module.num_spatial_dims
    spatial = "".join("HWDXYZ"[i] for i in range(n))
    patches = jax.lax.conv_general_dilated_patches(
        x[None], tuple(module.kernel_size), tuple(module.stride), padding, rhs_dilation=tuple(module.dilation),
        dimension_numbers=("NC" + spatial, "OI" + spatial, "NC" + spatial), precision=_HIGHEST)[0]
    rows = jnp.moveaxis(patches, 0, -1)
    return Captured(rows_shape=tuple(rows.shape[:-1]), linear={"weight": rows})


def eqx_layer_norm_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``eqx.nn.LayerNorm``: the weight sees ``x̂ = (x − mean) / sqrt(var + ε)`` over the whole ``shape``."""
    x = _arg(args, kwargs, "x")
    xhat = _normalized(x, tuple(range(x.ndim)), module.eps, use_mean=True, use_fast_variance=False)
    return Captured(rows_shape=(), scale={"weight": xhat} if module.weight is not None else {})


def eqx_rms_norm_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``eqx.nn.RMSNorm``: the weight sees ``x / sqrt(mean(x²) + ε)`` over the whole ``shape``."""
    x = _arg(args, kwargs, "x")
    xhat = _normalized(x, tuple(range(x.ndim)), module.eps, use_mean=False, use_fast_variance=False)
    return Captured(rows_shape=(), scale={"weight": xhat} if module.weight is not None else {})


def eqx_embedding_rule(module: Any, args: tuple, kwargs: dict) -> Captured:
    """``eqx.nn.Embedding``: a lookup table, so only the row count of its ids."""
    ids = _arg(args, kwargs, "x")
    return Captured(rows_shape=tuple(jnp.shape(ids)))


def _eqx_rules() -> dict[type, Rule]:
    import equinox as eqx

    return {eqx.nn.Linear: eqx_linear_rule, eqx.nn.Conv: eqx_conv_rule, eqx.nn.LayerNorm: eqx_layer_norm_rule,
            eqx.nn.RMSNorm: eqx_rms_norm_rule, eqx.nn.Embedding: eqx_embedding_rule}


# ---------------------------------------------------------------------------------------------------------------
# Emission. A rule runs wherever the module runs — possibly in the inner trace of a lifted transform (nn.scan,
# nn.remat, nn.vmap, their nnx versions, a user's jax.lax.scan over equinox layers). Its per-call sums (count,
# Gram or rows, Σx̂²) are therefore computed in that trace and handed to the host by a jax.debug.callback, which
# every transform keeps. Which layer of a stacked leaf a call belongs to is not inferred from call order: every
# captured module carries its layer index as data (a float array shaped like its stack axes, stored beside its
# parameters), so a scan slices it like the weights and the callback receives the right index.
#
# Under jax.vmap a debug callback would be unrolled once per mapped element (an equinox Linear is vmapped over
# tokens: thousands of callbacks). _emit is a custom_vmap function instead: its vmap rule keeps the mapped axis as
# a leading "batch" axis and re-binds itself, so the body runs once, outside every vmap, on arrays with all the
# batch axes, and folds into rows every axis along which the layer index is not mapped.


_LAYER = "__catmerge_layer__"

_SINKS: dict[int, "_Sink"] = {}
_SINK_IDS = iter(range(1, 2 ** 31 - 1))


class _Sink:
    """Host-side sums of one forward pass: ``{(path, kind, name): {layer: value}}``."""

    def __init__(self):
        self.count: dict[str, dict[int, float]] = {}
        self.gram: dict[tuple, dict[int, np.ndarray]] = {}
        self.rows: dict[tuple, dict[int, list]] = {}
        self.scale: dict[tuple, dict[int, np.ndarray]] = {}

    def add(self, meta: tuple, idx: np.ndarray, count: np.ndarray, payload: Sequence[np.ndarray]) -> None:
        path, linear_forms, scale_names = meta
        layers = np.rint(np.asarray(idx, np.float64)).astype(np.int64).reshape(-1)
        count = np.asarray(count, np.float64).reshape(-1)
        by_layer = self.count.setdefault(path, {})
        for e, layer in enumerate(layers):
            by_layer[int(layer)] = by_layer.get(int(layer), 0.0) + count[e]
        it = iter(payload)
        for name, use_rows in linear_forms:
            if use_rows:
                rows, w = np.asarray(next(it), np.float32), np.asarray(next(it))
                rows = rows.reshape(len(layers), -1, rows.shape[-1])
                w = w.reshape(len(layers), -1)
                dest = self.rows.setdefault((path, name), {})
                for e, layer in enumerate(layers):
                    dest.setdefault(int(layer), []).append(rows[e][w[e] > 0])
            else:
                g = np.asarray(next(it), np.float64)
                g = g.reshape((len(layers),) + g.shape[-2:])
                dest = self.gram.setdefault((path, name), {})
                for e, layer in enumerate(layers):
                    dest[int(layer)] = dest.get(int(layer), 0.0) + g[e]
        for name in scale_names:
            sq = np.asarray(next(it), np.float64)
            sq = sq.reshape((len(layers),) + sq.shape[np.ndim(idx):])
            dest = self.scale.setdefault((path, name), {})
            for e, layer in enumerate(layers):
                dest[int(layer)] = dest.get(int(layer), 0.0) + sq[e]


def _host_add(meta, sink_id, idx, count, *payload):
    _SINKS[int(np.asarray(sink_id).reshape(-1)[0])].add(meta, np.asarray(idx), np.asarray(count), payload)


def _emit_body(meta_static, bflags, sink, mask, idx, probe, *arrays):
    """Runs outside every vmap. ``probe`` has shape ``(*batch, *rows_shape)``; ``bflags[i]`` says whether the layer
    index is mapped along batch axis ``i`` (those axes stay separate, the others fold into rows)."""
    path, linear_names, scale_names, form = meta_static
    full = tuple(probe.shape)
    nb = len(bflags)
    keep = [i for i in range(nb) if bflags[i]]
    fold = [i for i in range(len(full)) if i not in keep]
    e_shape = tuple(full[i] for i in keep)
    n = int(np.prod([full[i] for i in fold], dtype=np.int64))
    # the mask applies to each layer's rows: the row axes with the layer-index axes (an ensemble's) left out
    rows_full = tuple(full[i] for i in fold)
    if mask is not None and rows_full[: mask.ndim] == tuple(mask.shape):
        w = jnp.broadcast_to(mask.astype(jnp.float32).reshape(mask.shape + (1,) * (len(rows_full) - mask.ndim)),
                             rows_full)
    else:
        w = jnp.ones(rows_full, jnp.float32)
    perm = keep + fold
    w = jnp.broadcast_to(w.reshape(-1), e_shape + (n,))
    layer = jnp.transpose(idx, keep + [i for i in range(nb) if i not in keep]).reshape(e_shape + (-1,))[..., 0]
    payload = []
    forms = []
    it = iter(arrays)
    for name in linear_names:
        x = next(it)
        x = jnp.transpose(x, perm + [len(full)]).reshape(e_shape + (n, x.shape[-1])).astype(jnp.float32)
        use_rows = form == "rows" or (form == "auto" and n < x.shape[-1])
        forms.append((name, use_rows))
        if use_rows:
            payload += [x, w]
        else:
            payload.append(jnp.einsum("...ni,...nj->...ij", x * w[..., None], x, precision=_HIGHEST))
    for name in scale_names:
        x = next(it)
        feat = x.ndim - len(full)
        x = jnp.transpose(x, perm + list(range(len(full), x.ndim))).reshape(e_shape + (n,) + x.shape[len(full):])
        x = x.astype(jnp.float32)
        wx = w.reshape(w.shape + (1,) * feat)
        payload.append(jnp.sum(wx * x * x, axis=len(e_shape)))
    meta = (path, tuple(forms), tuple(scale_names))
    jax.debug.callback(functools.partial(_host_add, meta), sink, layer, jnp.sum(w, axis=-1), *payload)
    return jnp.zeros((), jnp.float32)


@functools.lru_cache(maxsize=None)
def _emit_fn(meta_static: tuple, bflags: tuple) -> Callable:
    from jax.custom_batching import custom_vmap

    has_mask = meta_static[-1]
    meta_static = meta_static[:-1]

    @custom_vmap
    def emit(sink, mask, idx, probe, *arrays):
        return _emit_body(meta_static, bflags, sink, mask if has_mask else None, idx, probe, *arrays)

    @emit.def_vmap
    def emit_vmap(axis_size, in_batched, sink, mask, idx, probe, *arrays):
        sink_b, mask_b, idx_b, *rest_b = in_batched
        sink = sink[0] if sink_b else sink
        mask = mask[0] if mask_b else mask
        idx = idx if idx_b else jnp.broadcast_to(idx, (axis_size,) + idx.shape)
        probe, *arrays = [x if b else jnp.broadcast_to(x, (axis_size,) + x.shape)
                          for x, b in zip([probe, *arrays], rest_b)]
        _emit_fn(meta_static + (has_mask,), (bool(idx_b),) + bflags)(sink, mask, idx, probe, *arrays)
        return jnp.zeros((axis_size,), jnp.float32), True

    return emit


class _Trace:
    """The state of one capture trace: ``phase`` is ``"shapes"`` (record every captured module's parameter shapes
    inside its transforms, to learn the stack axes) or ``"emit"`` (hand the sums to sink ``sink``)."""

    def __init__(self, phase: str, rules: Mapping[type, Rule | None], form: str, sink: Any = None,
                 mask: Any = None, out_first: bool = False, stacks: Mapping[str, tuple] | None = None):
        self.phase, self.rules, self.form, self.sink, self.mask = phase, rules, form, sink, mask
        self.out_first = out_first
        self.shapes: dict[str, dict[str, tuple]] = {}
        self.stacks = dict(stacks or {})  # modules that carry no layer index of their own (bridged linen)
        self.prefix = [""]  # path of the nnx.bridge.ToNNX module a linen module runs in


_ACTIVE: list[_Trace] = []  # the capture being traced (a stack: nested captures are independent)


def _check_width(path: str, name: str, x: jax.Array, kernel_shape: tuple, expected: int | None,
                 out_first: bool) -> None:
    """An input whose width no split of the kernel's axes gives is a wrong exemplar width: say so, naming the
    layer, before the layer itself fails with a shape error."""
    width = int(x.shape[-1])
    axes = tuple(kernel_shape)[::-1] if out_first else tuple(kernel_shape)
    valid = {int(np.prod(axes[:k], dtype=np.int64)) for k in range(1, len(axes))}
    # an einsum kernel may contract any of its axes (``(heads, d_model, head_dim)`` contracts the middle one)
    valid |= {int(np.prod([axes[i] for i in range(len(axes)) if m >> i & 1], dtype=np.int64))
              for m in range(1, 2 ** len(axes) - 1)} if len(axes) <= 8 else set()
    if width not in valid:
        exp = expected if expected is not None else min(valid, default=0)
        raise CaptureError(f"layer '{path or '<root>'}': expects inputs of width {exp} ('{name}' of shape {tuple(kernel_shape)}), "
                           f"got width {width}; check the exemplars' feature dimension")


def _tap(module: Any, path: str, rule: Rule, args: tuple, kwargs: dict, params: Mapping[str, Any],
         layer: Any, specs: Mapping[str, Any] | None = None) -> None:
    """Called just before a captured module runs (in whatever trace it runs in)."""
    trace = _ACTIVE[-1]
    captured = rule(module, args, kwargs)
    if captured is None:
        return
    rows_shape = tuple(captured.rows_shape)
    for name, x in captured.linear.items():
        if tuple(x.shape[: len(rows_shape)]) != rows_shape or x.ndim != len(rows_shape) + 1:
            raise CaptureError(f"module '{path}': linear input for '{name}' has shape {x.shape}, expected rows "
                               f"{rows_shape} + (in,)")
        if name in params:
            spec = (specs or {}).get(name)
            shape = tuple(np.shape(params[name]))
            expected = spec.matrix_shape(shape)[0] if spec is not None else None
            _check_width(path, name, x, shape, expected, trace.out_first)
    for name, xhat in captured.scale.items():
        if tuple(xhat.shape[: len(rows_shape)]) != rows_shape:
            raise CaptureError(f"module '{path}': normalized input for '{name}' has shape {xhat.shape}, expected "
                               f"leading rows {rows_shape}")
    if trace.phase == "shapes":
        trace.shapes[path] = {name: tuple(np.shape(v)) for name, v in params.items()}
        return
    if layer is None:
        stack = trace.stacks.get(path)
        if stack is None:  # a module that has no parameters of its own has nothing to fill
            return
        if stack != ():
            raise CaptureError(f"module '{path}': its parameters are stacked {stack} but no layer index reaches it "
                               "(a linen module inside nnx.bridge inside a lifted transform); capture the model "
                               "unstacked")
        layer = 0.0
    linear_names, scale_names = tuple(captured.linear), tuple(captured.scale)
    meta = (path, linear_names, scale_names, trace.form, trace.mask is not None)
    # The probe's shape is the rows' shape; tying it to the call's input makes it mapped wherever the input is,
    # so count-only layers (an equinox Embedding vmapped over tokens) count every mapped row. Its value is unused.
    first = next((a for a in jax.tree.leaves((args, kwargs)) if isinstance(a, (jax.Array, np.ndarray))), None)
    anchor = jnp.zeros((), jnp.float32) if first is None else jnp.sum(jnp.ravel(first)[:1]).astype(jnp.float32) * 0
    probe = jnp.zeros(rows_shape, jnp.float32) + anchor
    mask = trace.mask if trace.mask is not None else jnp.zeros((), bool)
    _emit_fn(meta, ())(trace.sink, mask, jnp.asarray(layer, jnp.float32), probe,
                       *captured.linear.values(), *captured.scale.values())


# ---------------------------------------------------------------------------------------------------------------
# linen


def _linen_interceptor(next_fun, args, kwargs, context):
    trace = _ACTIVE[-1]
    module = context.module
    if context.method_name == "__call__" and not module.is_initializing():
        rule = _rule_for(type(module), trace.rules)
        if rule is not None:
            variables = module.variables.get("params", {})
            params = {k: v for k, v in variables.items() if k != _LAYER and not isinstance(v, Mapping)}
            path = "/".join(p for p in (trace.prefix[-1], "/".join(module.path)) if p)
            specs = {k: default_spec(f"{path}/{k}" if path else k, v) for k, v in params.items()}
            _tap(module, path, rule, args, kwargs, params, variables.get(_LAYER), specs)
    return next_fun(*args, **kwargs)


def _run_linen(params, extra_variables, inputs, token_mask, sink, *, model, rules, kwargs, form, phase="emit"):
    trace = _Trace(phase, dict(rules), form, sink, token_mask)
    apply_fn = model.apply if isinstance(model, nn.Module) else model
    _ACTIVE.append(trace)
    try:
        with nn.intercept_methods(_linen_interceptor):
            apply_fn({**extra_variables, "params": params}, *inputs, **dict(kwargs))
    finally:
        _ACTIVE.pop()
    return trace.shapes if phase == "shapes" else None


# Static arguments are hashed, so equal models (linen modules are dataclasses) share one compiled function per
# input shape across calls and tasks.
_run_linen_jit = jax.jit(_run_linen, static_argnames=("model", "rules", "kwargs", "form", "phase"))


def _with_layer_index(params: PyTree, stacks: Mapping[str, tuple]) -> PyTree:
    """A copy of a linen params dict with a layer-index leaf beside the parameters of every captured module."""

    def copy(node):
        return {k: copy(v) for k, v in node.items()} if isinstance(node, Mapping) else node

    out = copy(params)
    for path, stack in stacks.items():
        node = out
        for name in path.split("/") if path else []:
            node = node[name]
        node[_LAYER] = np.arange(int(np.prod(stack, dtype=np.int64)), dtype=np.float32).reshape(stack)
    return out


class Capture(NamedTuple):
    """The capture of one linen model, as a value: the model (a linen ``Module`` or an apply function), the rule
    table and the keyword arguments of every call. Build with :func:`make_capture`; pass it to
    :func:`capture_stats` in place of the model.
    """

    model: Any
    rules: tuple
    kwargs: tuple

    def _call(self, phase, params, extra_variables, inputs, token_mask, sink, form):
        static = dict(model=self.model, rules=self.rules, kwargs=self.kwargs, form=form, phase=phase)
        if phase == "shapes":
            out = {}

            def shapes(*a):
                out.update(_run_linen(*a, **static))
                return 0

            jax.eval_shape(shapes, params, extra_variables, inputs, token_mask, sink)
            return out
        try:
            hash((self.model, self.rules, self.kwargs))
        except TypeError:  # unhashable keyword arguments: compile for this call only
            return jax.jit(functools.partial(_run_linen, **static))(params, extra_variables, inputs, token_mask, sink)
        return _run_linen_jit(params, extra_variables, inputs, token_mask, sink, **static)

    def stack_shapes(self, params, extra_variables, inputs, token_mask, form):
        # Remembered per (capture, argument shapes): every task of a merge has the same ones, and each trace of the
        # model costs as much as a small model's forward pass itself.
        try:
            key = (self, form, jax.tree.structure((params, extra_variables, inputs, token_mask)),
                   tuple((np.shape(x), str(getattr(x, "dtype", type(x))))
                         for x in jax.tree.leaves((params, extra_variables, inputs, token_mask))))
            hash(key)
        except TypeError:
            return self._call("shapes", params, extra_variables, inputs, token_mask, np.int32(0), form)
        if key not in _STACK_SHAPES:
            _STACK_SHAPES[key] = self._call("shapes", params, extra_variables, inputs, token_mask, np.int32(0), form)
        return _STACK_SHAPES[key]

    def run(self, params, extra_variables, inputs, token_mask, form, stacks, sink):
        self._call("emit", _with_layer_index(params, stacks), extra_variables, inputs, token_mask, sink, form)


_STACK_SHAPES: dict = {}


def make_capture(apply_fn_or_module: Any, *, rules: Mapping[type, Rule | None] | None = None,
                 **kwargs: Any) -> Capture:
    """The capture of one linen model.

    Args:
      apply_fn_or_module: a linen ``Module`` or a function with ``Module.apply``'s signature,
        ``apply_fn({"params": params, **extra_variables}, *inputs, **kwargs)``.
      rules: extra or replacement capture rules, merged over :data:`DEFAULT_RULES` (``None`` values disable a type).
      **kwargs: passed unchanged to every call of the model (e.g. ``method=...``, ``train=False``).
    """
    if not (isinstance(apply_fn_or_module, nn.Module) or callable(apply_fn_or_module)):
        raise TypeError(f"expected a flax.linen Module, its apply function or a Capture, got "
                        f"{type(apply_fn_or_module)}")
    table = dict(DEFAULT_RULES)
    table.update(rules or {})
    return Capture(model=apply_fn_or_module, rules=tuple(table.items()), kwargs=tuple(sorted(kwargs.items())))


# ---------------------------------------------------------------------------------------------------------------
# nnx: the module is split outside and merged inside the traced function; the merged copies of the captured
# modules are tagged with their path (a static attribute, which nnx transforms carry through split/merge) and a
# layer-index Param (which nnx.scan / nnx.vmap slice with the other params), and the __call__ of their classes is
# wrapped while the function is traced (restored in ``finally``).


def _nnx_layer_type():
    from flax import nnx

    global _NNX_LAYER_INDEX
    if _NNX_LAYER_INDEX is None:
        class _LayerIndex(nnx.Param):
            """The layer index of a captured module (a Param, so that filters on Param slice it with the weights)."""

        _NNX_LAYER_INDEX = _LayerIndex
    return _NNX_LAYER_INDEX


_NNX_LAYER_INDEX = None
_TAG = "_catmerge_path"
_TAG_LAYER = "_catmerge_layer"


def _nnx_params(module: Any) -> dict[str, Any]:
    from flax import nnx

    layer_type = _nnx_layer_type()
    return {k: v[...] for k, v in vars(module).items()
            if isinstance(v, nnx.Param) and not isinstance(v, layer_type)}


def _patched_call(original: Callable) -> Callable:
    active: set[int] = set()

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        path = getattr(self, _TAG, None)
        if path is None or id(self) in active or not _ACTIVE:
            return original(self, *args, **kwargs)
        active.add(id(self))
        try:
            from catmerge_jax.modules import _nnx_specs

            layer = getattr(self, _TAG_LAYER, None)
            rule = _rule_for(type(self), _ACTIVE[-1].rules)
            _tap(self, path, rule, args, kwargs, _nnx_params(self), None if layer is None else layer[...],
                 _nnx_specs(self))
            return original(self, *args, **kwargs)
        finally:
            active.discard(id(self))

    return __call__


def _bridged_call(original: Callable) -> Callable:
    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        trace = _ACTIVE[-1] if _ACTIVE else None
        path = getattr(trace, "bridges", {}).get(id(self))
        if path is None:
            return original(self, *args, **kwargs)
        trace.prefix.append(path)
        try:
            return original(self, *args, **kwargs)
        finally:
            trace.prefix.pop()

    return __call__


def _run_nnx(graphdef, params, rest, inputs, token_mask, sink, *, stacks, rules, kwargs, form, phase="emit"):
    from flax import nnx
    from flax.nnx import bridge

    table = dict(rules)
    stacks = dict(stacks)
    module = nnx.merge(graphdef, params, rest)
    classes = {}
    bridges: dict[int, str] = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module) and _rule_for(type(node), table) is not None:
            p = "/".join(str(k) for k in path)
            setattr(node, _TAG, p)
            if phase == "emit" and p in stacks:
                stack = stacks[p]
                setattr(node, _TAG_LAYER, _nnx_layer_type()(
                    jnp.arange(int(np.prod(stack, dtype=np.int64)), dtype=jnp.float32).reshape(stack)))
            owner = next(c for c in type(node).__mro__ if "__call__" in c.__dict__)
            classes[owner] = _patched_call(owner.__dict__["__call__"])
        elif isinstance(node, bridge.ToNNX):  # it turns attributes into linen variables: no tag, a side table
            bridges[id(node)] = "/".join(str(k) for k in path)
            classes[bridge.ToNNX] = _bridged_call(bridge.ToNNX.__dict__["__call__"])
    trace = _Trace(phase, table, form, sink, token_mask, stacks=stacks)
    trace.bridges = bridges
    originals = {owner: owner.__dict__["__call__"] for owner in classes}
    _ACTIVE.append(trace)
    try:
        for owner, patched in classes.items():
            owner.__call__ = patched
        # linen modules inside nnx.bridge.ToNNX are seen by the linen interceptor, under the bridge's path
        with nn.intercept_methods(_linen_interceptor):
            module(*inputs, **dict(kwargs))
    finally:
        for owner, original in originals.items():
            owner.__call__ = original
        _ACTIVE.pop()
    return trace.shapes if phase == "shapes" else None


_run_nnx_jit = jax.jit(_run_nnx, static_argnames=("graphdef", "stacks", "rules", "kwargs", "form", "phase"))


class _NnxCapture(NamedTuple):
    graphdef: Any
    rest: Any
    rules: tuple
    kwargs: tuple

    def stack_shapes(self, params, extra_variables, inputs, token_mask, form):
        out = {}

        def shapes(params, rest, inputs, token_mask):
            out.update(_run_nnx(self.graphdef, params, rest, inputs, token_mask, None, stacks=(), rules=self.rules,
                                kwargs=self.kwargs, form=form, phase="shapes"))
            return 0

        jax.eval_shape(shapes, params, self.rest, inputs, token_mask)
        return out

    def run(self, params, extra_variables, inputs, token_mask, form, stacks, sink):
        static = dict(graphdef=self.graphdef, stacks=tuple(sorted((p, tuple(s)) for p, s in stacks.items())),
                      rules=self.rules, kwargs=self.kwargs, form=form)
        try:
            hash(self.kwargs)
        except TypeError:  # unhashable keyword arguments: compile for this call only
            jax.jit(lambda *a: _run_nnx(static["graphdef"], *a, **{k: v for k, v in static.items() if k != "graphdef"}))(
                params, self.rest, inputs, token_mask, sink)
            return
        _run_nnx_jit(self.graphdef, params, self.rest, inputs, token_mask, sink,
                     **{k: v for k, v in static.items() if k != "graphdef"})


# ---------------------------------------------------------------------------------------------------------------
# equinox: every captured submodule is replaced (eqx.tree_at-style, by a tree map) with a recording wrapper that
# holds the module, its path (static) and its layer index (a float array: eqx.partition(..., eqx.is_array) or
# is_inexact_array puts it with the weights, so a user's scan over stacked layers slices it too).


@functools.lru_cache(maxsize=None)
def _eqx_tap_type():
    import equinox as eqx

    class _Tap(eqx.Module):
        inner: Any
        layer: Any
        path: str = eqx.field(static=True)

        def __call__(self, *args, **kwargs):
            from catmerge_jax.modules import _eqx_specs

            rule = _rule_for(type(self.inner), _ACTIVE[-1].rules) if _ACTIVE else None
            if rule is not None:
                params = {f.name: getattr(self.inner, f.name) for f in dataclasses.fields(self.inner)
                          if eqx.is_inexact_array(getattr(self.inner, f.name, None))}
                _tap(self.inner, self.path, rule, args, kwargs, params, self.layer, _eqx_specs(self.inner))
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            # tied weights and helper methods (``self.embed.weight``) read through the wrapper
            if name in ("inner", "layer", "path") or name.startswith("__"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    return _Tap


def _eqx_wrap(model: Any, rules: Mapping[type, Rule | None], stacks: Mapping[str, tuple] | None) -> Any:
    import equinox as eqx

    from catmerge_jax.tree import path_str

    tap = _eqx_tap_type()

    def wrap(prefix: str, node: Any) -> Any:
        def visit(kp, child):
            if isinstance(child, eqx.Module):
                return wrap(f"{prefix}/{path_str(kp)}" if prefix else path_str(kp), child)
            return child

        inner = jax.tree_util.tree_map_with_path(
            visit, node, is_leaf=lambda x: x is not node and isinstance(x, eqx.Module))
        if _rule_for(type(node), rules) is None:
            return inner
        if stacks is None:  # the shapes phase: no index yet (a scalar would not scan with stacked weights)
            layer = None
        else:
            stack = tuple(stacks.get(prefix, ()))
            layer = jnp.arange(int(np.prod(stack, dtype=np.int64)), dtype=jnp.float32).reshape(stack)
        return tap(inner=inner, layer=layer, path=prefix)

    return wrap("", model)


def _run_eqx(dynamic, static, inputs, token_mask, sink, *, rules, kwargs, form, phase="emit"):
    import equinox as eqx

    model = eqx.combine(dynamic, static)
    trace = _Trace(phase, dict(rules), form, sink, token_mask, out_first=True)
    _ACTIVE.append(trace)
    try:
        jax.vmap(lambda *xs: model(*xs, **dict(kwargs)))(*inputs)
    finally:
        _ACTIVE.pop()
    return trace.shapes if phase == "shapes" else None


_run_eqx_jit = jax.jit(_run_eqx, static_argnames=("static", "rules", "kwargs", "form", "phase"))


class _EqxCapture(NamedTuple):
    model: Any
    rules: tuple
    kwargs: tuple

    def _wrapped(self, params, stacks):
        import equinox as eqx

        model = eqx.combine(params, eqx.filter(self.model, eqx.is_inexact_array, inverse=True))
        return eqx.partition(_eqx_wrap(model, dict(self.rules), stacks), eqx.is_array)

    def stack_shapes(self, params, extra_variables, inputs, token_mask, form):
        dynamic, static = self._wrapped(params, None)
        out = {}

        def shapes(dynamic, inputs, token_mask):
            out.update(_run_eqx(dynamic, static, inputs, token_mask, None, rules=self.rules, kwargs=self.kwargs,
                                form=form, phase="shapes"))
            return 0

        jax.eval_shape(shapes, dynamic, inputs, token_mask)
        return out

    def run(self, params, extra_variables, inputs, token_mask, form, stacks, sink):
        dynamic, static = self._wrapped(params, stacks)
        try:
            hash((static, self.kwargs))
        except TypeError:
            jax.jit(lambda d, i, m, k: _run_eqx(d, static, i, m, k, rules=self.rules, kwargs=self.kwargs,
                                                form=form))(dynamic, inputs, token_mask, sink)
            return
        _run_eqx_jit(dynamic, static, inputs, token_mask, sink, rules=self.rules, kwargs=self.kwargs, form=form)


# ---------------------------------------------------------------------------------------------------------------
# Host side: one forward pass's sink → a stats tree mirroring the params.


def _split(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _stack_axes(shapes: Mapping[str, Mapping[str, tuple]], leaves: Mapping[str, Any]) -> dict[str, tuple]:
    """``{module path: stack shape}``: the leading axes a module's outer parameters have beyond what it sees."""
    stacks = {}
    for path, inner in shapes.items():
        stack = None
        for name, shape in inner.items():
            leaf_path = f"{path}/{name}" if path else name
            if leaf_path not in leaves:
                raise CaptureError(f"the model has a module at '{path}' with parameter '{name}' but params has no "
                                   f"leaf '{leaf_path}'; pass the params tree this model uses")
            outer = tuple(np.shape(leaves[leaf_path]))
            k = len(outer) - len(shape)
            if k < 0 or outer[k:] != tuple(shape):
                raise CaptureError(f"leaf '{leaf_path}' has shape {outer} but its layer uses it as {tuple(shape)}")
            if stack is not None and outer[:k] != stack:
                raise CaptureError(f"module '{path}': its parameters are stacked inconsistently ({stack} vs "
                                   f"{outer[:k]} for '{name}')")
            stack = outer[:k]
        if stack is not None:  # a module without parameters of its own has nothing to fill
            stacks[path] = stack
    return stacks


def _per_layer(values: Mapping[int, Any], stack: tuple, make: Callable[[Any], np.ndarray]) -> np.ndarray:
    count = int(np.prod(stack, dtype=np.int64))
    bad = [l for l in values if not 0 <= l < count]
    if bad:
        raise CaptureError(f"a captured call reported layer {bad[0]} of a stack of {count}")
    arrays = [make(values.get(l)) for l in range(count)]
    out = np.stack(arrays) if arrays else np.zeros((0,))
    return out.reshape(tuple(stack) + out.shape[1:])


def _sink_to_stats(sink: _Sink, params: PyTree, stacks: Mapping[str, tuple], form: str) -> PyTree:
    leaves = dict(leaves_with_paths(params))
    children: dict[str, list[str]] = {}
    for leaf_path in leaves:
        parent, _, name = leaf_path.rpartition("/")
        children.setdefault(parent, []).append(leaf_path)
    by_path: dict[str, LeafStats] = {}

    def as_count(stack, values):
        c = _per_layer(values, stack, lambda v: np.float32(0.0 if v is None else v))
        return np.float32(c) if c.ndim == 0 else c.astype(np.float32)

    for path, counts in sink.count.items():
        stack = stacks.get(path, ())
        count = as_count(stack, counts)
        for leaf_path in children.get(path, []):
            if leaf_path.rpartition("/")[2] != _LAYER:
                by_path[leaf_path] = LeafStats(count=count)
    for (path, name), grams in sink.gram.items():
        _merge_linear(by_path, path, name, stacks.get(path, ()), grams, sink.rows.get((path, name), {}), form)
    for (path, name), rows in sink.rows.items():
        if (path, name) not in sink.gram:
            _merge_linear(by_path, path, name, stacks.get(path, ()), {}, rows, form)
    for (path, name), sq in sink.scale.items():
        stack = stacks.get(path, ())
        feat = np.shape(next(iter(sq.values())))
        leaf = f"{path}/{name}" if path else name
        by_path[leaf] = dataclasses.replace(
            by_path[leaf], sq_sum=_per_layer(sq, stack, lambda v: np.zeros(feat) if v is None else v
                                            ).astype(np.float32))
    try:
        return stats_from_arrays(params, by_path)
    except KeyError as e:
        raise CaptureError(f"captured {e.args[0]}; check that params belongs to this model") from None


def _merge_linear(by_path, path, name, stack, grams, rows, form):
    leaf = f"{path}/{name}" if path else name
    width = (np.shape(next(iter(grams.values())))[-1] if grams else
             next(r.shape[-1] for parts in rows.values() for r in parts))
    stacked_rows = {l: np.concatenate(parts, axis=0) for l, parts in rows.items()}
    most = max((r.shape[0] for r in stacked_rows.values()), default=0)
    if grams or form == "gram" or (form == "auto" and most >= width):
        def gram(l):
            g = np.zeros((width, width))
            if grams.get(l) is not None:
                g = g + grams[l]
            if l in stacked_rows:
                r = stacked_rows[l].astype(np.float64)
                g = g + r.T @ r
            return g

        layers = range(int(np.prod(stack, dtype=np.int64)))
        value = _per_layer({l: gram(l) for l in layers}, stack, lambda v: v).astype(np.float32)
        by_path[leaf] = dataclasses.replace(by_path[leaf], gram=value)
        return

    def padded(r):
        r = np.zeros((0, width), np.float32) if r is None else r
        return np.concatenate([r, np.zeros((most - r.shape[0], width), np.float32)], axis=0)

    by_path[leaf] = dataclasses.replace(by_path[leaf], rows=_per_layer(stacked_rows, stack, padded).astype(np.float32))


def _check_against_roles(params: PyTree, stats: PyTree, roles: Overrides) -> None:
    """Every LINEAR leaf with captured inputs must have as many input features as its matrix view has rows."""
    from catmerge_jax.modules import stacked_spec

    specs = dict(leaves_with_paths(classify(params, roles), is_leaf=is_spec))
    leaves = dict(leaves_with_paths(params))
    for path, s in leaves_with_paths(stats, is_leaf=lambda x: isinstance(x, LeafStats)):
        leaf = leaves[path]
        spec = stacked_spec(specs[path], s, np.shape(leaf))
        if spec.role is not Role.LINEAR or not s.has_linear:
            continue
        seen = (s.gram if s.gram is not None else s.rows).shape[-1]
        expected = spec.matrix_shape(np.shape(leaf))[0]
        if seen != expected:
            raise CaptureError(f"leaf '{path}' of shape {np.shape(leaf)} is read as a {spec.matrix_shape(np.shape(leaf))} "
                               f"matrix (in_axes={spec.in_axes}) but its layer receives {seen} input features; "
                               "fix its role with roles={path: LeafSpec(Role.LINEAR, in_axes=...)}")


def linen_declared_specs(model: Any, params: PyTree) -> dict[str, LeafSpec]:
    """The specs a linen model declares for the leaves of ``params``: its ``param_roles()`` (paths or patterns;
    e.g. open_clip's fused ``in_proj``), resolved leaf by leaf. ``model`` may be a ``Module``, its bound ``apply``
    or a :class:`Capture`; a model without ``param_roles`` declares nothing (``{}``)."""
    module = model.model if isinstance(model, Capture) else model
    if not isinstance(module, nn.Module):
        module = getattr(module, "__self__", None)  # a bound Module.apply
    param_roles = getattr(module, "param_roles", None) if isinstance(module, nn.Module) else None
    return declared_specs(params, param_roles()) if callable(param_roles) else {}


def _capture_of(model: Any, params: PyTree, inputs: tuple, rules, kwargs) -> tuple[Any, PyTree, tuple, dict]:
    """``(capture value, params tree the stats mirror, model inputs, declared specs)`` for any kind of model; the
    specs come from the module types (nnx, equinox) or the linen model's ``param_roles()``."""
    from catmerge_jax.modules import is_eqx_module, is_nnx_module, split_params

    if isinstance(model, Capture):
        if rules or kwargs:
            raise CaptureError("rules and model keyword arguments belong to make_capture() when a Capture is given")
        return model, params, inputs, linen_declared_specs(model, params)
    if is_nnx_module(model) or is_eqx_module(model):
        from flax import nnx

        inputs = (params,) + tuple(inputs) if params is not None else tuple(inputs)
        table = {**DEFAULT_RULES, **_nnx_rules()} if is_nnx_module(model) else _eqx_rules()
        table.update(rules or {})
        split = split_params(model)
        if is_nnx_module(model):
            graphdef, _, rest = nnx.split(model, nnx.Param, ...)
            cap = _NnxCapture(graphdef, rest, tuple(table.items()), tuple(sorted(kwargs.items())))
        else:
            cap = _EqxCapture(model, tuple(table.items()), tuple(sorted(kwargs.items())))
        return cap, split.params, inputs, split.roles or {}
    return make_capture(model, rules=rules, **kwargs), params, inputs, linen_declared_specs(model, params)


def capture_stats(apply_fn_or_module: Any, params: PyTree = None, *inputs: Any, token_mask: Any = None,
                  form: str = "auto", roles: Overrides = None, batch_size: int | None = 32,
                  extra_variables: Mapping[str, Any] | None = None, rules: Mapping[type, Rule | None] | None = None,
                  progress: bool = False, **kwargs: Any) -> PyTree:
    """Exemplar statistics of every layer of a linen, nnx or equinox model, as a stats tree mirroring its params.

    Three forms::

        capture_stats(linen_model, params, *inputs)   # stats mirror params
        capture_stats(nnx_module, *inputs)            # stats mirror nnx.state(module, nnx.Param)
        capture_stats(eqx_module, *inputs)            # stats mirror eqx.filter(module, eqx.is_inexact_array)

    An equinox module acts on one example, so it is mapped (``jax.vmap``) over the inputs' leading exemplar axis;
    linen and nnx models get the batch as is. Modules inside lifted transforms (``nn.scan``, ``nn.remat``,
    ``nn.vmap``, ``nnx.scan``, ``nnx.remat``, ``nnx.vmap``, a ``jax.lax.scan`` over stacked equinox layers) are
    captured too; a leaf that stacks ``L`` layers gets per-layer statistics (``count (L,)``, ``gram (L, in, in)``).

    Args:
      apply_fn_or_module: a linen ``Module``, a function with ``Module.apply``'s signature, a :class:`Capture`
        from :func:`make_capture` (then ``rules``/``kwargs`` were fixed when it was made), an ``nnx.Module`` or an
        ``equinox.Module``.
      params: linen: the ``"params"`` collection, e.g. ``W0 + T_k`` for task k. nnx/equinox: the first input
        (the module carries its own parameters).
      *inputs: model inputs, each with a leading exemplar axis ``N`` (split into batches of ``batch_size``).
      token_mask: optional bool ``(N, ...)`` (e.g. ``(N, seq)``) — False marks padding, which never counts. It
        applies to every captured input whose leading row axes (batch axes included) equal its shape.
      form: ``"gram"``, ``"rows"`` or ``"auto"`` (rows while a batch has fewer rows than input features).
      roles: role overrides (as for :func:`catmerge_jax.roles.classify`); used to check that every linear kernel's
        matrix view matches the inputs its layer receives. They must agree with the specs the model declares
        (:func:`catmerge_jax.roles.reconcile`).
      batch_size: exemplars per forward pass (``None``: all at once).
      extra_variables: linen: other collections the model needs, e.g. ``{"batch_stats": ...}``.
      rules: extra capture rules (see the module docstring).
      progress: show a tqdm bar over batches.
      **kwargs: passed to every call of the model.

    Returns:
      A tree like the params with a :class:`LeafStats` at every leaf (``count=0`` where the forward pass never
      went). A leaf the model declares a spec for (a linen model's ``param_roles()``, an nnx/equinox module type)
      carries it as ``LeafStats.spec``, so every merge reading these statistics uses it without ``roles=``.
    """
    if form not in ("auto", "gram", "rows"):
        raise CatMergeError(f"form must be 'auto', 'gram' or 'rows', got {form!r}")
    capture, params, inputs, declared = _capture_of(apply_fn_or_module, params, inputs, rules, kwargs)
    if not inputs:
        raise CaptureError("capture_stats needs at least one input array")
    arrays = [jnp.asarray(x) for x in inputs]
    n = arrays[0].shape[0] if arrays[0].ndim else 0
    for i, x in enumerate(arrays):
        if x.ndim == 0 or x.shape[0] != n:
            raise CaptureError(f"input {i} has shape {x.shape}; every input needs the same leading exemplar axis ({n})")
    mask = None if token_mask is None else jnp.asarray(token_mask, bool)
    if mask is not None and (mask.ndim == 0 or mask.shape[0] != n):
        raise CaptureError(f"token_mask has shape {mask.shape}; expected a leading exemplar axis of {n}")
    if n == 0:
        raise CaptureError("capture_stats got zero exemplars")
    size = n if batch_size is None else int(batch_size)
    if size < 1:
        raise CatMergeError(f"batch_size must be >= 1, got {batch_size}")

    from tqdm.auto import tqdm

    extra = dict(extra_variables or {})
    leaves = dict(leaves_with_paths(params))
    total = None
    stacks = None
    for sl in tqdm(_split(n, size), desc="capture", unit="batch", disable=not progress, leave=False):
        batch_inputs = [x[sl] for x in arrays]
        batch_mask = None if mask is None else mask[sl]
        if stacks is None:
            stacks = _stack_axes(capture.stack_shapes(params, extra, batch_inputs, batch_mask, form), leaves)
        sink_id = next(_SINK_IDS)
        _SINKS[sink_id] = sink = _Sink()
        try:
            capture.run(params, extra, batch_inputs, batch_mask, form, stacks, np.int32(sink_id))
            jax.effects_barrier()
        finally:
            del _SINKS[sink_id]
        batch = _sink_to_stats(sink, params, stacks, form)
        total = batch if total is None else stats_add(total, batch)
    if not any(np.any(np.asarray(s.count) > 0) for _, s in leaves_with_paths(total, is_leaf=lambda x: isinstance(x, LeafStats))):
        warnings.warn("capture_stats: the forward pass ran no module this capture knows, so every leaf has "
                      "count 0 (no statistics at all). A model wrapped in another framework's modules (nnx.bridge, a "
                      "linen module inside nnx, ...) is captured through the outer framework only: capture the inner "
                      "model itself, or add rules= for your own layer types", stacklevel=2)
    _check_against_roles(params, total, with_declared(declared, roles))
    return with_specs(total, declared)


__all__ = ["capture_stats", "make_capture", "linen_declared_specs", "Capture", "Captured", "CaptureError", "Rule",
           "DEFAULT_RULES",
           "conv_patches", "dense_rule", "dense_general_rule", "einsum_rule", "conv_rule", "layer_norm_rule", "rms_norm_rule",
           "batch_norm_rule", "group_norm_rule", "embed_rule", "nnx_linear_rule", "nnx_linear_general_rule",
           "nnx_conv_rule", "nnx_layer_norm_rule", "nnx_rms_norm_rule", "nnx_batch_norm_rule", "nnx_embed_rule",
           "eqx_linear_rule", "eqx_conv_rule", "eqx_layer_norm_rule", "eqx_rms_norm_rule", "eqx_embedding_rule"]
