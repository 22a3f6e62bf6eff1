"""The PyTorch baseline of ``bench_cli.py``: the whole ``catmerge merge`` job written straightforwardly in PyTorch.

Folders in, merged folder out, as a first PyTorch port would do it: ``transformers`` loads the base and the task
models and the tokenizer; CAT captures every ``nn.Linear``'s input rows and every ``nn.LayerNorm``'s normalized
input with forward hooks (padding excluded), forms the Grams ``A_k = X_kᵀX_k`` and ``G_k = Σ_{i≠k} T_iᵀ(A_k − λA_i)T_i``,
takes a full ``torch.linalg.eigh`` per layer and task, and trims by Algorithm 1; TSV takes ``torch.linalg.svd``s;
TIES a global magnitude threshold per task. The merged tensors are written with the base's key names (safetensors)
beside copies of the base's other files.

Each method follows the rules of catmerge-jax's implementation of the same name (documented there), so the two
outputs agree to float32 rounding (``bench_cli.py`` checks it):

* ``cat`` (alpha 0.3, lam 5, c 3): linear weights (``Linear.weight`` as ``(in, out)`` task matrices ``T``) keep
  out of the top-c eigenvectors of ``G_k`` only those whose eigenvalue exceeds ``100·eps₃₂`` times
  ``Σ_{i≠k} ‖X_kT_i‖² + λ‖X_iT_i‖²`` (catmerge_jax.conflict.POSITIVE_RTOL), and project them out in task order;
  LayerNorm weights: the c largest entries of ``Σ_{i≠k} T_i²(s_k − λs_i)``, ``s`` the column sums of ``x̂²``;
  biases (Linear and LayerNorm): the c largest of ``Σ_{i≠k} T_i²``; an entry removed for any other task is zeroed;
  embeddings: task arithmetic. Merged: ``W0 + α Σ T̃_k``.
* ``tsv`` (alpha 1): every 2-D tensor: each task's top ⌊r/K⌋ singular triplets, U and V replaced by their
  orthogonal polar factors; others ``W0 + α·mean T_k``.
* ``ties`` (k 0.2, alpha 1): per task, keep ``|T| ≥`` the ``⌈kN⌉``-th largest ``|T|`` over all its tensors; elect
  the sign of ``Σ T̃``; average the agreeing entries.

    python experiments/torch_cli_job.py --method cat --base DIR --task DIR DIR DIR --exemplars F F F --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
from torch import nn

POSITIVE_RTOL = 100.0 * float(np.finfo(np.float32).eps)
MAX_TOKENS = 128


def read_state(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def merged_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The parameters a merge changes: floating tensors, not buffers such as ``position_ids``."""
    return [k for k, v in state.items() if v.is_floating_point() and not k.endswith("position_ids")]


# ---------------------------------------------------------------------------------------------------------------
# CAT
# ---------------------------------------------------------------------------------------------------------------


def capture(folder: str, exemplar_file: str, tokenizer) -> dict[str, dict]:
    """Forward hooks on the task model: per Linear the Gram of its input rows, per LayerNorm ``Σ x̂²`` (real tokens
    only; the pooler sees the first token of every sentence)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    with open(exemplar_file, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    enc = tokenizer(lines, padding=True, truncation=True, max_length=MAX_TOKENS, pad_to_multiple_of=16,
                    return_tensors="pt")
    real = enc["attention_mask"].bool()
    stats: dict[str, dict] = {}
    hooks = []

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x[real] if x.dim() == 3 else x  # (tokens, d); the pooler's (batch, d) are all real

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(mod, args, out, name=name):
                x = rows(args[0])
                stats[name] = {"gram": x.T @ x}
        elif isinstance(module, nn.LayerNorm):
            def hook(mod, args, out, name=name):
                x = rows(args[0])
                xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + mod.eps)
                stats[name] = {"sq_sum": (xhat * xhat).sum(0)}
        else:
            continue
        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    return stats


def project_out_others(t: torch.Tensor, bases: list[torch.Tensor]) -> list[torch.Tensor]:
    """Algorithm 1's trimming of stacked task vectors ``t`` (K, in, out): from each ``T_i`` remove, one task after
    another, its component in every other task's basis ``B_k`` (out, c_k); returned as ``(out, in)`` weights."""
    trimmed = []
    for i in range(len(t)):
        ti = t[i].clone()
        for k in range(len(t)):
            if k != i:
                ti = ti - (ti @ bases[k]) @ bases[k].T
        trimmed.append(ti.T)
    return trimmed


