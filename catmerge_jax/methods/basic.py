"""Baselines that need no exemplars: weight averaging, task arithmetic, TIES-Merging.

>>> import jax.numpy as jnp
>>> import catmerge_jax as cm
>>> w0 = {"w": jnp.zeros(4)}
>>> fts = [{"w": jnp.array([1.0, -2.0, 0.1, 0.0])}, {"w": jnp.array([1.0, 1.0, -0.1, 0.0])}]
>>> cm.task_arithmetic(w0, fts, alpha=0.5)["w"].tolist()
[1.0, -0.5, 0.0, 0.0]
>>> cm.ties_merge(w0, fts, k=0.5, alpha=1.0, per_tensor=True)["w"].tolist()
[1.0, -2.0, 0.0, 0.0]
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.cat import cat_merge, check_scalar, finetuned_list, params_view, validate_inputs
from catmerge_jax.errors import HyperparameterError
from catmerge_jax.methods.pcb import order_statistics
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.tree import PyTree, compute_dtype, is_concrete, is_tracer


def _compute_dtype(x: jax.Array):
    return compute_dtype(x.dtype)


def _cast(x, dtype):
    # NumPy leaves stay NumPy (float64 params keep float64 without jax_enable_x64); arrays and tracers cast as usual
    return x.astype(dtype) if hasattr(x, "astype") else jnp.asarray(x, dtype)


def _like_inputs(leaves: list[np.ndarray], base_leaves: Sequence) -> list:
    """NumPy leaves for NumPy inputs, JAX arrays for JAX inputs (the host paths' outputs)."""
    return [jnp.asarray(x) if isinstance(b, jax.Array) else x for x, b in zip(leaves, base_leaves)]


def _views(pretrained, finetuned):
    """Validated plain params trees of the inputs, and how to rebuild the caller's kind of object."""
    view = params_view(pretrained)
    fts = [params_view(f).params for f in finetuned_list(finetuned)]
    validate_inputs(view.params, fts)
    return view, fts


def weight_average(pretrained: PyTree, finetuned: Sequence[PyTree]) -> PyTree:
    """``(1/K) Σ_k W_k`` (Wortsman et al., 2022 "model soups"), leaf dtypes kept."""
    view, fts = _views(pretrained, finetuned)

    def merge(w0, *ws):
        dt = _compute_dtype(w0)
        return (sum(_cast(w, dt) for w in ws) / len(ws)).astype(w0.dtype)

    return view.rebuild(jax.tree.map(merge, view.params, *fts))


def task_arithmetic(pretrained: PyTree, finetuned: Sequence[PyTree], *, alpha: float = 0.3) -> PyTree:
    """``W0 + α Σ_k (W_k − W0)`` (Ilharco et al., 2023); ``alpha`` may be traced (jit/vmap/grad)."""
    check_scalar("alpha", alpha)
    view, fts = _views(pretrained, finetuned)

    def merge(w0, *ws):
        dt = _compute_dtype(w0)
        base = _cast(w0, dt)
        # a huge alpha overflows the cast back to the leaf dtype: the result is inf, which the callers' finiteness
        # checks report by leaf name; NumPy's own RuntimeWarning would only add an unnamed line
        with np.errstate(over="ignore", invalid="ignore"):
            return (base + alpha * sum(_cast(w, dt) - base for w in ws)).astype(w0.dtype)

    return view.rebuild(jax.tree.map(merge, view.params, *fts))


def _kth_largest_abs(leaves: Sequence[jax.Array], keep: float) -> jax.Array:
    """Threshold so that the top ``keep`` fraction of |x| over all ``leaves`` lies at or above it."""
    if all(_on_cpu(x) for x in leaves):  # NumPy gathers the entries without a compiled program per leaf shape
        flat = np.concatenate([np.abs(np.asarray(x)).reshape(-1) for x in leaves])
    else:
        flat = jnp.concatenate([jnp.abs(x).reshape(-1) for x in leaves])
    n_keep = int(np.ceil(keep * flat.size))
    if n_keep <= 0:
        return jnp.asarray(jnp.inf, flat.dtype)
    # a selection, not a top_k: top_k of millions of entries is very slow on XLA:CPU
    return order_statistics(flat[None], [flat.size - n_keep])[0, 0]


def _on_cpu(x) -> bool:
    """A concrete array on the CPU (NumPy, or a JAX array there): the host can read it without a transfer."""
    if isinstance(x, np.ndarray):
        return True
    return isinstance(x, jax.Array) and not is_tracer(x) and all(d.platform == "cpu" for d in x.devices())


@jax.jit
def _task_vector_leaves(base_leaves: list, task_leaves: list) -> list[jax.Array]:
    """``W_k − W0`` of every leaf in its compute dtype: one program for the whole tree."""
    return [jnp.asarray(w).astype(_compute_dtype(b)) - jnp.asarray(b).astype(_compute_dtype(b))
            for w, b in zip(task_leaves, base_leaves)]


@jax.jit
def _kept(leaves: list, thresholds: list) -> list[jax.Array]:
    """Each leaf with the entries below its threshold (in magnitude) set to 0: one program for the whole tree."""
    return [jnp.where(jnp.abs(x) >= t, x, 0) for x, t in zip(leaves, thresholds)]


@jax.jit
def ties_disjoint_merge(trimmed: jax.Array) -> jax.Array:
    """TIES steps 2–3 on trimmed task vectors ``(K, ...)``: elect the sign by total mass, average the agreeing ones."""
    sign = jnp.sign(trimmed.sum(0))
    agree = (jnp.sign(trimmed) == sign[None]) & (trimmed != 0)
    count = agree.sum(0)
    total = jnp.where(agree, trimmed, 0).sum(0)
    return jnp.where(count > 0, total / jnp.maximum(count, 1).astype(trimmed.dtype), 0)


def ties_trim(pretrained: PyTree, finetuned: Sequence[PyTree], *, k: float = 0.2,
              per_tensor: bool = False) -> list[PyTree]:
    """TIES step 1 alone: each task vector keeps its top ``k`` fraction by magnitude (K trees, compute dtype).

    The input of AdaMerging++ (``cm.adamerging`` over these trimmed vectors). ``k`` is static.
    """
    _check_k(k)
    view, fts = _views(pretrained, finetuned)
    base_leaves, treedef = jax.tree.flatten(view.params)
    task_leaves = [jax.tree.leaves(ft) for ft in fts]
    if _host_ready(base_leaves, task_leaves):
        return [jax.tree.unflatten(treedef, _like_inputs(t, base_leaves))
                for t in _trim_host(base_leaves, task_leaves, k, per_tensor)]
    trimmed = []
    for ft in fts:
        leaves = _task_vector_leaves(base_leaves, jax.tree.leaves(ft))
        if per_tensor:
            thresholds = [_kth_largest_abs([x], k) for x in leaves]
        else:
            thresholds = [_kth_largest_abs(leaves, k)] * len(leaves)
        trimmed.append(jax.tree.unflatten(treedef, _kept(leaves, thresholds)))
    return trimmed


def ties_merge(pretrained: PyTree, finetuned: Sequence[PyTree], *, k: float = 0.2, alpha: float = 1.0,
               per_tensor: bool = False) -> PyTree:
    """TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean.

    Args:
      k: fraction of each task vector kept by magnitude (0.2 = top 20%), over the whole model (as in the
        TIES paper) or per tensor with ``per_tensor=True``. Entries equal to the threshold are kept. Static.
      alpha: scale of the merged task vector (the paper's λ; 1 by default); may be traced.
    """
    check_scalar("alpha", alpha)
    view = params_view(pretrained)
    base_leaves, treedef = jax.tree.flatten(view.params)
    task_leaves = [jax.tree.leaves(params_view(f).params) for f in finetuned_list(finetuned)]
    if is_concrete(alpha) and _host_ready(base_leaves, task_leaves):
        _check_k(k)
        validate_inputs(view.params, [params_view(f).params for f in finetuned_list(finetuned)])
        merged = _ties_host(base_leaves, task_leaves, k, per_tensor, alpha)
        return view.rebuild(jax.tree.unflatten(treedef, _like_inputs(merged, base_leaves)))
    trimmed = ties_trim(pretrained, finetuned, k=k, per_tensor=per_tensor)
    merged = _ties_combine(base_leaves, [jax.tree.leaves(t) for t in trimmed], alpha)
    return view.rebuild(jax.tree.unflatten(treedef, merged))


@jax.jit
def _ties_combine(base_leaves: list, trimmed_leaves: list[list], alpha) -> list[jax.Array]:
    """``W0 + α·τ`` of every leaf, ``τ`` the disjoint merge of the trimmed task vectors: one program for the tree."""
    merged = []
    for j, base in enumerate(base_leaves):
        base = jnp.asarray(base)
        tau = ties_disjoint_merge(jnp.stack([t[j] for t in trimmed_leaves]))
        merged.append((base.astype(tau.dtype) + alpha * tau).astype(base.dtype))
    return merged


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float, np.number)) or not 0.0 <= float(k) <= 1.0:
        raise HyperparameterError(f"ties k (fraction kept) must be a number in [0, 1], got {k!r}")


