"""Benchmark: the merge time of every registered method on the full all-MiniLM-L6-v2, K = 6 tasks.

The inputs are those of the benchmark's main table: the real MiniLM weights, the six fine-tuned backbones of one
fine-tuning seed from the benchmark's checkpoint cache (``experiments/cache``, written by
``python -m experiments.benchmark.run``), and, for the methods that use exemplar statistics (CAT, LOT, RegMean),
3 unlabeled training sentences per task captured as the benchmark does. Without that cache the task vectors are
synthetic (low rank plus noise on every leaf, ``--synthetic`` forces it); timings hardly depend on the values.

Each method runs at its registered defaults, twice or more: the first call includes jit compilation, the steady
time is the fastest later call. The table gives both and the steady time as a multiple of task arithmetic's
(run in the same process). For WUDI, whose cost is its Adam loop (``steps × Σ 2·out·in²`` flops over its
matrices), it also gives the loop's flop count and rate next to this machine's float32 matmul rate, measured here.

    PYTHONPATH=. python experiments/bench_methods.py                       # seed-0 checkpoints, all methods
    PYTHONPATH=. python experiments/bench_methods.py --methods cat wudi    # a subset
    PYTHONPATH=. python experiments/bench_methods.py --quick --results ''  # tiny random BERT, nothing written

Writes ``<results>/bench_methods.json`` and ``.log`` (``--results``, default ``experiments/results``; ``''``:
nothing), each atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments.bench_merge import RESULTS, Recorder, fastest, positive_int  # noqa: E402

SLOW_FIRST_CALL_S = 30.0  # a method whose first call takes longer is timed steady once, not ``repeats`` times


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 ``n × n`` matmul rate (GFLOP/s), best of ``repeats``."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def wudi_matrices(pretrained, matrices: str = "all_2d") -> list[tuple[int, int]]:
    """``(out, in)`` of every matrix WUDI optimizes (one entry per layer of a stacked leaf), as
    :func:`catmerge_jax.methods.layerwise.matrix_merge` reads them."""
    from catmerge_jax.methods.layerwise import _matrix_view
    from catmerge_jax.roles import classify, is_spec
    from catmerge_jax.tree import leaves_with_paths

    specs = [s for _, s in leaves_with_paths(classify(pretrained), is_leaf=is_spec)]
    shapes = []
    for leaf, spec in zip(jax.tree.leaves(pretrained), specs):
        view = _matrix_view(spec, leaf, matrices)
        if view == "linear":
            stack = jax.eval_shape(lambda x, _s=spec: _s.matrices(x, lead=1),
                                   jax.ShapeDtypeStruct((1, *np.shape(leaf)), jnp.float32))
            shapes += [(int(stack.shape[-1]), int(stack.shape[-2]))] * int(np.prod(stack.shape[1:-2], dtype=int))
        elif view == "table":
            shapes.append((int(np.shape(leaf)[0]), int(np.shape(leaf)[1])))
    return shapes


def wudi_loop_flops(shapes, steps: int) -> float:
    """Flops of WUDI's Adam loop: one ``(out, in) @ (in, in)`` product per matrix and step."""
    return float(steps) * sum(2.0 * o * i * i for o, i in shapes)


