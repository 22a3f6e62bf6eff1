"""MergeKit recipes: ``catmerge merge --config RECIPE.yaml --out DIR`` reads MergeKit 0.1.5's YAML schema and
streams its result tensor by tensor (:func:`catmerge_jax.folders.stream_merge`).

Supported keys: ``merge_method`` (any of MergeKit's 20, :data:`catmerge_jax.mergekit.methods.METHODS`),
``base_model``, ``models`` (each ``model`` with optional ``parameters``), top-level ``parameters``, ``dtype``
(the working dtype MergeKit computes in; also the output dtype unless ``out_dtype``), ``out_dtype``,
``tokenizer_source`` (``base`` only: the output keeps the base's config and tokenizer files). Parameter values are
MergeKit's: a scalar, a gradient (a list of numbers interpolated over the layers: layer ``i`` of ``L`` reads
position ``i/(L−1)``, the embeddings and head position 0), or a list of ``{filter, value}`` conditions (the first
whose ``filter`` is a substring of the tensor name wins). Per-model parameters fall back to the top-level ones.
``slices``, ``modules``, ``tokenizer`` and ``chat_template`` are not supported (a one-line error says so).

Everything is checked before any tensor is read: unknown keys or methods, a missing ``base_model`` where the method
needs one, input counts, every parameter of every tensor (type and range), and that the models hold the same
tensors with the same shapes. Errors are one line naming the field (:class:`RecipeError`), and nothing is written.

>>> recipe = parse_recipe({"merge_method": "ties", "base_model": "b", "parameters": {"density": 0.5},
...                        "models": [{"model": "x", "parameters": {"weight": [0.0, 1.0]}}]})
>>> recipe.method, recipe.base_model, [m.model for m in recipe.models]
('ties', 'b', ['x'])
>>> resolve(recipe, "model.layers.3.mlp.up_proj.weight", t=0.75)["density"], resolve(recipe, "x", t=0.75)["weight"]
([0.5], [0.75])
"""

from __future__ import annotations

import os
import re
import zlib
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from catmerge_jax.errors import CatMergeError, HyperparameterError

__all__ = ["RecipeError", "Recipe", "ModelEntry", "load_recipe", "parse_recipe", "resolve", "layer_position",
           "run_recipe", "TOP_LEVEL_KEYS"]

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
_UNSUPPORTED = ("slices", "modules", "tokenizer", "chat_template")


class RecipeError(CatMergeError):
    """A recipe that cannot be run as written (schema, method, parameters, models)."""


class ModelEntry(NamedTuple):
    model: str
    parameters: Mapping[str, Any]


class Recipe(NamedTuple):
    """A parsed recipe. ``inputs`` is MergeKit's input order: the ``models``, then the base if not among them."""

    method: str
    base_model: str | None
    models: tuple[ModelEntry, ...]
    parameters: Mapping[str, Any]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    source: str = "recipe"

    @property
    def inputs(self) -> list[ModelEntry]:
        names = [m.model for m in self.models]
        if self.base_model is not None and self.base_model not in names:
            return [*self.models, ModelEntry(self.base_model, {})]
        return list(self.models)

    @property
    def base_index(self) -> int | None:
        names = [m.model for m in self.inputs]
        return None if self.base_model is None else names.index(self.base_model)


def _method(name: Any, where: str):
    from catmerge_jax.mergekit.methods import METHODS

    if not isinstance(name, str) or name not in METHODS:
        raise RecipeError(f"{where}: merge_method {name!r} is not one of MergeKit's methods: {', '.join(METHODS)}")
    return METHODS[name]


