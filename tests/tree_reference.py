"""A float64 NumPy CAT merge of a whole params tree, written from the paper's equations (eqs. 11, 14, 17 and
Algorithm 1) on top of :mod:`tests.reference`. It only borrows the library's role table (which leaf is a kernel, a
norm scale, a shift or other) and reads the statistics it is handed; every number is computed here, in float64.

Conventions it implements (docs/ALGORITHM.md): linear kernels are ``(in, out)``; ``G_k = Σ_{i≠k} T_iᵀ(A_k − λA_i)T_i``
from each task's Gram ``A_k``; ``B_k`` its eigenvectors for the c largest eigenvalues, and (the default rule) only
those whose eigenvalue is positive, since removing a direction of eigenvalue ≤ 0 cannot raise eq. 10's objective;
scale masks from ``Σ_{i≠k} T_i²(s_k − λ s_i)``; shift masks from the paper's balanced rule ``Σ_{i≠k} T_i²``;
``W = W0 + α Σ_i T̃_i`` with every ``T_i`` trimmed by every ``Φ_k`` (k ≠ i) in k order.
"""

from __future__ import annotations

import numpy as np

import catmerge_jax as cm
from tests import reference as ref


def positive_top_bases(T, A, lam, c, *, positive_only=True):
    """``[B_k (out, ≤ c)]``: top-c eigenvectors of each ``G_k``; by default without the directions whose eigenvalue
    is not positive (:func:`tests.reference.linear_bases` with ``positive=True``: the threshold is 100 float32
    epsilons times the bound ``Σ_{i≠k} ‖X_k T_i‖² + λ‖X_i T_i‖²`` of ``‖G_k‖``)."""
    return ref.linear_bases(T, A, lam, c, positive=positive_only)


def eigengap(G, c):
    """``(λ_c − λ_{c+1}) / max|λ|`` of a symmetric ``G`` (descending eigenvalues)."""
    w = np.sort(np.linalg.eigvalsh(G))[::-1]
    return (w[c - 1] - w[c]) / np.abs(w).max()


def gram64(leaf_stats):
    """``XᵀX`` in float64 from a ``LeafStats`` (rows or Gram form)."""
    if leaf_stats.rows is not None:
        rows = np.asarray(leaf_stats.rows, np.float64).reshape(-1, np.shape(leaf_stats.rows)[-1])
        return rows.T @ rows
    return np.asarray(leaf_stats.gram, np.float64)


def _by_path(tree, kind=None):
    return dict(cm.leaves_with_paths(tree, is_leaf=None if kind is None else (lambda x: isinstance(x, kind))))


def reference_cat_merge(w0, finetuned, stats, *, alpha, lam, c, roles=None, positive_only=True, joint=False):
    """``{path: merged leaf (float64)}`` of CAT Merging; 2-D kernels only (``(in, out)``).

    Args:
      w0, finetuned: plain nested-dict params.
      stats: K stats trees (``cm.LeafStats`` leaves), as handed to ``cm.cat_merge``.
    """
    K = len(finetuned)
    specs = _by_path(cm.classify(w0, roles), cm.LeafSpec)
    per_task = [_by_path(s, cm.LeafStats) for s in stats]
    leaves = _by_path(w0)
    ft_leaves = [_by_path(f) for f in finetuned]
    out = {}
    for path, base in leaves.items():
        base64 = np.asarray(base, np.float64)
        T = [np.asarray(f[path], np.float64) - base64 for f in ft_leaves]
        role = specs[path].role
        if role is cm.Role.LINEAR:
            if base64.ndim != 2:
                raise ValueError(f"reference handles (in, out) kernels only; {path} is {base64.shape}")
            A = [gram64(s[path]) for s in per_task]
            B = positive_top_bases(T, A, lam, c, positive_only=positive_only)
            trimmed = (ref.apply_linear_joint if joint else ref.apply_linear_sequential)(T, B)
        elif role is cm.Role.SCALE:
            S = [np.asarray(s[path].sq_sum, np.float64) for s in per_task]
            trimmed = ref.apply_masks(T, ref.scale_masks(T, S, lam, c).astype(float))
        elif role is cm.Role.SHIFT:
            trimmed = ref.apply_masks(T, ref.shift_masks(T, c).astype(float))
        else:
            trimmed = T
        out[path] = base64 + alpha * sum(trimmed)
    return out


def removed_share(w0, finetuned, stats, *, lam, c, roles=None):
    """Per task, ``Σ‖T_i − T̃_i‖² / Σ‖T_i‖²`` over the linear leaves (the share of its linear update CAT removes)."""
    K = len(finetuned)
    specs = _by_path(cm.classify(w0, roles), cm.LeafSpec)
    per_task = [_by_path(s, cm.LeafStats) for s in stats]
    ft_leaves = [_by_path(f) for f in finetuned]
    removed, total = np.zeros(K), np.zeros(K)
    for path, base in cm.leaves_with_paths(w0):
        if specs[path].role is not cm.Role.LINEAR:
            continue
        T = [np.asarray(f[path], np.float64) - np.asarray(base, np.float64) for f in ft_leaves]
        A = [gram64(s[path]) for s in per_task]
        trimmed = ref.apply_linear_sequential(T, positive_top_bases(T, A, lam, c))
        removed += [np.sum((t - tt) ** 2) for t, tt in zip(T, trimmed)]
        total += [np.sum(t ** 2) for t in T]
    return removed / total


