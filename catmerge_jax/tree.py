"""Task-vector algebra on arbitrary pytrees.

Works for any pytree of arrays: Flax linen param dicts, ``nnx.State``, equinox-style trees, plain
nested dicts/lists/tuples. Nothing here knows about models or roles.

>>> import jax.numpy as jnp
>>> import catmerge_jax as cm
>>> w0 = {"dense": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}
>>> w1 = cm.tree_add(w0, cm.tree_scale(cm.tree_ones_like(w0), 2.0))
>>> tv = cm.tree_sub(w1, w0)
>>> float(tv["dense"]["bias"][0])
2.0
>>> stacked = cm.tree_stack([tv, tv])            # leaves get a leading task axis of size 2
>>> stacked["dense"]["kernel"].shape
(2, 2, 3)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.errors import NonFiniteError, TreeMismatchError

PyTree = Any
KeyPath = tuple

_WRAPPER_KEYS = ("value", "raw_value")  # nnx VariableState attributes, not part of the logical name


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: KeyPath) -> str:
    """A key path as a ``/``-joined string, e.g. ``('params', 'dense', 'kernel')`` → ``params/dense/kernel``.

    The attribute keys that ``nnx`` variables add (``.value``) are dropped so that linen and nnx trees
    with the same modules give the same names.
    """
    names = [_key_name(k) for k in path]
    while names and names[-1] in _WRAPPER_KEYS and len(names) > 1:
        names.pop()
    return "/".join(names)


def leaves_with_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """``[(path_str, leaf), ...]`` in the tree's flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), leaf) for p, leaf in flat]


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree,
                  is_leaf: Callable[[Any], bool] | None = None) -> PyTree:
    """``jax.tree_util.tree_map_with_path`` with the path given as a string."""
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_str(p), *xs), tree, *rest, is_leaf=is_leaf)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a - b``: the task vector of fine-tuned ``a`` over pretrained ``b``."""
    return jax.tree.map(lambda x, y: x - y, a, b)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a + b``."""
    return jax.tree.map(lambda x, y: x + y, a, b)


def tree_scale(tree: PyTree, scalar: float | jax.Array) -> PyTree:
    """Every leaf multiplied by ``scalar`` (keeping the leaf's dtype)."""
    return jax.tree.map(lambda x: (x * scalar).astype(x.dtype), tree)


def tree_zeros_like(tree: PyTree) -> PyTree:
    """A tree of the same structure, shapes and dtypes, all zeros."""
    return jax.tree.map(jnp.zeros_like, tree)


def tree_ones_like(tree: PyTree) -> PyTree:
    """A tree of the same structure, shapes and dtypes, all ones."""
    return jax.tree.map(jnp.ones_like, tree)


def tree_sum(trees: Sequence[PyTree]) -> PyTree:
    """Leafwise sum of a non-empty sequence of trees with the same structure."""
    if len(trees) == 0:
        raise ValueError("tree_sum needs at least one tree")
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def tree_mean(trees: Sequence[PyTree]) -> PyTree:
    """Leafwise mean of a non-empty sequence of trees."""
    total = tree_sum(trees)
    return jax.tree.map(lambda x: (x / len(trees)).astype(x.dtype), total)


def tree_stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack K trees into one whose leaves have a leading task axis of size K."""
    if len(trees) == 0:
        raise ValueError("tree_stack needs at least one tree")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def tree_unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`tree_stack`: split the leading axis of every leaf into a list of K trees."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return []
    k = leaves[0].shape[0]
    return [jax.tree.unflatten(treedef, [leaf[i] for leaf in leaves]) for i in range(k)]


def task_vectors(pretrained: PyTree, finetuned: Sequence[PyTree]) -> list[PyTree]:
    """``[W_k - W0 for W_k in finetuned]`` after checking every tree matches ``pretrained``."""
    for k, tree in enumerate(finetuned):
        check_same_structure(pretrained, tree, what=f"finetuned[{k}]")
    return [tree_sub(w, pretrained) for w in finetuned]


def tree_allclose(a: PyTree, b: PyTree, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """True when the trees have the same structure and every leaf pair is ``allclose``."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.shape(x) == np.shape(y) and np.allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                                   rtol=rtol, atol=atol)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def tree_max_abs_diff(a: PyTree, b: PyTree) -> dict[str, float]:
    """``{path: max |a - b|}`` for every leaf (trees must match)."""
    check_same_structure(a, b, what="b", check_dtype=False)
    return {p: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
            for (p, x), (_, y) in zip(leaves_with_paths(a), leaves_with_paths(b))}


