"""Benchmark: CAT merge of ViT-shaped parameter trees in JAX (batched fast paths) vs a straightforward PyTorch port.

Synthetic pre-LN transformer (per block ln_1, q/k/v/out, ln_2, fc1/fc2, with biases), random weights; task
vectors are low-rank plus noise like real fine-tuning updates. K tasks, E exemplars per task of T tokens.
Timed separately: feature capture, bases + masks, applying them, and the first call (compile + run).
Both implementations get identical inputs; their merged trees must agree (relative Frobenius error ≤ 1e-4 per
leaf).

    PYTHONPATH=. python experiments/bench_merge.py --model b32              # full ViT-B/32 shape
    PYTHONPATH=. python experiments/bench_merge.py --model l14 --blocks 1   # one ViT-L/14 block
    PYTHONPATH=. python experiments/bench_merge.py --model minilm --repeats 3  # all-MiniLM-L6-v2 shapes, K = 3
    PYTHONPATH=. python experiments/bench_merge.py --solvers                # eigh vs block Krylov per size
    PYTHONPATH=. python experiments/bench_merge.py --quick --results ''     # smoke test, nothing written

Every run writes what it printed to ``<results>/bench_<mode>.log`` and the numbers behind it (the command, the
machine, settings, the table, agreement, solver counts) to ``<results>/bench_<mode>.json``, both atomically
(``--results`` defaults to ``experiments/results``; ``''`` writes nothing). The mode names the run: ``b32``,
``l14_blocks1``, ``minilm``, ``solvers``, ``quick``, with ``_jax`` appended under ``--skip-torch``. The README's
performance figures are read from those files.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import catmerge_jax as cm  # noqa: E402
from catmerge_jax.batched import cat_merge_batched, plan_linear  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Recorder:
    """What a benchmark prints (:meth:`say`) and the numbers behind it (:attr:`data`), written at the end as
    ``bench_<mode>.log`` and ``bench_<mode>.json`` (:meth:`write`, each file atomically)."""

    def __init__(self, mode: str, script: str, argv):
        self.mode = mode
        self.lines: list[str] = []
        self.data: dict = {"mode": mode, "command": " ".join(["python", script, *argv]),
                           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "machine": machine_info()}

    def say(self, *parts) -> None:
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        self.lines.extend(text.splitlines() or [""])

    def write(self, folder: str | None) -> list[str]:
        """Write both files into ``folder`` (none when it is empty/None); returns their paths."""
        if not folder:
            return []
        from catmerge_jax.atomic import atomic_file

        os.makedirs(folder, exist_ok=True)
        self.data["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        paths = [os.path.join(folder, f"bench_{self.mode}.{ext}") for ext in ("json", "log")]
        with atomic_file(paths[0], "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, default=str)
            f.write("\n")
        with atomic_file(paths[1], "w", encoding="utf-8") as f:
            f.write(f"$ {self.data['command']}\n" + "\n".join(self.lines) + "\n")
        return paths


class MemoryLog:
    """This process's resident memory per stage of a run, in MiB, from ``/proc/self/status`` (Linux; elsewhere
    nothing is recorded): at each :meth:`mark` the resident set now (``VmRSS``) and its peak since the previous mark
    (``VmHWM``, reset after each reading through ``/proc/self/clear_refs``, so every stage gets its own peak).
    :attr:`peak_mib` is the run's peak: the largest of them. Reading costs microseconds; no sampling thread."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}
        self.peak_mib: float | None = None
        self._reset()

    @staticmethod
    def _status() -> dict[str, float] | None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        except OSError:
            return None
        return {key: int(value.split()[0]) / 1024 for key, value in fields.items()}  # kB → MiB

    @staticmethod
    def _reset() -> None:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # 5: reset the peak resident set size to the current one
        except OSError:
            pass

    def mark(self, stage: str) -> None:
        status = self._status()
        if status is None:
            return
        self.stages[stage] = {"rss_mib": round(status["VmRSS"]), "peak_mib": round(status["VmHWM"])}
        self.peak_mib = max(self.peak_mib or 0.0, status["VmHWM"])
        self._reset()

    def as_dict(self) -> dict:
        return {"peak_rss_mib": None if self.peak_mib is None else round(self.peak_mib), "stages": self.stages}


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; nothing where there is none). The
    capture's freed temporaries (small arrays, so heap rather than mmap'ed) otherwise stay resident beside the merge
    that follows: 0.8–0.9 GiB for ViT-B/32 at K = 20."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fastest(call, repeats: int):
    """``(seconds, result)`` of the fastest of ``repeats`` calls of ``call()`` (each result blocked on)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(call())
        if time.perf_counter() - t0 < best:
            best, result = time.perf_counter() - t0, out
    return best, result


def lapack_floor(groups: list[dict], num_tasks: int, rows: int, c: int, repeats: int) -> tuple[float, list[dict]]:
    """Seconds of the merge's LAPACK factorizations alone, per group and in total.

    For each linear group the plan ran, the same calls on random matrices of the same shapes, one per
    (layer, task) as the merge makes them: the exact top-(c + 1) eigenpairs of each ``out × out`` ``G_k``
    (explicit groups), or :func:`catmerge_jax.linalg.factored_largest` of each ``(m, out)`` row block,
    ``m = 2(K − 1)·rows + c`` (its Householder QR, the top eigenpairs of the ``m × m`` core, Q applied to them; the
    low-rank groups). No G_k is formed and nothing else runs: a bound from below on what any exact merge with
    these solvers costs on this machine.
    """
    from catmerge_jax.linalg import eigh_largest, factored_largest

    rng = np.random.default_rng(0)

    def symmetric(batch, n):
        a = rng.standard_normal((batch, n, n)).astype(np.float32)
        return jnp.asarray(a + np.swapaxes(a, -1, -2))

    top = jax.jit(lambda g: eigh_largest(g, c + 1)[1])
    factored = jax.jit(lambda z, w: factored_largest(z, w, c + 1)[1])
    total, per_group = 0.0, []
    for g in groups:
        if g["solver"] != "eigh":
            continue
        fan_out, count = g["shape"][1], g["layers"] * num_tasks
        if g["strategy"] == "low_rank":
            m = 2 * (num_tasks - 1) * rows + c
            blocks = jnp.asarray(rng.standard_normal((count, m, fan_out)).astype(np.float32))
            weights = jnp.asarray(rng.standard_normal((count, m)).astype(np.float32))
            jax.block_until_ready(factored(blocks, weights))
            seconds, _ = fastest(lambda: factored(blocks, weights), repeats)
            calls = f"{count} QR ({fan_out}, {m}) + top-{c + 1} of their {m}² cores + Q applied to {c + 1} vectors"
        else:
            mats = symmetric(count, fan_out)
            jax.block_until_ready(top(mats))
            seconds, _ = fastest(lambda: top(mats), repeats)
            calls = f"{count} top-{c + 1} of {fan_out}²"
        total += seconds
        per_group.append({"shape": g["shape"], "calls": calls, "seconds": seconds})
    return total, per_group


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """This process's float32 matmul rate (flop/s): the fastest of ``repeats`` jitted ``size``² products."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    seconds, _ = fastest(lambda: product(a), repeats + 1)
    return 2.0 * size ** 3 / seconds


