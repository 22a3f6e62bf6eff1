"""The PyTorch baseline of ``bench_llm_exemplars.py``: CAT Merging of Llama folders written straightforwardly.

What a first PyTorch port does, in float32: ``transformers`` loads each task's ``LlamaForCausalLM`` whole (the
checkpoint's bf16 widened to float32), forward hooks on every ``nn.Linear`` and every RMSNorm collect the Gram
``A_k = X_kᵀX_k`` of the layer's input rows (real tokens only) and ``Σ x̂²`` (``x̂ = x / sqrt(mean(x²) + ε)``), then per
weight and task ``G_k = Σ_{i≠k} T_iᵀ(A_k − λA_i)T_i`` with ``T`` the ``(in, out)`` task matrix and a full
``torch.linalg.eigh`` of it, Algorithm 1's sequential projections, the scale masks; the embedding is task arithmetic.

The rules are catmerge-jax's ``cat`` (as in ``torch_cli_job.py``): alpha 0.3, lam 5, c 3; of the top-c
eigenvectors of ``G_k`` only those whose eigenvalue exceeds ``100·eps₃₂·(Σ_{i≠k} ‖X_kT_i‖² + λ‖X_iT_i‖²)`` are kept
and projected out of the other tasks' matrices in task order; RMSNorm weights: the c largest entries of
``Σ_{i≠k} T_i²(s_k − λs_i)`` (``s`` = ``Σ x̂²``) per task, an entry removed for any other task is zeroed; merged
``W0 + α Σ T̃_k``.

**The untied ``lm_head``** is a Linear ``(in, out) = (d, vocab)``: its ``G_k`` would be ``(vocab, vocab)``
(32000² float32 = 4 GB, and an eigh of it out of reach), so this job uses the equivalent low-rank form: with
``C = [T_1; ...; T_K]`` ``(K·d, vocab)`` and ``Cᵀ = QR`` (one reduced QR, ``Q`` ``(vocab, K·d)``),
``G_k = Q (R M_k Rᵀ) Qᵀ`` where ``M_k`` is block-diagonal with blocks ``A_k − λA_i`` (``i ≠ k``, zero for ``i = k``);
the eigenpairs of the ``(K·d, K·d)`` matrix ``R M_k Rᵀ`` (full ``eigh``) give ``G_k``'s nonzero ones exactly, its
eigenvectors ``Q v``.

    python experiments/torch_llm_cat.py --base DIR --task D1 D2 D3 D4 --exemplars F1 F2 F3 F4 --out DIR \
        [--dump leaves.npz --dump-keys KEY ...]      # float32 merged tensors for the agreement check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

# The PyTorch CLI job's folder I/O and ordered projection (same rules; this script adds the LLM capture and the
# low-rank solve a vocabulary-wide head needs). Run as a script, its own folder is on sys.path.
from torch_cli_job import POSITIVE_RTOL, project_out_others, read_state, write_folder

MAX_TOKENS = 128


def tokenize(base: str, exemplar_file: str):
    """Right-padded ids and mask as catmerge reads them (special tokens, pad = EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    with open(exemplar_file, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return tokenizer(lines, padding=True, truncation=True, max_length=MAX_TOKENS, pad_to_multiple_of=16,
                     add_special_tokens=True, return_tensors="pt")


def capture(folder: str, enc) -> dict[str, torch.Tensor]:
    """Forward hooks on task k's whole float32 model: ``{module: Gram}`` for every Linear (the LM head too) and
    ``{module: Σ x̂²}`` for every RMSNorm, over real tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    real = enc["attention_mask"].bool()
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(mod, args, out, name=name):
                x = args[0][real]
                stats[name] = x.T @ x
        elif type(module).__name__.endswith("RMSNorm"):
            def hook(mod, args, out, name=name):
                x = args[0][real].float()
                xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
                stats[name] = (xhat * xhat).sum(0)
        else:
            continue
        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    for h in hooks:
        h.remove()
    del model
    return stats


def top_bases(g_small: torch.Tensor, lift, bound: float, c: int) -> torch.Tensor:
    """The top-c eigenvectors of ``G_k`` (``lift`` maps the solved matrix's vectors to ``G_k``'s) whose eigenvalue
    passes the positivity threshold."""
    values, vectors = torch.linalg.eigh(g_small)              # ascending
    top_values, top = values[-c:], vectors[:, -c:]
    return lift(top[:, top_values > POSITIVE_RTOL * bound])


def linear_bases(t: torch.Tensor, grams: list[torch.Tensor], lam: float, c: int, low_rank: bool) -> list:
    """Per task k the kept top-c eigenvectors of ``G_k = Σ_{i≠k} T_iᵀ(A_k − λA_i)T_i``; ``t`` is ``(K, in, out)``."""
    num, d_in, d_out = t.shape
    bounds = []
    for k in range(num):
        bounds.append(sum(float(torch.sum(t[i] * (grams[k] @ t[i])) + lam * torch.sum(t[i] * (grams[i] @ t[i])))
                          for i in range(num) if i != k))
    if not low_rank:
        out = []
        for k in range(num):
            g = torch.zeros(d_out, d_out)
            for i in range(num):
                if i != k:
                    g += t[i].T @ (grams[k] - lam * grams[i]) @ t[i]
            out.append(top_bases(g, lambda v: v, bounds[k], c))
        return out
    # (vocab, vocab) is out of reach: G_k = Q (R M_k Rᵀ) Qᵀ with Cᵀ = QR, C = [T_1; ...; T_K]
    q, r = torch.linalg.qr(t.reshape(num * d_in, d_out).T)     # (out, K·in), (K·in, K·in)
    blocks = [r[:, i * d_in:(i + 1) * d_in] for i in range(num)]
    out = []
    for k in range(num):
        small = torch.zeros(num * d_in, num * d_in)
        for i in range(num):
            if i != k:
                small += blocks[i] @ (grams[k] - lam * grams[i]) @ blocks[i].T
        out.append(top_bases(small, lambda v: q @ v, bounds[k], c))
    return out


def cat_merge(base: dict, tasks: list[dict], stats: list[dict], *, alpha=0.3, lam=5.0, c=3, log=print) -> dict:
    num = len(tasks)
    out = {}
    for key in base:
        w0 = base[key].float()
        t = torch.stack([task[key].float() - w0 for task in tasks])
        module, _, leaf = key.rpartition(".")
        if "embed" in module:
            trimmed = list(t)                                   # the embedding: task arithmetic
        elif t.dim() == 3:                                      # Linear (out, in) -> T as (in, out)
            start = time.perf_counter()
            t = t.transpose(1, 2).contiguous()
            grams = [stats[k][module] for k in range(num)]
            bases = linear_bases(t, grams, lam, c, low_rank=t.shape[-1] > 16384)
            trimmed = project_out_others(t, bases)
            if t.shape[-1] > 16384:
                log(f"  {key}: low-rank solve {time.perf_counter() - start:.1f} s")
        else:                                                   # RMSNorm weight
            sq = t ** 2
            s = torch.stack([stats[k][module] for k in range(num)])
            scores = s * (sq.sum(0) - sq) - lam * ((sq * s).sum(0) - sq * s)
            masks = torch.zeros_like(scores, dtype=torch.bool)
            masks.scatter_(-1, torch.topk(scores, c, dim=-1).indices, True)
            removed = (masks.int().sum(0)[None] - masks.int()) > 0
            trimmed = list(torch.where(removed, torch.zeros_like(t), t))
        out[key] = w0 + alpha * torch.stack(trimmed).sum(0)    # float32
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--task", required=True, nargs="+")
    parser.add_argument("--exemplars", required=True, nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dump", help="write these merged tensors in float32 here (.npz)")
    parser.add_argument("--dump-keys", nargs="*", default=[])
    parser.add_argument("--timings", help="write the stage seconds here (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    clock, t0 = {}, time.perf_counter()
    stats = [capture(folder, tokenize(args.base, ex)) for folder, ex in zip(args.task, args.exemplars)]
    clock["statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = read_state(args.base)
    tasks = [read_state(folder) for folder in args.task]
    clock["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        merged = cat_merge(base, tasks, stats, log=lambda s: print(s, flush=True))
    clock["solve"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_folder(args.out, args.base, merged, base)
    clock["write"] = time.perf_counter() - t0
    if args.dump:
        np.savez(args.dump, **{k: merged[k].numpy() for k in args.dump_keys})
    print(json.dumps({k: round(v, 2) for k, v in clock.items()}), flush=True)
    if args.timings:
        with open(args.timings, "w") as f:
            json.dump(clock, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
