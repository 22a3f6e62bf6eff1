"""How the batched CAT merge's cost grows with the number of tasks K: ViT-B/32 at K = 4, 8, 14, 20 (our side only).

Runs ``experiments/bench_merge.py --model b32 --skip-torch --tasks K`` once per K (each in its own process, so
one K's compiled programs and memory do not carry into the next), reads each run's JSON, and writes a table of
per-stage seconds against K and the fitted exponent (least-squares slope of log(bases seconds) against log K, per
linear group and in total) to ``<results>/bench_b32_ksweep.{log,json}``. The algorithm's dominant products
``Y_ki = X_k T_i`` and the per-task solves are K² per layer (K tasks, each with 2(K − 1)n rows).

    PYTHONPATH=. python experiments/bench_ksweep.py                      # K = 4 8 14 20, full B/32
    PYTHONPATH=. python experiments/bench_ksweep.py --tasks 2 3 --blocks 1 --results ''   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def slope(ks, seconds) -> float:
    """Least-squares slope of log(seconds) against log(K): the exponent p of seconds ∝ K^p."""
    return float(np.polyfit(np.log(np.asarray(ks, float)), np.log(np.asarray(seconds, float)), 1)[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 8, 14, 20])
    parser.add_argument("--model", default="b32", choices=("b32", "l14", "minilm"))
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--results", default=RESULTS, metavar="DIR", help="'' writes nothing")
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.tasks:
            cmd = [sys.executable, os.path.join(HERE, "bench_merge.py"), "--model", args.model, "--skip-torch",
                   "--tasks", str(k), "--results", os.path.join(tmp, str(k))]
            if args.blocks:
                cmd += ["--blocks", str(args.blocks)]
            say(f"$ {' '.join(cmd[1:])}  (load average {os.getloadavg()})")
            proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
            if proc.returncode != 0:  # e.g. killed for memory at large K: recorded, the other K still count
                say(f"K = {k} failed (exit status {proc.returncode}); left out of the table and the fit")
                continue
            found = [f for f in os.listdir(os.path.join(tmp, str(k))) if f.endswith(".json")]
            with open(os.path.join(tmp, str(k), found[0]), encoding="utf-8") as f:
                runs.append(json.load(f))
    args.tasks = [run["settings"]["tasks"] for run in runs]
    if len(runs) < 2:
        say("fewer than two K ran: no fit")
        return 1
    stages = [row["stage"] for row in runs[0]["table"]]
    shapes = [tuple(g["shape"]) for g in runs[0]["jax"]["groups"]]
    say("\n| K | " + " | ".join(stages) + " | " + " | ".join(f"bases {a}×{b}" for a, b in shapes)
        + " | floor (s) | load |")
    say("|---:|" + "---:|" * (len(stages) + len(shapes) + 2))
    table = []
    for k, run in zip(args.tasks, runs):
        by_stage = {row["stage"]: row["jax_s"] for row in run["table"]}
        by_group = {tuple(g["shape"]): g for g in run["jax"]["groups"]}
        entry = {"K": k, "stages": by_stage,
                 "groups": {f"{a}x{b}": {"seconds": by_group[(a, b)]["bases_seconds"],
                                         "plan": f"{by_group[(a, b)]['strategy']}/{by_group[(a, b)]['solver']}",
                                         "floor_seconds": by_group[(a, b)].get("floor_seconds")}
                            for a, b in shapes},
                 "floor_seconds": run["floor"]["seconds"], "matmul_gflops": run["floor"]["matmul_gflops"],
                 "load_average_1_5_15": run["machine"]["load_average_1_5_15"]}
        table.append(entry)
        say(f"| {k} | " + " | ".join(f"{by_stage[s]:.2f}" for s in stages) + " | "
            + " | ".join(f"{by_group[sh]['bases_seconds']:.2f} ({by_group[sh]['strategy']})" for sh in shapes)
            + f" | {run['floor']['seconds']:.2f} | {run['machine']['load_average_1_5_15'][0]:.2f} |")
    ks = args.tasks
    exponents = {"bases + masks": slope(ks, [t["stages"]["bases + masks"] for t in table]),
                 "merge total (steady)": slope(ks, [t["stages"]["merge total (steady)"] for t in table]),
                 "floor": slope(ks, [t["floor_seconds"] for t in table])}
    for a, b in shapes:
        exponents[f"bases {a}x{b}"] = slope(ks, [t["groups"][f"{a}x{b}"]["seconds"] for t in table])
    say("\nfitted exponent p (seconds ∝ K^p, least squares on log-log over K = " + ", ".join(map(str, ks)) + "):")
    for name, p in exponents.items():
        say(f"  {name}: {p:.2f}")
    data = {"mode": f"{args.model}_ksweep", "command": " ".join(["python", "experiments/bench_ksweep.py", *raw]),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "table": table, "exponents": exponents, "runs": runs}
    if args.results:
        sys.path.insert(0, os.path.dirname(HERE))
        from catmerge_jax.atomic import atomic_file

        os.makedirs(args.results, exist_ok=True)
        stem = os.path.join(args.results, f"bench_{args.model}_ksweep")
        with atomic_file(stem + ".json", "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        with atomic_file(stem + ".log", "w", encoding="utf-8") as f:
            f.write(f"$ {data['command']}\n" + "\n".join(lines) + "\n")
        print(f"wrote {stem}.json and .log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
