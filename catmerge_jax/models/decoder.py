"""Decoder-only language models (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma, Gemma 2) in Flax linen, HF's layout.

One model, :class:`DecoderForCausalLM`; what tells the families apart is data: :class:`DecoderConfig` (read from a
``config.json`` by :meth:`DecoderConfig.from_hf_config`) and a small table of per-family switches,
:data:`FAMILIES` (RMSNorm as ``x̂·w`` or ``x̂·(1 + w)``, embeddings scaled by ``√d``, q/k norms, Gemma 2's extra
norms around attention and MLP, which config key names the activation, how sliding-window layers are chosen,
the family's config defaults). There is no per-family code path.

The parameter tree is the ``torch`` module tree of ``transformers``' ``*ForCausalLM`` (a dotted key is the
``/``-joined path; ``nn.Linear.weight (out, in)`` ↔ ``kernel (in, out)``; RMSNorm ``weight`` ↔ ``scale``;
``nn.Embedding.weight`` ↔ ``embedding``). Hidden ``d``, ``H`` query heads, ``G`` key/value heads of width ``h``,
MLP width ``f``, ``L`` layers::

    model/embed_tokens/embedding                               (vocab, d)
    model/layers/<i>/input_layernorm/scale                     (d,)
    model/layers/<i>/self_attn/q_proj/kernel                   (d, H·h)   + bias (H·h,)   [qwen2, attention_bias]
    model/layers/<i>/self_attn/{k_proj,v_proj}/kernel          (d, G·h)   + bias (G·h,)   [qwen2, attention_bias]
    model/layers/<i>/self_attn/o_proj/kernel                   (H·h, d)   + bias (d,)     [attention_bias]
    model/layers/<i>/self_attn/{q_norm,k_norm}/scale           (h,)                        [qwen3]
    model/layers/<i>/post_attention_layernorm/scale            (d,)
    model/layers/<i>/{pre,post}_feedforward_layernorm/scale    (d,)                        [gemma2]
    model/layers/<i>/mlp/{gate_proj,up_proj}/kernel            (d, f)
    model/layers/<i>/mlp/down_proj/kernel                      (f, d)
    model/norm/scale                                           (d,)
    lm_head/kernel                                             (d, vocab)                  [untied heads only]

A tied LM head is the embedding table itself (``logits = h Eᵀ``), so it is no leaf of its own.

Numerics follow ``transformers`` in float32: RMSNorm in float32, RoPE as ``rotate_half`` with HF's inverse
frequencies (``default``, ``linear`` and Llama 3's ``llama3`` scaling), grouped-query attention, the causal mask and
the sliding window on cache slots, key padding masked with ``finfo.min``, Gemma 2's soft-capping of attention
logits and final logits, ``query_pre_attn_scalar``. Parameters may be stored in bf16/f16: every layer computes in
``config.dtype`` (float32 by default). Positions default to ``0 .. s−1`` as HF's forward does; :func:`generate`
numbers them from the attention mask as HF's ``generate`` does.

**Capture.** Every parameter lives in a standard linen layer (``nn.Dense``, ``nn.Embed``) or in :class:`RMSNorm`,
a subclass of ``nn.RMSNorm`` (so the default capture rule reads its ``x̂ = x / rms(x)``, also for Gemma's
``1 + w`` form, whose task vectors are those of ``w``). Qwen3's q/k norms see one row per token and head, so a
``(batch, seq)`` token mask applies to them too. Default roles fit: kernels linear, norm scales scale, biases
shift, the embedding (and with it a tied head) task arithmetic.

**Generation** (:func:`generate`): greedy decoding with a key/value cache of static length, jitted; equal to
``transformers``' ``generate(do_sample=False)`` token for token (positions from the attention mask, EOS ends a row,
finished rows padded with ``pad_token_id``).

>>> import jax, jax.numpy as jnp
>>> cfg = DecoderConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
...                     num_attention_heads=4, num_key_value_heads=2, head_dim=4, model_type="llama")
>>> model = DecoderForCausalLM(cfg)
>>> ids = jnp.array([[1, 5, 9, 3]]); mask = jnp.ones_like(ids)
>>> params = model.init(jax.random.PRNGKey(0), ids, mask)["params"]
>>> out = model.apply({"params": params}, ids, mask)
>>> out.logits.shape, len(out.hidden_states)
((1, 4, 64), 3)
>>> generate(model, params, ids, mask, max_new_tokens=3).shape
(1, 7)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.models.bert import ACTIVATIONS

__all__ = ["Family", "FAMILIES", "DecoderConfig", "DecoderForCausalLM", "DecoderLayer", "DecoderHead",
           "DecoderOutput", "RMSNorm", "rope_inv_freq", "embed", "layer_path", "generate", "position_ids_from_mask"]


# ------------------------------------------------------------------------------------------------ families as data

@dataclasses.dataclass(frozen=True)
class Family:
    """The switches that make one decoder family out of the common model (see :data:`FAMILIES`).

    Attributes:
      norm_offset: RMSNorm computes ``x̂·(norm_offset + w)`` (Gemma: 1, its weights are stored around 0).
      embed_scale: embeddings are multiplied by ``√hidden_size`` (Gemma).
      qkv_bias: q/k/v projections always carry biases (Qwen2); otherwise ``attention_bias`` decides (all four).
      qk_norm: per-head RMSNorm of queries and keys before RoPE (Qwen3).
      sandwich_norm: Gemma 2's four norms per layer: ``post_attention_layernorm`` normalizes the attention output
        (not the MLP input), ``pre_feedforward_layernorm``/``post_feedforward_layernorm`` wrap the MLP.
      activation_key: the config key naming the MLP activation.
      sliding: how sliding-window layers are chosen when the config has no ``layer_types``: ``"none"``, ``"all"``
        (Mistral: every layer when ``sliding_window`` is set), ``"alternate"`` (Gemma 2: even layers), ``"qwen"``
        (``use_sliding_window`` from layer ``max_window_layers`` on).
      defaults: the family's config defaults (``transformers``' config class), for keys a ``config.json`` omits.
    """

    norm_offset: float = 0.0
    embed_scale: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    activation_key: str = "hidden_act"
    sliding: str = "none"
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False,
           "mlp_bias": False, "tie_word_embeddings": False}

FAMILIES: Mapping[str, Family] = {
    "llama": Family(defaults={**_COMMON, "max_position_embeddings": 2048}),
    "mistral": Family(sliding="all", defaults={**_COMMON, "max_position_embeddings": 131072, "sliding_window": 4096}),
    "qwen2": Family(qkv_bias=True, sliding="qwen", defaults={**_COMMON, "max_position_embeddings": 32768}),
    "qwen3": Family(qk_norm=True, sliding="qwen", defaults={**_COMMON, "max_position_embeddings": 32768,
                                                            "head_dim": 128}),
    "gemma": Family(norm_offset=1.0, embed_scale=True,
                    defaults={**_COMMON, "hidden_act": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
                              "head_dim": 256, "tie_word_embeddings": True}),
    "gemma2": Family(norm_offset=1.0, embed_scale=True, sandwich_norm=True, activation_key="hidden_activation",
                     sliding="alternate",
                     defaults={**_COMMON, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
                               "head_dim": 256, "tie_word_embeddings": True, "query_pre_attn_scalar": 256,
                               "sliding_window": 4096, "final_logit_softcapping": 30.0,
                               "attn_logit_softcapping": 50.0}),
}
"""``model_type`` → :class:`Family`. A new Llama-like family is one entry here (and its name in
``converters.hf.FAMILY_MODULES``)."""

_ROPE_TYPES = ("default", "linear", "llama3")


def _freeze(value: Any) -> Any:
    """Dicts → sorted tuples of pairs, lists → tuples (a hashable config)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyperparameters of a decoder (field names follow HF's ``config.json``). Hashable: the model compiles once
    per config. Build from a ``config.json`` dict with :meth:`from_hf_config`; the family switches are copied in
    from :data:`FAMILIES` there (fields ``norm_offset`` .. ``sandwich_norm``), so a config is self-contained.

    ``rope_scaling``: ``None`` or sorted ``(key, value)`` pairs with ``rope_type`` ``"linear"`` (``factor``) or
    ``"llama3"`` (``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
    ``sliding_layers``: one bool per layer (True: the layer attends within ``sliding_window`` slots).
    ``dtype``: the computation dtype; parameters keep whatever dtype they are stored in.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    embed_scale: bool = False
    sandwich_norm: bool = False
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    query_pre_attn_scalar: Optional[float] = None
    sliding_window: Optional[int] = None
    sliding_layers: Optional[tuple] = None
    model_type: str = "llama"
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[tuple] = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        object.__setattr__(self, "eos_token_id", _freeze(self.eos_token_id))
        if self.sliding_layers is None:
            object.__setattr__(self, "sliding_layers", (False,) * self.num_hidden_layers)
        object.__setattr__(self, "sliding_layers", tuple(bool(s) for s in self.sliding_layers))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if type(value) is not int or value < (0 if name == "num_hidden_layers" else 1):
                raise ValueError(f"config field {name} is {value!r}; expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if len(self.sliding_layers) != self.num_hidden_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_hidden_layers} "
                             "layers")
        if any(self.sliding_layers) and not self.sliding_window:
            raise ValueError("sliding-window layers need a positive sliding_window")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
        rope_type = dict(self.rope_scaling or ()).get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; expected one of {list(_ROPE_TYPES)}")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], **overrides: Any) -> "DecoderConfig":
        """From a ``config.json`` dict of a family in :data:`FAMILIES` (keys it omits take the family's defaults).

        Reads RoPE from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (older files), the
        sliding-window layers from ``layer_types`` when present (else the family's rule). Raises ``ValueError``
        naming the field for another ``model_type`` or an unsupported setting.
        """
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"config model_type {model_type!r} is not a decoder family; expected one of "
                             f"{sorted(FAMILIES)}")
        fam = FAMILIES[model_type]
        get = lambda key: config[key] if config.get(key) is not None else fam.defaults.get(key)  # noqa: E731
        rope = dict(config.get("rope_parameters") or {})
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope.pop("type")
        scaling = dict(config.get("rope_scaling") or {})
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling.pop("type")
        rope = {**scaling, **rope}
        theta = rope.pop("rope_theta", None) or get("rope_theta")
        rope.setdefault("rope_type", "default")
        rope.pop("partial_rotary_factor", None) if rope.get("partial_rotary_factor", 1.0) == 1.0 else None
        if rope["rope_type"] == "llama3":
            rope.setdefault("original_max_position_embeddings", get("max_position_embeddings"))
        layers = get("num_hidden_layers")
        window = get("sliding_window")
        types = config.get("layer_types")
        if types is not None:
            sliding = tuple(t == "sliding_attention" for t in types)
        elif fam.sliding == "all":
            sliding = (window is not None,) * (layers or 0)
        elif fam.sliding == "alternate":
            sliding = tuple(i % 2 == 0 for i in range(layers or 0))
        elif fam.sliding == "qwen" and config.get("use_sliding_window"):
            start = config.get("max_window_layers", 28)
            sliding = tuple(i >= start for i in range(layers or 0))
        else:
            sliding = (False,) * (layers or 0)
        if not any(sliding):
            window = None
        bias = bool(get("attention_bias"))
        act = get(fam.activation_key) or get("hidden_act")
        if model_type == "gemma" and act == "gelu":  # transformers reads Gemma's legacy "gelu" as the tanh form
            act = "gelu_pytorch_tanh"
        eos = config.get("eos_token_id")
        kwargs = dict(
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
            num_hidden_layers=layers, num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=get("num_key_value_heads"), head_dim=get("head_dim"), hidden_act=act,
            rms_norm_eps=float(get("rms_norm_eps")), rope_theta=float(theta),
            rope_scaling=None if rope == {"rope_type": "default"} else rope,
            max_position_embeddings=get("max_position_embeddings"),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            qkv_bias=fam.qkv_bias or bias, o_bias=bias, mlp_bias=bool(get("mlp_bias")), qk_norm=fam.qk_norm,
            norm_offset=fam.norm_offset, embed_scale=fam.embed_scale, sandwich_norm=fam.sandwich_norm,
            attn_logit_softcapping=get("attn_logit_softcapping"),
            final_logit_softcapping=get("final_logit_softcapping"),
            query_pre_attn_scalar=get("query_pre_attn_scalar"), sliding_window=window, sliding_layers=sliding,
            model_type=model_type, pad_token_id=config.get("pad_token_id"), bos_token_id=config.get("bos_token_id"),
            eos_token_id=eos)
        kwargs.update(overrides)
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------------ layers

def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
    """RoPE inverse frequencies ``(head_dim // 2,)`` float32, as ``transformers.modeling_rope_utils`` computes them
    (``default``; ``linear``: divided by ``factor``; ``llama3``: long wavelengths divided by ``factor``, a smooth
    blend between ``low_freq_factor`` and ``high_freq_factor``)."""
    return _inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)