def compare(got, want, w0):
    """``(max relative error per leaf, max error relative to the merged update per leaf)`` of ``got`` (a params
    tree, or ``{path: array}``) against ``want`` (``{path: float64}``); every path of ``want`` must be present."""
    got = got if _is_flat(got) else _by_path(got)
    base = _by_path(w0) if not _is_flat(w0) else w0
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    rel = upd = 0.0
    for path, expected in want.items():
        diff = np.linalg.norm(np.asarray(got[path], np.float64) - expected)
        rel = max(rel, float(diff / max(np.linalg.norm(expected), 1e-300)))
        step = np.linalg.norm(expected - np.asarray(base[path], np.float64))
        if step > 0:
            upd = max(upd, float(diff / step))
    return rel, upd


def _is_flat(tree):
    return isinstance(tree, dict) and all(isinstance(k, str) and not isinstance(v, dict) for k, v in tree.items())


def folder_statistics(base_dir, task_dirs, exemplar_files, *, feature_scale=1.0):
    """``(base, tasks, stats)`` as ``catmerge merge`` sees them: checkpoints loaded by the pipeline, and task k's
    statistics captured from ``W0 + feature_scale·T_k`` (formed here in NumPy) on task k's exemplar file."""
    from catmerge_jax import pipeline
    from catmerge_jax.capture import make_capture

    base = pipeline.load_checkpoint(base_dir)
    tasks = [pipeline.load_checkpoint(d) for d in task_dirs]
    capture = make_capture(base.model(), rules=pipeline.capture_rules(base.kind))
    w0 = _by_path(base.params)
    stats = []
    for task, path in zip(tasks, exemplar_files):
        ft = _by_path(task.params)
        feature = {p: (np.asarray(w0[p], np.float64) + feature_scale * (np.asarray(ft[p], np.float64)
                                                                        - np.asarray(w0[p], np.float64)))
                   .astype(np.asarray(w0[p]).dtype) for p in w0}
        params = cm.map_with_path(lambda p, _: feature[p], base.params)
        stats.append(pipeline.task_statistics(capture, params, pipeline.read_exemplars(path, base)))
    return base, tasks, stats


def reference_folder_merge(base_dir, task_dirs, exemplar_files, *, alpha=0.3, lam=5.0, c=3, feature_scale=1.0):
    """What ``catmerge merge --method cat`` should write into ``model.safetensors``, in float64: the statistics of
    :func:`folder_statistics`, the merge of :func:`reference_cat_merge`, the keys/layout of the base checkpoint.

    Returns ``{checkpoint key: float64 array}``.
    """
    from converters.hf import to_torch_layout

    base, tasks, stats = folder_statistics(base_dir, task_dirs, exemplar_files, feature_scale=feature_scale)
    merged = reference_cat_merge(base.params, [t.params for t in tasks], stats, alpha=alpha, lam=lam, c=c)
    # the converter's per-leaf layout change (renames and transposes; round trips are tested in test_converters.py)
    return {leaf.key: to_torch_layout(merged[path], leaf.transform) for path, leaf in base.meta.leaves.items()}


def ill_posed_linear_leaves(w0, finetuned, stats, *, lam, c, gap_rtol=1e-4):
    """Linear leaf paths where some ``G_k`` has a clearly positive c-th eigenvalue and a relative eigengap at c below
    ``gap_rtol``: there float32 rounding (≈ 1e-7·‖G_k‖) may rotate the top-c subspace by up to ``1e-7 / gap``, so a
    float32 merge can only be compared loosely with the float64 one."""
    specs = _by_path(cm.classify(w0), cm.LeafSpec)
    per_task = [_by_path(s, cm.LeafStats) for s in stats]
    ft_leaves = [_by_path(f) for f in finetuned]
    bad = []
    for path, base in cm.leaves_with_paths(w0):
        if specs[path].role is not cm.Role.LINEAR or min(np.shape(base)) <= c:
            continue
        T = [np.asarray(f[path], np.float64) - np.asarray(base, np.float64) for f in ft_leaves]
        A = [gram64(s[path]) for s in per_task]
        for k in range(len(T)):
            G = ref.conflict_matrix(T, A, lam, k)
            w = np.sort(np.linalg.eigvalsh(G))[::-1]
            # a c-th eigenvalue near float32 noise is not removed anyway (the positive rule)
            if w[c - 1] > 1e-5 * np.abs(w).max() and eigengap(G, c) < gap_rtol:
                bad.append(path)
                break
    return bad
