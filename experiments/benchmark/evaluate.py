"""Evaluation protocol: accuracy of each task's own head on a (merged) backbone, method hyperparameters chosen
on validation only, and the paper's summary numbers (average, normalized accuracy, std of the drops).

Every backbone evaluation runs all tasks' examples of a split through ONE jitted forward (length-bucketed,
fixed-size batches) and then applies each task's head to its own rows.

>>> summarize({"a": 0.8, "b": 0.6}, {"a": 1.0, "b": 0.75})["normalized"]
0.8
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmark.finetune import Tokens, batches, head_logits, make_features_fn

PyTree = Any


class Evaluator:
    """Per-task accuracy / loss of a backbone with fixed per-task heads.

    Args:
      model: the linen encoder.
      heads: ``{task: head}``.
      data: ``{split: {task: Tokens}}`` (e.g. ``"val"``, ``"test"``).
      batch_size: rows per forward pass.
      bucket: padded lengths are multiples of this.

    The defaults (32 rows, lengths in steps of 8) cut the padded tokens of the benchmark's splits by 30–40%
    against training's (64, 32) batching, for 6–8 compiled shapes per split instead of 3–4: evaluation is
    most of a benchmark run, and its cost is proportional to the padded tokens.
    """

    def __init__(self, model: Any, heads: Mapping[str, PyTree], data: Mapping[str, Mapping[str, Tokens]],
                 batch_size: int = 32, bucket: int = 8):
        self.heads = dict(heads)
        self.batch_size = batch_size
        self.bucket = bucket
        self._features = make_features_fn(model)
        self._splits = {}
        for split, per_task in data.items():
            names = list(per_task)
            joined = Tokens(*(np.concatenate([getattr(per_task[n], f) for n in names]) for f in Tokens._fields))
            bounds = np.cumsum([0] + [len(per_task[n].labels) for n in names])
            self._splits[split] = (joined, {n: (bounds[i], bounds[i + 1]) for i, n in enumerate(names)})
        self.calls = 0

    def tasks(self, split: str = "val") -> list[str]:
        return list(self._splits[split][1])

    def features(self, backbone: PyTree, split: str, tasks: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``{task: (n_task, d)}`` mean-pooled features of ``split`` under ``backbone``."""
        joined, bounds = self._splits[split]
        tasks = list(bounds) if tasks is None else list(tasks)
        rows = np.concatenate([np.arange(*bounds[t]) for t in tasks])
        tokens = joined.take(rows)
        out = None
        for index, batch, real in batches(tokens, self.batch_size, self.bucket):
            f = np.asarray(self._features(backbone, batch.ids, batch.mask))[:real]
            if out is None:
                out = np.zeros((len(rows), f.shape[1]), np.float32)
            out[index] = f
        self.calls += 1
        result, start = {}, 0
        for t in tasks:
            n = bounds[t][1] - bounds[t][0]
            result[t] = out[start:start + n]
            start += n
        return result

    def labels(self, split: str, task: str) -> np.ndarray:
        joined, bounds = self._splits[split]
        return joined.labels[bounds[task][0]:bounds[task][1]]

    def evaluate(self, backbone: PyTree, split: str = "val", tasks: Sequence[str] | None = None,
                 heads: Mapping[str, PyTree] | None = None) -> dict[str, dict[str, float]]:
        """``{task: {"acc": accuracy, "loss": mean cross-entropy}}`` on ``split``."""
        heads = self.heads if heads is None else heads
        out = {}
        for t, f in self.features(backbone, split, tasks).items():
            logits = np.asarray(head_logits(heads[t], jnp.asarray(f)))
            y = self.labels(split, t)
            loss = float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(y)).mean())
            out[t] = {"acc": float(np.mean(logits.argmax(-1) == y)), "loss": loss}
        return out

    def accuracy(self, backbone: PyTree, split: str = "val", tasks: Sequence[str] | None = None) -> dict[str, float]:
        return {t: r["acc"] for t, r in self.evaluate(backbone, split, tasks).items()}


def summarize(merged: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, float]:
    """Paper Table 10's numbers: mean accuracy, mean of merged/individual, std of the per-task drops (points)."""
    tasks = list(merged)
    acc = np.array([merged[t] for t in tasks])
    ind = np.array([individual[t] for t in tasks])
    return {"average": float(acc.mean()), "normalized": float(np.mean(acc / ind)),
            "drop_std": float(np.std(100.0 * (ind - acc)))}


# ----------------------------------------------------------------------------------------------- methods

PROTOCOL_EXCLUDED_PREFIXES = ("mergekit.",)
"""Registered methods the paper protocols and the seed benchmark leave out by default: MergeKit's methods
(:mod:`catmerge_jax.mergekit`) are LLM weight recipes, several of them for exactly two models (SLERP, NearSwap,
Arcee Fusion) or without a merge scale to tune; they are compared with MergeKit itself in
``experiments/bench_llm.py``. Name them in ``methods=`` to run them here."""