@functools.lru_cache(maxsize=None)
def _inv_freq(dim: int, theta: float, scaling: tuple | None) -> np.ndarray:
    # float32 like torch: base ** (arange(0, dim, 2) / dim)
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    rope = dict(scaling or ())
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        inv = (inv / np.float32(rope["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old = float(rope["original_max_position_embeddings"])
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > old / low, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        blended = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, blended, scaled).astype(np.float32)
    return inv


def _rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """``x`` ``(b, s, heads, h)`` rotated by ``positions`` ``(b, s)`` (HF's ``rotate_half`` convention)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.RMSNorm):
    """``x̂·(offset + w)`` with ``x̂ = x / sqrt(mean(x²) + ε)`` in float32 (HF's Llama/Gemma RMSNorm).

    A subclass of ``nn.RMSNorm``, so capture reads its ``x̂`` with the default rule; ``offset`` is 1 for Gemma.
    """

    offset: float = 0.0

    @nn.compact
    def __call__(self, x, mask=None):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.zeros if self.offset else nn.initializers.ones, (d,),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        xhat = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (xhat * (self.offset + scale.astype(jnp.float32))).astype(self.dtype or x.dtype)


def _norm(config: DecoderConfig, name: str) -> RMSNorm:
    return RMSNorm(epsilon=config.rms_norm_eps, offset=config.norm_offset, dtype=config.dtype, name=name)


def _dense(features: int, config: DecoderConfig, bias: bool, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=config.dtype, kernel_init=nn.initializers.normal(0.02), name=name)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE. ``cache = (k, v)`` ``(b, L, G, h)``: the new keys/values are written
    at slot ``index`` and the queries attend over all ``L`` slots. Returns ``(out, (k, v))``."""

    config: DecoderConfig
    sliding: bool = False

    @nn.compact
    def __call__(self, x, positions, key_mask, cache=None, index=0):
        cfg = self.config
        b, s, _ = x.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(nh * hd, cfg, cfg.qkv_bias, "q_proj")(x).reshape(b, s, nh, hd)
        k = _dense(nkv * hd, cfg, cfg.qkv_bias, "k_proj")(x).reshape(b, s, nkv, hd)
        v = _dense(nkv * hd, cfg, cfg.qkv_bias, "v_proj")(x).reshape(b, s, nkv, hd)
        if cfg.qk_norm:
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        inv_freq = rope_inv_freq(cfg)
        q, k = _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)
        q_slots = index + jnp.arange(s)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0, 0))
        k_slots = jnp.arange(k.shape[1])
        # HF builds the causal and sliding-window masks on cache slots, the padding mask on keys.
        allowed = k_slots[None, :] <= q_slots[:, None]
        if self.sliding:
            allowed &= k_slots[None, :] > q_slots[:, None] - cfg.sliding_window
        allowed = allowed[None] & jnp.asarray(key_mask, bool)[:, None, :]            # (b, s, L)
        scale = (cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else hd) ** -0.5
        qg = q.reshape(b, s, nkv, nh // nkv, hd)
        scores = jnp.einsum("bskgd,blkd->bkgsl", qg, k) * scale
        if cfg.attn_logit_softcapping is not None:
            scores = jnp.tanh(scores / cfg.attn_logit_softcapping) * cfg.attn_logit_softcapping
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgsl,blkd->bskgd", probs, v).reshape(b, s, nh * hd)
        return _dense(cfg.hidden_size, cfg, cfg.o_bias, "o_proj")(out), (k, v)


class MLP(nn.Module):
    """``down(act(gate(x)) · up(x))`` (SwiGLU, or GeGLU with a GELU activation)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.intermediate_size, cfg, cfg.mlp_bias, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, cfg, cfg.mlp_bias, "up_proj")(x)
        return _dense(cfg.hidden_size, cfg, cfg.mlp_bias, "down_proj")(ACTIVATIONS[cfg.hidden_act](gate) * up)


class DecoderLayer(nn.Module):
    """One block: ``h + attn(norm(h))`` then ``h + mlp(norm(h))`` (Gemma 2 also normalizes both outputs).

    Call with ``h`` ``(b, s, d)``, ``positions`` ``(b, s)`` (RoPE), ``key_mask`` ``(b, L)`` (1 = a real key; ``L =
    s`` without a cache), optional ``cache`` and ``index``. Returns ``(h, (k, v))``. Usable on its own with one
    layer's params (``params["model"]["layers"][str(i)]``), as the layer-by-layer merge does.
    """

    config: DecoderConfig
    sliding: bool = False

    @nn.compact
    def __call__(self, h, positions, key_mask, cache=None, index=0):
        cfg = self.config
        a, kv = Attention(cfg, self.sliding, name="self_attn")(_norm(cfg, "input_layernorm")(h), positions, key_mask,
                                                              cache, index)
        if cfg.sandwich_norm:
            a = _norm(cfg, "post_attention_layernorm")(a)
        h = h + a
        m = MLP(cfg, name="mlp")(_norm(cfg, "pre_feedforward_layernorm" if cfg.sandwich_norm
                                       else "post_attention_layernorm")(h))
        if cfg.sandwich_norm:
            m = _norm(cfg, "post_feedforward_layernorm")(m)
        return h + m, kv


class DecoderHead(nn.Module):
    """The final norm and an untied LM head (children ``norm`` and ``lm_head``): ``(b, s, d) → (b, s, vocab)``
    logits, final soft-capping included. A tied head takes the embedding table as ``embedding``; without it, it
    returns the normalized states ``(b, s, d)`` (all the layer-by-layer capture needs)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, h, embedding=None):
        cfg = self.config
        h = _norm(cfg, "norm")(h)
        if cfg.tie_word_embeddings:
            if embedding is None:
                return h
            logits = jnp.einsum("bsd,vd->bsv", h, jnp.asarray(embedding).astype(h.dtype))
        else:
            logits = _dense(cfg.vocab_size, cfg, False, "lm_head")(h)
        return _softcap(logits, cfg.final_logit_softcapping)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def embed(config: DecoderConfig, table: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Token embeddings ``(b, s, d)`` in ``config.dtype`` (times ``√d`` for Gemma), from the ``(vocab, d)`` table."""
    x = jnp.take(jnp.asarray(table), jnp.asarray(input_ids), axis=0).astype(config.dtype)
    if config.embed_scale:
        x = x * jnp.asarray(config.hidden_size ** 0.5, config.dtype)
    return x


def layer_path(i: int) -> str:
    """The params path of layer ``i`` (``model/layers/<i>``)."""
    return f"model/layers/{i}"


class _Layers(nn.Module):
    """Holds the layers as children ``"0"``, ``"1"``, ... so paths read ``model/layers/<i>/...`` like HF."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, h, positions, key_mask, cache, index):
        states, kvs = [], []
        for i in range(self.config.num_hidden_layers):
            h, kv = DecoderLayer(self.config, self.config.sliding_layers[i], name=str(i))(
                h, positions, key_mask, None if cache is None else cache[i], index)
            states.append(h)
            kvs.append(kv)
        return states, kvs


class _Body(nn.Module):
    """HF's ``*Model``: ``embed_tokens``, ``layers``, ``norm``. Returns the embeddings, each layer's output, the
    caches, the normalized last state and the embedding table (a tied head's weight)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, input_ids, positions, key_mask, cache, index):
        cfg = self.config
        emb = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, embedding_init=nn.initializers.normal(0.02),
                       name="embed_tokens")
        x = emb(input_ids)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, cfg.dtype)
        states, kvs = _Layers(cfg, name="layers")(x, positions, key_mask, cache, index)
        h = _norm(cfg, "norm")(states[-1] if states else x)
        return x, states, kvs, h, emb.embedding


@flax.struct.dataclass
class DecoderOutput:
    """``logits`` ``(b, s, vocab)`` (float32); ``hidden_states``: the embeddings then each layer's output
    ``(b, s, d)`` (L + 1 arrays; the last is before the final norm, as HF's); ``cache``: per layer ``(k, v)``
    when a cache was given, else ``None``."""

    logits: jax.Array
    hidden_states: tuple
    cache: Any = None

    def __getitem__(self, key: str):
        return getattr(self, key)


class DecoderForCausalLM(nn.Module):
    """HF's ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` /
    ``GemmaForCausalLM`` / ``Gemma2ForCausalLM``, one module for all.

    Call: ``input_ids`` ``(b, s)``, ``attention_mask`` ``(b, s)`` (or ``(b, L)`` over the cache slots; ``None`` =
    all ones), ``position_ids`` ``(b, s)`` (``None`` = ``index .. index + s − 1``), ``cache`` (a list of per-layer
    ``(k, v)`` ``(b, L, G, h)``) and ``index`` (the first slot written). Returns :class:`DecoderOutput`.
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, cache=None, index=0) -> DecoderOutput:
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, s if cache is None else cache[0][0].shape[1]), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(index + jnp.arange(s), (b, s))
        x, states, kvs, h, table = _Body(cfg, name="model")(input_ids, position_ids, attention_mask, cache, index)
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("bsd,vd->bsv", h, jnp.asarray(table).astype(h.dtype))
        else:
            logits = _dense(cfg.vocab_size, cfg, False, "lm_head")(h)
        logits = _softcap(logits, cfg.final_logit_softcapping)
        return DecoderOutput(logits=logits, hidden_states=(x, *states), cache=None if cache is None else kvs)


