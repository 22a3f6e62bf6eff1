"""Issue 23: ``MergeMethod.scale_name`` says which keyword scales a method's merged task vector (the CLI's
``--alpha``). Checked against the definition ``W = W0 + scale * tau``: with that keyword at 0 every method returns the
pretrained weights exactly; RegMean, whose ``alpha`` is its Gram shrinkage, declares none (at alpha = 0 it is a
per-input-row weighted average, far from W0)."""

from __future__ import annotations

import numpy as np
import pytest

import catmerge_jax as cm
from catmerge_jax.methods.registry import available_methods, get_method, merge_scale_name

FAST = {"wudi": {"steps": 2}}
"""Keywords that keep a method cheap here (its scale is what is tested, not its optimizer)."""


def _problem():
    rng = np.random.default_rng(0)
    w0 = {"dense": {"kernel": rng.normal(size=(5, 4)).astype(np.float32),
                    "bias": rng.normal(size=4).astype(np.float32)}}
    fts = [{"dense": {k: (v + 0.5 * rng.normal(size=v.shape)).astype(np.float32) for k, v in w0["dense"].items()}}
           for _ in range(2)]
    stats = [cm.stats_from_arrays(w0, {"dense/kernel": cm.linear_stats(rng.normal(size=(8, 5))),
                                       "dense/bias": cm.count_stats(8)}) for _ in range(2)]
    return w0, fts, stats


def _merge(method, w0, fts, stats, **hparams):
    kwargs = {"stats": stats} if method.needs_stats else {}
    for extra in method.extras:  # per-task trees shaped like the params (gradients, Fishers)
        kwargs[extra] = [{"dense": {k: np.abs(v - w0["dense"][k]) + 0.1 for k, v in ft["dense"].items()}}
                         for ft in fts]
    return method.merge(w0, fts, **kwargs, **FAST.get(method.name, {}), **hparams)


MERGEKIT_SAMPLE = ("mergekit.ties", "mergekit.task_arithmetic", "mergekit.ramplus_tl")
"""MergeKit's methods declare their scale by one rule (``lambda`` where they take it): two that do and the one whose
``alpha`` is no scale (RAM+'s clipping bound) stand for the 20."""


@pytest.mark.parametrize("name", [n for n in available_methods()
                                  if not n.startswith("mergekit.") or n in MERGEKIT_SAMPLE])
def test_the_declared_merge_scale_scales_the_task_vector(name):
    method = get_method(name)
    w0, fts, stats = _problem()
    scale = merge_scale_name(method)
    if scale is None:
        if "alpha" in method.defaults:          # an alpha that is something else (regmean): at 0 it is no W0
            merged = _merge(method, w0, fts, stats, alpha=0.0)
            assert np.abs(np.asarray(merged["dense"]["kernel"]) - w0["dense"]["kernel"]).max() > 0.05
        return
    merged = _merge(method, w0, fts, stats, **{scale: 0.0})
    for key in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(merged["dense"][key]), w0["dense"][key], err_msg=f"{name} {key}")
