"""Hugging Face checkpoint folders ↔ Flax parameter trees (BERT, RoBERTa, CLIP vision).

The Flax models in :mod:`catmerge_jax.models` name their modules after the PyTorch ones, so the key of every
Flax leaf is derived mechanically from its path (:func:`hf_key`): ``a/b/kernel`` ↔ ``a.b.weight``
(transposed; a 4-D conv kernel ``(kh, kw, in, out)`` ↔ ``(out, in, kh, kw)``), ``scale``/``embedding`` ↔
``weight``, ``bias`` ↔ ``bias``, other names unchanged. The expected leaves come from the model's own
``init`` (traced with ``jax.eval_shape``, no weights computed), so a checkpoint key that the model does not
have, or a missing one, is an error that names the key.

Checkpoint keys that are not part of the Flax model — task heads (``classifier.*``, ``cls.*``), CLIP's text
tower, old ``position_ids`` buffers — are kept aside in :class:`ConversionMeta` and written back unchanged.

>>> from converters.hf import load_hf_folder, save_hf_folder, build_flax_model   # doctest: +SKIP
>>> kind, config, params, meta = load_hf_folder("all-MiniLM-L6-v2")               # doctest: +SKIP
>>> model = build_flax_model(kind, config, meta)                                  # doctest: +SKIP
>>> out = model.apply({"params": params}, input_ids, attention_mask)              # doctest: +SKIP
>>> save_hf_folder("merged", params, meta, base_folder="all-MiniLM-L6-v2")        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from converters import safetensors_io as st

__all__ = ["LeafMap", "ConversionMeta", "ConversionError", "hf_key", "template_shapes", "match_state",
           "hf_state_to_flax", "flax_to_hf_state", "load_hf_folder", "save_hf_folder", "build_flax_model",
           "model_kind_of", "WEIGHT_FILES", "write_hf_files", "read_json_file", "check_config_matches_keys"]

# Files of a checkpoint folder that hold weights (not copied from the base folder on export).
WEIGHT_FILES = (".safetensors", ".bin", ".h5", ".msgpack", ".ckpt", ".pt", ".pth")

_BERT_PREFIX = {"bert": "bert.", "roberta": "roberta."}


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
    """``{path: shape}`` of a linen model's params, traced with ``jax.eval_shape`` (nothing is computed)."""
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
    leaves: dict[str, LeafMap] = {}
    params: dict = {}
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
        if dtype is not None:
            flax_value = flax_value.astype(dtype)
        node = params
        *mods, name = path.split("/")
        for m in mods:
            node = node.setdefault(m, {})
        node[name] = np.asarray(flax_value, order="C")
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
    return params, meta


# ----------------------------------------------------------------------------------------------- model kinds

def model_kind_of(config: Mapping[str, Any]) -> str:
    """``"bert"``, ``"roberta"`` or ``"clip_vision"`` from a ``config.json`` dict."""
    mt = config.get("model_type")
    if mt == "bert":
        return "bert"
    if mt in ("roberta", "xlm-roberta", "camembert"):
        return "roberta"
    if mt in ("clip", "clip_vision_model"):
        return "clip_vision"
    if mt == "blip":
        from converters.blip import blip_kind

        return blip_kind(config)
    raise ConversionError(f"unsupported model_type {mt!r}; expected bert, roberta, clip or clip_vision_model")


def build_flax_model(model_kind: str, config: Mapping[str, Any], meta: ConversionMeta | None = None, **options):
    """The linen module for a checkpoint. Options come from ``meta.options`` (as read from the keys), then
    ``options``: ``add_pooler`` (BERT/RoBERTa, default True), ``with_projection`` (CLIP, default True)."""
    opts = {**(meta.options if meta is not None else {}), **options}
    if model_kind in ("bert", "roberta"):
        from catmerge_jax.models.bert import BertConfig, BertModel

        return BertModel(BertConfig.from_hf_config(config), add_pooler=opts.get("add_pooler", True))
    if model_kind == "clip_vision":
        from catmerge_jax.models.clip_vit import ClipVisionConfig, ClipVisionModel

        wp = opts.get("with_projection", True)
        return ClipVisionModel(ClipVisionConfig.from_hf_config(config, with_projection=wp), layout="hf",
                               with_projection=wp)
    if model_kind in ("blip_vqa", "blip_caption"):
        from converters.blip import build_blip_model

        return build_blip_model(model_kind, config)
    raise ConversionError(f"unknown model kind {model_kind!r}")


