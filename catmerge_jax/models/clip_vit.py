"""CLIP's vision transformer in Flax linen, in Hugging Face's and in open_clip's parameter layout.

One implementation (:class:`ResidualBlock` and the functions below) serves both layouts; only module names
differ, chosen so each maps mechanically onto its PyTorch state dict (``a.b.c.weight`` ↔ ``a/b/c/kernel``
transposed for Linear, ``.../scale`` for LayerNorm, ``.../embedding`` for Embedding; a Conv2d weight
``(out, in, p, p)`` ↔ ``kernel (p, p, in, out)``; bare parameters keep their names).

``layout="hf"`` (``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``)::

    vision_model/embeddings/patch_embedding/kernel                 (p, p, 3, d)   conv, no bias
    vision_model/embeddings/class_embedding                        (d,)
    vision_model/embeddings/position_embedding/embedding           (n_pos, d)
    vision_model/pre_layrnorm/{scale,bias}                         (HF's spelling)
    vision_model/encoder/layers/<i>/self_attn/{q,k,v,out}_proj/{kernel,bias}
    vision_model/encoder/layers/<i>/{layer_norm1,layer_norm2}/{scale,bias}
    vision_model/encoder/layers/<i>/mlp/{fc1,fc2}/{kernel,bias}
    vision_model/post_layernorm/{scale,bias}
    visual_projection/kernel                                       (d, out)       [with_projection]

``layout="open_clip"`` (open_clip's ``VisionTransformer``, i.e. ``model.visual``)::

    conv1/kernel (p, p, 3, d); class_embedding (d,); positional_embedding (n_pos, d); ln_pre/{scale,bias}
    transformer/resblocks/<i>/attn/in_proj/{kernel (d, 3d), bias (3d,)}   fused q|k|v
    transformer/resblocks/<i>/attn/out_proj/{kernel,bias}; ln_1, ln_2; mlp/c_fc, mlp/c_proj
    ln_post/{scale,bias}; proj (d, out), applied as ``x @ proj``           [with_projection]

Both compute ``x = [cls; patches] + pos → LN_pre → blocks (x += attn(LN1 x); x += mlp(LN2 x)) →
pooled = LN_post(x[:, 0]) (@ projection)``. Pixels are NHWC ``(batch, H, W, 3)``. Only standard linen
layers (``nn.Conv``, ``nn.Dense``, ``nn.LayerNorm``, ``nn.Embed``) and ``self.param`` carry parameters.

>>> import jax, jax.numpy as jnp
>>> cfg = ClipVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_dim=128, output_dim=16)
>>> model = ClipVisionModel(cfg, layout="open_clip")
>>> x = jnp.zeros((1, 32, 32, 3))
>>> params = model.init(jax.random.PRNGKey(0), x)["params"]
>>> out = model.apply({"params": params}, x)
>>> out.pooled.shape, out.last_hidden_state.shape, len(out.hidden_states)
((1, 16), (1, 17, 64), 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from catmerge_jax.models.bert import ACTIVATIONS

__all__ = ["ClipVisionConfig", "ClipVisionModel", "ClipVisionOutput", "LAYOUTS", "hf_to_open_clip_params",
           "open_clip_to_hf_params"]

LAYOUTS = ("hf", "open_clip")


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """Vision tower hyperparameters. ``output_dim=None`` means no projection exists in the checkpoint."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    output_dim: Optional[int] = 512
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unsupported act {self.act!r}; expected one of {sorted(ACTIVATIONS)}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    # OpenAI's released CLIP towers (all 224 px, QuickGELU).
    @classmethod
    def vit_b_32(cls, **kw) -> "ClipVisionConfig":
        return cls(**{**dict(patch_size=32, width=768, layers=12, heads=12, mlp_dim=3072, output_dim=512), **kw})

    @classmethod
    def vit_b_16(cls, **kw) -> "ClipVisionConfig":
        return cls(**{**dict(patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072, output_dim=512), **kw})

    @classmethod
    def vit_l_14(cls, **kw) -> "ClipVisionConfig":
        return cls(**{**dict(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, output_dim=768), **kw})

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, with_projection: bool = True, **kw) -> "ClipVisionConfig":
        """From a ``clip_vision_model`` config dict or a full ``clip`` one (its ``vision_config`` is used).

        Missing keys take ``CLIPVisionConfig``'s defaults, as transformers does.
        """
        model_type = config.get("model_type")
        if model_type == "clip":
            vision = dict(config.get("vision_config") or {})
            # CLIPModel projects with the top-level projection_dim; vision_config's own copy may be a stale default.
            vision["projection_dim"] = config.get("projection_dim", vision.get("projection_dim", 512))
        elif model_type == "clip_vision_model":
            vision = dict(config)
        else:
            raise ValueError(f"config model_type {model_type!r} is neither 'clip' nor 'clip_vision_model'")
        for key in ("image_size", "patch_size"):
            if isinstance(vision.get(key), (list, tuple)):
                a, b = vision[key]
                if a != b:
                    raise ValueError(f"non-square {key} {vision[key]} is not supported")
                vision[key] = a
        return cls(**{**dict(
            image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 32),
            width=vision.get("hidden_size", 768), layers=vision.get("num_hidden_layers", 12),
            heads=vision.get("num_attention_heads", 12), mlp_dim=vision.get("intermediate_size", 3072),
            output_dim=vision.get("projection_dim", 512) if with_projection else None,
            act=vision.get("hidden_act", "quick_gelu"), layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
            num_channels=vision.get("num_channels", 3)), **kw})


