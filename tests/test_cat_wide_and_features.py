"""Paths of the CAT merge that only wide layers or a CLI flag reach, each against float64 NumPy:

* the block form of ``zᵀz`` that ``G_k`` uses from the exemplar rows when the layer has ≥ 1024 outputs;
* ``--feature-scale`` (features captured from ``W0 + s·T_k``, the authors'-code reading) through the command line.
"""

from __future__ import annotations

from tests.fixtures.tiny_bert import save_tiny_bert  # noqa: E402

import os

import jax
import numpy as np
import pytest

import catmerge_jax as cm
from catmerge_jax.batched import cat_merge_batched
from catmerge_jax.conflict import symmetric_gram
from tests import reference as ref
from tests import tree_reference as tr


@pytest.mark.parametrize("d", [1000, 1024, 1101])
def test_symmetric_gram_equals_numpy(d):
    """Below 1024 columns a plain product; from 1024 on three of four column blocks (odd d: unequal halves)."""
    z = np.random.default_rng(d).standard_normal((37, d)).astype(np.float32)
    want = z.astype(np.float64).T @ z.astype(np.float64)
    got = np.asarray(symmetric_gram(jax.numpy.asarray(z)), np.float64)
    # float32 dot products of 37 terms: |error| ≤ 37·eps32·Σ|z_a z_b| ≲ 1e-5 · max|want|
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got, got.T)


def test_wide_layer_from_rows_equals_float64_reference():
    """A 600 → 1024 layer with 520 rows per task (K = 2): rows are stored (520 < 600), the exact low-rank path does
    not apply (2·520 + 3 ≥ 1024), so ``G_k`` is built from the rows with the block Gram and solved densely."""
    rng = np.random.default_rng(0)
    fan_in, fan_out, n, lam, c = 600, 1024, 520, 0.5, 3
    w0 = {"wide": {"kernel": rng.standard_normal((fan_in, fan_out)).astype(np.float32)}}

    def finetuned():  # a rank-4 update with separated singular values plus noise: a clear eigengap at c = 3
        low = (rng.standard_normal((fan_in, 4)) * [4.0, 3.0, 2.0, 1.0]) @ rng.standard_normal((4, fan_out))
        noise = 0.1 * rng.standard_normal((fan_in, fan_out))
        return {"wide": {"kernel": (w0["wide"]["kernel"] + 0.05 * (low / np.sqrt(fan_out) + noise))
                         .astype(np.float32)}}

    fts = [finetuned() for _ in range(2)]
    stats = [cm.stats_from_arrays(w0, {"wide/kernel": cm.linear_stats(rng.standard_normal((n, fan_in)))})
             for _ in range(2)]
    assert all(s["wide"]["kernel"].rows is not None for s in stats)
    T = [np.asarray(f["wide"]["kernel"], np.float64) - w0["wide"]["kernel"] for f in fts]
    A = [tr.gram64(s["wide"]["kernel"]) for s in stats]
    for k in range(2):
        G = ref.conflict_matrix(T, A, lam, k)
        assert tr.eigengap(G, c) > 1e-1 and np.sort(np.linalg.eigvalsh(G))[-c] > 0   # well-posed top-c
    timings = {}
    merged = cat_merge_batched(w0, fts, stats, alpha=0.3, lam=lam, c=c, solver="eigh", strategy="explicit",
                               timings=timings)
    assert [(g["form"], g["strategy"]) for g in timings["groups"]] == [("rows", "explicit")]
    want = tr.reference_cat_merge(w0, fts, stats, alpha=0.3, lam=lam, c=c)
    # float32 G_k of a 1024-wide layer: projector error ≈ eps32·‖G‖/gap ≲ 1e-5 at a relative gap ≥ 0.1
    assert tr.compare(merged, want, w0)[1] < 1e-4
    assert tr.compare(cm.task_arithmetic(w0, fts, alpha=0.3), want, w0)[1] > 1e-2


# --------------------------------------------------------------------------------------------- --feature-scale

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = "the a movie film was good bad great i love hate it this is what why how team code ? .".split()


def _bert(folder, *, seed, base=None, scale=0.05):
    return save_tiny_bert(folder, seed=seed, words=WORDS, base=base, scale=scale)


def test_feature_scale_flag_equals_float64_reference(tmp_path):
    from converters.safetensors_io import load_file

    from catmerge_jax.cli import main

    base = _bert(str(tmp_path / "base"), seed=0)
    tasks = [_bert(str(tmp_path / f"t{k}"), seed=k + 1, base=base, scale=0.2) for k in range(2)]
    exemplars = []
    for k, text in enumerate(["i love this movie .\nthe film was great\n", "what is this ?\nwhy is it bad ?\n"]):
        (tmp_path / f"e{k}.txt").write_text(text, encoding="utf-8")
        exemplars.append(str(tmp_path / f"e{k}.txt"))
    results = {}
    for scale in (0.3, 1.0):
        out = tmp_path / f"out{scale}"
        # c = 1: a tiny BERT's G_k have few eigenvalues well above float32 noise; the top one always is
        args = ["merge", "--method", "cat", "--base", base, "--quiet", "--out", str(out), "--lam", "0.5",
                "--c", "1", "--feature-scale", str(scale)]
        for t, e in zip(tasks, exemplars):
            args += ["--task", t, "--exemplars", e]
        assert main(args) == 0
        results[scale] = load_file(str(out / "model.safetensors"))
    wants = {s: tr.reference_folder_merge(base, tasks, exemplars, alpha=0.3, lam=0.5, c=1, feature_scale=s)
             for s in (0.3, 1.0)}
    base_state = load_file(os.path.join(base, "model.safetensors"))
    for scale in (0.3, 1.0):
        got, want = results[scale], wants[scale]
        assert set(got) >= set(want)
        _, upd = tr.compare({k: got[k] for k in want}, want, {k: base_state[k] for k in want})
        assert upd < 1e-4, scale
    # the flag matters: the two references differ by much more than the tolerance
    _, apart = tr.compare(wants[0.3], wants[1.0], {k: base_state[k] for k in wants[1.0]})
    assert apart > 1e-2
