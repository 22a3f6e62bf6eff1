"""nnx and equinox modules as merge inputs: split into a params tree, leaf roles from module types, rebuild.

Every merge front door reads its inputs through :func:`split_params`, so ``cat_merge`` and every method accept a
``flax.nnx.Module`` or an ``equinox.Module`` and return the same kind of object:

==========================  ==================================================  ================================
input                       ``params`` (what is merged)                         ``rebuild(p)``
==========================  ==================================================  ================================
``nnx.Module``              ``nnx.state(obj, nnx.Param)``                       ``nnx.merge(graphdef, p, rest)``
``equinox.Module``          ``eqx.filter(obj, eqx.is_inexact_array)``           ``eqx.combine(p, static part)``
``ParamsWithRoles``         the plain dict (roles: the specs it carries)        ``ParamsWithRoles(p, roles)``
anything else               the object itself (linen dicts, ``nnx.State``, ...) ``p``
==========================  ==================================================  ================================

Roles come from the module types (a module knows what its arrays are; no names are guessed):

====================================  ========================================================================
``eqx.nn.Linear``                     ``weight (out, in)``: linear, ``out_first``; ``bias``: shift
``eqx.nn.Conv1d/2d/3d`` (``Conv``)    ``weight (out, in, *window)``: linear, ``out_first``,
                                      ``in_axes = 1 + spatial dims``; ``bias``: shift
``eqx.nn.LayerNorm`` / ``RMSNorm``    ``weight``: scale; ``bias``: shift
``eqx.nn.GroupNorm``                  ``weight``: scale; ``bias``: shift
``eqx.nn.Embedding``                  ``weight``: other
``nnx.Linear``                        ``kernel (in, out)``: linear; ``bias``: shift
``nnx.LinearGeneral``                 ``kernel (*in, *out)``: linear, ``in_axes = len(in_features)``
``nnx.Conv``                          ``kernel (*window, in, out)``: linear on unfolded patches
``nnx.LayerNorm/RMSNorm/BatchNorm``   ``scale``: scale; ``bias``: shift
``nnx.GroupNorm``                     ``scale``: scale; ``bias``: shift
``nnx.Embed``                         ``embedding``: other
====================================  ========================================================================

(``eqx.nn.MultiheadAttention`` and ``nnx.MultiHeadAttention`` hold their projections as ``Linear`` /
``LinearGeneral`` submodules, so they need no entry.) Layers stacked by ``eqx.filter_vmap`` / ``nnx.vmap`` carry
extra leading axes on every array; a leaf's ``stack_axes`` is its number of axes beyond what the module declares.
Arrays of other module types get no entry and fall back to :func:`catmerge_jax.roles.default_spec`.

>>> import jax
>>> import equinox as eqx
>>> from catmerge_jax.modules import split_params
>>> mp = split_params(eqx.nn.Linear(3, 4, key=jax.random.key(0)))
>>> mp.roles["weight"].out_first, mp.roles["weight"].role.value, mp.roles["bias"].role.value
(True, 'linear', 'shift')
>>> rebuilt = mp.rebuild(mp.params)
>>> type(rebuilt).__name__
'Linear'
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, NamedTuple

import numpy as np

from catmerge_jax.roles import LeafSpec, ParamsWithRoles, Role, with_stacking
from catmerge_jax.tree import PyTree


class ModuleParams(NamedTuple):
    """A merge input split into what is merged and how to put it back.

    Attributes:
      params: the pytree of arrays the methods work on.
      roles: ``{leaf path: LeafSpec}`` from the module types (``None`` for plain trees: default roles apply).
      rebuild: ``params -> object`` of the input's kind.
    """

    params: PyTree
    roles: dict[str, LeafSpec] | None
    rebuild: Callable[[PyTree], Any]


def _identity(p: PyTree) -> PyTree:
    return p


def _eqx():
    return sys.modules.get("equinox")


def is_eqx_module(obj: Any) -> bool:
    """True for an ``equinox.Module`` (without importing equinox when the caller never did)."""
    eqx = _eqx()
    return eqx is not None and isinstance(obj, eqx.Module)


def is_nnx_module(obj: Any) -> bool:
    """True for a ``flax.nnx.Module``."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _linear(shape: tuple[int, ...], declared_ndim: int, in_axes: int, out_first: bool = False) -> LeafSpec:
    return LeafSpec(Role.LINEAR, in_axes=in_axes, stack_axes=max(len(shape) - declared_ndim, 0), out_first=out_first)


def _vector(role: Role, shape: tuple[int, ...], declared_ndim: int) -> LeafSpec:
    return LeafSpec(role, stack_axes=max(len(shape) - declared_ndim, 0))


# ---------------------------------------------------------------------------------------------------------------
# equinox


