"""From Hugging Face folders to a merged Hugging Face folder: the steps behind ``catmerge merge``.

1. :func:`load_checkpoint` reads a folder into our Flax params (BERT/RoBERTa, CLIP vision; see ``converters.hf``)
   and :func:`check_compatible` checks every task against the base;
2. :func:`read_exemplars` reads one task's unlabeled exemplars (text lines tokenized with the base's tokenizer, or
   an ``.npy`` of preprocessed pixels);
3. :func:`task_statistics` captures each task's layer inputs with the task-k model ``W0 + s·T_k`` (``s = 1`` is the
   paper's Algorithm 1) on its own exemplars (:func:`catmerge_jax.capture.capture_stats`);
4. :func:`merge_checkpoints` runs a registered method (:mod:`catmerge_jax.methods.registry`);
5. :func:`merge_folders` writes the result with the base's key names and dtypes, atomically.

Every failure the user can fix (a missing or empty exemplar file, folders that don't match, unreadable
checkpoints, bad hyperparameters) is a :class:`~catmerge_jax.errors.CatMergeError` with a one-line message.

>>> from catmerge_jax.pipeline import merge_folders                                   # doctest: +SKIP
>>> merge_folders("cat", "base", ["task_a", "task_b"], ["a.txt", "b.txt"], "merged")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from catmerge_jax.errors import CatMergeError, HyperparameterError, NonFiniteError, TreeMismatchError
from catmerge_jax.methods.registry import MergeMethod, get_method, merge_scale_name
from catmerge_jax.roles import Overrides
from catmerge_jax.stagetimes import StageTimes
from catmerge_jax.tree import PyTree, check_same_structure, tree_add, tree_scale, tree_sub

TEXT_KINDS = ("bert", "roberta")
IMAGE_KINDS = ("clip_vision",)
VL_KINDS = ("blip_vqa", "blip_caption")
"""Vision-language kinds: exemplars are JSON Lines of ``{"image", "text"}`` (:func:`read_vl_exemplars`)."""
MAX_TOKENS = 128
"""Text exemplars are truncated to this many tokens (special tokens included)."""

CLI_HPARAMS = ("alpha", "lam", "c")
"""Hyperparameters the CLI exposes as flags; a method receives those it declares in ``MergeMethod.defaults``
(``alpha`` is the merge scale: it goes to ``MergeMethod.scale_name``, see :func:`resolve_hparams`)."""


class InputError(CatMergeError):
    """A file or folder given to the pipeline is missing, empty, unreadable or does not match the others."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One loaded model folder. ``params`` is float32; ``meta`` (``converters.hf.ConversionMeta``) maps every leaf
    back to its checkpoint key and dtype."""

    folder: str
    kind: str
    config: dict
    params: PyTree
    meta: Any

    def model(self):
        """The linen module of this checkpoint (built from its config and the keys it has)."""
        from converters.hf import build_flax_model

        return build_flax_model(self.kind, self.config, self.meta)


class Exemplars(NamedTuple):
    """A task's exemplars as model inputs: ``inputs`` (each with a leading exemplar axis ``N``) and the
    ``token_mask`` ``(N, seq)`` of real tokens (``None`` for images: every patch counts)."""

    inputs: tuple[np.ndarray, ...]
    token_mask: np.ndarray | None


def load_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Read a Hugging Face folder (``config.json`` + safetensors weights) into float32 Flax params."""
    from converters.hf import load_hf_folder

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        if os.path.lexists(folder):
            what = "a file" if os.path.isfile(folder) else "not a folder"
            raise InputError(f"checkpoint folder {folder} is {what}; give the model folder (the one holding "
                             "config.json)")
        raise InputError(f"checkpoint folder {folder} does not exist")
    try:
        kind, config, params, meta = load_hf_folder(folder, dtype=np.float32)
    except CatMergeError:
        raise
    except Exception as e:  # noqa: BLE001 — any failure to parse a folder is reported as unreadable, one line
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot read checkpoint {folder}: {message}") from e
    return Checkpoint(folder, kind, config, params, meta)


