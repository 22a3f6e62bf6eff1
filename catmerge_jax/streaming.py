"""Out-of-core CAT Merging: safetensors in, safetensors out, one tensor of every model in memory at a time.

:func:`merge_safetensors` walks the base checkpoint's tensors in order; for each it memory-maps that ONE
tensor from the base and from each of the K task checkpoints, trims the K task vectors (linear leaves through
:mod:`catmerge_jax.batched`'s cost-chosen fast paths, masks through :mod:`catmerge_jax.cat`'s trimmers) and
appends the merged tensor to the output shard being written. Shard headers are planned up front from the
base header (output dtype = base dtype), so tensor bytes stream straight to disk. Everything is written into
a temporary folder next to ``out_dir`` and renamed into place at the end (a crash leaves no partial output).
Peak memory ≈ (K + 2) copies of the largest tensor in float32 plus the statistics.

:func:`layerwise_capture` is the matching capture pass for a stack of blocks: block b's inputs come from block
b−1's outputs only, and only block b's weights are loaded, so statistics of arbitrarily deep models are
collected with one block in memory.

Tensor names are parameter paths; with ``sep="."`` (Hugging Face names such as ``encoder.layer.0.query.weight``)
they are read as ``/``-joined paths for role lookup and statistics keys.

>>> import os, tempfile, numpy as np
>>> import catmerge_jax as cm
>>> from converters.safetensors_io import save_file, load_file
>>> from catmerge_jax.streaming import merge_safetensors
>>> d = tempfile.mkdtemp()
>>> rng = np.random.default_rng(0)
>>> for name in ("base", "t0", "t1"):
...     save_file({"dense/kernel": rng.standard_normal((6, 5)).astype(np.float32)}, os.path.join(d, name + ".safetensors"))
>>> st = {"dense/kernel": [cm.linear_stats(rng.standard_normal((4, 6)))] * 2}
>>> merge_safetensors(os.path.join(d, "base.safetensors"), [os.path.join(d, f"t{k}.safetensors") for k in (0, 1)],
...                   st, os.path.join(d, "out"), c=1)
>>> load_file(os.path.join(d, "out", "model.safetensors"))["dense/kernel"].shape
(6, 5)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax import atomic, cat
from catmerge_jax.cat import linear_group_apply
from catmerge_jax.conflict import linear_group_bases, plan_linear
from catmerge_jax.errors import MissingStatisticsError, TreeMismatchError
from catmerge_jax.roles import Overrides, Role, classify, union_declared
from catmerge_jax.stats import LeafStats, is_leaf_stats
from catmerge_jax.tree import PyTree, leaves_with_paths
from converters.safetensors_io import DTYPES, INDEX_NAME, dtype_name, list_tensors, load_tensor

__all__ = ["merge_safetensors", "stats_by_path", "layerwise_capture", "ShardWriter"]


def stats_by_path(stats: Sequence[PyTree] | Mapping[str, Sequence[LeafStats]]) -> dict[str, list[LeafStats]]:
    """``{path: [LeafStats of task k]}`` from K stats trees (or such a mapping, returned as is)."""
    if isinstance(stats, Mapping):
        return {p: list(v) for p, v in stats.items()}
    out: dict[str, list[LeafStats]] = {}
    for tree in stats:
        for path, leaf in leaves_with_paths(tree, is_leaf=is_leaf_stats):
            out.setdefault(path, []).append(leaf)
    return out


class _ShapeOnly:
    """Stands in for an array in :func:`classify` (which reads only ``shape``/``ndim``)."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


