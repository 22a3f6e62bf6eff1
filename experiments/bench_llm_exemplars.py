"""Exemplar merges of the synthetic Llama folders of ``bench_llm.py``: ``catmerge merge --method cat`` and
``--method regmean`` (layer by layer, out of core) against a float32 PyTorch-hook CAT (``torch_llm_cat.py``), whole
jobs as subprocesses in one run, wall time and peak RSS of each.

    python experiments/bench_llm_exemplars.py                          # 245m: base + 4 tasks, 16 layers
    python experiments/bench_llm_exemplars.py --sizes 245m_4layers     # the same shape cut to 4 layers
    python experiments/bench_llm.py --jobs exemplar                    # the same, from bench_llm.py

The folders are ``bench_llm.make_folders``' (bf16, base N(0, 0.02), tasks + N(0, 0.002)). This module adds what an
exemplar merge needs: a word-level ``tokenizer.json`` trained with the ``tokenizers`` package on a generated corpus
(written into the base folder) and per task 8 exemplar lines of 48–63 words (+ BOS: ~64 tokens, padded to 64)
drawn from a task-specific word distribution. Each job is one row of :func:`jobs` (a name and a command line).
Peak RSS is the job process's ``ru_maxrss`` (``wait4``). The memory target is checked on catmerge's rows:
below 3 GB (3·10⁹ bytes) for 4 × 245M bf16. Agreement: the update ``W − W0`` of catmerge's CAT (stored bf16) against
the PyTorch job's float32 result on a few leaves, next to the error of rounding PyTorch's own result to bf16.
Results: ``experiments/results/bench_llm_exemplars.json`` and ``.log`` (load average before and after each job).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_llm  # noqa: E402

ROOT, WORK, RESULTS = bench_llm.ROOT, bench_llm.WORK, bench_llm.RESULTS
LINES, MIN_WORDS, MAX_WORDS, WORDS = 8, 48, 63, 3000
MEMORY_TARGET_BYTES = 3e9
SPECIALS = ["<unk>", "<s>", "</s>"]      # ids 0, 1, 2: the config's bos_token_id 1, eos_token_id 2


def _words(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct pronounceable pseudo-words."""
    consonants, vowels = list("bdfgklmnprstvz"), list("aeiou")
    out: dict[str, None] = {}
    while len(out) < n:
        syllables = rng.integers(1, 4)
        out["".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))] = None
    return list(out)


def write_tokenizer(folder: str) -> list[str]:
    """A word-level tokenizer trained on a generated corpus, saved into ``folder`` (tokenizer.json and a
    tokenizer_config.json that ``transformers`` reads); returns its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    words = _words(np.random.default_rng(1), WORDS)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [" ".join(words[i:i + 50]) for i in range(0, len(words), 50)]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(vocab_size=32000, special_tokens=SPECIALS))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                            special_tokens=[("<s>", 1)])
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "model_max_length": 2048}, f, indent=2)
    return words


def write_exemplars(size: str, folders: list[str]) -> list[str]:
    """The tokenizer in the base folder and one exemplar file per task (written once, then reused)."""
    files = [os.path.join(WORK, size, f"exemplars{k}.txt") for k in range(len(folders) - 1)]
    if all(os.path.exists(f) for f in files) and os.path.exists(os.path.join(folders[0], "tokenizer.json")):
        return files
    words = write_tokenizer(folders[0])
    for k, path in enumerate(files):
        rng = np.random.default_rng(100 + k)
        weights = rng.permutation(1.0 / np.arange(1, len(words) + 1))      # a task's own Zipf-like word use
        lines = [" ".join(rng.choice(words, size=rng.integers(MIN_WORDS, MAX_WORDS + 1), p=weights / weights.sum()))
                 for _ in range(LINES)]
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return files


# catmerge_jax/llm.py's memory formula: stage(P) = (4 + s·K + 4·K + 4·w)·P + stats, for the vocabulary-wide stages
# (embedding, untied head: P = vocab·d), + the hidden states Σ_k 4·N_k·S_k·d, + the process; w: the method's own
# stage-sized arrays (CAT 3, RegMean 4).
WORKSPACE = {"catmerge_cat": 3, "catmerge_regmean": 4}
TOKENS = 64                               # exemplars are padded to ~64 tokens


def formula_mib(size: str, job: str, stored_bytes: int = 2) -> float | None:
    """The formula's arrays (without the process) for ``job`` on ``size``, in MiB."""
    if job not in WORKSPACE:
        return None
    s, k = bench_llm.SIZES[size], bench_llm.TASKS
    p_e = s.vocab * s.hidden
    stage = (4 + stored_bytes * k + 4 * k + 4 * WORKSPACE[job]) * p_e + 4 * k * TOKENS * LINES * s.hidden  # + rows
    hidden = 4 * k * LINES * TOKENS * s.hidden
    return round((stage + hidden) / 2 ** 20, 1)


class Job(NamedTuple):
    name: str
    argv: list[str]


