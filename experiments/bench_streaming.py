"""Benchmark: peak memory of the streaming CAT merge on a synthetic stack far larger than memory allows to load.

Creates base + K task checkpoints (bf16 safetensors, default 30 blocks of width 2048 / MLP 8192 ≈ 1.5 B
parameters ≈ 3 GB per model) in a folder on disk, then, in a FRESH process, runs the layer-wise capture pass
(one block of one model in memory at a time) and :func:`catmerge_jax.streaming.merge_safetensors`, and reports
that process's peak RSS and the timings.

    PYTHONPATH=. python experiments/bench_streaming.py --workdir /tmp/stream_bench          # ~1.5 B params
    PYTHONPATH=. python experiments/bench_streaming.py --blocks 2 --width 256 --mlp 1024 --results ''   # quick

The table and the numbers are written to ``<results>/bench_streaming.json`` and ``.log`` (default
``experiments/results``; a run with other sizes than the defaults is named ``bench_streaming_<blocks>x<width>``;
``--results ''`` writes nothing), each file atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments.bench_merge import RESULTS, Recorder  # noqa: E402
from experiments.bench_merge import block_shapes as block_entries  # noqa: E402


def generate(args) -> None:
    """Write base + K task checkpoints tensor by tensor (never a whole model in memory)."""
    import ml_dtypes

    from catmerge_jax.streaming import ShardWriter

    shapes = block_entries(args.width, args.mlp)
    names = [(f"blocks/{b}/{n}", s) for b in range(args.blocks) for n, s in shapes.items()]
    entries = [(n, "BF16", s) for n, s in names]
    for model in ["base"] + [f"task{k}" for k in range(args.tasks)]:
        folder = os.path.join(args.workdir, model)
        os.makedirs(folder, exist_ok=True)
        writer = ShardWriter(folder, entries, 2 << 30)
        for i, (name, shape) in enumerate(names):
            # The same base tensor for every model (seeded by index) plus a per-task update.
            base = np.random.default_rng(i).standard_normal(shape, np.float32)
            base *= (1.0 / np.sqrt(shape[0])) if name.endswith("kernel") else 0.02
            if name.endswith("scale"):
                base += 1.0
            if model != "base":
                k = int(model[4:])
                rng = np.random.default_rng((i, k))
                if name.endswith("kernel"):
                    u = rng.standard_normal((shape[0], 4), np.float32) * (0.5 ** np.arange(4, dtype=np.float32))
                    base += (0.02 / np.sqrt(shape[0])) * (u @ rng.standard_normal((4, shape[1]), np.float32))
                base += 0.002 * rng.standard_normal(shape, np.float32)
            writer.write(name, base.astype(ml_dtypes.bfloat16))
            del base
        writer.close()


def merge(args) -> dict:
    """Capture (layer-wise) + streaming merge; returns timings and this process's peak RSS."""
    import jax
    import jax.numpy as jnp

    import catmerge_jax as cm
    from catmerge_jax.streaming import layerwise_capture, merge_safetensors
    from converters.safetensors_io import list_tensors, load_tensor
    from experiments.bench_merge import block_forward

    heads = max(1, args.width // 64)
    shapes = block_entries(args.width, args.mlp)
    rows = {"query": "x1", "key": "x1", "value": "x1", "out": "a", "fc1": "x2", "fc2": "f"}

    def block_stats(params, h):
        h_next, cap = block_forward(params, h, heads)
        cap = {n: np.asarray(v) for n, v in cap.items()}
        n = h.shape[0] * h.shape[1]
        out = {}
        for module, src in rows.items():
            out[f"{module}/kernel"] = cm.linear_stats(cap[src])
            out[f"{module}/bias"] = cm.count_stats(n)
        for ln, src in (("ln_1", "xhat1"), ("ln_2", "xhat2")):
            out[f"{ln}/scale"] = cm.scale_stats(cap[src])
            out[f"{ln}/bias"] = cm.count_stats(n)
        return h_next, out

    def loader(folder):
        info = list_tensors(folder)

        def load_block(b):
            tree: dict = {}
            for name in shapes:
                module, leaf = name.split("/")
                full = f"blocks/{b}/{name}"
                tree.setdefault(module, {})[leaf] = jnp.asarray(load_tensor(info[full].file, full), jnp.float32)
            return tree

        return load_block

    rng = np.random.default_rng(7)
    tasks = [os.path.join(args.workdir, f"task{k}") for k in range(args.tasks)]
    t0 = time.perf_counter()
    captured = []
    for k, folder in enumerate(tasks):
        x = jnp.asarray(rng.standard_normal((1, args.tokens, args.width)), jnp.float32)
        captured.append(layerwise_capture(loader(folder), block_stats, args.blocks, x))
    capture_s = time.perf_counter() - t0
    rss_after_capture = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    stats = {p: [c[p] for c in captured] for p in captured[0]}
    out = os.path.join(args.workdir, "merged")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    merge_safetensors(os.path.join(args.workdir, "base"), tasks, stats, out, alpha=0.3, lam=5.0, c=args.c,
                      progress=args.progress)
    merge_s = time.perf_counter() - t0
    info = list_tensors(out)
    params = sum(int(np.prod(i.shape)) for i in info.values())
    return {"params_per_model": params, "capture_s": capture_s, "merge_s": merge_s,
            "peak_rss_gb_after_capture": rss_after_capture, "peak_rss_gb": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "devices": str(jax.devices())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/catmerge_stream_bench")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=8192)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16, help="exemplar tokens per task (rows of X_k)")
    parser.add_argument("--c", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--stage", choices=("all", "generate", "merge"), default="all")
    parser.add_argument("--results", default=RESULTS, metavar="DIR",
                        help="write bench_streaming*.json/.log here ('' for nowhere)")
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    defaults = parser.parse_args([])
    sized = any(getattr(args, k) != getattr(defaults, k) for k in ("blocks", "width", "mlp", "tasks", "tokens", "c"))
    rec = Recorder("streaming" + (f"_{args.blocks}x{args.width}" if sized else ""),
                   "experiments/bench_streaming.py", raw)
    rec.data["settings"] = {k: v for k, v in vars(args).items() if k not in ("results", "stage")}

    per_model = args.blocks * sum(int(np.prod(s)) for s in block_entries(args.width, args.mlp).values())
    need = per_model * 2 * (args.tasks + 2)
    if args.stage in ("all", "generate"):
        os.makedirs(args.workdir, exist_ok=True)
        free = shutil.disk_usage(args.workdir).free
        rec.say(f"{per_model / 1e9:.2f} B params per model, {need / 2 ** 30:.1f} GiB on disk needed, "
                f"{free / 2 ** 30:.1f} GiB free; load average {rec.data['machine']['load_average_1_5_15']}")
        if need > 0.9 * free:
            print("not enough free disk")
            return 1
        t0 = time.perf_counter()
        generate(args)
        rec.data["generate_s"] = time.perf_counter() - t0
        rec.say(f"generated in {rec.data['generate_s']:.1f} s")
    if args.stage == "generate":
        return 0
    if args.stage == "merge":
        print("RESULT" + json.dumps(merge(args)))
        return 0
    # Measure the merge in a fresh process so the generator's memory does not count.
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", "merge"] + [
        f"--{k}={v}" for k, v in (("workdir", args.workdir), ("blocks", args.blocks), ("width", args.width),
                                  ("mlp", args.mlp), ("tasks", args.tasks), ("tokens", args.tokens), ("c", args.c))]
    proc = subprocess.run(cmd + (["--progress"] if args.progress else []), capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return proc.returncode
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT")][-1][6:])
    rec.say("\n| quantity | value |\n|---|---|")
    for key, value in result.items():
        rec.say(f"| {key} | {value:.2f} |" if isinstance(value, float) else f"| {key} | {value} |")
    rec.data["result"] = result
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    if args.stage == "all":
        for path in rec.write(args.results):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
