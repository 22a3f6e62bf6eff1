"""A small reader/writer of the safetensors format in NumPy (no torch, no ``safetensors`` package needed).

Format: 8 bytes little-endian ``u64`` header length ``N``; ``N`` bytes of JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``;
then the tensor bytes (offsets are relative to the end of the header), little-endian, C order.

* :func:`read_header` parses only the header.
* :func:`load_tensor` memory-maps one tensor and copies it out, so a streaming merge holds one tensor at a
  time; :func:`iter_tensors` does the same for many with one header parse; :func:`load_file` loads them all.
* :func:`save_file` writes atomically (temporary file in the same folder, then ``os.replace``), keeps the
  key order of the dict, pads the header to 8 bytes like the reference implementation; the output is read
  by ``safetensors`` and ``transformers``.
* :func:`list_tensors` describes a folder: one ``*.safetensors`` file or a sharded checkpoint with
  ``model.safetensors.index.json``.

>>> import numpy as np, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
>>> save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, path, metadata={"format": "pt"})
>>> load_tensor(path, "a").tolist()
[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator, Mapping, NamedTuple

import ml_dtypes
import numpy as np

from catmerge_jax.atomic import atomic_file

__all__ = ["DTYPES", "TensorInfo", "SafetensorsError", "read_header", "read_metadata", "load_tensor", "iter_tensors",
           "load_file",
           "save_file", "list_tensors", "INDEX_NAME", "dtype_name"]

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation refuses larger headers too

# safetensors dtype names → little-endian NumPy dtypes.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dt: name for name, dt in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file or folder is malformed, or a tensor/dtype is not supported."""


class TensorInfo(NamedTuple):
    """Where a tensor lives: ``file`` (path), ``dtype`` (NumPy dtype), ``shape``."""

    file: str
    dtype: np.dtype
    shape: tuple[int, ...]


def dtype_name(dtype) -> str:
    """The safetensors name (``"F32"``, ``"BF16"``, ...) of a NumPy dtype."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _NAMES[dt]
    except KeyError:
        raise SafetensorsError(f"dtype {dt} has no safetensors equivalent; expected one of "
                               f"{sorted(str(d) for d in _NAMES)}") from None


def _no_duplicates(pairs: list) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise SafetensorsError(f"duplicate JSON key {k!r}")
        seen[k] = v
    return seen


def _is_count(x) -> bool:
    return type(x) is int and x >= 0  # not bool, not float: JSON 2.0 or true is no size


def _validate_header(path: str, header: dict, data_len: int) -> None:
    """The checks of the reference implementation: every entry has a known dtype, a shape of non-negative
    integers and ``[begin, end]`` offsets whose length is ``prod(shape) * itemsize``; sorted by offset, the tensors
    tile the data section exactly (no gap, no overlap, nothing before, nothing after)."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise SafetensorsError(f"{path}: tensor {name!r} is described by a JSON {type(entry).__name__}")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise SafetensorsError(f"{path}: tensor {name!r} has shape {shape!r}; expected a list of non-negative "
                                   "integers")
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise SafetensorsError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] "
                                   "with 0 <= begin <= end")
        nbytes = DTYPES[dtype].itemsize
        for d in shape:
            nbytes *= d
        if offsets[1] - offsets[0] != nbytes:
            raise SafetensorsError(f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes, expected "
                                   f"{nbytes} for {dtype} {shape}")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise SafetensorsError(f"{path}: tensor {name!r} at data_offsets [{begin}, {end}] {what}")
        position = end
    if position != data_len:
        raise SafetensorsError(f"{path}: the tensors cover {position} bytes but the data section holds {data_len}")


