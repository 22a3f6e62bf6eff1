"""open_clip state dicts ↔ Flax params of :class:`~catmerge_jax.models.clip_vit.ClipVisionModel` (``layout="open_clip"``).

Keys are those of open_clip's ``CLIP`` (``visual.conv1.weight``,
``visual.transformer.resblocks.0.attn.in_proj_weight``, ...), optionally under a ``model.`` prefix as in the
task-vectors paper's ``ImageEncoder``. Everything under ``visual.`` is mapped mechanically (see
:mod:`converters.hf`) except ``attn.in_proj_{weight,bias}`` ↔ ``attn/in_proj/{kernel,bias}`` and the bare
``proj`` ``(width, out)``, which open_clip already applies as ``x @ proj`` (no transpose). All other keys
(the text side: ``token_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``, ...) are kept aside.

The config is read from shapes: ``width`` and ``patch`` from ``conv1``, ``image_size`` from the position table,
``layers`` from the resblock count, ``mlp_dim`` from ``c_fc``, ``output_dim`` from ``proj``, ``heads = width //
64`` (open_clip's rule; pass ``heads=`` otherwise). The activation cannot be read from weights: OpenAI's
towers (and the task-vectors checkpoints) use QuickGELU, the default here.

>>> from converters.open_clip import open_clip_to_flax   # doctest: +SKIP
>>> config, params, meta = open_clip_to_flax(state_dict)  # doctest: +SKIP

The layout's leaf roles (the fused ``in_proj`` holds three projections; the bare ``proj`` is linear) are declared by
the model (``ClipVisionModel.param_roles()``): statistics captured from it carry them. For merges without
statistics, ``open_clip_to_flax(state_dict, with_roles=True)`` returns the params as a
:class:`~catmerge_jax.roles.ParamsWithRoles` (a ``dict`` that carries them), so every method reads them without
``roles=`` (see ``docs/roles.md``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from converters.keys import ConversionError, ConversionMeta, flax_to_hf_state, hf_key, match_state, template_shapes

__all__ = ["infer_config", "open_clip_to_flax", "flax_to_open_clip", "split_prefix"]


def split_prefix(state: Mapping[str, Any]) -> str:
    """The prefix in front of ``visual.`` (``""`` or ``"model."``); error when no ``visual.conv1.weight`` exists."""
    for key in state:
        if key.endswith("visual.conv1.weight"):
            return key[: -len("visual.conv1.weight")]
    raise ConversionError("not an open_clip vision state dict: no key ending in 'visual.conv1.weight'")


def infer_config(state: Mapping[str, Any], *, act: str = "quick_gelu", heads: int | None = None,
                 layer_norm_eps: float = 1e-5):
    """A :class:`ClipVisionConfig` read from the shapes of an open_clip state dict."""
    from catmerge_jax.models.clip_vit import ClipVisionConfig

    pre = split_prefix(state) + "visual."
    shape = lambda k: tuple(np.shape(state[pre + k])) if pre + k in state else None
    width, channels, p, p2 = shape("conv1.weight")
    if p != p2:
        raise ConversionError(f"{pre}conv1.weight: non-square patch {p}x{p2} is not supported")
    n_pos = shape("positional_embedding")
    if n_pos is None:
        raise ConversionError(f"missing key {pre}positional_embedding")
    grid = math.isqrt(n_pos[0] - 1)
    if grid * grid != n_pos[0] - 1:
        raise ConversionError(f"{pre}positional_embedding has {n_pos[0]} rows; expected 1 + a square number")
    blocks = {int(m.group(1)) for k in state for m in [re.match(re.escape(pre) + r"transformer\.resblocks\.(\d+)\.", k)]
              if m}
    if blocks != set(range(len(blocks))):
        raise ConversionError(f"resblock indices {sorted(blocks)} are not 0..n-1")
    fc = shape("transformer.resblocks.0.mlp.c_fc.weight")
    if fc is None:
        raise ConversionError(f"missing key {pre}transformer.resblocks.0.mlp.c_fc.weight")
    proj = shape("proj")
    return ClipVisionConfig(image_size=grid * p, patch_size=p, width=width, layers=len(blocks),
                            heads=heads if heads is not None else max(width // 64, 1), mlp_dim=fc[0],
                            output_dim=proj[1] if proj is not None else None, act=act,
                            layer_norm_eps=layer_norm_eps, num_channels=channels)


def _key_fn(prefix: str):
    def key_fn(path: str):
        if path.endswith("attn/in_proj/kernel"):
            return prefix + path[: -len("in_proj/kernel")].replace("/", ".") + "in_proj_weight", "transpose", 2
        if path.endswith("attn/in_proj/bias"):
            return prefix + path[: -len("in_proj/bias")].replace("/", ".") + "in_proj_bias", "none", 1
        return hf_key(path, prefix)
    return key_fn


def open_clip_to_flax(state: Mapping[str, Any], *, config=None, act: str = "quick_gelu", heads: int | None = None,
                      dtype=np.float32, with_roles: bool = False) -> tuple[Any, dict, ConversionMeta]:
    """open_clip state dict (key → array) → ``(config, params, meta)`` for ``ClipVisionModel(config,
    layout="open_clip", with_projection=config.output_dim is not None)``. ``meta`` writes it back with
    :func:`flax_to_open_clip` (same keys, order, dtypes; text-side keys unchanged).

    ``with_roles=True``: ``params`` is a :class:`~catmerge_jax.roles.ParamsWithRoles` carrying the layout's
    declared leaf specs (:func:`~catmerge_jax.models.clip_vit.open_clip_roles`), so merges without statistics
    (TSV, Iso, WUDI, ...) trim the fused ``in_proj`` per q/k/v block and ``proj`` as a linear map by themselves."""
    from catmerge_jax.models.clip_vit import ClipVisionModel
    import jax.numpy as jnp

    config = config if config is not None else infer_config(state, act=act, heads=heads)
    prefix = split_prefix(state) + "visual."
    with_projection = config.output_dim is not None
    model = ClipVisionModel(config, layout="open_clip", with_projection=with_projection)
    shapes = template_shapes(model, jnp.zeros((1, config.image_size, config.image_size, config.num_channels)))
    params, meta = match_state(
        state, shapes, _key_fn(prefix), lambda k: not k.startswith(prefix), dtype=dtype, model_kind="open_clip",
        config={"image_size": config.image_size, "patch_size": config.patch_size, "width": config.width,
                "layers": config.layers, "heads": config.heads, "mlp_dim": config.mlp_dim,
                "output_dim": config.output_dim, "act": config.act, "layer_norm_eps": config.layer_norm_eps,
                "num_channels": config.num_channels},
        options={"layout": "open_clip", "with_projection": with_projection, "prefix": prefix})
    if with_roles:
        from catmerge_jax.roles import with_roles as _with_roles

        params = _with_roles(params, model.param_roles())
    return config, params, meta


def flax_to_open_clip(params, meta: ConversionMeta) -> dict[str, np.ndarray]:
    """Inverse of :func:`open_clip_to_flax`: the full state dict with the original keys, order and dtypes."""
    return flax_to_hf_state(params, meta)