def _example_inputs(model_kind: str, model) -> tuple:
    if model_kind in ("bert", "roberta"):
        return (jnp.ones((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))
    if model_kind in ("blip_vqa", "blip_caption"):
        from converters.blip import example_inputs

        return example_inputs(model)
    cfg = model.config
    return (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)


def _is_position_buffer(key: str) -> bool:
    # Non-persistent in current transformers, but older checkpoints saved them.
    return key.endswith("embeddings.position_ids") or key.endswith("embeddings.token_type_ids")


def hf_state_to_flax(state: Mapping[str, np.ndarray], config: Mapping[str, Any], *, dtype=np.float32
                     ) -> tuple[str, dict, ConversionMeta]:
    """A flat HF state dict (key → array) and its config → ``(model_kind, flax_params, meta)``.

    BERT/RoBERTa keys may carry the ``bert.``/``roberta.`` prefix (``*ForSequenceClassification`` etc.; keys
    outside the prefix are heads, kept aside) or not (``BertModel``). A pooler is built when the checkpoint
    has one. CLIP: ``vision_model.*`` and ``visual_projection.weight`` become leaves; in a full ``clip``
    checkpoint the text tower, ``text_projection`` and ``logit_scale`` are kept aside.
    """
    kind = model_kind_of(config)
    keys = list(state)
    check_config_matches_keys(config, keys)
    if kind in ("blip_vqa", "blip_caption"):
        from converters.blip import blip_state_to_flax

        return blip_state_to_flax(state, config, dtype=dtype)
    if kind in ("bert", "roberta"):
        prefix = _BERT_PREFIX[kind]
        if not any(k.startswith(prefix) for k in keys):
            prefix = ""
        options = {"add_pooler": f"{prefix}pooler.dense.weight" in state}

        def is_aside(key):
            return (prefix and not key.startswith(prefix)) or _is_position_buffer(key)
    else:
        prefix = ""
        options = {"with_projection": "visual_projection.weight" in state}
        full = config.get("model_type") == "clip"

        def is_aside(key):
            if _is_position_buffer(key):
                return True
            return full and (key.startswith("text_model.") or key in ("text_projection.weight", "logit_scale"))
    model = build_flax_model(kind, config, None, **options)
    shapes = template_shapes(model, *_example_inputs(kind, model))
    params, meta = match_state(state, shapes, lambda p: hf_key(p, prefix), is_aside, dtype=dtype,
                               model_kind=kind, config=dict(config), options=options)
    return kind, params, meta


def flax_to_hf_state(params, meta: ConversionMeta) -> dict[str, np.ndarray]:
    """Flax params (as produced by :func:`hf_state_to_flax`, possibly edited) → flat checkpoint dict.

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


# ----------------------------------------------------------------------------------------------- folders

def read_json_file(path: str, what: str = "file") -> Any:
    """A JSON file, or a one-line :class:`ConversionError` naming the file and where the JSON breaks."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConversionError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConversionError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                              ) from None
    except RecursionError:
        raise ConversionError(f"{what} {path} is not valid JSON: nested too deeply") from None


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{folder}: no config.json")
    config = read_json_file(path, "config")
    if not isinstance(config, dict):
        raise ConversionError(f"config {path} holds a JSON {type(config).__name__}; expected an object")
    return config


_LAYER_KEYS = {
    "bert": re.compile(r"^(?:bert\.|roberta\.)?encoder\.layer\.(\d+)\."),
    "roberta": re.compile(r"^(?:bert\.|roberta\.)?encoder\.layer\.(\d+)\."),
    "clip_vision": re.compile(r"^vision_model\.encoder\.layers\.(\d+)\."),
}


def _config_layers(kind: str, config: Mapping[str, Any]) -> tuple[str, Any]:
    """``(config field, value)`` of the layer count the model would be built with (its defaults included)."""
    if kind in ("bert", "roberta"):
        return "num_hidden_layers", config.get("num_hidden_layers", 12)
    vision = config.get("vision_config") if config.get("model_type") == "clip" else config
    vision = vision if isinstance(vision, Mapping) else {}
    field = "vision_config.num_hidden_layers" if config.get("model_type") == "clip" else "num_hidden_layers"
    return field, vision.get("num_hidden_layers", 12)


def check_config_matches_keys(config: Mapping[str, Any], keys, where: str = "checkpoint") -> None:
    """Raise :class:`ConversionError` unless the config's layer count is the number of layers the checkpoint's
    keys hold. Cheap (keys only), so it runs before any model is built: a config claiming 100000 layers over two
    layers of weights fails at once instead of tracing a huge model."""
    kind = model_kind_of(config)
    pattern = _LAYER_KEYS.get(kind)
    if pattern is None:
        return
    field, claimed = _config_layers(kind, config)
    if type(claimed) is not int or claimed < 0:
        raise ConversionError(f"{where}: config.json {field} is {claimed!r}; expected a non-negative integer")
    found = {int(m.group(1)) for k in keys for m in [pattern.match(k)] if m}
    if len(found) != claimed or (found and max(found) != claimed - 1):
        raise ConversionError(f"{where}: config.json says {field}={claimed} but the checkpoint holds weights for "
                              f"{len(found)} layer(s) (indices {sorted(found)[:6]}{'...' if len(found) > 6 else ''})")


def load_hf_folder(folder: str, *, dtype=np.float32, progress: bool = False
                   ) -> tuple[str, dict, dict, ConversionMeta]:
    """Read a HF folder (``config.json`` + ``model.safetensors`` or a sharded index) →
    ``(model_kind, config_dict, flax_params, meta)``. Leaves are ``dtype`` NumPy arrays (``None`` keeps the
    checkpoint's dtype). ``progress`` shows a tqdm bar over the tensors read. ``pytorch_model.bin``-only
    folders are refused: convert them to safetensors first."""
    config = _read_config(folder)
    try:
        infos = st.list_tensors(folder)
    except st.SafetensorsError as e:
        raise ConversionError(f"{folder}: no readable safetensors weights ({e})") from None
    check_config_matches_keys(config, infos, where=folder)
    from tqdm.auto import tqdm

    by_file: dict[str, list[str]] = {}
    for name, info in infos.items():
        by_file.setdefault(info.file, []).append(name)
    bar = tqdm(total=len(infos), desc=f"read {os.path.basename(os.path.normpath(folder))}", unit="tensor",
               disable=not progress)
    loaded = {}
    for file, names in by_file.items():
        for name, value in st.iter_tensors(file, names):
            loaded[name] = value
            bar.update()
    bar.close()
    state = {name: loaded[name] for name in infos}
    kind, params, meta = hf_state_to_flax(state, config, dtype=dtype)
    files = list(dict.fromkeys(info.file for info in infos.values()))
    meta.metadata = st.read_metadata(files[0])
    if os.path.exists(os.path.join(folder, st.INDEX_NAME)):
        meta.shards = {name: os.path.basename(info.file) for name, info in infos.items()}
    return kind, config, params, meta


def _copy_tree(src: str, dest: str) -> None:
    # Contents only (shutil.copyfile, not copy2/copytree): the copies get this run's umask, not the base's modes.
    os.mkdir(dest, 0o777)
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if os.path.isdir(path):
            _copy_tree(path, os.path.join(dest, name))
        elif os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dest, name))


