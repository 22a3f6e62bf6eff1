"""BLIP (vision transformer, text encoder with cross-attention, text decoder) in Flax linen, in Hugging Face's layout.

Two models, each the module tree of its ``transformers`` class, so every parameter path maps mechanically onto the
HF state-dict key (``a/b/kernel`` ↔ ``a.b.weight`` transposed; Conv2d ``(out, in, p, p)`` ↔ ``(p, p, in, out)``;
LayerNorm ``scale`` ↔ ``weight``; ``embedding`` ↔ ``weight``; bare parameters keep their names):

* :class:`BlipForQuestionAnswering` — ``vision_model``, ``text_encoder`` (self-attention over the question, cross-
  attention to the image tokens), ``text_decoder`` (causal self-attention, cross-attention to the question states,
  LM head). Used for every task of the paper's vision-language setting (Table 4).
* :class:`BlipForConditionalGeneration` — ``vision_model`` and ``text_decoder`` (cross-attention to the image).

Leaves (vision width ``v``, text width ``d``, ``L`` layers each, MLP widths ``f``)::

    vision_model/embeddings/patch_embedding/{kernel (p, p, 3, v), bias}
    vision_model/embeddings/class_embedding (1, 1, v);  position_embedding (1, n_patches + 1, v)
    vision_model/encoder/layers/<i>/self_attn/qkv/{kernel (v, 3v), bias}      fused q | k | v
    vision_model/encoder/layers/<i>/self_attn/projection/{kernel, bias}
    vision_model/encoder/layers/<i>/{layer_norm1, layer_norm2}/{scale, bias}; mlp/{fc1, fc2}/{kernel, bias}
    vision_model/post_layernorm/{scale, bias}
    text_encoder/embeddings/{word_embeddings, position_embeddings}/embedding; embeddings/LayerNorm
    text_encoder/encoder/layer/<i>/attention/{self/{query,key,value}, output/{dense, LayerNorm}}
    text_encoder/encoder/layer/<i>/crossattention/... (key/value read the image tokens: (v, d))
    text_encoder/encoder/layer/<i>/{intermediate/dense, output/{dense, LayerNorm}}
    text_decoder/bert/...                          as text_encoder, causal
    text_decoder/cls/predictions/transform/{dense, LayerNorm}; text_decoder/cls/predictions/bias (vocab,)

The LM head's weight is tied to ``text_decoder/bert/embeddings/word_embeddings`` (as in every BLIP checkpoint), so
it is no separate leaf. Numerics follow ``transformers``: exact GELU, two-pass LayerNorm variance, an additive mask
of ``finfo.min`` on masked keys, post-LayerNorm image tokens as the text side's cross-attention input.

**Generation** (:func:`generate`, jitted, static shapes): the image (and, for QA, the question) is encoded once, the
cross-attention keys/values of every decoder layer are computed once, and the self-attention keys/values live in a
cache of length ``max_length`` written with ``dynamic_update_slice``. Greedy and beam search reproduce
``transformers``' ``generate`` for these models (start token, ``sep_token_id`` as end, padding after the end, beam
search with its length penalty and stopping heuristic).

**Capture.** Image-side layers are marker subclasses (:class:`ImageDense`, :class:`ImageLayerNorm`,
:class:`ImageConv`) whose capture rules (:data:`CAPTURE_RULES`) flatten their rows to one axis, so a text
``token_mask (batch, seq)`` never applies to image tokens — all image tokens count, whatever ``seq`` is — while every
text-side layer (the decoder's cross-attention keys/values in the QA model read the question states, which are text)
keeps the ``(batch, seq)`` rows that the mask drops padding from. Use :func:`blip_capture`.

>>> import jax, jax.numpy as jnp
>>> cfg = BlipConfig(BlipVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
...                                   intermediate_size=24, image_size=16, patch_size=8),
...                  BlipTextConfig(vocab_size=40, hidden_size=16, encoder_hidden_size=16, num_hidden_layers=1,
...                                 num_attention_heads=2, intermediate_size=24, max_position_embeddings=24,
...                                 bos_token_id=30, sep_token_id=3, pad_token_id=0))
>>> model = BlipForQuestionAnswering(cfg)
>>> pixels = jnp.zeros((1, 16, 16, 3)); ids = jnp.array([[2, 7, 9, 3]]); mask = jnp.ones_like(ids)
>>> params = model.init(jax.random.PRNGKey(0), pixels, ids, mask)["params"]
>>> out = model.apply({"params": params}, pixels, ids, mask)
>>> out.image_embeds.shape, out.question_embeds.shape, out.logits.shape
((1, 5, 16), (1, 4, 16), (1, 4, 40))
>>> generate(model, params, pixels, ids, mask, max_length=6).shape[0]
1
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.capture import DEFAULT_RULES, Captured, make_capture
from catmerge_jax.models.bert import ACTIVATIONS

__all__ = ["BlipVisionConfig", "BlipTextConfig", "BlipConfig", "BlipVisionModel", "BlipTextModel",
           "BlipTextLMHeadModel", "BlipForQuestionAnswering", "BlipForConditionalGeneration", "BlipOutput",
           "ImageDense", "ImageLayerNorm", "ImageConv", "CAPTURE_RULES", "blip_capture", "generate", "greedy_search",
           "beam_search", "decoder_inputs_from_text"]

_INIT = nn.initializers.normal(0.02)


def _act(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def _square(value, key):
    if isinstance(value, (list, tuple)):
        a, b = value
        if a != b:
            raise ValueError(f"non-square {key} {value} is not supported")
        return a
    return value


@dataclasses.dataclass(frozen=True)
class BlipVisionConfig:
    """Vision tower hyperparameters (names as in HF's ``vision_config``)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 384
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _act(self.hidden_act)

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class BlipTextConfig:
    """Text encoder/decoder hyperparameters (names as in HF's ``text_config``). ``is_decoder`` (HF's default True)
    gives every layer a cross-attention block; ``sep_token_id`` ends generated sequences (HF's BLIP ``generate``)."""

    vocab_size: int = 30524
    hidden_size: int = 768
    encoder_hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    bos_token_id: int = 30522
    sep_token_id: int = 102
    pad_token_id: int = 0
    is_decoder: bool = True
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        _act(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class BlipConfig:
    vision: BlipVisionConfig = BlipVisionConfig()
    text: BlipTextConfig = BlipTextConfig()

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "BlipConfig":
        """From a ``blip`` ``config.json`` dict; missing keys take ``transformers``' defaults. As HF's
        ``BlipConfig`` does, the text side's ``encoder_hidden_size`` is the vision width."""
        if config.get("model_type") != "blip":
            raise ValueError(f"config model_type {config.get('model_type')!r} is not 'blip'")
        if not config.get("tie_word_embeddings", True) or not (config.get("text_config") or {}).get(
                "tie_word_embeddings", True):
            raise ValueError("BLIP configs with tie_word_embeddings=False are not supported (the LM head is the "
                             "word embedding table in every BLIP checkpoint)")
        v = dict(config.get("vision_config") or {})
        t = dict(config.get("text_config") or {})
        vnames = {f.name for f in dataclasses.fields(BlipVisionConfig)} - {"dtype"}
        tnames = {f.name for f in dataclasses.fields(BlipTextConfig)} - {"dtype"}
        vkw = {k: v[k] for k in vnames if v.get(k) is not None}
        for key in ("image_size", "patch_size"):
            if key in vkw:
                vkw[key] = _square(vkw[key], key)
        tkw = {k: t[k] for k in tnames if t.get(k) is not None}
        vision = BlipVisionConfig(**vkw)
        tkw["encoder_hidden_size"] = vision.hidden_size
        return cls(vision=vision, text=BlipTextConfig(**tkw))


# ---------------------------------------------------------------------------------------------- marker layers

class ImageDense(nn.Dense):
    """An ``nn.Dense`` whose input rows are image tokens (capture: every row counts, see :data:`CAPTURE_RULES`)."""


class ImageLayerNorm(nn.LayerNorm):
    """An ``nn.LayerNorm`` over image tokens."""


class ImageConv(nn.Conv):
    """The patch embedding ``nn.Conv``."""


def _flat_rows(rule):
    """Wrap a capture rule so its rows become one axis: a 2-D text token mask can then never match them."""

    def flat(module, args, kwargs):
        c = rule(module, args, kwargs)
        n = int(np.prod(c.rows_shape))
        flatten = lambda t: t.reshape((n,) + t.shape[len(c.rows_shape):])
        return Captured(rows_shape=(n,), linear={k: flatten(x) for k, x in c.linear.items()},
                        scale={k: flatten(x) for k, x in c.scale.items()})

    flat.__doc__ = f"{rule.__name__} with the rows flattened to one axis (image tokens: all count)."
    return flat


class LMPrediction(nn.Module):
    """HF's ``BlipTextLMPredictionHead``: ``transform`` (dense, activation, LayerNorm), then the tied word embedding
    table and the output ``bias``: ``logits = transform(h) @ Eᵀ + bias``."""

    config: BlipTextConfig

    @nn.compact
    def __call__(self, h, embedding):
        cfg = self.config
        h = _LMTransform(cfg, name="transform")(h)
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,))
        return jnp.einsum("...d,vd->...v", h, embedding.astype(h.dtype)) + bias.astype(h.dtype)


