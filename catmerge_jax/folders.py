"""Hugging Face model folders of any architecture, opened lazily and merged tensor by tensor, out of core.

* :func:`open_folder` opens a local folder, or a hub ID (``org/name``) found in the local Hugging Face cache,
  reading only ``config.json``, the safetensors headers and the shard index: a :class:`Folder`.
* :meth:`Folder.read` memory-maps one tensor in its stored dtype (bf16 through ``ml_dtypes``).
* :func:`iter_tensors` walks the float tensors of several folders together, one tensor of each at a time, as
  float32 (for first passes that gather a statistic over the whole model).
* :func:`stream_merge` writes ``merge_tensor(name, [float32 arrays])`` for every float tensor into a new folder
  with the layout folder's names, dtypes, shapes, shard files and index; everything else (integer buffers, config,
  generation config, tokenizer files) is copied. Output shards are written as they fill, into a temporary folder
  renamed into place at the end (:mod:`catmerge_jax.atomic`), so peak memory is a few tensors of each model,
  whatever the number of layers, and a failed or killed run leaves nothing behind.

Nothing here knows a model family: names, shapes and dtypes are all it reads.

>>> import os, tempfile, numpy as np
>>> from converters.safetensors_io import save_file
>>> root = tempfile.mkdtemp()
>>> for k, name in enumerate(["base", "task"]):
...     os.mkdir(os.path.join(root, name))
...     save_file({"w": np.full((2, 3), float(k), np.float32), "ids": np.arange(3)},
...               os.path.join(root, name, "model.safetensors"))
>>> base, task = open_folder(os.path.join(root, "base")), open_folder(os.path.join(root, "task"))
>>> base.tensors["w"]
TensorInfo(name='w', dtype='F32', shape=(2, 3), file='model.safetensors')
>>> out = stream_merge(base, [base, task], os.path.join(root, "out"), lambda name, xs: (xs[0] + xs[1]) / 2,
...                    progress=False)
>>> merged = open_folder(out)
>>> merged.read("w").tolist(), merged.read("ids").tolist()
([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], [0, 1, 2])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import struct
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from catmerge_jax.errors import CatMergeError, NonFiniteError, TreeMismatchError

__all__ = ["TensorInfo", "Folder", "FolderError", "open_folder", "resolve_hub_id", "hub_cache_dir", "iter_tensors",
           "stream_merge", "float_names", "check_sources", "is_float_dtype", "FLOAT_DTYPES", "INDEX_NAME",
           "return_freed_memory", "as_float32"]

INDEX_NAME = "model.safetensors.index.json"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
"""Safetensors dtypes that are merged; every other tensor (integer ids, bool masks) is copied from the layout."""


class FolderError(CatMergeError):
    """A model folder or hub ID cannot be opened (missing, not cached, no safetensors weights, unreadable)."""


class TensorInfo(NamedTuple):
    """One tensor of a folder: ``name``, safetensors ``dtype`` name (``"BF16"``), ``shape``, and the ``file`` (name
    relative to the folder) holding it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str


def is_float_dtype(dtype: str) -> bool:
    """Whether tensors of this safetensors dtype name are merged (floating point) rather than copied."""
    return dtype in FLOAT_DTYPES


