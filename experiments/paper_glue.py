"""The paper's RoBERTa GLUE setting (Table 3): merge fine-tuned RoBERTa checkpoints with every registered method.

    python -m experiments.paper_glue --pretrained DIR --task cola=DIR --task sst2=DIR ... --data DIR
                                     [--exemplars 2] [--methods ...] [--out results.json] [--quiet]

Checkpoints are Hugging Face folders (``config.json`` + ``model.safetensors`` + tokenizer files): ``--pretrained``
the shared base (``RobertaModel``, e.g. roberta-base), each ``--task NAME=DIR`` a
``RobertaForSequenceClassification`` fine-tuned from it. Encoders are merged; each task keeps its own
classification head (``classifier.dense`` → tanh → ``classifier.out_proj`` on the first token, as
transformers' ``RobertaClassificationHead``; ``num_labels == 1`` is a regression head, STS-B).

Data (``--data``), one folder per task named like its ``--task`` NAME, JSON lines with ``sentence1``
(or ``sentence``), optional ``sentence2`` and ``label`` (int class, or float score for STS-B)::

    DATA/<name>/test.jsonl          scored (the paper reports GLUE validation sets: put them here)
    DATA/<name>/validation.jsonl    optional: alpha (and TIES's k) are chosen on it; without, defaults are used

Unlabeled exemplars for CAT/RegMean are the first ``--exemplars`` validation (else test) inputs.
Metrics as GLUE: Matthews correlation for CoLA, the mean of Pearson and Spearman correlations for STS-B,
accuracy otherwise. Prints Table 3's layout (rows: methods; columns: tasks and their average).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.protocol_common import method_task_table, score_all_methods

GLUE_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.3)
TIES_K = (0.1, 0.2, 0.3)


class GlueError(ValueError):
    """A missing or malformed checkpoint / data file (the message names it)."""


# ----------------------------------------------------------------------------------------------- metrics

def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(label)))


def matthews_corr(pred: np.ndarray, label: np.ndarray) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004; 0 when undefined, as scikit-learn)."""
    pred, label = np.asarray(pred), np.asarray(label)
    classes = np.union1d(pred, label)
    conf = np.zeros((len(classes), len(classes)), np.float64)
    np.add.at(conf, (np.searchsorted(classes, label), np.searchsorted(classes, pred)), 1.0)
    t, p = conf.sum(1), conf.sum(0)
    n, c = conf.sum(), np.trace(conf)
    den = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((c * n - t @ p) / den) if den > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), np.float64)
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = 0.5 * (start + end - 1) + 1.0
            start = end
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64) - np.mean(a), np.asarray(b, np.float64) - np.mean(b)
    den = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / den) if den > 0 else 0.0


def pearson_spearman(pred: np.ndarray, label: np.ndarray) -> float:
    """STS-B's score: the mean of the Pearson and Spearman correlations."""
    return 0.5 * (_pearson(pred, label) + _pearson(_ranks(pred), _ranks(label)))


METRICS = {"matthews": matthews_corr, "pearson_spearman": pearson_spearman, "accuracy": accuracy}


def metric_name(task: str, num_labels: int) -> str:
    key = task.lower().replace("-", "").replace("_", "")
    if key == "cola":
        return "matthews"
    if key == "stsb" or num_labels == 1:
        return "pearson_spearman"
    return "accuracy"


# ----------------------------------------------------------------------------------------------- models