def _lm_prediction_rule(module, args, kwargs):
    """The output bias sees one row per token (the tied weight is the embedding table, role ``other``)."""
    h = args[0]
    return Captured(rows_shape=tuple(h.shape[:-1]))


CAPTURE_RULES: Mapping[type, Any] = {
    ImageDense: _flat_rows(DEFAULT_RULES[nn.Dense]),
    ImageLayerNorm: _flat_rows(DEFAULT_RULES[nn.LayerNorm]),
    ImageConv: _flat_rows(DEFAULT_RULES[nn.Conv]),
    LMPrediction: _lm_prediction_rule,
}
"""Capture rules for BLIP (pass as ``rules=`` or use :func:`blip_capture`)."""


def blip_capture(model: nn.Module, **kwargs):
    """:func:`catmerge_jax.capture.make_capture` of a BLIP model with :data:`CAPTURE_RULES`. Capture with inputs
    ``(pixels, input_ids, attention_mask)`` and ``token_mask=attention_mask``."""
    return make_capture(model, rules=CAPTURE_RULES, **kwargs)


def _ln(eps, dtype, name, cls=nn.LayerNorm):
    # Two-pass variance, as torch computes it.
    return cls(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def _additive(keep, dtype):
    """Bool ``keep`` → 0 where attended, ``finfo.min`` where masked (HF's eager masks)."""
    return jnp.where(keep, 0.0, jnp.finfo(dtype).min).astype(dtype)


# ---------------------------------------------------------------------------------------------- vision

class BlipVisionEmbeddings(nn.Module):
    config: BlipVisionConfig

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        p, v = cfg.patch_size, cfg.hidden_size
        x = ImageConv(v, (p, p), strides=(p, p), padding="VALID", dtype=cfg.dtype, kernel_init=_INIT,
                      name="patch_embedding")(pixels)
        x = x.reshape(x.shape[0], -1, v)  # row-major over the patch grid, as torch's flatten(2)
        cls_token = self.param("class_embedding", _INIT, (1, 1, v))
        pos = self.param("position_embedding", _INIT, (1, cfg.num_positions, v))
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(x.dtype), (x.shape[0], 1, v)), x], axis=1)
        return x + pos.astype(x.dtype)