def _copy_non_weights(base_folder: str, dest: str) -> None:
    for name in os.listdir(base_folder):
        src = os.path.join(base_folder, name)
        if name == st.INDEX_NAME or name.startswith(".") or (os.path.isfile(src) and name.endswith(WEIGHT_FILES)):
            continue
        if os.path.isdir(src):
            _copy_tree(src, os.path.join(dest, name))
        elif os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dest, name))


def write_hf_files(dest: str, state: Mapping[str, np.ndarray], meta: ConversionMeta, base_folder: str) -> None:
    """Write a flat checkpoint ``state`` (from :func:`flax_to_hf_state`) into the existing folder ``dest``:
    ``model.safetensors`` (or the base's shards and index) plus the base folder's non-weight files."""
    _copy_non_weights(base_folder, dest)
    metadata = meta.metadata or {"format": "pt"}
    if meta.shards:
        by_shard: dict[str, dict] = {}
        for key, value in state.items():
            by_shard.setdefault(meta.shards[key], {})[key] = value
        for shard, tensors in by_shard.items():
            st.save_file(tensors, os.path.join(dest, shard), metadata=metadata)
        total = int(sum(v.nbytes for v in state.values()))
        index = {"metadata": {"total_size": total}, "weight_map": {k: meta.shards[k] for k in state}}
        with open(os.path.join(dest, st.INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
    else:
        st.save_file(state, os.path.join(dest, "model.safetensors"), metadata=metadata)


def save_hf_folder(out_dir: str, flax_params, meta: ConversionMeta, base_folder: str, *,
                   overwrite: bool = False) -> str:
    """Write ``flax_params`` as a HF folder next to the base's files, atomically.

    Weights go to ``model.safetensors`` (or the base's shard files and index, when the base was sharded) with
    the base's key names, order, dtypes and ``__metadata__``; ``config.json``, tokenizer files and any other
    non-weight files/folders are copied from ``base_folder``. The folder is assembled in a temporary sibling
    directory and renamed into place (:func:`catmerge_jax.atomic.publish_dir`); an existing ``out_dir`` is an error
    (``FileExistsError``) unless ``overwrite``, and a symlink or file there is never replaced. Returns ``out_dir``.
    """
    from catmerge_jax.atomic import publish_dir, temp_dir

    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    state = flax_to_hf_state(flax_params, meta)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    with temp_dir(parent, os.path.basename(out_dir)) as tmp:
        write_hf_files(tmp, state, meta, base_folder)
        publish_dir(tmp, out_dir, overwrite=overwrite)
    return out_dir