def cat_merge(base: dict, tasks: list[dict], stats: list[dict], *, alpha=0.3, lam=5.0, c=3) -> dict:
    num = len(tasks)
    out = {}
    for key in merged_keys(base):
        w0 = base[key].float()
        t = torch.stack([task[key].float() - w0 for task in tasks])
        module, _, leaf = key.rpartition(".")
        kind = "embedding" if "embeddings" in module and "LayerNorm" not in module else (
            "linear" if leaf == "weight" and t.dim() == 3 else "scale" if leaf == "weight" else "shift")
        if kind == "linear":  # T as (in, out)
            t = t.transpose(1, 2)
            grams = [stats[k][module]["gram"] for k in range(num)]
            bases = []
            for k in range(num):
                g = torch.zeros(t.shape[-1], t.shape[-1])
                bound = 0.0
                for i in range(num):
                    if i != k:
                        g += t[i].T @ (grams[k] - lam * grams[i]) @ t[i]
                        bound += float(torch.sum(t[i] * (grams[k] @ t[i])) + lam * torch.sum(t[i] * (grams[i] @ t[i])))
                values, vectors = torch.linalg.eigh(g)  # ascending
                top_values, top = values[-c:], vectors[:, -c:]
                bases.append(top[:, top_values > POSITIVE_RTOL * bound])
            trimmed = project_out_others(t, bases)
        elif kind in ("scale", "shift"):
            sq = t ** 2
            if kind == "scale":
                s = torch.stack([stats[k][module]["sq_sum"] for k in range(num)])
                scores = s * (sq.sum(0) - sq) - lam * ((sq * s).sum(0) - sq * s)
            else:
                scores = sq.sum(0) - sq
            masks = torch.zeros_like(scores, dtype=torch.bool)
            masks.scatter_(-1, torch.topk(scores, c, dim=-1).indices, True)
            removed = (masks.int().sum(0)[None] - masks.int()) > 0
            trimmed = list(torch.where(removed, torch.zeros_like(t), t))
        else:
            trimmed = list(t)
        out[key] = (w0 + alpha * torch.stack(trimmed).sum(0)).to(base[key].dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# TSV and TIES
# ---------------------------------------------------------------------------------------------------------------


def polar(a: torch.Tensor) -> torch.Tensor:
    u, _, vt = torch.linalg.svd(a, full_matrices=False)
    return u @ vt


def tsv_merge(base: dict, tasks: list[dict], *, alpha=1.0) -> dict:
    num = len(tasks)
    out = {}
    for key in merged_keys(base):
        w0 = base[key].float()
        t = torch.stack([task[key].float() - w0 for task in tasks])
        if t.dim() != 3:
            out[key] = (w0 + alpha * t.mean(0)).to(base[key].dtype)
            continue
        m, n = t.shape[1:]
        keep = min(m, n) // num
        u, s, vt = torch.linalg.svd(t, full_matrices=False)
        u_cat = u[:, :, :keep].permute(1, 0, 2).reshape(m, num * keep)
        s_cat = s[:, :keep].reshape(num * keep)
        v_cat = vt[:, :keep, :].permute(2, 0, 1).reshape(n, num * keep)
        delta = (polar(u_cat) * s_cat[None, :]) @ polar(v_cat).T
        out[key] = (w0 + alpha * delta).to(base[key].dtype)
    return out


def ties_merge(base: dict, tasks: list[dict], *, k=0.2, alpha=1.0) -> dict:
    keys = merged_keys(base)
    trimmed = []
    for task in tasks:
        tv = {key: task[key].float() - base[key].float() for key in keys}
        flat = torch.cat([v.abs().reshape(-1) for v in tv.values()])
        n_keep = math.ceil(k * flat.numel())
        threshold = torch.kthvalue(flat, flat.numel() - n_keep + 1).values  # the n_keep-th largest
        trimmed.append({key: torch.where(v.abs() >= threshold, v, torch.zeros_like(v)) for key, v in tv.items()})
    out = {}
    for key in keys:
        t = torch.stack([tr[key] for tr in trimmed])
        sign = torch.sign(t.sum(0))
        agree = (torch.sign(t) == sign[None]) & (t != 0)
        count = agree.sum(0)
        total = torch.where(agree, t, torch.zeros_like(t)).sum(0)
        tau = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
        out[key] = (base[key].float() + alpha * tau).to(base[key].dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------


def write_folder(out_dir: str, base_dir: str, state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> None:
    """``out_dir`` with the base folder's other files and ``model.safetensors`` holding ``state`` (cast to the
    base's dtypes) where it has a key, else the base's tensor."""
    from safetensors.torch import save_file

    os.makedirs(out_dir)
    for name in os.listdir(base_dir):
        src = os.path.join(base_dir, name)
        if name == "model.safetensors" or name.startswith("."):
            continue
        (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, os.path.join(out_dir, name))
    full = {k: (state[k] if k in state else v).to(v.dtype).contiguous() for k, v in base.items()}
    save_file(full, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=("cat", "tsv", "ties"))
    parser.add_argument("--base", required=True)
    parser.add_argument("--task", required=True, nargs="+")
    parser.add_argument("--exemplars", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--timings", help="write the stage seconds here (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    clock, t0 = {}, time.perf_counter()
    base = read_state(args.base)
    tasks = [read_state(folder) for folder in args.task]
    clock["load"] = time.perf_counter() - t0
    if args.method == "cat":
        from transformers import AutoTokenizer

        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(args.base, local_files_only=True)
        stats = [capture(folder, ex, tokenizer) for folder, ex in zip(args.task, args.exemplars)]
        clock["statistics"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        merged = cat_merge(base, tasks, stats)
    elif args.method == "tsv":
        t0 = time.perf_counter()
        merged = tsv_merge(base, tasks)
    else:
        t0 = time.perf_counter()
        merged = ties_merge(base, tasks)
    clock["solve"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_folder(args.out, args.base, merged, base)
    clock["write"] = time.perf_counter() - t0
    if args.timings:
        with open(args.timings, "w") as f:
            json.dump(clock, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
