"""The offline merging benchmark in one command::

    python -m experiments.benchmark.run [--quick] [--out experiments/results] [--cache experiments/cache] [--quiet]

Real all-MiniLM-L6-v2 (our Flax BERT) fine-tuned on six real text classification tasks (see
:mod:`experiments.benchmark.tasks`), merged with every registered method; each task is evaluated with its own
head on the merged backbone. Hyperparameters (alpha for every method whose alpha scales the merged task vector,
plus TIES's k) are chosen on validation only; test accuracy is reported per task, with the average, the
normalized accuracy (merged / individual) and the std of the drops (paper Table 10). Then the paper's analyses
(:mod:`experiments.benchmark.analyses`) and PNG plots. Fine-tuned checkpoints and a manifest are cached under
``--cache`` and reused by the next run with the same settings.

Outputs (``--out``): ``results.json`` (everything), ``RESULTS.md`` (tables), ``*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import catmerge_jax as cm
from experiments.benchmark import analyses, plots
from experiments.benchmark.evaluate import Evaluator, cat_knob_points, load_all_methods, summarize, tune_method
from experiments.benchmark.finetune import (Backbone, FinetuneConfig, Tokens, bucket_length, finetune,
                                            head_logits, load_backbone, load_task_checkpoint, make_optimizer,
                                            make_train_step, mean_pool, save_task_checkpoint, tokenize,
                                            write_json_atomic)
from experiments.benchmark.tasks import DEFAULT_TASKS, Sizes, TextTask, load_tasks

PyTree = Any


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Every setting of a benchmark run (hashed into the checkpoint cache key where it matters)."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    sizes: Sizes = Sizes(train=1000, val=60, test=250)
    finetune: FinetuneConfig = FinetuneConfig(steps=100, batch_size=16, max_len=64)
    exemplars: int = 3  # unlabeled exemplars per task for CAT / RegMean statistics (paper: 1–3)
    lam: float = 5.0
    c: int = 3
    alphas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3)
    ties_k: tuple[float, ...] = (0.1, 0.2, 0.3)
    curve_alphas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 1.0, 1.3)
    exemplar_sweep: tuple[int, ...] = (1, 2, 3, 5)
    lam_sweep: tuple[float, ...] = (0.0, 0.5, 1.0, 5.0, 20.0)
    c_sweep: tuple[int, ...] = (1, 2, 3, 5, 8)
    # analyses.cat_table options
    variants: tuple[str, ...] = ("joint", "rescale_norm", "gated", "normalize_by_count")
    # (label, path regex): CAT's linear projection only on these leaves (scale/shift masks everywhere)
    layer_groups: tuple[tuple[str, str], ...] = (
        ("layers 0–1", r"encoder/layer/[01]/"), ("layers 2–3", r"encoder/layer/[23]/"),
        ("layers 4–5", r"encoder/layer/[45]/"), ("attention (q, k, v, out)", r"/attention/"),
        ("MLP (fc1, fc2)", r"layer/\d+/(intermediate|output)/dense/"))
    conflict_tasks: tuple[int, int] = (0, 1)
    conflict_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    fisher_examples: int = 16
    methods: tuple[str, ...] | None = None  # None: every registered method
    seed: int = 0           # data split and exemplar choice
    finetune_seed: int = 0  # fine-tuning randomness (batch order, head init); --seeds runs several
    # "cat_trim+X": CAT's trimmed task vectors (λ, c as above) merged by X, to see whether trimming helps X
    cat_trim_combos: tuple[str, ...] = ("tsv", "iso_c", "iso_cts")
    # AdaMerging rows: entropy minimization on the unlabeled validation inputs of every task
    adamerging: bool = True
    adamerging_steps: int = 100
    adamerging_batch: int = 8  # validation sequences per task and step (cycled)


QUICK = BenchConfig(
    sizes=Sizes(train=160, val=40, test=60),
    finetune=FinetuneConfig(steps=20, batch_size=8, max_len=32),
    alphas=(0.3, 1.0),
    ties_k=(0.2,),
    curve_alphas=(0.3, 1.0),
    lam=5.0,
    exemplar_sweep=(1, 3),
    lam_sweep=(0.0, 5.0),
    c_sweep=(3,),
    variants=("joint",),
    layer_groups=(("attention (q, k, v, out)", r"/attention/"),),
    conflict_grid=(0.0, 1.0),
    fisher_examples=8,
)


# ----------------------------------------------------------------------------------------------- small helpers

class Stage:
    """A tqdm bar over the run's stages (silenced by ``quiet``), plus wall-clock timings per stage."""

    def __init__(self, total: int, quiet: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="benchmark", unit="step", disable=quiet, dynamic_ncols=True)
        self.times: dict[str, float] = {}
        self._name, self._start = None, time.perf_counter()

    def begin(self, name: str) -> None:
        self._close()
        self._name, self._start = name, time.perf_counter()
        self.bar.set_postfix_str(name)

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def _close(self) -> None:
        if self._name is not None:
            self.times[self._name] = self.times.get(self._name, 0.0) + time.perf_counter() - self._start

    def finish(self) -> dict[str, float]:
        self._close()
        self._name = None
        self.bar.close()
        return self.times