def check_compatible(base: Checkpoint, task: Checkpoint) -> None:
    """Raise :class:`TreeMismatchError` unless ``task`` has the base's architecture and parameter leaves."""
    if task.kind != base.kind:
        raise TreeMismatchError(f"{task.folder} is a {task.kind} model but the base {base.folder} is a {base.kind}")
    if task.meta.options != base.meta.options:
        raise TreeMismatchError(f"{task.folder} has model options {task.meta.options}, the base {base.folder} has "
                                f"{base.meta.options} (e.g. a pooler or projection only one of them has)")
    try:
        check_same_structure(base.params, task.params, what=task.folder)
    except TreeMismatchError as e:
        raise TreeMismatchError(f"{task.folder} does not match the base {base.folder}: {e}") from None


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
"""A folder holds a usable tokenizer only with one of these vocabulary files (without them transformers can build
an empty tokenizer that maps every word to ``[UNK]``)."""


def check_exemplar_path(path: str | os.PathLike) -> None:
    """Raise :class:`InputError` saying exactly what is wrong unless ``path`` is a regular file (or a link to one)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return
    if not os.path.lexists(path):
        raise InputError(f"exemplar file {path} does not exist")
    if os.path.isdir(path):
        raise InputError(f"exemplar file {path} is a folder; give one file per task")
    if not os.path.exists(path):
        raise InputError(f"exemplar file {path} is a broken symbolic link")
    raise InputError(f"exemplar file {path} is not a regular file (a device, pipe or socket); give one file per task")


def read_text_exemplars(path: str | os.PathLike, tokenizer_folder: str | os.PathLike, *,
                        max_length: int = MAX_TOKENS, vocab_size: int | None = None) -> Exemplars:
    """UTF-8 text, one exemplar per non-blank line, tokenized with the folder's tokenizer (special tokens added,
    truncated to ``max_length``, padded to the longest rounded up to 16). Inputs: ``(input_ids, attention_mask, token_type_ids)``.

    ``vocab_size`` (the model's embedding rows): a tokenizer with more tokens than that, or any id it produces at
    or beyond it, is an :class:`InputError` naming both sizes; so are a folder without tokenizer files and
    exemplars of which every word is unknown to the tokenizer."""
    path = os.fspath(path)
    check_exemplar_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except FileNotFoundError:
        raise InputError(f"exemplar file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read exemplar file {path}: {e}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise InputError(f"exemplar file {path} is empty (expected one text exemplar per line)")
    folder = os.fspath(tokenizer_folder)
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise InputError(f"text exemplars need the base's tokenizer, but {folder} has no tokenizer files (one of "
                         f"{', '.join(TOKENIZER_FILES)}); copy them from the model you fine-tuned")
    tokenizer = load_tokenizer(folder)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise InputError(f"the tokenizer of {folder} has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{vocab_size}: they do not belong together")
    # Decoder tokenizers often have no pad token or pad on the left. Padding never counts, so any id pads; padding
    # on the right keeps each exemplar's positions 0, 1, ... as in an unpadded run.
    if getattr(tokenizer, "pad_token", None) is None:
        filler = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
        if filler is None:
            raise InputError(f"the tokenizer of {folder} has no pad, EOS or unknown token to pad exemplars with")
        tokenizer.pad_token = filler
    tokenizer.padding_side = "right"
    # Lengths padded to a multiple of 16 so tasks share compiled shapes; padding never counts (token_mask).
    enc = tokenizer(lines, padding=True, truncation=True, max_length=max_length, add_special_tokens=True,
                    pad_to_multiple_of=16, return_tensors="np")
    ids = np.asarray(enc["input_ids"], np.int32)
    if vocab_size is not None and ids.size and (ids.max() >= vocab_size or ids.min() < 0):
        raise InputError(f"the tokenizer of {folder} produced id {int(ids.max())} for {path}, outside the model's "
                         f"vocab_size {vocab_size} (the tokenizer has {len(tokenizer)} tokens)")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    words = [i for i, m in zip(ids.ravel().tolist(), np.asarray(enc["attention_mask"]).ravel().tolist())
             if m and (i not in special or i == unk)]
    if unk is not None and words and all(i == unk for i in words):
        raise InputError(f"every token of {path} is unknown ({tokenizer.unk_token}) to the tokenizer of {folder}; "
                         "the tokenizer files do not match the text or are incomplete")
    mask = np.asarray(enc["attention_mask"], np.int32)
    types = np.asarray(enc["token_type_ids"], np.int32) if "token_type_ids" in enc else np.zeros_like(ids)
    return Exemplars((ids, mask, types), mask.astype(bool))


def load_tokenizer(folder: str | os.PathLike):
    """The folder's tokenizer, from a local folder only (never the network): read by the ``tokenizers`` package
    from ``tokenizer.json`` where that gives exactly transformers' result (BERT-style WordPiece,
    :func:`catmerge_jax.tokenizer.load_fast_tokenizer`; seconds faster than importing transformers), else
    ``transformers.AutoTokenizer``."""
    from catmerge_jax.tokenizer import load_fast_tokenizer

    fast = load_fast_tokenizer(folder)
    if fast is not None:
        return fast
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise InputError("text exemplars need the 'transformers' package for the base folder's tokenizer") from e
    try:
        return AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot load a tokenizer from {os.fspath(folder)}: {str(e).splitlines()[0]}") from e


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data bytes present)`` of a ``.npy`` file, read from its header only."""
    with open(path, "rb") as f:
        magic = f.read(6)
        if magic.startswith(b"PK\x03\x04"):
            raise InputError(f"exemplar file {path} is a .npz archive, not a .npy array; save one array with "
                             "numpy.save")
        if magic != b"\x93NUMPY":
            raise InputError(f"exemplar file {path} is not a valid .npy file (no NumPy header); expected float32 "
                             "pixels saved with numpy.save")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as e:
            raise InputError(f"exemplar file {path} is not a valid .npy file ({str(e).splitlines()[0]})") from None
        return tuple(shape), np.dtype(dtype), os.fstat(f.fileno()).st_size - f.tell()


