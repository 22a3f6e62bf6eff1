"""Hugging Face checkpoint folders ↔ Flax parameter trees, for every family of
:data:`converters.families.FAMILY_MODULES` (BERT, RoBERTa, CLIP vision, BLIP, decoder LLMs).

This module reads a folder (``config.json`` checked field by field, safetensors shards), hands the flat state dict to
the family module that the config's ``model_type`` names in the table, and writes a tree back as the base folder's
files (same keys, order, dtypes, shards; atomically). It names no family itself. The key rule and the leaf map are
:mod:`converters.keys` (``a/b/kernel`` ↔ ``a.b.weight`` transposed, ...): the expected leaves come from the model's
own ``init`` (traced with ``jax.eval_shape``, no weights computed), so a checkpoint key that the model does not
have, or a missing one, is an error that names the key. Checkpoint keys that are not part of the Flax model — task
heads (``classifier.*``, ``cls.*``), CLIP's text tower, old ``position_ids`` buffers — are kept aside in
:class:`ConversionMeta` and written back unchanged.

Every name of :mod:`converters.keys` and :mod:`converters.config_fields` that lived here is still importable from
here.

>>> from converters.hf import load_hf_folder, save_hf_folder, build_flax_model   # doctest: +SKIP
>>> kind, config, params, meta = load_hf_folder("all-MiniLM-L6-v2")               # doctest: +SKIP
>>> model = build_flax_model(kind, config, meta)                                  # doctest: +SKIP
>>> out = model.apply({"params": params}, input_ids, attention_mask)              # doctest: +SKIP
>>> save_hf_folder("merged", params, meta, base_folder="all-MiniLM-L6-v2")        # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from converters import safetensors_io as st
# Re-exported: these lived here before the family-neutral pieces moved out (imported from here by callers).
from converters.config_fields import (COUNT, FLAG, NAME, NAMES, POSITIVE_INT, POSITIVE_NUMBER, SECTION,  # noqa: F401
                                      SIDE, TOKEN_ID, ConfigFieldError, FieldType, _int_from, _shown, check_fields)
from converters.config_fields import section as _section  # noqa: F401
from converters.families import CONFIG_FIELDS, FAMILY_MODULES, config_fields_of, family_module, kind_module
from converters.keys import (_TEMPLATE_SHAPES, ConversionError, ConversionMeta, LeafMap,  # noqa: F401
                             _kernel_transform, _template_shapes, flax_to_hf_state, hf_key, match_state,
                             template_shapes, to_flax_layout, to_torch_layout)

__all__ = ["LeafMap", "ConversionMeta", "ConversionError", "hf_key", "template_shapes", "match_state",
           "hf_state_to_flax", "flax_to_hf_state", "load_hf_folder", "save_hf_folder", "build_flax_model",
           "model_kind_of", "FAMILY_MODULES", "family_module", "WEIGHT_FILES", "write_hf_files", "read_json_file",
           "check_config_matches_keys", "ConfigFieldError", "FieldType", "CONFIG_FIELDS", "check_config_fields"]

# Files of a checkpoint folder that hold weights (not copied from the base folder on export).
WEIGHT_FILES = (".safetensors", ".bin", ".h5", ".msgpack", ".ckpt", ".pt", ".pth")


# ----------------------------------------------------------------------------------------------- model kinds

def _expected_model_types() -> str:
    *most, last = FAMILY_MODULES
    return f"{', '.join(most)} or {last}"


def model_kind_of(config: Mapping[str, Any]) -> str:
    """The model kind of a ``config.json`` dict (``"bert"``, ``"roberta"``, ``"clip_vision"``, a BLIP kind or a
    decoder's ``model_type``), from the family module of its ``model_type`` (:data:`FAMILY_MODULES`)."""
    mt = config.get("model_type")
    family = family_module(mt)
    if family is None:
        raise ConversionError(f"unsupported model_type {mt!r}; expected {_expected_model_types()}")
    return family.kind_of(config)


def build_flax_model(model_kind: str, config: Mapping[str, Any], meta: ConversionMeta | None = None, **options):
    """The linen module for a checkpoint. Options come from ``meta.options`` (as read from the keys), then
    ``options``: ``add_pooler`` (BERT/RoBERTa, default True), ``with_projection`` (CLIP, default True)."""
    opts = {**(meta.options if meta is not None else {}), **options}
    family = kind_module(model_kind)
    if family is None:
        raise ConversionError(f"unknown model kind {model_kind!r}")
    return family.build_model(model_kind, config, **opts)


def hf_state_to_flax(state: Mapping[str, np.ndarray], config: Mapping[str, Any], *, dtype=np.float32
                     ) -> tuple[str, dict, ConversionMeta]:
    """A flat HF state dict (key → array) and its config → ``(model_kind, flax_params, meta)``.

    The config's fields and layer count are checked first; then the family module of its ``model_type`` maps the
    keys (for BERT/RoBERTa/CLIP see :mod:`converters.bert_clip`, BLIP :mod:`converters.blip`, decoders
    :mod:`converters.decoder`).
    """
    check_config_fields(config, "config")
    kind = model_kind_of(config)
    check_config_matches_keys(config, list(state))
    return kind_module(kind).state_to_flax(state, config, dtype=dtype)


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



# ----------------------------------------------------------------------------------------------- config fields

def check_config_fields(config: Mapping[str, Any], where: str = "config.json") -> None:
    """Raise :class:`ConfigFieldError` ``"<where>: <field> is <value> (<its type>); expected <type>"`` for the first
    field of :data:`CONFIG_FIELDS` (of the config's ``model_type``) that holds something else.

    >>> check_config_fields({"model_type": "bert", "hidden_size": "16"}, "m/config.json")
    Traceback (most recent call last):
    converters.config_fields.ConfigFieldError: m/config.json: hidden_size is "16" (a string); expected a positive integer
    """
    check_fields(config, config_fields_of(config.get("model_type")), where)


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{folder}: no config.json")
    config = read_json_file(path, "config")
    if not isinstance(config, dict):
        raise ConversionError(f"config {path} holds a JSON {type(config).__name__}; expected an object")
    check_config_fields(config, path)
    return config


def check_config_matches_keys(config: Mapping[str, Any], keys, where: str = "checkpoint") -> None:
    """Raise :class:`ConversionError` unless the config's layer count is the number of layers the checkpoint's
    keys hold. Cheap (keys only), so it runs before any model is built: a config claiming 100000 layers over two
    layers of weights fails at once instead of tracing a huge model."""
    kind = model_kind_of(config)
    family = kind_module(kind)
    pattern = family.layer_key(kind)
    if pattern is None:
        return
    field, claimed = family.layer_field(config)
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
        raise ConversionError(f"no readable safetensors weights: {e}") from None  # e names the file
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