def synthetic_finetuned(pretrained, num_tasks: int, rank: int = 8, scale: float = 1e-2, seed: int = 0):
    """K trees ``W0 + T_k``: per leaf, a rank-``rank`` update plus noise, ``scale`` of the leaf's RMS."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_tasks):
        def perturb(w):
            w = np.asarray(w, np.float32)
            rms = float(np.sqrt(np.mean(w * w))) or 1.0
            flat = w.reshape(w.shape[0], -1) if w.ndim > 1 else w[:, None]
            low = rng.standard_normal((flat.shape[0], rank)) @ rng.standard_normal((rank, flat.shape[1])) / rank
            t = (low + 0.1 * rng.standard_normal(flat.shape)).astype(np.float32) * scale * rms
            return jnp.asarray(w + t.reshape(w.shape))
        out.append(jax.tree.map(perturb, pretrained))
    return out


def cached_finetuned(results_json: str, cache: str):
    """The fine-tuned backbones a benchmark run used (its ``results.json`` names their checkpoints), or None."""
    from experiments.benchmark.finetune import load_task_checkpoint

    if not os.path.exists(results_json):
        return None
    with open(results_json, encoding="utf-8") as f:
        info = json.load(f)["tasks"]
    paths = {name: os.path.join(cache, t["checkpoint"]) for name, t in info.items()}
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    return list(paths), [jax.tree.map(jnp.asarray, load_task_checkpoint(p)[0]) for p in paths.values()]


def time_method(method, pretrained, finetuned, stats, repeats: int) -> dict:
    """``{"first_s", "steady_s", "calls"}`` of ``method.merge`` at its defaults."""
    kwargs = {"stats": stats} if method.needs_stats else {}
    call = lambda: method.merge(pretrained, finetuned, **kwargs, **dict(method.defaults))  # noqa: E731
    first, _ = fastest(call, 1)
    calls = 1 if first > SLOW_FIRST_CALL_S else repeats
    steady, _ = fastest(call, calls)
    return {"first_s": first, "steady_s": steady, "calls": 1 + calls}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="*", default=None, help="registered names (default: every one)")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed of the cached checkpoints")
    parser.add_argument("--cache", default=os.path.join("experiments", "cache"))
    parser.add_argument("--synthetic", action="store_true", help="synthetic task vectors even if a cache exists")
    parser.add_argument("--exemplars", type=int, default=3)
    parser.add_argument("--repeats", type=positive_int, default=2, help="steady calls per method (best is reported)")
    parser.add_argument("--quick", action="store_true", help="a tiny random BERT, 3 synthetic tasks (smoke test)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--results", default=None, metavar="DIR",
                        help="write bench_methods.json/.log here (default experiments/results; --quick: nowhere)")
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    results = (None if args.quick else RESULTS) if args.results is None else args.results

    from experiments.benchmark.evaluate import load_all_methods
    from experiments.benchmark.finetune import load_backbone
    from experiments.benchmark.finetune import tokenize
    from experiments.benchmark.run import BenchConfig, exemplar_stats
    from experiments.benchmark.tasks import Sizes, load_tasks, synthetic_tasks

    from catmerge_jax.methods.registry import get_method

    names = load_all_methods() if not args.methods else list(args.methods)
    load_all_methods()
    rec = Recorder("methods_quick" if args.quick else "methods", "experiments/bench_methods.py", raw)
    say = (lambda *a: rec.lines.extend(" ".join(map(str, a)).splitlines())) if args.quiet else rec.say
    cfg = BenchConfig()
    if args.quick:
        from catmerge_jax.models.bert import BertConfig, BertModel
        from experiments.benchmark.finetune import Backbone, minilm_folder
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
        model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
                          add_pooler=False)
        ids = jnp.ones((1, 8), jnp.int32)
        backbone = Backbone(model, model.init(jax.random.key(0), ids, ids)["params"], tokenizer, "tiny-random-bert")
        tasks = synthetic_tasks(3, sizes=Sizes(train=12, val=4, test=4))
        max_len = 32
    else:
        backbone = load_backbone()
        tasks = load_tasks(cfg.tasks, sizes=cfg.sizes, seed=cfg.seed)
        max_len = cfg.finetune.max_len
    w0 = backbone.params
    cached = None if (args.quick or args.synthetic) else cached_finetuned(
        os.path.join(RESULTS, "seeds", f"seed{args.seed}", "results.json"), args.cache)
    if cached is not None:
        task_names, finetuned = cached
        source = f"cached fine-tuned checkpoints, seed {args.seed} ({args.cache})"
        tasks = [t for name in task_names for t in tasks if t.name == name]
    else:
        finetuned = synthetic_finetuned(w0, len(tasks))
        source = "synthetic task vectors (rank 8 + noise per leaf)"
    rec.data["settings"] = {"methods": names, "source": source, "tasks": [t.name for t in tasks],
                            "exemplars": args.exemplars, "max_len": max_len, "repeats": args.repeats}
    rate = matmul_gflops(256 if args.quick else 2048)
    rec.data["matmul_gflops"] = rate
    say(f"model={backbone.folder} K={len(finetuned)} exemplars={args.exemplars} ({source}); "
        f"float32 matmul {rate:.0f} GFLOP/s; load average {rec.data['machine']['load_average_1_5_15']}")
    t0 = time.perf_counter()
    train = [tokenize(backbone.tokenizer, t.train.texts, t.train.labels, max_len) for t in tasks]
    stats = exemplar_stats(backbone.model, finetuned, train, args.exemplars, args.exemplars * max_len)
    say(f"exemplar statistics: {time.perf_counter() - t0:.1f} s (first call, not part of any merge below)")

    rows = []
    for name in names:
        m = get_method(name)
        if m.extras:
            rows.append({"method": name, "skipped": f"needs {', '.join(m.extras)} (labeled per-example gradients)"})
            continue
        row = {"method": name, **time_method(m, w0, finetuned, stats if m.needs_stats else None, args.repeats)}
        if name == "wudi":
            flops = wudi_loop_flops(wudi_matrices(w0, m.defaults.get("matrices", "all_2d")), m.defaults["steps"])
            row.update(loop_tflop=flops / 1e12, loop_gflops_per_s=flops / row["steady_s"] / 1e9)
        rows.append(row)
        if not args.quiet:
            print(f"  {name}: first {row['first_s']:.2f} s, steady {row['steady_s']:.2f} s", flush=True)

    base = next((r["steady_s"] for r in rows if r["method"] == "task_arithmetic" and "steady_s" in r), None)
    say("\n| method | first call (s) | steady (s) | steady / task arithmetic | note |\n|---|---:|---:|---:|---|")
    for r in rows:
        if "skipped" in r:
            say(f"| {r['method']} | – | – | – | skipped: {r['skipped']} |")
            continue
        ratio = f"{r['steady_s'] / base:.1f}×" if base else "–"
        note = (f"Adam loop {r['loop_tflop']:.1f} TFLOP at {r['loop_gflops_per_s']:.0f} GFLOP/s "
                f"({100 * r['loop_gflops_per_s'] / rate:.0f}% of matmul)" if "loop_tflop" in r else "")
        say(f"| {r['method']} | {r['first_s']:.2f} | {r['steady_s']:.2f} | {ratio} | {note} |")
    rec.data["table"] = rows
    for path in rec.write(results):
        if not args.quiet:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