# ---------------------------------------------------------------------------------------------------------------
# TIES on the host: concrete float32 inputs on the CPU. The same arithmetic in the same order as the programs
# above (bit-identical results), in NumPy: no program compiled per call or leaf shape, the element-wise work in
# cache-sized pieces spread over the cores, and no K copies of the model (the pieces read the weights directly).
# ---------------------------------------------------------------------------------------------------------------

CHUNK = 1 << 18
"""Entries per piece of element-wise work handed to a worker thread (NumPy's ufuncs release the GIL)."""


def _host_ready(base_leaves: Sequence, task_leaves: Sequence[Sequence]) -> bool:
    """The host path applies: every leaf concrete on the CPU, not forced onto the accelerator branches, and float32
    the compute dtype of every leaf (float32/bf16/f16; float64 keeps the programs' promotion rules)."""
    from catmerge_jax.methods.layerwise import on_host

    if not base_leaves or not (on_host(base_leaves) and all(on_host(t) for t in task_leaves)):
        return False
    return all(compute_dtype(getattr(b, "dtype", None) or np.result_type(b)) == np.float32 for b in base_leaves)


def _each_piece(fn, sizes: Sequence[int]) -> None:
    """``fn(j, slice)`` over every leaf ``j`` (raveled, ``sizes[j]`` entries) in :data:`CHUNK`-sized pieces, spread
    over the cores."""
    from catmerge_jax.hostlapack import workers

    pieces = [(j, slice(i, min(i + CHUNK, n))) for j, n in enumerate(sizes) for i in range(0, n, CHUNK)]
    threads = min(workers(), len(pieces))
    if threads <= 1:
        for piece in pieces:
            fn(*piece)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda piece: fn(*piece), pieces))  # list(): re-raises a worker's exception here