def _eqx_specs(module: Any) -> dict[str, LeafSpec]:
    """``{field name: LeafSpec}`` for the arrays of one equinox module of a known type."""
    eqx = _eqx()
    nn = eqx.nn
    shape = lambda name: tuple(np.shape(getattr(module, name, None))) if getattr(module, name, None) is not None else None
    out: dict[str, LeafSpec] = {}
    w, b = shape("weight"), shape("bias")
    if isinstance(module, nn.Linear):
        if w is not None:
            out["weight"] = _linear(w, 2, 1, out_first=True)
        if b is not None:
            out["bias"] = _vector(Role.SHIFT, b, 1)
    elif isinstance(module, nn.Conv):
        n = module.num_spatial_dims
        if w is not None:
            out["weight"] = _linear(w, 2 + n, 1 + n, out_first=True)
        if b is not None:  # (out, 1, ..., 1)
            out["bias"] = _vector(Role.SHIFT, b, 1 + n)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        declared = module.shape if isinstance(module.shape, tuple) else (module.shape,)
        if w is not None:
            out["weight"] = _vector(Role.SCALE, w, len(declared))
        if b is not None:
            out["bias"] = _vector(Role.SHIFT, b, len(declared))
    elif isinstance(module, nn.GroupNorm):
        if w is not None:
            out["weight"] = _vector(Role.SCALE, w, 1)
        if b is not None:
            out["bias"] = _vector(Role.SHIFT, b, 1)
    elif isinstance(module, nn.Embedding):
        if w is not None:
            out["weight"] = _vector(Role.OTHER, w, 2)
    return out


def eqx_module_paths(tree: Any, types: tuple[type, ...]) -> list[tuple[str, Any]]:
    """``[(path, submodule)]`` for every submodule of ``tree`` that is an instance of ``types`` (nested included),
    with paths as :func:`catmerge_jax.tree.leaves_with_paths` writes them."""
    import jax

    from catmerge_jax.tree import path_str

    found: list[tuple[str, Any]] = []

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, types):
            found.append((prefix, node))
        flat, _ = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node and isinstance(x, _eqx().Module))
        for kp, child in flat:
            if child is not node and isinstance(child, _eqx().Module):
                visit(_join(prefix, path_str(kp)), child)

    visit("", tree)
    return found


def eqx_roles(module: Any) -> dict[str, LeafSpec]:
    """``{leaf path: LeafSpec}`` for every array of ``module`` that belongs to a known equinox layer type."""
    roles: dict[str, LeafSpec] = {}
    for path, sub in eqx_module_paths(module, (_eqx().Module,)):
        for name, spec in _eqx_specs(sub).items():
            roles[_join(path, name)] = spec
    return roles


def _split_eqx(obj: Any) -> ModuleParams:
    eqx = _eqx()
    params, static = eqx.partition(obj, eqx.is_inexact_array)
    return ModuleParams(params, eqx_roles(obj), lambda p: eqx.combine(p, static))


# ---------------------------------------------------------------------------------------------------------------
# nnx


def _nnx_shape(module: Any, name: str) -> tuple[int, ...] | None:
    v = getattr(module, name, None)
    if v is None:
        return None
    from flax import nnx

    if isinstance(v, nnx.Variable):
        return tuple(np.shape(v.get_value()))  # also for abstract (eval_shape) modules
    return tuple(np.shape(v))


def _nnx_specs(module: Any) -> dict[str, LeafSpec]:
    """``{attribute: LeafSpec}`` for the params of one nnx module of a known type."""
    from flax import nnx

    k, b = _nnx_shape(module, "kernel"), _nnx_shape(module, "bias")
    out: dict[str, LeafSpec] = {}
    if isinstance(module, nnx.Linear):
        if k is not None:
            out["kernel"] = _linear(k, 2, 1)
        if b is not None:
            out["bias"] = _vector(Role.SHIFT, b, 1)
    elif isinstance(module, nnx.LinearGeneral):
        n_in, n_out = len(module.in_features), len(module.out_features)
        n_batch = len(module.batch_axis)
        if k is not None:
            if n_batch:  # one kernel per batch entry: not a single linear map
                out["kernel"] = _vector(Role.OTHER, k, n_batch + n_in + n_out)
            else:
                out["kernel"] = _linear(k, n_in + n_out, n_in)
        if b is not None:
            out["bias"] = _vector(Role.SHIFT, b, n_batch + n_out)
    elif isinstance(module, nnx.Conv):
        n = len(module.kernel_size)
        if k is not None:
            out["kernel"] = _linear(k, n + 2, n + 1)
        if b is not None:
            out["bias"] = _vector(Role.SHIFT, b, 1)
    elif isinstance(module, (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm)):
        s = _nnx_shape(module, "scale")
        if s is not None:
            out["scale"] = _vector(Role.SCALE, s, 1)
        if b is not None:
            out["bias"] = _vector(Role.SHIFT, b, 1)
    elif isinstance(module, nnx.Embed):
        e = _nnx_shape(module, "embedding")
        if e is not None:
            out["embedding"] = _vector(Role.OTHER, e, 2)
    return out