def jobs(folders: list[str], exemplars: list[str], out_dir: str) -> list[Job]:
    """The table: catmerge's CAT and RegMean, then the PyTorch-hook CAT (its float32 leaves dumped)."""
    common = ["--base", folders[0], "--task", *folders[1:], "--exemplars", *exemplars]
    cli = [sys.executable, "-m", "catmerge_jax.cli", "merge"]
    torch_job = [sys.executable, os.path.join(HERE, "torch_llm_cat.py"), *common,
                 "--out", os.path.join(out_dir, "torch_cat"), "--dump", os.path.join(out_dir, "torch_cat.npz"),
                 "--dump-keys", *checked(_layers(folders[0]))]
    return [Job("catmerge_cat", cli + ["--method", "cat", *common, "--out", os.path.join(out_dir, "catmerge_cat"),
                                       "--quiet"]),
            Job("catmerge_regmean", cli + ["--method", "regmean", *common,
                                           "--out", os.path.join(out_dir, "catmerge_regmean"), "--quiet"]),
            Job("torch_cat_hooks_f32", torch_job)]


def checked(layers: int) -> list[str]:
    """Leaves whose CAT update is compared with the PyTorch job's (every kind: table, linear, RMSNorm, the LM head;
    the first and the last block)."""
    last = f"model.layers.{layers - 1}."
    return ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight", last + "mlp.gate_proj.weight", last + "self_attn.v_proj.weight",
            last + "post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"]


def _layers(folder: str) -> int:
    with open(os.path.join(folder, "config.json")) as f:
        return int(json.load(f)["num_hidden_layers"])


def run_job(job: Job, folders: list[str], out: str, log) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    bench_llm._warm(folders)
    load_before = os.getloadavg()
    env = dict(os.environ, PYTHONPATH=ROOT)
    start = time.perf_counter()
    proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    output = proc.stdout.read().decode(errors="replace")     # drained while it runs (a full pipe would block it)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    row = {"job": job.name, "wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
           "exit": code, "load_before": [round(x, 2) for x in load_before],
           "load_after": [round(x, 2) for x in os.getloadavg()], "argv": " ".join(job.argv)}
    log.write(f"\n=== {job.name}: {json.dumps(row)}\n{output[-3000:]}\n")
    log.flush()
    if code != 0:
        raise SystemExit(f"{job.name} failed (exit {code}); see the log")
    return row


def agreement(base_dir: str, ours_dir: str, torch_npz: str) -> dict:
    """Per checked leaf: ``‖ΔW_ours − ΔW_torch‖ / ‖ΔW_torch‖`` (ours stored bf16, torch float32) and the same for
    PyTorch's own result rounded to bf16 (the floor any bf16 output has)."""
    import ml_dtypes

    sys.path.insert(0, ROOT)
    from catmerge_jax.folders import open_folder

    base, ours, ref = open_folder(base_dir), open_folder(ours_dir), np.load(torch_npz)
    out = {}
    for key in checked(_layers(base_dir)):
        w0 = base.read_float32(key).astype(np.float64)
        want = ref[key].astype(np.float64) - w0
        got = ours.read_float32(key).astype(np.float64) - w0
        rounded = ref[key].astype(ml_dtypes.bfloat16).astype(np.float64) - w0
        norm = np.linalg.norm(want)
        out[key] = {"update_error": float(np.linalg.norm(got - want) / norm),
                    "update_error_vs_torch_rounded_bf16": float(np.linalg.norm(got - rounded) / norm),
                    "bf16_rounding_floor": float(np.linalg.norm(rounded - want) / norm),
                    "fraction_bf16_differing_from_torch_rounded": float(np.mean(got != rounded))}
    return out


def previous_rows(path: str, size: str, job: str) -> list[dict]:
    """``job``'s rows for ``size`` in an earlier results file (``[]`` if none), marked as carried over."""
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return []
    rows = [dict(r) for r in earlier.get("jobs", []) if r.get("size") == size and r.get("job") == job]
    for r in rows:
        r.setdefault("carried_over", f"not rerun: the row of the earlier committed run of the same command in {path} "
                                     f"(git log -- {os.path.relpath(path, ROOT)})")
    return rows