def _cache_key(backbone: Backbone, task: TextTask, cfg: BenchConfig) -> str:
    blob = json.dumps({"folder": str(backbone.folder), "task": task.name, "classes": task.classes,
                       "train": list(task.train.texts), "sizes": dataclasses.asdict(cfg.sizes),
                       "finetune": dataclasses.asdict(cfg.finetune), "seed": cfg.seed,
                       "finetune_seed": cfg.finetune_seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def exemplar_tokens(tokens: Tokens, count: int) -> Tokens:
    """The first ``count`` training examples of a task (used unlabeled), trimmed to their longest length."""
    part = tokens.take(np.arange(min(count, len(tokens.labels))))
    width = bucket_length(part.lengths, tokens.ids.shape[1])
    return Tokens(part.ids[:, :width], part.mask[:, :width], part.labels, part.lengths)


def pad_rows(stats: PyTree, rows: int) -> PyTree:
    """Pad every row-form linear statistic with zero rows to ``rows`` (Gram form once ``rows`` ≥ its width).

    Zero rows add nothing to ``XᵀX``, so CAT's result is unchanged; the point is one array shape for every
    exemplar count, so CAT's jitted solvers compile once instead of once per sweep point.
    """
    from catmerge_jax.stats import LeafStats, is_leaf_stats

    def pad(s):
        if not isinstance(s, LeafStats) or s.rows is None:
            return s
        r = np.asarray(s.rows)
        if rows >= r.shape[1]:
            return s.to_gram()
        return dataclasses.replace(s, rows=np.concatenate([r, np.zeros((rows - r.shape[0], r.shape[1]), r.dtype)]))

    return jax.tree.map(pad, stats, is_leaf=is_leaf_stats)


def exemplar_stats(model: Any, finetuned: Sequence[PyTree], train: Sequence[Tokens], count: int,
                   pad_to: int) -> list[PyTree]:
    """Each task's row statistics on its first ``count`` training examples (unlabeled) under its own model,
    padded to ``pad_to`` rows (:func:`pad_rows`: one shape for every task and exemplar count)."""
    from catmerge_jax.capture import capture_stats

    out = []
    for tokens, ft in zip(train, finetuned):
        ex = exemplar_tokens(tokens, count)
        s = capture_stats(model, ft, jnp.asarray(ex.ids), jnp.asarray(ex.mask), token_mask=ex.mask.astype(bool),
                          form="rows", batch_size=None)
        out.append(pad_rows(s, pad_to))
    return out


@functools.partial(jax.jit, static_argnames=("model", "transform"))
def _grad_stat_chunk(model: Any, transform: str, params: PyTree, head: PyTree, class_mask: jax.Array,
                     ids: jax.Array, mask: jax.Array, labels: jax.Array) -> PyTree:
    def loss(p, i, m, y):
        feats = mean_pool(model.apply({"params": p}, i[None], m[None]).last_hidden_state, m[None])
        logits = jnp.where(class_mask, head_logits(head, feats), -1e9)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[None]).mean()

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0))(params, ids, mask, labels)
    op = jnp.square if transform == "square" else jnp.abs
    return jax.tree.map(lambda g: op(g).sum(0), grads)


def per_example_grad_stat(model: Any, params: PyTree, head: PyTree, examples: Tokens, transform: str,
                          max_classes: int, chunk: int = 8) -> PyTree:
    """``mean_n op(∇ loss_n)`` over labelled examples (``op``: square → diagonal Fisher, abs → TATR's |grad|).

    The same computation as ``catmerge_jax.methods.fisher.diagonal_fisher`` / ``tatr.mean_abs_gradient``, written
    as one jitted function of (params, head, examples) with heads padded to ``max_classes``: every task then
    shares one compilation instead of one per task.
    """
    c = head["kernel"].shape[1]
    pad = max_classes - c
    head = {"kernel": jnp.pad(head["kernel"], ((0, 0), (0, pad))), "bias": jnp.pad(head["bias"], (0, pad))}
    class_mask = jnp.arange(max_classes) < c
    n = len(examples.labels)
    total = None
    for s in range(0, n, chunk):
        idx = np.arange(s, s + chunk) % n  # a fixed chunk shape: wrapped rows get an all-zero token mask,
        part = examples.take(idx)           # so their pooled features, hence their gradients, are exactly 0
        valid = (np.arange(s, s + chunk) < n)[:, None]
        g = _grad_stat_chunk(model, transform, params, head, class_mask, jnp.asarray(part.ids),
                             jnp.asarray(part.mask * valid), jnp.asarray(part.labels))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return jax.tree.map(lambda x: x / n, total)


# ----------------------------------------------------------------------------------------------- AdaMerging rows

def adamerging_inputs(model: Any, heads: Mapping[str, PyTree], val: Mapping[str, Tokens], per_task: int):
    """``(logits_fn, data)`` for :func:`catmerge_jax.adamerging`: every task's UNLABELED validation inputs through
    the merged backbone and that task's own head (labels are never read). ``data(step)`` cycles through each
    task's validation set ``per_task`` sequences at a time (fixed shapes: one compilation)."""
    names = list(val)

    def logits_fn(params, batch):
        # one forward over every task's rows (one graph to compile), then each task's head on its own rows
        ids, mask = batch
        pooled = mean_pool(model.apply({"params": params}, ids, mask).last_hidden_state, mask)
        return [head_logits(heads[n], pooled[i * per_task:(i + 1) * per_task]) for i, n in enumerate(names)]

    def data(step):
        idx = [(step * per_task + np.arange(per_task)) % len(val[n].labels) for n in names]
        return (jnp.asarray(np.concatenate([val[n].ids[i] for n, i in zip(names, idx)])),
                jnp.asarray(np.concatenate([val[n].mask[i] for n, i in zip(names, idx)])))

    return logits_fn, data