def plan_work_flops(group: dict, num_tasks: int, rows: int, c: int) -> float:
    """Flops one layer of ``group`` must do under its plan, as a bound from below: the products ``Y_ki = X_k T_i``
    for all K² pairs, the ``(out, out)`` ``G_k`` build where the plan forms it (all K² blocks of rows, or the
    Grams), and ONE block Krylov pass (no restart) through the plan's operator, or the dense eigh's 9·out³."""
    from catmerge_jax.linalg import eigh_flops, krylov_config, krylov_flops

    k, (a, b) = num_tasks, group["shape"]
    strategy, solver, form = group["strategy"], group["solver"], group["form"]
    y = k * k * 2.0 * rows * a * b if form == "rows" else 0.0
    cfg = krylov_config(c, b)
    if strategy == "rows_krylov":
        return y + k * krylov_flops(b, cfg, 4.0 * 2 * (k - 1) * rows * b, expected_restarts=1)
    if strategy == "matrix_free":
        return y + k * krylov_flops(b, cfg, 8.0 * k * rows * b, expected_restarts=1)
    if strategy == "low_rank":
        m = 2 * (k - 1) * rows + c
        return y + k * (4.0 * b * m * m + eigh_flops(m))
    build = k * k * 2.0 * rows * b * b if form == "rows" else k * k * (2.0 * a * a * b + 2.0 * a * b * b)
    solve = eigh_flops(b) if solver == "eigh" else krylov_flops(b, cfg, expected_restarts=1)
    return y + build + k * solve


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def machine_info() -> dict:
    """Where the numbers come from: CPUs, load at the start, library versions, JAX devices."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average_1_5_15": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
    return info


# The merge-total speed-up over the PyTorch reference each model's benchmark is held to (issue 26): printed with
# what the run measured, so the log says whether it is met.
TARGETS = {"b32": 10.0, "l14": 5.0}
MODELS = {  # blocks, width, mlp, tokens per exemplar (image patches + class token, or a sentence), heads
    "b32": (12, 768, 3072, 50, 12),
    "l14": (24, 1024, 4096, 257, 16),
    "minilm": (6, 384, 1536, 32, 12),  # all-MiniLM-L6-v2's encoder shapes; 32-token sentences
    "quick": (2, 128, 512, 16, 4),
}


def block_shapes(width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{m}/kernel": (width, width) for m in ("query", "key", "value", "out")}
    shapes.update({f"{m}/bias": (width,) for m in ("query", "key", "value", "out")})
    shapes.update({"fc1/kernel": (width, mlp), "fc1/bias": (mlp,), "fc2/kernel": (mlp, width), "fc2/bias": (width,)})
    for ln in ("ln_1", "ln_2"):
        shapes.update({f"{ln}/scale": (width,), f"{ln}/bias": (width,)})
    return shapes


def make_models(blocks: int, width: int, mlp: int, num_tasks: int, features: np.ndarray, seed: int = 0):
    """``(pretrained, [finetuned_k])`` as flat ``{blocks/b/module/leaf: float32 array}`` dicts.

    Kernel task vectors are rank-8 with a decaying spectrum plus noise; their input directions lean on OTHER
    tasks' feature subspaces ``features`` (K, width, r) — interference CAT is meant to remove — with a
    random magnitude per (task, leaf), so the top eigenvalues of ``G_k`` are positive and separated.
    """
    rng = np.random.default_rng(seed)
    shapes = block_shapes(width, mlp)
    base, tasks = {}, [{} for _ in range(num_tasks)]
    for b in range(blocks):
        for name in sorted(shapes, key=lambda n: ("fc2" in n or "out" in n, n)):  # fc1/value before fc2/out
            shape = shapes[name]
            path = f"blocks/{b}/{name}"
            if name.endswith("kernel"):
                base[path] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
            elif name.endswith("scale"):
                base[path] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            else:
                base[path] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
            for k in range(num_tasks):
                if name.endswith("kernel"):
                    r = 8
                    others = [j for j in range(num_tasks) if j != k] or [k]
                    f = features[rng.choice(others)][:, :r]  # (width, r)
                    if name.startswith("fc2"):  # map the feature directions into the layer's input space
                        f = base[f"blocks/{b}/fc1/kernel"].T @ f
                    elif name.startswith("out"):
                        f = base[f"blocks/{b}/value/kernel"].T @ f
                    f = f / np.linalg.norm(f, axis=0, keepdims=True)
                    u = (0.8 * f + 0.6 * rng.standard_normal((shape[0], r)) / np.sqrt(shape[0]))
                    u = u * (0.6 ** np.arange(r)) * np.exp(0.7 * rng.standard_normal())
                    tv = 0.05 * (u @ rng.standard_normal((r, shape[1]))) / np.sqrt(shape[1])
                    tv += 0.001 * rng.standard_normal(shape) / np.sqrt(shape[0])
                else:
                    tv = 0.01 * rng.standard_normal(shape)
                tasks[k][path] = (base[path] + tv).astype(np.float32)
    return base, tasks


def make_exemplars(num_tasks: int, exemplars: int, tokens: int, width: int, seed: int = 1):
    """``(features (K, width, 16), exemplars (K, E, T, width))``: task k's tokens live mostly in its subspace."""
    rng = np.random.default_rng(seed)
    features = np.linalg.qr(rng.standard_normal((num_tasks, width, 16)))[0]
    coeff = rng.standard_normal((num_tasks, exemplars, tokens, 16)) * (2.0 ** -np.arange(16) * 4.0)
    x = np.einsum("ketr,kdr->ketd", coeff, features) + 0.3 * rng.standard_normal((num_tasks, exemplars, tokens, width))
    return features, x.astype(np.float32)


def nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    xhat = (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    return xhat * scale + bias, xhat


def block_forward(p: dict, h: jax.Array, heads: int):
    """One pre-LN block; returns ``(h_out, captured)`` with the inputs of every linear and both x̂."""
    b, t, d = h.shape
    x1, xhat1 = _layer_norm(h, p["ln_1"]["scale"], p["ln_1"]["bias"])
    dense = lambda x, m: x @ p[m]["kernel"] + p[m]["bias"]  # noqa: E731
    split = lambda y: y.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(dense(x1, "query")), split(dense(x1, "key")), split(dense(x1, "value"))
    att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / (d // heads) ** 0.5, axis=-1)
    a = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    h = h + dense(a, "out")
    x2, xhat2 = _layer_norm(h, p["ln_2"]["scale"], p["ln_2"]["bias"])
    f = jax.nn.gelu(dense(x2, "fc1"), approximate=True)
    h = h + dense(f, "fc2")
    return h, {"x1": x1, "a": a, "x2": x2, "f": f, "xhat1": xhat1, "xhat2": xhat2}


def capture_fn(heads: int):
    """Jitted: stacked block params ``(blocks, ...)`` and exemplars ``(E, T, D)`` → captured inputs per block."""

    @jax.jit
    def run(stacked, h):
        def step(h, p):
            return block_forward(p, h, heads)

        return jax.lax.scan(step, h, stacked)[1]

    return run


def stats_tree(captured: dict, blocks: int, pretrained_tree: dict) -> dict:
    """A stats tree (rows form while rows < in) from one task's captured arrays."""
    by_path = {}
    for b in range(blocks):
        grab = {name: np.asarray(v[b]) for name, v in captured.items()}
        rows = {"query": "x1", "key": "x1", "value": "x1", "out": "a", "fc1": "x2", "fc2": "f"}
        for module, src in rows.items():
            by_path[f"blocks/{b}/{module}/kernel"] = cm.linear_stats(grab[src])
            by_path[f"blocks/{b}/{module}/bias"] = cm.count_stats(grab[src].shape[0] * grab[src].shape[1])
        for ln, src in (("ln_1", "xhat1"), ("ln_2", "xhat2")):
            by_path[f"blocks/{b}/{ln}/scale"] = cm.scale_stats(grab[src])
            by_path[f"blocks/{b}/{ln}/bias"] = cm.count_stats(grab[src].shape[0] * grab[src].shape[1])
    return cm.stats_from_arrays(pretrained_tree, by_path)


def stack_blocks(flat: dict[str, np.ndarray], blocks: int) -> dict:
    per_block = [nest({p.split("/", 2)[2]: v for p, v in flat.items() if p.split("/")[1] == str(b)})
                 for b in range(blocks)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)


def jax_capture(finetuned, exemplars, blocks, heads, pretrained_tree):
    """``(stats per task, capture seconds, compile seconds)``: each task's forward pass and its statistics.

    One task's stacked block params ``(blocks, ...)`` exist at a time (stacking all K first held a second copy of
    every fine-tuned model: 6.8 GB at K = 20 for ViT-B/32); the stacking stays outside the timed part, as before.
    """
    run = capture_fn(heads)
    stacked = stack_blocks(finetuned[0], blocks)
    t0 = time.perf_counter()
    jax.block_until_ready(run(stacked, exemplars[0]))
    compile_s = time.perf_counter() - t0
    stats, capture_s = [], 0.0
    for k, (f, x) in enumerate(zip(finetuned, exemplars)):
        if k:
            stacked = stack_blocks(f, blocks)
        t0 = time.perf_counter()
        captured = jax.tree.map(np.asarray, run(stacked, jnp.asarray(x)))
        stats.append(stats_tree(captured, blocks, pretrained_tree))
        capture_s += time.perf_counter() - t0
        stacked = captured = None  # freed before the next task's copy is made
    return stats, capture_s, compile_s


def solver_table(sizes=(768, 3072, 4096), c: int = 3, num_tasks: int = 8, rows: int = 150, seed: int = 0,
                 rec: Recorder | None = None) -> list[dict]:
    """Time eigh vs the block Krylov solver on one CAT-like ``G_k`` per size; report the projector difference."""
    from catmerge_jax.linalg import block_krylov_top, eigh_top

    say = rec.say if rec is not None else print
    rng = np.random.default_rng(seed)
    say("\n| out | eigh (s) | block Krylov (s) | speed-up | converged | max |P_it − P_eigh| |\n"
        "|---:|---:|---:|---:|---|---:|")
    table = []
    for n in sizes:
        # G_k = Σ_{i≠k} Y_kiᵀY_ki − λ Σ_{i≠k} Y_iiᵀY_ii with low-rank-plus-noise Y, as from CAT's rows form.
        def y():
            u = rng.standard_normal((rows, 8)) * (0.6 ** np.arange(8)) * np.exp(0.7 * rng.standard_normal())
            return u @ rng.standard_normal((8, n)) + 0.05 * rng.standard_normal((rows, n))

        g = sum(a.T @ a for a in (y() for _ in range(num_tasks - 1)))
        g -= 5.0 * sum(a.T @ a for a in (0.3 * y() for _ in range(num_tasks - 1)))
        g = jnp.asarray(g, jnp.float32)
        eigh_fn = jax.jit(lambda a: eigh_top(a, c))
        it_fn = jax.jit(lambda a: block_krylov_top(a, c))
        times = {}
        for label, fn in (("eigh", eigh_fn), ("iterative", it_fn)):
            jax.block_until_ready(fn(g))
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(g))
            times[label] = (time.perf_counter() - t0, out)
        b_e = np.asarray(times["eigh"][1], np.float64)
        res = times["iterative"][1]
        b_i = np.asarray(res.vectors, np.float64)
        diff = float(np.abs(b_i @ b_i.T - b_e @ b_e.T).max())
        te, ti = times["eigh"][0], times["iterative"][0]
        table.append({"out": n, "eigh_s": te, "iterative_s": ti, "speedup": te / ti,
                      "converged": bool(res.converged), "projector_difference": diff})
        say(f"| {n} | {te:.3f} | {ti:.3f} | {te / ti:.1f}× | {bool(res.converged)} | {diff:.1e} |")
    if rec is not None:
        rec.data.update({"c": c, "tasks": num_tasks, "rows": rows, "seed": seed, "solvers": table})
    return table


def run_mode(args) -> str:
    """The name of a run's result files: ``solvers``, ``quick``, ``b32``, ``l14_blocks1``, … (+ ``_jax``)."""
    if args.solvers:
        return "solvers_quick" if args.quick else "solvers"
    mode = ("quick" if args.quick else args.model) + (f"_blocks{args.blocks}" if args.blocks else "")
    return mode + ("_jax" if args.skip_torch else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("b32", "l14", "minilm"), default="b32")
    parser.add_argument("--tasks", type=int, default=None, help="K (default: 3 for minilm, 8 for the ViTs)")
    parser.add_argument("--exemplars", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=None, help="limit the number of blocks (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke test)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--solver", default="auto", choices=("auto", "eigh", "iterative"))
    parser.add_argument("--strategy", default="auto",
                        choices=("auto", "explicit", "matrix_free", "rows_krylov", "low_rank"))
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--lam", type=float, default=5.0)
    parser.add_argument("--c", type=int, default=3)
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="steady runs of each implementation; the fastest is reported (the first JAX call, "
                             "with compilation, is timed separately)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--min-gap", type=float, default=None,
                        help="extra smallest relative eigengap the iterative solver accepts (default 0: only the "
                             "precision floor; e.g. 1e-3 sends near-ties to eigh)")
    parser.add_argument("--check-eigh", action="store_true",
                        help="with --skip-torch: check the merge against the all-eigh JAX merge instead")
    parser.add_argument("--solvers", action="store_true", help="only time eigh vs iterative per matrix size")
    parser.add_argument("--results", default=None, metavar="DIR",
                        help="write bench_<mode>.json/.log here (default experiments/results; --quick: nowhere; "
                             "'' for nowhere)")
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    results = (None if args.quick else RESULTS) if args.results is None else args.results
    if not args.skip_torch and not args.solvers:
        import torch  # noqa: F401  (imported before machine_info so its version is recorded)
    rec = Recorder(run_mode(args), "experiments/bench_merge.py", raw)
    rec.data["settings"] = {k: v for k, v in vars(args).items() if k != "results"}
    if args.solvers:
        solver_table((256, 512) if args.quick else (768, 3072, 4096), c=args.c, rec=rec)
        for path in rec.write(results):
            print(f"wrote {path}")
        return 0

    blocks, width, mlp, tokens, heads = MODELS["quick" if args.quick else args.model]
    blocks = min(blocks, args.blocks) if args.blocks else blocks
    num_tasks = args.tasks if args.tasks is not None else (3 if args.model == "minilm" and not args.quick else 8)
    name = "quick" if args.quick else args.model
    rec.data["shape"] = {"blocks": blocks, "width": width, "mlp": mlp, "tokens": tokens, "heads": heads}
    rec.say(f"model={name} blocks={blocks} width={width} mlp={mlp} tokens={tokens} K={num_tasks} "
            f"exemplars={args.exemplars} c={args.c} lam={args.lam} devices={jax.devices()} "
            f"load average {rec.data['machine']['load_average_1_5_15']}")
    plans = {}
    for fan_in, fan_out in ((width, width), (width, mlp), (mlp, width)):
        plan = plan_linear(num_tasks, fan_in, fan_out, args.c, rows=args.exemplars * tokens, solver=args.solver,
                           strategy=args.strategy)
        plans[f"{fan_in}x{fan_out}"] = plan._asdict()
        rec.say(f"  plan ({fan_in}, {fan_out}): {plan}")
    rec.data["plans"] = plans

    memory = MemoryLog()  # resident memory per stage, into the JSON (the printed output is unchanged)
    features, exemplars = make_exemplars(num_tasks, args.exemplars, tokens, width)
    base, finetuned = make_models(blocks, width, mlp, num_tasks, features)
    base_tree = nest(base)
    ft_trees = [nest(f) for f in finetuned]
    memory.mark("models")

    stats, capture_s, capture_compile_s = jax_capture(finetuned, exemplars, blocks, heads, base_tree)
    release_free_heap()  # untimed, before the merges
    memory.mark("capture")
    kwargs = dict(alpha=args.alpha, lam=args.lam, c=args.c, solver=args.solver, strategy=args.strategy,
                  min_gap=args.min_gap)
    t0 = time.perf_counter()
    jax.block_until_ready(cat_merge_batched(base_tree, ft_trees, stats, **kwargs))
    first_s = time.perf_counter() - t0
    release_free_heap()  # untimed: what the first call freed goes back too, so the timed call's peak is its own
    memory.mark("first call")
    def timed_merge():  # the merge and its own stage timings, so the fastest call keeps its breakdown
        clock: dict = {}
        return cat_merge_batched(base_tree, ft_trees, stats, timings=clock, **kwargs), clock

    merge_s, (merged, timings) = fastest(timed_merge, args.repeats)
    memory.mark("merge (steady)")
    rate = matmul_rate()
    rec.say(f"linear solves: {timings['solves']}, eigh fallbacks: {timings['fallbacks']}; float32 matmul rate "
            f"{rate / 1e9:.1f} GFLOP/s (2048² products, fastest of 6, this process)")
    floor_total, bases_total = 0.0, 0.0
    for g in timings["groups"]:
        work = g["layers"] * plan_work_flops(g, num_tasks, args.exemplars * tokens, args.c)
        g["floor_gflop"], g["floor_seconds"] = work / 1e9, work / rate
        floor_total += work / rate
        bases_total += g["bases_seconds"]
        rec.say(f"  group {g['shape']} × {g['layers']} layers: {g['strategy']}/{g['solver']} ({g['form']}), "
                f"{g['fallbacks']} fallbacks, bases {g['bases_seconds']:.2f} s; floor: {work / 1e9:.0f} GFLOP / "
                f"{rate / 1e9:.1f} GFLOP/s = {work / rate:.2f} s (bases at {g['bases_seconds'] / (work / rate):.1f}× "
                f"the floor)")
    rec.say(f"floor, all linear groups: {floor_total:.2f} s; bases {bases_total:.2f} s = "
            f"{bases_total / max(floor_total, 1e-9):.1f}× the floor")
    rec.data["floor"] = {"matmul_gflops": rate / 1e9, "seconds": floor_total, "bases_seconds": bases_total}
    rec.data["jax"] = {"solves": timings["solves"], "fallbacks": timings["fallbacks"],
                       "unresolved": len(timings.get("unresolved", [])), "groups": timings["groups"]}
    floor_s, floor_groups = lapack_floor(timings["groups"], num_tasks, args.exemplars * tokens, args.c, args.repeats)
    for g in floor_groups:
        rec.say(f"  LAPACK alone for group {g['shape']}: {g['calls']}: {g['seconds']:.2f} s")
    if floor_groups:
        rec.say(f"LAPACK factorizations alone (same calls on random matrices of the same shapes): {floor_s:.2f} s")
    else:
        rec.say("LAPACK factorizations: none (every group's plan solves iteratively)")
    rec.data["lapack_floor"] = {"seconds": floor_s, "groups": floor_groups}
    rows = [("capture (features → stats)", capture_s, None), ("bases + masks", timings["bases"], None),
            ("apply", timings["apply"], None), ("merge total (steady)", merge_s, None),
            ("first call (compile + run)", first_s + capture_compile_s, None)]

    worst = 0.0
    if args.skip_torch and args.check_eigh:
        # Without torch, check against the JAX merge that solves every G_k with a full eigh.
        exact = cat_merge_batched(base_tree, ft_trees, stats, **dict(kwargs, solver="eigh", strategy="explicit"))
        worst = max(float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))
                    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(exact)))
        rec.say(f"max relative error per leaf vs the all-eigh merge: {worst:.2e}")
        rec.data["agreement_vs_eigh"] = {"max_relative_error_per_leaf": worst}
    if not args.skip_torch:
        import torch

        from experiments.torch_reference import cat_merge_torch

        torch.set_num_threads(os.cpu_count() or 1)
        torch_total, (ref, tt) = fastest(
            lambda: cat_merge_torch(base, finetuned, exemplars.reshape(num_tasks, -1, tokens, width), blocks=blocks,
                                    width=width, mlp=mlp, heads=heads, alpha=args.alpha, lam=args.lam, c=args.c),
            args.repeats)
        torch_times = [tt["capture"], tt["bases"], tt["apply"], torch_total - tt["capture"], torch_total]
        rows = [(r[0], r[1], t) for r, t in zip(rows, torch_times)]
        flat = {p: np.asarray(v) for p, v in cm.leaves_with_paths(merged)}
        worst, worst_path, worst_update = 0.0, "", 0.0
        for path, expected in ref.items():
            err = np.linalg.norm(flat[path] - expected) / max(np.linalg.norm(expected), 1e-30)
            upd = np.linalg.norm(flat[path] - expected) / max(np.linalg.norm(expected - base[path]), 1e-30)
            worst_update = max(worst_update, upd)
            if err > worst:
                worst, worst_path = err, path
        rec.say(f"\nagreement: max relative error per leaf {worst:.2e} ({worst_path}); relative to the merged "
                f"update α·ΣT̃: {worst_update:.2e}; torch eigh time {tt['eigh']:.2f} s of {tt['bases']:.2f} s bases")
        rec.data["agreement_vs_torch"] = {"max_relative_error_per_leaf": float(worst), "leaf": worst_path,
                                          "max_error_relative_to_update": float(worst_update),
                                          "tolerance": args.tolerance}
        rec.data["torch"] = {k: float(v) for k, v in tt.items()}
        speedup = torch_times[3] / merge_s  # merge total, PyTorch's over ours
        target = None if args.quick else TARGETS.get(args.model)
        if target is not None:  # the speed-up issue 26 asks of this benchmark, against what this run measured
            rec.say(f"target {target:g}× the PyTorch reference's merge: a {torch_times[3] / target:.2f} s merge; "
                    f"measured {speedup:.1f}× ({'met' if speedup >= target else 'not met'})")
            rec.data["target"] = {"ratio": target, "measured": speedup, "met": speedup >= target}
    rec.say("\n| stage | JAX batched (s) | PyTorch reference (s) | ratio |\n|---|---:|---:|---:|")
    table = []
    for label, jax_s, torch_s in rows:
        ratio = f"{torch_s / jax_s:.1f}×" if torch_s is not None and jax_s > 0 else "–"
        t = f"{torch_s:.2f}" if torch_s is not None else "–"
        rec.say(f"| {label} | {jax_s:.2f} | {t} | {ratio} |")
        table.append({"stage": label, "jax_s": jax_s, "torch_s": torch_s,
                      "ratio": None if torch_s is None or jax_s <= 0 else torch_s / jax_s})
    rec.data["table"] = table
    floor = rec.data["floor"]["seconds"]
    line = f"merge total {merge_s:.2f} s; floor of its linear solves {floor:.2f} s (merge at {merge_s / floor:.1f}× it)"
    if not args.skip_torch:
        line += f"; {speedup:.1f}× the PyTorch reference's merge"
    rec.say(line)
    status = 0
    if not args.skip_torch and worst > args.tolerance:
        rec.say(f"FAILED: relative error {worst:.2e} > {args.tolerance:.0e}")
        status = 1
    rec.data["status"] = status
    memory.mark("rest")
    rec.data["memory"] = memory.as_dict()
    for path in rec.write(results):
        print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
