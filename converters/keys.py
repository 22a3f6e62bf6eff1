"""Family-neutral pieces of every checkpoint converter: the key rule, the leaf map, matching and writing back.

A Flax model in :mod:`catmerge_jax.models` names its modules after the PyTorch ones, so the checkpoint key of every
Flax leaf is derived mechanically from its path (:func:`hf_key`): ``a/b/kernel`` ↔ ``a.b.weight`` (transposed; a
4-D conv kernel ``(kh, kw, in, out)`` ↔ ``(out, in, kh, kw)``), ``scale``/``embedding`` ↔ ``weight``, ``bias`` ↔
``bias``, other names unchanged. :func:`match_state` maps a flat checkpoint onto a model's leaves (traced with
``jax.eval_shape``, :func:`template_shapes`) and records how in a :class:`ConversionMeta`; :func:`flax_to_hf_state`
writes a tree back with the checkpoint's keys, order and dtypes.

Every family module (:mod:`converters.bert_clip`, :mod:`converters.blip`, :mod:`converters.decoder`,
:mod:`converters.open_clip`) builds on this module and none on another: :mod:`converters.hf` reaches the families
only through the table :data:`converters.families.FAMILY_MODULES`, so the converters import no cycle.

>>> hf_key("encoder/layer/0/attention/query/kernel", "bert.")
('bert.encoder.layer.0.attention.query.weight', 'kernel', None)
>>> hf_key("embeddings/LayerNorm/scale")
('embeddings.LayerNorm.weight', 'none', None)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np

__all__ = ["ConversionError", "LeafMap", "ConversionMeta", "hf_key", "to_flax_layout", "to_torch_layout",
           "template_shapes", "remember_template_shapes", "match_state", "flax_to_hf_state"]

class ConversionError(ValueError):
    """A checkpoint's keys or shapes don't match the model, or a folder lacks what is needed."""


@dataclasses.dataclass(frozen=True)
class LeafMap:
    """One Flax leaf ↔ one checkpoint tensor. ``transform``: ``"none"``, ``"transpose"`` (Linear) or
    ``"conv"`` (Conv2d ``(out, in, kh, kw)`` ↔ ``(kh, kw, in, out)``); ``dtype``/``shape`` are the checkpoint's."""

    path: str
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    transform: str


@dataclasses.dataclass
class ConversionMeta:
    """What is needed to write a Flax tree back as the original checkpoint.

    ``leaves``: Flax path → :class:`LeafMap`. ``aside``: checkpoint tensors that are not Flax leaves (kept
    unchanged). ``key_order``: every checkpoint key in its original order. ``shards``: key → shard file name
    for sharded checkpoints (else ``None``). ``metadata``: the safetensors ``__metadata__``. ``options``:
    model constructor options read from the keys (``add_pooler`` / ``with_projection`` / ``layout``).
    """

    model_kind: str
    config: dict
    leaves: dict[str, LeafMap]
    aside: dict[str, np.ndarray]
    key_order: list[str]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    shards: dict[str, str] | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    # Tied copies kept aside (key -> source key), rewritten from their source on export (BLIP's LM head).
    ties: dict[str, str] = dataclasses.field(default_factory=dict)

    def key_of(self, path: str) -> str:
        return self.leaves[path].key

    def path_of(self, key: str) -> str:
        for leaf in self.leaves.values():
            if leaf.key == key:
                return leaf.path
        raise KeyError(f"checkpoint key {key!r} is not a Flax leaf")


# ----------------------------------------------------------------------------------------------- mapping rules

def hf_key(path: str, prefix: str = "") -> tuple[str, str, int | None]:
    """``(key, transform, expected_ndim)`` for a Flax leaf path; see the module docstring for the rule."""
    *mods, name = path.split("/")
    if name == "kernel":
        return prefix + ".".join(mods + ["weight"]), "kernel", None
    if name in ("scale", "embedding"):
        return prefix + ".".join(mods + ["weight"]), "none", None
    return prefix + ".".join(mods + [name]), "none", None


def _kernel_transform(ndim: int, path: str) -> str:
    if ndim == 2:
        return "transpose"
    if ndim == 4:
        return "conv"
    raise ConversionError(f"leaf {path}: a kernel of rank {ndim} has no PyTorch mapping (expected 2 or 4)")