def run_adamerging(label: str, w0: PyTree, task_vectors: Sequence[PyTree], inputs, score, cfg: "BenchConfig") -> dict:
    """One AdaMerging row (layer-wise coefficients, the library's defaults except ``steps``)."""
    logits_fn, data = inputs
    hp = {"granularity": "layer", "init": 0.3, "steps": cfg.adamerging_steps, "learning_rate": 1e-3}
    t0 = time.perf_counter()
    result = cm.adamerging(w0, task_vectors, logits_fn, data, **hp)
    params = jax.block_until_ready(result.params)
    seconds = time.perf_counter() - t0
    coef = np.concatenate([np.ravel(np.asarray(c)) for c in jax.tree.leaves(result.coefficients)])
    return {"hparams": hp, "val": score(params, "val"), "test": score(params, "test"), "alpha_is_scale": False,
            "merge_seconds": seconds, "merges": 1, "entropy_first_last": [float(result.losses[0]),
                                                                          float(result.losses[-1])],
            "coefficients_mean_min_max": [float(coef.mean()), float(coef.min()), float(coef.max())],
            "data": f"unlabeled validation inputs of all {len(cfg.tasks)} tasks, {cfg.adamerging_batch} per task "
                    f"per step, cycled; labels unused; test never seen",
            "description": f"{label} (entropy minimization, layer-wise coefficients)"}


# ----------------------------------------------------------------------------------------------- the run

def run_benchmark(backbone: Backbone, tasks: Sequence[TextTask], cfg: BenchConfig, *, out_dir: str,
                  cache_dir: str, quiet: bool = False, analyses_on: bool = True) -> dict:
    """Fine-tune (or reuse), merge with every method, run the analyses, write results. Returns the results dict."""
    t_start = time.perf_counter()
    from catmerge_jax.methods.registry import get_method

    names = [t.name for t in tasks]
    methods = list(cfg.methods) if cfg.methods is not None else load_all_methods()
    if cfg.methods is not None:
        load_all_methods()
    n_analysis = (len(cfg.exemplar_sweep) + len(cfg.lam_sweep) + len(cfg.c_sweep) + len(cfg.variants)
                  + len(cfg.layer_groups) + 7 - 3) if analyses_on else 0
    n_rows = len(methods) + ("cat" in methods) + len(cfg.cat_trim_combos) + 2 * cfg.adamerging
    stage = Stage(total=len(tasks) * cfg.finetune.steps + len(tasks) + n_rows + n_analysis + 1, quiet=quiet)
    model, w0 = backbone.model, backbone.params
    ml = cfg.finetune.max_len

    tok = {t.name: {s: tokenize(backbone.tokenizer, getattr(t, s).texts, getattr(t, s).labels, ml)
                    for s in ("train", "val", "test")} for t in tasks}

    # 1. fine-tune each task (or load from the cache).
    stage.begin("finetune")
    finetuned, heads, task_info = [], {}, {}
    ft_cfg = dataclasses.replace(cfg.finetune, seed=cfg.finetune_seed)
    max_classes = max(t.num_classes for t in tasks)
    train_step = None  # built on first use, shared by every task (one compilation per sequence bucket)
    for t in tasks:
        key = _cache_key(backbone, t, cfg)
        ckpt = os.path.join(cache_dir, "finetuned", f"{t.name}-{key}.npz")
        info_path = ckpt[:-4] + ".json"
        if os.path.exists(ckpt) and os.path.exists(info_path):
            bb, head = load_task_checkpoint(ckpt)
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
            info["cached"] = True
            stage.step(cfg.finetune.steps)
        else:
            start = time.perf_counter()
            if train_step is None:
                train_step = make_train_step(model, make_optimizer(ft_cfg))
            bb, head, losses = finetune(model, w0, tok[t.name]["train"], t.num_classes, ft_cfg, progress=stage.bar,
                                        step=train_step, max_classes=max_classes)
            save_task_checkpoint(ckpt, bb, head)
            info = {"seconds": time.perf_counter() - start, "final_loss": float(np.mean(losses[-10:])),
                    "checkpoint": os.path.relpath(ckpt, cache_dir)}
            write_json_atomic(info_path, info)
            info["cached"] = False
        finetuned.append(jax.tree.map(jnp.asarray, bb))
        heads[t.name] = head
        task_info[t.name] = info
    write_json_atomic(os.path.join(cache_dir, "finetuned", "manifest.json"),
                      {"backbone": str(backbone.folder), "config": dataclasses.asdict(cfg),
                       "tasks": {n: task_info[n] for n in names}})

    evaluator = Evaluator(model, heads, {s: {n: tok[n][s] for n in names} for s in ("val", "test")})

    # 2. individual and pretrained references.
    stage.begin("individual")
    individual = {"val": {}, "test": {}}
    for t, ft in zip(tasks, finetuned):
        for s in ("val", "test"):
            individual[s][t.name] = evaluator.accuracy(ft, s, [t.name])[t.name]
        stage.step()
    zero_shot = evaluator.accuracy(w0, "test")
    for t in tasks:
        task_info[t.name].update(classes=list(t.classes), n_train=len(t.train), n_val=len(t.val), n_test=len(t.test),
                                 majority_test=t.majority_baseline("test"), individual_val=individual["val"][t.name],
                                 individual_test=individual["test"][t.name], pretrained_backbone_test=zero_shot[t.name],
                                 source=t.source)

    # 3. exemplar statistics (task-k model on task k's unlabeled exemplars) and the extras some methods need.
    stage.begin("statistics")
    max_ex = max([cfg.exemplars, *cfg.exemplar_sweep]) if analyses_on else cfg.exemplars
    pad_to = max_ex * ml

    def stats_for(count: int) -> list[PyTree]:
        return exemplar_stats(model, finetuned, [tok[t.name]["train"] for t in tasks], count, pad_to)

    stats = stats_for(cfg.exemplars)
    exemplar_tokens_count = {t.name: int(exemplar_tokens(tok[t.name]["train"], cfg.exemplars).lengths.sum())
                             for t in tasks}
    extras: dict[str, list[PyTree]] = {}
    needed = {e for m in methods for e in get_method(m).extras}
    for name in sorted(needed & {"fishers", "grads"}):
        trees = []
        for t, ft in zip(tasks, finetuned):
            ex = exemplar_tokens(tok[t.name]["train"], cfg.fisher_examples)
            # Fisher at each task's own model (Matena & Raffel, empirical: true labels); TATR's gradient
            # magnitudes at the pretrained model.
            trees.append(per_example_grad_stat(model, ft if name == "fishers" else w0, heads[t.name], ex,
                                               "square" if name == "fishers" else "abs", max_classes))
        extras[name] = trees

    # 4. every method: hyperparameters on validation, then test.
    main: dict[str, dict] = {}
    deltas: dict[str, PyTree] = {}
    score = lambda p, split: evaluator.accuracy(p, split)  # noqa: E731

    def add_row(label: str, row: dict) -> None:
        if "test" in row:
            row["summary"] = summarize(row["test"], individual["test"])
        main[label] = row
        stage.step()

    for name in methods:
        stage.begin(f"merge:{name}")
        row, delta = tune_method(name, w0, finetuned, score, alphas=cfg.alphas, ties_k=cfg.ties_k, stats=stats,
                                 extras=extras)
        if delta is not None:
            deltas[name] = delta
        add_row(name, row)

    if "cat" in methods:
        # λ and c chosen on validation together with alpha, over the same alpha grid as every other method.
        stage.begin("merge:cat (λ, c on val)")
        row, _ = tune_method("cat (λ, c on val)", w0, finetuned, score, alphas=cfg.alphas, stats=stats,
                             method="cat", knob_points=cat_knob_points(cfg.lam_sweep, cfg.c_sweep, cfg.lam, cfg.c))
        row["description"] = "CAT with λ, c and alpha chosen on validation (λ line at c, c line at λ)"
        add_row("cat (λ, c on val)", row)
    trimmed = None
    if cfg.cat_trim_combos or cfg.adamerging:
        stage.begin("cat_trim")
        t0 = time.perf_counter()
        trimmed = jax.block_until_ready(cm.cat_trim(w0, finetuned, stats, lam=cfg.lam, c=cfg.c))
        trim_seconds = time.perf_counter() - t0
    for name in cfg.cat_trim_combos:
        stage.begin(f"merge:cat_trim+{name}")
        trimmed_models = [jax.tree.map(jnp.add, w0, t) for t in trimmed]
        row, _ = tune_method(name, w0, trimmed_models, score, alphas=cfg.alphas, stats=stats)
        row["description"] = f"{name} on CAT-trimmed task vectors (λ={cfg.lam:g}, c={cfg.c})"
        row["cat_trim_seconds"] = trim_seconds
        add_row(f"cat_trim+{name}", row)
    if cfg.adamerging:
        ada = adamerging_inputs(model, heads, {n: tok[n]["val"] for n in names}, cfg.adamerging_batch)
        for label, tvs in (("AdaMerging", cm.task_vectors(w0, finetuned)), ("CAT + AdaMerging", trimmed)):
            stage.begin(f"merge:{label}")
            add_row(label, run_adamerging(label, w0, tvs, ada, score, cfg))

    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg), "backbone": str(backbone.folder), "tasks": task_info,
        "individual": individual, "pretrained_test": zero_shot,
        "individual_summary": summarize(individual["test"], individual["test"]),
        "pretrained_summary": summarize(zero_shot, individual["test"]),
        "exemplar_tokens": exemplar_tokens_count, "main": main, "analyses": {},
    }

    # 5. analyses.
    if analyses_on and "cat" in deltas and "task_arithmetic" in deltas:
        results["analyses"] = run_analyses(cfg, evaluator, w0, finetuned, stats, stats_for, deltas, individual,
                                           main["cat"]["hparams"]["alpha"], names, stage)
        results["analyses"]["cat_lambda_c_neighbour_alphas"] = validation_selected_cat(results["analyses"], cfg)

    stage.begin("write")
    results["timing"] = {**stage.finish(), "total_seconds": time.perf_counter() - t_start}
    write_results(results, out_dir)
    return results