class BlipVisionAttention(nn.Module):
    config: BlipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, n, d = x.shape
        h = cfg.num_attention_heads
        qkv = ImageDense(3 * d, dtype=cfg.dtype, kernel_init=_INIT, name="qkv")(x).reshape(b, n, 3, h, d // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // h) ** -0.5, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)
        return ImageDense(d, dtype=cfg.dtype, kernel_init=_INIT, name="projection")(out)


class BlipMLP(nn.Module):
    config: BlipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = ImageDense(cfg.intermediate_size, dtype=cfg.dtype, kernel_init=_INIT, name="fc1")(x)
        return ImageDense(cfg.hidden_size, dtype=cfg.dtype, kernel_init=_INIT, name="fc2")(_act(cfg.hidden_act)(h))


class BlipEncoderLayer(nn.Module):
    """Pre-LN block: ``x += attn(LN1 x); x += mlp(LN2 x)``."""

    config: BlipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = x + BlipVisionAttention(cfg, name="self_attn")(
            _ln(cfg.layer_norm_eps, cfg.dtype, "layer_norm1", ImageLayerNorm)(x))
        return x + BlipMLP(cfg, name="mlp")(_ln(cfg.layer_norm_eps, cfg.dtype, "layer_norm2", ImageLayerNorm)(x))


class _VisionLayers(nn.Module):
    config: BlipVisionConfig

    @nn.compact
    def __call__(self, x):
        states = []
        for i in range(self.config.num_hidden_layers):
            x = BlipEncoderLayer(self.config, name=str(i))(x)
            states.append(x)
        return states


class _VisionEncoder(nn.Module):
    config: BlipVisionConfig

    @nn.compact
    def __call__(self, x):
        return _VisionLayers(self.config, name="layers")(x)


@flax.struct.dataclass
class BlipVisionOutput:
    """``last_hidden_state`` (batch, n_patches + 1, v): post-LayerNorm tokens (the text side's cross-attention
    input, HF's ``image_embeds``). ``pooler_output`` (batch, v): post_layernorm applied again to the class token
    (as HF does). ``hidden_states``: the embeddings, then each block's output (before the final LayerNorm)."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple

    def __getitem__(self, key: str):
        return getattr(self, key)


class BlipVisionModel(nn.Module):
    """HF's ``BlipVisionModel``. Pixels are NHWC ``(batch, image_size, image_size, channels)``."""

    config: BlipVisionConfig

    @nn.compact
    def __call__(self, pixels) -> BlipVisionOutput:
        cfg = self.config
        pixels = jnp.asarray(pixels, cfg.dtype)
        if pixels.ndim != 4 or pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"pixels must be NHWC (batch, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}), "
                             f"got {pixels.shape}")
        x = BlipVisionEmbeddings(cfg, name="embeddings")(pixels)
        states = _VisionEncoder(cfg, name="encoder")(x)
        post = _ln(cfg.layer_norm_eps, cfg.dtype, "post_layernorm", ImageLayerNorm)
        last = post(states[-1] if states else x)
        return BlipVisionOutput(last_hidden_state=last, pooler_output=post(last[:, 0]), hidden_states=(x, *states))


# ---------------------------------------------------------------------------------------------- text

def _text_attend(q, k, v, additive, heads):
    """``(b, s, d)`` queries on ``(b, L, d)`` keys/values with an additive mask broadcastable to ``(b, h, s, L)``."""
    b, s, d = q.shape
    hd = d // heads
    q = q.reshape(b, s, heads, hd)
    k = k.reshape(b, k.shape[1], heads, hd)
    v = v.reshape(b, v.shape[1], heads, hd)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(hd, q.dtype))
    probs = jax.nn.softmax(scores + additive, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d)


class BlipTextSelfAttention(nn.Module):
    """Self- or cross-attention. Keys/values come from ``source`` (cross) or ``x`` (self), or are given as ``kv``
    (cross-attention keys/values computed once for generation). With ``cache = (k, v)`` (``(b, L, d)`` each), the new
    keys/values are written at ``index`` and attention runs over the whole cache. Returns ``(out, (k, v))``."""

    config: BlipTextConfig
    kv_image: bool = False

    @nn.compact
    def __call__(self, x, additive, source=None, kv=None, cache=None, index=0):
        cfg = self.config
        d = cfg.hidden_size
        q = nn.Dense(d, dtype=cfg.dtype, kernel_init=_INIT, name="query")(x)
        if kv is None:
            kv_dense = ImageDense if self.kv_image else nn.Dense
            src = x if source is None else source
            k = kv_dense(d, dtype=cfg.dtype, kernel_init=_INIT, name="key")(src)
            v = kv_dense(d, dtype=cfg.dtype, kernel_init=_INIT, name="value")(src)
            if cache is not None:
                k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0))
                v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0))
        else:
            k, v = kv
        return _text_attend(q, k, v, additive, cfg.num_attention_heads), (k, v)