def to_flax_layout(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "transpose":
        return x.T
    if transform == "conv":
        return x.transpose(2, 3, 1, 0)
    return x


def to_torch_layout(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "transpose":
        return x.T
    if transform == "conv":
        return x.transpose(3, 2, 0, 1)
    return x


def template_shapes(model, *example_args) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of a linen model's params, traced with ``jax.eval_shape`` (nothing is computed).

    Remembered per (model, argument shapes): a merge reads the base and every task folder with the same model,
    and tracing its ``init`` is most of the time of reading a small checkpoint."""
    try:
        key = (model, tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in example_args))
        hash(key)
    except TypeError:  # an unhashable model: trace every time
        return _template_shapes(model, *example_args)
    with _TEMPLATE_LOCK:  # folders read on two threads (pipeline.load_tasks) trace the model once, not twice
        if key not in _TEMPLATE_SHAPES:
            folder = _TEMPLATE_FOLDER[0]
            shapes = None if folder is None else _read_shapes(folder, model, key[1])
            if shapes is None:
                shapes = _template_shapes(model, *example_args)
                if folder is not None:
                    _write_shapes(folder, model, key[1], shapes)
            _TEMPLATE_SHAPES[key] = shapes
        return dict(_TEMPLATE_SHAPES[key])


_TEMPLATE_SHAPES: dict = {}
_TEMPLATE_LOCK = threading.Lock()
_TEMPLATE_FOLDER: list = [None]


def remember_template_shapes(folder: str | None) -> None:
    """Keep :func:`template_shapes` on disk in ``folder`` too (``None``: in memory only, the default), so that a
    new process reads a model's parameter shapes instead of tracing its ``init`` (0.3 s for BERT, every
    ``catmerge`` run). ``catmerge`` turns it on with its compilation cache
    (:func:`catmerge_jax.compilation_cache.shapes_cache_dir`).

    An entry's name hashes the model (its dataclass fields, config included), the example arguments' shapes, the
    jax and flax versions and the source of the model definitions and converters here, so an edited model or a
    new version never reads an old entry; an unreadable or malformed entry is traced again."""
    _TEMPLATE_FOLDER[0] = None if folder is None else os.fspath(folder)


@functools.lru_cache(maxsize=1)
def _sources_digest() -> bytes:
    """A digest of the model and converter sources (an edited model must not read shapes of the old one)."""
    import catmerge_jax.models as models

    digest = hashlib.sha256()
    for package in (os.path.dirname(models.__file__), os.path.dirname(os.path.abspath(__file__))):
        for name in sorted(os.listdir(package)):
            if name.endswith(".py"):
                with open(os.path.join(package, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read())
    return digest.digest()


def _shapes_file(folder: str, model, arg_key) -> str:
    import flax

    digest = hashlib.sha256(repr((type(model).__module__, type(model).__qualname__, repr(model), arg_key,
                                  jax.__version__, flax.__version__)).encode())
    digest.update(_sources_digest())
    return os.path.join(folder, digest.hexdigest()[:32] + ".json")


def _read_shapes(folder: str, model, arg_key) -> dict[str, tuple[int, ...]] | None:
    try:
        with open(_shapes_file(folder, model, arg_key), encoding="utf-8") as f:
            stored = json.load(f)
        shapes = {str(p): tuple(int(n) for n in shape) for p, shape in stored["shapes"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return shapes or None


def _write_shapes(folder: str, model, arg_key, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Write one entry atomically (a temporary file renamed in); a folder that cannot be written is skipped."""
    path = _shapes_file(folder, model, arg_key)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"model": type(model).__qualname__, "shapes": {p: list(s) for p, s in shapes.items()}},
                          f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError:
        pass


def _template_shapes(model, *example_args) -> dict[str, tuple[int, ...]]:
    from catmerge_jax.tree import leaves_with_paths

    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example_args))["params"]
    return {p: tuple(s.shape) for p, s in leaves_with_paths(shapes)}