def check_same_structure(reference: PyTree, other: PyTree, *, what: str = "tree", check_dtype: bool = True) -> None:
    """Raise :class:`TreeMismatchError` naming the first leaf path where ``other`` differs from ``reference``.

    Compares the set of leaf paths, then each leaf's shape and (optionally) dtype.
    """
    ref = leaves_with_paths(reference)
    oth = leaves_with_paths(other)
    ref_paths = [p for p, _ in ref]
    oth_paths = [p for p, _ in oth]
    if ref_paths != oth_paths:
        missing = [p for p in ref_paths if p not in set(oth_paths)]
        extra = [p for p in oth_paths if p not in set(ref_paths)]
        for wrapped, side in ((oth_paths, what), (ref_paths, "the reference")):
            other = ref_paths if wrapped is oth_paths else oth_paths
            if wrapped and other and all(p.startswith("params/") for p in wrapped) and \
                    [p[len("params/"):] for p in wrapped] == other:
                raise TreeMismatchError(f"{what}: {side} is wrapped in {{'params': ...}} and the other tree is not; "
                                        "pass both as the inner params tree (tree['params'])")
        if missing:
            raise TreeMismatchError(f"{what}: leaf '{missing[0]}' is missing (expected the same tree structure as the "
                                    f"reference; {len(missing)} missing, {len(extra)} extra)")
        if extra:
            raise TreeMismatchError(f"{what}: unexpected leaf '{extra[0]}' (not in the reference tree; "
                                    f"{len(extra)} extra)")
        raise TreeMismatchError(f"{what}: tree structure differs from the reference "
                                f"(expected {jax.tree.structure(reference)}, got {jax.tree.structure(other)})")
    if jax.tree.structure(reference) != jax.tree.structure(other):
        raise TreeMismatchError(f"{what}: container types differ from the reference although the leaf paths agree "
                                f"(expected {jax.tree.structure(reference)}, got {jax.tree.structure(other)})")
    for (path, x), (_, y) in zip(ref, oth):
        if np.shape(x) != np.shape(y):
            raise TreeMismatchError(f"{what}: leaf '{path}' has shape {tuple(np.shape(y))}, expected "
                                    f"{tuple(np.shape(x))}")
        if check_dtype and jnp.result_type(x) != jnp.result_type(y):
            raise TreeMismatchError(f"{what}: leaf '{path}' has dtype {jnp.result_type(y)}, expected "
                                    f"{jnp.result_type(x)}")


def compute_dtype(dtype: Any) -> Any:
    """The dtype merges compute in: float leaves of at least 32 bits keep theirs, narrower floats (bf16, f16) use
    float32, non-floats are unchanged. (Not ``jnp.promote_types``: under strict dtype promotion it refuses
    float64 with float32.)"""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)
    return dtype


def is_tracer(x: Any) -> bool:
    """True for a JAX tracer (a value inside ``jit``/``vmap``/``grad`` that the host cannot read)."""
    return isinstance(x, jax.core.Tracer)


def is_concrete(tree: PyTree) -> bool:
    """True when no leaf of ``tree`` is a tracer, so value checks (NaN/Inf, ranges) can run on the host."""
    return not any(is_tracer(x) for x in jax.tree.leaves(tree))


def check_finite(tree: PyTree, *, what: str = "tree") -> None:
    """Raise :class:`NonFiniteError` naming the first leaf that holds NaN or Inf.

    Leaves that are tracers (inside ``jax.jit``/``vmap``/``grad``) are skipped: their values do not exist yet.
    """
    for path, leaf in leaves_with_paths(tree):
        if is_tracer(leaf):
            continue
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) or arr.dtype.name == "bfloat16":
            if not np.issubdtype(arr.dtype, np.inexact):  # NumPy's isfinite does not take ml_dtypes' bfloat16
                arr = arr.astype(np.float32)
            if not np.all(np.isfinite(arr)):
                bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
                raise NonFiniteError(f"{what}: leaf '{path}' holds {bad} NaN/Inf value(s); weights and statistics "
                                     "must be finite")


def tree_paths(tree: PyTree) -> list[str]:
    """The leaf paths of ``tree`` as strings, in flattening order."""
    return [p for p, _ in leaves_with_paths(tree)]


def nest_paths(flat: Mapping[str, Any]) -> dict:
    """Nested dicts from ``{"a/b/c": leaf}`` (the ``/``-joined paths :func:`path_str` writes for dict trees).

    >>> nest_paths({"layer/kernel": 1, "layer/bias": 2, "scale": 3})
    {'layer': {'kernel': 1, 'bias': 2}, 'scale': 3}
    """
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *mods, name = path.split("/")
        for m in mods:
            node = node.setdefault(m, {})
        node[name] = value
    return tree


def gather(x: jax.Array) -> jax.Array:
    """A sharded group result as one array on the default device (all processes' shards on multi-host)."""
    if x.is_fully_addressable:
        return jax.device_put(np.asarray(x))  # not jnp.asarray: that compiles a program per shape for NumPy input
    from jax.experimental import multihost_utils

    return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))
