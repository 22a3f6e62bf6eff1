"""Hugging Face BLIP folders ↔ Flax (:mod:`catmerge_jax.models.blip`), images and exemplars for BLIP.

Two model kinds, from ``config.json``'s ``architectures``:

* ``"blip_vqa"`` — ``BlipForQuestionAnswering`` (``vision_model.*``, ``text_encoder.*``, ``text_decoder.*``);
* ``"blip_caption"`` — ``BlipForConditionalGeneration`` (``vision_model.*``, ``text_decoder.*``).

Keys map mechanically (:func:`converters.keys.hf_key`). The LM head's weight and bias are tied to
``text_decoder.bert.embeddings.word_embeddings.weight`` and ``text_decoder.cls.predictions.bias``; current
``save_pretrained`` leaves the tied copies out, older checkpoints carry ``text_decoder.cls.predictions.decoder.*``.
Those copies are no Flax leaves: they are kept aside and, on export, written from their (possibly merged) sources
(:data:`TIED`), so they stay tied. Everything else goes through :mod:`converters.hf` (reading, sharding, writing),
which reaches this module through :data:`converters.families.FAMILY_MODULES` (``KINDS``, ``kind_of``,
``build_model``, ``example_inputs``, ``state_to_flax``, ``layer_key``, ``layer_field``, ``CONFIG_FIELDS``).

Exemplars (:func:`read_exemplars`): a JSON Lines file, one ``{"image": PATH, "text": TEXT}`` per line, ``PATH``
relative to the file: an image file (read with Pillow and preprocessed with the folder's ``preprocessor_config.json``:
RGB, resize to ``size`` with its ``resample`` (bicubic for BLIP), rescale by ``rescale_factor`` (1/255), normalise
with ``image_mean``/``image_std``; no torchvision), or a ``.npy`` of preprocessed pixels ``(H, W, 3)`` (or
``(1, H, W, 3)``, or ``(3, H, W)`` as HF's processors return it). ``TEXT`` (the question, or a caption prompt) is
tokenized with the folder's tokenizer.

>>> from converters.hf import load_hf_folder                   # doctest: +SKIP
>>> kind, config, params, meta = load_hf_folder("blip-vqa-base") # doctest: +SKIP
>>> kind                                                        # doctest: +SKIP
'blip_vqa'
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from converters.config_fields import (COUNT, FLAG, NAME, NAMES, POSITIVE_INT, POSITIVE_NUMBER, TOKEN_ID,
                                      VISION_FIELDS, section)
from converters.keys import ConversionError, hf_key, match_state, template_shapes

__all__ = ["BLIP_KINDS", "TIED", "blip_kind", "build_blip_model", "example_inputs", "blip_state_to_flax",
           "ImageSettings", "image_settings", "load_image", "load_pixels", "read_exemplars", "BlipExemplarError",
           "KINDS", "CONFIG_FIELDS", "kind_of", "build_model", "state_to_flax", "layer_key", "layer_field"]

BLIP_KINDS = {"BlipForQuestionAnswering": "blip_vqa", "BlipForConditionalGeneration": "blip_caption"}
"""HF architecture → model kind."""

KINDS = tuple(BLIP_KINDS.values())
"""The model kinds of this family."""

_TEXT_FIELDS = {"vocab_size": POSITIVE_INT, "hidden_size": POSITIVE_INT, "num_hidden_layers": COUNT,
                "num_attention_heads": POSITIVE_INT, "intermediate_size": POSITIVE_INT, "hidden_act": NAME,
                "layer_norm_eps": POSITIVE_NUMBER, "max_position_embeddings": POSITIVE_INT,
                "bos_token_id": TOKEN_ID, "sep_token_id": TOKEN_ID, "pad_token_id": TOKEN_ID,
                "is_decoder": FLAG, "tie_word_embeddings": FLAG}

CONFIG_FIELDS = {"blip": {"architectures": NAMES, "tie_word_embeddings": FLAG,
                          **section("vision_config", VISION_FIELDS), **section("text_config", _TEXT_FIELDS)}}
"""``model_type`` → the ``config.json`` fields its loader reads (:mod:`converters.config_fields`)."""

TIED = {"text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias"}
"""Tied copy → its source (HF's ``_tied_weights_keys`` of both models)."""

# BlipImageProcessor's defaults (OpenAI CLIP mean/std, 384 px, bicubic).
_DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
_DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


class BlipExemplarError(ValueError):
    """A BLIP exemplar file or one of the images it names is missing or unreadable."""


def blip_kind(config: Mapping[str, Any]) -> str:
    """``"blip_vqa"`` or ``"blip_caption"`` from a ``blip`` config's ``architectures``."""
    archs = config.get("architectures") or []
    kinds = {BLIP_KINDS[a] for a in archs if a in BLIP_KINDS}
    if len(kinds) != 1:
        raise ConversionError(f"BLIP config architectures {archs!r}: expected one of {sorted(BLIP_KINDS)}")
    return kinds.pop()


def build_blip_model(kind: str, config: Mapping[str, Any]):
    """The linen module of a BLIP checkpoint."""
    from catmerge_jax.models.blip import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering

    cfg = BlipConfig.from_hf_config(config)
    return BlipForQuestionAnswering(cfg) if kind == "blip_vqa" else BlipForConditionalGeneration(cfg)


def example_inputs(model) -> tuple:
    """Smallest inputs that build every parameter (``pixels, input_ids, attention_mask``)."""
    v = model.config.vision
    return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32), jnp.ones((1, 2), jnp.int32),
            jnp.ones((1, 2), jnp.int32))


