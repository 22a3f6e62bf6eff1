"""The paper's vision-language setting (Table 4): merge fine-tuned BLIP checkpoints with every registered method.

    python -m experiments.paper_blip --pretrained DIR --task coco_caption=DIR --task flickr30k=DIR \\
        --task textcaps=DIR --task okvqa=DIR --task textvqa=DIR --task scienceqa=DIR --data DIR \\
        [--exemplars 3] [--methods ...] [--num-beams 3] [--max-length 20] [--out results.json] [--quiet]

Checkpoints are Hugging Face BLIP folders (``config.json`` + safetensors + tokenizer files +
``preprocessor_config.json``): ``--pretrained`` the shared base (``BlipForQuestionAnswering``, e.g. blip-vqa-base)
and each ``--task NAME=DIR`` the same architecture fine-tuned on that task (all parts: vision encoder, text encoder,
text decoder). Every task is answered by generation (:func:`catmerge_jax.models.blip.generate`, beam search with
``--num-beams`` beams by default, up to ``--max-length`` decoder tokens): for the caption tasks the annotation's
``prompt`` (e.g. ``"a picture of"``) is the question; for the QA tasks its ``question``.

Data (``--data``), one folder per task named like its ``--task`` NAME::

    DATA/<name>/annotations.jsonl   scored; one JSON object per line:
                                    {"image": "images/0001.jpg", "prompt": "a picture of",
                                     "captions": ["a dog runs on the grass", ...]}        caption tasks
                                    {"image": "images/0002.jpg", "question": "what color is the bus?",
                                     "answers": ["red", "red", "dark red", ...]}          QA tasks
                                    (ScienceQA: one answer, the correct choice's text; fold the choices into the
                                    question, e.g. "question? choices: a, b, c")
    DATA/<name>/validation.jsonl    optional, same format: alpha (and TIES's k, CAT's λ and c) are chosen on it;
                                    without it every method keeps its defaults
    DATA/<name>/exemplars.jsonl     unlabeled exemplars for CAT / RegMean / Fisher: {"image": ..., "text": ...}
                                    per line (the ``catmerge merge`` exemplar format); the first ``--exemplars``
                                    lines are used

Image paths are relative to the JSON file; images are preprocessed with the pretrained folder's
``preprocessor_config.json`` (or ``.npy`` files of preprocessed pixels). Metrics
(:mod:`experiments.vl_metrics`): CIDEr-D for COCO Caption, Flickr30k and TextCaps (a task whose annotations carry
``captions``), VQA accuracy for OKVQA, TextVQA and ScienceQA (``answers``). Prints Table 4's layout (rows: methods;
columns: tasks and their average; CIDEr shown ×100 like the accuracies, as papers report it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from experiments.protocol_common import method_task_table, score_all_methods
from experiments.vl_metrics import cider_d, vqa_accuracy

TABLE4_ORDER = ("coco_caption", "flickr30k", "textcaps", "okvqa", "textvqa", "scienceqa")
ALPHAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
TIES_K = (0.1, 0.2, 0.3)


class BlipProtocolError(ValueError):
    """A missing or malformed checkpoint / data file (the message names it)."""


def read_annotations(path: str) -> tuple[list[dict], str]:
    """Rows of an ``annotations.jsonl`` / ``validation.jsonl`` and the task's metric (``"cider"`` or ``"vqa"``)."""
    if not os.path.exists(path):
        raise BlipProtocolError(f"missing data file: {path}")
    rows, kinds = [], set()
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("image"), str):
                raise BlipProtocolError(f"{path}:{i + 1}: need an 'image' path")
            if "captions" in row:
                kinds.add("cider")
                text_key, refs_key = "prompt", "captions"
            elif "answers" in row:
                kinds.add("vqa")
                text_key, refs_key = "question", "answers"
            else:
                raise BlipProtocolError(f"{path}:{i + 1}: need 'captions' (caption task) or 'answers' (QA task)")
            refs = row[refs_key]
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise BlipProtocolError(f"{path}:{i + 1}: '{refs_key}' must be a non-empty list of strings")
            row = dict(row, text=row.get(text_key, row.get("question", row.get("prompt", ""))), refs=refs,
                       image=os.path.join(os.path.dirname(os.path.abspath(path)), row["image"]))
            rows.append(row)
    if not rows:
        raise BlipProtocolError(f"{path}: no examples")
    if len(kinds) != 1:
        raise BlipProtocolError(f"{path}: mixes caption rows ('captions') and QA rows ('answers')")
    return rows, kinds.pop()


class _Task:
    """One task's evaluation inputs, preprocessed once: pixels, tokenized text (padded to a multiple of 16)."""

    def __init__(self, rows, metric, settings, tokenizer, batch_size):
        from converters.blip import load_pixels

        self.rows, self.metric, self.batch_size = rows, metric, batch_size
        self.pixels = np.stack([load_pixels(r["image"], settings) for r in rows])
        enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=64,
                        pad_to_multiple_of=16, return_tensors="np")
        self.ids = np.asarray(enc["input_ids"], np.int32)
        self.mask = np.asarray(enc["attention_mask"], np.int32)


