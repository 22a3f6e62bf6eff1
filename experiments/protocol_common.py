"""What the paper-protocol scripts share: scoring every method alike, and the table they print."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

# CAT's (λ, c) points for the "cat (λ, c on val)" row: the λ line at c = 3 and the c line at λ = 5, searched
# jointly with the same alpha grid as every other method.
CAT_LAM_SWEEP = (0.0, 1.0, 5.0, 20.0)
CAT_C_SWEEP = (1, 3, 5, 8)


def task_folders(specs: Sequence[str], order: Sequence[str], error: type[Exception]) -> dict[str, str]:
    """``--task NAME=DIR`` arguments as ``{name: folder}``, in the paper table's ``order`` (unknown names last, by
    name); a malformed argument raises ``error``."""
    folders = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise error(f"--task expects NAME=DIR, got {spec!r}")
        folders[name] = folder
    return {t: folders[t] for t in sorted(folders, key=lambda t: (order.index(t) if t in order else len(order), t))}


def method_task_table(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str], title: str) -> str:
    """The paper's table layout: one row per method, one column per task (scores in [0, 1], shown ×100), then the
    average; a method with no scores (skipped) shows dashes."""
    width = max(12, *(len(m) for m in rows))
    head = f"{'method':<{width}} " + " ".join(f"{t[:8]:>8}" for t in tasks) + f" {'Avg':>8}"
    lines = [title, head, "-" * len(head)]
    for m, acc in rows.items():
        if not acc:
            lines.append(f"{m:<{width}} " + " ".join(f"{'–':>8}" for _ in tasks) + f" {'–':>8}")
            continue
        vals = [100 * acc[t] for t in tasks]
        lines.append(f"{m:<{width}} " + " ".join(f"{v:8.2f}" for v in vals) + f" {np.mean(vals):8.2f}")
    return "\n".join(lines)


def score_all_methods(w0: Any, finetuned: Sequence[Any], stats: Sequence[Any], score: Callable[[Any, str], dict],
                      tasks: Sequence[str], *, methods: Sequence[str] | None, alphas: Sequence[float],
                      ties_k: Sequence[float], has_val: bool, quiet: bool,
                      cat_points: Sequence[Mapping[str, Any]] | None = None, roles: Any = None) -> tuple[dict, dict]:
    """``(rows, details)``: test scores of the individual models, the pretrained backbone and every method, with
    alpha chosen on validation when there is any (else each method's defaults), from the same ``alphas`` grid for
    every method, jointly with each method's own knob (TIES's k over ``ties_k``; Iso-CTS's common fraction; see
    :data:`experiments.benchmark.evaluate.DEFAULT_KNOBS`). With validation data and CAT among the methods, the
    row "cat (λ, c on val)" also chooses λ and c over ``cat_points`` (default: :data:`CAT_LAM_SWEEP` at c = 3
    and :data:`CAT_C_SWEEP` at λ = 5)."""
    from tqdm.auto import tqdm

    from experiments.benchmark.evaluate import cat_knob_points, load_all_methods, tune_method

    rows: dict[str, dict] = {"individual": {t: score(ft, "test")[t] for t, ft in zip(tasks, finetuned)},
                             "pretrained": score(w0, "test")}
    details = {}
    names = list(methods) if methods else load_all_methods()
    if methods:
        load_all_methods()
    for name in tqdm(names, desc="methods", disable=quiet):
        row, _ = tune_method(name, w0, finetuned, score, alphas=alphas, ties_k=ties_k, stats=stats,
                             select_split="val" if has_val else None, roles=roles)
        details[name] = {k: v for k, v in row.items() if k != "val_grid"}
        rows[name] = row.get("test", {})
    if has_val and "cat" in names:
        points = cat_points if cat_points is not None else cat_knob_points(CAT_LAM_SWEEP, CAT_C_SWEEP)
        row, _ = tune_method("cat (λ, c on val)", w0, finetuned, score, alphas=alphas, stats=stats, method="cat",
                             knob_points=points, roles=roles)
        details["cat (λ, c on val)"] = {k: v for k, v in row.items() if k != "val_grid"}
        rows["cat (λ, c on val)"] = row.get("test", {})
    return rows, details