def _read_raw_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise SafetensorsError(f"{path}: header length {n} is implausible (not a safetensors file?)")
        if 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    if len(raw) != n:
        raise SafetensorsError(f"{path}: header truncated ({len(raw)} of {n} bytes)")
    if not raw.startswith(b"{"):
        raise SafetensorsError(f"{path}: header does not start with '{{' (not a safetensors file?)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    except SafetensorsError as e:
        raise SafetensorsError(f"{path}: header has a {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object")
    _validate_header(path, header, size - 8 - n)
    return header, 8 + n


def read_header(path: str) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "data_offsets"}}`` in file order (``__metadata__`` removed)."""
    header, _ = _read_raw_header(path)
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if entry.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
    return header


def read_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` string map of a file (``{}`` when absent)."""
    header, _ = _read_raw_header(path)
    return dict(header.get("__metadata__") or {})


def _load(path: str, name: str, entry: dict, data_start: int) -> np.ndarray:
    # The entry was checked by _validate_header (offsets tile the data section, sizes match the shape).
    dtype = DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if end == begin:
        return np.zeros(shape, dtype)
    if data_start + end > os.path.getsize(path):
        raise SafetensorsError(f"{path}: tensor {name!r} runs past the end of the file (was it truncated?)")
    mm = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
    try:
        return np.array(mm)  # copy out, so the mapping (and the file handle) is released now
    finally:
        del mm


def load_tensor(path: str, name: str) -> np.ndarray:
    """One tensor of a safetensors file (memory-mapped read of just its bytes, returned as a copy)."""
    header, data_start = _read_raw_header(path)
    if name not in header or name == "__metadata__":
        raise SafetensorsError(f"{path}: no tensor named {name!r}")
    entry = header[name]
    if entry.get("dtype") not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
    return _load(path, name, entry, data_start)


