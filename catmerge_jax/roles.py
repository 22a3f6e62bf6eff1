"""Leaf roles: which CAT trimming rule applies to each parameter.

Every leaf is one of

* ``LINEAR`` — a kernel applied as ``y = x @ W`` (Dense, DenseGeneral, attention projections; a Conv
  kernel ``(*window, in, out)`` is the linear map on unfolded patches). ``LeafSpec.in_axes`` says how many
  leading axes are the input: the kernel is read as a matrix ``(prod(shape[:in_axes]), prod(shape[in_axes:]))``.
* ``SCALE`` — the γ of a normalization layer, ``y = x̂ ∘ γ``.
* ``SHIFT`` — a bias or a norm's β, ``y = x + b``.
* ``OTHER`` — embeddings, position tables, class tokens, logit scales: plain task arithmetic.

The defaults follow Flax's own module conventions (``kernel``/``scale``/``bias``/``embedding``), never one
model family's names. Override with a mapping (exact paths or ``fnmatch`` patterns, first match wins) or a
function ``(path, leaf) -> Role | LeafSpec | None`` (``None`` falls back to the default).

>>> import jax.numpy as jnp
>>> import catmerge_jax as cm
>>> params = {"Dense_0": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)},
...           "LayerNorm_0": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}
>>> specs = cm.classify(params, overrides={"LayerNorm_0/bias": cm.Role.OTHER})
>>> specs["Dense_0"]["kernel"].role, specs["LayerNorm_0"]["bias"].role
(<Role.LINEAR: 'linear'>, <Role.OTHER: 'other'>)
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import warnings
from typing import Any, Callable, Mapping, Union

import numpy as np

from catmerge_jax.tree import PyTree, leaves_with_paths, map_with_path


class Role(str, enum.Enum):
    LINEAR = "linear"
    SCALE = "scale"
    SHIFT = "shift"
    OTHER = "other"


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """How CAT reads one leaf.

    Attributes:
      role: the trimming rule that applies.
      in_axes: LINEAR only: how many axes of the (unstacked) kernel are inputs.
      stack_axes: leading axes that index independent layers stored in one leaf (``nn.scan`` / ``nnx.vmap``
        stacks, ``(L, in, out)``); every index gets its own statistics, bases and masks.
      out_first: LINEAR only: the kernel is stored ``(*out, *in)`` (equinox, PyTorch) instead of Flax's
        ``(*in, *out)``; the last ``in_axes`` axes are then the inputs.
      out_blocks: LINEAR only: the output axis holds this many independent projections side by side (a fused
        ``q|k|v`` kernel ``(d, 3d)``); each block is trimmed as its own layer, as the unfused layout would be.

    The matrix view of a LINEAR leaf of (unstacked) shape ``s`` is ``(in, out)``; :meth:`matrices` gives the
    stack of per-layer matrices ``(..., layers, in, out / out_blocks)`` and :meth:`from_matrices` inverts it.

    >>> import numpy as np
    >>> spec = LeafSpec(Role.LINEAR, in_axes=1, stack_axes=1, out_first=True)
    >>> w = np.arange(2 * 3 * 4.0).reshape(2, 3, 4)       # two stacked (out=3, in=4) weights
    >>> m = spec.matrices(w)
    >>> m.shape, bool((m[1] == w[1].T).all())
    ((2, 4, 3), True)
    >>> bool((spec.from_matrices(m, w.shape) == w).all())
    True
    """

    role: Role
    in_axes: int = 1
    stack_axes: int = 0
    out_first: bool = False
    out_blocks: int = 1

    def _layer_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[self.stack_axes:])

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The ``(in, out)`` matrix one layer of a LINEAR leaf of this ``shape`` is read as (before blocks)."""
        s = self._layer_shape(tuple(shape))
        ins = s[len(s) - self.in_axes:] if self.out_first else s[: self.in_axes]
        outs = s[: len(s) - self.in_axes] if self.out_first else s[self.in_axes:]
        return int(np.prod(ins, dtype=np.int64)), int(np.prod(outs, dtype=np.int64))

    def num_layers(self, shape: tuple[int, ...]) -> int:
        """Independent layers held by a leaf of this shape (stacked layers times output blocks)."""
        return int(np.prod(tuple(shape)[: self.stack_axes], dtype=np.int64)) * self.out_blocks

    def matrices(self, x: Any, lead: int = 0) -> Any:
        """``(*lead, *leaf_shape) -> (*lead, layers, in, out_per_block)`` for LINEAR leaves.

        Works on NumPy and JAX arrays (only reshapes and transposes).
        """
        shape = tuple(x.shape)
        leading, leaf_shape = shape[:lead], shape[lead:]
        fan_in, fan_out = self.matrix_shape(leaf_shape)
        stacks = int(np.prod(leaf_shape[: self.stack_axes], dtype=np.int64))
        if self.out_first:
            m = x.reshape(leading + (stacks, fan_out, fan_in))
            m = m.swapaxes(-1, -2)
        else:
            m = x.reshape(leading + (stacks, fan_in, fan_out))
        blocks = self.out_blocks
        if blocks > 1:
            if fan_out % blocks:
                raise ValueError(f"out_blocks={blocks} does not divide the output dimension {fan_out}")
            m = m.reshape(leading + (stacks, fan_in, blocks, fan_out // blocks))
            m = _move_blocks(m, len(leading))
            m = m.reshape(leading + (stacks * blocks, fan_in, fan_out // blocks))
        return m

    def from_matrices(self, m: Any, leaf_shape: tuple[int, ...]) -> Any:
        """Inverse of :meth:`matrices`: ``(*lead, layers, in, out_per_block) -> (*lead, *leaf_shape)``."""
        leaf_shape = tuple(leaf_shape)
        lead = tuple(m.shape[:-3])
        fan_in, fan_out = self.matrix_shape(leaf_shape)
        stacks = int(np.prod(leaf_shape[: self.stack_axes], dtype=np.int64))
        blocks = self.out_blocks
        if blocks > 1:
            m = m.reshape(lead + (stacks, blocks, fan_in, fan_out // blocks))
            m = _unmove_blocks(m, len(lead))
            m = m.reshape(lead + (stacks, fan_in, fan_out))
        if self.out_first:
            m = m.swapaxes(-1, -2)
        return m.reshape(lead + leaf_shape)

    def vectors(self, x: Any, lead: int = 0) -> Any:
        """``(*lead, *leaf_shape) -> (*lead, layers, size_per_layer)`` for SCALE/SHIFT/OTHER leaves.

        A fused bias ``(3d,)`` with ``out_blocks=3`` gives three layers of ``d`` (block-major, as :meth:`matrices`).
        """
        shape = tuple(x.shape)
        leading, leaf_shape = shape[:lead], shape[lead:]
        stacks = int(np.prod(leaf_shape[: self.stack_axes], dtype=np.int64))
        return x.reshape(leading + (stacks * self.out_blocks, -1))


def _move_blocks(m: Any, lead: int) -> Any:
    """``(*lead, stacks, in, blocks, out_b) -> (*lead, stacks, blocks, in, out_b)``."""
    axes = list(range(m.ndim))
    i = lead + 1
    axes[i], axes[i + 1] = axes[i + 1], axes[i]
    return m.transpose(axes)


def _unmove_blocks(m: Any, lead: int) -> Any:
    """``(*lead, stacks, blocks, in, out_b) -> (*lead, stacks, in, blocks, out_b)``."""
    return _move_blocks(m, lead)


RoleLike = Union[Role, LeafSpec, str]
Overrides = Union[Mapping[str, RoleLike], Callable[[str, Any], Union[RoleLike, None]], None]

# Flax's MultiHeadDotProductAttention names its DenseGeneral projections like this; their kernels are
# (in, heads, head_dim) — one input axis — while its "out" kernel is (heads, head_dim, out).
_FLAX_ATTENTION_INPUT_PROJECTIONS = ("query", "key", "value")


def _as_spec(value: RoleLike, leaf: Any) -> LeafSpec:
    if isinstance(value, LeafSpec):
        return value
    role = Role(value)
    if role is Role.LINEAR:
        return LeafSpec(role, in_axes=max(np.ndim(leaf) - 1, 1))
    return LeafSpec(role)


def default_spec(path: str, leaf: Any) -> LeafSpec:
    """The default role of a leaf from its path and shape (Flax module conventions)."""
    names = path.split("/")
    name = names[-1]
    parent = names[-2] if len(names) > 1 else ""
    ndim = np.ndim(leaf)
    if name == "kernel" and ndim >= 2:
        if ndim >= 3 and parent in _FLAX_ATTENTION_INPUT_PROJECTIONS:
            return LeafSpec(Role.LINEAR, in_axes=1)
        # Dense (in, out); Conv (*window, in, out); DenseGeneral over the last axis (in..., out): all but the
        # last axis are inputs.
        return LeafSpec(Role.LINEAR, in_axes=ndim - 1)
    if name == "scale" and ndim >= 1:
        return LeafSpec(Role.SCALE)
    if name == "bias" and ndim >= 1:
        return LeafSpec(Role.SHIFT)
    return LeafSpec(Role.OTHER)


def lookup_override(overrides: Overrides, path: str, leaf: Any) -> RoleLike | None:
    """The override for ``path`` (exact path, then the first matching pattern, or the function's answer)."""
    if overrides is None:
        return None
    if callable(overrides):
        return overrides(path, leaf)
    if path in overrides:
        return overrides[path]
    for pattern, value in overrides.items():
        if fnmatch.fnmatchcase(path, pattern):
            return value
    return None


def classify(params: PyTree, overrides: Overrides = None) -> PyTree:
    """A tree mirroring ``params`` whose leaves are :class:`LeafSpec` (default rules plus ``overrides``)."""

    def spec(path: str, leaf: Any) -> LeafSpec:
        chosen = lookup_override(overrides, path, leaf)
        result = default_spec(path, leaf) if chosen is None else _as_spec(chosen, leaf)
        check_spec(path, np.shape(leaf), result)
        return result

    specs = map_with_path(spec, params)
    if isinstance(overrides, Mapping):
        warn_unmatched(overrides, [p for p, _ in leaves_with_paths(params)])
    return specs


def warn_unmatched(overrides: Mapping[str, Any], paths: list[str]) -> None:
    """Warn (naming it) about every override pattern that matches no leaf path: a typo would otherwise be a
    silent no-op."""
    known = set(paths)
    for pattern in overrides:
        if pattern not in known and not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
            warnings.warn(f"roles pattern '{pattern}' matches no leaf of the params tree (leaf paths look like "
                          f"'{paths[0] if paths else ''}')", stacklevel=3)


def with_stacking(spec: LeafSpec, shape: tuple[int, ...], stack_axes: int) -> LeafSpec:
    """``spec`` for a leaf whose first ``stack_axes`` axes index stacked layers (``nn.scan``, ``nnx.vmap``).

    Used when the statistics say so (a captured stacked leaf has a per-layer ``count`` of ``stack_axes``
    dimensions) and the spec does not: a default LINEAR spec keeps its output axis last and reads every other
    unstacked axis as input, as it would for the unstacked kernel.
    """
    if stack_axes <= spec.stack_axes:
        return spec
    if spec.role is Role.LINEAR:
        layer_ndim = len(shape) - stack_axes
        in_axes = min(spec.in_axes, layer_ndim - 1) if spec.out_first else max(1, min(spec.in_axes - stack_axes
                                                                                      + spec.stack_axes,
                                                                                      layer_ndim - 1))
        return dataclasses.replace(spec, stack_axes=stack_axes, in_axes=in_axes)
    return dataclasses.replace(spec, stack_axes=stack_axes)


def check_spec(path: str, shape: tuple[int, ...], spec: LeafSpec) -> None:
    """Raise ``ValueError`` naming ``path`` when ``spec`` cannot read a leaf of ``shape``."""
    layer_ndim = len(shape) - spec.stack_axes
    if spec.stack_axes < 0 or layer_ndim < 0:
        raise ValueError(f"leaf '{path}' of shape {tuple(shape)} cannot have stack_axes={spec.stack_axes}")
    if spec.role is not Role.LINEAR:
        size = int(np.prod(tuple(shape)[spec.stack_axes:], dtype=np.int64))
        if spec.out_blocks < 1 or size % spec.out_blocks:
            raise ValueError(f"leaf '{path}' of shape {tuple(shape)}: out_blocks={spec.out_blocks} does not divide "
                             f"its size per layer {size}")
        return
    if layer_ndim < 2:
        raise ValueError(f"leaf '{path}' of shape {tuple(shape)} cannot be a linear kernel (needs at least 2 axes "
                         f"after its {spec.stack_axes} stacked axes)")
    if not 1 <= spec.in_axes < layer_ndim:
        raise ValueError(f"leaf '{path}' of shape {tuple(shape)} cannot be a linear kernel with "
                         f"in_axes={spec.in_axes} (and stack_axes={spec.stack_axes})")
    if spec.out_blocks < 1 or spec.matrix_shape(tuple(shape))[1] % spec.out_blocks:
        raise ValueError(f"leaf '{path}' of shape {tuple(shape)}: out_blocks={spec.out_blocks} does not divide its "
                         f"output dimension {spec.matrix_shape(tuple(shape))[1]}")


def is_spec(x: Any) -> bool:
    return isinstance(x, LeafSpec)


def role_table(params: PyTree, overrides: Overrides = None) -> str:
    """A text table ``path  role  shape  [as matrix]`` so the user can check the mapping before merging."""
    specs = classify(params, overrides)
    rows = []
    for (path, leaf), (_, spec) in zip(leaves_with_paths(params), leaves_with_paths(specs, is_leaf=is_spec)):
        shape = tuple(np.shape(leaf))
        extra = ""
        if spec.role is Role.LINEAR and len(shape) > 2:
            extra = f"as {spec.matrix_shape(shape)}"
        rows.append((path, spec.role.value, str(shape), extra))
    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'path':<{width}}  {'role':<6}  shape"]
    lines += [f"{p:<{width}}  {r:<6}  {s} {e}".rstrip() for p, r, s, e in rows]
    counts = {role.value: sum(1 for r in rows if r[1] == role.value) for role in Role}
    lines.append("total: " + ", ".join(f"{n} {name}" for name, n in counts.items()))
    return "\n".join(lines)


def print_roles(params: PyTree, overrides: Overrides = None) -> None:
    """Print :func:`role_table`."""
    print(role_table(params, overrides))


def leaves_by_role(params: PyTree, overrides: Overrides = None) -> dict[Role, list[str]]:
    """``{role: [paths]}`` — handy for checks and reports."""
    specs = classify(params, overrides)
    out: dict[Role, list[str]] = {r: [] for r in Role}
    for path, spec in leaves_with_paths(specs, is_leaf=is_spec):
        out[spec.role].append(path)
    return out


__all__ = ["Role", "LeafSpec", "check_spec", "with_stacking", "classify", "default_spec", "role_table", "print_roles", "leaves_by_role", "is_spec",
           "Overrides", "RoleLike"]