def run_analyses(cfg: BenchConfig, evaluator: Evaluator, w0: PyTree, finetuned: list[PyTree], stats: list[PyTree],
                 stats_for, deltas: Mapping[str, PyTree], individual: Mapping[str, Mapping[str, float]],
                 main_alpha: float, names: Sequence[str], stage: Stage) -> dict:
    """Every analysis of CAT; bases are memoized so settings that share them (ablations, variants) reuse them."""
    from catmerge_jax.roles import Role

    ind = individual["test"]
    alphas = analyses.neighbours(cfg.alphas, main_alpha)
    cache: dict = {}
    out: dict[str, Any] = {"sweep_alphas": alphas}

    def table(stats_key="main", **kw):
        return analyses.cat_table(kw.pop("lam", cfg.lam), kw.pop("c", cfg.c), cache=cache, stats_key=stats_key, **kw)

    def sweep(settings, s=stats, key="main"):
        return analyses.cat_sweep(evaluator, w0, finetuned, s,
                                  [(st, table(key, **{k: v for k, v in st.items() if k != "exemplars"}))
                                   for st in settings], alphas, ind, on_step=stage.step)

    stage.begin("analysis:ablation+variants")
    # One basis computation serves the default, the ablations (Table 5) and the variants that keep the bases.
    out["default"] = sweep([{}])[0]
    out["ablation"] = sweep([{"off": (Role.LINEAR,)}, {"off": (Role.SCALE,)}, {"off": (Role.SHIFT,)}])
    for r in out["ablation"]:
        r["setting"] = {"off": r["setting"]["off"][0].name.lower()}
    out["variants"] = [{"name": v, **r} for v, r in zip(cfg.variants, sweep([{v: True} for v in cfg.variants]))]
    stage.begin("analysis:layers")
    # Which layers' projections cost (or buy) accuracy: the same bases, applied to one group of leaves at a time.
    out["layers"] = [{"name": label, **r} for (label, _), r in
                     zip(cfg.layer_groups, sweep([{"linear_only": rx} for _, rx in cfg.layer_groups]))]

    stage.begin("analysis:energy")
    trimmed = analyses.trimmed_task_vectors(w0, finetuned, stats, table())
    out["removed_energy"] = dict(zip(names, analyses.removed_energy(w0, finetuned, trimmed)))
    stage.step()

    stage.begin("analysis:alpha")
    curves = {m: deltas[m] for m in ("task_arithmetic", "ties", "cat") if m in deltas}
    out["alpha_curve"] = {m: analyses.alpha_curve(evaluator, w0, d, cfg.curve_alphas) for m, d in curves.items()}
    stage.step()

    stage.begin("analysis:lambda")
    out["lambda"] = [{**(out["default"] if l == cfg.lam else sweep([{"lam": l}])[0]), "lam": l} for l in cfg.lam_sweep]
    stage.begin("analysis:directions")
    # Does the paper's objective support the directions it removes? (bases memoized by the λ sweep)
    out["directions"] = {f"{lam:g}": dict(zip(names, analyses.removal_diagnostics(
        w0, finetuned, stats, table(lam=lam)[Role.LINEAR], lam))) for lam in cfg.lam_sweep}
    stage.begin("analysis:c")
    out["c"] = [{**(out["default"] if c == cfg.c else sweep([{"c": c}])[0]), "c": c} for c in cfg.c_sweep]
    stage.begin("analysis:exemplars")
    rows = []
    for n in cfg.exemplar_sweep:
        r = out["default"] if n == cfg.exemplars else sweep([{}], stats_for(n), key=f"exemplars={n}")[0]
        rows.append({**r, "exemplars": n})
    out["exemplars"] = rows

    stage.begin("analysis:conflict")
    a, b = cfg.conflict_tasks
    raw = [jax.tree.map(lambda x, y: x - y, finetuned[i], w0) for i in (a, b)]
    pair_trimmed = analyses.trimmed_task_vectors(w0, [finetuned[a], finetuned[b]], [stats[a], stats[b]],
                                                 table("pair"))
    pair = [names[a], names[b]]
    out["conflict"] = {"tasks": pair, "grid": list(cfg.conflict_grid),
                       "task_arithmetic": analyses.conflict_map(evaluator, w0, raw, raw, pair,
                                                                cfg.conflict_grid).tolist(),
                       "cat": analyses.conflict_map(evaluator, w0, pair_trimmed, raw, pair, cfg.conflict_grid).tolist()}
    stage.step()
    return out