def generate_texts(model, params, task: _Task, tokenizer, *, num_beams: int, max_length: int) -> list[str]:
    """Generated answers / captions for every row of ``task`` (decoder prompt and special tokens removed)."""
    from catmerge_jax.models.blip import BlipForQuestionAnswering, generate

    out = []
    n, bs = len(task.rows), task.batch_size
    for s in range(0, n, bs):
        sl = slice(s, min(s + bs, n))
        pixels, ids, mask = task.pixels[sl], task.ids[sl], task.mask[sl]
        pad = bs - pixels.shape[0]
        if pad:  # one compiled shape per task: pad the last batch with copies of its first row
            pixels, ids, mask = (np.concatenate([x, np.repeat(x[:1], pad, 0)]) for x in (pixels, ids, mask))
        if isinstance(model, BlipForQuestionAnswering):
            seqs, start = generate(model, params, pixels, ids, mask, max_length=max_length, num_beams=num_beams), 1
        else:  # captioning model: the prompt (without its [SEP]) starts the decoder
            lens = mask.sum(1)
            if len(set(lens.tolist())) != 1:
                raise BlipProtocolError("captioning-model prompts of one batch must have the same length")
            width = int(lens[0])
            seqs = generate(model, params, pixels, ids[:, :width], mask[:, :width], max_length=max_length,
                            num_beams=num_beams)
            start = width - 1
        for row in seqs[: sl.stop - sl.start]:
            out.append(tokenizer.decode(row[start:].tolist(), skip_special_tokens=True).strip())
    return out


def score_texts(metric: str, texts: Sequence[str], rows: Sequence[Mapping]) -> float:
    """CIDEr-D of the captions (×1, as coco-caption reports it) or the mean VQA accuracy of the answers."""
    if metric == "cider":
        return cider_d(texts, [r["refs"] for r in rows])[0]
    return float(np.mean([vqa_accuracy(t, r["refs"]) for t, r in zip(texts, rows)]))


def table(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str], title: str = "score (×100)") -> str:
    """Table 4's layout: one row per method, one column per task, then the average."""
    return method_task_table(rows, tasks, title)


def run(pretrained: str, task_folders: Mapping[str, str], data: str, *, exemplars: int = 3,
        methods: Sequence[str] | None = None, alphas: Sequence[float] = ALPHAS, ties_k: Sequence[float] = TIES_K,
        num_beams: int = 3, max_length: int = 20, batch_size: int = 8, quiet: bool = False,
        cat_points: Sequence[dict] | None = None) -> dict:
    """Load, capture, merge with every method, generate, score; returns ``{"rows": {method: {task: score}}, ...}``."""
    from tqdm.auto import tqdm

    from catmerge_jax import pipeline
    from catmerge_jax.capture import make_capture
    from converters.blip import image_settings

    if not os.path.isdir(pretrained):
        raise BlipProtocolError(f"missing checkpoint folder: {pretrained}")
    base = pipeline.load_checkpoint(pretrained)
    if base.kind not in pipeline.VL_KINDS:
        raise BlipProtocolError(f"{pretrained} is a {base.kind} checkpoint, not BLIP")
    model = base.model()
    tokenizer = pipeline.load_tokenizer(pretrained)
    settings = image_settings(pretrained, model.config.vision.image_size)
    tasks = list(task_folders)
    finetuned, splits, metrics, stats = [], {}, {}, []
    capture = make_capture(model, rules=pipeline.capture_rules(base.kind))
    for t in tqdm(tasks, desc="loading", disable=quiet):
        if not os.path.isdir(task_folders[t]):
            raise BlipProtocolError(f"missing checkpoint folder: {task_folders[t]}")
        ckpt = pipeline.load_checkpoint(task_folders[t])
        pipeline.check_compatible(base, ckpt)
        finetuned.append(ckpt.params)
        folder = os.path.join(data, t)
        test_rows, metrics[t] = read_annotations(os.path.join(folder, "annotations.jsonl"))
        val_path = os.path.join(folder, "validation.jsonl")
        splits[t] = {"test": _Task(test_rows, metrics[t], settings, tokenizer, batch_size)}
        if os.path.exists(val_path):
            splits[t]["val"] = _Task(read_annotations(val_path)[0], metrics[t], settings, tokenizer, batch_size)
        ex_path = os.path.join(folder, "exemplars.jsonl")
        if not os.path.exists(ex_path):
            raise BlipProtocolError(f"missing exemplar file: {ex_path}")
        ex = pipeline.read_exemplars(ex_path, base)
        take = slice(0, exemplars)
        stats.append(pipeline.task_statistics(capture, ckpt.params, pipeline.Exemplars(
            tuple(x[take] for x in ex.inputs), ex.token_mask[take])))
    has_val = all("val" in splits[t] for t in tasks)

    def score(params, split):
        params = jax.tree.map(np.asarray, params)
        return {t: score_texts(metrics[t], generate_texts(model, params, splits[t][split], tokenizer,
                                                          num_beams=num_beams, max_length=max_length),
                               splits[t][split].rows) for t in tasks}

    rows, details = score_all_methods(base.params, finetuned, stats, score, tasks, methods=methods, alphas=alphas,
                                      ties_k=ties_k, has_val=has_val, quiet=quiet, cat_points=cat_points)
    return {"rows": rows, "details": details, "tasks": tasks, "metrics": metrics, "selected_on_validation": has_val}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.paper_blip", description=__doc__.split("\n")[0])
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--task", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--data", required=True)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--exemplars", type=int, default=3)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from catmerge_jax.errors import CatMergeError
    from converters.hf import ConversionError

    try:
        from experiments.protocol_common import task_folders

        ordered = task_folders(args.task, TABLE4_ORDER, BlipProtocolError)
        res = run(args.pretrained, ordered, args.data, exemplars=args.exemplars, methods=args.methods,
                  num_beams=args.num_beams, max_length=args.max_length, batch_size=args.batch_size,
                  quiet=args.quiet)
    except (BlipProtocolError, ConversionError, CatMergeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    title = ("Table 4 layout: CIDEr-D ×100 (caption tasks) and VQA accuracy ×100 (QA tasks)"
             + ("" if res["selected_on_validation"] else " — default hyperparameters (no validation data)"))
    print(table(res["rows"], res["tasks"], title))
    if args.out:
        from experiments.benchmark.finetune import write_json_atomic

        write_json_atomic(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
