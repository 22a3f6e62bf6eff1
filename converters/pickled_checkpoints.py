"""Read ``torch.save`` pickles of whole modules (the task-vectors paper's ``zeroshot.pt`` / ``<Task>/finetuned.pt``)
without torch, open_clip or the pickling code base, and without running any code from the file.

How it stays safe: a restricted unpickler resolves globals itself.

* A short allow-list maps to our own pure reimplementations (frozen, so ``BUILD`` cannot alter them):
  ``collections.OrderedDict``, ``set``, ``frozenset``, ``slice``, ``complex``, ``bytearray`` (from bytes/str
  only), ``copyreg._reconstructor`` (placeholders only),
  ``_codecs.encode`` (latin-1 only; protocol 2 encodes ``bytes`` this way), ``torch.Size``, ``torch.*Storage``
  (dtype markers), and ``torch._utils._rebuild_tensor[_v2]`` / ``_rebuild_parameter[_with_state]`` /
  ``_rebuild_from_type_v2`` (which build NumPy arrays from the stored bytes).
* Names from modules that can run code (``os``, ``posix``, ``subprocess``, ``sys``, ``importlib``, other
  ``builtins`` such as ``eval``/``exec``/``getattr``/``__import__``, ``pickle``, ``socket``, ...) raise
  :class:`UnsafeCheckpointError` before anything is called.
* Every other global (``open_clip.model.CLIP``, ``torch.nn.modules.linear.Linear``, enums, functions) becomes an
  inert :class:`Placeholder` class: "calling" it (``NEWOBJ``, ``REDUCE``) only records the arguments and
  ``BUILD`` records the state, so no constructor, ``__setstate__`` or ``__reduce__`` target from the file runs.

Formats: the zip format (``<archive>/data.pkl`` + ``<archive>/data/<key>`` raw little-endian storages, the
default since torch 1.6) and the legacy stream format (magic number, protocol, sys info, pickle, storage keys,
then each storage as an 8-byte element count and its bytes). Tensors are rebuilt from (storage, offset,
size, stride) as C-contiguous NumPy arrays (``bfloat16`` via ml_dtypes).

:func:`module_state_dict` walks ``_parameters`` / ``_buffers`` (minus ``_non_persistent_buffers_set``) /
``_modules`` like ``torch.nn.Module.state_dict()``.

>>> from converters.pickled_checkpoints import load_task_vectors_checkpoint   # doctest: +SKIP
>>> state = load_task_vectors_checkpoint("checkpoints/ViT-B-32/MNIST/finetuned.pt")   # doctest: +SKIP
>>> state["model.visual.conv1.weight"].shape                                   # doctest: +SKIP
(768, 3, 32, 32)
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Iterator, NamedTuple

import ml_dtypes
import numpy as np

__all__ = ["UnsafeCheckpointError", "CheckpointFormatError", "Placeholder", "load_pickled_object",
           "module_state_dict", "load_task_vectors_checkpoint", "STORAGE_DTYPES"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle references a callable that could run code; nothing from it was executed."""


class CheckpointFormatError(ValueError):
    """The file is not a torch checkpoint we can read (or holds an unsupported tensor kind)."""


STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16), "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"), "ComplexFloatStorage": np.dtype("<c8"), "ComplexDoubleStorage": np.dtype("<c16"),
    "UntypedStorage": np.dtype("u1"),
}