def validation_selected_cat(an: Mapping, cfg: BenchConfig) -> dict:
    """CAT with λ and c (besides alpha) chosen on validation: the best λ-sweep or c-sweep point by val mean.

    No extra merges: the sweeps already tuned alpha on validation at every point; the test accuracy of the
    chosen point is reported as it is (it never influenced the choice).
    """
    points = [({"lam": r["lam"], "c": cfg.c}, r) for r in an["lambda"]] + \
             [({"lam": cfg.lam, "c": r["c"]}, r) for r in an["c"]]
    best_hp, best = max(points, key=lambda p: p[1]["val_mean"])  # ties keep the first (the λ sweep's)
    return {"hparams": {**best_hp, "alpha": best["alpha"]}, "val": best["val"], "test": best["test"],
            "summary": best["summary"], "alpha_is_scale": True,
            "description": "CAT with λ, c and alpha chosen on validation over the λ and c sweeps"}


# ----------------------------------------------------------------------------------------------- reporting

def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main_table(results: Mapping) -> str:
    names = list(results["tasks"])
    head = "| method | " + " | ".join(names) + " | avg | norm. | drop std | merge s | hparams |"
    lines = [head, "|" + "---|" * (len(names) + 6)]

    def row(label, acc, summ, hp="", seconds=None):
        cells = " | ".join(_pct(acc[n]) for n in names)
        sec = "" if seconds is None else f"{seconds:.1f}"
        return f"| {label} | {cells} | {_pct(summ['average'])} | {_pct(summ['normalized'])} | " \
               f"{summ['drop_std']:.1f} | {sec} | {hp} |"

    lines.append(row("individual", results["individual"]["test"], results["individual_summary"]))
    lines.append(row("pretrained backbone", results["pretrained_test"], results["pretrained_summary"]))
    for m, r in results["main"].items():
        if "skipped" in r:
            lines.append(f"| {m} | " + " | ".join("–" for _ in names) + f" | – | – | – | – | skipped: {r['skipped']} |")
            continue
        hp = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in r["hparams"].items())
        lines.append(row(m, r["test"], r["summary"], hp, r.get("merge_seconds")))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- several seeds

def aggregate_seeds(per_seed: Sequence[Mapping], seeds: Sequence[int]) -> dict:
    """Mean ± sample std (ddof = 1) over fine-tuning seeds of every row's per-task test accuracy, average and
    normalized accuracy, plus each method's paired difference to CAT (same seed, same checkpoints)."""
    first = per_seed[0]
    names = list(first["tasks"])

    def stat(values):
        v = np.asarray(values, np.float64)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}

    def row_of(get):
        tests = [get(r) for r in per_seed]
        if any(t is None for t in tests):
            return None
        avg = [float(np.mean([t["test"][n] for n in names])) for t in tests]
        val = [float(np.mean([t["val"][n] for n in names])) if t.get("val") else float("nan") for t in tests]
        return {"per_task": {n: stat([t["test"][n] for t in tests]) for n in names}, "average": stat(avg),
                "val_average": stat(val),
                "normalized": stat([t["summary"]["normalized"] for t in tests]),
                "merge_seconds": stat([t.get("merge_seconds", 0.0) for t in tests]),
                "hparams": [t.get("hparams", {}) for t in tests]}

    rows = {"individual": row_of(lambda r: {"test": r["individual"]["test"], "val": r["individual"].get("val"),
                                            "summary": r["individual_summary"]}),
            "pretrained backbone": row_of(lambda r: {"test": r["pretrained_test"], "summary": r["pretrained_summary"]})}
    for m in first["main"]:
        rows[m] = row_of(lambda r, m=m: r["main"].get(m) if "test" in r["main"].get(m, {}) else None)
    if rows.get("cat"):
        for m, row in rows.items():
            if row is not None:
                row["minus_cat"] = stat(np.subtract(row["average"]["values"], rows["cat"]["average"]["values"]))
    return {"seeds": list(seeds), "tasks": names, "config": first["config"], "rows": rows,
            "individual_test_per_seed": [r["individual"]["test"] for r in per_seed],
            "stage_seconds_per_seed": [r["timing"] for r in per_seed]}


