"""The leaf plumbing shared by the matrix merges (TSV-M, Iso-C, Iso-CTS, WUDI): which leaf gets what.

A matrix merge is a function of one layer's stacked task matrices in the papers' ``(out, in)`` orientation,
``layer_fn(tvs: (K, out, in)) -> (out, in)``, the merged task vector of that layer. :func:`matrix_merge` maps
it over a params tree the way FusionBench (the reference implementations these methods are compared with) does:

* every LINEAR leaf (:mod:`catmerge_jax.roles`: Dense/DenseGeneral/Conv kernels, stacked ``nn.scan`` layers,
  equinox ``(out, in)`` weights, fused ``q|k|v`` blocks) is read as its per-layer ``(in, out)`` matrices by
  :meth:`~catmerge_jax.roles.LeafSpec.matrices` and handed to ``layer_fn`` transposed, i.e. as PyTorch's
  ``(out, in)`` weight, the orientation of the papers (Iso-CTS and WUDI are not transpose-invariant);
* with ``matrices="all_2d"`` (the default) every other 2-D leaf of role OTHER — embedding tables, position
  tables — gets ``layer_fn`` too, as stored: Flax's ``Embed`` table ``(vocab, dim)`` is laid out as PyTorch's
  ``nn.Embedding.weight``, so no transpose; ``matrices="linear"`` keeps those on the rule below;
* every other leaf becomes ``W0 + α·mean_k T_k`` (``rest="mean"``), or stays at ``W0`` (``rest="pretrained"``,
  the variant of WUDI's ViT code, which merges only linear weights).

The merged matrix leaf is ``W0 + α·layer_fn(T)``. Layers of one shape — across leaves and across the stacked
layers of a leaf — run as one ``vmap`` of ``layer_fn`` inside one ``jit``, so a 12-block model compiles each
distinct layer shape once. Everything is traceable: the whole merge runs under ``jax.jit`` with params and α
traced, under ``vmap`` over α and under ``grad`` w.r.t. α.

Concrete inputs on the CPU (NumPy arrays, as ``catmerge merge`` loads them) take a host path instead: the leaf
arithmetic in NumPy, with no program compiled per leaf shape, and, for a method that gives a NumPy twin of its
layer function (``host_layer_fn``; TSV-M does), every float32 layer solved on the host, one layer per core
(:func:`each_layer`). ``catmerge_jax.linalg.accelerator_paths`` turns the host path off (tests compare the two).

>>> import jax.numpy as jnp
>>> from catmerge_jax.methods.layerwise import matrix_merge
>>> w0 = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
>>> fts = [{"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}] * 2
>>> merged = matrix_merge(w0, fts, lambda tvs: tvs.sum(0), alpha=0.5)   # task arithmetic, written as a layer_fn
>>> merged["dense"]["kernel"][0].tolist(), merged["dense"]["bias"].tolist()
([1.0, 1.0], [0.5, 0.5])
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax import hostlapack
from catmerge_jax.cat import _combined_roles, finetuned_list, params_view, validate_inputs
from catmerge_jax.errors import HyperparameterError
from catmerge_jax.roles import LeafSpec, Overrides, Role, classify, is_spec
from catmerge_jax.tree import PyTree, is_concrete, is_tracer, leaves_with_paths

LayerFn = Callable[[jax.Array], jax.Array]

MATRICES = ("all_2d", "linear")
REST = ("mean", "pretrained")


def compute_dtype(x: Any) -> np.dtype:
    """float32 for bf16/f16 leaves (SVDs and Adam run in float32), else the leaf's own float dtype."""
    dt = np.dtype(jnp.result_type(x))
    return dt if jnp.issubdtype(dt, jnp.floating) and dt.itemsize >= 4 else np.dtype(np.float32)


def polar(a: jax.Array) -> jax.Array:
    """The orthonormal polar factor ``P Qᵀ`` of ``a = P S Qᵀ`` ``(..., m, p)``, ``m ≥ p``: the closest matrix with
    orthonormal columns (orthogonal Procrustes). One thin SVD of the ``(m, p)`` factor, never an ``m × m`` one."""
    p, _, qt = jnp.linalg.svd(a, full_matrices=False)
    return p @ qt


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise HyperparameterError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_alpha(alpha: Any, method: str) -> None:
    """α is a scale; a concrete NaN/Inf is a user error (a traced α is checked by nobody: it has no value)."""
    if is_concrete(alpha) and not bool(np.isfinite(np.asarray(alpha, np.float64)).all()):
        raise HyperparameterError(f"{method} alpha must be finite, got {alpha}")


def _matrix_view(spec: LeafSpec, leaf: Any, matrices: str) -> str | None:
    """``"linear"`` (kernel, transposed to (out, in)), ``"table"`` (2-D OTHER leaf, as stored) or None."""
    if spec.role is Role.LINEAR:
        return "linear"
    if matrices == "all_2d" and spec.role is Role.OTHER and np.ndim(leaf) == 2:
        return "table"
    return None