class ShardWriter:
    """Streams tensors into safetensors shards inside ``folder`` without holding them all in memory.

    ``entries`` = ``[(name, safetensors dtype name, shape)]`` in write order fixes every shard header up front;
    then :meth:`write` each tensor in that order and :meth:`close` (which adds the index for > 1 shard).
    Callers wanting atomicity write into a temporary folder and rename it (as :func:`merge_safetensors` does).
    ``shard_files`` (``{name: file name}``, entries of one file listed together) keeps a given layout, e.g. the
    base checkpoint's shards, instead of splitting by ``max_shard_bytes``; ``metadata`` is every shard's
    ``__metadata__`` (default ``{"format": "pt"}``).
    """

    def __init__(self, folder: str, entries: list[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int = 2 << 30,
                 *, shard_files: Mapping[str, str] | None = None, metadata: Mapping[str, str] | None = None):
        self.folder = folder
        self.metadata = dict(metadata) if metadata else {"format": "pt"}
        shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
        size = 0
        files: list[str] = []
        for name, dtype, shape in entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            if shard_files is not None:
                if not files or shard_files[name] != files[-1]:
                    if shard_files[name] in files:
                        raise ValueError(f"shard {shard_files[name]}: its entries are not listed together")
                    files.append(shard_files[name])
                    if shards[-1]:
                        shards.append([])
            elif shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, shape, nbytes))
            size += nbytes
        n = len(shards)
        if shard_files is None:
            files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.files = files
        self.shards = shards
        self.file_of = {e[0]: f for f, s in zip(self.files, shards) for e in s}
        self.expected = {e[0]: (e[1], e[2]) for s in shards for e in s}
        self.total = sum(e[3] for s in shards for e in s)
        self._open = None
        self._index = -1

    def _start(self, index: int) -> None:
        if self._open is not None:
            self._open.close()
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for name, dtype, shape, nbytes in self.shards[index]:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)
        self._open = open(os.path.join(self.folder, self.files[index]), "wb")
        self._open.write(struct.pack("<Q", len(raw)))
        self._open.write(raw)
        self._index = index

    def write(self, name: str, array: np.ndarray) -> None:
        dtype, shape = self.expected[name]
        index = self.files.index(self.file_of[name])
        if index != self._index:
            self._start(index)
        arr = np.ascontiguousarray(np.asarray(array).astype(DTYPES[dtype], copy=False))
        if arr.shape != tuple(shape):
            raise TreeMismatchError(f"tensor {name!r}: merged shape {arr.shape}, planned {tuple(shape)}")
        self._open.write(memoryview(arr.reshape(-1).view(np.uint8)))

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.file_of}
            with open(os.path.join(self.folder, INDEX_NAME), "w") as f:
                json.dump(index, f, indent=2)


def _trim_leaf(leaf: cat.LeafInput, table: Mapping[Role, cat.Trimmer], *, lam: float, c: int, joint: bool,
               normalize_by_count: bool, solver: str, strategy: str, trim_linear: bool) -> jax.Array:
    if leaf.spec.role is not Role.LINEAR or not trim_linear:
        trimmer = table.get(leaf.spec.role, cat.identity_trimmer()) if trim_linear or leaf.spec.role is not \
            Role.LINEAR else cat.identity_trimmer()
        return trimmer.apply(leaf, trimmer.init(leaf))
    shape = leaf.task_vectors.shape
    mat = leaf.task_vectors.reshape(shape[0], *leaf.spec.matrix_shape(shape[1:]))
    cat.check_c(c, mat.shape[-1], leaf.path)
    form, data = cat.gram_inputs(leaf._replace(task_vectors=mat), normalize_by_count)
    plan = plan_linear(mat.shape[0], mat.shape[1], mat.shape[2], c, rows=data.shape[1] if form == "rows" else None,
                       solver=solver, strategy=strategy if form == "rows" else "explicit")
    bases = linear_group_bases(mat[None], data[None], lam=lam, c=c, plan=plan)
    return linear_group_apply(mat[None], bases, joint=joint)[0].reshape(shape)