class _DenseLN(nn.Module):
    """``LayerNorm(dense(h) + residual)`` — HF's ``BlipTextSelfOutput`` and ``BlipTextOutput``."""

    config: BlipTextConfig

    @nn.compact
    def __call__(self, h, residual):
        cfg = self.config
        h = nn.Dense(cfg.hidden_size, dtype=cfg.dtype, kernel_init=_INIT, name="dense")(h)
        return _ln(cfg.layer_norm_eps, cfg.dtype, "LayerNorm")(h + residual)


class BlipTextAttention(nn.Module):
    config: BlipTextConfig
    kv_image: bool = False

    @nn.compact
    def __call__(self, x, additive, source=None, kv=None, cache=None, index=0):
        h, kv = BlipTextSelfAttention(self.config, self.kv_image, name="self")(x, additive, source, kv, cache, index)
        return _DenseLN(self.config, name="output")(h, x), kv


class _Intermediate(nn.Module):
    config: BlipTextConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        return _act(cfg.hidden_act)(nn.Dense(cfg.intermediate_size, dtype=cfg.dtype, kernel_init=_INIT,
                                             name="dense")(x))


class BlipTextLayer(nn.Module):
    """Self-attention, cross-attention (when the config has it and encoder states or keys/values are given), MLP.
    Returns ``(x, self (k, v), cross (k, v) or None)``."""

    config: BlipTextConfig
    kv_image: bool = False

    @nn.compact
    def __call__(self, x, self_additive, encoder_states=None, encoder_additive=None, cache=None, index=0,
                 cross_kv=None):
        cfg = self.config
        a, self_kv = BlipTextAttention(cfg, name="attention")(x, self_additive, cache=cache, index=index)
        cross = None
        if cfg.is_decoder and (encoder_states is not None or cross_kv is not None):
            a, cross = BlipTextAttention(cfg, self.kv_image, name="crossattention")(
                a, encoder_additive, source=encoder_states, kv=cross_kv)
        out = _DenseLN(cfg, name="output")(_Intermediate(cfg, name="intermediate")(a), a)
        return out, self_kv, cross


class _TextLayers(nn.Module):
    config: BlipTextConfig
    kv_image: bool = False

    @nn.compact
    def __call__(self, x, self_additive, encoder_states, encoder_additive, cache, index, cross_kv):
        states, self_kvs, cross_kvs = [], [], []
        for i in range(self.config.num_hidden_layers):
            x, skv, ckv = BlipTextLayer(self.config, self.kv_image, name=str(i))(
                x, self_additive, encoder_states, encoder_additive, None if cache is None else cache[i], index,
                None if cross_kv is None else cross_kv[i])
            states.append(x)
            self_kvs.append(skv)
            cross_kvs.append(ckv)
        return states, self_kvs, cross_kvs


class _TextEncoder(nn.Module):
    config: BlipTextConfig
    kv_image: bool = False

    @nn.compact
    def __call__(self, *args):
        return _TextLayers(self.config, self.kv_image, name="layer")(*args)


class BlipTextEmbeddings(nn.Module):
    config: BlipTextConfig

    @nn.compact
    def __call__(self, input_ids, position_ids):
        cfg = self.config
        word = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, embedding_init=_INIT,
                        name="word_embeddings")
        x = word(input_ids)
        x = x + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype, embedding_init=_INIT,
                         name="position_embeddings")(position_ids)
        return _ln(cfg.layer_norm_eps, cfg.dtype, "LayerNorm")(x), word.embedding


@flax.struct.dataclass
class BlipTextOutput:
    """``last_hidden_state`` (batch, seq, d); ``hidden_states`` (embeddings, then each layer); ``cache``: per layer
    the self-attention ``(k, v)`` (``(b, L, d)`` when a cache was given, else this call's); ``cross_kv``: per layer
    the cross-attention ``(k, v)`` (or ``None``); ``word_embeddings`` (vocab, d): the table (tied LM head)."""

    last_hidden_state: jax.Array
    hidden_states: tuple
    cache: Any
    cross_kv: Any
    word_embeddings: jax.Array

    def __getitem__(self, key: str):
        return getattr(self, key)