@functools.partial(jax.jit, static_argnames=("layer_fn", "options"))
def _run_group(stack: jax.Array, layer_fn: LayerFn, options: tuple) -> jax.Array:
    """``(K, L, out, in) -> (L, out, in)``: one layer function vmapped over L same-shape layers."""
    return jax.vmap(functools.partial(layer_fn, **dict(options)), in_axes=1)(stack)


def on_host(leaves: Sequence[Any]) -> bool:
    """True when every leaf is a concrete array the CPU holds (NumPy, or a JAX array on a CPU device) and the
    accelerator branches are not forced (:func:`catmerge_jax.linalg.accelerator_paths`): the merge may then run in
    NumPy, with no compiled program per leaf shape."""
    from catmerge_jax.linalg import accelerator_paths_enabled

    if accelerator_paths_enabled():
        return False
    for x in leaves:
        if isinstance(x, (np.ndarray, np.generic, int, float)):
            continue
        if not isinstance(x, jax.Array) or is_tracer(x) or any(d.platform != "cpu" for d in x.devices()):
            return False
    return True


def each_layer(fn: Callable[[np.ndarray], np.ndarray], problems: Sequence[np.ndarray],
               threads: int | None = None) -> list[np.ndarray]:
    """``[fn(p) for p in problems]``, the problems spread over the cores: ``threads`` (default: the cores this
    process may use) worker threads, each with a one-thread BLAS (NumPy's LAPACK calls release the GIL; one problem
    per core beats one problem on a multithreaded BLAS at these sizes, see :mod:`catmerge_jax.hostlapack`).
    The biggest problems start first, so that one large layer does not finish alone at the end."""
    threads = min(hostlapack.workers() if threads is None else threads, len(problems))
    order = sorted(range(len(problems)), key=lambda i: -problems[i].size)
    results: list[Any] = [None] * len(problems)

    def run(i):
        results[i] = fn(problems[i])

    hostlapack.spread(run, order, threads)
    return results


def _scale(alpha: Any, dtype: np.dtype, host: bool):
    # a concrete α in the compute dtype, as JAX would cast a scalar (NumPy 2 would promote a float64 α instead)
    return np.asarray(alpha).astype(dtype) if host and is_concrete(alpha) else alpha


def _task_matrices_host(base: np.ndarray, weights: Sequence[Any], dt: np.dtype) -> np.ndarray:
    """``(K, *shape)``: ``W_k − W0`` in ``dt``, written straight into one new array (no cast copies of float32
    leaves, no stack of temporaries)."""
    out = np.empty((len(weights),) + base.shape, dt)
    b = base.astype(dt, copy=False)
    for k, w in enumerate(weights):
        np.subtract(np.asarray(w).astype(dt, copy=False), b, out=out[k])
    return out


def _combine(base: Any, delta: Any, alpha: Any, host: bool) -> Any:
    """``W0 + α·Δ`` in ``Δ``'s dtype, cast back to the leaf's; NumPy on the host (α concrete), else JAX."""
    dt = delta.dtype
    if host and is_concrete(alpha):
        base = np.asarray(base)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is inf, which the callers' checks name
            out = _scale(alpha, dt, host) * delta
            out += base.astype(dt, copy=False)         # (the sum is commutative, bit for bit: W0 + α·Δ)
        return out.astype(base.dtype, copy=False)
    base = jnp.asarray(base)
    return (base.astype(dt) + alpha * delta).astype(base.dtype)


