"""Bad input raises the documented error, naming the offending leaf path."""

from __future__ import annotations

import numpy as np
import pytest

import catmerge_jax as cm
from tests.test_cat_merge import make_problem


@pytest.fixture
def problem():
    return make_problem(seed=0, dtype=np.float32)


def test_mismatched_structure_shape_and_dtype(problem):
    w0, fts, stats, _ = problem
    bad = dict(fts[1])
    bad.pop("head")
    with pytest.raises(cm.TreeMismatchError, match=r"finetuned\[1\].*head/bias"):
        cm.cat_merge(w0, [fts[0], bad], stats[:2])
    bad = {**fts[1], "head": {**fts[1]["head"], "kernel": np.zeros((7, 5), np.float32)}}
    with pytest.raises(cm.TreeMismatchError, match=r"head/kernel.*shape \(7, 5\).*\(7, 6\)"):
        cm.task_arithmetic(w0, [fts[0], bad])
    # float dtypes may differ (a float16 task over a float32 base merges in the base's dtype); other dtypes may not
    half = {**fts[1], "head": {**fts[1]["head"], "bias": fts[1]["head"]["bias"].astype(np.float16)}}
    merged = cm.ties_merge(w0, [half], k=1.0, alpha=1.0)
    assert merged["head"]["bias"].dtype == np.float32
    np.testing.assert_allclose(merged["head"]["bias"], fts[1]["head"]["bias"].astype(np.float16).astype(np.float32),
                               rtol=0, atol=1e-6)
    bad = {**fts[1], "head": {**fts[1]["head"], "bias": fts[1]["head"]["bias"].astype(np.int32)}}
    with pytest.raises(cm.TreeMismatchError, match="head/bias.*int32"):
        cm.ties_merge(w0, [bad])


def test_non_finite_weights_and_statistics(problem):
    w0, fts, stats, _ = problem
    bad = {**fts[0], "block": {**fts[0]["block"], "norm": {**fts[0]["block"]["norm"],
                                                           "scale": np.full(7, np.nan, np.float32)}}}
    with pytest.raises(cm.NonFiniteError, match=r"finetuned\[0\].*block/norm/scale"):
        cm.cat_merge(w0, [bad] + fts[1:], stats)
    bad_stats = dict(stats[2])
    gram = np.array(bad_stats["block"]["dense"]["kernel"].gram)
    gram[0, 0] = np.inf
    bad_stats = {**bad_stats, "block": {**bad_stats["block"], "dense": {
        **bad_stats["block"]["dense"], "kernel": cm.LeafStats(count=np.float32(8), gram=gram)}}}
    with pytest.raises(cm.NonFiniteError, match=r"stats\[2\].*block/dense/kernel"):
        cm.cat_merge(w0, fts, stats[:2] + [bad_stats])


def test_c_out_of_range_and_bad_hyperparameters(problem):
    w0, fts, stats, _ = problem
    with pytest.raises(cm.HyperparameterError, match="c must be >= 0"):
        cm.cat_merge(w0, fts, stats, c=-1)
    with pytest.raises(cm.HyperparameterError, match="conv/bias.*c=6.*dimension 5"):
        cm.cat_merge(w0, fts, stats, c=6)
    with pytest.raises(cm.HyperparameterError, match="lam must be >= 0"):
        cm.cat_merge(w0, fts, stats, lam=-1.0)
    with pytest.raises(cm.HyperparameterError, match="c must be an int"):
        cm.cat_merge(w0, fts, stats, c=2.5)
    with pytest.raises(cm.HyperparameterError, match="ties k"):
        cm.ties_merge(w0, fts, k=1.5)


def test_no_tasks(problem):
    w0, _, _, _ = problem
    for fn in (lambda: cm.cat_merge(w0, [], []), lambda: cm.task_arithmetic(w0, []),
               lambda: cm.weight_average(w0, []), lambda: cm.ties_merge(w0, [])):
        with pytest.raises(cm.HyperparameterError, match="K >= 1"):
            fn()


def test_missing_statistics(problem):
    w0, fts, stats, _ = problem
    with pytest.raises(cm.MissingStatisticsError, match="statistics for 2 task"):
        cm.cat_merge(w0, fts, stats[:2])
    unseen = {**stats[1], "head": {**stats[1]["head"], "kernel": cm.count_stats(0)}}
    with pytest.raises(cm.MissingStatisticsError, match="head/kernel.*task 1"):
        cm.cat_merge(w0, fts, [stats[0], unseen, stats[2]])
    no_scale = {**stats[0], "block": {**stats[0]["block"], "norm": {**stats[0]["block"]["norm"],
                                                                    "scale": cm.count_stats(4)}}}
    with pytest.raises(cm.MissingStatisticsError, match="block/norm/scale.*task 0.*sq_sum"):
        cm.cat_merge(w0, fts, [no_scale] + stats[1:])
    partial = {k: v for k, v in stats[0].items() if k != "embed"}
    with pytest.raises(cm.TreeMismatchError, match=r"stats\[0\].*embed/embedding"):
        cm.cat_merge(w0, fts, [partial] + stats[1:])


def test_statistics_of_the_wrong_width(problem):
    w0, fts, stats, _ = problem
    wrong = {**stats[0], "head": {**stats[0]["head"], "kernel": cm.linear_stats(np.ones((3, 9), np.float32))}}
    with pytest.raises(cm.TreeMismatchError, match="head/kernel.*dimension 9.*expects 7"):
        cm.cat_merge(w0, fts, [wrong] + stats[1:])