class BlipTextModel(nn.Module):
    """HF's ``BlipTextModel`` without pooler (as ``BlipForQuestionAnswering.text_encoder`` and the decoder's ``bert``).

    Call: ``input_ids`` (b, s); ``attention_mask`` (b, s) 1 = attend (``None``: all), or (b, L) over the cache when
    ``cache`` is given; ``encoder_hidden_states`` (b, n, e) and ``encoder_attention_mask`` (b, n) (``None``: all);
    ``causal`` (the decoder); ``cache`` (per layer ``(k, v)``, ``(b, L, d)``) with ``index`` (where the ``s`` new
    tokens go, also their first position id; causal); ``cross_kv`` (per layer) in place of encoder states.
    ``kv_image``: the cross-attention keys/values read image tokens (capture: all rows count).
    """

    config: BlipTextConfig
    kv_image: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, *,
                 causal: bool = False, cache=None, index=0, cross_kv=None) -> BlipTextOutput:
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        b, s = input_ids.shape
        positions = index + jnp.arange(s, dtype=jnp.int32)
        x, table = BlipTextEmbeddings(cfg, name="embeddings")(input_ids, jnp.broadcast_to(positions, (b, s)))
        n_keys = s if cache is None else cache[0][0].shape[1]
        keys = jnp.ones((b, n_keys), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        keep = keys[:, None, None, :]
        if causal or cache is not None:
            keep = keep & (jnp.arange(n_keys)[None, :] <= positions[:, None])[None, None]
        self_add = _additive(keep, x.dtype)
        enc_add = None
        if encoder_hidden_states is not None or cross_kv is not None:
            n_enc = (encoder_hidden_states.shape[1] if encoder_hidden_states is not None else cross_kv[0][0].shape[1])
            enc_keep = (jnp.ones((b, n_enc), bool) if encoder_attention_mask is None
                        else jnp.asarray(encoder_attention_mask).astype(bool))
            enc_add = _additive(enc_keep[:, None, None, :], x.dtype)
        states, self_kvs, cross_kvs = _TextEncoder(cfg, self.kv_image, name="encoder")(
            x, self_add, encoder_hidden_states, enc_add, cache, index, cross_kv)
        last = states[-1] if states else x
        return BlipTextOutput(last_hidden_state=last, hidden_states=(x, *states), cache=self_kvs,
                              cross_kv=cross_kvs if cfg.is_decoder else None, word_embeddings=table)


class _LMTransform(nn.Module):
    config: BlipTextConfig

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        h = _act(cfg.hidden_act)(nn.Dense(cfg.hidden_size, dtype=cfg.dtype, kernel_init=_INIT, name="dense")(h))
        return _ln(cfg.layer_norm_eps, cfg.dtype, "LayerNorm")(h)


class _Cls(nn.Module):
    config: BlipTextConfig

    @nn.compact
    def __call__(self, h, table):
        return LMPrediction(self.config, name="predictions")(h, table)


@flax.struct.dataclass
class BlipLMOutput:
    """``logits`` (b, s, vocab); ``text``: the :class:`BlipTextOutput` of ``bert``."""

    logits: jax.Array
    text: BlipTextOutput

    def __getitem__(self, key: str):
        return getattr(self, key)


class BlipTextLMHeadModel(nn.Module):
    """HF's ``BlipTextLMHeadModel``: ``bert`` (causal :class:`BlipTextModel`) and ``cls`` (LM head, tied weight)."""

    config: BlipTextConfig
    kv_image: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, *,
                 cache=None, index=0, cross_kv=None, last_only: bool = False) -> BlipLMOutput:
        out = BlipTextModel(self.config, self.kv_image, name="bert")(
            input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, causal=True, cache=cache,
            index=index, cross_kv=cross_kv)
        h = out.last_hidden_state[:, -1:] if last_only else out.last_hidden_state
        return BlipLMOutput(logits=_Cls(self.config, name="cls")(h, out.word_embeddings), text=out)


# ---------------------------------------------------------------------------------------------- the two models

def decoder_inputs_from_text(input_ids, attention_mask, bos_token_id: int):
    """The decoder's teacher-forced inputs for unlabeled text: the tokens with the first (``[CLS]``) replaced by
    ``bos`` (HF's captioning prompt handling), same mask. Used when no ``decoder_input_ids`` are given (capture)."""
    ids = jnp.asarray(input_ids)
    ids = ids.at[:, 0].set(bos_token_id)
    mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    return ids, mask


@flax.struct.dataclass
class BlipOutput:
    """``image_embeds`` (b, n_img, v); ``question_embeds`` (b, s, d) or ``None`` (captioning); ``logits``
    (b, s_dec, vocab); ``vision``: the :class:`BlipVisionOutput`."""

    image_embeds: jax.Array
    question_embeds: Optional[jax.Array]
    logits: jax.Array
    vision: BlipVisionOutput

    def __getitem__(self, key: str):
        return getattr(self, key)