def read_image_exemplars(path: str | os.PathLike, *, image_size: int | None = None, channels: int = 3) -> Exemplars:
    """A ``.npy`` of preprocessed pixels ``(N, H, W, channels)``, read as float32 (no pickles).

    The header is checked first (a ``.npz``, a text file or an object array is refused by name), and the data
    only read when the file holds all the bytes the header declares."""
    path = os.fspath(path)
    check_exemplar_path(path)
    shape, dtype, present = _npy_header(path)
    if dtype.hasobject:
        raise InputError(f"exemplar file {path} holds Python objects, not numbers; expected float32 pixels")
    if len(shape) != 4 or shape[-1] != channels:
        raise InputError(f"exemplar file {path} holds shape {shape}; expected (N, H, W, {channels}) pixels")
    if shape[0] == 0:
        raise InputError(f"exemplar file {path} is empty (0 images)")
    if image_size is not None and shape[1:3] != (image_size, image_size):
        raise InputError(f"exemplar file {path} holds {shape[1]}x{shape[2]} images; the model expects "
                         f"{image_size}x{image_size}")
    if not np.issubdtype(dtype, np.floating):
        raise InputError(f"exemplar file {path} has dtype {dtype}; expected float32 preprocessed pixels")
    needed = int(np.prod(shape)) * dtype.itemsize
    if present < needed:
        raise InputError(f"exemplar file {path} is truncated: its header declares {shape} {dtype} ({needed} bytes) "
                         f"but {present} bytes follow")
    try:
        pixels = np.load(path, mmap_mode="r", allow_pickle=False)
        return Exemplars((np.array(pixels, dtype=np.float32),), None)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read exemplar file {path} as .npy: {str(e).splitlines()[0]}") from None


def read_exemplars(path: str | os.PathLike, base: Checkpoint) -> Exemplars:
    """Exemplars for the base's model kind: text lines for BERT/RoBERTa, ``.npy`` pixels for CLIP vision."""
    if base.kind in TEXT_KINDS:
        vocab = base.config.get("vocab_size")
        return read_text_exemplars(path, base.folder, vocab_size=vocab if type(vocab) is int else None)
    if base.kind in IMAGE_KINDS:
        model = base.model()
        return read_image_exemplars(path, image_size=model.config.image_size, channels=model.config.num_channels)
    if base.kind in VL_KINDS:
        return read_vl_exemplars(path, base)
    if is_decoder_kind(base.kind):
        from catmerge_jax.llm import read_decoder_exemplars

        vocab = base.config.get("vocab_size")
        return read_decoder_exemplars(path, base.folder, vocab_size=vocab if type(vocab) is int else None)
    raise InputError(f"no exemplar reader for model kind {base.kind!r}")


