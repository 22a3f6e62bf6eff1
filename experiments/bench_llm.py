"""MergeKit 0.1.5 vs ``catmerge merge --config``: the same recipes on synthetic Llama folders, whole jobs as
subprocesses in one run, wall time and peak RSS of each.

    python experiments/bench_llm.py                       # 245M model (base + 4 tasks), ties and task_arithmetic
    python experiments/bench_llm.py --sizes 245m 1b       # also the 1.1B size (TinyLlama's shape)

Folders are synthetic bf16 Llama checkpoints (``config.json`` + one ``model.safetensors``), written with NumPy and
cached under ``experiments/work/bench_llm/`` (git-ignored); the base is N(0, 0.02), each task adds N(0, 0.002).
MergeKit runs from its own virtual environment (``--mergekit-python``, default ``$CATMERGE_MERGEKIT_PYTHON`` or
``experiments/work/mergekit-venv``, created with ``torch==2.13.0`` and ``mergekit==0.1.5`` when missing).

Each job is one row of :data:`JOBS` (tool × recipe × size): a command line and the recipe it runs, so other tools or
methods are one more row. Peak RSS is the job process's ``ru_maxrss`` (``wait4``), which counts the mapped pages
of the checkpoints it touched, for both tools alike. Before each job the inputs are read once so both start with
the same page cache. Results: ``experiments/results/bench_llm.json`` and ``.log`` (with the load average before and
after each job: the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, NamedTuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "experiments", "work", "bench_llm")
RESULTS = os.path.join(ROOT, "experiments", "results")


class Size(NamedTuple):
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


SIZES = {"245m": Size(1024, 2816, 16, 16, 4, 32000), "1b": Size(2048, 5632, 22, 32, 4, 32000),
         "245m_4layers": Size(1024, 2816, 4, 16, 4, 32000)}   # the 245m shape cut to 4 layers (111M parameters)
TASKS = 4

RECIPES = {
    "ties": {"merge_method": "ties", "parameters": {"density": 0.5, "weight": 0.5, "normalize": True}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"weight": 0.3}},
}


def _tensor_shapes(s: Size) -> dict[str, tuple[int, ...]]:
    head = s.hidden // s.heads
    out = {"model.embed_tokens.weight": (s.vocab, s.hidden)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (s.hidden,),
                    p + "self_attn.q_proj.weight": (s.hidden, s.hidden),
                    p + "self_attn.k_proj.weight": (s.kv_heads * head, s.hidden),
                    p + "self_attn.v_proj.weight": (s.kv_heads * head, s.hidden),
                    p + "self_attn.o_proj.weight": (s.hidden, s.hidden),
                    p + "post_attention_layernorm.weight": (s.hidden,),
                    p + "mlp.gate_proj.weight": (s.intermediate, s.hidden),
                    p + "mlp.up_proj.weight": (s.intermediate, s.hidden),
                    p + "mlp.down_proj.weight": (s.hidden, s.intermediate)})
    out["model.norm.weight"] = (s.hidden,)
    out["lm_head.weight"] = (s.vocab, s.hidden)
    return out


def _config(s: Size) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.hidden,
            "intermediate_size": s.intermediate, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads, "vocab_size": s.vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}


def make_folders(size: str) -> list[str]:
    """``[base, task_1..task_4]`` folders of ``size`` (written once, then reused)."""
    import ml_dtypes

    sys.path.insert(0, ROOT)
    from converters.safetensors_io import save_file

    s = SIZES[size]
    shapes = _tensor_shapes(s)
    folders = [os.path.join(WORK, size, name) for name in ["base"] + [f"task{k}" for k in range(TASKS)]]
    if all(os.path.exists(os.path.join(f, "model.safetensors")) for f in folders):
        return folders
    rng = np.random.default_rng(0)
    base = {}
    for name, shape in shapes.items():
        x = np.ones(shape, np.float32) if name.endswith("norm.weight") else \
            rng.standard_normal(shape, np.float32) * np.float32(0.02)
        base[name] = x.astype(ml_dtypes.bfloat16)
    for k, folder in enumerate(folders):
        os.makedirs(folder, exist_ok=True)
        if k == 0:
            tensors = base
        else:
            tensors = {n: (x.astype(np.float32) + rng.standard_normal(x.shape, np.float32) * np.float32(0.002)
                           ).astype(ml_dtypes.bfloat16) for n, x in base.items()}
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(_config(s), f, indent=2)
        del tensors
    return folders


def write_recipe(recipe: str, folders: list[str]) -> str:
    import yaml

    body = dict(RECIPES[recipe])
    body["base_model"] = folders[0]
    body["models"] = [{"model": f} for f in folders[1:]]
    path = os.path.join(WORK, f"{recipe}_{os.path.basename(os.path.dirname(folders[0]))}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(body, f, sort_keys=False)
    return path


def mergekit_python(requested: str | None) -> str:
    """A Python with mergekit 0.1.5 (created under experiments/work/ if none is given)."""
    python = requested or os.environ.get("CATMERGE_MERGEKIT_PYTHON")
    if python:
        return python
    venv = os.path.join(ROOT, "experiments", "work", "mergekit-venv")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "mergekit==0.1.5"], check=True)
    return python


class Job(NamedTuple):
    tool: str
    recipe: str
    size: str
    command: Callable[[str, str], list[str]]      # (recipe file, out dir) -> argv


def _mergekit_cmd(python: str):
    return lambda recipe, out: [os.path.join(os.path.dirname(python), "mergekit-yaml"), recipe, out]


def _catmerge_cmd(recipe, out):
    return [sys.executable, "-m", "catmerge_jax.cli", "merge", "--config", recipe, "--out", out, "--quiet"]


def jobs(sizes, recipes, python) -> list[Job]:
    """The table: for each size and recipe, MergeKit then catmerge."""
    tools = {"mergekit": _mergekit_cmd(python), "catmerge": _catmerge_cmd}
    return [Job(tool, r, s, cmd) for s in sizes for r in recipes for tool, cmd in tools.items()]


def _warm(folders):
    for f in folders:
        with open(os.path.join(f, "model.safetensors"), "rb") as fh:
            while fh.read(1 << 26):
                pass


def run_job(job: Job, folders: list[str], log) -> dict:
    import shutil

    recipe = write_recipe(job.recipe, folders)
    out = os.path.join(WORK, "out", f"{job.tool}_{job.recipe}_{job.size}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _warm(folders)
    load_before = os.getloadavg()[0]
    argv = job.command(recipe, out)
    env = dict(os.environ, PYTHONPATH=ROOT)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    output = proc.stdout.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    row = {"tool": job.tool, "recipe": job.recipe, "size": job.size, "wall_s": round(wall, 2),
           "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "exit": code, "load_before": round(load_before, 2),
           "load_after": round(os.getloadavg()[0], 2), "argv": " ".join(argv), "out": out}
    log.write(f"\n=== {job.tool} {job.recipe} {job.size}: {row}\n{output[-3000:]}\n")
    log.flush()
    if code != 0:
        raise SystemExit(f"{job.tool} {job.recipe} {job.size} failed (exit {code}); see the log")
    return row


def agreement(out_a: str, out_b: str, folders: list[str] | None = None, density: float | None = None) -> dict:
    """How the two outputs differ: the largest difference in bf16 ulps (of the larger magnitude), the fraction of
    entries that differ at all, and, for a magnitude-sparsified recipe (``density``), the fraction that differ
    without any model's |τ| being tied with that model's cut (where MergeKit's unstable sort decides)."""
    import ml_dtypes

    sys.path.insert(0, ROOT)
    from catmerge_jax.folders import open_folder

    a, b = open_folder(out_a), open_folder(out_b)
    inputs = [open_folder(f) for f in folders] if folders and density is not None else None
    worst, differing, untied, total = 0.0, 0, 0, 0
    for name in a.tensors:
        x, y = a.read_float32(name), b.read_float32(name)
        diff = x != y
        ulp = np.spacing(np.maximum(np.abs(x), np.abs(y))) * 65536      # bf16 ulp (7 stored mantissa bits)
        if diff.any():
            worst = max(worst, float((np.abs(x - y)[diff] / ulp[diff]).max()))
        differing += int(np.count_nonzero(diff))
        total += x.size
        if inputs is not None and diff.any():
            base = inputs[0].read_float32(name)
            tied = np.zeros(x.shape, bool)
            for f in inputs[1:]:
                d = np.abs((f.read_float32(name) - base).astype(ml_dtypes.bfloat16).astype(np.float32))
                keep = max(1, int(density * d.size))
                cut = np.partition(d.ravel(), d.size - keep)[d.size - keep]
                tied |= d == cut
            untied += int(np.count_nonzero(diff & ~tied))
    out = {"max_bf16_ulp": round(worst, 2), "fraction_differing": differing / total}
    if inputs is not None:
        out["fraction_differing_not_at_a_tie"] = untied / total
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["245m"], choices=sorted(SIZES))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=sorted(RECIPES))
    parser.add_argument("--mergekit-python", default=None)
    parser.add_argument("--out", default=os.path.join(RESULTS, "bench_llm"))
    parser.add_argument("--jobs", default="data_free", help="comma-separated: data_free (MergeKit recipes), "
                        "exemplar (CAT and RegMean with exemplars vs PyTorch hooks: bench_llm_exemplars.py)")
    args = parser.parse_args(argv)
    if "exemplar" in args.jobs.split(","):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_llm_exemplars

        bench_llm_exemplars.main(["--sizes", *args.sizes])
    if "data_free" not in args.jobs.split(","):
        return 0
    python = mergekit_python(args.mergekit_python)
    rows = []
    with open(args.out + ".log", "w") as log:
        log.write(f"bench_llm: {time.strftime('%Y-%m-%d %H:%M:%S')} cpus={os.cpu_count()} "
                  f"load={os.getloadavg()} (a shared machine: other work may run meanwhile)\n")
        for size in args.sizes:
            t = time.perf_counter()
            folders = make_folders(size)
            log.write(f"folders {size}: {folders} ({time.perf_counter() - t:.1f} s)\n")
        for job in jobs(args.sizes, args.recipes, python):
            row = run_job(job, make_folders(job.size), log)
            rows.append(row)
            print(f"{row['tool']:9s} {row['recipe']:16s} {row['size']:5s} {row['wall_s']:8.1f} s "
                  f"{row['peak_rss_mib']:9.0f} MiB  (load {row['load_before']} -> {row['load_after']})", flush=True)
        summary = []
        for size in args.sizes:
            for recipe in args.recipes:
                mk = next(r for r in rows if r["tool"] == "mergekit" and r["recipe"] == recipe and r["size"] == size)
                cm = next(r for r in rows if r["tool"] == "catmerge" and r["recipe"] == recipe and r["size"] == size)
                entry = {"recipe": recipe, "size": size, "speedup": round(mk["wall_s"] / cm["wall_s"], 2),
                         "memory_ratio": round(cm["peak_rss_mib"] / mk["peak_rss_mib"], 3),
                         "target_speed_met": cm["wall_s"] <= mk["wall_s"],
                         "target_memory_met": cm["peak_rss_mib"] <= mk["peak_rss_mib"],
                         **agreement(cm["out"], mk["out"], make_folders(size),
                                     RECIPES[recipe]["parameters"].get("density") if recipe == "ties" else None)}
                summary.append(entry)
                print(f"{recipe:16s} {size:5s} speedup {entry['speedup']}x, memory {entry['memory_ratio']}x of "
                      f"MergeKit's, max diff {entry['max_bf16_ulp']} bf16 ulp "
                      f"({entry['fraction_differing']:.2e} of entries differ)", flush=True)
        log.write(json.dumps(summary, indent=2) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"jobs": rows, "summary": summary, "cpus": os.cpu_count(),
                   "folders": {s: SIZES[s]._asdict() for s in args.sizes}, "tasks": TASKS,
                   "recipes": {r: RECIPES[r] for r in args.recipes}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