# ------------------------------------------------------------------------------------------------ generation

def position_ids_from_mask(mask: jax.Array) -> jax.Array:
    """HF ``generate``'s positions: ``cumsum(mask) − 1``, 0 on padding."""
    mask = jnp.asarray(mask, jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0)


def _empty_cache(config: DecoderConfig, batch: int, length: int) -> list:
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    return [(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype)) for _ in range(config.num_hidden_layers)]


@functools.partial(jax.jit, static_argnames=("model", "total", "eos", "pad"))
def _greedy(model, params, input_ids, attention_mask, total: int, eos: tuple, pad: int):
    b, s0 = input_ids.shape
    key_mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.ones((b, total - s0), jnp.int32)], axis=1)
    positions = position_ids_from_mask(key_mask)
    out = model.apply({"params": params}, input_ids, key_mask, positions[:, :s0],
                      cache=_empty_cache(model.config, b, total), index=0)
    seqs = jnp.full((b, total), pad, jnp.int32).at[:, :s0].set(input_ids.astype(jnp.int32))
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def cond(state):
        return (state[0] < total) & jnp.any(state[1])

    def body(state):
        cur, unfinished, seqs, logits, cache = state
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        nxt = jnp.where(unfinished, nxt, pad)
        seqs = jax.lax.dynamic_update_slice(seqs, nxt[:, None], (0, cur))
        unfinished = unfinished & ~jnp.any(nxt[:, None] == eos_ids[None], axis=-1)
        pos = jax.lax.dynamic_slice_in_dim(positions, cur, 1, axis=1)
        step = model.apply({"params": params}, nxt[:, None], key_mask, pos, cache=cache, index=cur)
        return cur + 1, unfinished, seqs, step.logits[:, -1].astype(jnp.float32), step.cache

    state = (jnp.asarray(s0, jnp.int32), jnp.ones((b,), bool), seqs, out.logits[:, -1].astype(jnp.float32),
             out.cache)
    cur, _, seqs, _, _ = jax.lax.while_loop(cond, body, state)
    return seqs, cur


def generate(model: DecoderForCausalLM, params, input_ids, attention_mask=None, *, max_new_tokens: int = 20,
             eos_token_id: int | tuple | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding, as ``transformers``' ``generate(do_sample=False, max_new_tokens=...)``.

    Args:
      model, params: the model and its params.
      input_ids: ``(b, s0)`` prompts (left-pad a batch of different lengths, as HF expects for decoders).
      attention_mask: ``(b, s0)``; ``None`` = all ones.
      eos_token_id: the token(s) that end a row (default: the config's); ``pad_token_id`` fills finished rows
        (default: the config's, else the first EOS, as HF).

    Returns ``(b, s0 + n)`` int32 ids, ``n ≤ max_new_tokens`` (fewer when every row ended).
    """
    cfg = model.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = tuple(int(e) for e in ((eos,) if isinstance(eos, int) else (eos or ())))
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    pad = int(pad if pad is not None else (eos[0] if eos else 0))
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    seqs, length = _greedy(model, params, input_ids, mask, input_ids.shape[1] + int(max_new_tokens), eos, pad)
    return np.asarray(seqs)[:, : int(length)]