@flax.struct.dataclass
class ClipVisionOutput:
    """``pooled`` (batch, out or d): LN_post(class token), projected when a projection exists.
    ``pooler_output`` (batch, d): LN_post(class token) before projection. ``last_hidden_state``
    (batch, n_pos, d): output of the last block (no LN_post, like HF). ``hidden_states``: tuple of
    ``layers + 1`` arrays, the LN_pre output then each block's output. Indexable like a dict.
    """

    pooled: jax.Array
    pooler_output: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple

    def __getitem__(self, key: str):
        return getattr(self, key)


def _ln(cfg: ClipVisionConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance as torch computes it.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=cfg.dtype, name=name)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Unmasked multi-head attention on (b, n, d) projections → (b, n, d)."""
    b, n, d = q.shape
    split = lambda t: t.reshape(b, n, heads, d // heads)
    q, k, v = split(q), split(k), split(v)
    probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // heads) ** -0.5, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)


class HFAttention(nn.Module):
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda name: nn.Dense(cfg.width, dtype=cfg.dtype, name=name)
        h = _attend(dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x), cfg.heads)
        return dense("out_proj")(h)


class OpenClipAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` with its fused ``in_proj`` (q | k | v along the output axis)."""

    config: ClipVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        q, k, v = jnp.split(nn.Dense(3 * cfg.width, dtype=cfg.dtype, name="in_proj")(x), 3, axis=-1)
        return nn.Dense(cfg.width, dtype=cfg.dtype, name="out_proj")(_attend(q, k, v, cfg.heads))


class MLP(nn.Module):
    config: ClipVisionConfig
    names: tuple[str, str]  # ("fc1", "fc2") or ("c_fc", "c_proj")

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = ACTIVATIONS[cfg.act](nn.Dense(cfg.mlp_dim, dtype=cfg.dtype, name=self.names[0])(x))
        return nn.Dense(cfg.width, dtype=cfg.dtype, name=self.names[1])(h)


# Per-layout module names inside a residual block: (ln1, attention, ln2, mlp, mlp layer names).
_BLOCK_NAMES = {
    "hf": ("layer_norm1", "self_attn", "layer_norm2", "mlp", ("fc1", "fc2")),
    "open_clip": ("ln_1", "attn", "ln_2", "mlp", ("c_fc", "c_proj")),
}


class ResidualBlock(nn.Module):
    config: ClipVisionConfig
    layout: str

    @nn.compact
    def __call__(self, x):
        ln1, attn, ln2, mlp, mlp_names = _BLOCK_NAMES[self.layout]
        attention = HFAttention if self.layout == "hf" else OpenClipAttention
        x = x + attention(self.config, name=attn)(_ln(self.config, ln1)(x))
        return x + MLP(self.config, mlp_names, name=mlp)(_ln(self.config, ln2)(x))


class BlockStack(nn.Module):
    """Blocks as children ``"0"``, ``"1"``, ... (so paths read ``.../layers/<i>/...``). Returns every output."""

    config: ClipVisionConfig
    layout: str

    @nn.compact
    def __call__(self, x):
        states = []
        for i in range(self.config.layers):
            x = ResidualBlock(self.config, self.layout, name=str(i))(x)
            states.append(x)
        return states


class _Wrap(nn.Module):
    """A named scope around one child (HF's ``encoder``, open_clip's ``transformer``)."""

    config: ClipVisionConfig
    layout: str
    child: str

    @nn.compact
    def __call__(self, x):
        return BlockStack(self.config, self.layout, name=self.child)(x)