def _is_aside(key: str) -> bool:
    # Tied copies, and position-id buffers that older checkpoints saved.
    return key in TIED or key.endswith("embeddings.position_ids")


def blip_state_to_flax(state: Mapping[str, np.ndarray], config: Mapping[str, Any], *, dtype=np.float32):
    """A flat BLIP state dict and its config → ``(model_kind, flax_params, meta)`` (see :mod:`converters.hf`)."""
    kind = blip_kind(config)
    has_encoder = any(k.startswith("text_encoder.") for k in state)
    if has_encoder != (kind == "blip_vqa"):
        raise ConversionError(f"config says {kind} but the checkpoint {'has' if has_encoder else 'lacks'} "
                              "text_encoder.* weights")
    try:
        model = build_blip_model(kind, config)
    except ValueError as e:
        raise ConversionError(f"BLIP config: {e}") from None
    shapes = template_shapes(model, *example_inputs(model))
    params, meta = match_state(state, shapes, hf_key, _is_aside, dtype=dtype, model_kind=kind, config=dict(config),
                               options={})
    meta.ties = {key: src for key, src in TIED.items() if key in state}
    return kind, params, meta


# The family protocol of converters.families: BLIP's kind, model and converter under their common names.
kind_of = blip_kind
state_to_flax = blip_state_to_flax


def build_model(kind: str, config: Mapping[str, Any], **options):
    """:func:`build_blip_model` (a BLIP model has no options read from its keys)."""
    return build_blip_model(kind, config)


def layer_key(kind: str) -> None:
    """No layer-count check before building: a BLIP config has two towers, checked when the model is matched."""
    return None


def layer_field(config: Mapping[str, Any]) -> tuple[str, Any]:
    """Unused (:func:`layer_key` is ``None``); the text tower's layer count, for the protocol."""
    text = config.get("text_config")
    return "text_config.num_hidden_layers", (text if isinstance(text, Mapping) else {}).get("num_hidden_layers")


# ----------------------------------------------------------------------------------------------- images

@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """A folder's image preprocessing (``preprocessor_config.json``; BLIP's defaults where absent)."""

    height: int
    width: int
    resample: int = 3  # PIL.Image.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = _DEFAULT_MEAN
    image_std: tuple = _DEFAULT_STD
    do_convert_rgb: bool = True


def image_settings(folder: str, image_size: int) -> ImageSettings:
    """Read ``preprocessor_config.json`` of ``folder`` (``image_size``: the model's, used when it has no size)."""
    path = os.path.join(folder, "preprocessor_config.json")
    cfg: dict = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BlipExemplarError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(cfg, dict):
            raise BlipExemplarError(f"{path} holds a JSON {type(cfg).__name__}; expected an object")
        if "image_processor" in cfg and isinstance(cfg["image_processor"], dict):  # processor_config layout
            cfg = cfg["image_processor"]
    size = cfg.get("size", {"height": image_size, "width": image_size})
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if "height" not in size or "width" not in size:
        raise BlipExemplarError(f"{path}: size {size} is not supported (expected height and width)")
    mean = cfg.get("image_mean", _DEFAULT_MEAN)
    std = cfg.get("image_std", _DEFAULT_STD)
    as3 = lambda v: tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
    return ImageSettings(height=int(size["height"]), width=int(size["width"]), resample=int(cfg.get("resample", 3)),
                         do_resize=bool(cfg.get("do_resize", True)), do_rescale=bool(cfg.get("do_rescale", True)),
                         rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                         do_normalize=bool(cfg.get("do_normalize", True)), image_mean=as3(mean), image_std=as3(std),
                         do_convert_rgb=bool(cfg.get("do_convert_rgb", True)))