def is_decoder_kind(kind: str) -> bool:
    """Whether ``kind`` is a decoder LLM family (:mod:`catmerge_jax.models.decoder`): inputs ``(ids, mask)``."""
    from catmerge_jax.models.decoder import FAMILIES

    return kind in FAMILIES


def read_vl_exemplars(path: str | os.PathLike, base: Checkpoint) -> Exemplars:
    """BLIP exemplars: JSON Lines, one ``{"image": PATH, "text": TEXT}`` per line, ``PATH`` relative to the file (an
    image file preprocessed with the base folder's ``preprocessor_config.json``, or a ``.npy`` of preprocessed
    pixels), ``TEXT`` tokenized with the base's tokenizer (see :func:`converters.blip.read_exemplars`). Inputs:
    ``(pixels, input_ids, attention_mask)``; image tokens always count, text padding never."""
    from converters.blip import BlipExemplarError
    from converters.blip import read_exemplars as read_blip_exemplars

    check_exemplar_path(path)
    cfg = base.model().config
    try:
        pixels, ids, mask = read_blip_exemplars(os.fspath(path), base.folder, cfg.vision.image_size,
                                                max_length=MAX_TOKENS, vocab_size=cfg.text.vocab_size)
    except BlipExemplarError as e:
        raise InputError(str(e)) from None
    return Exemplars((pixels, ids, mask), mask.astype(bool))


def capture_rules(kind: str) -> Mapping[type, Any] | None:
    """Capture rules a model kind needs beyond the defaults (BLIP: its image-side layers count every image token,
    :data:`catmerge_jax.models.blip.CAPTURE_RULES`)."""
    if kind in VL_KINDS:
        from catmerge_jax.models.blip import CAPTURE_RULES

        return CAPTURE_RULES
    return None


def feature_params(pretrained: PyTree, finetuned: PyTree, feature_scale: float = 1.0) -> PyTree:
    """The task-k model whose layer inputs are captured: ``W0 + s·(W_k − W0)`` (``s = 1``: ``W_k`` itself)."""
    if feature_scale == 1.0:
        return finetuned
    return tree_add(pretrained, tree_scale(tree_sub(finetuned, pretrained), feature_scale))


def task_statistics(capture: Capture, params: PyTree, exemplars: Exemplars, *, roles: Overrides = None,
                    batch_size: int = 16, progress: bool = False) -> PyTree:
    """One task's stats tree: :func:`capture_stats` of ``params`` on its exemplars."""
    from catmerge_jax.capture import capture_stats  # imported where used: data-free merges never load it

    return capture_stats(capture, params, *exemplars.inputs, token_mask=exemplars.token_mask, roles=roles,
                         batch_size=batch_size, progress=progress)


def _model_output(kind: str, out: Any, mask: Any) -> Any:
    """The outputs a label-free Fisher looks at: token states of real tokens (+ pooler) or the image embedding."""
    if kind in TEXT_KINDS:
        states = out.last_hidden_state * mask[..., None].astype(out.last_hidden_state.dtype)
        return (states,) if out.pooler_output is None else (states, out.pooler_output)
    if kind in VL_KINDS or is_decoder_kind(kind):  # decoder logits of real tokens
        return (out.logits * mask[..., None].astype(out.logits.dtype),)
    return (out.pooled,)


def _fisher_provider(base: Checkpoint) -> Callable[[PyTree, Exemplars, bool], PyTree]:
    """Per task: the diagonal Fisher of task k's own model on its exemplars, label-free
    (:func:`catmerge_jax.methods.fisher.unlabeled_fisher`). One ``apply_fn`` for every task, so it compiles once."""
    from catmerge_jax.methods.fisher import unlabeled_fisher

    model = base.model()

    def apply_fn(params, x):
        out = model.apply({"params": params}, *x)
        return _model_output(base.kind, out, x[1] if base.kind in TEXT_KINDS or is_decoder_kind(base.kind)
                             else x[2] if base.kind in VL_KINDS else None)

    def fisher(finetuned: PyTree, exemplars: Exemplars, progress: bool) -> PyTree:
        return unlabeled_fisher(apply_fn, finetuned, tuple(exemplars.inputs), batch_size=4, progress=progress)

    return fisher