def _raveled(leaves: Sequence) -> list[np.ndarray]:
    return [np.asarray(x).reshape(-1) for x in leaves]


def _task_vector(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``W_k − W0`` of one piece, float32 (as :func:`_task_vector_leaves`)."""
    return w.astype(np.float32) - b.astype(np.float32)


def _kth_largest_host(magnitudes: np.ndarray, keep: float) -> np.floating:
    """:func:`_kth_largest_abs` of one vector of magnitudes (the same entry: ``np.partition`` is what it runs on the
    CPU); ``magnitudes`` is reordered in place."""
    n_keep = int(np.ceil(keep * magnitudes.size))
    if n_keep <= 0:
        return np.float32(np.inf)
    position = magnitudes.size - n_keep
    magnitudes.partition(position)
    return magnitudes[position]


def _thresholds_host(base: list[np.ndarray], task_leaves: Sequence[Sequence], keep: float,
                     per_tensor: bool) -> list[list]:
    """Per task, per leaf, the trimming threshold of TIES step 1 (model-wide: the same for every leaf)."""
    sizes = [b.size for b in base]
    starts = np.cumsum([0] + sizes)
    scratch = np.empty(int(starts[-1]), np.float32)  # one buffer of magnitudes, reused for every task
    thresholds = []
    for leaves in task_leaves:
        task = _raveled(leaves)

        def magnitudes(j, c, task=task):
            np.abs(_task_vector(task[j][c], base[j][c]), out=scratch[starts[j] + c.start:starts[j] + c.stop])

        _each_piece(magnitudes, sizes)
        if per_tensor:
            thresholds.append([_kth_largest_host(scratch[a:b], keep) for a, b in zip(starts[:-1], starts[1:])])
        else:
            thresholds.append([_kth_largest_host(scratch, keep)] * len(base))
    return thresholds


def _trim_host(base_leaves: Sequence, task_leaves: Sequence[Sequence], keep: float,
               per_tensor: bool) -> list[list[np.ndarray]]:
    """:func:`ties_trim`'s K lists of leaves (float32) on the host."""
    base = _raveled(base_leaves)
    thresholds = _thresholds_host(base, task_leaves, keep, per_tensor)
    out = [[np.empty(np.shape(b), np.float32) for b in base_leaves] for _ in task_leaves]

    def trim(j, c):
        for k, leaves in enumerate(task_leaves):
            t = _task_vector(np.asarray(leaves[j]).reshape(-1)[c], base[j][c])
            out[k][j].reshape(-1)[c] = np.where(np.abs(t) >= thresholds[k][j], t, 0)

    _each_piece(trim, [b.size for b in base])
    return out


def _ties_host(base_leaves: Sequence, task_leaves: Sequence[Sequence], keep: float, per_tensor: bool,
               alpha) -> list[np.ndarray]:
    """:func:`ties_merge`'s leaves on the host: the thresholds, then per piece the trimmed task vectors,
    :func:`ties_disjoint_merge` and ``W0 + α·τ``, summing over tasks in task order as the compiled programs do."""
    base = _raveled(base_leaves)
    tasks = [_raveled(leaves) for leaves in task_leaves]
    thresholds = _thresholds_host(base, task_leaves, keep, per_tensor)
    scale = np.asarray(alpha).astype(np.float32)  # α in the compute dtype, as JAX casts a weakly typed scalar
    out = [np.empty(np.shape(b), np.asarray(b).dtype) for b in base_leaves]

    def merge(j, c):
        w0 = base[j][c].astype(np.float32)
        parts = []
        for k, task in enumerate(tasks):
            t = task[j][c].astype(np.float32) - w0
            parts.append(np.where(np.abs(t) >= thresholds[k][j], t, 0))
        total = parts[0].copy()
        for x in parts[1:]:
            total += x
        sign = np.sign(total)
        count = np.zeros(total.shape, np.int32)
        total[:] = 0
        for x in parts:
            agree = x * sign > 0  # = (sign(x) == sign) & (x != 0): sign is ±1 or 0, so x·sign is ±x or 0, exactly
            count += agree
            total += np.where(agree, x, 0)
        tau = np.where(count > 0, total / np.maximum(count, 1).astype(np.float32), 0)
        with np.errstate(over="ignore", invalid="ignore"):
            out[j].reshape(-1)[c] = w0 + scale * tau

    _each_piece(merge, [b.size for b in base])
    return out

def _adapter(fn, *, uses_stats: bool = False):
    def merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams):
        if uses_stats:
            return fn(pretrained, finetuned, stats, roles=roles, progress=progress, **hparams)
        return fn(pretrained, finetuned, **hparams)

    merge.__doc__ = fn.__doc__
    merge.__name__ = fn.__name__
    return merge


register(MergeMethod("average", _adapter(weight_average), {}, description="weight averaging"))
register(MergeMethod("task_arithmetic", _adapter(task_arithmetic), {"alpha": 0.3}, description="task arithmetic",
                     scale_name="alpha"))
register(MergeMethod("ties", _adapter(ties_merge), {"k": 0.2, "alpha": 1.0}, description="TIES-Merging",
                     scale_name="alpha"))
register(MergeMethod("cat", _adapter(cat_merge, uses_stats=True), {"alpha": 0.3, "lam": 5.0, "c": 3},
                     needs_stats=True, description="CAT Merging (conflict-aware task merging)", scale_name="alpha"))