def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise GlueError(f"missing data file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                if "label" not in row or not ({"sentence1", "sentence"} & set(row)):
                    raise GlueError(f"{path}:{i + 1}: need 'sentence1' (or 'sentence') and 'label', got {sorted(row)}")
                rows.append(row)
    if not rows:
        raise GlueError(f"{path}: no examples")
    return rows


def _texts(rows: Sequence[Mapping]) -> tuple[list[str], list[str] | None]:
    first = [r.get("sentence1", r.get("sentence")) for r in rows]
    second = [r["sentence2"] for r in rows] if all("sentence2" in r for r in rows) else None
    return first, second


def load_task_model(folder: str):
    """An HF folder → ``(head, model, encoder params)``; ``head`` holds the classifier as (in, out) matrices."""
    from catmerge_jax.models.bert import BertConfig, BertModel
    from converters.hf import load_hf_folder

    if not os.path.isdir(folder):
        raise GlueError(f"missing checkpoint folder: {folder}")
    kind, config, params, meta = load_hf_folder(folder)
    if kind not in ("roberta", "bert"):
        raise GlueError(f"{folder}: model_type {config.get('model_type')!r} is not a RoBERTa/BERT encoder")
    params = {k: v for k, v in params.items() if k != "pooler"}  # the classification head reads token 0 itself
    head = None
    if "classifier.out_proj.weight" in meta.aside:
        a = meta.aside
        head = {"dense_kernel": jnp.asarray(a["classifier.dense.weight"], jnp.float32).T,
                "dense_bias": jnp.asarray(a["classifier.dense.bias"], jnp.float32),
                "out_kernel": jnp.asarray(a["classifier.out_proj.weight"], jnp.float32).T,
                "out_bias": jnp.asarray(a["classifier.out_proj.bias"], jnp.float32)}
    model = BertModel(BertConfig.from_hf_config(config), add_pooler=False)
    return head, model, jax.tree.map(jnp.asarray, params)


def _logits_impl(model, params, head, ids, mask):
    x = model.apply({"params": params}, ids, mask).last_hidden_state[:, 0]
    h = jnp.tanh(x @ head["dense_kernel"] + head["dense_bias"])
    return h @ head["out_kernel"] + head["out_bias"]


_logits = jax.jit(_logits_impl, static_argnums=0)


def encode(tokenizer: Any, rows: Sequence[Mapping], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    first, second = _texts(rows)
    enc = tokenizer(first, second, padding="longest", truncation=True, max_length=max_len, return_tensors="np")
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


def predict_logits(model: Any, params: Any, head: Mapping, tokenizer: Any, rows: Sequence[Mapping], *,
                   max_len: int = 128, batch: int = 32) -> np.ndarray:
    out = []
    for s in range(0, len(rows), batch):
        ids, mask = encode(tokenizer, rows[s:s + batch], max_len)
        out.append(np.asarray(_logits(model, params, head, jnp.asarray(ids), jnp.asarray(mask))))
    return np.concatenate(out)


def score_task(model, params, head, tokenizer, rows, metric: str, max_len: int) -> float:
    logits = predict_logits(model, params, head, tokenizer, rows, max_len=max_len)
    labels = np.asarray([r["label"] for r in rows])
    pred = logits[:, 0] if logits.shape[1] == 1 else logits.argmax(-1)
    return METRICS[metric](pred, labels)


def table(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str], title: str = "score (×100)") -> str:
    """Table 3's layout: one row per method, one column per task, then the average."""
    return method_task_table(rows, tasks, title)


def run(pretrained: str, task_folders: Mapping[str, str], data: str, *, exemplars: int = 2,
        methods: Sequence[str] | None = None, alphas: Sequence[float] = ALPHAS, ties_k: Sequence[float] = TIES_K,
        max_len: int = 128, quiet: bool = False, cat_points: Sequence[dict] | None = None) -> dict:
    """Load, merge with every method, score; returns ``{"rows": {method: {task: metric}}, "metrics": ...}``."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from catmerge_jax.capture import capture_stats

    _, model, w0 = load_task_model(pretrained)
    tokenizer = AutoTokenizer.from_pretrained(pretrained, local_files_only=True)
    tasks = list(task_folders)
    finetuned, heads, data_rows, metrics = [], {}, {}, {}
    for t in tqdm(tasks, desc="loading", disable=quiet):
        head, _, params = load_task_model(task_folders[t])
        if head is None:
            raise GlueError(f"{task_folders[t]}: no classifier.* weights (expected RobertaForSequenceClassification)")
        finetuned.append(params)
        heads[t] = head
        folder = os.path.join(data, t)
        val = os.path.join(folder, "validation.jsonl")
        data_rows[t] = {"test": read_jsonl(os.path.join(folder, "test.jsonl")),
                        "val": read_jsonl(val) if os.path.exists(val) else None}
        metrics[t] = metric_name(t, int(np.shape(head["out_bias"])[0]))
    has_val = all(data_rows[t]["val"] is not None for t in tasks)

    def score(params, split):
        return {t: score_task(model, params, heads[t], tokenizer, data_rows[t][split], metrics[t], max_len)
                for t in tasks}

    stats = []
    for t, ft in zip(tasks, finetuned):
        source = data_rows[t]["val"] or data_rows[t]["test"]
        ids, mask = encode(tokenizer, source[:exemplars], max_len)
        stats.append(capture_stats(model, ft, jnp.asarray(ids), jnp.asarray(mask), token_mask=mask.astype(bool)))

    # "pretrained": the base encoder under each task's own (fine-tuned) head.
    rows, details = score_all_methods(w0, finetuned, stats, score, tasks, methods=methods, alphas=alphas,
                                      ties_k=ties_k, has_val=has_val, quiet=quiet, cat_points=cat_points)
    return {"rows": rows, "details": details, "tasks": tasks, "metrics": metrics, "selected_on_validation": has_val}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.paper_glue", description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--task", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--data", required=True)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--exemplars", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from catmerge_jax.errors import CatMergeError
    from converters.hf import ConversionError

    try:
        from experiments.protocol_common import task_folders

        ordered = task_folders(args.task, GLUE_ORDER, GlueError)
        res = run(args.pretrained, ordered, args.data, exemplars=args.exemplars, methods=args.methods,
                  quiet=args.quiet)
    except (GlueError, ConversionError, CatMergeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(res["rows"], res["tasks"], "Table 3 layout: GLUE score ×100 (CoLA: Matthews, STS-B: "
                "(Pearson+Spearman)/2, else accuracy)" + ("" if res["selected_on_validation"] else
                                                          " — default hyperparameters (no validation data)")))
    if args.out:
        from experiments.benchmark.finetune import write_json_atomic

        write_json_atomic(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