def load_all_methods() -> list[str]:
    """Import every module of :mod:`catmerge_jax.methods` (each registers its methods) and list the names the
    protocols compare (every registered method but :data:`PROTOCOL_EXCLUDED_PREFIXES`)."""
    import catmerge_jax.methods as methods
    from catmerge_jax.methods.registry import available_methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"catmerge_jax.methods.{info.name}")
    return [m for m in available_methods() if not m.startswith(PROTOCOL_EXCLUDED_PREFIXES)]


def tree_delta(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32), a, b)


def tree_axpy(alpha: float, x: PyTree, y: PyTree) -> PyTree:
    """``y + alpha * x``."""
    return jax.tree.map(lambda u, v: v + alpha * u, x, y)


def _rel_diff(a: PyTree, b: PyTree) -> float:
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
    return float(np.sqrt(num / max(den, 1e-30)))


@dataclasses.dataclass
class ScaledMerge:
    """A method's merge as ``W0 + alpha * delta`` when alpha is a merge scale (checked), else fixed params."""

    delta: PyTree | None
    fixed: PyTree | None
    alpha_is_scale: bool

    def at(self, pretrained: PyTree, alpha: float | None) -> PyTree:
        if self.alpha_is_scale:
            return tree_axpy(alpha, self.delta, pretrained)
        return self.fixed


def scaled_merge(merge: Callable[..., PyTree], pretrained: PyTree, *, has_alpha: bool, alpha0: float = 1.0,
                 check: bool = True, rtol: float = 1e-3, **kwargs) -> ScaledMerge:
    """Run ``merge`` at ``alpha=alpha0`` (the method's default) and read it as ``W0 + alpha * delta``.

    Evaluating an alpha grid then costs one merge instead of one per alpha. With ``check``, a second merge at
    ``alpha0 / 2`` confirms that alpha really scales the task-vector part; otherwise (RegMean's ``alpha`` is an
    off-diagonal weight, not a scale) the method keeps its default merge and is not swept. Probing only at
    the default and half of it keeps every probe inside the method's valid range.
    """
    if not has_alpha:
        return ScaledMerge(None, merge(pretrained, **kwargs), False)
    at_default = merge(pretrained, alpha=alpha0, **kwargs)
    delta = jax.tree.map(lambda d: d / alpha0, tree_delta(at_default, pretrained))
    if check:
        half = tree_delta(merge(pretrained, alpha=0.5 * alpha0, **kwargs), pretrained)
        if _rel_diff(half, jax.tree.map(lambda d: 0.5 * alpha0 * d, delta)) > rtol:
            return ScaledMerge(None, at_default, False)
    return ScaledMerge(delta, None, True)


def select_on_validation(evaluator: Evaluator, candidates: Iterable[tuple[dict, Callable[[], PyTree]]],
                         *, split: str = "val", on_result: Callable[[dict, dict], None] | None = None
                         ) -> tuple[dict, dict[str, float], list[dict]]:
    """Evaluate each ``(hparams, make_backbone)`` on ``split``; return the best hparams by mean accuracy.

    Returns ``(best hparams, best per-task val accuracy, all rows)``; ties keep the first candidate.
    """
    best, best_acc, rows = None, None, []
    for hparams, make in candidates:
        acc = evaluator.accuracy(make(), split)
        mean = float(np.mean(list(acc.values())))
        rows.append({"hparams": hparams, "mean": mean, "per_task": acc})
        if on_result is not None:
            on_result(hparams, acc)
        if best is None or mean > float(np.mean(list(best_acc.values()))) + 1e-12:
            best, best_acc = hparams, acc
    if best is None:
        raise ValueError("select_on_validation: no candidates")
    return best, best_acc, rows


# Methods whose ``alpha`` multiplies the merged task vector by construction (tested in their own test files):
# their alpha grid is read off one merge, without the second probing merge of :func:`scaled_merge`.
SCALE_BY_CONSTRUCTION = frozenset({"cat", "tsv", "iso_c", "iso_cts", "wudi", "lot"})

# Each method's own knob, searched on validation jointly with alpha (the same alpha grid for every method).
DEFAULT_KNOBS: dict[str, tuple[dict, ...]] = {
    "iso_cts": ({"common_fraction": 0.8}, {"common_fraction": 0.5}),
}


def cat_knob_points(lams: Sequence[float], cs: Sequence[int], lam0: float = 5.0, c0: int = 3) -> tuple[dict, ...]:
    """CAT's (λ, c) points: the λ line at ``c0`` and the c line at ``lam0`` (the paper's Fig. 4 sweeps)."""
    points = [{"lam": float(lam), "c": int(c0)} for lam in lams]
    points += [{"lam": float(lam0), "c": int(c)} for c in cs if int(c) != int(c0) or float(lam0) not in lams]
    return tuple(points)