def seeds_table(agg: Mapping) -> str:
    names = agg["tasks"]
    lines = ["| method | " + " | ".join(names) + " | avg | norm. | Δ avg vs cat (paired) | val avg | merge s |",
             "|" + "---|" * (len(names) + 6)]
    for m, r in agg["rows"].items():
        if r is None:
            lines.append(f"| {m} | " + " | ".join("–" for _ in names) + " | – | – | – | – | – |")
            continue
        v = r.get("val_average", {}).get("mean", float("nan"))
        val = "–" if not np.isfinite(v) else f"{100 * v:.1f} ± {100 * r['val_average']['std']:.1f}"
        cells = " | ".join(f"{100 * r['per_task'][n]['mean']:.1f} ± {100 * r['per_task'][n]['std']:.1f}" for n in names)
        delta = r.get("minus_cat")
        d = "" if delta is None or m == "cat" else f"{100 * delta['mean']:+.1f} ± {100 * delta['std']:.1f}"
        sec = "" if m in ("individual", "pretrained backbone") else f"{r['merge_seconds']['mean']:.1f}"
        lines.append(f"| {m} | {cells} | **{100 * r['average']['mean']:.1f} ± {100 * r['average']['std']:.1f}** | "
                     f"{100 * r['normalized']['mean']:.1f} ± {100 * r['normalized']['std']:.1f} | {d} | {val} | {sec} |")
    return "\n".join(lines)


def write_seed_results(agg: Mapping, out_dir: str, command: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "results_seeds.json"), {**agg, "command": command})
    cfg = agg["config"]
    hp_lines = []
    for m, r in agg["rows"].items():
        if r is not None and m not in ("individual", "pretrained backbone"):
            hp_lines.append(f"- {m}: " + "; ".join(
                f"seed {s}: " + ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                          for k, v in hp.items()) for s, hp in zip(agg["seeds"], r["hparams"])))
    md = ["# Offline merging benchmark over fine-tuning seeds: all-MiniLM-L6-v2, six real text tasks", "",
          f"Command: `{command}`", "",
          f"Fine-tuning seeds {', '.join(map(str, agg['seeds']))} (data split and exemplars fixed, data seed "
          f"{cfg['seed']}); {len(agg['tasks'])} tasks; test accuracy (%) as mean ± sample std (ddof = 1) over the "
          f"seeds. Every method's alpha is chosen on validation from the same grid "
          f"{tuple(cfg['alphas'])}, jointly with its own knob where it has one (TIES k ∈ {tuple(cfg['ties_k'])}; "
          f"Iso-CTS common_fraction ∈ (0.8, 0.5); CAT (λ, c on val): λ ∈ {tuple(cfg['lam_sweep'])} at c = "
          f"{cfg['c']} and c ∈ {tuple(cfg['c_sweep'])} at λ = {cfg['lam']:g}). Methods that read exemplars (CAT, "
          f"RegMean, LOT, the cat_trim rows) use {cfg['exemplars']} unlabeled training exemplars per task; Fisher "
          f"and TATR, when run, {cfg['fisher_examples']} labelled ones. \"Δ avg vs cat (paired)\" is the per-seed difference of the "
          "average to CAT's (same checkpoints), mean ± std. \"val avg\" is the validation average at the chosen "
          "hyperparameters (what every selection, including whether a combined variant helps, is decided on). "
          "\"merge s\" is the mean wall time of one merge call "
          "(the first call of a method includes XLA compilation; AdaMerging: its whole optimization) on the shared "
          "2-core machine.", "",
          f"Total wall time {agg['wall_seconds'] / 60:.1f} min.", "",
          "## Main table (test accuracy, %)", "", seeds_table(agg), ""]
    if "AdaMerging" in agg["rows"]:
        md += ["## What the AdaMerging rows saw", "",
               f"Both rows learn layer-wise coefficients (init 0.3, clipped to [0, 1], Adam lr 1e-3, "
               f"{cfg['adamerging_steps']} steps) by minimizing the summed prediction entropy of every task's head on "
               f"the UNLABELED validation inputs of all {len(agg['tasks'])} tasks ({cfg['adamerging_batch']} sequences "
               "per task per step, cycled through the validation split; labels never read; test inputs never seen). "
               f"\"AdaMerging\" starts from the plain task vectors, \"CAT + AdaMerging\" from CAT's trimmed ones "
               f"(λ = {cfg['lam']:g}, c = {cfg['c']}). No alpha grid: the coefficients are the learned scale.", ""]
    md += ["## Chosen hyperparameters per seed", ""] + hp_lines + [""]
    _write_text_atomic(os.path.join(out_dir, "RESULTS_SEEDS.md"), "\n".join(md) + "\n")


