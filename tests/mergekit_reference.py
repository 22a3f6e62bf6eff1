"""float64 NumPy references of MergeKit 0.1.5's merge methods, written from its definitions
(``mergekit/merge_methods/*.py``, ``mergekit/sparsify.py``), one weight at a time. No rounding to a working dtype:
the tests compare float32 computations against these with float32 tolerances."""

from __future__ import annotations

import numpy as np


def stable_order(v, descending):
    """Flat indices of ``v`` in ascending (or descending) order, ties to the lower index. Tests pass another
    ``order`` (e.g. ``torch.argsort`` on ``v.float()``, as MergeKit sorts) to the functions below."""
    flat = v.reshape(-1)
    return np.argsort(-flat if descending else flat, kind="stable")


def _mask_top(v, k, order=stable_order):     # the k largest of v, ties in ``order``'s order
    m = np.zeros(v.size, bool)
    m[order(v, True)[:k]] = True
    return m.reshape(v.shape)


def magnitude(t, density, rescale=False, order=stable_order):
    if density >= 1:
        return t
    if density <= 0:
        return np.zeros_like(t)
    k = max(1, int(density * t.size))
    return _rescale(t, _mask_top(np.abs(t), k, order), rescale)


def magnitude_outliers(t, density, gamma, rescale=False, order=stable_order):
    if density >= 1:
        return t
    n = t.size
    target, top = int(density * n), int(gamma * n)
    bot = max(0, n - target - top)
    order = order(np.abs(t), False)
    m = np.zeros(n, bool)
    m[order[bot:bot + target]] = True
    return _rescale(t, m.reshape(t.shape), rescale)