def _patchify(cfg: ClipVisionConfig, pixels: jax.Array, name: str) -> jax.Array:
    if pixels.ndim != 4 or pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
        raise ValueError(f"pixels must be NHWC (batch, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}), "
                         f"got {pixels.shape}")
    p = cfg.patch_size
    x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=cfg.dtype,
                name=name)(pixels)
    return x.reshape(x.shape[0], -1, cfg.width)  # row-major over the patch grid, as torch's flatten(2)


def _prepend_class(cls_token: jax.Array, patches: jax.Array) -> jax.Array:
    b = patches.shape[0]
    return jnp.concatenate([jnp.broadcast_to(cls_token.astype(patches.dtype), (b, 1, patches.shape[-1])), patches], 1)


class HFEmbeddings(nn.Module):
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        x = _patchify(cfg, pixels, "patch_embedding")
        cls_token = self.param("class_embedding", nn.initializers.normal(cfg.width ** -0.5), (cfg.width,))
        x = _prepend_class(cls_token, x)
        pos = nn.Embed(cfg.num_positions, cfg.width, dtype=cfg.dtype, name="position_embedding")
        return x + pos(jnp.arange(cfg.num_positions))[None]


class HFVisionTransformer(nn.Module):
    config: ClipVisionConfig

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        x = _ln(cfg, "pre_layrnorm")(HFEmbeddings(cfg, name="embeddings")(pixels))
        states = _Wrap(cfg, "hf", "layers", name="encoder")(x)
        last = states[-1] if states else x
        return x, states, _ln(cfg, "post_layernorm")(last[:, 0])


class BareProjection(nn.Module):
    """open_clip's bare ``proj`` matrix, ``y = x @ proj`` (parameter ``proj`` ``(d, out)``, no bias).

    A module (sharing its parent's scope, so the parameter keeps open_clip's top-level name) rather than a bare
    ``self.param``, so that exemplar capture sees its input like any Dense's (:meth:`capture_rule`).
    """

    features: int
    init_scale: float

    @nn.compact
    def __call__(self, x):
        proj = self.param("proj", nn.initializers.normal(self.init_scale), (x.shape[-1], self.features))
        return x @ proj.astype(x.dtype)

    @staticmethod
    def capture_rule(module, args, kwargs):
        from catmerge_jax.capture import Captured

        x = args[0] if args else kwargs["x"]
        return Captured(rows_shape=tuple(x.shape[:-1]), linear={"proj": x})


def open_clip_roles() -> dict:
    """Leaf roles of the open_clip layout that its names do not say: the fused ``in_proj`` holds q, k and v side
    by side (three independent projections, trimmed block by block as the HF layout's separate leaves are), and the
    bare ``proj`` is a linear map like HF's ``visual_projection/kernel``."""
    from catmerge_jax.roles import LeafSpec, Role

    return {"*/attn/in_proj/kernel": LeafSpec(Role.LINEAR, in_axes=1, out_blocks=3),
            "*/attn/in_proj/bias": LeafSpec(Role.SHIFT, out_blocks=3),
            "proj": LeafSpec(Role.LINEAR, in_axes=1)}


class ClipVisionModel(nn.Module):
    """CLIP vision tower. ``layout`` is ``"hf"`` or ``"open_clip"`` (see the module docstring);
    ``with_projection`` adds ``visual_projection`` / ``proj`` (needs ``config.output_dim``).

    Call with pixels (batch, H, W, C) → :class:`ClipVisionOutput`.
    """

    config: ClipVisionConfig
    layout: str = "hf"
    with_projection: bool = True

    def param_roles(self) -> dict | None:
        """Leaf specs this layout declares beyond Flax's naming conventions (``None``: the names say everything).

        Nobody needs to pass them on: :func:`~catmerge_jax.capture.capture_stats` stores them in the statistics it
        returns and every merge reads them there (see ``docs/roles.md``)."""
        return open_clip_roles() if self.layout == "open_clip" else None

    @nn.compact
    def __call__(self, pixels) -> ClipVisionOutput:
        cfg = self.config
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.with_projection and not cfg.output_dim:
            raise ValueError("with_projection=True needs config.output_dim")
        pixels = jnp.asarray(pixels, cfg.dtype)
        if self.layout == "hf":
            x0, states, pooled = HFVisionTransformer(cfg, name="vision_model")(pixels)
            projected = (nn.Dense(cfg.output_dim, use_bias=False, dtype=cfg.dtype, name="visual_projection")(pooled)
                         if self.with_projection else pooled)
        else:
            x = _patchify(cfg, pixels, "conv1")
            cls_token = self.param("class_embedding", nn.initializers.normal(cfg.width ** -0.5), (cfg.width,))
            pos = self.param("positional_embedding", nn.initializers.normal(cfg.width ** -0.5),
                             (cfg.num_positions, cfg.width))
            x0 = _ln(cfg, "ln_pre")(_prepend_class(cls_token, x) + pos.astype(x.dtype)[None])
            states = _Wrap(cfg, "open_clip", "resblocks", name="transformer")(x0)
            last = states[-1] if states else x0
            pooled = _ln(cfg, "ln_post")(last[:, 0])
            if self.with_projection:
                projection = BareProjection(cfg.output_dim, cfg.width ** -0.5, name="proj_matmul")
                nn.share_scope(self, projection)  # its parameter stays the top-level "proj" of open_clip's layout
                projected = projection(pooled)
            else:
                projected = pooled
        last = states[-1] if states else x0
        return ClipVisionOutput(pooled=projected, pooler_output=pooled, last_hidden_state=last,
                                hidden_states=(x0, *states))


