"""How the batched CAT merge's cost grows with the number of tasks K: ViT-B/32 at K = 4, 8, 14, 20 (our side only).

Runs ``experiments/bench_merge.py --model b32 --skip-torch --tasks K`` once per K (each in its own process, so
one K's compiled programs and memory do not carry into the next), reads each run's JSON, and writes a table of
per-stage seconds against K and the fitted exponent (least-squares slope of log(bases seconds) against log K, per
linear group and in total, and between consecutive K) to ``<results>/bench_b32_ksweep.{log,json}``, with each
run's peak resident memory (bench_merge's own per-stage record; for a run that died, the kernel's count from
``wait4``). The files are rewritten after every K, so a sweep cut short keeps the K it finished (the JSON's
``complete`` and ``pending`` say which). The algorithm's dominant products ``Y_ki = X_k T_i`` and the per-task
``G_k`` builds are K² per layer (K tasks, each summing over the K − 1 others).

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


def run_child(cmd: list[str], env: dict, echo) -> tuple[int, float | None]:
    """``(exit status, the child's peak resident set in MiB as the kernel counts it)``: ``cmd`` run to its end, each
    line it prints (stdout and stderr) passed to ``echo``, then reaped with ``wait4`` to read its resource usage (a
    killed child writes no JSON; this still says how big it got). bench_merge resets the kernel's peak at each of
    its stage marks, so this is the peak since its last mark. The status is negative for a signal, as
    :mod:`subprocess` gives it."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            echo(line.rstrip("\n"))
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return proc.returncode, usage.ru_maxrss / 1024  # Linux: kB


def summary(runs: list[dict], failed: list[dict]) -> tuple[list[str], list[dict], dict, dict]:
    """The table (markdown lines), its rows, the fitted exponents of the runs so far (one slope over all K) and the
    local ones between consecutive K (``"4→8"``: the slope over those two K alone)."""
    ks = [run["settings"]["tasks"] for run in runs]
    stages = [row["stage"] for row in runs[0]["table"]]
    shapes = [tuple(g["shape"]) for g in runs[0]["jax"]["groups"]]
    lines = ["\n| K | " + " | ".join(stages) + " | " + " | ".join(f"bases {a}×{b}" for a, b in shapes)
             + " | floor (s) | peak RSS (GiB) | load |",
             "|---:|" + "---:|" * (len(stages) + len(shapes) + 3)]
    table = []
    for k, run in zip(ks, runs):
        by_stage = {row["stage"]: row["jax_s"] for row in run["table"]}
        by_group = {tuple(g["shape"]): g for g in run["jax"]["groups"]}
        peak = run.get("memory", {}).get("peak_rss_mib")
        entry = {"K": k, "stages": by_stage,
                 "groups": {f"{a}x{b}": {"seconds": by_group[(a, b)]["bases_seconds"],
                                         "plan": f"{by_group[(a, b)]['strategy']}/{by_group[(a, b)]['solver']}",
                                         "fallbacks": by_group[(a, b)]["fallbacks"],
                                         "floor_seconds": by_group[(a, b)].get("floor_seconds")}
                            for a, b in shapes},
                 "floor_seconds": run["floor"]["seconds"], "matmul_gflops": run["floor"]["matmul_gflops"],
                 "peak_rss_mib": peak, "memory_stages_mib": run.get("memory", {}).get("stages"),
                 "load_average_1_5_15": run["machine"]["load_average_1_5_15"]}
        table.append(entry)
        lines.append(f"| {k} | " + " | ".join(f"{by_stage[s]:.2f}" for s in stages) + " | "
                     + " | ".join(f"{by_group[sh]['bases_seconds']:.2f} ({by_group[sh]['strategy']})" for sh in shapes)
                     + f" | {run['floor']['seconds']:.2f} | " + ("–" if peak is None else f"{peak / 1024:.1f}")
                     + f" | {run['machine']['load_average_1_5_15'][0]:.2f} |")
    for fail in failed:
        peak = fail["peak_rss_mib"]
        lines.append(f"| {fail['K']} | failed: exit status {fail['exit_status']}"
                     + ("" if peak is None else f", peak RSS since its last stage {peak / 1024:.1f} GiB") + " |")
    exponents: dict = {}
    local: dict = {}
    if len(runs) >= 2:
        exponents = {"bases + masks": slope(ks, [t["stages"]["bases + masks"] for t in table]),
                     "merge total (steady)": slope(ks, [t["stages"]["merge total (steady)"] for t in table]),
                     "floor": slope(ks, [t["floor_seconds"] for t in table])}
        for a, b in shapes:
            exponents[f"bases {a}x{b}"] = slope(ks, [t["groups"][f"{a}x{b}"]["seconds"] for t in table])
        lines.append("\nfitted exponent p (seconds ∝ K^p, least squares on log-log over K = "
                     + ", ".join(map(str, ks)) + "):")
        lines.extend(f"  {name}: {p:.2f}" for name, p in exponents.items())
        series = {"bases + masks": [t["stages"]["bases + masks"] for t in table],
                  "merge total (steady)": [t["stages"]["merge total (steady)"] for t in table],
                  "floor": [t["floor_seconds"] for t in table]}
        for i in range(len(ks) - 1):
            local[f"{ks[i]}→{ks[i + 1]}"] = {name: slope(ks[i:i + 2], values[i:i + 2])
                                              for name, values in series.items()}
        lines.append("local exponents (between consecutive K): "
                     + "; ".join(f"{pair}: " + ", ".join(f"{name} {p:.2f}" for name, p in by_name.items())
                                 for pair, by_name in local.items()))
    else:
        lines.append("\nfewer than two K ran: no fit")
    return lines, table, exponents, local


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 8, 14, 20])
    parser.add_argument("--model", default="b32", choices=("b32", "l14", "minilm"))
    parser.add_argument("--blocks", type=int, default=None)
    parser.add_argument("--results", default=RESULTS, metavar="DIR", help="'' writes nothing")
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    command = " ".join(["python", "experiments/bench_ksweep.py", *raw])
    lines: list[str] = []  # what the driver printed about each run

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    def write(runs: list[dict], failed: list[dict], pending: list[int]) -> list[str]:
        """Both files from the runs so far (after every K, so a sweep cut short keeps the K it finished)."""
        table_lines, table, exponents, local = summary(runs, failed) if runs else (["\nno K ran to the end"], [],
                                                                                   {}, {})
        if pending:
            table_lines = [f"\n(K = {', '.join(map(str, pending))} still to run when this was written)"] + table_lines
        if not args.results:
            return table_lines
        sys.path.insert(0, os.path.dirname(HERE))
        from catmerge_jax.atomic import atomic_file

        data = {"mode": f"{args.model}_ksweep", "command": command,
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "complete": not pending, "pending": pending, "failed": failed,
                "table": table, "exponents": exponents, "local_exponents": local, "runs": runs}
        os.makedirs(args.results, exist_ok=True)
        stem = os.path.join(args.results, f"bench_{args.model}_ksweep")
        with atomic_file(stem + ".json", "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        with atomic_file(stem + ".log", "w", encoding="utf-8") as f:
            f.write(f"$ {command}\n" + "\n".join(lines + table_lines) + "\n")
        return table_lines

    runs: list[dict] = []
    failed: list[dict] = []
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    with tempfile.TemporaryDirectory() as tmp:
        for i, k in enumerate(args.tasks):
            cmd = [sys.executable, os.path.join(HERE, "bench_merge.py"), "--model", args.model, "--skip-torch",
                   "--tasks", str(k), "--results", os.path.join(tmp, str(k))]
            if args.blocks:
                cmd += ["--blocks", str(args.blocks)]
            say(f"$ {' '.join([os.path.relpath(cmd[1], os.path.dirname(HERE)), *cmd[2:]])}  "
                f"(load average {os.getloadavg()})")
            # the child's lines, bar those naming its temporary result files
            status, peak = run_child(cmd, env, lambda line: print(line, flush=True) if line.startswith("wrote ")
                                     else say(line))
            if status != 0:  # e.g. killed for memory at large K: recorded, the other K still count
                failed.append({"K": k, "exit_status": status, "peak_rss_mib": peak})
                say(f"K = {k} failed (exit status {status}; peak RSS since its last stage {peak / 1024:.1f} GiB); "
                    f"left out of the table and the fit")
            else:
                found = [f for f in os.listdir(os.path.join(tmp, str(k))) if f.endswith(".json")]
                with open(os.path.join(tmp, str(k), found[0]), encoding="utf-8") as f:
                    runs.append(json.load(f))
            table_lines = write(runs, failed, args.tasks[i + 1:])
    for line in table_lines:
        print(line)
    if args.results:
        print(f"wrote {os.path.join(args.results, f'bench_{args.model}_ksweep')}.json and .log")
    return 0 if len(runs) >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
