"""CAT merge on many processes (TPU pod slice, multi-host GPU): start this same script on every process.

    python experiments/pod_merge.py --out merged.npz          # every host of a TPU pod slice (no other arguments)
    python experiments/pod_merge.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I \\
        --cpu-devices 4 --out merged_I.npz                    # CPU, on one machine: process I of 2, 4 devices each

Every process loads the same inputs (:func:`load_inputs`: replace it with loading your checkpoints and statistics),
the layers are spread over the devices of ALL processes (``layer_mesh()`` is the global mesh), and every process
ends with the whole merged tree, equal to the one-process ``cat_merge``. ``tests/test_multiprocess.py`` runs it
as 2 processes × 4 CPU devices (gloo collectives) and compares both outputs with the one-process merge.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import catmerge_jax as cm
from catmerge_jax.atomic import atomic_file
from catmerge_jax.sharding import cat_merge_sharded, layer_mesh
from catmerge_jax.tree import leaves_with_paths


def load_inputs(num_tasks: int = 3, blocks: int = 5, width: int = 16, hidden: int = 24, rows: int = 5,
                seed: int = 0):
    """``(pretrained, finetuned (K trees), stats (K trees))`` of a small random MLP stack, the same on every process.

    ``blocks`` blocks of ``norm (width,) → up (width, hidden) + bias → down (hidden, width) + bias``: two groups of
    ``blocks`` same-shaped linear layers (5 layers over 8 devices: the groups are zero-padded), with norm scales and
    biases trimmed by their own rules. Statistics are ``rows`` random exemplar rows per task.
    """
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def model(scale):
        return {f"block{b}": {"norm": {"scale": normal(width, scale=scale)},
                              "up": {"kernel": normal(width, hidden, scale=scale),
                                     "bias": normal(hidden, scale=scale)},
                              "down": {"kernel": normal(hidden, width, scale=scale), "bias": normal(width, scale=scale)}}
                for b in range(blocks)}

    pretrained = model(1.0)
    finetuned = [jax.tree.map(np.add, pretrained, model(0.1)) for _ in range(num_tasks)]

    def task_stats():
        by_path = {}
        for b in range(blocks):
            by_path[f"block{b}/norm/scale"] = cm.scale_stats(normal(rows, width))
            by_path[f"block{b}/up/kernel"] = cm.linear_stats(normal(rows, width))
            by_path[f"block{b}/down/kernel"] = cm.linear_stats(normal(rows, hidden))
            by_path[f"block{b}/up/bias"] = by_path[f"block{b}/down/bias"] = cm.count_stats(rows)
        return cm.stats_from_arrays(pretrained, by_path)

    return pretrained, finetuned, [task_stats() for _ in range(num_tasks)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", help="host:port of process 0 (omit on Cloud TPU, Slurm, Open MPI)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--cpu-devices", type=int, help="run on CPU with this many devices per process")
    parser.add_argument("--out", help="write the merged params here (.npz, one array per leaf path)")
    args = parser.parse_args(argv)
    if args.cpu_devices:  # before jax starts: CPU backend, N devices, gloo collectives across processes
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    # --- the pod recipe (docs/pods.md, "On many processes") ---
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    pretrained, finetuned, stats = load_inputs()       # the same inputs on every process
    mesh = layer_mesh()                                 # all devices of all processes
    merged = cat_merge_sharded(pretrained, finetuned, stats, mesh=mesh, alpha=0.3, lam=5.0, c=2)
    # every process now holds the whole merged tree
    # --- end of the recipe ---

    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} of "
          f"{jax.device_count()} devices, {len(jax.tree.leaves(merged))} merged leaves", flush=True)
    if args.out:
        with atomic_file(args.out, "wb") as f:
            np.savez(f, **{path: np.asarray(x) for path, x in leaves_with_paths(merged)})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
