"""The paper's 8-task CLIP setting (Table 1): merge the task-vectors checkpoints with every registered method.

    python -m experiments.paper_clip8 --checkpoints DIR --data DIR [--heads DIR] [--exemplars 2]
                                      [--tasks SUN397 Cars ...] [--out results.json] [--quiet]

Checkpoints (the task-vectors layout of Ilharco et al., as released for ViT-B/32, ViT-B/16, ViT-L/14)::

    DIR/zeroshot.pt                 torch.save of the whole pretrained ImageEncoder (open_clip visual tower)
    DIR/<Task>/finetuned.pt         the same, fine-tuned on <Task>
    HEADS/head_<Task>.pt            the task's ClassificationHead (weight (classes, d), bias; inputs L2-normalized)

They are read without torch or open_clip (``converters.pickled_checkpoints``, a restricted unpickler).
``--heads`` defaults to ``--checkpoints``.

Data (``--data``), one folder per task, images already preprocessed as the CLIP model expects (resized,
center-cropped, normalized with CLIP's mean/std), channels last::

    DATA/<Task>/test_images.npy     float32 (N, H, W, 3)
    DATA/<Task>/test_labels.npy     int (N,)
    DATA/<Task>/val_images.npy      optional: with val_labels.npy, alpha (and TIES's k) are chosen on it;
    DATA/<Task>/val_labels.npy      without, every method runs at its default hyperparameters
    DATA/<Task>/exemplars.npy       optional float32 (E, H, W, 3) unlabeled exemplars for CAT/RegMean; default: the
                                    first --exemplars validation images (test images if there is no validation set)

Prints Table 1's layout (accuracy %, rows: methods; columns: the tasks and their average) and writes a JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.protocol_common import method_task_table, score_all_methods

TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.3)
TIES_K = (0.1, 0.2, 0.3)


class Clip8Error(ValueError):
    """A missing or malformed checkpoint / data file (the message names it)."""


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise Clip8Error(f"missing {what}: {path}")
    return path


def load_encoder(path: str, config: Any = None):
    """A task-vectors checkpoint → ``(config, flax params)`` of the open_clip-layout vision tower."""
    from converters.open_clip import open_clip_to_flax
    from converters.pickled_checkpoints import load_task_vectors_checkpoint

    state = load_task_vectors_checkpoint(_require(path, "checkpoint"))
    config, params, _ = open_clip_to_flax(state, config=config)
    return config, jax.tree.map(jnp.asarray, params)


def load_head(path: str) -> dict:
    """``head_<Task>.pt`` → ``{"weight": (classes, d), "bias": (classes,)}``."""
    from converters.pickled_checkpoints import load_task_vectors_checkpoint

    state = load_task_vectors_checkpoint(_require(path, "classification head"))
    weight = next((v for k, v in state.items() if k.endswith("weight")), None)
    if weight is None or np.ndim(weight) != 2:
        raise Clip8Error(f"{path}: expected a 2-D 'weight' (classes, d), found keys {sorted(state)}")
    bias = next((v for k, v in state.items() if k.endswith("bias")), np.zeros(weight.shape[0], np.float32))
    return {"weight": jnp.asarray(weight, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


def load_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    images, labels = os.path.join(folder, f"{split}_images.npy"), os.path.join(folder, f"{split}_labels.npy")
    if not os.path.exists(images):
        if split == "test":
            raise Clip8Error(f"missing test images: {images}")
        return None
    x = np.load(images, mmap_mode="r")
    y = np.load(_require(labels, f"{split} labels"))
    if x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y):
        raise Clip8Error(f"{images}: expected float32 (N, H, W, 3) with N = len({os.path.basename(labels)}), got "
                         f"{x.shape} and {y.shape}")
    return x, np.asarray(y, np.int64)


def classify(model: Any, params: Any, head: Mapping[str, jax.Array], images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Predicted classes: the head on the L2-normalized projected image embedding (the task-vectors head)."""

    preds = []
    for s in range(0, len(images), batch):
        emb = _embed(model, params, jnp.asarray(images[s:s + batch], jnp.float32))
        logits = (emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)) @ head["weight"].T + head["bias"]
        preds.append(np.asarray(logits.argmax(-1)))
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def _embed_impl(model, params, pixels):
    return model.apply({"params": params}, pixels).pooled


_embed = jax.jit(_embed_impl, static_argnums=0)


def table(results: Mapping[str, Mapping[str, float]], tasks: Sequence[str], title: str = "accuracy (%)") -> str:
    """Table 1's layout: one row per method, one column per task, then the average."""
    return method_task_table(results, tasks, title)


def run(checkpoints: str, data: str, heads_dir: str | None = None, *, tasks: Sequence[str] = TASKS,
        exemplars: int = 2, methods: Sequence[str] | None = None, alphas: Sequence[float] = ALPHAS,
        ties_k: Sequence[float] = TIES_K, quiet: bool = False, cat_points: Sequence[dict] | None = None) -> dict:
    """Load everything, merge with every method, evaluate; returns ``{"rows": {method: {task: acc}}, ...}``."""
    from tqdm.auto import tqdm

    from catmerge_jax.capture import capture_stats
    from catmerge_jax.models.clip_vit import ClipVisionModel

    heads_dir = heads_dir or checkpoints
    config, w0 = load_encoder(os.path.join(checkpoints, "zeroshot.pt"))
    model = ClipVisionModel(config, layout="open_clip", with_projection=config.output_dim is not None)
    finetuned, heads, splits = [], {}, {}
    for t in tqdm(tasks, desc="loading", disable=quiet):
        finetuned.append(load_encoder(os.path.join(checkpoints, t, "finetuned.pt"), config)[1])
        heads[t] = load_head(os.path.join(heads_dir, f"head_{t}.pt"))
        folder = _require(os.path.join(data, t), f"data folder of {t}")
        splits[t] = {"val": load_split(folder, "val"), "test": load_split(folder, "test")}
    has_val = all(splits[t]["val"] is not None for t in tasks)

    def score(params, split):
        return {t: float(np.mean(classify(model, params, heads[t], splits[t][split][0]) == splits[t][split][1]))
                for t in tasks}

    stats = []
    for t, ft in zip(tasks, finetuned):
        ex_path = os.path.join(data, t, "exemplars.npy")
        source = splits[t]["val"] or splits[t]["test"]
        ex = np.load(ex_path) if os.path.exists(ex_path) else np.asarray(source[0][:exemplars])
        stats.append(capture_stats(model, ft, jnp.asarray(ex, jnp.float32), batch_size=8))

    rows, details = score_all_methods(w0, finetuned, stats, score, tasks, methods=methods, alphas=alphas,
                                      ties_k=ties_k, has_val=has_val, quiet=quiet, cat_points=cat_points,
                                      roles=model.param_roles())
    return {"rows": rows, "details": details, "tasks": list(tasks), "selected_on_validation": has_val}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.paper_clip8", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--heads", default=None)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--exemplars", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from catmerge_jax.errors import CatMergeError
    from converters.hf import ConversionError

    try:
        res = run(args.checkpoints, args.data, args.heads, tasks=args.tasks, exemplars=args.exemplars,
                  methods=args.methods, quiet=args.quiet)
    except (Clip8Error, ConversionError, CatMergeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(res["rows"], res["tasks"], "Table 1 layout: test accuracy (%)"
                + ("" if res["selected_on_validation"] else " — default hyperparameters (no validation data)")))
    if args.out:
        from experiments.benchmark.finetune import write_json_atomic

        write_json_atomic(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