def merge_safetensors(base: str, tasks: Sequence[str], stats: Sequence[PyTree] | Mapping[str, Sequence[LeafStats]],
                      out_dir: str, *, alpha: float = 0.3, lam: float = 5.0, c: int = 3, roles: Overrides = None,
                      joint: bool = False, sep: str = "/", scale_lam: float | None = None, scale_c: int | None = None,
                      shift_lam: float | None = None, shift_c: int | None = None, normalize_by_count: bool = False,
                      scale_per_row_mean: bool = False, trim_linear: bool = True, solver: str = "auto",
                      strategy: str = "auto", max_shard_bytes: int = 2 << 30, overwrite: bool = False,
                      progress: bool = False) -> None:
    """CAT merge of safetensors checkpoints, streamed tensor by tensor into ``out_dir``.

    Args:
      base: the pretrained checkpoint (a ``.safetensors`` file or a folder, sharded or not).
      tasks: K fine-tuned checkpoints with the same tensor names, shapes and dtypes.
      stats: K stats trees mirroring the params (paths = tensor names with ``sep`` → ``/``), or
        ``{path: [LeafStats] * K}``; leaves without an entry get none (fine for SHIFT/OTHER leaves).
      out_dir: output folder (created atomically; must not exist unless ``overwrite``).
      sep: separator of the tensor names (``"."`` for Hugging Face names).
      max_shard_bytes: output shard size; more than one shard writes ``model.safetensors.index.json``.
      other args: as :func:`catmerge_jax.cat.cat_merge` / :func:`catmerge_jax.batched.cat_merge_batched`.
    """
    cat.check_hparams(alpha, lam)
    if len(tasks) < 1:
        raise MissingStatisticsError("need at least one fine-tuned checkpoint (K >= 1), got K = 0")
    base_info = list_tensors(base)
    task_infos = [list_tensors(t) for t in tasks]
    for k, info in enumerate(task_infos):
        for name, entry in base_info.items():
            if name not in info:
                raise TreeMismatchError(f"{tasks[k]}: no tensor {name!r} (present in the base {base})")
            if tuple(info[name].shape) != tuple(entry.shape) or info[name].dtype != entry.dtype:
                raise TreeMismatchError(f"{tasks[k]}: tensor {name!r} is {info[name].dtype} {list(info[name].shape)}, "
                                        f"the base has {entry.dtype} {list(entry.shape)}")
    per_path = stats_by_path(stats)
    for path, values in per_path.items():
        if len(values) != len(tasks):
            raise MissingStatisticsError(f"statistics of '{path}' cover {len(values)} task(s), expected {len(tasks)}")
    names = list(base_info)
    paths = {name: name.replace(sep, "/") if sep != "/" else name for name in names}
    # the specs the statistics carry (captured from a model that declares them) apply as in cat_merge
    declared = union_declared((f"stats[{k}]", {p: v[k].spec for p, v in per_path.items()
                                               if k < len(v) and getattr(v[k], "spec", None) is not None})
                              for k in range(len(tasks)))
    specs = classify({paths[n]: _ShapeOnly(base_info[n].shape) for n in names}, roles, declared=declared)
    table = cat.cat_trimmers(lam, c, scale_lam=scale_lam, scale_c=scale_c, shift_c=shift_c, shift_lam=shift_lam,
                             joint=joint, normalize_by_count=normalize_by_count,
                             scale_per_row_mean=scale_per_row_mean)

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = None
    try:
        # The package's temp-folder scheme (catmerge_jax.atomic): a killed run's folder is removed by the next run
        # into the same parent, and publishing never leaves a half-replaced out_dir.
        with atomic.deferred_signals():
            tmp = atomic.make_temp_dir(parent, os.path.basename(out_dir))
        writer = ShardWriter(tmp, [(n, dtype_name(base_info[n].dtype), tuple(base_info[n].shape))
                                    for n in names], max_shard_bytes)
        iterator = names
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(names, desc="CAT merge (streaming)", unit="tensor")
        for name in iterator:
            path = paths[name]
            w0 = jnp.asarray(load_tensor(base_info[name].file, name))
            compute = jnp.promote_types(w0.dtype, jnp.float32) if jnp.issubdtype(w0.dtype, jnp.floating) \
                else w0.dtype
            w0c = w0.astype(compute)
            tvs = jnp.stack([jnp.asarray(load_tensor(info[name].file, name), compute) - w0c for info in task_infos])
            leaf = cat.LeafInput(path, specs[path], tvs, per_path.get(path))
            trimmed = _trim_leaf(leaf, table, lam=lam, c=c, joint=joint, normalize_by_count=normalize_by_count,
                                 solver=solver, strategy=strategy, trim_linear=trim_linear)
            merged = (w0c + alpha * trimmed.sum(0)).astype(w0.dtype)
            writer.write(name, np.asarray(merged))
            del w0, w0c, tvs, trimmed, merged
        writer.close()
        atomic.publish_dir(tmp, out_dir, overwrite=overwrite)
    except BaseException:
        if tmp is not None:
            atomic.remove_temp_dir(tmp)
        raise


def layerwise_capture(load_block: Callable[[int], PyTree],
                      block_stats: Callable[[PyTree, jax.Array], tuple[jax.Array, Mapping[str, LeafStats]]],
                      num_blocks: int, inputs: jax.Array, *, prefix: str = "blocks",
                      progress: bool = False) -> dict[str, LeafStats]:
    """Statistics of a stack of blocks, one block of weights in memory at a time.

    Args:
      load_block: ``b -> params of block b`` (e.g. read from safetensors; called once per block).
      block_stats: ``(params, h) -> (h_next, {relative_path: LeafStats})`` — runs one block on its input
        activations ``h`` and returns its output and the statistics of its leaves.
      num_blocks: number of blocks.
      inputs: the first block's input activations (e.g. embedded exemplars).
      prefix: statistics of block b are stored under ``f"{prefix}/{b}/{relative_path}"``.
    Returns:
      ``{path: LeafStats}`` for all blocks (feed to :func:`catmerge_jax.stats.stats_from_arrays`).
    """
    out: dict[str, LeafStats] = {}
    h = inputs
    iterator = range(num_blocks)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="capture (layerwise)", unit="block")
    for b in iterator:
        params = load_block(b)
        h, stats = block_stats(params, h)
        for rel, s in stats.items():
            out[f"{prefix}/{b}/{rel}"] = s
        del params
    return out
