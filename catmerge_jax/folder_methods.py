"""Every data-free registered method on Hugging Face folders of any architecture, streamed tensor by tensor.

A method reaches a folder through a *stream plan*: ``plan(inputs, hparams) -> merge_tensor``, where
``merge_tensor(name, [base, task_1, ..., task_K])`` (float32 arrays) returns the merged tensor, and
:func:`catmerge_jax.folders.stream_merge` writes it. Most methods act on each tensor alone: their plan applies the
registered method itself to a one-leaf pytree, with the tensor's :class:`~catmerge_jax.roles.LeafSpec` (from
:mod:`catmerge_jax.torch_roles`) passed as ``roles``, so matrix methods (TSV, Iso-C/CTS, WUDI) see each weight in its
true ``(out, in)`` orientation. Methods whose rule reads a statistic of the whole model first gather it in
streaming passes over the folders (no model held in memory), then merge tensor by tensor:

============================  ==========================================================================
method                        what the first passes compute
============================  ==========================================================================
``ties`` (model-wide ``k``)   each task's threshold: the ``⌈kP⌉``-th largest ``|τ_k|`` over all P entries
``consensus`` (``base=ties``)  the same thresholds at ``ties_k``
``pcb``                       each task's clip bounds of ``|τ_k|``, then the threshold and maximum of its
                              balancing scores β (which depend on the bounds)
``tatr_zero_shot``            the ``⌈qP⌉``-th smallest conflict score Ω over the model
``dare``                      nothing: each tensor draws from ``fold_in(key_k, j)`` with ``j`` its position
                              among the tensor names in sorted order, as in the in-memory method
============================  ==========================================================================

Order statistics are exact (:func:`streamed_order_statistics`: a two-pass radix selection over the float32 bit
patterns, 2 × 65536 counters per row), so every streamed merge equals the in-memory method applied to the
state dict ``{name: array}`` of the float tensors. Other methods (registered later, e.g. MergeKit's) stream once
they have a plan: :func:`register_stream_plan` (``per_tensor_plan(name)`` for a method that acts on each tensor
alone).

>>> import os, tempfile, numpy as np
>>> from converters.safetensors_io import save_file
>>> root = tempfile.mkdtemp()
>>> for k in range(3):
...     os.mkdir(os.path.join(root, f"m{k}"))
...     save_file({"layer.weight": np.full((2, 2), float(k), np.float32)},
...               os.path.join(root, f"m{k}", "model.safetensors"))
>>> out = merge_folders_streamed("task_arithmetic", os.path.join(root, "m0"), [os.path.join(root, "m1"),
...                              os.path.join(root, "m2")], os.path.join(root, "out"), hparams={"alpha": 0.5})
>>> from catmerge_jax.folders import open_folder
>>> open_folder(out).read("layer.weight").tolist()
[[1.5, 1.5], [1.5, 1.5]]
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from catmerge_jax.errors import CatMergeError, HyperparameterError
from catmerge_jax.folders import (Folder, check_sources, float_names, iter_tensors, open_folder, return_freed_memory,
                                  stream_merge)
from catmerge_jax.roles import LeafSpec
from catmerge_jax.torch_roles import RoleOverrides, folder_specs

__all__ = ["StreamInputs", "StreamPlan", "STREAM_PLANS", "register_stream_plan", "per_tensor_plan", "stream_plan",
           "merge_folders_streamed", "streamed_order_statistics", "streams", "family_kind", "resolve_folder",
           "folder_role_table", "StreamingError", "IN_MEMORY_KINDS"]

MergeTensor = Callable[[str, list[np.ndarray]], np.ndarray]


class StreamingError(CatMergeError):
    """A method cannot be streamed over folders (it needs exemplars, or has no streamed form)."""


class StreamInputs(NamedTuple):
    """What a stream plan gets: the opened folders, the float tensor names (file order) and their roles."""

    base: Folder
    tasks: list[Folder]
    names: list[str]
    specs: dict[str, LeafSpec]
    progress: bool = False

    @property
    def sources(self) -> list[Folder]:
        return [self.base, *self.tasks]

    def passes(self, desc: str) -> Iterator[tuple[str, list[np.ndarray]]]:
        """One streaming pass over every float tensor: ``(name, [base, task_1, ..., task_K] as float32)``."""
        from tqdm.auto import tqdm

        return tqdm(iter_tensors(self.sources, self.names), total=len(self.names), desc=desc, unit="tensor",
                    disable=not self.progress)


StreamPlan = Callable[[StreamInputs, dict], MergeTensor]
"""``(inputs, hyperparameters) -> merge_tensor``; may run first passes (``inputs.passes``) before returning."""

STREAM_PLANS: dict[str, StreamPlan] = {}
"""Registered method name → its stream plan."""


def register_stream_plan(name: str, plan: StreamPlan) -> StreamPlan:
    """Let ``catmerge merge --method NAME`` stream folders with ``plan`` (replacing any plan of that name)."""
    STREAM_PLANS[name] = plan
    return plan


def stream_plan(method: Any) -> StreamPlan:
    """The plan of a registered method (a name or a ``MergeMethod``); :class:`StreamingError` if it has none."""
    from catmerge_jax.methods.registry import get_method

    m = get_method(method) if isinstance(method, str) else method
    if m.needs_stats or m.extras:
        needs = "exemplar statistics" if m.needs_stats else ", ".join(m.extras)
        raise StreamingError(f"method '{m.name}' needs {needs}; folders of any architecture are merged only by "
                             "data-free methods (bert, roberta, clip and blip folders take exemplar methods)")
    if m.name not in STREAM_PLANS:
        raise StreamingError(f"method '{m.name}' has no streamed form for folders; register one with "
                             "catmerge_jax.folder_methods.register_stream_plan")
    return STREAM_PLANS[m.name]


# ----------------------------------------------------------------------------------------------- helpers

def _jnp():
    import jax.numpy as jnp

    return jnp


def _call_method(method: Any, tree_in: dict, finetuned: list[dict], roles: Mapping[str, LeafSpec], hparams: dict):
    try:
        return method.merge(tree_in, finetuned, roles=roles, progress=False, **hparams)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise HyperparameterError(f"method '{method.name}' does not take that hyperparameter ({e})") from None


def per_tensor_plan(name: str) -> StreamPlan:
    """The plan of a method that acts on each tensor alone: the registered method on the one-leaf tree
    ``{"w": tensor}`` with ``roles={"w": the tensor's LeafSpec}``."""

    def plan(inputs: StreamInputs, hparams: dict) -> MergeTensor:
        from catmerge_jax.methods.registry import get_method

        method = get_method(name)

        def merge(tensor: str, arrays: list[np.ndarray]) -> np.ndarray:
            out = _call_method(method, {"w": arrays[0]}, [{"w": a} for a in arrays[1:]],
                               {"w": inputs.specs[tensor]}, hparams)
            return np.asarray(out["w"])

        return merge

    plan.__name__ = f"per_tensor_plan[{name}]"
    return plan


def _options(method: str, hparams: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    unknown = [k for k in hparams if k not in defaults]
    if unknown:
        raise HyperparameterError(f"method '{method}' does not take '{unknown[0]}' (it takes "
                                  f"{', '.join(sorted(defaults))})")
    return {**defaults, **hparams}


def _task_vectors(arrays: list[np.ndarray]):
    """``(K, ...)`` float32 task vectors of one tensor (as the in-memory methods form them)."""
    jnp = _jnp()
    base = jnp.asarray(arrays[0])
    return base, jnp.stack([jnp.asarray(a) - base for a in arrays[1:]])


# ----------------------------------------------------------------------------------------------- order statistics

def _sortable(x: np.ndarray) -> np.ndarray:
    """float32 → uint32 keys with the same order (negatives: all bits flipped; others: sign bit set)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    flip = bits >> np.uint32(31)                  # 1 for negatives
    flip *= np.uint32(0x7FFFFFFF)
    flip |= np.uint32(0x80000000)                 # 0xFFFFFFFF for negatives, 0x80000000 otherwise
    flip ^= bits
    return flip


_PIECE = 1 << 22
"""Entries per row handled at once (bounds the temporaries of a large tensor to a few times 16 MiB)."""


def _pieces(chunks: Callable[[], Iterator[np.ndarray]], rows: int) -> Iterator[np.ndarray]:
    for chunk in chunks():
        chunk = np.asarray(chunk).reshape(rows, -1)
        for start in range(0, chunk.shape[1], _PIECE):
            yield _sortable(chunk[:, start:start + _PIECE])


def _unsortable(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, np.uint32)
    bits = np.where(keys >> 31 != 0, keys & np.uint32(0x7FFFFFFF), ~keys)
    return bits.view(np.float32)


def streamed_order_statistics(chunks: Callable[[], Iterator[np.ndarray]], positions: Sequence[int],
                              rows: int) -> np.ndarray:
    """Exact order statistics of rows too large to hold: ``(rows, len(positions))`` float32, the entries at
    ascending ``positions`` of each row, as ``np.partition`` of the whole row would give.

    ``chunks()`` yields ``(rows, n_i)`` pieces whose concatenation is the ``(rows, P)`` matrix; it is called twice
    (a radix selection: the top 16 bits of each entry's order-preserving key, then the low 16 bits inside the bin
    that holds each position). Memory: ``2 × 65536`` counters per row and position.

    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 1000)).astype(np.float32)
    >>> got = streamed_order_statistics(lambda: iter(np.split(x, 4, axis=1)), [0, 17, 999], rows=2)
    >>> bool((got == np.sort(x, axis=1)[:, [0, 17, 999]]).all())
    True
    """
    positions = [int(p) for p in positions]
    high = np.zeros((rows, 1 << 16), np.int64)
    size = 0
    for keys in _pieces(chunks, rows):
        size += keys.shape[1]
        for r in range(rows):
            high[r] += np.bincount(keys[r] >> 16, minlength=1 << 16)
    if any(not 0 <= p < size for p in positions):
        raise ValueError(f"positions {positions} outside [0, {size})")
    cum = np.cumsum(high, axis=1)
    bins = np.stack([np.searchsorted(cum[r], positions, side="right") for r in range(rows)])   # (rows, n_pos)
    below = np.where(bins > 0, np.take_along_axis(cum, np.maximum(bins - 1, 0), axis=1), 0)
    ranks = np.asarray(positions)[None, :] - below
    wanted = [sorted(set(bins[r].tolist())) for r in range(rows)]
    low = {(r, b): np.zeros(1 << 16, np.int64) for r in range(rows) for b in wanted[r]}
    for keys in _pieces(chunks, rows):
        for r in range(rows):
            top = keys[r] >> 16
            for b in wanted[r]:
                low[(r, b)] += np.bincount(keys[r][top == b] & 0xFFFF, minlength=1 << 16)
    out = np.empty((rows, len(positions)), np.uint32)
    for r in range(rows):
        for i, (b, rank) in enumerate(zip(bins[r], ranks[r])):
            lo = int(np.searchsorted(np.cumsum(low[(r, int(b))]), rank, side="right"))
            out[r, i] = (int(b) << 16) | lo
    return _unsortable(out)


def _abs_task_rows(arrays: list[np.ndarray]) -> np.ndarray:
    """``(K, n)``: |τ_k| of one tensor, one row per task, computed as the in-memory methods do (jnp, float32)."""
    _, tvs = _task_vectors(arrays)
    return np.asarray(_jnp().abs(tvs)).reshape(tvs.shape[0], -1)


def _ties_thresholds(inputs: StreamInputs, keep: float, desc: str):
    """Per-task TIES thresholds: the ``⌈keep·P⌉``-th largest |τ_k| over the model (``inf``: keep nothing)."""
    jnp = _jnp()
    size = _model_size(inputs)
    n_keep = int(math.ceil(keep * size))
    k = len(inputs.tasks)
    if n_keep <= 0:
        return jnp.full((k,), jnp.inf, jnp.float32)
    chunks = lambda: (_abs_task_rows(arrays) for _, arrays in inputs.passes(desc))  # noqa: E731
    return jnp.asarray(streamed_order_statistics(chunks, [size - n_keep], rows=k)[:, 0])


def _model_size(inputs: StreamInputs) -> int:
    return sum(int(np.prod(inputs.base.tensors[n].shape, dtype=np.int64)) for n in inputs.names)


# ----------------------------------------------------------------------------------------------- plans

def _ties_plan(inputs: StreamInputs, hparams: dict) -> MergeTensor:
    from catmerge_jax.cat import check_scalar
    from catmerge_jax.methods.basic import ties_disjoint_merge

    opts = _options("ties", hparams, {"k": 0.2, "alpha": 1.0, "per_tensor": False})
    if opts["per_tensor"]:
        return per_tensor_plan("ties")(inputs, hparams)
    k, alpha = opts["k"], opts["alpha"]
    if isinstance(k, bool) or not isinstance(k, (int, float, np.number)) or not 0.0 <= float(k) <= 1.0:
        raise HyperparameterError(f"ties k (fraction kept) must be a number in [0, 1], got {k!r}")
    check_scalar("alpha", alpha)
    jnp = _jnp()
    thresholds = _ties_thresholds(inputs, float(k), "TIES thresholds")

    def merge(name: str, arrays: list[np.ndarray]) -> np.ndarray:
        base, tvs = _task_vectors(arrays)
        trimmed = jnp.stack([jnp.where(jnp.abs(t) >= thresholds[i], t, 0) for i, t in enumerate(tvs)])
        tau = ties_disjoint_merge(trimmed)
        return np.asarray(base + alpha * tau)

    return merge


def _consensus_plan(inputs: StreamInputs, hparams: dict) -> MergeTensor:
    from catmerge_jax.cat import check_scalar
    from catmerge_jax.methods import consensus as cons

    opts = _options("consensus", hparams, {"k": 2, "lam": 0.4, "alpha": 0.3, "base": "task_arithmetic",
                                           "ties_k": 0.2, "ties_agg": "sum"})
    if opts["base"] != "ties":
        return per_tensor_plan("consensus")(inputs, hparams)
    k = opts["k"]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise HyperparameterError(f"consensus k (minimum number of tasks) must be a static Python integer >= 0, "
                                  f"got {k!r}")
    check_scalar("alpha", opts["alpha"])
    lams = cons._lambdas(opts["lam"], len(inputs.tasks))
    ties_k = cons.static_number("ties_k", opts["ties_k"], "how many entries of each task TIES keeps")
    if not 0.0 <= ties_k <= 1.0:
        raise HyperparameterError(f"ties_k (fraction kept) must be in [0, 1], got {ties_k}")
    if opts["ties_agg"] not in ("sum", "mean"):
        raise HyperparameterError(f"ties_agg must be 'sum' or 'mean', got {opts['ties_agg']!r}")
    jnp = _jnp()
    size = _model_size(inputs)
    keep_nothing = int(math.ceil(ties_k * size)) <= 0
    thresholds = _ties_thresholds(inputs, ties_k, "TIES thresholds (consensus)")

    def merge(name: str, arrays: list[np.ndarray]) -> np.ndarray:
        base, tvs = _task_vectors(arrays)
        mtl = jnp.zeros(tvs.shape[1:], tvs.dtype) if keep_nothing else \
            cons._ties_leaf(tvs, thresholds, agg=opts["ties_agg"])
        return np.asarray(cons._consensus_leaf(base, tvs, mtl, lams, int(k), opts["alpha"]))

    return merge


def _dare_plan(inputs: StreamInputs, hparams: dict) -> MergeTensor:
    import jax

    from catmerge_jax.cat import check_scalar
    from catmerge_jax.methods import dare

    opts = _options("dare", hparams, {"p": 0.9, "alpha": 0.3, "seed": 0, "rescale": True})
    p = dare._check_p(opts["p"])
    check_scalar("alpha", opts["alpha"])
    key = dare.as_key(opts["seed"])
    jnp = _jnp()
    task_keys = jnp.stack([jax.random.fold_in(key, k) for k in range(len(inputs.tasks))])
    # the in-memory method numbers leaves in jax.tree.leaves order: a dict's keys sorted
    position = {name: j for j, name in enumerate(sorted(inputs.names))}

    def merge(name: str, arrays: list[np.ndarray]) -> np.ndarray:
        return np.asarray(dare._dare_leaf_merge(jnp.asarray(arrays[0]), [jnp.asarray(a) for a in arrays[1:]],
                                                task_keys, position[name], p, opts["alpha"],
                                                rescale=bool(opts["rescale"])))

    return merge


def _tatr_zero_shot_plan(inputs: StreamInputs, hparams: dict) -> MergeTensor:
    from catmerge_jax.cat import check_scalar
    from catmerge_jax.methods import tatr

    opts = _options("tatr_zero_shot", hparams, {"alpha": 0.3, "quantile": 0.99})
    check_scalar("alpha", opts["alpha"])
    q = tatr.static_number("TATR quantile", opts["quantile"], "how many parameters are inside the trust region")
    if not 0.0 <= q <= 1.0:
        raise HyperparameterError(f"TATR quantile (fraction of parameters in the trust region) must be in [0, 1], "
                                  f"got {opts['quantile']}")
    jnp = _jnp()
    size = _model_size(inputs)
    n_keep = min(int(math.ceil(q * size)), size)

    def scores(arrays):
        return tatr._leaf_scores(jnp.asarray(arrays[0]), [jnp.asarray(a) for a in arrays[1:]], None)

    if n_keep <= 0:
        threshold = jnp.asarray(-jnp.inf, jnp.float32)
    else:
        chunks = lambda: (np.asarray(scores(a)).reshape(1, -1) for _, a in inputs.passes("TATR threshold"))  # noqa
        threshold = jnp.asarray(streamed_order_statistics(chunks, [n_keep - 1], rows=1)[0, 0])

    def merge(name: str, arrays: list[np.ndarray]) -> np.ndarray:
        s = scores(arrays)
        return np.asarray(tatr._masked_task_arithmetic(jnp.asarray(arrays[0]), [jnp.asarray(a) for a in arrays[1:]],
                                                       s <= threshold.astype(s.dtype), opts["alpha"]))

    return merge


def _pcb_plan(inputs: StreamInputs, hparams: dict) -> MergeTensor:
    from catmerge_jax.cat import check_scalar
    from catmerge_jax.methods import pcb

    opts = _options("pcb", hparams, {"keep_ratio": 0.1, "clip_ratio": 1e-4, "alpha": 1.0})
    check_scalar("alpha", opts["alpha"])
    pcb._check(opts["keep_ratio"], opts["clip_ratio"])
    keep, clip = float(opts["keep_ratio"]), float(opts["clip_ratio"])
    jnp = _jnp()
    size = _model_size(inputs)
    k = len(inputs.tasks)

    def task_vectors(arrays):
        return pcb.stack_task_vectors(jnp.asarray(arrays[0]), [jnp.asarray(a) for a in arrays[1:]])

    def abs_rows():
        for _, arrays in inputs.passes("PCB clip bounds"):
            yield np.abs(np.asarray(task_vectors(arrays))).reshape(k, -1)

    bounds = streamed_order_statistics(abs_rows, [int(size * clip), int(size * (1 - clip)) - 1], rows=k)
    lo, hi = jnp.asarray(bounds[:, 0]), jnp.asarray(bounds[:, 1])

    def balance_rows():
        for _, arrays in inputs.passes("PCB score threshold"):
            yield np.asarray(pcb._balance(task_vectors(arrays), lo, hi)).reshape(k, -1)

    scored = streamed_order_statistics(balance_rows, [int(size * (1 - keep)), size - 1], rows=k)
    threshold, top = jnp.asarray(scored[:, 0]), jnp.asarray(scored[:, 1])

    def merge(name: str, arrays: list[np.ndarray]) -> np.ndarray:
        tvs = task_vectors(arrays)
        clipped, weights = pcb._clip_and_weigh(tvs, pcb._balance(tvs, lo, hi), lo, hi, threshold, top)
        return np.asarray(pcb._combine(jnp.asarray(arrays[0]), clipped, weights, opts["alpha"]))

    return merge


for _name in ("average", "task_arithmetic", "tsv", "iso_c", "iso_cts", "wudi"):
    register_stream_plan(_name, per_tensor_plan(_name))
register_stream_plan("ties", _ties_plan)
register_stream_plan("consensus", _consensus_plan)
register_stream_plan("dare", _dare_plan)
register_stream_plan("tatr_zero_shot", _tatr_zero_shot_plan)
register_stream_plan("pcb", _pcb_plan)

# MergeKit's 20 methods ("mergekit.<name>"), streamed per tensor (their module registers them; last: it uses the above)
import catmerge_jax.mergekit.streamed  # noqa: E402,F401 — registration


# ----------------------------------------------------------------------------------------------- folders in, folder out

def resolve_folder(path_or_hub_id: str | os.PathLike) -> str:
    """A local folder as given, or the cached snapshot folder of a hub ID; anything else unchanged (so the
    caller's own "does not exist" message names it)."""
    from catmerge_jax.folders import FolderError, resolve_hub_id

    given = os.fspath(path_or_hub_id)
    if os.path.exists(given):
        return given
    try:
        return resolve_hub_id(given)
    except FolderError:
        return given


IN_MEMORY_KINDS = ("bert", "roberta", "clip_vision", "blip")
"""Model kinds whose data-free merges keep the in-memory path through their Flax parameter tree (classifier heads and
CLIP's text tower kept aside unchanged, leaves in Flax order), so their results stay what they were; every other
folder, the Flax decoder families (Llama, Qwen, ...) included, streams."""


def family_kind(folder: str) -> str | None:
    """The model kind (``bert``, ``roberta``, ``clip_vision``, ``blip``, a decoder family, ...) of a folder that
    has a Flax model here, or ``None`` (any other architecture, or no readable ``config.json``)."""
    from converters.hf import ConversionError, model_kind_of
    from catmerge_jax.folders import FolderError, _read_json

    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.isfile(path):
        return None
    try:
        config = _read_json(path, "config")
    except FolderError:
        return None
    if not isinstance(config, dict):
        return None
    if config.get("model_type") == "blip":
        return "blip"
    try:
        return model_kind_of(config)
    except ConversionError:
        return None


def streams(method: Any, base: str | os.PathLike) -> bool:
    """Whether ``catmerge merge`` takes the streamed path: a data-free method on any folder but those of
    :data:`IN_MEMORY_KINDS`."""
    from catmerge_jax.methods.registry import get_method

    m = get_method(method) if isinstance(method, str) else method
    if m.needs_stats or m.extras:
        return False
    return family_kind(resolve_folder(base)) not in IN_MEMORY_KINDS


def merge_folders_streamed(method: Any, base: str | os.PathLike, tasks: Sequence[str | os.PathLike],
                           out_dir: str | os.PathLike, *, hparams: Mapping[str, Any] | None = None,
                           roles: RoleOverrides = None, out_dtype: Any = None, overwrite: bool = False,
                           progress: bool = False) -> str:
    """Merge folders (or cached hub IDs) of any architecture with a data-free registered method, out of core.

    Args:
      method: a registered name or ``MergeMethod`` with a stream plan (every data-free method here).
      base, tasks: the pretrained folder and K ≥ 1 fine-tuned folders (same tensor names, shapes, dtypes).
      out_dir: the output folder (the base's names, dtypes, shards, index and non-weight files).
      hparams: the method's hyperparameters over its defaults.
      roles: tensor-name patterns → role names or LeafSpecs (:mod:`catmerge_jax.torch_roles`).
      out_dtype: dtype of the merged tensors (default: as stored in the base).
    Returns:
      ``out_dir`` as an absolute path.
    """
    from catmerge_jax.methods.registry import get_method
    from catmerge_jax.pipeline import prepare_output

    m = get_method(method) if isinstance(method, str) else method
    plan = stream_plan(m)
    if not tasks:
        raise HyperparameterError("merging needs at least one task folder")
    return_freed_memory()   # before the first passes, which read every tensor too
    base_folder = open_folder(base)
    task_folders = [open_folder(t) for t in tasks]
    prepare_output(out_dir, overwrite=overwrite, inputs=[base_folder.path, *[t.path for t in task_folders]])
    names = float_names(base_folder)
    check_sources(base_folder, task_folders, names)
    specs = folder_specs({n: base_folder.tensors[n].shape for n in names}, base_folder.config, roles)
    inputs = StreamInputs(base_folder, task_folders, names, specs, progress)
    merge_tensor = plan(inputs, dict(hparams or {}))
    return stream_merge(base_folder, inputs.sources, out_dir, merge_tensor, names=names, out_dtype=out_dtype,
                        overwrite=overwrite, progress=progress)


def folder_role_table(base: str | os.PathLike, roles: RoleOverrides = None) -> str:
    """``catmerge roles``: the role table of a folder (or cached hub ID). bert/roberta/clip/blip folders show their
    Flax parameter tree as before; any other folder (what data-free merges stream) its tensor names with the roles
    of :mod:`catmerge_jax.torch_roles` (integer buffers marked ``-``: copied, not merged)."""
    from catmerge_jax.torch_roles import format_role_table, role_rows

    path = resolve_folder(base)
    if family_kind(path) in IN_MEMORY_KINDS:
        from catmerge_jax import pipeline
        from catmerge_jax.roles import role_table

        flax_roles = {p: ("linear" if r == "linear_in_out" else r) for p, r in dict(roles or {}).items()}
        return role_table(pipeline.load_checkpoint(path).params, flax_roles or None)
    folder = open_folder(base)
    names = float_names(folder)
    shapes = {n: i.shape for n, i in folder.tensors.items()}
    specs = folder_specs({n: shapes[n] for n in names}, folder.config, roles)
    return format_role_table(role_rows(shapes, specs, {n: i.dtype for n, i in folder.tensors.items()}))