def _rescale(t, mask, rescale):
    masked = t * mask
    if not rescale:
        return masked
    before, after = np.abs(t).sum(), np.abs(masked).sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def gta(base, models, weight, *, sparsify=None, consensus=None, normalize=False, rescale=False, lam=1.0,
        density=None, gamma=None, order=stable_order):
    deltas = []
    for k, m in enumerate(models):
        d = m - base
        if sparsify == "magnitude":
            d = magnitude(d, density[k], rescale, order)
        elif sparsify == "magnitude_outliers":
            d = magnitude_outliers(d, density[k], gamma[k], rescale, order)
        deltas.append(d * weight[k])
    deltas = np.stack(deltas)
    w = np.asarray(weight, np.float64).reshape((-1,) + (1,) * base.ndim)
    if consensus == "sum":
        elected = np.where(deltas.sum(0) >= 0, 1, -1)
        mask = np.sign(deltas) == elected
        mixed = (deltas * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor = np.where(np.abs(divisor) < 1e-8, 1, divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def linear(models, weight, normalize=True):
    w = np.asarray(weight, np.float64).reshape((-1,) + (1,) * (models[0].ndim))
    out = (w * np.stack(models)).sum(0)
    return out / w.sum() if normalize else out


def slerp(v0, v1, t, threshold=0.9995, eps=1e-8):
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > eps else 1), (nb if nb > eps else 1)
    dot = np.clip(np.dot(a / na, b / nb), -1, 1)
    if abs(dot) > threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    th = np.arccos(dot)
    return ((np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)).reshape(v0.shape)


def nuslerp(base, models, weight):
    t = weight[1] / sum(weight)
    v0, v1 = (models[0] - base).reshape(-1), (models[1] - base).reshape(-1)
    u0, u1 = v0 / np.linalg.norm(v0), v1 / np.linalg.norm(v1)
    th = np.arccos(np.clip(np.dot(u0, u1), -1, 1))
    return base + ((np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)).reshape(base.shape)


def multislerp(base, models, weight, eps=1e-8):
    tv = np.stack([m - base for m in models]).reshape(len(models), -1)
    w = np.asarray(weight, np.float64) / np.sum(weight)
    norms = np.linalg.norm(tv, axis=1, keepdims=True)
    units = tv / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean /= np.linalg.norm(mean)
    tangent = units - (units @ mean)[:, None] * mean
    tres = (tangent * w[:, None]).sum(0)
    tn = np.linalg.norm(tres) + eps
    out = mean * np.cos(tn) + tres * np.sin(tn) / tn
    return base + (out * (norms[:, 0] * w).sum()).reshape(base.shape)


def karcher(models, max_iter=10, tol=1e-5):
    n = len(models)
    flat = [m.reshape(-1) for m in models]
    norms = [np.linalg.norm(x) for x in flat]
    units = [x / nm for x, nm in zip(flat, norms)]
    a = [1.0 / n] * n
    mean = sum(ai * u for ai, u in zip(a, units))
    mean /= np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for ai, u in zip(a, units):
            dot = np.clip(mean @ u, -1, 1)
            th = np.arccos(dot)
            if th < tol:
                continue
            tangent += ai * (th / np.sin(th)) * (u - dot * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * tangent / tn
        mean /= np.linalg.norm(mean)
    return (sum(ai * nm for ai, nm in zip(a, norms)) * mean).reshape(models[0].shape)


def model_stock(base, models, filter_wise=False):
    k = len(models)
    w0 = base if filter_wise else base.reshape(-1)
    off = [(m if filter_wise else m.reshape(-1)) - w0 for m in models]
    cos = [np.clip((off[i] * off[j]).sum(-1) / np.maximum(np.linalg.norm(off[i], axis=-1)
                                                          * np.linalg.norm(off[j], axis=-1), 1e-6), -1, 1)
           for i in range(k) for j in range(i + 1, k)]
    c = np.mean(cos, axis=0)[..., None] if filter_wise else np.mean(cos)
    t = k * c / (1 + (k - 1) * c)
    avg = sum(m if filter_wise else m.reshape(-1) for m in models) / k
    return (t * avg + (1 - t) * w0).reshape(base.shape)


def sce(base, models, select_topk=1.0, topk=None):
    """``topk(v, k)``: the flat indices of the k largest of v (default: ties to the lower index; MergeKit's is
    ``torch.topk``, whose order among ties differs from its sort's)."""
    tvs = np.stack([m - base for m in models])
    if select_topk < 1:
        var = tvs.var(0)
        k = int(np.count_nonzero(var) * select_topk)
        keep = np.zeros(var.size, bool)
        keep[(topk or (lambda v, k: stable_order(v, True)[:k]))(np.abs(var), k)] = True
        tvs = tvs * keep.reshape(var.shape)[None]
    elected = np.where(tvs.sum(0) >= 0, 1, -1)
    erase = np.sign(tvs) == elected
    w = (tvs ** 2).reshape(len(models), -1).mean(1)
    w = w / w.sum()
    ew = w.reshape((-1,) + (1,) * base.ndim) * erase
    return base + (tvs * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


def nearswap(base, other, t):
    w = np.clip(t / np.maximum(np.abs(base - other), 1e-6), 0, 1)
    return w * other + (1 - w) * base


def ram(base, models, epsilon=1e-5, plus=False, r=0.1, alpha=0.2):
    tv = np.stack([m - base for m in models]).reshape(len(models), -1)
    nz = np.abs(tv) > epsilon
    cnt = nz.sum(0)
    overlap, unique = cnt > 1, cnt == 1
    z = tv * nz
    lam = np.ones(len(models))
    if plus:
        rho = (nz & overlap).sum(1) / np.maximum((nz & unique).sum(1), epsilon)
        lam = 1 + r * np.clip(rho, 0, alpha)
    merged = (z * unique * lam[:, None] + z * overlap / np.maximum(cnt, 1)).sum(0)
    return base + merged.reshape(base.shape)


def arcee_fusion(base, other):
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(other) + 1e-8, softmax(base) + 1e-8
    imp = np.abs(other - base) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s = np.sort(imp.reshape(-1))
    q1, med, q3 = (s[int(np.float32(f) * (s.size - 1))] for f in (0.25, 0.5, 0.75))
    return base + (other - base) * (imp >= med + 1.5 * (q3 - q1))


def karcher_torch(tensors, max_iter=10, tol=1e-5):
    """MergeKit's ``karcher`` evaluated as MergeKit evaluates it: PyTorch eager ops on the inputs' dtype (bf16:
    every op rounds; norms in float32), equal weights. For the bf16 tests: the iteration does not converge in bf16
    and wanders between neighbouring points, so only the same op-by-op rounding gives the same result."""
    import torch

    k = len(tensors)
    alpha = 1.0 / k
    norms = [torch.linalg.vector_norm(t.float()) for t in tensors]
    units = [(t / n).to(t.dtype) for t, n in zip(tensors, norms)]     # no zero or tiny norms in the tests
    mean = torch.zeros_like(units[0])
    for u in units:
        mean += alpha * u
    mean = (mean / torch.linalg.vector_norm(mean.float())).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() >= tol:
                tangent += alpha * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent.float())
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.float())
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    scale = 0
    for n in norms:
        scale = scale + alpha * n
    return scale * mean