def _to_rgb(image):
    """RGB, transparency composited onto white (``transformers.image_transforms.convert_to_rgb``)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str, settings: ImageSettings) -> np.ndarray:
    """One image file → preprocessed float32 pixels ``(H, W, 3)``, as HF's PIL image processor computes them:
    RGB (transparency on white), PIL resize of the uint8 image, ``x·rescale`` in float64 cast to float32, then ``(x − mean) / std``."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is in the torch extra
        raise BlipExemplarError("reading image exemplars needs Pillow (pip install pillow)") from e
    try:
        with Image.open(path) as im:
            im.load()
            image = _to_rgb(im) if settings.do_convert_rgb else im.copy()
    except (OSError, ValueError) as e:
        raise BlipExemplarError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None
    if settings.do_resize:
        image = image.resize((settings.width, settings.height), resample=settings.resample)
    x = np.asarray(image)
    if settings.do_rescale:
        x = (x.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if settings.do_normalize:
        x = (x - np.asarray(settings.image_mean, np.float32)) / np.asarray(settings.image_std, np.float32)
    return np.ascontiguousarray(x, np.float32)


def load_pixels(path: str, settings: ImageSettings) -> np.ndarray:
    """Preprocessed pixels ``(H, W, 3)`` float32 from an image file (:func:`load_image`) or a ``.npy`` of
    preprocessed pixels (``(H, W, 3)``, ``(1, H, W, 3)`` or channels-first ``(3, H, W)``)."""
    shape = (settings.height, settings.width, 3)
    if path.endswith(".npy"):
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BlipExemplarError(f"cannot read {path} as .npy: {str(e).splitlines()[0]}") from None
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] != 3:
            x = x.transpose(1, 2, 0)
        if x.shape != shape or not np.issubdtype(x.dtype, np.floating):
            raise BlipExemplarError(f"{path} holds {x.dtype} {x.shape}; expected preprocessed float pixels {shape}")
        return x.astype(np.float32)
    return load_image(path, settings)


def read_exemplars(path: str, folder: str, image_size: int, *, max_length: int = 128, vocab_size: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A BLIP exemplar file (JSON Lines, see the module docstring) → ``(pixels (N, H, W, 3), input_ids (N, S),
    attention_mask (N, S))``, text tokenized with ``folder``'s tokenizer (special tokens, truncated to
    ``max_length``, padded to a multiple of 16). Errors are :class:`BlipExemplarError` naming the line."""
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i + 1, line.strip()) for i, line in enumerate(f)]
    except (OSError, UnicodeDecodeError) as e:
        raise BlipExemplarError(f"cannot read exemplar file {path}: {e}") from None
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise BlipExemplarError(f"exemplar file {path} is empty (expected one JSON object per line)")
    settings = image_settings(folder, image_size)
    if (settings.height, settings.width) != (image_size, image_size):
        raise BlipExemplarError(f"{folder}: preprocessor size {settings.height}x{settings.width} differs from the "
                                f"model's image_size {image_size}")
    pixels, texts = [], []
    for n, line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise BlipExemplarError(f"{path} line {n} is not JSON ({e.msg}); expected "
                                    '{"image": "...", "text": "..."}') from None
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not isinstance(
                item.get("text"), str):
            raise BlipExemplarError(f'{path} line {n}: expected {{"image": "<path>", "text": "<text>"}}')
        image_path = os.path.join(base, item["image"])
        if not os.path.isfile(image_path):
            raise BlipExemplarError(f"{path} line {n}: image {image_path} does not exist")
        pixels.append(load_pixels(image_path, settings))
        texts.append(item["text"])
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to build the tokenizer is reported in one line
        raise BlipExemplarError(f"cannot load a tokenizer from {folder}: {str(e).splitlines()[0]}") from None
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, add_special_tokens=True,
                    pad_to_multiple_of=16, return_tensors="np")
    ids = np.asarray(enc["input_ids"], np.int32)
    if vocab_size is not None and ids.size and ids.max() >= vocab_size:
        raise BlipExemplarError(f"the tokenizer of {folder} produced id {int(ids.max())}, outside the model's "
                                f"vocab_size {vocab_size}")
    return np.stack(pixels), ids, np.asarray(enc["attention_mask"], np.int32)