@dataclasses.dataclass(frozen=True)
class Folder:
    """A model folder opened lazily: only ``config.json``, the safetensors headers and the index are read.

    Attributes:
      path: the folder (absolute; for a hub ID, its snapshot folder in the cache).
      config: parsed ``config.json`` (``{}`` when the folder has none).
      tensors: ``{name: TensorInfo}`` in file order (shard files in name order, tensors by position in the file).
      index: parsed ``model.safetensors.index.json``, or ``None`` for a single-file folder.
      label: what the user gave (path or hub ID), for messages.
    """

    path: str
    config: dict
    tensors: dict[str, TensorInfo]
    index: dict | None
    label: str = ""
    offsets: Mapping[str, int] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        return self.label or self.path

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` in its stored dtype, memory-mapped (read-only; pages are read when touched and released
        with the array)."""
        from converters.safetensors_io import DTYPES

        info = self.tensors.get(name)
        if info is None:
            raise FolderError(f"{self}: no tensor {name!r}")
        dtype = DTYPES[info.dtype]
        if int(np.prod(info.shape, dtype=np.int64)) == 0:
            return np.zeros(info.shape, dtype)
        mapped = np.memmap(os.path.join(self.path, info.file), dtype=dtype, mode="r", offset=self.offsets[name],
                           shape=info.shape)
        return mapped.view(np.ndarray)

    def read_float32(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a new float32 array (bf16/f16 widen exactly)."""
        return as_float32(self.read(name))

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


def as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` as a new float32 array (bf16 and f16 widen exactly; ``ml_dtypes``' cast is as fast as a copy)."""
    return np.array(x, dtype=np.float32)


# ----------------------------------------------------------------------------------------------- hub cache

def hub_cache_dir() -> str:
    """The Hugging Face hub cache folder: ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``,
    else ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``), as ``huggingface_hub`` resolves it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def resolve_hub_id(repo_id: str, *, revision: str | None = None, cache_dir: str | None = None) -> str:
    """The snapshot folder of hub model ``repo_id`` at ``revision`` (default ``main``) in the local cache.

    Never touches the network: the cache layout is ``models--{org}--{name}/refs/{revision}`` (a commit hash) and
    ``snapshots/{commit}/``. A revision may also be a commit hash. Raises :class:`FolderError` naming the ID when
    it is not cached.
    """
    cache = cache_dir or hub_cache_dir()
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    commit = None
    ref = os.path.join(repo, "refs", *rev.split("/"))
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
    elif _COMMIT.match(rev):
        commit = rev
    snapshot = os.path.join(repo, "snapshots", commit) if commit else None
    if snapshot is None or not os.path.isdir(snapshot):
        raise FolderError(f"hub model {repo_id!r} (revision {rev}) is not in the local Hugging Face cache {cache} "
                          f"and no such folder exists; download it first (huggingface-cli download {repo_id}) or give "
                          "a folder")
    return snapshot


def _resolve(path_or_hub_id: str, revision: str | None) -> tuple[str, str | None]:
    """``(folder, within)``: a local folder (``within`` None), or a hub ID's cached snapshot and its repository
    folder, inside which the snapshot's links to ``blobs/`` resolve."""
    given = os.fspath(path_or_hub_id)
    if os.path.exists(given):
        if not os.path.isdir(given):
            raise FolderError(f"{given} is a file; give the model folder (the one holding config.json)")
        return os.path.abspath(given), None
    if _HUB_ID.match(given) and not given.startswith("."):
        snapshot = resolve_hub_id(given, revision=revision)
        return snapshot, os.path.dirname(os.path.dirname(snapshot))
    raise FolderError(f"model folder {given} does not exist")


def _cached_repo(path: str) -> str | None:
    """The repository folder when ``path`` is a hub cache snapshot given as a path
    (``.../models--org--name/snapshots/<commit>``), else ``None``."""
    snapshots = os.path.dirname(os.path.abspath(path))
    repo = os.path.dirname(snapshots)
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith("models--"):
        return repo
    return None


# ----------------------------------------------------------------------------------------------- opening

def _data_start(file: str) -> int:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FolderError(f"cannot read {what} {path}: {e}") from None


def open_folder(path_or_hub_id: str | os.PathLike, *, revision: str | None = None) -> Folder:
    """Open a model folder (``config.json`` + ``model.safetensors`` or a sharded index) without reading weights.

    Args:
      path_or_hub_id: a local folder, or a Hugging Face hub ID (``org/name``) resolved from the local hub cache
        only (:func:`resolve_hub_id`; ``HF_HUB_CACHE``/``HF_HOME`` as ``huggingface_hub`` reads them).
      revision: the hub revision (branch, tag or commit hash); default ``main``.
    Raises:
      FolderError: one line naming the folder or ID: missing, not cached, without safetensors weights, malformed.
    """
    from converters.safetensors_io import SafetensorsError, list_tensors, read_header, read_metadata

    label = os.fspath(path_or_hub_id)
    path, within = _resolve(label, revision)
    if within is None:
        within = _cached_repo(path)
    config_file = os.path.join(path, "config.json")
    config = _read_json(config_file, "config") if os.path.isfile(config_file) else {}
    if not isinstance(config, dict):
        raise FolderError(f"{config_file} must hold a JSON object")
    index_file = os.path.join(path, INDEX_NAME)
    index = _read_json(index_file, "shard index") if os.path.isfile(index_file) else None
    try:
        listed = list_tensors(path, within=within)
        files = sorted({info.file for info in listed.values()}, key=os.path.basename)
        tensors: dict[str, TensorInfo] = {}
        offsets: dict[str, int] = {}
        for file in files:
            start = _data_start(file)
            header = read_header(file)
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                tensors[name] = TensorInfo(name, entry["dtype"], tuple(int(d) for d in entry["shape"]),
                                           os.path.relpath(file, path))
                offsets[name] = start + int(entry["data_offsets"][0])
        metadata = read_metadata(files[0]) if files else {}
    except SafetensorsError as e:
        raise FolderError(f"{label}: {e}") from None
    except FileNotFoundError as e:
        raise FolderError(f"{label}: {e.filename} is missing") from None
    return Folder(path, config, tensors, index, label, offsets, metadata)


# ----------------------------------------------------------------------------------------------- walking

def float_names(folder: Folder) -> list[str]:
    """Names of the float tensors of ``folder``, in file order (those :func:`stream_merge` merges)."""
    return [n for n, info in folder.tensors.items() if is_float_dtype(info.dtype)]


def check_sources(layout: Folder, sources: Sequence[Folder], names: Sequence[str]) -> None:
    """Raise :class:`TreeMismatchError` naming the tensor and folder unless every source holds every tensor of
    ``names`` with the layout's shape and dtype (and, when ``names`` is all float tensors, no float tensor more)."""
    for src in sources:
        for name in names:
            want = layout.tensors[name]
            got = src.tensors.get(name)
            if got is None:
                raise TreeMismatchError(f"{src}: no tensor {name!r} (the base {layout} has {want.dtype} "
                                        f"{list(want.shape)})")
            if got.shape != want.shape or got.dtype != want.dtype:
                raise TreeMismatchError(f"{src}: tensor {name!r} is {got.dtype} {list(got.shape)}, the base {layout} "
                                        f"has {want.dtype} {list(want.shape)}")
        if len(names) == len(float_names(layout)):
            extra = [n for n in float_names(src) if n not in layout.tensors]
            if extra:
                raise TreeMismatchError(f"{src}: tensor {extra[0]!r} is not in the base {layout} (different "
                                        "architecture, or a head only one of them has)")


def iter_tensors(sources: Sequence[Folder], names: Sequence[str] | None = None
                 ) -> Iterator[tuple[str, list[np.ndarray]]]:
    """Yield ``(name, [float32 array of each source])`` one tensor at a time (``names`` default: the float
    tensors of ``sources[0]`` in file order). For first passes: each yielded list is freed before the next read."""
    sources = list(sources)
    if not sources:
        raise FolderError("iter_tensors needs at least one folder")
    names = float_names(sources[0]) if names is None else list(names)
    check_sources(sources[0], sources[1:], names)
    for name in names:
        yield name, [s.read_float32(name) for s in sources]


# ----------------------------------------------------------------------------------------------- writing

def return_freed_memory() -> None:
    """Have glibc serve allocations of 1 MiB or more with ``mmap`` for the rest of the process, so a freed tensor goes
    back to the system at once.

    By default glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB), after which
    tensor-sized blocks come from the heap, which fragments: a streamed merge's RSS then creeps up layer after layer
    although it holds a few tensors (measured: 215 → 700 MiB over 4 Llama layers of hidden 1024, and back to
    ~300 MiB between tensors with the fixed threshold). A no-op where glibc's ``mallopt`` is not available.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 1 << 20)


def _out_dtype(out_dtype: Any, stored: str) -> str:
    if out_dtype is None:
        return stored
    from converters.safetensors_io import DTYPES, dtype_name

    if isinstance(out_dtype, str) and out_dtype.upper() in DTYPES:
        return out_dtype.upper()
    aliases = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "fp32": "F32",
               "fp16": "F16", "bf16": "BF16"}
    if isinstance(out_dtype, str) and out_dtype.lower() in aliases:
        return aliases[out_dtype.lower()]
    try:
        return dtype_name(np.dtype(out_dtype))
    except (TypeError, ValueError, CatMergeError) as e:
        raise FolderError(f"out_dtype {out_dtype!r} is not a float dtype safetensors can store ({e})") from None


def _finite_cast(name: str, merged: Any, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    from converters.safetensors_io import DTYPES

    merged = np.asarray(merged)
    if merged.shape != shape:
        raise TreeMismatchError(f"tensor {name!r}: merged shape {merged.shape}, expected {shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = merged.astype(DTYPES[dtype], copy=False)
    if not np.isfinite(out).all():
        bad = int(out.size - np.count_nonzero(np.isfinite(out)))
        raise NonFiniteError(f"merged tensor {name!r} holds {bad} non-finite value(s) as {dtype}; nothing was "
                             "written (hyperparameters too large?)")
    return out


def _copy_non_weights(src: str, dest: str) -> None:
    from converters.hf import _copy_non_weights as copy

    copy(src, dest)


def stream_merge(layout: Folder, sources: Sequence[Folder], out_dir: str | os.PathLike,
                 merge_tensor: Callable[[str, list[np.ndarray]], np.ndarray], *, names: Sequence[str] | None = None,
                 out_dtype: Any = None, overwrite: bool = False, progress: bool = True,
                 copy_files: bool = True, raw: bool = False) -> str:
    """Write ``merge_tensor(name, arrays)`` for each float tensor of ``layout`` into a new folder ``out_dir``.

    Args:
      layout: the folder whose names, dtypes, shapes, shard files and index the output keeps (the base model).
      sources: the folders read for each merged tensor (e.g. ``[base, *tasks]``); each must hold every merged
        tensor with the layout's shape and dtype (else :class:`TreeMismatchError` naming tensor and folder,
        before anything is written).
      merge_tensor: ``(name, [float32 array per source]) -> float32 array`` of the tensor's shape.
      names: the tensors to merge (default: every float tensor); the others are copied from ``layout``.
      out_dtype: dtype of the merged tensors (default: each tensor's stored dtype), e.g. ``"bfloat16"``.
      overwrite: replace an existing non-empty ``out_dir``.
      progress: a tqdm bar over bytes.
      copy_files: copy the layout's other files (config, generation config, tokenizer, ...).
      raw: give ``merge_tensor`` each tensor in its stored dtype, memory-mapped (``Folder.read``), instead of a
        float32 copy: for merges that widen inside their own (jitted) computation, saving a full-size copy of every
        input tensor (MergeKit recipes, :mod:`catmerge_jax.recipes`).
    Returns:
      ``out_dir`` as an absolute path. Tensors are read, merged, cast and written one at a time, in the layout's
      file order, into a temporary folder beside ``out_dir`` that is renamed into place at the end; a merged tensor
      that is NaN or Inf after the cast stops the run (:class:`NonFiniteError`) with nothing written.
    """
    from catmerge_jax import atomic
    from catmerge_jax.pipeline import _make_parents, _remove_empty, prepare_output, publish_merged

    return_freed_memory()
    sources = list(sources)
    floats = float_names(layout)
    if names is None:
        merged_names = floats
    else:
        wanted = set(names)
        unknown = [n for n in names if n not in layout.tensors]
        if unknown:
            raise TreeMismatchError(f"tensor {unknown[0]!r} is not in {layout}")
        merged_names = [n for n in layout.tensors if n in wanted]
    check_sources(layout, sources, merged_names)
    merging = set(merged_names)
    entries = [(n, _out_dtype(out_dtype, i.dtype) if n in merging else i.dtype, i.shape)
               for n, i in layout.tensors.items()]
    out = prepare_output(out_dir, overwrite=overwrite, inputs=[layout.path, *[s.path for s in sources]])
    accept = atomic.dir_identity(out) if os.path.isdir(out) and not os.listdir(out) else None
    parent, base_name = os.path.dirname(out), os.path.basename(out)
    created = _make_parents(parent)
    try:
        atomic.clean_stale_temp_dirs(parent)
        with atomic.temp_dir(parent, base_name) as tmp:
            _write_folder(tmp, layout, sources, merge_tensor, entries, merging, progress, raw)
            if copy_files:
                _copy_non_weights(layout.path, tmp)
            publish_merged(tmp, out, overwrite=overwrite, accept=accept)
    except BaseException:
        _remove_empty(created)
        raise
    return out


def _write_folder(tmp: str, layout: Folder, sources: list[Folder], merge_tensor: Callable, entries: list,
                  merging: set[str], progress: bool, raw: bool = False) -> None:
    """The tensors (merged or copied, one at a time, in the layout's order), shard files and index."""
    from tqdm.auto import tqdm

    from catmerge_jax.streaming import ShardWriter

    writer = ShardWriter(tmp, entries, shard_files={n: i.file for n, i in layout.tensors.items()},
                         metadata=layout.metadata or None)
    dtypes = {n: d for n, d, _ in entries}
    total = sum(_nbytes(i) for i in layout.tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="merge (streaming)", disable=not progress) as bar, \
            contextlib.closing(_prefetched(layout, sources, merging, raw)) as tensors:
        for name, info, arrays in tensors:
            if arrays is not None:
                value = _finite_cast(name, merge_tensor(name, arrays), info.shape, dtypes[name])
                del arrays
            else:
                value = layout.read(name)
            writer.write(name, value)
            del value
            bar.update(_nbytes(info))
    writer.close()
    if layout.index is not None:
        _write_index(tmp, layout, writer)
    elif os.path.exists(os.path.join(tmp, INDEX_NAME)):
        os.unlink(os.path.join(tmp, INDEX_NAME))


def _prefetched(layout: Folder, sources: list[Folder], merging: set[str], raw: bool = False
                ) -> Iterator[tuple[str, TensorInfo, list[np.ndarray] | None]]:
    """``(name, info, [float32 array per source] or None)`` in the layout's order; the next tensor's reads (disk and
    the cast to float32, which release the GIL) run in a thread while the caller merges this one, so at most two
    tensors of each source are in memory."""
    from concurrent.futures import ThreadPoolExecutor

    def load(name: str) -> list[np.ndarray] | None:
        if name not in merging:
            return None
        return [s.read(name) if raw else s.read_float32(name) for s in sources]

    items = list(layout.tensors.items())
    with ThreadPoolExecutor(1, thread_name_prefix="catmerge-read") as pool:
        pending = pool.submit(load, items[0][0]) if items else None
        for i, (name, info) in enumerate(items):
            arrays = pending.result()
            pending = pool.submit(load, items[i + 1][0]) if i + 1 < len(items) else None
            yield name, info, arrays
            del arrays


def _nbytes(info: TensorInfo) -> int:
    return int(np.prod(info.shape, dtype=np.int64)) * _itemsize(info.dtype)


def _itemsize(dtype: str) -> int:
    from converters.safetensors_io import DTYPES

    return DTYPES[dtype].itemsize


def _write_index(folder: str, layout: Folder, writer: Any) -> None:
    """The layout's index with this output's total size (its weight map order and other metadata kept)."""
    index = dict(layout.index or {})
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = int(writer.total)
    index["metadata"] = metadata
    weight_map = index.get("weight_map") or {}
    index["weight_map"] = {n: weight_map.get(n, writer.file_of[n]) for n in list(weight_map) + [
        n for n in writer.file_of if n not in weight_map]}
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)
