"""Peak memory of streamed folder merges does not grow with the number of layers (issue 24, "Out of core").

Builds synthetic Llama-architecture folders (bf16, sharded like transformers writes them) with L = 4 and L = 16
layers, base + K tasks, and runs ``catmerge merge`` on each in a fresh subprocess, reading its peak RSS from
``getrusage(RUSAGE_CHILDREN)``. The growth of the peak from 4 to 16 layers is compared with the bytes of one
layer of one model (bf16, as stored). Memory-mapped input pages count in RSS only while a tensor is being read.

    python experiments/bench_folders_memory.py [--hidden 1024] [--mlp 2816] [--methods task_arithmetic ties]

Prints one JSON line per (method, layers) and a summary; writes ``experiments/results/folders_memory.json``
when ``--save`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def layer_shapes(hidden: int, mlp: int, kv: int) -> dict[str, tuple[int, ...]]:
    return {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (mlp, hidden), "mlp.up_proj.weight": (mlp, hidden),
            "mlp.down_proj.weight": (hidden, mlp), "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,)}


def write_folder(folder: str, layers: int, hidden: int, mlp: int, vocab: int, seed: int) -> None:
    """One shard per layer (plus one for embeddings and head), bf16, with an index, like ``save_pretrained``."""
    import ml_dtypes

    from converters.safetensors_io import save_file

    rng = np.random.default_rng(seed)
    kv = hidden // 4
    os.makedirs(folder)
    groups = [{"model.embed_tokens.weight": (vocab, hidden)}]
    groups += [{f"model.layers.{i}.{n}": s for n, s in layer_shapes(hidden, mlp, kv).items()} for i in range(layers)]
    groups[-1] = {**groups[-1], "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    weight_map, total = {}, 0
    for g, group in enumerate(groups):
        file = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (0.02 * rng.standard_normal(s, dtype=np.float32)).astype(ml_dtypes.bfloat16)
                   for n, s in group.items()}
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
        total += sum(t.nbytes for t in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 4, "vocab_size": vocab, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


def run_merge(method: str, base: str, tasks: list[str], out: str) -> tuple[float, int]:
    """``(wall seconds, peak RSS bytes)`` of ``catmerge merge`` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "catmerge_jax.cli", "merge", "--method", method, "--base", base, "--task",
                    *tasks, "--out", out, "--quiet"], check=True, cwd=os.path.dirname(HERE))
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("RUSAGE_CHILDREN did not rise: run each size in its own benchmark process order")
    return wall, peak * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    layer_bytes = 2 * sum(int(np.prod(s)) for s in layer_shapes(args.hidden, args.mlp, args.hidden // 4).values())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-folders-") as root:
        for layers in args.layers:
            folders = [os.path.join(root, f"L{layers}-m{k}") for k in range(args.tasks + 1)]
            for k, folder in enumerate(folders):
                write_folder(folder, layers, args.hidden, args.mlp, args.vocab, seed=k)
            for method in args.methods:
                # RUSAGE_CHILDREN keeps the largest child's peak: measure each run from a fresh measuring process
                code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(HERE)!r}); "
                        "from experiments.bench_folders_memory import run_merge; "
                        f"print(json.dumps(run_merge({method!r}, {folders[0]!r}, {folders[1:]!r}, "
                        f"{os.path.join(root, f'out-{method}-{layers}')!r})))")
                result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
                wall, peak = json.loads(result.stdout.strip().splitlines()[-1])
                row = {"method": method, "layers": layers, "models": args.tasks + 1, "wall_s": round(wall, 2),
                       "peak_rss_mb": round(peak / 2**20, 1),
                       "model_mb": round(sum(os.path.getsize(os.path.join(folders[0], f))
                                             for f in os.listdir(folders[0])) / 2**20, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {"layer_mb_bf16": round(layer_bytes / 2**20, 1), "growth_mb": {}}
    for method in args.methods:
        peaks = {r["layers"]: r["peak_rss_mb"] for r in rows if r["method"] == method}
        lo, hi = min(peaks), max(peaks)
        summary["growth_mb"][method] = {f"{lo}->{hi} layers": round(peaks[hi] - peaks[lo], 1)}
    print(json.dumps(summary))
    if args.save:
        path = os.path.join(HERE, "results", "folders_memory.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