class BlipForQuestionAnswering(nn.Module):
    """HF's ``BlipForQuestionAnswering``: ``vision_model``, ``text_encoder``, ``text_decoder``.

    ``__call__(pixels, input_ids, attention_mask, decoder_input_ids=None, decoder_attention_mask=None)``: HF's
    ``forward`` (the decoder's cross-attention attends to every question position, padding included, as
    ``transformers`` computes it; padded positions still never count in capture); without
    ``decoder_input_ids`` the decoder reads :func:`decoder_inputs_from_text` (the exemplar convention for capture).
    ``encode`` (method): what ``generate`` conditions the decoder on — question states and an all-ones mask (HF's
    ``generate`` attends to every question position).
    """

    config: BlipConfig

    def setup(self):
        self.vision_model = BlipVisionModel(self.config.vision)
        self.text_encoder = BlipTextModel(self.config.text, kv_image=True)
        self.text_decoder = BlipTextLMHeadModel(self.config.text, kv_image=False)

    def _question(self, pixels, input_ids, attention_mask):
        vision = self.vision_model(pixels)
        q = self.text_encoder(input_ids, attention_mask, vision.last_hidden_state, None)
        return vision, q.last_hidden_state

    def __call__(self, pixels, input_ids, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None) -> BlipOutput:
        vision, question = self._question(pixels, input_ids, attention_mask)
        if decoder_input_ids is None:
            decoder_input_ids, decoder_attention_mask = decoder_inputs_from_text(
                input_ids, attention_mask, self.config.text.bos_token_id)
        # transformers (installed 5.x) applies no mask in cross-attention (its BlipTextSelfAttention replaces the
        # mask it is given by the absent encoder_attention_mask), so every question position is attended to.
        dec = self.text_decoder(decoder_input_ids, decoder_attention_mask, question, None)
        return BlipOutput(image_embeds=vision.last_hidden_state, question_embeds=question, logits=dec.logits,
                          vision=vision)

    def encode(self, pixels, input_ids, attention_mask=None):
        _, question = self._question(pixels, input_ids, attention_mask)
        return question, jnp.ones(question.shape[:2], jnp.int32)

    def decode(self, input_ids, attention_mask, encoder_states, encoder_mask, *, cache, index, cross_kv=None):
        return self.text_decoder(input_ids, attention_mask, None if cross_kv is not None else encoder_states,
                                 encoder_mask, cache=cache, index=index, cross_kv=cross_kv, last_only=True)


class BlipForConditionalGeneration(nn.Module):
    """HF's ``BlipForConditionalGeneration``: ``vision_model`` and ``text_decoder`` (cross-attention to the image).

    ``__call__(pixels, input_ids, attention_mask=None)``: decoder logits for ``input_ids`` as given (HF's ``forward``;
    use :func:`decoder_inputs_from_text` for a tokenized prompt). Capture calls it with the exemplar text.
    """

    config: BlipConfig

    def setup(self):
        self.vision_model = BlipVisionModel(self.config.vision)
        self.text_decoder = BlipTextLMHeadModel(self.config.text, kv_image=True)

    def __call__(self, pixels, input_ids, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None) -> BlipOutput:
        vision = self.vision_model(pixels)
        if decoder_input_ids is None:
            decoder_input_ids, decoder_attention_mask = input_ids, attention_mask
        dec = self.text_decoder(decoder_input_ids, decoder_attention_mask, vision.last_hidden_state, None)
        return BlipOutput(image_embeds=vision.last_hidden_state, question_embeds=None, logits=dec.logits,
                          vision=vision)

    def encode(self, pixels, input_ids=None, attention_mask=None):
        image = self.vision_model(pixels).last_hidden_state
        return image, jnp.ones(image.shape[:2], jnp.int32)

    def decode(self, input_ids, attention_mask, encoder_states, encoder_mask, *, cache, index, cross_kv=None):
        return self.text_decoder(input_ids, attention_mask, None if cross_kv is not None else encoder_states,
                                 encoder_mask, cache=cache, index=index, cross_kv=cross_kv, last_only=True)


# ---------------------------------------------------------------------------------------------- generation

class _Start(NamedTuple):
    """What the decoder starts from: ``encoder_states`` (b, n, e) and ``encoder_mask`` (b, n) it attends to, the
    decoder ``prompt`` (b, s0) and its ``prompt_mask``."""

    encoder_states: jax.Array
    encoder_mask: jax.Array
    prompt: jax.Array
    prompt_mask: jax.Array


@functools.partial(jax.jit, static_argnames=("model",))
def _encode(model, params, pixels, input_ids=None, attention_mask=None):
    return model.apply({"params": params}, pixels, input_ids, attention_mask, method="encode")


def _start(model, params, pixels, input_ids, attention_mask) -> _Start:
    """HF's ``generate`` of each model up to the decoder's ``generate`` call.

    QA: the question is encoded with the image; the decoder starts from ``bos`` and attends to every question
    position. Captioning: without a prompt the decoder starts from ``bos``; with one, its first token becomes ``bos``
    and its last token (the tokenizer's ``[SEP]``) is dropped, mask likewise.
    """
    text = model.config.text
    pixels = jnp.asarray(pixels)
    b = pixels.shape[0]
    if isinstance(model, BlipForQuestionAnswering):
        if input_ids is None:
            raise ValueError("question answering needs the question's input_ids")
        states, mask = _encode(model, params, pixels, jnp.asarray(input_ids),
                               None if attention_mask is None else jnp.asarray(attention_mask))
        prompt = jnp.full((b, 1), text.bos_token_id, jnp.int32)
        return _Start(states, mask, prompt, jnp.ones_like(prompt))
    if isinstance(model, BlipForConditionalGeneration):
        states, mask = _encode(model, params, pixels)
        if input_ids is None:
            prompt = jnp.full((b, 1), text.bos_token_id, jnp.int32)
            return _Start(states, mask, prompt, jnp.ones_like(prompt))
        ids = jnp.asarray(input_ids, jnp.int32).at[:, 0].set(text.bos_token_id)[:, :-1]
        pm = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)[:, :-1]
        return _Start(states, mask, ids, pm)
    raise TypeError(f"generate needs a BlipForQuestionAnswering or BlipForConditionalGeneration, got {type(model)}")