# Modules whose globals can execute code, touch the system or reach arbitrary objects: never resolved.
_UNSAFE_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "importlib", "runpy", "shutil", "socket",
    "ctypes", "pickle", "_pickle", "marshal", "code", "codeop", "pty", "webbrowser", "multiprocessing", "asyncio",
    "signal", "operator", "functools", "types", "io", "pathlib", "tempfile", "platform", "pdb", "bdb", "timeit",
    "inspect", "threading", "_thread", "gc", "glob", "zipimport", "pkgutil", "distutils", "setuptools", "pip",
    "urllib", "http", "ftplib", "smtplib", "requests", "shelve", "dill", "cloudpickle", "joblib", "_io", "_os",
    "_posixsubprocess", "commands", "popen2", "imp", "site", "sysconfig", "uuid", "select", "mmap", "resource",
    "_ctypes", "copyreg", "copy_reg", "_codecs", "codecs", "_operator", "_functools", "weakref",
}
# Within packages whose other names are harmless as inert placeholders (dtypes, devices, module classes).
_UNSAFE_PREFIXES = ("torch.hub", "torch.jit", "torch.load", "torch.package", "torch.utils.cpp_extension",
                    "torch._dynamo", "torch.compile", "torch.serialization", "torch.ops", "torch._C._jit",
                    "torch.utils.data", "numpy.load", "numpy.testing", "numpy.f2py", "numpy.distutils",
                    "numpy.ctypeslib", "numpy.lib.npyio", "numpy.lib.format")


class Placeholder:
    """Inert stand-in for a class the checkpoint names but we do not import.

    ``qualname`` (class attribute): ``"module.Name"``. Instances record what the pickle gave them: ``args``
    (constructor/``__reduce__`` arguments), ``state`` (``BUILD`` state, usually the object's ``__dict__``),
    ``items`` / ``list_items`` (for dict-/list-like objects).
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "state", None)
        object.__setattr__(self, "items", {})
        object.__setattr__(self, "list_items", [])
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    @property
    def attrs(self) -> dict:
        """The recorded ``__dict__`` (``state`` may be ``(dict, slots)``), or ``{}``."""
        s = self.state
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], (dict, type(None))):
            merged = dict(s[0] or {})
            merged.update(s[1] or {})
            return merged
        return s if isinstance(s, dict) else {}

    def __repr__(self):
        return f"<Placeholder {type(self).qualname}>"


class _StorageType(NamedTuple):
    """What ``torch.FloatStorage`` etc. unpickle to: just the element dtype (immutable, so ``BUILD`` can't edit it)."""

    name: str
    dtype: np.dtype


class _Safe:
    """An allow-listed callable, frozen: a pickle's ``BUILD``/``setattr`` cannot alter the shared object."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __setattr__(self, key, value):
        raise UnsafeCheckpointError(f"checkpoint tried to set {key!r} on allow-listed {self.fn!r}; refused")

    def __repr__(self):
        return f"<allowed {getattr(self.fn, '__name__', self.fn)!r}>"


class _Storage:
    """A storage's bytes viewed as its element dtype (1-D)."""

    def __init__(self, data: np.ndarray):
        self.data = data


_MAX_NDIM = 32


def _int_tuple(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(type(v) is int for v in x):
        raise CheckpointFormatError(f"tensor {what} {x!r} is not a tuple of integers")
    return tuple(x)


def _check_no_aliasing(size: tuple[int, ...], stride: tuple[int, ...]) -> None:
    # Sorted by stride, each dimension must step over everything the faster ones span; otherwise two indices
    # share an element (stride 0 with size > 1, or overlapping strides), which torch.save never writes for a
    # real tensor and which would let a few stored bytes expand into an arbitrarily large copy.
    extent = 1
    for st, n in sorted((st, n) for n, st in zip(size, stride) if n > 1):
        if st < extent:
            raise CheckpointFormatError(f"tensor size {size} with stride {stride} reads some elements more than "
                                        "once (aliasing strides are not supported)")
        extent += st * (n - 1)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    size = _int_tuple(size, "size")
    stride = _int_tuple(stride, "stride")
    if type(storage_offset) is not int:
        raise CheckpointFormatError(f"tensor storage offset {storage_offset!r} is not an integer")
    if len(size) != len(stride):
        raise CheckpointFormatError(f"tensor size {size} and stride {stride} differ in rank")
    if len(size) > _MAX_NDIM:
        raise CheckpointFormatError(f"tensor of rank {len(size)} (at most {_MAX_NDIM} supported)")
    if any(n < 0 for n in size) or any(st < 0 for st in stride) or storage_offset < 0:
        raise CheckpointFormatError(f"tensor (offset {storage_offset}, size {size}, stride {stride}) has a negative "
                                    "entry")
    data = storage.data
    offset = storage_offset
    if any(n == 0 for n in size):
        return np.zeros(size, data.dtype)
    numel = 1
    for n in size:
        numel *= n
    if numel > data.size - offset:  # bounded by the elements actually stored, whatever the strides say
        raise CheckpointFormatError(f"tensor of size {size} ({numel} elements from offset {offset}) needs more than "
                                    f"its storage's {data.size} elements")
    _check_no_aliasing(size, stride)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= data.size:
        raise CheckpointFormatError(f"tensor (offset {offset}, size {size}, stride {stride}) reaches past its "
                                    f"storage of {data.size} elements")
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=size,
                                           strides=tuple(st * data.itemsize for st in stride), writeable=False)
    return np.array(view, order="C")  # a copy, so the storage can be freed; keeps 0-d tensors 0-d


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_ignored):
    return data


