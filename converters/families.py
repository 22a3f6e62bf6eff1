"""The one table of model families: ``config.json``'s ``model_type`` → the module that converts it.

:mod:`converters.hf` reads, checks and writes Hugging Face folders for every family without naming one: it looks
the config's ``model_type`` (or a model kind) up here and calls the family module, which is imported only when a
folder needs it. The modules are named as strings, so no converter imports another family's (no import cycle).

A family module provides:

* ``KINDS`` — the model kinds it returns (a kind names the Flax model built; a decoder's is its ``model_type``);
* ``kind_of(config) -> kind``;
* ``build_model(kind, config, **options)`` — the linen module (``options`` as read from the keys, see
  :class:`~converters.keys.ConversionMeta`);
* ``example_inputs(model)`` — the smallest inputs that build every parameter;
* ``state_to_flax(state, config, *, dtype) -> (kind, params, meta)``;
* ``layer_key(kind)`` — a regex whose group 1 is a checkpoint key's layer index (``None``: no layer check), and
  ``layer_field(config) -> (field, value)``, the layer count the model is built with: checked against the keys
  before any model is built;
* ``CONFIG_FIELDS`` — ``model_type`` → the ``config.json`` fields its loader reads
  (:mod:`converters.config_fields`).

Adding a family is a row here and such a module.

>>> FAMILY_MODULES["roberta"], FAMILY_MODULES["blip"], FAMILY_MODULES["llama"]
('converters.bert_clip', 'converters.blip', 'converters.decoder')
>>> family_module("clip").kind_of({"model_type": "clip"})
'clip_vision'
>>> kind_module("blip_vqa").__name__
'converters.blip'
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterator, Mapping

__all__ = ["FAMILY_MODULES", "CONFIG_FIELDS", "family_module", "kind_module", "family_modules", "config_fields_of"]

FAMILY_MODULES: dict[str, str] = {
    **{mt: "converters.bert_clip" for mt in ("bert", "roberta", "xlm-roberta", "camembert", "clip",
                                               "clip_vision_model")},
    "blip": "converters.blip",
    **{mt: "converters.decoder" for mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
}
"""``model_type`` → the module converting that family (imported when a folder needs it); see the module docstring
for what such a module provides."""


def family_module(model_type: Any) -> ModuleType | None:
    """The converter module of a ``model_type`` in :data:`FAMILY_MODULES` (``None`` for any other value)."""
    name = FAMILY_MODULES.get(model_type) if isinstance(model_type, str) else None
    return importlib.import_module(name) if name else None


def family_modules() -> list[ModuleType]:
    """Every module of :data:`FAMILY_MODULES`, once each, in the table's order."""
    return [importlib.import_module(name) for name in dict.fromkeys(FAMILY_MODULES.values())]


def kind_module(kind: Any) -> ModuleType | None:
    """The converter module whose ``KINDS`` hold the model kind ``kind`` (``None`` when none does)."""
    if not isinstance(kind, str):
        return None
    own = family_module(kind)  # most kinds are their model_type: import only that module
    if own is not None and kind in own.KINDS:
        return own
    return next((module for module in family_modules() if kind in module.KINDS), None)


def config_fields_of(model_type: Any) -> Mapping[str, Any]:
    """The ``config.json`` field table of a ``model_type`` (empty for one outside :data:`FAMILY_MODULES`)."""
    module = family_module(model_type)
    return getattr(module, "CONFIG_FIELDS", {}).get(model_type, {}) if module is not None else {}


class _ConfigFieldTables(Mapping):
    """A read-only view: ``model_type`` → its field table, gathered from the family modules when first read (so that
    importing this table imports no family)."""

    def _tables(self) -> dict[str, Mapping[str, Any]]:
        return {mt: fields for module in family_modules()
                for mt, fields in getattr(module, "CONFIG_FIELDS", {}).items()}

    def __getitem__(self, model_type: str) -> Mapping[str, Any]:
        return self._tables()[model_type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables())

    def __len__(self) -> int:
        return len(self._tables())

    def __repr__(self) -> str:
        return f"CONFIG_FIELDS({sorted(self._tables())})"


CONFIG_FIELDS: Mapping[str, Mapping[str, Any]] = _ConfigFieldTables()
"""``model_type`` → every ``config.json`` field its loader reads and what it must hold (each family module's
``CONFIG_FIELDS``, gathered). A field that is absent takes the model's default, as in ``transformers``; one that is
present is checked by :func:`converters.hf.check_config_fields` before any model is built."""