def _empty_cache(config: BlipTextConfig, batch: int, length: int, dtype) -> list:
    shape = (batch, length, config.hidden_size)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers)]


def _prefill(model, params, start: _Start, max_length: int):
    """Run the decoder on the prompt with an empty cache: last-position logits (b, V) in float32, the cache, the
    cross-attention keys/values (computed here once) and the key mask over the ``max_length`` cache positions."""
    b, s0 = start.prompt.shape
    key_mask = jnp.concatenate([start.prompt_mask.astype(jnp.int32), jnp.ones((b, max_length - s0), jnp.int32)], 1)
    cache = _empty_cache(model.config.text, b, max_length, start.encoder_states.dtype)
    out = model.apply({"params": params}, start.prompt, key_mask, start.encoder_states, start.encoder_mask,
                      cache=cache, index=0, method="decode")
    return out.logits[:, -1].astype(jnp.float32), out.text.cache, out.text.cross_kv, key_mask


def _step(model, params, token, key_mask, start_mask, cache, cross_kv, index):
    out = model.apply({"params": params}, token, key_mask, None, start_mask, cache=cache, index=index,
                      cross_kv=cross_kv, method="decode")
    return out.logits[:, -1].astype(jnp.float32), out.text.cache


@functools.partial(jax.jit, static_argnames=("model", "max_length"))
def _greedy(model, params, start: _Start, max_length: int):
    text = model.config.text
    b, s0 = start.prompt.shape
    logits, cache, cross_kv, key_mask = _prefill(model, params, start, max_length)
    seqs = jnp.full((b, max_length), text.pad_token_id, jnp.int32).at[:, :s0].set(start.prompt)

    def cond(state):
        cur, unfinished = state[0], state[1]
        return (cur < max_length) & jnp.any(unfinished)

    def body(state):
        cur, unfinished, seqs, logits, cache = state
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        nxt = jnp.where(unfinished, nxt, text.pad_token_id)
        seqs = jax.lax.dynamic_update_slice(seqs, nxt[:, None], (0, cur))
        unfinished = unfinished & (nxt != text.sep_token_id)
        logits, cache = _step(model, params, nxt[:, None], key_mask, start.encoder_mask, cache, cross_kv, cur)
        return cur + 1, unfinished, seqs, logits, cache

    state = (jnp.asarray(s0, jnp.int32), jnp.ones((b,), bool), seqs, logits, cache)
    cur, _, seqs, _, _ = jax.lax.while_loop(cond, body, state)
    return seqs, cur