class _LazyTensor:
    """A tensor of a legacy checkpoint, whose storage bytes come after the pickle: rebuilt at the end."""

    def __init__(self, storage: "_Storage", args: tuple):
        self.storage, self.args = storage, args


def _lazy_rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _LazyTensor:
    return _LazyTensor(storage, (storage_offset, size, stride))


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensor subclasses/tensors with Python state: build the plain tensor, drop the type and state.
    if getattr(func, "fn", None) not in (_rebuild_tensor, _lazy_rebuild_tensor, _rebuild_parameter):
        raise CheckpointFormatError(f"unsupported tensor rebuild function {func!r}")
    return func(*args)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor (protocol < 2 objects): only ever instantiates placeholders or plain object.
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        return cls.__new__(cls)
    if getattr(cls, "fn", None) is collections.OrderedDict:
        return collections.OrderedDict()
    raise UnsafeCheckpointError(f"copyreg._reconstructor of {cls!r} refused")


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} refused")
    return obj.encode("latin1")


def _torch_size(*args):
    return tuple(args[0]) if len(args) == 1 else tuple(args)


def _bytearray(*args):
    # bytearray(n) would allocate n bytes: only the (bytes) and (str, encoding) forms pickles use are accepted.
    if args and not isinstance(args[0], (bytes, str)):
        raise UnsafeCheckpointError(f"bytearray({type(args[0]).__name__}) refused")
    return bytearray(*args)


_SAFE_BUILTINS: dict[str, Any] = {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex,
                                  "bytearray": _bytearray}

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): _torch_size,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._utils", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}
_ALLOWED.update({("builtins", n): f for n, f in _SAFE_BUILTINS.items()})
_ALLOWED.update({("__builtin__", n): f for n, f in _SAFE_BUILTINS.items()})
_ALLOWED = {k: _Safe(f) for k, f in _ALLOWED.items()}
_ALLOWED.update({(m, n): _StorageType(n, STORAGE_DTYPES[n]) for n in STORAGE_DTYPES for m in ("torch", "torch.storage")})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage: Callable[[tuple], Any], rebuild_tensor: Callable = _rebuild_tensor):
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage
        self._placeholders: dict[tuple[str, str], type] = {}
        safe = _Safe(rebuild_tensor)
        self._overrides = {("torch._utils", "_rebuild_tensor"): safe, ("torch._utils", "_rebuild_tensor_v2"): safe}

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in self._overrides:
            return self._overrides[key]
        if key in _ALLOWED:
            return _ALLOWED[key]
        full = f"{module}.{name}"
        root = module.split(".")[0]
        if module == "torch._utils":
            raise CheckpointFormatError(f"unsupported tensor kind {full} (sparse/quantized/meta tensors are "
                                        f"not supported)")
        if root in _UNSAFE_MODULES or full.startswith(_UNSAFE_PREFIXES):
            raise UnsafeCheckpointError(f"checkpoint references {full}, which could run code; refused (nothing "
                                        f"from the file was executed)")
        if key not in self._placeholders:
            self._placeholders[key] = type(name.split(".")[-1], (Placeholder,), {"qualname": full,
                                                                                "__module__": __name__})
        return self._placeholders[key]

    def persistent_load(self, pid):
        return self._load_storage(pid)