def nnx_module_paths(module: Any, types: tuple[type, ...]) -> list[tuple[str, Any]]:
    """``[(path, submodule)]`` for the submodules of an nnx module that are instances of ``types``."""
    from flax import nnx

    return [("/".join(str(p) for p in path), node) for path, node in nnx.iter_graph(module)
            if isinstance(node, types) and isinstance(node, nnx.Module)]


def nnx_roles(module: Any) -> dict[str, LeafSpec]:
    """``{leaf path: LeafSpec}`` for every param of ``module`` that belongs to a known nnx layer type."""
    from flax import nnx

    roles: dict[str, LeafSpec] = {}
    for path, sub in nnx_module_paths(module, (nnx.Module,)):
        for name, spec in _nnx_specs(sub).items():
            roles[_join(path, name)] = spec
    return roles


def _split_nnx(obj: Any) -> ModuleParams:
    from flax import nnx

    graphdef, params, rest = nnx.split(obj, nnx.Param, ...)
    return ModuleParams(params, nnx_roles(obj), lambda p: nnx.merge(graphdef, p, rest))


# ---------------------------------------------------------------------------------------------------------------


def split_params(obj: Any) -> ModuleParams:
    """Split a merge input into ``(params, roles, rebuild)``; see the module docstring for each kind.

    ``rebuild(params)`` returns an object of the input's kind with ``params`` in place of its parameters (the
    input itself is not modified).
    """
    if is_nnx_module(obj):
        return _split_nnx(obj)
    if is_eqx_module(obj):
        return _split_eqx(obj)
    if isinstance(obj, ParamsWithRoles):  # params that carry their model's declared specs; merged, they still do
        return ModuleParams(dict(obj), obj.roles, lambda p: ParamsWithRoles(p, obj.roles))
    return ModuleParams(obj, None, _identity)


def stacked_spec(spec: LeafSpec, stats_leaf: Any, shape: tuple[int, ...] | None = None) -> LeafSpec:
    """The spec of a leaf whose statistics say it is stacked: ``count`` of ndim ``s > 0`` means ``s`` stack axes.

    This is the default for trees without module types (linen ``nn.scan`` / ``nn.vmap`` stacks) when the
    statistics come from :func:`catmerge_jax.capture.capture_stats`, which gives stacked leaves per-layer
    statistics (``count (L,)``, ``gram (L, in, in)``). A spec that already has ``stack_axes`` (an explicit
    override or a module type) is returned unchanged; so is one whose statistics are unstacked.

    For a LINEAR leaf, ``in_axes`` is recomputed on the unstacked shape: from the captured input width when
    ``shape`` and linear statistics are given (the number of leading — trailing for ``out_first`` — kernel axes
    whose product is that width), otherwise the Flax default rule (all but the last axis) clamped to the
    unstacked rank (:func:`catmerge_jax.roles.with_stacking`).

    >>> import numpy as np
    >>> from catmerge_jax.roles import LeafSpec, ParamsWithRoles, Role, with_stacking
    >>> from catmerge_jax.stats import LeafStats
    >>> s = LeafStats(count=np.ones(4, np.float32), gram=np.zeros((4, 8, 8), np.float32))
    >>> stacked_spec(LeafSpec(Role.LINEAR, in_axes=2), s, (4, 8, 16))
    LeafSpec(role=<Role.LINEAR: 'linear'>, in_axes=1, stack_axes=1, out_first=False, out_blocks=1, axes=None)
    """
    count = getattr(stats_leaf, "count", None)
    s = int(np.ndim(count)) if count is not None else 0
    if s == 0 or spec.stack_axes != 0:
        return spec
    if spec.role is not Role.LINEAR:
        return dataclasses.replace(spec, stack_axes=s)
    linear = getattr(stats_leaf, "gram", None)
    if linear is None:
        linear = getattr(stats_leaf, "rows", None)
    if shape is not None:
        layer = tuple(shape)[s:]
        if linear is not None:
            width = int(np.shape(linear)[-1])
            axes = layer[::-1] if spec.out_first else layer
            for k in range(1, len(layer)):
                if int(np.prod(axes[:k], dtype=np.int64)) == width:
                    return dataclasses.replace(spec, stack_axes=s, in_axes=k)
        return with_stacking(spec, tuple(shape), s)
    return dataclasses.replace(spec, stack_axes=s, in_axes=max(spec.in_axes - s, 1))


__all__ = ["ModuleParams", "split_params", "stacked_spec", "is_eqx_module", "is_nnx_module", "eqx_roles", "nnx_roles",
           "eqx_module_paths", "nnx_module_paths"]