def iter_tensors(path: str, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` one tensor at a time (header parsed once); ``names`` picks and orders them."""
    header, data_start = _read_raw_header(path)
    header.pop("__metadata__", None)
    for name in (header if names is None else names):
        entry = header.get(name)
        if entry is None:
            raise SafetensorsError(f"{path}: no tensor named {name!r}")
        if entry.get("dtype") not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        yield name, _load(path, name, entry, data_start)


def load_file(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a file, in header order."""
    return dict(iter_tensors(path))


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (name → array, order kept) to ``path`` atomically.

    Arrays are written little-endian in C order. ``metadata`` is a ``str → str`` map (e.g. ``{"format": "pt"}``,
    which ``transformers`` expects of PyTorch checkpoints).
    """
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise SafetensorsError(f"metadata must map str to str; bad entries for keys {bad}")
        header["__metadata__"] = dict(metadata)
    arrays = []
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"invalid tensor name {name!r}")
        arr = np.asarray(value)
        dt = dtype_name(arr.dtype)
        arr = np.asarray(arr.astype(DTYPES[dt], copy=False), order="C")  # (ascontiguousarray would make 0-d 1-d)
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # align the data section to 8 bytes
    with atomic_file(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def _read_index(index: str) -> dict[str, str]:
    """The ``weight_map`` of a shard index, or a one-line :class:`SafetensorsError` saying what is wrong with it."""
    if not os.path.isfile(index):
        raise SafetensorsError(f"{index} is {_what_is(index)}; expected the JSON shard index file")
    try:
        with open(index, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise SafetensorsError(f"{index} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{index} is not valid JSON ({type(e).__name__})") from None
    except OSError as e:
        raise SafetensorsError(f"cannot read {index}: {e.strerror or e}") from None
    expected = "expected an object of tensor name -> shard file name"
    if not isinstance(data, dict):
        raise SafetensorsError(f"{index} holds a JSON {_json_type(data)}; expected an object with a 'weight_map'")
    if "weight_map" not in data:
        raise SafetensorsError(f"{index} has no 'weight_map' ({expected})")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise SafetensorsError(f"{index}: weight_map is a JSON {_json_type(weight_map)}; {expected}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise SafetensorsError(f"{index}: weight_map entry {name!r} -> {shard!r} is not a file name")
    return weight_map


def _json_type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__)


def _what_is(path: str) -> str:
    """``"missing"``, ``"a folder"``, ... for a path that is not a regular file (symlinks followed)."""
    if not os.path.lexists(path):
        return "missing"
    if not os.path.exists(path):
        return "a broken symbolic link"
    return "a folder" if os.path.isdir(path) else "not a regular file (a device, pipe or socket)"


def _shard_path(folder: str, index: str, shard: str, entry: str | None = None, within: str | None = None) -> str:
    """The shard's path, refusing absolute paths, ``..`` and anything (symlinks included) resolving outside
    ``folder`` (or ``within``: a hub cache snapshot's files are links into its repository's ``blobs``), and anything
    that is not a regular file there: an index may only name files of its own checkpoint.
    ``entry``, the first tensor the index maps to ``shard``, is named in the message."""
    what = f"{index}: weight_map entry {entry!r} names {shard!r}" if entry is not None else f"{index}: shard {shard!r}"
    parts = shard.replace("\\", "/").split("/")
    if os.path.isabs(shard) or shard.startswith(("/", "\\")) or ".." in parts or "\0" in shard:
        raise SafetensorsError(f"{what}, which is not a file name inside the folder {folder}")
    path = os.path.join(folder, shard)
    root = os.path.realpath(within or folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise SafetensorsError(f"{what}, which resolves to {os.path.realpath(path)}, outside {root}")
    if not os.path.isfile(path):
        kind = _what_is(path)
        kind = f"missing from {folder}" if kind == "missing" else kind
        raise SafetensorsError(f"{what}, which is {kind}; each entry must name a .safetensors file in the folder")
    return path


def list_tensors(folder: str, *, within: str | None = None) -> dict[str, TensorInfo]:
    """``{name: TensorInfo(file, dtype, shape)}`` for a checkpoint folder (or a single ``.safetensors`` file).

    A folder with ``model.safetensors.index.json`` is read through its ``weight_map`` (every listed shard must
    exist and hold the tensors it claims, and resolve inside ``folder``, or inside ``within`` when given);
    otherwise ``model.safetensors`` or, failing that, the folder's only ``*.safetensors`` file is used.
    """
    if os.path.isfile(folder):
        files = [folder]
        claimed = None
    else:
        index = os.path.join(folder, INDEX_NAME)
        if os.path.lexists(index):
            weight_map = _read_index(index)
            claimed = weight_map
            first_entry = {shard: name for name, shard in reversed(weight_map.items())}
            files = [_shard_path(folder, index, s, first_entry[s], within) for s in dict.fromkeys(weight_map.values())]
        else:
            claimed = None
            single = os.path.join(folder, "model.safetensors")
            cands = [single] if os.path.exists(single) else sorted(
                os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))
            if len(cands) != 1:
                raise SafetensorsError(f"{folder}: expected model.safetensors, {INDEX_NAME} or exactly one "
                                       f"*.safetensors file; found {[os.path.basename(c) for c in cands]}")
            files = cands
    out: dict[str, TensorInfo] = {}
    for file in files:
        if not os.path.isfile(file):
            raise SafetensorsError(f"{file} is {_what_is(file)}; expected a safetensors file")
        for name, entry in read_header(file).items():
            if name in out:
                raise SafetensorsError(f"tensor {name!r} appears in both {out[name].file} and {file}")
            out[name] = TensorInfo(file, DTYPES[entry["dtype"]], tuple(entry["shape"]))
    if claimed is not None:
        for name, shard in claimed.items():
            if name not in out:
                raise SafetensorsError(f"{folder}: {INDEX_NAME} maps {name!r} to {shard}, which does not hold it")
            if os.path.basename(out[name].file) != os.path.basename(shard):
                raise SafetensorsError(f"{folder}: {name!r} is mapped to {shard} but found in {out[name].file}")
        # Order as the index lists them, which is how transformers wrote them.
        out = {name: out[name] for name in claimed} | {n: i for n, i in out.items() if n not in claimed}
    return out