def _storage_dtype(storage_type, where: str) -> np.dtype:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype
    raise CheckpointFormatError(f"{where}: storage type {storage_type!r} is not a torch storage type")


_MAX_PICKLE_BYTES = 1 << 30
"""``data.pkl`` (the object graph, not the tensors) is refused beyond this many bytes."""
_MAX_EXPANSION = 20
"""All entries read from a zip checkpoint together may hold at most this many times the archive's size (+1 MiB).
torch stores entries uncompressed, so a real checkpoint reads about its own size; a zip bomb stops here."""


class _ZipBudget:
    """Reads zip entries in chunks, never more than an entry's declared need nor the archive's total budget."""

    def __init__(self, zf: zipfile.ZipFile, path: str):
        self.zf, self.path = zf, path
        self.left = _MAX_EXPANSION * os.path.getsize(path) + (1 << 20)

    def read(self, name: str, limit: int, what: str) -> bytes:
        out = bytearray()
        with self.zf.open(name) as f:
            while len(out) < limit:
                chunk = f.read(min(1 << 20, limit - len(out)))
                if not chunk:
                    break
                self.left -= len(chunk)
                if self.left < 0:
                    raise CheckpointFormatError(f"{self.path}: {what} expands to more than {_MAX_EXPANSION}x the "
                                                "archive's size (a zip bomb?); refused")
                out += chunk
        return bytes(out)


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        pkls = sorted(n for n in names if n.endswith("data.pkl") and n.count("/") == 1)
        if len(pkls) != 1:
            raise CheckpointFormatError(f"{path}: expected one '<archive>/data.pkl' entry, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        budget = _ZipBudget(zf, path)
        big_endian = False
        if prefix + "byteorder" in names:
            big_endian = budget.read(prefix + "byteorder", 16, "byteorder").decode("latin1").strip() == "big"
        raw_bytes: dict[str, np.ndarray] = {}
        typed: dict[tuple[str, np.dtype], np.ndarray] = {}

        def load_storage(pid):
            if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
                raise CheckpointFormatError(f"{path}: unknown persistent id {pid!r}")
            _, storage_type, key, _location, numel = pid[:5]
            dtype = _storage_dtype(storage_type, path)
            if type(numel) is not int or numel < 0:
                raise CheckpointFormatError(f"{path}: storage size {numel!r} is not a non-negative integer")
            if not isinstance(key, (str, bytes)):
                raise CheckpointFormatError(f"{path}: storage key {key!r} is not a string")
            key = key.decode("latin1") if isinstance(key, bytes) else key
            need = numel * dtype.itemsize
            if key not in raw_bytes or raw_bytes[key].size < need:
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise CheckpointFormatError(f"{path}: storage {entry} is missing")
                # Only the bytes the pickle declares are read (and at most what the entry really holds).
                raw_bytes[key] = np.frombuffer(budget.read(entry, need, f"storage {key}"), dtype=np.uint8)
                for stale in [k for k in typed if k[0] == key]:
                    del typed[stale]
            raw = raw_bytes[key]
            if raw.size < need:
                raise CheckpointFormatError(f"{path}: storage {key} holds {raw.size} bytes, expected {need} "
                                            f"({numel} elements of {dtype})")
            if (key, dtype) not in typed:
                usable = raw[: raw.size - raw.size % dtype.itemsize]
                if big_endian and dtype.itemsize > 1:
                    typed[key, dtype] = usable.view(dtype.newbyteorder(">")).astype(dtype)
                else:
                    typed[key, dtype] = usable.view(dtype)
            return _Storage(typed[key, dtype])

        data = budget.read(pkls[0], _MAX_PICKLE_BYTES + 1, "data.pkl")
        if len(data) > _MAX_PICKLE_BYTES:
            raise CheckpointFormatError(f"{path}: data.pkl is larger than {_MAX_PICKLE_BYTES} bytes; refused")
        return _RestrictedUnpickler(io.BytesIO(data), load_storage).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _safe_plain_load(f) -> Any:
    # The legacy header records (magic, protocol, sys info, storage keys) are plain data: no globals at all.
    class _NoGlobals(pickle.Unpickler):
        def find_class(self, module, name):
            raise UnsafeCheckpointError(f"legacy checkpoint header references {module}.{name}; refused")

    return _NoGlobals(f, encoding="utf-8").load()


class _Bounded:
    """A read-only view of a file that never asks it for more than the bytes left, so a pickle declaring a huge
    string or bytes object cannot make the reader allocate it."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def _left(self) -> int:
        return max(self.size - self.f.tell(), 0)

    def read(self, n: int = -1) -> bytes:
        left = self._left()
        return self.f.read(left if n is None or n < 0 else min(n, left))

    def readinto(self, b) -> int:
        view = memoryview(b)[: self._left()]
        return self.f.readinto(view)

    def readline(self, limit: int = -1) -> bytes:
        left = self._left()
        return self.f.readline(left if limit is None or limit < 0 else min(limit, left))

    def peek(self, n: int = 0) -> bytes:
        # Lets the C unpickler prefetch a buffer at a time instead of one read call per opcode.
        return self.f.peek(n)[: self._left()]


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as raw_file:
        size = os.fstat(raw_file.fileno()).st_size
        f = _Bounded(raw_file, size)
        try:
            magic = _safe_plain_load(f)
        except UnsafeCheckpointError:
            raise
        except Exception as e:
            raise CheckpointFormatError(f"{path}: neither a torch zip checkpoint nor a legacy one ({e})") from None
        if magic != _LEGACY_MAGIC:
            raise CheckpointFormatError(f"{path}: not a torch checkpoint (bad magic number)")
        _protocol, _sys_info = _safe_plain_load(f), _safe_plain_load(f)
        roots: dict[str, tuple[np.dtype, int]] = {}
        pending: list[tuple[_Storage, str, int, int]] = []

        def count(x, what):
            if type(x) is not int or x < 0:
                raise CheckpointFormatError(f"{path}: storage {what} {x!r} is not a non-negative integer")
            return x

        def load_storage(pid):
            if not isinstance(pid, tuple) or not pid:
                raise CheckpointFormatError(f"{path}: unknown persistent id {pid!r}")
            kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
            if kind == "module" and len(pid) > 1:
                return pid[1]  # (module, class, source file, source): the class, a placeholder
            if kind != "storage" or len(pid) < 6:
                raise CheckpointFormatError(f"{path}: unknown persistent id {pid!r}")
            storage_type, root_key, _location, numel, view = pid[1:6]
            dtype = _storage_dtype(storage_type, path)
            numel = count(numel, "size")
            if roots.setdefault(str(root_key), (dtype, numel)) != (dtype, numel):
                raise CheckpointFormatError(f"{path}: storage {root_key} is declared twice with different types")
            holder = _Storage(np.zeros(0, dtype))
            if view is not None:
                if not isinstance(view, tuple) or len(view) != 3:
                    raise CheckpointFormatError(f"{path}: storage view {view!r} is not (key, offset, size)")
                _view_key, offset, vsize = view
                pending.append((holder, str(root_key), count(offset, "offset"), count(vsize, "size")))
            else:
                pending.append((holder, str(root_key), 0, numel))
            return holder

        result = _RestrictedUnpickler(f, load_storage, rebuild_tensor=_lazy_rebuild_tensor).load()
        keys = _safe_plain_load(f)
        if not isinstance(keys, list):
            raise CheckpointFormatError(f"{path}: the storage key list is a {type(keys).__name__}")
        data: dict[str, np.ndarray] = {}
        for key in keys:
            key = str(key)
            if key not in roots:
                raise CheckpointFormatError(f"{path}: storage key {key} was never referenced")
            dtype, numel = roots[key]
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointFormatError(f"{path}: storage {key} is truncated")
            (n,) = struct.unpack("<q", head)
            if n != numel:
                raise CheckpointFormatError(f"{path}: storage {key} has {n} elements, expected {numel}")
            nbytes = n * dtype.itemsize
            if nbytes > size - raw_file.tell():  # bounded by the bytes the file really holds
                raise CheckpointFormatError(f"{path}: storage {key} declares {nbytes} bytes but only "
                                            f"{size - raw_file.tell()} remain (truncated)")
            data[key] = np.frombuffer(f.read(nbytes), dtype=dtype)
        for holder, key, offset, vsize in pending:
            if key not in data:
                raise CheckpointFormatError(f"{path}: storage {key} has no data")
            if offset + vsize > data[key].size:
                raise CheckpointFormatError(f"{path}: view [{offset}, {offset + vsize}) of storage {key} reaches past "
                                            f"its {data[key].size} elements")
            holder.data = data[key][offset: offset + vsize]
    return _materialize(result, {}, 0)


_MAX_DEPTH = 200
"""Containers nested deeper than this in a legacy checkpoint's object graph are refused."""
_MAX_MODULE_DEPTH = 64
"""Modules nested deeper than this are refused (real models: about ten)."""


@contextlib.contextmanager
def _format_errors(path: str) -> Iterator[None]:
    # Whatever a malformed pickle makes Python raise (BUILD on an allow-listed value, a truncated stream, an
    # object graph too deep, a bad zip) is reported as what it is: a file we cannot read, in one line.
    try:
        yield
    except (CheckpointFormatError, UnsafeCheckpointError, FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except RecursionError:
        raise CheckpointFormatError(f"{path}: object graph nested too deeply; refused") from None
    except MemoryError:
        raise CheckpointFormatError(f"{path}: declares an object too large to hold; refused") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error, AttributeError,
            TypeError, ValueError, LookupError, OverflowError, UnicodeError, OSError, NotImplementedError) as e:
        message = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointFormatError(f"{path}: malformed checkpoint ({type(e).__name__}: {message[:200]})") from None


def load_pickled_object(path: str) -> Any:
    """Unpickle a ``torch.save`` file safely: modules come back as :class:`Placeholder` trees, tensors as NumPy.

    Raises :class:`UnsafeCheckpointError` (code-running globals) or :class:`CheckpointFormatError` (anything else
    wrong with the file, including storages larger than the bytes present, aliasing strides, zip bombs, object
    graphs nested too deeply and ``BUILD`` on allow-listed values).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    with _format_errors(path):
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)


def _materialize(obj: Any, memo: dict, depth: int) -> Any:
    # Containers are registered in memo before their items are visited, so a list or dict holding itself
    # (a cycle) comes back as the same cyclic object instead of recursing forever.
    if id(obj) in memo:
        return memo[id(obj)]
    if depth > _MAX_DEPTH:
        raise CheckpointFormatError(f"object graph nested deeper than {_MAX_DEPTH} levels; refused")
    d = depth + 1
    if isinstance(obj, _LazyTensor):
        out = _rebuild_tensor(obj.storage, *obj.args)
    elif isinstance(obj, Placeholder):
        memo[id(obj)] = obj
        object.__setattr__(obj, "state", _materialize(obj.state, memo, d))
        object.__setattr__(obj, "args", _materialize(obj.args, memo, d))
        for k, v in list(obj.items.items()):
            obj.items[k] = _materialize(v, memo, d)
        obj.list_items[:] = [_materialize(v, memo, d) for v in obj.list_items]
        return obj
    elif isinstance(obj, dict):
        out = type(obj)()
        memo[id(obj)] = out
        for k, v in obj.items():
            out[k] = _materialize(v, memo, d)
        return out
    elif isinstance(obj, list):
        out = []
        memo[id(obj)] = out
        for v in obj:
            out.append(_materialize(v, memo, d))
        return out
    elif isinstance(obj, tuple):
        out = tuple([_materialize(v, memo, d) for v in obj])
    else:
        out = obj
    memo[id(obj)] = out
    return out


def _mapping(attrs: dict, name: str, trail: str) -> dict:
    value = attrs.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CheckpointFormatError(f"module at {trail or '<root>'}: {name} is {type(value).__name__}, expected a "
                                    "dict of names")
    return value


def module_state_dict(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """``module.state_dict()`` of an unpickled module tree (parameters, persistent buffers, then children).

    A module reached twice (a cycle, or a submodule shared by two parents) and trees deeper than
    :data:`_MAX_MODULE_DEPTH` raise :class:`CheckpointFormatError`: a few KB of pickle could otherwise describe
    a DAG with exponentially many paths.
    """
    out: dict[str, np.ndarray] = {}
    seen: dict[int, str] = {}
    on_path: set[int] = set()

    def walk(node, pre, trail, depth):
        where = trail or "<root>"
        if depth > _MAX_MODULE_DEPTH:
            raise CheckpointFormatError(f"modules nested deeper than {_MAX_MODULE_DEPTH} levels at {where}; refused")
        if id(node) in on_path:
            raise CheckpointFormatError(f"module at {where} contains itself (a cycle); refused")
        if id(node) in seen:
            raise CheckpointFormatError(f"module at {where} is the same object as the one at {seen[id(node)]} "
                                        "(shared submodules are not supported)")
        attrs = node.attrs if isinstance(node, Placeholder) else None
        if attrs is None or "_parameters" not in attrs:
            what = repr(node) if isinstance(node, Placeholder) else type(node).__name__
            raise CheckpointFormatError(f"object at {where} ({what}) is not a torch module")
        seen[id(node)] = where
        on_path.add(id(node))
        non_persistent = attrs.get("_non_persistent_buffers_set") or set()
        if not isinstance(non_persistent, (set, frozenset, list, tuple)):
            raise CheckpointFormatError(f"module at {where}: _non_persistent_buffers_set is "
                                        f"{type(non_persistent).__name__}")
        for name, p in _mapping(attrs, "_parameters", trail).items():
            if p is not None:
                out[pre + name] = _as_array(p, pre + name)
        for name, b in _mapping(attrs, "_buffers", trail).items():
            if b is not None and name not in non_persistent:
                out[pre + name] = _as_array(b, pre + name)
        for name, child in _mapping(attrs, "_modules", trail).items():
            if child is not None:
                walk(child, pre + name + ".", pre + name, depth + 1)
        on_path.discard(id(node))

    walk(obj, prefix, prefix.rstrip("."), 0)
    return out


def _as_array(x: Any, key: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        what = repr(x) if isinstance(x, Placeholder) else type(x).__name__
        raise CheckpointFormatError(f"state entry {key!r} is {what}, expected a tensor")
    return x


def load_task_vectors_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Flat state dict (dotted names → NumPy arrays) of a task-vectors checkpoint.

    Accepts a pickled whole module (``ImageEncoder``: keys like ``model.visual.conv1.weight``), a pickled
    state dict, or a dict holding one under ``"state_dict"``/``"model_state_dict"``.
    """
    obj = load_pickled_object(path)
    with _format_errors(path):
        if isinstance(obj, Placeholder):
            return module_state_dict(obj)
        if isinstance(obj, dict):
            for k in ("state_dict", "model_state_dict"):
                if isinstance(obj.get(k), dict):
                    obj = obj[k]
                    break
            if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
                if not all(isinstance(k, str) for k in obj):
                    raise CheckpointFormatError(f"{path}: state dict has non-string keys")
                return dict(obj)
            for k in ("model", "module"):
                if isinstance(obj.get(k), Placeholder):
                    return module_state_dict(obj[k])
    raise CheckpointFormatError(f"{path}: holds {type(obj).__name__}, neither a module nor a state dict")
