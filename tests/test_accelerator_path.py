"""The GPU/TPU branches of the solvers, run on this CPU through :func:`catmerge_jax.linalg.accelerator_paths`.

The batched-path matrix itself (Gram, rows, exact low-rank, matrix-free Krylov, eigh fallback, the factored and
selected-eigenpair solvers) runs under both settings through the ``solver_paths`` fixture in tests/test_batched.py
and tests/test_linalg.py. Here: that the switch really changes the executed branch and is part of JAX's jit cache key
(a program traced under one setting is never reused under the other), the environment variable, and one whole CAT
merge of a tiny BERT on the accelerator branches against the float64 reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import catmerge_jax as cm
from catmerge_jax import conflict, hostlapack, linalg
from tests import tree_reference as tr


@pytest.fixture
def host_solves(monkeypatch):
    """``calls``: a list that grows by one per batch the host LAPACK solvers run (looked up when the callback runs,
    so programs compiled before the test count too)."""
    calls = []
    real = hostlapack.each_problem

    def counting(solve, *args, **kwargs):
        calls.append(solve.__name__)
        return real(solve, *args, **kwargs)

    monkeypatch.setattr(hostlapack, "each_problem", counting)
    return calls


def _symmetric(n, seed):
    a = np.random.default_rng(seed).standard_normal((n, n))
    return a + a.T


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_switch_changes_the_executed_branch_and_is_part_of_the_jit_key(host_solves):
    """One jitted function, called with the same argument under the CPU, the accelerator and again the CPU setting:
    the host solver runs exactly in the CPU calls (a cached program would run it in all three or none), and both
    branches give the float64 eigenvalues."""
    m64 = _symmetric(9, 0)
    m = jnp.asarray(m64, jnp.float32)
    top = jax.jit(lambda a: linalg.eigh_largest(a, 2)[0])
    want = np.linalg.eigvalsh(m64)[::-1][:2]
    tol = 9 * np.finfo(np.float32).eps * np.abs(np.linalg.eigvalsh(m64)).max()  # backward stable: ~n·eps·‖G‖

    np.testing.assert_allclose(top(m), want, atol=tol)
    assert host_solves == ["symmetric_largest"] and not cm.accelerator_paths_enabled()
    with cm.accelerator_paths():
        assert cm.accelerator_paths_enabled()
        np.testing.assert_allclose(top(m), want, atol=tol)
        assert len(host_solves) == 1  # the traced eigh ran, not the host
    np.testing.assert_allclose(top(m), want, atol=tol)
    assert len(host_solves) == 2

    # what is compiled: a host callback (a custom call) on the CPU branch only; a loop (lax.map) or a vmap
    z, w = jnp.ones((3, 5)), jnp.asarray([1.0, -1.0, 0.5])
    for forced in (False, True):
        with cm.accelerator_paths(forced):
            callbacks = [_lowered(lambda a: linalg.eigh_largest(a, 2), m),
                         _lowered(lambda a, b: linalg.factored_largest(a, b, 2), z, w)]
            assert all(("callback" in text) != forced for text in callbacks), forced
            loop = _lowered(lambda x: linalg.map_batch(jnp.sin, x), jnp.ones((4, 3)))
            assert ("while" in loop) != forced


def test_a_library_jit_traced_under_one_setting_is_not_reused_under_the_other(host_solves):
    """``conflict._group_bases`` is jitted at module level with static arguments; flipping the switch between two
    identical calls must retrace it (the rows plan hands its factors to the host on CPU, to JAX's eigh otherwise)."""
    rng = np.random.default_rng(1)
    tvs = jnp.asarray(rng.standard_normal((1, 3, 7, 11)), jnp.float32)  # (L, K, in, out): shapes no other test uses
    rows = jnp.asarray(rng.standard_normal((1, 3, 5, 7)), jnp.float32)  # 2(K−1)·5 = 20 ≥ 11 rows: no low-rank
    plan = conflict.plan_linear(3, 7, 11, 2, rows=5, solver="eigh", strategy="explicit")
    assert plan.form == "rows" and conflict._solved_from_rows(plan)
    results = []
    for forced in (False, True, False):
        with cm.accelerator_paths(forced):
            results.append(np.asarray(conflict.linear_group_bases(tvs, rows, lam=0.5, c=2, plan=plan,
                                                                  strict_top_c=True), np.float64))
    assert host_solves == ["factored_one", "factored_one"]  # the first and third call
    # the same top-2 subspaces either way (well separated here, so float32 rounding moves them by ~1e-6)
    for k in range(3):
        projectors = [b[0, k] @ b[0, k].T for b in results]
        np.testing.assert_allclose(projectors[1], projectors[0], atol=1e-4)


def test_without_user_contexts_a_cache_clearing_flag_does_the_same(monkeypatch, host_solves):
    """Older JAX releases have no ``jax.make_user_context``; the fallback clears JAX's caches when the value changes."""
    monkeypatch.setattr(linalg, "_ACCELERATOR_PATHS", linalg._ClearingFlag(False))
    m = jnp.asarray(_symmetric(6, 2), jnp.float32)
    top = jax.jit(lambda a: linalg.eigh_largest(a, 1)[0])
    top(m)
    with cm.accelerator_paths():
        assert cm.accelerator_paths_enabled()
        top(m)
    top(m)
    assert len(host_solves) == 2 and not cm.accelerator_paths_enabled()


def test_environment_variable():
    assert [linalg._flag_from_env(v) for v in (None, "", "0", "false", "1", "TRUE", " yes ", "on")] == \
        [False] * 4 + [True] * 4
    with pytest.raises(cm.CatMergeError, match="CATMERGE_FORCE_ACCELERATOR_PATH='2': expected 1 or 0"):
        linalg._flag_from_env("2")
    # read at import: a fresh process starts with the accelerator branches; the context manager still turns them off
    script = ("import jax.numpy as jnp; from catmerge_jax import linalg as l; import jax; m = jnp.eye(3); "
              "f = lambda: 'callback' in jax.jit(lambda a: l.eigh_largest(a, 1)).lower(m).as_text(); on = f(); "
              "cm = l.accelerator_paths(False); cm.__enter__(); print(l.accelerator_paths_enabled(), on, f())")
    env = dict(os.environ, CATMERGE_FORCE_ACCELERATOR_PATH="1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"]


# ------------------------------------------------------------------------------------------------------ tiny BERT

WORDS = "the a movie film was good bad great i love hate it this is what why how team code ? .".split()


def test_whole_cat_merge_of_a_tiny_bert_on_the_accelerator_branches(tmp_path, host_solves):
    """A 1-layer, 16-wide BERT and two fine-tuned copies, statistics captured from exemplar files, merged by
    ``cat_merge`` with every solve on the accelerator branches (none on the host), against the float64 NumPy merge.
    Tolerance as tests/test_cat_wide_and_features.py's CLI test of the same models (c = 1: the top eigenvalue of
    every G_k is well above float32 noise): 1e-4 of each leaf's merged update."""
    pytest.importorskip("transformers")
    from tests.fixtures.tiny_bert import save_tiny_bert

    base = save_tiny_bert(str(tmp_path / "base"), seed=0, words=WORDS)
    tasks = [save_tiny_bert(str(tmp_path / f"t{k}"), seed=k + 1, words=WORDS, base=base, scale=0.2) for k in range(2)]
    exemplars = []
    for k, text in enumerate(["i love this movie .\nthe film was great\n", "what is this ?\nwhy is it bad ?\n"]):
        (tmp_path / f"e{k}.txt").write_text(text, encoding="utf-8")
        exemplars.append(str(tmp_path / f"e{k}.txt"))
    pre, fts, stats = tr.folder_statistics(base, tasks, exemplars)
    params = [t.params for t in fts]
    with cm.accelerator_paths():
        merged = cm.cat_merge(pre.params, params, stats, alpha=0.3, lam=0.5, c=1)
    assert host_solves == []
    want = tr.reference_cat_merge(pre.params, params, stats, alpha=0.3, lam=0.5, c=1)
    assert tr.compare(merged, want, pre.params)[1] < 1e-4
    # and CAT's trimming is a visible part of the update, so the comparison can fail
    assert tr.compare(cm.task_arithmetic(pre.params, params, alpha=0.3), want, pre.params)[1] > 1e-2