def run(size: str, log, only: list[str] | None = None, carried: list[dict] | None = None) -> dict:
    t = time.perf_counter()
    folders = bench_llm.make_folders(size)
    exemplars = write_exemplars(size, folders)
    log.write(f"folders {size}: {folders}, exemplars {exemplars} ({time.perf_counter() - t:.1f} s)\n")
    out_dir = os.path.join(WORK, "out_exemplar", size)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for job in jobs(folders, exemplars, out_dir):
        if only and job.name not in only:
            continue
        row = run_job(job, folders, os.path.join(out_dir, job.name.replace("_hooks_f32", "")), log)
        rows.append({"size": size, **row})
        print(f"{size:13s} {row['job']:20s} {row['wall_s']:8.1f} s {row['peak_rss_mib']:9.0f} MiB  "
              f"(load {row['load_before'][0]} -> {row['load_after'][0]})", flush=True)
    for row in carried or []:      # the PyTorch job's figure from the earlier run, when it is not rerun
        log.write(f"\n=== {row['job']}: NOT RERUN; {row['carried_over']}: {json.dumps(row)}\n")
        rows.append(row)
    reference = next((r for r in rows if r["job"].startswith("torch")), None)
    for row in rows:
        row["wall_ratio_torch_over_this"] = reference and round(reference["wall_s"] / row["wall_s"], 2)
        row["rss_ratio_this_over_torch"] = reference and round(row["peak_rss_mib"] / reference["peak_rss_mib"], 3)
        if row["job"].startswith("catmerge"):
            row["memory_target_met"] = row["peak_rss_mib"] * 2 ** 20 < MEMORY_TARGET_BYTES
            row["formula_arrays_mib"] = formula_mib(size, row["job"])
            row["process_mib"] = round(row["peak_rss_mib"] - row["formula_arrays_mib"], 1)
            log.write(f"{size} {row['job']}: peak RSS {row['peak_rss_mib']} MiB = formula's arrays "
                      f"{row['formula_arrays_mib']} MiB (llm.py: (4 + s·K + 4·K + 4·w)·vocab·d + rows + hidden states, "
                      f"s = 2, K = {bench_llm.TASKS}, w = {WORKSPACE[row['job']]}) + {row['process_mib']} MiB process; "
                      f"target {MEMORY_TARGET_BYTES / 2 ** 20:.0f} MiB (3e9 B): "
                      f"{'met' if row['memory_target_met'] else 'NOT met'}\n")
    done = {r["job"] for r in rows}
    torch_npz = os.path.join(out_dir, "torch_cat.npz")   # a carried-over row's dump is the earlier run's
    agree = agreement(folders[0], os.path.join(out_dir, "catmerge_cat"), torch_npz
                      ) if {"catmerge_cat", "torch_cat_hooks_f32"} <= done and os.path.exists(torch_npz) else None
    return {"rows": rows, "agreement": agree}


def _num(x, width: int, digits: int) -> str:
    return f"{'-':>{width}s}" if x is None else f"{x:{width}.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = [f"{'size':13s} {'job':20s} {'wall s':>8s} {'peak RSS MiB':>13s} {'torch/this wall':>16s} "
             f"{'this/torch RSS':>15s}  load avg before"]
    for r in rows:
        lines.append(f"{r['size']:13s} {r['job']:20s} {r['wall_s']:8.1f} {r['peak_rss_mib']:13.0f} "
                     f"{_num(r['wall_ratio_torch_over_this'], 16, 2)} {_num(r['rss_ratio_this_over_torch'], 15, 3)}  "
                     f"{r['load_before']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["245m"], choices=sorted(bench_llm.SIZES))
    parser.add_argument("--out", default=os.path.join(RESULTS, "bench_llm_exemplars"))
    parser.add_argument("--only", nargs="+", choices=["catmerge_cat", "catmerge_regmean", "torch_cat_hooks_f32"],
                        help="run only these jobs (default: all three)")
    parser.add_argument("--skip-torch", action="store_true",
                        help="run only catmerge's jobs; the PyTorch-hook job's row (≈ 27 min for 245m_4layers) is "
                             "carried over from the earlier results file --out.json, marked so, and the agreement is "
                             "computed against that run's float32 dump if it is still in the work folder")
    args = parser.parse_args(argv)
    if args.skip_torch:
        args.only = [j for j in (args.only or ["catmerge_cat", "catmerge_regmean"]) if not j.startswith("torch")]
    carried = {size: previous_rows(args.out + ".json", size, "torch_cat_hooks_f32") if args.skip_torch else []
               for size in args.sizes}
    rows, agree = [], {}
    with open(args.out + ".log", "w") as log:
        log.write(f"bench_llm_exemplars: {time.strftime('%Y-%m-%d %H:%M:%S')} cpus={os.cpu_count()} "
                  f"load={os.getloadavg()} (a shared machine: other work may run meanwhile)\n")
        for size in args.sizes:   # results rewritten after each size, so a long later size keeps the earlier ones
            result = run(size, log, args.only, carried[size])
            rows += result["rows"]
            agree[size] = result["agreement"]
            text = table(rows)
            log.write("\n" + text + "\n" + json.dumps(agree, indent=2) + "\n")
            log.flush()
            print(text + "\n" + json.dumps(agree[size], indent=2), flush=True)
            with open(args.out + ".json", "w") as f:
                json.dump({"jobs": rows, "agreement": agree, "cpus": os.cpu_count(),
                           "memory_target_bytes": MEMORY_TARGET_BYTES,
                           "folders": {s: bench_llm.SIZES[s]._asdict() for s in agree}, "tasks": bench_llm.TASKS,
                           "exemplars_per_task": LINES, "words_per_line": [MIN_WORDS, MAX_WORDS],
                           "cat_hparams": {"alpha": 0.3, "lam": 5.0, "c": 3}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