def match_state(state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                key_fn: Callable[[str], tuple[str, str, int | None]], is_aside: Callable[[str], bool],
                *, dtype=np.float32, model_kind: str, config: dict, options: dict | None = None
                ) -> tuple[dict, ConversionMeta]:
    """Map a flat checkpoint onto a template of Flax leaves.

    ``key_fn(path) -> (key, transform, _)`` names each leaf's checkpoint key; keys that are no leaf's and
    for which ``is_aside(key)`` holds are kept aside; any other key is an error naming it. ``dtype`` is the
    dtype of the returned leaves (``None`` keeps the checkpoint's). Returns ``(params, meta)``, ``params``
    a nested dict of NumPy arrays.
    """
    from catmerge_jax.tree import nest_paths

    leaves: dict[str, LeafMap] = {}
    flat: dict[str, np.ndarray] = {}
    wanted: dict[str, str] = {}
    for path, shape in shapes.items():
        key, transform, _ = key_fn(path)
        if key in wanted:
            raise ConversionError(f"leaves {wanted[key]} and {path} both map to checkpoint key {key!r}")
        wanted[key] = path
        if key not in state:
            raise ConversionError(f"{model_kind} checkpoint lacks key {key!r} (for Flax leaf {path}, shape {shape})")
        value = np.asarray(state[key])
        if transform == "kernel":
            transform = _kernel_transform(len(shape), path)
        flax_value = to_flax_layout(value, transform)
        if tuple(flax_value.shape) != tuple(shape):
            raise ConversionError(f"checkpoint key {key!r} has shape {tuple(value.shape)}; Flax leaf {path} expects "
                                  f"{tuple(shape)} (after '{transform}')")
        leaves[path] = LeafMap(path, key, value.dtype, tuple(value.shape), transform)
        # one copy that casts and lays out at once (astype would keep a transposed view's order: a second copy)
        flat[path] = (np.asarray(flax_value, order="C") if dtype is None
                      else np.array(flax_value, dtype=dtype, order="C"))
    aside = {}
    for key in state:
        if key in wanted:
            continue
        if not is_aside(key):
            raise ConversionError(f"unknown checkpoint key {key!r}: not a leaf of the {model_kind} model and not a "
                                  f"known head/buffer")
        aside[key] = np.asarray(state[key])
    meta = ConversionMeta(model_kind=model_kind, config=dict(config), leaves=leaves, aside=aside,
                          key_order=list(state), options=dict(options or {}))
    return nest_paths(flat), meta


def flax_to_hf_state(params, meta: ConversionMeta) -> dict[str, np.ndarray]:
    """Flax params (as produced by :func:`converters.hf.hf_state_to_flax`, possibly edited) → flat checkpoint dict.

    Keys, order, shapes and dtypes are the original checkpoint's (aside tensors included unchanged); leaves are
    cast back to the checkpoint dtype. A missing/extra leaf or a wrong shape is an error naming its path.
    """
    from catmerge_jax.tree import leaves_with_paths

    flat = dict(leaves_with_paths(params))
    missing = [p for p in meta.leaves if p not in flat]
    extra = [p for p in flat if p not in meta.leaves]
    if missing or extra:
        raise ConversionError(f"params do not match the checkpoint layout: missing leaves {missing[:5]}, "
                              f"unexpected leaves {extra[:5]}")
    by_key: dict[str, np.ndarray] = {}
    for path, leaf in meta.leaves.items():
        value = np.asarray(jax.device_get(flat[path]))
        torch_value = to_torch_layout(value, leaf.transform)
        if tuple(torch_value.shape) != leaf.shape:
            raise ConversionError(f"leaf {path} has shape {value.shape}; checkpoint key {leaf.key!r} needs "
                                  f"{leaf.shape} (after '{leaf.transform}')")
        with np.errstate(over="ignore"):  # an overflow on the cast back is reported by the caller's finite check
            by_key[leaf.key] = np.asarray(torch_value.astype(leaf.dtype, copy=False), order="C")
    by_key.update(meta.aside)
    for key, source in meta.ties.items():
        by_key[key] = np.asarray(by_key[source].astype(meta.aside[key].dtype, copy=False), order="C")
    return {k: by_key[k] for k in meta.key_order}

