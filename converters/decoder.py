"""Hugging Face decoder folders (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2) ↔ Flax
(:mod:`catmerge_jax.models.decoder`).

The Flax model names its modules after ``transformers``' ``*ForCausalLM``, so keys map mechanically
(:func:`converters.keys.hf_key`: ``model/layers/3/self_attn/q_proj/kernel`` ↔ ``model.layers.3.self_attn.q_proj.weight``
transposed; RMSNorm ``scale`` ↔ ``weight``; ``embedding`` ↔ ``weight``). What differs between families is data,
:data:`NAMES` (checkpoint keys that are no Flax leaf and are kept aside unchanged: RoPE buffers that older files
saved) and :data:`catmerge_jax.models.decoder.FAMILIES` (the model's switches). A tied LM head is the embedding: a
checkpoint that still carries ``lm_head.weight`` keeps it aside and writes it back from the (possibly merged)
embedding, so it stays tied. Everything else goes through :mod:`converters.hf` (reading sharded safetensors,
bit-identical round trips in the checkpoint's dtypes, atomic writing); ``converters.families.FAMILY_MODULES``
sends these ``model_type`` values here.

>>> from converters.hf import load_hf_folder                    # doctest: +SKIP
>>> kind, config, params, meta = load_hf_folder("Llama-3.2-1B")  # doctest: +SKIP
>>> kind, params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].shape   # doctest: +SKIP
('llama', (2048, 2048))
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from catmerge_jax.models.decoder import FAMILIES, DecoderConfig, DecoderForCausalLM
from converters.keys import ConversionError, hf_key, match_state, template_shapes

__all__ = ["NAMES", "TIED", "LAYER_KEY", "kind_of", "build_model", "example_inputs", "state_to_flax", "layer_field",
           "decoder_config", "KINDS", "CONFIG_FIELDS", "layer_key"]

KINDS = tuple(FAMILIES)
"""The model kinds of this family: their ``model_type``."""

CONFIG_FIELDS: Mapping[str, Mapping[str, Any]] = {}
"""No field table: :func:`decoder_config` checks a decoder config (a one-line error naming the field)."""

_ROTARY = re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$")

NAMES: Mapping[str, Mapping[str, Any]] = {family: {"aside": (_ROTARY,)} for family in FAMILIES}
"""``model_type`` → its checkpoint names beyond the mechanical rule: ``aside``, patterns of keys kept unchanged."""

TIED = {"lm_head.weight": "model.embed_tokens.weight"}
"""A tied head's copy → its source (``_tied_weights_keys`` of every ``*ForCausalLM`` here)."""

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
"""The keys of one layer (for the config-versus-keys check that runs before any model is built)."""


def kind_of(config: Mapping[str, Any]) -> str:
    """The model kind of a decoder config: its ``model_type``."""
    return str(config.get("model_type"))


def decoder_config(config: Mapping[str, Any]) -> DecoderConfig:
    """:meth:`DecoderConfig.from_hf_config`, its ``ValueError`` as a one-line
    :class:`~converters.keys.ConversionError`."""
    try:
        return DecoderConfig.from_hf_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ConversionError(f"{config.get('model_type')} config: {e}") from None


def build_model(kind: str, config: Mapping[str, Any], **options) -> DecoderForCausalLM:
    """The linen module of a decoder checkpoint (it has no options read from its keys)."""
    return DecoderForCausalLM(decoder_config(config))


def example_inputs(model: DecoderForCausalLM) -> tuple:
    """Smallest inputs that build every parameter (``input_ids, attention_mask``)."""
    return (jnp.ones((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))


def layer_key(kind: str) -> re.Pattern:
    """:data:`LAYER_KEY`, for every decoder kind."""
    return LAYER_KEY


def layer_field(config: Mapping[str, Any]) -> tuple[str, Any]:
    """``(config field, value)`` of the layer count the model is built with."""
    return "num_hidden_layers", config.get("num_hidden_layers")


def state_to_flax(state: Mapping[str, np.ndarray], config: Mapping[str, Any], *, dtype=np.float32):
    """A flat decoder state dict and its config → ``(model_kind, flax_params, meta)`` (see :mod:`converters.hf`)."""
    kind = kind_of(config)
    model = build_model(kind, config)
    tied = model.config.tie_word_embeddings
    patterns = NAMES[kind]["aside"]

    def is_aside(key: str) -> bool:
        return (tied and key in TIED) or any(p.search(key) for p in patterns)

    if not tied and "lm_head.weight" not in state:
        raise ConversionError(f"{kind} checkpoint lacks key 'lm_head.weight' and its config says "
                              "tie_word_embeddings=false")
    shapes = template_shapes(model, *example_inputs(model))
    params, meta = match_state(state, shapes, hf_key, is_aside, dtype=dtype, model_kind=kind, config=dict(config),
                               options={})
    meta.ties = {key: src for key, src in TIED.items() if tied and key in state}
    return kind, params, meta