ExtraProvider = Callable[[Checkpoint], Callable[[PyTree, Exemplars, bool], PyTree]]
EXTRA_PROVIDERS: Mapping[str, ExtraProvider] = {"fishers": _fisher_provider}
"""Per-task inputs (``MergeMethod.extras``) the pipeline can compute from unlabeled exemplars: name → a factory
that, given the base checkpoint, returns ``(task params, exemplars, progress) -> value``."""


def resolve_hparams(method: MergeMethod, given: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """The hyperparameters to pass for the CLI flags ``given`` (:data:`CLI_HPARAMS`; ``None``: not given).

    ``alpha`` is the merge scale: it goes to the method's declared scale keyword
    (:func:`~catmerge_jax.methods.registry.merge_scale_name`), and a method without one refuses it
    (:class:`HyperparameterError`, pointing to ``--hparam alpha=...`` when the method's own ``alpha`` means
    something else, e.g. RegMean's Gram shrinkage). Other flags go to the keyword of the same name when ``method``
    declares it in its defaults. Returns ``(hparams, ignored)``: everything else keeps the method's own default;
    ``ignored`` names the given flags the method does not take (the CLI mentions them rather than failing a
    uniform command line).
    """
    hparams, ignored = {}, []
    for name, value in given.items():
        if value is None:
            continue
        keyword = name
        if name == "alpha":
            keyword = merge_scale_name(method)
            if keyword is None:
                raise HyperparameterError(_no_merge_scale(method))
        if keyword in method.defaults:
            hparams[keyword] = value
        else:
            ignored.append(name)
    return hparams, ignored


def _no_merge_scale(method: MergeMethod) -> str:
    if "alpha" in method.defaults:
        return (f"--alpha is the merge scale and method '{method.name}' has none: its own 'alpha' means something "
                f"else (default {method.defaults['alpha']}); set that with --hparam alpha=VALUE")
    return f"--alpha is the merge scale and method '{method.name}' has none; leave --alpha out"


def needs_exemplars(method: MergeMethod) -> bool:
    return bool(method.needs_stats or method.extras)


def check_method_inputs(method: MergeMethod, n_tasks: int, n_exemplars: int | None) -> None:
    """Raise :class:`InputError` unless the pipeline can give ``method`` everything it needs (cheap; call it before
    reading any checkpoint)."""
    unknown = [e for e in method.extras if e not in EXTRA_PROVIDERS]
    if unknown:
        raise InputError(f"method '{method.name}' needs per-task {', '.join(unknown)}, which cannot be computed from "
                         "unlabeled exemplars; use the Python API and pass them yourself")
    if n_exemplars is not None and n_exemplars != n_tasks:
        raise InputError(f"got {n_exemplars} exemplar file(s) for {n_tasks} task(s); give one per task, in task "
                         "order")
    if needs_exemplars(method) and not n_exemplars:
        raise InputError(f"method '{method.name}' needs --exemplars (one file per task)")


def merge_checkpoints(method: str | MergeMethod, base: Checkpoint, tasks: Sequence[Checkpoint],
                      exemplars: Sequence[Exemplars] | None = None, *, hparams: Mapping[str, Any] | None = None,
                      feature_scale: float = 1.0, roles: Overrides = None, batch_size: int = 16,
                      progress: bool = False, stages: StageTimes | None = None) -> PyTree:
    """Merge loaded checkpoints with a registered method; returns the merged params (base layout).

    Args:
      method: a registered name or a :class:`MergeMethod`.
      base, tasks: from :func:`load_checkpoint`; every task must match the base (:func:`check_compatible`).
      exemplars: one :class:`Exemplars` per task, in task order (needed when the method needs statistics or
        exemplar-derived extras such as Fishers).
      hparams: passed to the method over its defaults.
      feature_scale: features come from ``W0 + feature_scale·T_k`` (1: the paper; the authors' code used alpha).
      roles: role overrides for :func:`catmerge_jax.roles.classify`.
      batch_size: exemplars per capture forward pass.
      stages: receives the seconds of ``"statistics"`` (capture and exemplar-derived extras) and ``"solve"`` (the
        method), JAX compile time split out (:class:`catmerge_jax.stagetimes.StageTimes`).
    """
    stage = (stages or StageTimes()).stage
    m = get_method(method) if isinstance(method, str) else method
    if not tasks:
        raise HyperparameterError("merging needs at least one task checkpoint")
    if not np.isfinite(feature_scale):
        raise HyperparameterError(f"feature_scale must be finite, got {feature_scale}")
    for task in tasks:
        check_compatible(base, task)
    check_method_inputs(m, len(tasks), None if exemplars is None else len(exemplars))
    from tqdm.auto import tqdm

    finetuned = [t.params for t in tasks]
    kwargs: dict[str, Any] = dict(hparams or {})
    if roles is None:  # roles a layout needs beyond its names (e.g. open_clip's fused q|k|v), from the model itself
        roles = getattr(base.model(), "param_roles", lambda: None)()
    with stage("statistics"):
        if m.needs_stats:
            from catmerge_jax.capture import make_capture

            capture = make_capture(base.model(), rules=capture_rules(base.kind))
            kwargs["stats"] = [
                task_statistics(capture, feature_params(base.params, ft, feature_scale), ex, roles=roles,
                                batch_size=batch_size)
                for ft, ex in tqdm(list(zip(finetuned, exemplars)), desc="statistics", unit="task",
                                   disable=not progress)]
        for extra in m.extras:
            provide = EXTRA_PROVIDERS[extra](base)
            kwargs[extra] = [provide(ft, ex, False)
                             for ft, ex in tqdm(list(zip(finetuned, exemplars)), desc=extra, unit="task",
                                                disable=not progress)]
    with stage("solve"):
        try:
            merged = m.merge(base.params, finetuned, roles=roles, progress=progress, **kwargs)
        except TypeError as e:
            if "unexpected keyword argument" not in str(e):
                raise
            raise HyperparameterError(f"method '{m.name}' does not take that hyperparameter ({e})") from None
        return jax.tree.map(np.asarray, jax.device_get(merged))


def load_tasks(base_dir: str | os.PathLike, task_dirs: Sequence[str | os.PathLike], *,
               progress: bool = False) -> tuple[Checkpoint, list[Checkpoint]]:
    """Load and check the base and every task folder.

    Two folders are read at a time: reading is mostly copying tensors out of the files and into our layout, which
    NumPy does without the GIL (MiniLM's four folders: 4 × ~0.5 s). Folders are checked, and the first bad one
    reported, in the order given."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    folders = [base_dir, *task_dirs]
    pool = ThreadPoolExecutor(min(2, len(folders)), thread_name_prefix="catmerge-load")
    try:
        loaded = pool.map(load_checkpoint, folders)
        base = next(loaded)
        tasks = []
        for task in tqdm(loaded, total=len(folders) - 1, desc="loading", unit="model", disable=not progress):
            check_compatible(base, task)
            tasks.append(task)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # a bad folder (or Ctrl-C) stops the folders not yet read
        raise
    pool.shutdown()
    return base, tasks


def _resolved(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def _within(child: str, parent: str) -> bool:
    return child != parent and child.startswith(parent.rstrip(os.sep) + os.sep)


def prepare_output(out_dir: str | os.PathLike, *, overwrite: bool = False,
                   inputs: Sequence[str | os.PathLike] = (), exemplars: Sequence[str | os.PathLike] = ()) -> str:
    """Check ``--out`` before any work; returns its absolute path (its parent's symlinks resolved).

    Refused, with or without ``overwrite``: a symlink (catmerge never writes through or replaces one), something
    that is not a folder, a folder that equals, contains or lies inside one of the ``inputs`` folders (base and
    tasks, compared after resolving symlinks), or one that contains an exemplar file. A non-empty folder is refused
    unless ``overwrite``; an empty one (e.g. a fresh temp dir) is filled.
    """
    given = os.fspath(out_dir)
    normal = os.path.normpath(os.path.abspath(given))
    name = os.path.basename(normal)
    if not name or name in (".", ".."):
        raise InputError(f"--out {given} names no folder that can be created")
    out = os.path.join(os.path.realpath(os.path.dirname(normal)), name)
    if os.path.islink(out):
        raise InputError(f"--out {given} is a symbolic link (to {os.path.realpath(out)}); catmerge never writes "
                         "through or replaces a link: give the folder itself")
    for folder in inputs:
        real = _resolved(folder)
        if out == real:
            raise InputError(f"--out {given} is the input folder {os.fspath(folder)}; choose a new folder")
        if _within(real, out):
            raise InputError(f"--out {given} contains the input folder {os.fspath(folder)}; choose a new folder")
        if _within(out, real):
            raise InputError(f"--out {given} is inside the input folder {os.fspath(folder)}; choose a folder "
                             "outside it")
    for file in exemplars:
        if _within(_resolved(file), out):
            raise InputError(f"--out {given} contains the exemplar file {os.fspath(file)}; choose a new folder")
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise InputError(f"--out {given} exists and is not a folder")
        if os.listdir(out) and not overwrite:
            raise InputError(f"--out {out} exists and is not empty (remove it or pass --overwrite)")
    return out


def check_finite_output(state: Mapping[str, np.ndarray], meta: Any) -> None:
    """Raise :class:`NonFiniteError` naming the first merged leaf (in checkpoint order) that holds NaN or Inf
    once cast to its checkpoint dtype (e.g. a large alpha overflowing float16)."""
    path_of = {leaf.key: path for path, leaf in meta.leaves.items()}
    for key, value in state.items():
        if key not in path_of:
            continue  # tensors kept aside (heads, buffers) are the base's, unchanged
        try:
            finite = np.isfinite(value)
        except TypeError:
            continue  # a dtype with no notion of finiteness
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise NonFiniteError(f"merged leaf {path_of[key]} (checkpoint key {key}) holds {bad} non-finite value(s) "
                                 f"as {value.dtype}; nothing was written (hyperparameters too large?)")


def _make_parents(folder: str) -> list[str]:
    """``os.makedirs(folder)``, returning the folders it created (deepest last), so a failed run can remove them."""
    missing = []
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    created: list[str] = []
    try:
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o777)
                created.append(path)
            except FileExistsError:
                pass
    except OSError:
        _remove_empty(created)
        raise
    return created


def _remove_empty(folders: Sequence[str]) -> None:
    for path in reversed(folders):
        try:
            os.rmdir(path)
        except OSError:
            return


def publish_merged(tmp: str, out: str, *, overwrite: bool, accept: tuple[int, int] | None) -> None:
    """Publish the finished temporary folder ``tmp`` at ``out`` (:func:`catmerge_jax.atomic.publish_dir`), or say
    in one line why not.

    Shared by every folder-writing merge. If something appeared at ``out`` while merging (and ``overwrite`` is
    off) it is left untouched, and the merged model is kept beside it as ``<name>.catmerge-result-<hex>`` rather
    than thrown away (hours of work on an LLM); the caller's clean-up then removes ``tmp``'s marker.
    """
    from catmerge_jax import atomic

    try:
        atomic.publish_dir(tmp, out, overwrite=overwrite, accept=accept)
    except atomic.PublishConflict:
        kept = os.path.join(os.path.dirname(out), f"{os.path.basename(out)}.catmerge-result-{os.urandom(3).hex()}")
        try:
            atomic.rename_noreplace(tmp, kept)
        except OSError:
            raise InputError(f"--out {out} appeared while merging and was left untouched; the merged model "
                             "was discarded") from None
        raise InputError(f"--out {out} appeared while merging and was left untouched (pass --overwrite to "
                         f"replace it); the merged model was kept in {kept}") from None
    except OSError as e:
        raise InputError(f"cannot write {out}: {e}") from e


def merge_folders(method: str, base_dir: str | os.PathLike, task_dirs: Sequence[str | os.PathLike],
                  exemplar_files: Sequence[str | os.PathLike] | None, out_dir: str | os.PathLike, *,
                  hparams: Mapping[str, Any] | None = None, feature_scale: float = 1.0, roles: Overrides = None,
                  batch_size: int = 16, overwrite: bool = False, progress: bool = False,
                  stages: StageTimes | None = None) -> str:
    """The whole ``catmerge merge``: load, check, read exemplars, capture, merge, write. Returns ``out_dir``.

    ``out_dir`` gets ``model.safetensors`` with the base's key names and dtypes plus the base's config and tokenizer
    files. It is checked first (:func:`prepare_output`); the result is assembled in a temporary folder
    (``.catmerge-tmp-<name>-*`` beside it, made at the start and removed on any failure or interrupt; those of
    earlier runs that were killed are removed first) and renamed into place only if nothing appeared at
    ``out_dir`` meanwhile — or, with ``overwrite``, by renaming the old folder aside. A merged tensor that is NaN
    or Inf stops the run before anything is written. Files and folders follow the umask. ``stages`` receives the
    seconds of ``load``, ``statistics``, ``solve``, ``write`` and ``compile`` (:class:`StageTimes`; the in-memory
    path only).
    """
    from converters.hf import flax_to_hf_state, write_hf_files

    from catmerge_jax import atomic

    m = get_method(method)
    # Hub IDs resolve to their cached snapshot; data-free merges of any folder but bert/roberta/clip/blip
    # (folder_methods.IN_MEMORY_KINDS) stream tensor by tensor (catmerge_jax.folder_methods).
    from catmerge_jax import folder_methods

    base_dir = folder_methods.resolve_folder(base_dir)
    task_dirs = [folder_methods.resolve_folder(t) for t in task_dirs]
    if folder_methods.streams(m, base_dir):
        for f in exemplar_files or []:
            check_exemplar_path(f)
        return folder_methods.merge_folders_streamed(m, base_dir, task_dirs, out_dir, hparams=hparams, roles=roles,
                                                     overwrite=overwrite, progress=progress)
    if isinstance(roles, Mapping):  # role names of the CLI: a Flax kernel is (in, out) whichever name was given
        roles = {p: ("linear" if v == "linear_in_out" else v) for p, v in roles.items()}
    # Exemplar merges of decoder LLMs (Llama, Qwen, Gemma, ...) run block by block, out of core (catmerge_jax.llm).
    from catmerge_jax import llm

    if llm.runs_layerwise(m, base_dir):
        return llm.merge_folders_layerwise(m, base_dir, task_dirs, exemplar_files, out_dir, hparams=hparams,
                                           feature_scale=feature_scale, roles=roles, batch_size=batch_size,
                                           overwrite=overwrite, progress=progress)
    out = prepare_output(out_dir, overwrite=overwrite, inputs=[base_dir, *task_dirs], exemplars=exemplar_files or ())
    accept = atomic.dir_identity(out) if os.path.isdir(out) and not os.listdir(out) else None
    check_method_inputs(m, len(task_dirs), len(exemplar_files) if exemplar_files else None)
    for f in exemplar_files or []:
        check_exemplar_path(f)
    parent, name = os.path.dirname(out), os.path.basename(out)
    created: list[str] = []
    tmp = None
    try:
        # A Ctrl-C/SIGTERM that lands between mkdir and this try taking charge of the folder is raised only
        # once `tmp` and `created` are set, so the clean-up below removes them.
        with atomic.deferred_signals():
            try:
                created = _make_parents(parent)
                atomic.clean_stale_temp_dirs(parent)
                tmp = atomic.make_temp_dir(parent, name)
            except OSError as e:
                raise InputError(f"cannot write beside --out {out}: {e.strerror or e}") from None
        stages = stages if stages is not None else StageTimes()
        with stages.stage("load"):
            base, tasks = load_tasks(base_dir, task_dirs, progress=progress)
            # Exemplar files are always read when given, so a bad file is reported whatever the method.
            exemplars = [read_exemplars(f, base) for f in exemplar_files] if exemplar_files else None
        merged = merge_checkpoints(m, base, tasks, exemplars, hparams=hparams, feature_scale=feature_scale,
                                   roles=roles, batch_size=batch_size, progress=progress, stages=stages)
        with stages.stage("write"):
            state = flax_to_hf_state(merged, base.meta)
            check_finite_output(state, base.meta)
            try:
                write_hf_files(tmp, state, base.meta, base.folder)
            except OSError as e:
                raise InputError(f"cannot write {out}: {e}") from e
        publish_merged(tmp, out, overwrite=overwrite, accept=accept)
    except BaseException:
        if tmp is not None:
            atomic.remove_temp_dir(tmp)
        _remove_empty(created)
        raise
    return out


__all__ = ["Checkpoint", "Exemplars", "InputError", "load_checkpoint", "check_compatible", "read_text_exemplars",
           "read_image_exemplars", "read_exemplars", "load_tokenizer", "check_exemplar_path", "check_finite_output",
           "feature_params", "task_statistics",
           "resolve_hparams", "needs_exemplars", "check_method_inputs", "merge_checkpoints", "load_tasks", "prepare_output",
           "merge_folders", "EXTRA_PROVIDERS", "MAX_TOKENS", "TEXT_KINDS", "IMAGE_KINDS", "CLI_HPARAMS",
           "VL_KINDS", "read_vl_exemplars", "capture_rules"]
