"""Hugging Face BERT, RoBERTa and CLIP vision folders ↔ Flax (:mod:`catmerge_jax.models.bert`,
:mod:`catmerge_jax.models.clip_vit`): a family module of :data:`converters.families.FAMILY_MODULES`.

Keys map mechanically (:func:`converters.keys.hf_key`). BERT/RoBERTa keys may carry the ``bert.``/``roberta.``
prefix (``*ForSequenceClassification`` etc.; keys outside the prefix are heads, kept aside) or not (``BertModel``);
a pooler is built when the checkpoint has one. CLIP: ``vision_model.*`` and ``visual_projection.weight`` become
leaves; in a full ``clip`` checkpoint the text tower, ``text_projection`` and ``logit_scale`` are kept aside. Old
``position_ids``/``token_type_ids`` buffers are kept aside too. Everything else goes through :mod:`converters.hf`.

>>> kind_of({"model_type": "xlm-roberta"}), kind_of({"model_type": "clip_vision_model"})
('roberta', 'clip_vision')
>>> layer_field({"model_type": "clip", "vision_config": {"num_hidden_layers": 2}})
('vision_config.num_hidden_layers', 2)
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from converters.config_fields import (COUNT, FLAG, NAME, POSITIVE_INT, POSITIVE_NUMBER, TOKEN_ID, VISION_FIELDS,
                                      section)
from converters.keys import ConversionError, hf_key, match_state, template_shapes

__all__ = ["KINDS", "CONFIG_FIELDS", "kind_of", "build_model", "example_inputs", "state_to_flax", "layer_key",
           "layer_field", "is_position_buffer"]

_KIND_OF_MODEL_TYPE = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta",
                       "clip": "clip_vision", "clip_vision_model": "clip_vision"}

KINDS = ("bert", "roberta", "clip_vision")
"""The model kinds of this family."""

_BERT_PREFIX = {"bert": "bert.", "roberta": "roberta."}

_BERT_FIELDS = {"vocab_size": POSITIVE_INT, "hidden_size": POSITIVE_INT, "num_hidden_layers": COUNT,
                "num_attention_heads": POSITIVE_INT, "intermediate_size": POSITIVE_INT, "hidden_act": NAME,
                "max_position_embeddings": POSITIVE_INT, "type_vocab_size": POSITIVE_INT,
                "layer_norm_eps": POSITIVE_NUMBER, "pad_token_id": TOKEN_ID, "position_embedding_type": NAME,
                "is_decoder": FLAG}

CONFIG_FIELDS = {
    **{mt: _BERT_FIELDS for mt in ("bert", "roberta", "xlm-roberta", "camembert")},
    "clip_vision_model": {**VISION_FIELDS, "projection_dim": POSITIVE_INT},
    "clip": {"projection_dim": POSITIVE_INT,
             **section("vision_config", {**VISION_FIELDS, "projection_dim": POSITIVE_INT})},
}
"""``model_type`` → the ``config.json`` fields its loader reads (:mod:`converters.config_fields`)."""

_LAYER_KEYS = {
    "bert": re.compile(r"^(?:bert\.|roberta\.)?encoder\.layer\.(\d+)\."),
    "roberta": re.compile(r"^(?:bert\.|roberta\.)?encoder\.layer\.(\d+)\."),
    "clip_vision": re.compile(r"^vision_model\.encoder\.layers\.(\d+)\."),
}


def kind_of(config: Mapping[str, Any]) -> str:
    """``"bert"``, ``"roberta"`` or ``"clip_vision"`` from a config's ``model_type``."""
    mt = config.get("model_type")
    if mt not in _KIND_OF_MODEL_TYPE:
        raise ConversionError(f"model_type {mt!r} is not one of {', '.join(_KIND_OF_MODEL_TYPE)}")
    return _KIND_OF_MODEL_TYPE[mt]


def build_model(kind: str, config: Mapping[str, Any], **options):
    """The linen module. Options: ``add_pooler`` (BERT/RoBERTa, default True), ``with_projection`` (CLIP, default
    True)."""
    if kind in ("bert", "roberta"):
        from catmerge_jax.models.bert import BertConfig, BertModel

        return BertModel(BertConfig.from_hf_config(config), add_pooler=options.get("add_pooler", True))
    from catmerge_jax.models.clip_vit import ClipVisionConfig, ClipVisionModel

    wp = options.get("with_projection", True)
    return ClipVisionModel(ClipVisionConfig.from_hf_config(config, with_projection=wp), layout="hf",
                           with_projection=wp)


def example_inputs(model) -> tuple:
    """Smallest inputs that build every parameter: ``(input_ids, attention_mask)`` for BERT, ``(pixels,)`` for
    CLIP."""
    from catmerge_jax.models.bert import BertModel

    # NumPy, not jnp: they are only traced (jax.eval_shape), and a jnp array would compile two programs first
    if isinstance(model, BertModel):
        return (np.ones((1, 1), np.int32), np.ones((1, 1), np.int32))
    cfg = model.config
    return (np.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), np.float32),)


def is_position_buffer(key: str) -> bool:
    """A position/token-type id buffer: non-persistent in current transformers, but older checkpoints saved them."""
    return key.endswith("embeddings.position_ids") or key.endswith("embeddings.token_type_ids")


def state_to_flax(state: Mapping[str, np.ndarray], config: Mapping[str, Any], *, dtype=np.float32):
    """A flat BERT/RoBERTa/CLIP state dict and its config → ``(model_kind, flax_params, meta)`` (see the module
    docstring for which keys become leaves)."""
    kind = kind_of(config)
    if kind in ("bert", "roberta"):
        prefix = _BERT_PREFIX[kind]
        if not any(k.startswith(prefix) for k in state):
            prefix = ""
        options = {"add_pooler": f"{prefix}pooler.dense.weight" in state}

        def is_aside(key):
            return (prefix and not key.startswith(prefix)) or is_position_buffer(key)
    else:
        prefix = ""
        options = {"with_projection": "visual_projection.weight" in state}
        full = config.get("model_type") == "clip"

        def is_aside(key):
            if is_position_buffer(key):
                return True
            return full and (key.startswith("text_model.") or key in ("text_projection.weight", "logit_scale"))
    model = build_model(kind, config, **options)
    shapes = template_shapes(model, *example_inputs(model))
    params, meta = match_state(state, shapes, lambda p: hf_key(p, prefix), is_aside, dtype=dtype,
                               model_kind=kind, config=dict(config), options=options)
    return kind, params, meta


def layer_key(kind: str):
    """The regex whose group 1 is the layer index of a checkpoint key of ``kind``."""
    return _LAYER_KEYS.get(kind)


def layer_field(config: Mapping[str, Any]) -> tuple[str, Any]:
    """``(config field, value)`` of the layer count the model would be built with (its defaults included)."""
    if kind_of(config) in ("bert", "roberta"):
        return "num_hidden_layers", config.get("num_hidden_layers", 12)
    full = config.get("model_type") == "clip"
    vision = config.get("vision_config") if full else config
    vision = vision if isinstance(vision, Mapping) else {}
    return ("vision_config.num_hidden_layers" if full else "num_hidden_layers"), vision.get("num_hidden_layers", 12)