def matrix_merge(pretrained: PyTree, finetuned: Sequence[PyTree], layer_fn: LayerFn, *, alpha: Any = 1.0,
                 options: dict | None = None, matrices: str = "all_2d", rest: str = "mean",
                 roles: Overrides = None, progress: bool = False, desc: str = "merge",
                 host_layer_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> PyTree:
    """``W0 + α·layer_fn(T)`` on matrix leaves, ``W0 + α·mean_k T_k`` (or ``W0``) elsewhere.

    Args:
      pretrained: ``W0``; fixes structure, roles and output dtypes.
      finetuned: K trees of the same structure.
      layer_fn: ``(K, out, in) -> (out, in)``, pure and traceable; a module-level function, so that compiled
        groups are cached across calls.
      options: static keyword arguments of ``layer_fn`` (ranks, step counts: Python values).
      alpha: scale of the merged task vector (may be traced).
      matrices: ``"all_2d"`` (LINEAR leaves and 2-D OTHER leaves such as embedding tables) or ``"linear"``.
      rest: ``"mean"`` (``W0 + α·mean_k T_k``) or ``"pretrained"`` (``W0``) for every leaf that is not a matrix.
      roles: overrides for :func:`catmerge_jax.roles.classify`.
      progress: a tqdm bar over the groups of same-shape layers (over the layers on the host path).
      host_layer_fn: optional NumPy twin of ``layer_fn`` for one float32 layer ``(K, out, in) -> (out, in)``
        (taking ``options`` too). When every input leaf is a concrete array on the CPU (:func:`on_host`), the
        leaf arithmetic runs in NumPy (no program compiled per leaf shape), and float32 layers go to
        ``host_layer_fn``, spread over the cores (:func:`each_layer`); other layers still run ``layer_fn``.
    Returns:
      The merged params: same structure, shapes and dtypes as ``pretrained``. On the host path the leaves of a
      NumPy ``pretrained`` stay NumPy arrays.
    """
    check_choice("matrices", matrices, MATRICES)
    check_choice("rest", rest, REST)
    inputs = params_view(pretrained)
    finetuned = [params_view(f).params for f in finetuned_list(finetuned)]
    pretrained = inputs.params
    validate_inputs(pretrained, finetuned)
    check_alpha(alpha, desc)
    specs = [s for _, s in leaves_with_paths(classify(pretrained, _combined_roles(inputs.roles, roles)),
                                             is_leaf=is_spec)]
    base_leaves, treedef = jax.tree.flatten(pretrained)
    columns = list(zip(*[jax.tree.leaves(ft) for ft in finetuned]))
    host = on_host(base_leaves) and all(on_host(c) for c in columns)
    xp = np if host else jnp
    static = dict(options or {})

    out: list[Any] = [None] * len(base_leaves)
    # group key (out, in, dtype) -> [(leaf index, view, (K, L, out, in) stack)]
    groups: dict[tuple, list[tuple[int, str, Any]]] = {}
    for j, (base, spec) in enumerate(zip(base_leaves, specs)):
        base = xp.asarray(base)
        dt = compute_dtype(base)
        tvs = _task_matrices_host(base, columns[j], dt) if host else jnp.stack(
            [jnp.asarray(w).astype(dt) - base.astype(dt) for w in columns[j]])
        view = _matrix_view(spec, base, matrices)
        if view is None:
            delta = tvs.mean(0) if rest == "mean" else xp.zeros_like(tvs[0])
            out[j] = _combine(base, delta, alpha, host)
            continue
        if view == "linear":
            stack = spec.matrices(tvs, lead=1).swapaxes(-1, -2)       # (K, layers, out, in)
        else:
            stack = tvs[:, None]                                       # (K, 1, rows, cols) as stored
        groups.setdefault((stack.shape[-2], stack.shape[-1], dt), []).append((j, view, stack))

    merged_groups: dict[tuple, Any] = {}
    on_cores = {key: members for key, members in groups.items()
                if host and host_layer_fn is not None and key[2] == np.float32}
    if on_cores:  # every float32 layer of every group, one problem each, spread over the cores
        layers = [(key, np.ascontiguousarray(stack[:, i])) for key, members in on_cores.items()
                  for _, _, stack in members for i in range(stack.shape[1])]
        bar = _bar(progress, len(layers), desc, "layer")
        solve = functools.partial(_host_one, functools.partial(host_layer_fn, **static), bar)
        results = iter(each_layer(solve, [p for _, p in layers]))
        if bar is not None:
            bar.close()
        for key, members in on_cores.items():
            merged_groups[key] = np.stack([next(results) for _, _, stack in members for _ in range(stack.shape[1])])
    items = [(key, members) for key, members in groups.items() if key not in on_cores]
    bar = _bar(progress and bool(items), len(items), desc, "shape")
    for key, members in items:
        stack = jnp.concatenate([jnp.asarray(m[2]) for m in members], axis=1)
        merged = _run_group(stack, layer_fn, tuple(sorted(static.items())))  # (L_total, out, in)
        merged_groups[key] = np.asarray(merged) if host else merged
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()

    for key, members in groups.items():
        merged, start = merged_groups[key], 0
        for j, view, part in members:
            n = part.shape[1]
            delta = merged[start:start + n]
            start += n
            if view == "linear":
                delta = specs[j].from_matrices(delta.swapaxes(-1, -2), np.shape(base_leaves[j]))
            else:
                delta = delta[0]
            out[j] = _combine(base_leaves[j], delta, alpha, host)
    if host:  # JAX arrays in, JAX arrays out (NumPy leaves stay NumPy)
        out = [jnp.asarray(o) if isinstance(b, jax.Array) else o for o, b in zip(out, base_leaves)]
    return inputs.rebuild(jax.tree.unflatten(treedef, out))


def _bar(show: bool, total: int, desc: str, unit: str):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def _host_one(fn: Callable[[np.ndarray], np.ndarray], bar, problem: np.ndarray) -> np.ndarray:
    result = fn(problem)
    if bar is not None:
        bar.update()  # tqdm's update is thread-safe
    return result


__all__ = ["matrix_merge", "on_host", "each_layer", "polar", "compute_dtype", "check_choice", "check_alpha", "MATRICES", "REST"]
