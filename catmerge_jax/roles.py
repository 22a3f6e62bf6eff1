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

**Declared specs.** A model can say what its names do not (open_clip's fused ``q|k|v`` ``in_proj``, its bare
``proj`` matrix): a linen module's ``param_roles()``, an nnx/equinox module's layer types. Those *declared* specs
travel with what the model produces — :func:`~catmerge_jax.capture.capture_stats` stores them in every
:class:`~catmerge_jax.stats.LeafStats` (``spec``), and :func:`with_roles` (or a converter's ``with_roles=True``)
wraps params so they carry them — and every method reads them without the caller passing ``roles=``. An explicit
override may agree with a declared spec (the same spec, the same bare role, or the same spec with stacked axes
added) or refine a leaf the model declares nothing for; one that says otherwise raises
:class:`~catmerge_jax.errors.RoleConflictError` naming the leaf. See ``docs/roles.md``.

>>> wrapped = with_roles(params, {"Dense_0/kernel": LeafSpec(Role.LINEAR, out_blocks=2)})
>>> classify(wrapped)["Dense_0"]["kernel"].out_blocks          # the wrapper's declaration applies by itself
2
>>> classify(wrapped, {"Dense_0/kernel": "linear"})["Dense_0"]["kernel"].out_blocks   # agrees: kept
2
>>> classify(wrapped, {"Dense_0/kernel": "other"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
catmerge_jax.errors.RoleConflictError: roles= gives leaf 'Dense_0/kernel' the role other, but its model declares ...
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import warnings
from typing import Any, Callable, Iterable, Mapping, Union

import jax
import numpy as np

from catmerge_jax.errors import CatMergeError, RoleConflictError
from catmerge_jax.tree import PyTree, leaves_with_paths, map_with_path


class Role(str, enum.Enum):
    """Which CAT trimming rule a leaf gets: linear map, norm scale (γ), shift (bias, β) or other (task arithmetic)."""

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
      axes: LINEAR only: the order in which the (unstacked) kernel's axes are read, for kernels whose input axes
        are not leading (``None``: as stored). An ``nn.Einsum`` kernel ``(heads, d_model, head_dim)`` contracted over
        ``d_model`` (``"BTD,NDH->BTNH"``) is ``axes=(1, 0, 2), in_axes=1``: the ``(d_model, heads·head_dim)`` matrix.

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
    axes: tuple[int, ...] | None = None

    def _layer_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        layer = tuple(shape[self.stack_axes:])
        return layer if self.axes is None else tuple(layer[a] for a in self.axes)

    def _read(self, x: Any, lead: int) -> Any:
        """``x`` with the kernel axes (after ``lead`` and the stack axes) in :attr:`axes` order."""
        if self.axes is None:
            return x
        first = lead + self.stack_axes
        return x.transpose(tuple(range(first)) + tuple(first + a for a in self.axes))

    def _unread(self, x: Any, lead: int) -> Any:
        """Inverse of :meth:`_read`."""
        if self.axes is None:
            return x
        first = lead + self.stack_axes
        return x.transpose(tuple(range(first)) + tuple(first + a for a in np.argsort(self.axes)))

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
        x = self._read(x, lead)
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
        if self.axes is None:
            return m.reshape(lead + leaf_shape)
        read = leaf_shape[: self.stack_axes] + self._layer_shape(leaf_shape)
        return self._unread(m.reshape(lead + read), len(lead))

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


def classify(params: PyTree, overrides: Overrides = None, *,
             declared: Mapping[str, LeafSpec] | None = None) -> PyTree:
    """A tree mirroring ``params`` whose leaves are :class:`LeafSpec`.

    A leaf's spec is, in this order: the ``overrides`` entry, checked against the leaf's declared spec
    (:func:`reconcile`); its declared spec (``declared``, ``{leaf path: LeafSpec}``, and the roles of a
    :class:`ParamsWithRoles`); :func:`default_spec`.
    """
    declared = union_declared([("the params", declared_roles(params)), ("the model", declared)])
    resolved = with_declared(declared, overrides)

    def spec(path: str, leaf: Any) -> LeafSpec:
        chosen = lookup_override(resolved, path, leaf)
        result = default_spec(path, leaf) if chosen is None else _as_spec(chosen, leaf)
        check_spec(path, np.shape(leaf), result)
        return result

    specs = map_with_path(spec, params)
    user = overrides.user if isinstance(overrides, Declared) else overrides
    if isinstance(user, Mapping):
        warn_unmatched(user, [p for p, _ in leaves_with_paths(params)])
    return specs


# --------------------------------------------------------------------------------------------------------------
# Declared specs: what a model says about its leaves, carried by its params and statistics.


def describe(spec: LeafSpec) -> str:
    """``spec`` in a few words for messages: its role and every field that is not the default.

    >>> describe(LeafSpec(Role.LINEAR, in_axes=1, out_blocks=3))
    'linear (out_blocks=3)'
    """
    fields = [f"{f.name}={getattr(spec, f.name)}" for f in dataclasses.fields(spec)[1:]
              if getattr(spec, f.name) != f.default]
    return spec.role.value + (f" ({', '.join(fields)})" if fields else "")


def reconcile(path: str, leaf: Any, declared: LeafSpec | None, override: RoleLike | None) -> RoleLike | None:
    """The spec of a leaf from its declared spec and the caller's explicit override (either may be ``None``).

    An override *agrees* when it is the declared spec, the declared spec with stacked axes added
    (:func:`with_stacking`), or a bare role equal to the declared one (the declared spec, with its details, is
    kept). Anything else raises :class:`~catmerge_jax.errors.RoleConflictError` naming the leaf: a declared spec
    is what the layer computes, so an override that disagrees would trim the leaf as something it is not. A leaf
    without a declared spec takes the override as is.
    """
    if declared is None:
        return override
    if override is None:
        return declared
    if isinstance(override, LeafSpec):
        if override == declared or (override.stack_axes > declared.stack_axes
                                    and with_stacking(declared, np.shape(leaf), override.stack_axes) == override):
            return override
        what = f"the spec {describe(override)}"
    else:
        role = Role(override)
        if role is declared.role:
            return declared
        what = f"the role {role.value}"
    raise RoleConflictError(f"roles= gives leaf '{path}' {what}, but its model declares {describe(declared)}; drop "
                            "the override or pass the declared spec")


def union_declared(sources: Iterable[tuple[str, Mapping[str, LeafSpec] | None]]) -> dict[str, LeafSpec]:
    """One ``{leaf path: LeafSpec}`` from several named declarations (``None`` entries are skipped); two that
    declare different specs for one leaf raise :class:`~catmerge_jax.errors.RoleConflictError` naming it."""
    out: dict[str, LeafSpec] = {}
    origin: dict[str, str] = {}
    for name, specs in sources:
        for path, spec in (specs or {}).items():
            if path in out and out[path] != spec:
                raise RoleConflictError(f"leaf '{path}' is declared {describe(out[path])} by {origin[path]} but "
                                        f"{describe(spec)} by {name}; params and statistics must come from the "
                                        "same model layout")
            out.setdefault(path, spec)
            origin.setdefault(path, name)
    return out


@dataclasses.dataclass(frozen=True)
class Declared:
    """Overrides (a function, as :func:`classify` takes): the caller's ``user`` overrides over the ``declared``
    specs, reconciled leaf by leaf (:func:`reconcile`). Build with :func:`with_declared`."""

    declared: Mapping[str, LeafSpec]
    user: Overrides = None
    source: str = "the model"

    def __call__(self, path: str, leaf: Any) -> RoleLike | None:
        return reconcile(path, leaf, self.declared.get(path), lookup_override(self.user, path, leaf))


def with_declared(declared: Mapping[str, LeafSpec] | None, overrides: Overrides, *,
                  source: str = "the model") -> Overrides:
    """``overrides`` over the specs a model ``declared`` (exact leaf paths), as one overrides value for
    :func:`classify` and :func:`lookup_override`; ``overrides`` itself when nothing is declared. Nested
    declarations are merged (a conflict between them is an error)."""
    if isinstance(overrides, Declared):
        declared = union_declared([(overrides.source, overrides.declared), (source, declared)])
        source, overrides = overrides.source, overrides.user
    if not declared:
        return overrides
    return Declared(dict(declared), overrides, source)


def declared_specs(params: PyTree, roles: Overrides) -> dict[str, LeafSpec]:
    """``{leaf path: LeafSpec}`` for every leaf of ``params`` that ``roles`` (a model's ``param_roles()``: paths,
    patterns or a function) names; leaves it does not name are left out (they keep the default rules).

    >>> declared_specs({"attn": {"in_proj": {"kernel": np.zeros((4, 12))}}, "proj": np.zeros((4, 2))},
    ...                {"*/in_proj/kernel": LeafSpec(Role.LINEAR, out_blocks=3), "proj": "linear"})["proj"]
    LeafSpec(role=<Role.LINEAR: 'linear'>, in_axes=1, stack_axes=0, out_first=False, out_blocks=1, axes=None)
    """
    out: dict[str, LeafSpec] = {}
    if roles is None:
        return out
    for path, leaf in leaves_with_paths(params):
        chosen = lookup_override(roles, path, leaf)
        if chosen is not None:
            spec = _as_spec(chosen, leaf)
            check_spec(path, np.shape(leaf), spec)
            out[path] = spec
    return out


class ParamsWithRoles(dict):
    """A params dict that carries the specs its model declares: ``roles`` ``{leaf path: LeafSpec}``.

    It is a ``dict`` (``model.apply({"params": p}, x)`` works) and a pytree node with the plain dict's key paths,
    whose static data holds the roles, so ``jax.tree.map``, ``jit`` and ``vmap`` keep them. Every merge reads them
    as declared specs and returns the same kind; ``dict(p)`` is the plain params. Its tree structure differs from
    the plain dict's, so a two-tree ``jax.tree.map`` needs both wrapped or both plain. Build with
    :func:`with_roles`.
    """

    __slots__ = ("_declared",)

    def __init__(self, params: Mapping[str, Any] = (), roles: Mapping[str, LeafSpec] | None = None):
        super().__init__(params)
        self._declared = tuple(sorted((roles or {}).items()))

    @property
    def roles(self) -> dict[str, LeafSpec]:
        return dict(self._declared)

    def __repr__(self) -> str:
        return f"ParamsWithRoles({dict.__repr__(self)}, roles={self.roles!r})"


def _flatten_with_keys(p: ParamsWithRoles):
    keys = tuple(sorted(p))
    return [(jax.tree_util.DictKey(k), dict.__getitem__(p, k)) for k in keys], (keys, p._declared)


def _flatten(p: ParamsWithRoles):
    keys = tuple(sorted(p))
    return [dict.__getitem__(p, k) for k in keys], (keys, p._declared)


def _unflatten(aux, children) -> ParamsWithRoles:
    keys, declared = aux
    out = ParamsWithRoles(zip(keys, children))
    out._declared = declared
    return out


jax.tree_util.register_pytree_with_keys(ParamsWithRoles, _flatten_with_keys, _unflatten, _flatten)


def declared_roles(obj: Any) -> dict[str, LeafSpec] | None:
    """The specs ``obj`` carries (a :class:`ParamsWithRoles`), else ``None``."""
    return obj.roles if isinstance(obj, ParamsWithRoles) else None


def with_roles(params: Mapping[str, Any], roles: Overrides) -> ParamsWithRoles:
    """``params`` carrying the specs ``roles`` declares (paths, patterns or a function, as a model's
    ``param_roles()``), resolved to the leaves they name; every method then reads them without ``roles=``.

    >>> p = with_roles({"qkv": {"kernel": np.zeros((4, 12))}}, {"qkv/kernel": LeafSpec(Role.LINEAR, out_blocks=3)})
    >>> p.roles["qkv/kernel"].out_blocks, isinstance(p, dict)
    (3, True)
    """
    if not isinstance(params, Mapping):
        raise CatMergeError(f"with_roles needs a params dict (a linen 'params' collection), got "
                            f"{type(params).__name__}")
    specs = union_declared([("the params", declared_roles(params)), ("roles", declared_specs(params, roles))])
    return ParamsWithRoles(params, specs)


def spec_to_dict(spec: LeafSpec) -> dict[str, Any]:
    """A JSON-ready ``dict`` of ``spec`` (inverse: :func:`spec_from_dict`)."""
    return {**dataclasses.asdict(spec), "role": spec.role.value}


def spec_from_dict(fields: Mapping[str, Any]) -> LeafSpec:
    """The :class:`LeafSpec` written by :func:`spec_to_dict`."""
    def value(k, v):
        if k == "axes":
            return None if v is None else tuple(int(a) for a in v)
        return bool(v) if k == "out_first" else int(v)

    return LeafSpec(Role(fields["role"]), **{k: value(k, v) for k, v in fields.items() if k != "role"})


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
    if spec.axes is not None and sorted(spec.axes) != list(range(layer_ndim)):
        raise ValueError(f"leaf '{path}' of shape {tuple(shape)}: axes={spec.axes} is not an order of its "
                         f"{layer_ndim} kernel axes")
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


__all__ = ["Role", "LeafSpec", "check_spec", "with_stacking", "classify", "default_spec", "role_table", "print_roles",
           "leaves_by_role", "is_spec", "Overrides", "RoleLike", "ParamsWithRoles", "with_roles", "declared_roles",
           "declared_specs", "Declared", "with_declared", "reconcile", "union_declared", "describe", "spec_to_dict",
           "spec_from_dict"]