def _sweep_table(rows: Sequence[Mapping], label: str, key) -> str:
    lines = [f"| {label} | alpha (val) | val mean | test avg | test norm. |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {key(r)} | {r['alpha']:g} | {_pct(r['val_mean'])} | {_pct(r['summary']['average'])} | "
                     f"{_pct(r['summary']['normalized'])} |")
    return "\n".join(lines)


def write_results(results: Mapping, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    cfg = results["config"]
    md = ["# Offline merging benchmark: all-MiniLM-L6-v2, six real text tasks", "",
          f"Backbone `{os.path.basename(os.path.dirname(results['backbone']))}`; {len(results['tasks'])} tasks; "
          f"alpha (and TIES k) chosen on validation; test accuracy (%) below. CAT: λ={cfg['lam']:g}, c={cfg['c']}, "
          f"{cfg['exemplars']} unlabeled exemplars per task. Total wall time "
          f"{results['timing']['total_seconds'] / 60:.1f} min.", "",
          "## Tasks", "", "| task | classes | train/val/test | majority (test) | individual (test) | source |",
          "|---|---|---|---|---|---|"]
    for n, t in results["tasks"].items():
        md.append(f"| {n} | {len(t['classes'])} | {t['n_train']}/{t['n_val']}/{t['n_test']} | "
                  f"{_pct(t['majority_test'])} | {_pct(t['individual_test'])} | {t['source']} |")
    md += ["", "## Main table (test accuracy, %)", "", main_table(results), ""]
    an = results.get("analyses") or {}
    figs = {}
    if an:
        md += ["## Analyses", "", "### Exemplars per task (Fig. 2a)", "",
               _sweep_table(an["exemplars"], "exemplars", lambda r: r["exemplars"]), "",
               "### λ (Fig. 4)", "", _sweep_table(an["lambda"], "λ", lambda r: f"{r['lam']:g}"), "",
               "### c (Fig. 4)", "", _sweep_table(an["c"], "c", lambda r: r["c"]), "",
               "### Ablation (Table 5)", "",
               _sweep_table(an["ablation"], "switched off",
                            lambda r: r["setting"]["off"]), "",
               "### CAT variants (library options)", "",
               _sweep_table(an["variants"], "variant", lambda r: r["name"]), "",
               "### Which layers: the linear projection on one group of layers only (masks everywhere)", "",
               _sweep_table(an.get("layers", []), "projected leaves", lambda r: r["name"]), "",
               "### Share of task-vector energy CAT removes (1 − ‖T̃‖²/‖T‖², per role)", "",
               "| task | " + " | ".join(next(iter(an["removed_energy"].values()))) + " |",
               "|---|" + "---|" * len(next(iter(an["removed_energy"].values())))]
        for n, e in an["removed_energy"].items():
            md.append(f"| {n} | " + " | ".join(f"{100 * v:.1f}%" for v in e.values()) + " |")
        if an.get("directions"):
            md += ["", "### Removal directions the objective does not support, per λ (task: non-positive top-c "
                   "eigenvalue share / negative per-pair term share)", "",
                   "| λ | " + " | ".join(results["tasks"]) + " |", "|---|" + "---|" * len(results["tasks"])]
            for lam, per in an["directions"].items():
                md.append(f"| {lam} | " + " | ".join(f"{100 * per[n]['nonpositive_directions']:.0f}% / "
                                                  f"{100 * per[n]['negative_pair_terms']:.0f}%"
                                                  for n in results["tasks"]) + " |")
        md += ["", "### Accuracy vs alpha (test mean, Fig. 2b)", "",
               "| alpha | " + " | ".join(an["alpha_curve"]) + " |", "|---|" + "---|" * len(an["alpha_curve"])]
        alphas = [a for a, _ in next(iter(an["alpha_curve"].values()))]
        for i, a in enumerate(alphas):
            md.append(f"| {a:g} | " + " | ".join(_pct(c[i][1]) for c in an["alpha_curve"].values()) + " |")
        conf = an["conflict"]
        md += ["", f"### Knowledge conflict ({conf['tasks'][0]} × {conf['tasks'][1]}, Fig. 3)", "",
               "Sum of both tasks' validation-loss increase over their own models; mean over the grid: "
               f"task arithmetic {np.mean(conf['task_arithmetic']):.3f}, CAT {np.mean(conf['cat']):.3f}.", ""]
        figs = {
            "alpha.png": lambda p: plots.line_plot(p, an["alpha_curve"], xlabel="alpha", title="Accuracy vs alpha"),
            "exemplars.png": lambda p: plots.line_plot(p, {"cat": [(r["exemplars"], r["summary"]["average"])
                                                                   for r in an["exemplars"]]},
                                                       xlabel="exemplars per task", title="CAT vs exemplar count"),
            "lambda.png": lambda p: plots.line_plot(p, {"cat": [(r["lam"], r["summary"]["average"])
                                                                for r in an["lambda"]]},
                                                    xlabel="λ", title="CAT vs λ", logx=True),
            "c.png": lambda p: plots.line_plot(p, {"cat": [(r["c"], r["summary"]["average"])
                                                           for r in an["c"]]}, xlabel="c", title="CAT vs c"),
            "conflict.png": lambda p: plots.conflict_maps(p, {"task arithmetic": np.array(conf["task_arithmetic"]),
                                                              "CAT": np.array(conf["cat"])}, conf["grid"],
                                                          conf["tasks"]),
        }
    ok = {m: r["summary"]["average"] for m, r in results["main"].items() if "summary" in r}
    if ok:
        figs["methods.png"] = lambda p: plots.bar_plot(p, ok, title="Merged backbones: mean test accuracy")
    for fname, fn in figs.items():
        fn(os.path.join(out_dir, fname))
    if figs:
        md += ["## Figures", ""] + [f"![{f}]({f})" for f in sorted(figs)] + [""]
    md += ["## Timing (s)", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in results["timing"].items()]
    _write_text_atomic(os.path.join(out_dir, "RESULTS.md"), "\n".join(md) + "\n")


def _write_text_atomic(path: str, text: str) -> None:
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def aggregate_only(out: str, seeds: Sequence[int], *, quiet: bool = False) -> int:
    """Rewrite the seed tables from finished per-seed runs; the command of the run that produced them is kept."""
    per_seed = []
    for seed in seeds:
        path = os.path.join(out, "seeds", f"seed{seed}", "results.json")
        if not os.path.exists(path):
            raise SystemExit(f"--aggregate-only: {path} does not exist (run seed {seed} first)")
        with open(path, encoding="utf-8") as f:
            per_seed.append(json.load(f))
    agg = aggregate_seeds(per_seed, seeds)
    agg["wall_seconds"] = float(sum(r["timing"]["total_seconds"] for r in per_seed))
    previous = os.path.join(out, "results_seeds.json")
    command = None
    if os.path.exists(previous):
        with open(previous, encoding="utf-8") as f:
            command = json.load(f).get("command")
    if command is None:
        command = "python -m experiments.benchmark.run --seeds " + " ".join(map(str, seeds))
    write_seed_results(agg, out, command)
    if not quiet:
        print(seeds_table(agg))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmark.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and sweeps (a smoke run)")
    parser.add_argument("--out", default=os.path.join("experiments", "results"))
    parser.add_argument("--cache", default=os.path.join("experiments", "cache"))
    parser.add_argument("--tasks", nargs="*", default=None, help=f"subset of {', '.join(DEFAULT_TASKS)}")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of the registered methods")
    parser.add_argument("--no-analyses", action="store_true")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="CAT variants to evaluate (cat_table options: joint, rescale_norm, normalize_by_count, gated)")
    parser.add_argument("--exemplar-sweep", nargs="*", type=int, default=None)
    parser.add_argument("--lam-sweep", nargs="*", type=float, default=None)
    parser.add_argument("--c-sweep", nargs="*", type=int, default=None)
    parser.add_argument("--light-analyses", action="store_true",
                        help="sweeps reduced to the default point (for a quick look at variants/ablations)")
    parser.add_argument("--seeds", nargs="*", type=int, default=None,
                        help="fine-tuning seeds: one run each (checkpoints cached per seed), then mean ± std over them "
                             "in RESULTS_SEEDS.md / results_seeds.json; per-seed outputs go to OUT/seeds/seed<N>/")
    parser.add_argument("--main-only", action="store_true",
                        help="main table only: skip the one-seed analyses of CAT (sweeps, ablations, plots)")
    parser.add_argument("--no-adamerging", action="store_true", help="skip the two AdaMerging rows")
    parser.add_argument("--cat-trim-combos", nargs="*", default=None, metavar="METHOD",
                        help="methods run on CAT-trimmed task vectors as 'cat_trim+X' rows (default: "
                             f"{' '.join(BenchConfig.cat_trim_combos)}; no names: none)")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="with --seeds: re-read OUT/seeds/seed<N>/results.json of finished runs and rewrite "
                             "RESULTS_SEEDS.md / results_seeds.json (nothing is fine-tuned or merged)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else BenchConfig()
    if args.no_adamerging:
        cfg = dataclasses.replace(cfg, adamerging=False)
    if args.cat_trim_combos is not None:
        cfg = dataclasses.replace(cfg, cat_trim_combos=tuple(args.cat_trim_combos))
    if args.tasks:
        cfg = dataclasses.replace(cfg, tasks=tuple(args.tasks))
    if args.methods:
        cfg = dataclasses.replace(cfg, methods=tuple(args.methods))
    if args.variants is not None:
        cfg = dataclasses.replace(cfg, variants=tuple(args.variants))
    for field, value in (("exemplar_sweep", args.exemplar_sweep), ("lam_sweep", args.lam_sweep),
                         ("c_sweep", args.c_sweep)):
        if value:
            cfg = dataclasses.replace(cfg, **{field: tuple(value)})
    if args.light_analyses:
        cfg = dataclasses.replace(cfg, exemplar_sweep=(cfg.exemplars,), lam_sweep=(cfg.lam,), c_sweep=(cfg.c,),
                                  conflict_grid=(0.0, 1.0), curve_alphas=(0.3, 1.0))
    if args.aggregate_only:
        if not args.seeds:
            parser.error("--aggregate-only needs --seeds")
        return aggregate_only(args.out, args.seeds, quiet=args.quiet)
    tasks = load_tasks(cfg.tasks, sizes=cfg.sizes, seed=cfg.seed)
    backbone = load_backbone()
    analyses_on = not (args.no_analyses or args.main_only)
    if args.seeds:
        start = time.perf_counter()
        per_seed = []
        for seed in args.seeds:
            per_seed.append(run_benchmark(backbone, tasks, dataclasses.replace(cfg, finetune_seed=seed),
                                          out_dir=os.path.join(args.out, "seeds", f"seed{seed}"),
                                          cache_dir=args.cache, quiet=args.quiet, analyses_on=analyses_on))
        agg = aggregate_seeds(per_seed, args.seeds)
        agg["wall_seconds"] = time.perf_counter() - start
        command = "python -m experiments.benchmark.run " + " ".join(sys.argv[1:] if argv is None else argv)
        write_seed_results(agg, args.out, command)
        if not args.quiet:
            print(seeds_table(agg))
            print(f"wall time {agg['wall_seconds'] / 60:.1f} min; results in {args.out}/RESULTS_SEEDS.md")
        return 0
    results = run_benchmark(backbone, tasks, cfg, out_dir=args.out, cache_dir=args.cache, quiet=args.quiet,
                            analyses_on=analyses_on)
    if not args.quiet:
        print(main_table(results))
        print(f"wall time {results['timing']['total_seconds'] / 60:.1f} min; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