def _check_setting(method, name: str, setting: Any, where: str) -> None:
    """A parameter setting's shape: scalar, non-empty gradient, or {filter, value} conditions."""
    param = method.param(name)
    if param is None:
        known = ", ".join(p.name for p in method.params) or "none"
        raise RecipeError(f"{where}: {method.name} takes no parameter '{name}' (its parameters: {known})")
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise RecipeError(f"{where}: empty list")
        if all(isinstance(c, dict) for c in setting):
            for i, cond in enumerate(setting):
                extra = sorted(set(cond) - {"filter", "value"})
                if extra or "value" not in cond:
                    raise RecipeError(f"{where}[{i}]: a condition is {{filter: SUBSTRING, value: V}}, got keys "
                                      f"{sorted(cond)}")
                _check_setting(method, name, cond["value"], f"{where}[{i}].value")
            return
        if any(isinstance(c, (dict, list)) for c in setting):
            raise RecipeError(f"{where}: a gradient is a list of values, got {setting!r}")


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate the structure of a recipe (a mapping, as YAML loads it) and return it as a :class:`Recipe`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of {', '.join(TOP_LEVEL_KEYS)}; got {type(data).__name__}")
    for key in data:
        if key in _UNSUPPORTED:
            raise RecipeError(f"{source}: '{key}' is not supported by catmerge (use models: with parameters; "
                              "layer slices are not implemented)")
        if key not in TOP_LEVEL_KEYS:
            raise RecipeError(f"{source}: unknown key '{key}'; expected {', '.join(TOP_LEVEL_KEYS)}")
    if "merge_method" not in data:
        raise RecipeError(f"{source}: merge_method is missing")
    method = _method(data["merge_method"], f"{source}: merge_method")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise RecipeError(f"{source}: base_model must be a folder or hub ID, got {base!r}")
    models_in = data.get("models")
    if not isinstance(models_in, list) or not models_in:
        raise RecipeError(f"{source}: models must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    models = []
    for i, entry in enumerate(models_in):
        where = f"{source}: models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise RecipeError(f"{where}: expected {{model: PATH, parameters: {{...}}}}, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise RecipeError(f"{where}: unknown key '{extra[0]}'; expected model, parameters")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(f"{where}.parameters: expected a mapping, got {params!r}")
        for name, setting in params.items():
            _check_setting(method, name, setting, f"{where}.parameters.{name}")
        if entry["model"] in [m.model for m in models]:
            raise RecipeError(f"{where}: model {entry['model']!r} is listed twice")
        models.append(ModelEntry(entry["model"], params))
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecipeError(f"{source}: parameters: expected a mapping, got {params!r}")
    for name, setting in params.items():
        _check_setting(method, name, setting, f"{source}: parameters.{name}")
    from catmerge_jax.mergekit.precision import work_dtype_name

    dtypes = {}
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None and work_dtype_name(value) is None:
            raise RecipeError(f"{source}: {key} {value!r} is not a float dtype (bfloat16, float16, float32)")
        dtypes[key] = None if value is None else work_dtype_name(value)
    tok = data.get("tokenizer_source")
    if tok is not None and tok != "base" and tok != base:
        # the output keeps the base's tokenizer files; vocabulary merging ("union") is not implemented
        raise RecipeError(f"{source}: tokenizer_source {tok!r} is not supported; catmerge copies the base model's "
                          "tokenizer (tokenizer_source: base)")
    recipe = Recipe(method.name, base, tuple(models), params, dtypes["dtype"], dtypes["out_dtype"], tok, source)
    from catmerge_jax.mergekit.methods import check_inputs

    try:
        check_inputs(method, len(recipe.inputs), base is not None, f"{source}: base_model/models")
    except HyperparameterError as e:
        raise RecipeError(str(e)) from None
    return recipe


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML recipe file (PyYAML, ``safe_load``)."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a core dependency
        raise RecipeError("reading recipes needs PyYAML: pip install pyyaml") from None
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise RecipeError(f"--config {path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    return parse_recipe(data, source=path)


# ----------------------------------------------------------------------------------------------- parameters

def _evaluate(setting: Any, tensor: str, t: float, kind: type) -> Any:
    """MergeKit's ``evaluate_setting``: conditions by substring filter, gradients interpolated at ``t``."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if all(isinstance(c, dict) for c in setting):
            for cond in setting:
                flt = cond.get("filter")
                if flt is None or flt == "*" or (tensor and str(flt) in tensor):
                    return _evaluate(cond["value"], tensor, t, kind)
            return None
        numeric = kind is not bool and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def resolve(recipe: Recipe, tensor: str, t: float = 0.0) -> dict[str, Any]:
    """The parameters of ``tensor`` at layer position ``t``: shared ones as values, per-input ones as lists in
    input order (``non_base`` ones without the base). Defaults fill in; required ones missing raise."""
    from catmerge_jax.mergekit.methods import REQUIRED, check_value, METHODS

    method = METHODS[recipe.method]
    out: dict[str, Any] = {}
    inputs, base_index = recipe.inputs, recipe.base_index
    for p in method.params:
        if p.scope == "shared":
            scopes = [(recipe.parameters, f"{recipe.source}: parameters.{p.name}")]
            out[p.name] = _value(method, p, scopes, tensor, t, check_value, REQUIRED, f"{recipe.source}: parameters")
            continue
        values = []
        for i, entry in enumerate(inputs):
            if p.scope == "non_base" and i == base_index and method.base != "ignored":
                continue
            label = f"models[{[m.model for m in recipe.models].index(entry.model)}]" if entry in recipe.models else \
                "base_model"
            scopes = [(entry.parameters, f"{recipe.source}: {label}.parameters.{p.name}"),
                      (recipe.parameters, f"{recipe.source}: parameters.{p.name}")]
            values.append(_value(method, p, scopes, tensor, t, check_value, REQUIRED,
                                 f"{recipe.source}: {label}.parameters"))
        out[p.name] = values
    if method.name in ("della", "della_linear"):
        for d, e in zip(out["density"], out["epsilon"]):
            if 0 < d < 1 and not (0 < d - e and d + e < 1):
                raise RecipeError(f"{recipe.source}: parameters.epsilon: density ± epsilon must lie in (0, 1) "
                                  f"(density {d}, epsilon {e}, tensor {tensor})")
    return out


def _value(method, p, scopes, tensor, t, check_value, REQUIRED, missing_where):
    for settings, where in scopes:
        if settings and p.name in settings:
            value = _evaluate(settings[p.name], tensor, t, p.kind)
            if value is not None:
                try:
                    return check_value(method, p, value, where)
                except HyperparameterError as e:
                    raise RecipeError(str(e)) from None
    if p.default is REQUIRED:
        raise RecipeError(f"{missing_where}: {method.name} needs parameter '{p.name}' (for tensor {tensor})")
    return p.default


_LAYER = re.compile(r"\.(\d+)\.")


def layer_position(name: str, num_layers: int) -> float:
    """MergeKit's gradient position of a tensor: ``i / (L − 1)`` for layer ``i`` of ``L`` (1 if L = 1), 0 for
    tensors outside the layers (embeddings, final norm, head). The layer index is the first ``.N.`` of the name."""
    m = _LAYER.search(name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def _num_layers(folder) -> int:
    cfg = folder.config or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    for sub in ("text_config", "llm_config"):
        if isinstance(cfg.get(sub), dict) and isinstance(cfg[sub].get("num_hidden_layers"), int):
            return cfg[sub]["num_hidden_layers"]
    found = [int(m.group(1)) for n in folder.tensors if (m := _LAYER.search(n))]
    return max(found) + 1 if found else 1


# ----------------------------------------------------------------------------------------------- running

def _tensor_key(seed: int, name: str):
    import jax

    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def run_recipe(recipe: Recipe | str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
               progress: bool = True, seed: int = 0, tie_order: str = "pytorch") -> str:
    """Run a recipe (or a recipe file) into ``out_dir``; returns the output folder.

    The output keeps the layout of the base model (the first model without one): its tensor names, shard files,
    index, config and tokenizer files; merged tensors take ``out_dtype`` (else ``dtype``, else their own). DARE
    and DELLA draw tensor ``name``'s masks from ``fold_in(key(seed), crc32(name))``. ``tie_order``: which of the
    entries tied at a magnitude cut TIES, Breadcrumbs and SCE keep: MergeKit's (``"pytorch"``, PyTorch's CPU sort
    order, reproduced in NumPy) or the lower index (``"stable"``); see :mod:`catmerge_jax.mergekit.tie_order`.
    """
    import jax.numpy as jnp

    from catmerge_jax.folders import check_sources, float_names, open_folder, stream_merge
    from catmerge_jax.mergekit.methods import merge_weight

    from catmerge_jax.mergekit.tie_order import check_tie_order

    check_tie_order(tie_order)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    inputs = recipe.inputs
    folders = []
    for entry in inputs:
        folders.append(open_folder(entry.model))
    base_index = recipe.base_index
    layout = folders[0 if base_index is None else base_index]
    names = float_names(layout)
    check_sources(layout, folders, names)
    layers = _num_layers(layout)
    params = {name: resolve(recipe, name, layer_position(name, layers)) for name in names}   # all checked up front
    work = recipe.dtype

    def merge_tensor(name: str, arrays: list[np.ndarray]) -> np.ndarray:
        from converters.safetensors_io import DTYPES

        work_dtype = work or DTYPES[layout.tensors[name].dtype]
        if work is not None:        # MergeKit loads every input as the recipe's dtype
            arrays = [a.astype(work_dtype) for a in arrays]
        key = _tensor_key(seed, name) if _random(recipe.method) else None
        if recipe.method in ELEMENTWISE:
            return _merge_in_chunks(recipe.method, arrays, base_index, params[name], work_dtype)
        merged = merge_weight(recipe.method, [jnp.asarray(a) for a in arrays], base_index, params[name], key=key,
                              work_dtype=work_dtype, tie_order=tie_order)
        return np.asarray(merged, dtype=np.float32)

    out_dtype = recipe.out_dtype or recipe.dtype
    out = stream_merge(layout, folders, out_dir, merge_tensor, out_dtype=out_dtype, overwrite=overwrite,
                       progress=progress, copy_files=True, raw=True)
    return out


ELEMENTWISE = ("task_arithmetic", "linear", "nearswap", "ram")
"""Methods whose every output entry depends only on the same entry of the inputs (given the tensor's parameters):
recipes run them over fixed-size flat chunks, so one compiled program serves every tensor (no compilation per
shape) and the working memory is a few chunks, whatever the tensor's size."""

CHUNK = 1 << 20
"""Entries per chunk of :data:`ELEMENTWISE` methods (smaller tensors are padded to a power of two ≥ 4096)."""


def _merge_in_chunks(method: str, arrays: list[np.ndarray], base_index, params: dict, work_dtype) -> np.ndarray:
    from catmerge_jax.mergekit.methods import merge_weight

    shape, size = arrays[0].shape, arrays[0].size
    flat = [a.reshape(-1) for a in arrays]
    out = np.empty(size, np.float32)
    width = min(CHUNK, max(4096, 1 << max(size - 1, 1).bit_length()))
    for start in range(0, size, width):
        stop = min(start + width, size)
        pieces = [f[start:stop] for f in flat]
        if stop - start < width:
            pieces = [np.pad(p, (0, width - (stop - start))) for p in pieces]
        merged = merge_weight(method, pieces, base_index, params, work_dtype=work_dtype)
        out[start:stop] = np.asarray(merged)[:stop - start]
    return out.reshape(shape)


def _random(method: str) -> bool:
    from catmerge_jax.mergekit.methods import METHODS

    return METHODS[method].random
