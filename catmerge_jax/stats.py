"""Exemplar statistics: what CAT needs to know about each layer's inputs, as a tree mirroring the params.

Each params leaf gets one :class:`LeafStats`:

* linear kernel ``(in, out)``: the Gram ``XᵀX`` ``(in, in)`` of its input rows, or the rows ``X`` ``(n, in)``
  themselves while ``n < in`` (cheaper: CAT then works with ``X T`` products);
* norm scale ``(d,)``: ``sq_sum[z] = Σ_rows x̂_z²`` of the normalized input;
* every leaf the layer saw: ``count``, the number of rows (real tokens).

Statistics are sums, so batches stream through :func:`stats_add` (or :func:`accumulate`) and any number of
exemplars fits in memory. Leaves a forward pass never touched hold ``LeafStats(count=0)``.

Statistics captured from a model also carry the spec the model *declares* for a leaf (``LeafStats.spec``, static
pytree data: see :mod:`catmerge_jax.roles`), so a merge that reads them trims each leaf as its model computes it
without the caller passing ``roles=``; :func:`save_stats` / :func:`load_stats` keep them.

>>> import numpy as np
>>> import catmerge_jax as cm
>>> params = {"dense": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}}
>>> x = np.ones((5, 3), np.float32)
>>> s = cm.stats_from_arrays(params, {"dense/kernel": cm.linear_stats(x), "dense/bias": cm.count_stats(5)})
>>> s = cm.stats_add(s, s)                                  # two batches
>>> float(s["dense"]["kernel"].count), s["dense"]["kernel"].gram_matrix().shape
(10.0, (3, 3))
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.atomic import atomic_file
from catmerge_jax.errors import MissingStatisticsError, RoleConflictError
from catmerge_jax.roles import LeafSpec, Role, describe, spec_from_dict, spec_to_dict
from catmerge_jax.tree import PyTree, check_finite, leaves_with_paths, map_with_path


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LeafStats:
    """Statistics of one leaf's layer input. Unused fields are ``None``.

    Attributes:
      count: scalar, rows seen.
      gram: ``(in, in)`` — ``Σ xᵀx`` over rows (linear kernels, Gram form).
      rows: ``(n, in)`` — the rows themselves (linear kernels, row form; zero rows are harmless padding).
      sq_sum: ``(d,)`` — per-dimension sum of squares of the normalized input (norm scales).
      spec: the :class:`~catmerge_jax.roles.LeafSpec` the model declares for this leaf (``None``: it declares
        nothing and the path defaults apply). Static pytree data: ``jit``, ``vmap`` and ``jax.tree.map`` keep it,
        and it is no array leaf.

    A leaf that stacks ``L`` independent layers (``nn.scan``, ``nnx.vmap``; ``LeafSpec.stack_axes``) has per-layer
    statistics with the stack axes leading: ``count (L,)``, ``gram (L, in, in)``, ``rows (L, n, in)``,
    ``sq_sum (L, d)`` (``(L1, L2, ...)`` for nested stacks). ``count.ndim`` is the number of stack axes.
    """

    count: Any = None
    gram: Any = None
    rows: Any = None
    sq_sum: Any = None
    spec: LeafSpec | None = dataclasses.field(default=None, metadata=dict(static=True))

    def arrays(self) -> dict[str, Any]:
        """``{field: value}`` of the array fields that are set (``count``, ``gram``, ``rows``, ``sq_sum``)."""
        return {f: getattr(self, f) for f in _ARRAY_FIELDS if getattr(self, f) is not None}

    @property
    def has_linear(self) -> bool:
        return self.gram is not None or self.rows is not None

    def gram_matrix(self) -> jax.Array:
        """``XᵀX`` whichever form is stored (float32 or the stored dtype)."""
        if self.gram is not None:
            return jnp.asarray(self.gram)
        if self.rows is not None:
            rows = jnp.asarray(self.rows)
            return jnp.swapaxes(rows, -1, -2) @ rows
        raise MissingStatisticsError("no linear statistics stored")

    def to_gram(self) -> "LeafStats":
        """The same statistics with rows folded into a Gram."""
        if self.rows is None:
            return self
        rows = np.asarray(self.rows, np.float64)
        return dataclasses.replace(self, gram=(np.swapaxes(rows, -1, -2) @ rows).astype(np.float32), rows=None)


_ARRAY_FIELDS = ("count", "gram", "rows", "sq_sum")


def count_stats(n: float) -> LeafStats:
    """Only a row count (shift leaves, leaves in the forward path without other statistics)."""
    return LeafStats(count=np.float32(n))


def linear_stats(rows: Any, *, mask: Any = None, form: str = "auto") -> LeafStats:
    """Statistics of a linear layer's input ``rows`` ``(..., in)``; leading axes are flattened.

    Args:
      rows: ``(..., in)`` inputs.
      mask: optional bool ``(...)`` — False rows (padding) are dropped.
      form: ``"gram"``, ``"rows"`` or ``"auto"`` (rows while there are fewer rows than input dims).
    """
    x = np.asarray(rows, np.float32)
    x = x.reshape(-1, x.shape[-1])
    if mask is not None:
        x = x[np.asarray(mask, bool).reshape(-1)]
    n = x.shape[0]
    if form == "rows" or (form == "auto" and n < x.shape[1]):
        return LeafStats(count=np.float32(n), rows=x)
    if form not in ("auto", "gram", "rows"):
        raise ValueError(f"form must be 'auto', 'gram' or 'rows', got {form!r}")
    x64 = x.astype(np.float64)
    return LeafStats(count=np.float32(n), gram=(x64.T @ x64).astype(np.float32))


def scale_stats(normalized: Any, *, mask: Any = None) -> LeafStats:
    """Statistics of a norm scale: ``sq_sum = Σ_rows x̂²`` of the normalized input ``(..., d)``."""
    x = np.asarray(normalized, np.float64)
    x = x.reshape(-1, x.shape[-1])
    if mask is not None:
        x = x[np.asarray(mask, bool).reshape(-1)]
    return LeafStats(count=np.float32(x.shape[0]), sq_sum=np.sum(x * x, axis=0).astype(np.float32))


def is_leaf_stats(x: Any) -> bool:
    return isinstance(x, LeafStats)


def empty_stats(params: PyTree) -> PyTree:
    """A stats tree for ``params`` with every leaf unseen (``count=0``)."""
    return jax.tree.map(lambda _: count_stats(0), params)


def stats_from_arrays(params: PyTree, by_path: Mapping[str, LeafStats]) -> PyTree:
    """A stats tree mirroring ``params`` from a ``{path: LeafStats}`` mapping (absent paths: unseen).

    Raises ``KeyError`` for a path that is not a leaf of ``params`` (a typo would otherwise be silent).
    """
    known = {p for p, _ in leaves_with_paths(params)}
    unknown = sorted(set(by_path) - known)
    if unknown:
        raise KeyError(f"statistics given for '{unknown[0]}', which is not a leaf of the params tree")
    return map_with_path(lambda p, _: by_path.get(p, count_stats(0)), params)


def _sum_spec(a: LeafStats, b: LeafStats) -> LeafSpec | None:
    if a.spec is not None and b.spec is not None and a.spec != b.spec:
        raise RoleConflictError(f"adding statistics declared {describe(a.spec)} to ones declared {describe(b.spec)}: "
                                "they come from different model layouts")
    return a.spec if a.spec is not None else b.spec


def _add_leaf(a: LeafStats, b: LeafStats) -> LeafStats:
    """Union of two batches; stacked statistics (leading layer axes) add layer by layer."""
    spec = _sum_spec(a, b)
    count = (np.asarray(a.count if a.count is not None else 0, np.float64)
             + np.asarray(b.count if b.count is not None else 0, np.float64))
    count = np.float32(count) if count.ndim == 0 else count.astype(np.float32)
    sq_sum = a.sq_sum if b.sq_sum is None else (b.sq_sum if a.sq_sum is None else np.asarray(a.sq_sum) + np.asarray(b.sq_sum))
    gram = rows = None
    if a.has_linear or b.has_linear:
        if a.gram is None and b.gram is None:
            parts = [np.asarray(s.rows) for s in (a, b) if s.rows is not None]
            rows = np.concatenate(parts, axis=-2)
            if rows.shape[-2] >= rows.shape[-1]:  # the Gram is now the cheaper form
                rows64 = rows.astype(np.float64)
                gram, rows = (np.swapaxes(rows64, -1, -2) @ rows64).astype(np.float32), None
        else:
            gram = sum(np.asarray(s.gram_matrix()) for s in (a, b) if s.has_linear)
    return LeafStats(count=count, gram=gram, rows=rows, sq_sum=sq_sum, spec=spec)


def stats_add(a: PyTree, b: PyTree) -> PyTree:
    """Statistics of the union of two batches of rows (trees of :class:`LeafStats`)."""
    return jax.tree.map(_add_leaf, a, b, is_leaf=is_leaf_stats)


def accumulate(batches: Iterable[PyTree]) -> PyTree:
    """Fold an iterable of stats trees with :func:`stats_add`."""
    total = None
    for s in batches:
        total = s if total is None else stats_add(total, s)
    if total is None:
        raise MissingStatisticsError("accumulate() got no batches of statistics")
    return total


def check_stats(stats: PyTree, *, what: str = "stats") -> None:
    """Raise if any statistic holds NaN/Inf (naming the leaf)."""
    arrays = jax.tree.map(lambda s: s.arrays(), stats, is_leaf=is_leaf_stats)
    check_finite(arrays, what=what)


def save_stats(path: str | os.PathLike, stats: PyTree) -> None:
    """Write a stats tree to an ``.npz`` (atomically: temporary file, then rename). Keys are ``leaf-path|field``;
    a declared spec is a JSON string under ``leaf-path|spec``."""
    flat: dict[str, np.ndarray] = {}
    for p, leaf in leaves_with_paths(stats, is_leaf=is_leaf_stats):
        for field, value in leaf.arrays().items():
            flat[f"{p}|{field}"] = np.asarray(value)
        if leaf.spec is not None:
            flat[f"{p}|spec"] = np.asarray(json.dumps(spec_to_dict(leaf.spec)))
    with atomic_file(path, "wb") as f:
        np.savez(f, **flat)


def load_stats(path: str | os.PathLike, params: PyTree) -> PyTree:
    """Read a stats tree written by :func:`save_stats`, shaped like ``params``."""
    by_path: dict[str, dict[str, Any]] = {}
    with np.load(os.fspath(path)) as data:
        for key in data.files:
            p, field = key.rsplit("|", 1)
            value = data[key]
            by_path.setdefault(p, {})[field] = spec_from_dict(json.loads(str(value))) if field == "spec" else value
    return stats_from_arrays(params, {p: LeafStats(**fields) for p, fields in by_path.items()})


def stats_specs(stats: PyTree) -> dict[str, LeafSpec]:
    """``{leaf path: LeafSpec}`` of the specs a stats tree carries (leaves whose model declares one)."""
    return {p: s.spec for p, s in leaves_with_paths(stats, is_leaf=is_leaf_stats) if s.spec is not None}


def stats_declarations(stats: Any) -> list[tuple[str, dict[str, LeafSpec]]]:
    """``[("stats[k]", {leaf path: LeafSpec})]`` for K stats trees (``[]`` for ``None``), ready for
    :func:`catmerge_jax.roles.union_declared`, which checks that they agree leaf by leaf."""
    if not isinstance(stats, (list, tuple)):
        return []
    return [(f"stats[{k}]", stats_specs(s)) for k, s in enumerate(stats)]


def with_specs(stats: PyTree, specs: Mapping[str, LeafSpec]) -> PyTree:
    """``stats`` with ``specs`` (``{leaf path: LeafSpec}``) stored on the named leaves (others unchanged).

    >>> s = with_specs({"qkv": {"kernel": count_stats(3)}}, {"qkv/kernel": LeafSpec(Role.LINEAR, out_blocks=3)})
    >>> stats_specs(s)["qkv/kernel"].out_blocks
    3
    """
    if not specs:
        return stats
    return map_with_path(lambda p, s: dataclasses.replace(s, spec=specs[p]) if p in specs else s, stats,
                         is_leaf=is_leaf_stats)