# ---------------------------------------------------------------------------------------------- layout changes

def _hf_block_to_open_clip(b: Mapping[str, Any]) -> dict:
    sa = b["self_attn"]
    in_proj = {"kernel": jnp.concatenate([sa[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")], axis=1),
               "bias": jnp.concatenate([sa[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")], axis=0)}
    return {"ln_1": dict(b["layer_norm1"]), "ln_2": dict(b["layer_norm2"]),
            "attn": {"in_proj": in_proj, "out_proj": dict(sa["out_proj"])},
            "mlp": {"c_fc": dict(b["mlp"]["fc1"]), "c_proj": dict(b["mlp"]["fc2"])}}


def _open_clip_block_to_hf(b: Mapping[str, Any]) -> dict:
    ip = b["attn"]["in_proj"]
    qk, kk, vk = jnp.split(ip["kernel"], 3, axis=1)
    qb, kb, vb = jnp.split(ip["bias"], 3, axis=0)
    return {"layer_norm1": dict(b["ln_1"]), "layer_norm2": dict(b["ln_2"]),
            "self_attn": {"q_proj": {"kernel": qk, "bias": qb}, "k_proj": {"kernel": kk, "bias": kb},
                          "v_proj": {"kernel": vk, "bias": vb}, "out_proj": dict(b["attn"]["out_proj"])},
            "mlp": {"fc1": dict(b["mlp"]["c_fc"]), "fc2": dict(b["mlp"]["c_proj"])}}


def hf_to_open_clip_params(params: Mapping[str, Any], *, with_roles: bool = False) -> dict:
    """Params of ``layout="hf"`` → the same weights in ``layout="open_clip"`` (q/k/v fused into ``in_proj``).

    The two models then compute the same function. ``with_roles=True`` returns them as a
    :class:`~catmerge_jax.roles.ParamsWithRoles` carrying :func:`open_clip_roles` (for merges without statistics).
    """
    vm = params["vision_model"]
    emb = vm["embeddings"]
    out = {"conv1": dict(emb["patch_embedding"]), "class_embedding": emb["class_embedding"],
           "positional_embedding": emb["position_embedding"]["embedding"], "ln_pre": dict(vm["pre_layrnorm"]),
           "transformer": {"resblocks": {i: _hf_block_to_open_clip(b) for i, b in vm["encoder"]["layers"].items()}},
           "ln_post": dict(vm["post_layernorm"])}
    if "visual_projection" in params:
        out["proj"] = params["visual_projection"]["kernel"]
    if with_roles:
        from catmerge_jax.roles import with_roles as _with_roles

        return _with_roles(out, open_clip_roles())
    return out


def open_clip_to_hf_params(params: Mapping[str, Any]) -> dict:
    """Inverse of :func:`hf_to_open_clip_params`."""
    layers = {i: _open_clip_block_to_hf(b) for i, b in params["transformer"]["resblocks"].items()}
    out = {"vision_model": {
        "embeddings": {"patch_embedding": dict(params["conv1"]), "class_embedding": params["class_embedding"],
                       "position_embedding": {"embedding": params["positional_embedding"]}},
        "pre_layrnorm": dict(params["ln_pre"]), "encoder": {"layers": layers},
        "post_layernorm": dict(params["ln_post"])}}
    if "proj" in params:
        out["visual_projection"] = {"kernel": params["proj"]}
    return out