def _gather(x, idx):
    """``x[i, idx[i, j], ...]`` for ``x`` (b, k, ...) and ``idx`` (b, m)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=("model", "max_length", "num_beams", "length_penalty",
                                             "early_stopping"))
def _beam(model, params, start: _Start, max_length: int, num_beams: int, length_penalty: float,
          early_stopping):
    """``transformers``' vectorized ``_beam_search`` (one EOS token, no sampling, one returned sequence)."""
    text = model.config.text
    eos, nb = text.sep_token_id, num_beams
    rep = lambda t: jnp.repeat(t, nb, axis=0)
    start = _Start(rep(start.encoder_states), rep(start.encoder_mask), rep(start.prompt), rep(start.prompt_mask))
    bb, s0 = start.prompt.shape
    b = bb // nb
    keep = 2 * nb  # max(2, 1 + n_eos) * num_beams
    top_mask = jnp.arange(keep) < nb
    fill = text.pad_token_id if text.pad_token_id else eos  # HF: `pad_token_id or eos_token_id`
    logits, cache, cross_kv, key_mask = _prefill(model, params, start, max_length)
    running = jnp.full((b, nb, max_length), fill, jnp.int32).at[:, :, :s0].set(start.prompt.reshape(b, nb, s0))
    n_gen = max_length - s0
    state = dict(
        cur=jnp.asarray(s0, jnp.int32), done=jnp.asarray(False), logits=logits, cache=cache,
        running=running, sequences=running,
        running_scores=jnp.zeros((b, nb), jnp.float32).at[:, 1:].set(-1e9),
        scores=jnp.full((b, nb), -1e9, jnp.float32),
        finished=jnp.zeros((b, nb), bool), unsat=jnp.ones((b, 1), bool),
        running_idx=jnp.full((b, nb, n_gen), -1, jnp.int32), idx=jnp.full((b, nb, n_gen), -1, jnp.int32))

    def cond(st):
        return ~st["done"]

    def body(st):
        cur = st["cur"]
        vocab = st["logits"].shape[-1]
        logp = jax.nn.log_softmax(st["logits"], axis=-1).reshape(b, nb, vocab) + st["running_scores"][:, :, None]
        topk_logp, topk = jax.lax.top_k(logp.reshape(b, nb * vocab), keep)
        beam_of = topk // vocab
        ids = (topk % vocab).astype(jnp.int32)
        t_seq = _gather(st["running"], beam_of)
        t_seq = jax.vmap(lambda s, i: jax.lax.dynamic_update_slice(s, i[:, None], (0, cur)))(t_seq, ids)
        t_idx = _gather(st["running_idx"], beam_of)
        flat_beam = (beam_of + jnp.arange(b)[:, None] * nb).astype(jnp.int32)
        t_idx = jax.vmap(lambda s, i: jax.lax.dynamic_update_slice(s, i[:, None], (0, cur - s0)))(t_idx, flat_beam)
        hits = (ids == eos) | (cur + 1 >= max_length)
        # e. the best `num_beams` unfinished continuations keep running
        run_logp = topk_logp + hits.astype(jnp.float32) * -1.0e9
        nxt = jax.lax.top_k(run_logp, nb)[1]
        running, running_scores, running_idx = _gather(t_seq, nxt), _gather(run_logp, nxt), _gather(t_idx, nxt)
        # f. finished hypotheses among the top `num_beams`, scored with the length penalty
        did = hits & top_mask[None, :]
        fin = topk_logp / ((cur + 1 - s0).astype(jnp.float32) ** length_penalty)
        full = jnp.all(st["finished"], axis=-1, keepdims=True) & (early_stopping is True)
        fin = fin + full.astype(jnp.float32) * -1.0e9
        fin = fin + (~st["unsat"]).astype(jnp.float32) * -1.0e9
        fin = fin + (~did).astype(jnp.float32) * -1.0e9
        m_scores = jnp.concatenate([st["scores"], fin], axis=1)
        best = jax.lax.top_k(m_scores, nb)[1]
        sequences = _gather(jnp.concatenate([st["sequences"], t_seq], 1), best)
        scores = _gather(m_scores, best)
        idx = _gather(jnp.concatenate([st["idx"], t_idx], 1), best)
        finished = _gather(jnp.concatenate([st["finished"], did], 1), best)
        # g. reorder the cache to the surviving beams, then the stopping heuristic
        beam_idx = jax.lax.dynamic_index_in_dim(running_idx, cur - s0, axis=2, keepdims=False).reshape(-1)
        cache = jax.tree.map(lambda c: c[beam_idx], st["cache"])
        cur = cur + 1
        if early_stopping == "never" and length_penalty > 0.0:
            hyp_len = jnp.asarray(max_length - s0, jnp.float32)
        else:
            hyp_len = (cur - s0).astype(jnp.float32)
        best_running = running_scores[:, :1] / (hyp_len ** length_penalty)
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), -1.0e9)
        unsat = st["unsat"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
        cont = jnp.any(unsat) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(hits)
        token = jax.lax.dynamic_index_in_dim(running, cur - 1, axis=2, keepdims=False).reshape(-1, 1)
        logits, cache = jax.lax.cond(
            cont, lambda: _step(model, params, token, key_mask, start.encoder_mask, cache, cross_kv, cur - 1),
            lambda: (st["logits"], cache))
        return dict(cur=cur, done=~cont, logits=logits, cache=cache, running=running, sequences=sequences,
                    running_scores=running_scores, scores=scores, finished=finished, unsat=unsat,
                    running_idx=running_idx, idx=idx)

    st = jax.lax.while_loop(cond, body, state)
    best_idx = st["idx"][:, 0]
    length = s0 + jnp.max(jnp.sum(best_idx != -1, axis=1))
    return st["sequences"][:, 0], length


def generate(model, params, pixels, input_ids=None, attention_mask=None, *, max_length: int = 20,
             max_new_tokens: int | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False) -> np.ndarray:
    """Generated token ids ``(batch, length)`` (decoder prompt included), as ``transformers``' ``generate``.

    Args:
      model: :class:`BlipForQuestionAnswering` (``input_ids``: the question) or
        :class:`BlipForConditionalGeneration` (``input_ids``: an optional prompt, e.g. ``"a picture of"`` tokenized
        with special tokens; prompts of one batch must have the same length).
      params: the model's params.
      pixels: (batch, H, W, 3) preprocessed NHWC pixels.
      max_length: total decoder length including its prompt (HF's default 20); ``max_new_tokens`` overrides it.
      num_beams: 1 = greedy; more = beam search with ``length_penalty`` and ``early_stopping`` (HF's defaults).

    Sequences end with ``sep_token_id``; greedy pads finished ones with ``pad_token_id``, beam search fills with
    ``pad_token_id`` (``eos`` when ``pad_token_id`` is 0, as HF). The length is that of HF's output.
    """
    start = _start(model, params, pixels, input_ids, attention_mask)
    s0 = start.prompt.shape[1]
    total = s0 + int(max_new_tokens) if max_new_tokens is not None else int(max_length)
    if total <= s0:
        raise ValueError(f"max_length {total} leaves no room after the {s0}-token decoder prompt")
    if total > model.config.text.max_position_embeddings:
        raise ValueError(f"max_length {total} exceeds max_position_embeddings "
                         f"{model.config.text.max_position_embeddings}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams == 1:
        seqs, length = _greedy(model, params, start, total)
    else:
        seqs, length = _beam(model, params, start, total, int(num_beams), float(length_penalty), early_stopping)
    return np.asarray(seqs)[:, : int(length)]


def greedy_search(model, params, pixels, input_ids=None, attention_mask=None, **kw) -> np.ndarray:
    """:func:`generate` with ``num_beams=1``."""
    return generate(model, params, pixels, input_ids, attention_mask, num_beams=1, **kw)


def beam_search(model, params, pixels, input_ids=None, attention_mask=None, *, num_beams: int = 3,
                **kw) -> np.ndarray:
    """:func:`generate` with beam search (``num_beams`` ≥ 2)."""
    return generate(model, params, pixels, input_ids, attention_mask, num_beams=num_beams, **kw)
