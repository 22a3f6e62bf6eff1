"""Float64 NumPy references written from the paper's equations (CAT eqs. 11, 14, 17; Algorithm 1), and
from the TIES and task-arithmetic papers. Deliberately loop-based and independent of the library."""

from __future__ import annotations

import itertools

import numpy as np


def conflict_matrix(T, A, lam, k):
    """G_k = Σ_{i≠k} T_iᵀ (A_k − λ A_i) T_i."""
    return sum(T[i].T @ (A[k] - lam * A[i]) @ T[i] for i in range(len(T)) if i != k)


POSITIVE_RTOL = 100 * np.finfo(np.float32).eps  # the library's rule: eigenvalue > 100 float32 eps × the bound


def linear_bases(T, A, lam, c, positive=False):
    """Top-c eigenvectors (largest algebraic eigenvalues) of every G_k: list of (out, c).

    ``positive``: keep only the directions whose eigenvalue exceeds POSITIVE_RTOL · Σ_{i≠k} tr(T_iᵀA_kT_i) +
    λ tr(T_iᵀA_iT_i) (the library's default; removing a direction with eigenvalue ≤ 0 cannot lower eq. 10).
    """
    out = []
    for k in range(len(T)):
        w, v = np.linalg.eigh(conflict_matrix(T, A, lam, k))
        order = np.argsort(w)[::-1][:c]
        basis = v[:, order]
        if positive:
            bound = sum(np.trace(T[i].T @ A[k] @ T[i]) + lam * np.trace(T[i].T @ A[i] @ T[i])
                        for i in range(len(T)) if i != k)
            basis = basis[:, w[order] > POSITIVE_RTOL * bound]
        out.append(basis)
    return out


def linear_objective(X, T, B, lam, k):
    """Paper eq. 11: Σ_{i≠k} ‖X_k T_i B Bᵀ‖² − λ ‖X_i T_i B Bᵀ‖², evaluated from the rows."""
    P = B @ B.T
    return sum(np.sum((X[k] @ T[i] @ P) ** 2) - lam * np.sum((X[i] @ T[i] @ P) ** 2)
               for i in range(len(T)) if i != k)


def scale_scores(T, S, lam, k):
    """g_k[z] = Σ_{i≠k} T_i[z]² (s_k[z] − λ s_i[z])."""
    return sum(T[i] ** 2 * (S[k] - lam * S[i]) for i in range(len(T)) if i != k)


def top_c_mask(scores, c):
    """True at the c largest entries; ties broken toward the lower index (stable)."""
    mask = np.zeros(scores.shape, bool)
    mask[np.argsort(-scores, kind="stable")[:c]] = True
    return mask


def scale_masks(T, S, lam, c):
    return np.stack([top_c_mask(scale_scores(T, S, lam, k), c) for k in range(len(T))])


def scale_objective(Xhat, T, m, lam, k):
    """Paper eq. 14 from normalized rows: Σ_{i≠k} Σ_{x_k}‖x_k∘T_i∘m‖² − λ Σ_{x_i}‖x_i∘T_i∘m‖²."""
    return sum(np.sum((Xhat[k] * (T[i] * m)) ** 2) - lam * np.sum((Xhat[i] * (T[i] * m)) ** 2)
               for i in range(len(T)) if i != k)


def shift_masks(T, c, counts=None, lam=None):
    K = len(T)
    masks = []
    for k in range(K):
        if counts is None:
            g = sum(T[i] ** 2 for i in range(K) if i != k)
        else:
            g = sum(T[i] ** 2 * (counts[k] - lam * counts[i]) for i in range(K) if i != k)
        masks.append(top_c_mask(g, c))
    return np.stack(masks)


def shift_objective(T, m, k, counts, lam):
    """Paper eq. 17: Σ_{i≠k} (n_k ‖T_i∘m‖² − λ n_i ‖T_i∘m‖²)."""
    return sum(counts[k] * np.sum((T[i] * m) ** 2) - lam * counts[i] * np.sum((T[i] * m) ** 2)
               for i in range(len(T)) if i != k)


def apply_linear_sequential(T, B):
    """Algorithm 1: for k = 1..K, for i ≠ k: T_i ← T_i − T_i B_k B_kᵀ."""
    T = [t.copy() for t in T]
    for k in range(len(T)):
        for i in range(len(T)):
            if i != k:
                T[i] = T[i] - T[i] @ B[k] @ B[k].T
    return T


def apply_linear_joint(T, B):
    """Project T_i onto the orthogonal complement of span{B_k : k ≠ i}."""
    out = []
    for i in range(len(T)):
        M = np.concatenate([B[k] for k in range(len(T)) if k != i], axis=1)
        if M.shape[1] == 0:
            out.append(T[i].copy())
            continue
        U, s, _ = np.linalg.svd(M, full_matrices=False)
        U = U[:, s > 1e-10 * max(s.max(), 1e-300)]
        out.append(T[i] - T[i] @ U @ U.T)
    return out


def apply_masks(T, masks):
    out = []
    for i in range(len(T)):
        t = T[i].copy()
        for k in range(len(T)):
            if k != i:
                t = t * (1 - masks[k])
        out.append(t)
    return out


def all_masks(d, c):
    for idx in itertools.combinations(range(d), c):
        m = np.zeros(d)
        m[list(idx)] = 1
        yield m


def ties(tvs, k, per_tensor=False):
    """TIES (Yadav et al. 2023) on a list (tasks) of lists (leaves) of arrays: trim, elect, disjoint mean."""
    def trim(leaves):
        if per_tensor:
            return [np.where(np.abs(x) >= np.sort(np.abs(x).ravel())[::-1][int(np.ceil(k * x.size)) - 1], x, 0)
                    for x in leaves]
        flat = np.sort(np.concatenate([np.abs(x).ravel() for x in leaves]))[::-1]
        thr = flat[int(np.ceil(k * flat.size)) - 1]
        return [np.where(np.abs(x) >= thr, x, 0) for x in leaves]

    trimmed = [trim(t) for t in tvs]
    merged = []
    for j in range(len(tvs[0])):
        stack = np.stack([t[j] for t in trimmed])
        sign = np.sign(stack.sum(0))
        out = np.zeros_like(stack[0])
        for idx in np.ndindex(out.shape):
            vals = [v for v in stack[(slice(None),) + idx] if v != 0 and np.sign(v) == sign[idx]]
            out[idx] = np.mean(vals) if vals else 0.0
        merged.append(out)
    return merged