def tune_method(name: str, pretrained: PyTree, finetuned: Sequence[PyTree], score: Callable[[PyTree, str], dict],
                *, alphas: Sequence[float], ties_k: Sequence[float] = (0.2,), stats: Sequence[PyTree] | None = None,
                extras: Mapping[str, Any] | None = None, select_split: str | None = "val",
                report_split: str = "test", knob_points: Sequence[Mapping[str, Any]] | None = None,
                method: str | None = None, roles: Any = None) -> tuple[dict, PyTree | None]:
    """Merge with registered method ``name``, choose its hyperparameters on ``select_split``, score ``report_split``.

    alpha is searched over ``alphas`` when it scales the merged task vector (see :func:`scaled_merge`; methods in
    :data:`SCALE_BY_CONSTRUCTION` are not re-checked), jointly with each point of ``knob_points`` (the method's own
    knobs; default: TIES's ``k`` over ``ties_k``, :data:`DEFAULT_KNOBS` for the others); every other hyperparameter
    keeps the method's default. ``method`` names the registered method when ``name`` is a row label (e.g.
    ``"cat (λ, c on val)"`` runs ``cat`` over its λ/c points). ``score(params, split) -> {task: metric}``. With
    ``select_split=None`` the defaults are used as they are. Methods whose extra inputs are missing from ``extras``
    are skipped.

    Returns ``(row, delta)``: ``row`` has ``hparams``, ``val``, ``test`` (per-task metrics), ``alpha_is_scale``,
    ``merge_seconds`` (mean wall time of one merge call, compilation included in the first), ``merges`` (or
    ``skipped``); ``delta`` is ``Σ`` of the (edited) task vectors when alpha is a scale.
    """
    import time

    from catmerge_jax.methods.registry import get_method

    registered = method or name
    m = get_method(registered)
    extras = dict(extras or {})
    missing = [e for e in m.extras if e not in extras]
    if missing:
        return {"skipped": f"needs {missing}, which this run does not provide"}, None
    kwargs: dict[str, Any] = {e: extras[e] for e in m.extras}
    if m.needs_stats:
        kwargs["stats"] = stats
    if roles is not None:  # a layout's own roles (e.g. open_clip's fused q|k|v), for every method alike
        kwargs["roles"] = roles
    from catmerge_jax.errors import CatMergeError

    if knob_points is None:
        if registered == "ties" and "k" in m.defaults:
            knob_points = tuple({"k": k} for k in ties_k)
        else:
            knob_points = DEFAULT_KNOBS.get(registered, ({},))
    if not select_split:
        knob_points = ({},)
    check = registered not in SCALE_BY_CONSTRUCTION
    seconds, n_merges = 0.0, 0
    candidates, merges = [], {}
    for extra in knob_points:
        extra = dict(extra)
        merge = lambda w, _e=extra, **kw: m.merge(w, finetuned, **kwargs, **_e, **kw)  # noqa: E731
        start = time.perf_counter()
        try:
            sm = scaled_merge(merge, pretrained, has_alpha="alpha" in m.defaults,
                              alpha0=float(m.defaults.get("alpha", 1.0)), check=check)
        except CatMergeError as e:  # a method that refuses these inputs is reported, not fatal to the run
            return {"skipped": f"{type(e).__name__}: {e}"}, None
        jax.block_until_ready(sm.delta if sm.alpha_is_scale else sm.fixed)
        seconds += time.perf_counter() - start
        n_merges += 2 if (check and "alpha" in m.defaults) else 1
        key = tuple(sorted(extra.items()))
        merges[key] = sm
        grid = (alphas if select_split else (m.defaults["alpha"],)) if sm.alpha_is_scale else (None,)
        for a in grid:
            hp = {**extra, **({} if a is None else {"alpha": a})}
            candidates.append((hp, lambda _sm=sm, _a=a: _sm.at(pretrained, _a)))
    if select_split:
        best, val, rows = _select(score, candidates, select_split)
    else:
        (best, make), val, rows = candidates[0], {}, []
    sm = merges[tuple(sorted((k, v) for k, v in best.items() if k != "alpha"))]
    test = score(sm.at(pretrained, best.get("alpha")), report_split)
    row = {"hparams": best, "val": val, "test": test, "val_grid": rows, "alpha_is_scale": sm.alpha_is_scale,
           "merge_seconds": seconds / max(n_merges, 1), "merges": n_merges, "description": m.description}
    return row, (sm.delta if sm.alpha_is_scale else None)


def _select(score, candidates, split):
    best, best_mean, rows = None, -np.inf, []
    for hp, make in candidates:
        res = score(make(), split)
        mean = float(np.mean(list(res.values())))
        rows.append({"hparams": hp, "mean": mean, "per_task": res})
        if mean > best_mean + 1e-12:
            best, best_mean, best_res = hp, mean, res
    return best, best_res, rows
