"""Exemplar merges of decoder LLM folders, layer by layer (catmerge_jax.llm), against references.

* ``catmerge merge --method cat`` on tiny Llama (untied head), Qwen2 (q/k/v biases) and Gemma (x̂·(1 + w) norms, √d
  embeddings, tied head) folders equals a float64 PyTorch-hook CAT written here from the paper: forward hooks on
  every ``nn.Linear`` and RMSNorm of each task's own transformers model collect Grams and Σx̂² over the real tokens,
  then ``tests.reference``'s eqs. 11/14/17 and Algorithm 1 (positive directions only, the library's default rule),
  task arithmetic for the embedding. The merged folders load in transformers.
* The schedule is layer by layer: no tensor of block l + 1 is read before every tensor of block l is written; and
  RegMean through it equals a float64 RegMean on the same hooks' statistics.

The three families share one shape (hidden 32, 2 layers, GQA 4/2, MLP 48, vocab 48), so the merge compiles once.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from catmerge_jax import cli, llm
from converters import safetensors_io as st
from tests import reference as ref

WORDS = ("the a cat dog sat on mat ran fast slow big small red blue green house tree river moon sun star one two "
         "three four five six seven eight nine ten is was and or but not very quite").split()
SHAPE = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "gemma": "GemmaConfig"}
K = 3
ALPHA, LAM, C = 0.3, 5.0, 3                                        # the CLI's CAT defaults


def save_tokenizer(folder) -> None:
    """A word-level tokenizer (``tokenizers``) that adds ``<s>``, with no pad token (as Llama's)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "model_max_length": 64}, f)


def make_family(root, family: str) -> tuple[str, list[str]]:
    """A random base (every weight perturbed) and K tasks = base + N(0, 0.05²) noise, saved with the tokenizer."""
    import shutil

    config = getattr(transformers, CONFIGS[family])(**SHAPE)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    base = os.path.join(root, family, "base")
    model.save_pretrained(base)
    save_tokenizer(base)
    w0 = _state(base)
    rng = np.random.default_rng(10)
    tasks = []
    for k in range(1, K + 1):
        folder = os.path.join(root, family, f"task{k}")
        shutil.copytree(base, folder)
        st.save_file({n: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for n, v in w0.items()},
                     os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        tasks.append(folder)
    return base, tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    rng = np.random.default_rng(1)
    exemplars = []
    for k in range(K):
        path = root / f"exemplars{k}.txt"
        path.write_text("\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(3 + k)) + "\n")
        exemplars.append(str(path))
    return root, {f: make_family(str(root), f) for f in CONFIGS}, exemplars


_STATS: dict = {}


def _state(folder) -> dict[str, np.ndarray]:
    return {n: st.load_tensor(i.file, n) for n, i in st.list_tensors(folder).items()}


# ---------------------------------------------------------------------------------------------------------------
# The float64 PyTorch-hook reference


def torch_statistics(folder: str, exemplar_file: str, tokenizer_folder: str) -> dict[str, dict]:
    """``{module name: {"gram" | "sq_sum": float64, "count"}}`` of one task's own model on its exemplars (real
    tokens only), from forward hooks on its ``nn.Linear`` and RMSNorm modules in float64."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    tok.pad_token, tok.padding_side = tok.eos_token, "right"
    lines = [line.strip() for line in open(exemplar_file) if line.strip()]
    enc = tok(lines, padding=True, return_tensors="pt")
    real = enc["attention_mask"].bool()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64,
                                                              attn_implementation="eager").eval()
    stats: dict[str, dict] = {}

    def hook(name, module, args, output):
        x = args[0][real]                                         # (n, ...): padding never counts
        if isinstance(module, torch.nn.Linear):
            stats[name] = {"gram": (x.T @ x).numpy(), "count": x.shape[0]}
        else:
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            stats[name] = {"sq_sum": (xhat ** 2).sum(0).numpy(), "count": x.shape[0]}

    handles = [m.register_forward_hook(lambda mod, a, o, n=name: hook(n, mod, a, o))
               for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__.endswith("RMSNorm")]
    with torch.no_grad():
        model(**enc)
    for h in handles:
        h.remove()
    return stats


def cached_statistics(folder: str, exemplar_file: str, tokenizer_folder: str) -> dict[str, dict]:
    key = (folder, exemplar_file)
    if key not in _STATS:
        _STATS[key] = torch_statistics(folder, exemplar_file, tokenizer_folder)
    return _STATS[key]


def reference_regmean(base: str, tasks: list[str], exemplar_files: list[str], alpha: float = 0.9
                      ) -> dict[str, np.ndarray]:
    """RegMean (Jin et al. 2023) in float64 on the hooks' statistics: each linear ``W = (Σ G̃_k)⁻¹ Σ G̃_k W_k`` with
    ``G_k = X_kᵀX_k / n_k`` and ``G̃_k = diag(G_k) + α·offdiag(G_k)``; every other tensor the mean of the tasks'."""
    fts = [{k: v.astype(np.float64) for k, v in _state(t).items()} for t in tasks]
    stats = [cached_statistics(t, f, base) for t, f in zip(tasks, exemplar_files)]
    out = {}
    for key in fts[0]:
        module, _, kind = key.rpartition(".")
        if kind == "weight" and fts[0][key].ndim == 2 and not key.endswith("embed_tokens.weight"):
            grams = []
            for s in stats:
                g = s[module]["gram"] / s[module]["count"]
                grams.append(np.diag(np.diag(g)) + alpha * (g - np.diag(np.diag(g))))
            rhs = sum(g @ ft[key].T for g, ft in zip(grams, fts))        # (in, out)
            out[key] = np.linalg.solve(sum(grams), rhs).T
        else:
            out[key] = sum(ft[key] for ft in fts) / len(fts)
    return out


def reference_cat(base: str, tasks: list[str], exemplar_files: list[str]) -> dict[str, np.ndarray]:
    """``{checkpoint key: float64 merged tensor}``: CAT of the paper on the hooks' statistics."""
    w0 = {k: v.astype(np.float64) for k, v in _state(base).items()}
    fts = [{k: v.astype(np.float64) for k, v in _state(t).items()} for t in tasks]
    stats = [cached_statistics(t, f, base) for t, f in zip(tasks, exemplar_files)]
    out = {}
    for key, base_value in w0.items():
        module, _, kind = key.rpartition(".")
        T = [ft[key] - base_value for ft in fts]
        if key.endswith("embed_tokens.weight"):                   # role other: task arithmetic
            trimmed = T
        elif kind == "weight" and base_value.ndim == 2:           # nn.Linear (out, in): T_i is (in, out)
            Tt = [t.T for t in T]
            bases = ref.linear_bases(Tt, [s[module]["gram"] for s in stats], LAM, C, positive=True)
            trimmed = [t.T for t in ref.apply_linear_sequential(Tt, bases)]
        elif kind == "weight":                                    # RMSNorm: scale (x̂·w and x̂·(1 + w) alike)
            S = [s[module]["sq_sum"] for s in stats]
            trimmed = ref.apply_masks(T, ref.scale_masks(T, S, LAM, C).astype(float))
        else:                                                     # bias: shift, the paper's balanced rule
            trimmed = ref.apply_masks(T, ref.shift_masks(T, C).astype(float))
        out[key] = base_value + ALPHA * sum(trimmed)
    return out


@pytest.mark.parametrize("family", list(CONFIGS))
def test_cli_cat_equals_float64_torch_hook_reference(setup, family, tmp_path):
    root, families, exemplars = setup
    base, tasks = families[family]
    out = str(tmp_path / "merged")
    argv = ["merge", "--method", "cat", "--base", base, "--task", *tasks, "--exemplars", *exemplars, "--out", out,
            "--quiet"]
    assert cli.main(argv) == 0
    got, w0 = _state(out), _state(base)
    want = reference_cat(base, tasks, exemplars)
    assert set(got) == set(want)
    errors = {}
    for key, expected in want.items():
        assert got[key].dtype == w0[key].dtype and got[key].shape == w0[key].shape, key
        step = np.linalg.norm(expected - w0[key])
        errors[key] = np.linalg.norm(got[key] - expected) / step
    worst = max(errors, key=errors.get)
    assert errors[worst] < 2e-3, (worst, errors[worst])
    assert min(errors.values()) >= 0 and len(errors) == len(w0)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(merged).__name__ == f"{CONFIGS[family][:-6]}ForCausalLM"
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_regmean_layer_by_layer_equals_reference_and_reads_one_block_at_a_time(setup, tmp_path, monkeypatch):
    from catmerge_jax.folders import Folder
    from catmerge_jax.streaming import ShardWriter

    root, families, exemplars = setup
    base, tasks = families["llama"]
    events: list[tuple[str, str]] = []
    read, write = Folder.read_float32, ShardWriter.write
    monkeypatch.setattr(Folder, "read_float32",
                        lambda self, name: (events.append(("read", name)), read(self, name))[1])
    monkeypatch.setattr(ShardWriter, "write",
                        lambda self, name, a: (events.append(("write", name)), write(self, name, a))[1])
    out = llm.merge_folders_layerwise("regmean", base, tasks, exemplars, str(tmp_path / "merged"))

    def stage(name):
        return -1 if "embed_tokens" in name else int(name.split(".")[2]) if ".layers." in name else 10 ** 6
    # every read of a stage comes after the last write of the stage before it, and each tensor is written once
    last_write = {stage(name): i for i, (what, name) in enumerate(events) if what == "write"}
    for i, (what, name) in enumerate(events):
        earlier = [s for s in last_write if s < stage(name)]
        assert what == "write" or not earlier or last_write[max(earlier)] < i, name
    assert sorted(n for w, n in events if w == "write") == sorted(_state(base))

    got, w0 = _state(out), _state(base)
    for key, expected in reference_regmean(base, tasks, exemplars).items():
        step = np.linalg.norm(expected - w0[key])
        assert np.linalg.norm(got[key] - expected) <= 1e-4 * step, key


def test_decoder_folders_refuse_what_they_cannot_do(setup, tmp_path):
    root, families, exemplars = setup
    base, tasks = families["qwen2"]
    other, _ = families["gemma"]
    with pytest.raises(llm.LayerwiseError, match="'task_arithmetic' does not merge from per-leaf exemplar"):
        llm.merge_folders_layerwise("task_arithmetic", base, tasks, exemplars, str(tmp_path / "a"))
    with pytest.raises(Exception, match=r"is a gemma model but the base .* is a qwen2"):
        llm.merge_folders_layerwise("cat", base, [tasks[0], other], exemplars[:2], str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_docs_blocks_run_and_an_einsum_merge_equals_the_same_weights_as_dense_layers():
    """docs/llm.md's python blocks run as written; the scanned Einsum decoder's CAT merge (roles from
    ``module_specs``) equals the CAT merge of the same weights laid out as ``nn.Dense`` kernels ``(in, out)``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import catmerge_jax as cm
    from tests.doc_blocks import run_page

    ns = run_page("docs/llm.md")
    D, N, H, F, L = (ns[k] for k in ("D", "N", "H", "F", "L"))

    class DenseBlock(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            b, t, _ = x.shape
            h = nn.RMSNorm(name="pre_attn_norm")(x)
            q = nn.Dense(N * H, use_bias=False, name="q_einsum")(h).reshape(b, t, N, H)
            k = nn.Dense(N * H, use_bias=False, name="k_einsum")(h).reshape(b, t, N, H)
            v = nn.Dense(N * H, use_bias=False, name="v_proj")(h).reshape(b, t, N, H)
            att = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) / H ** 0.5, axis=-1)
            o = jnp.einsum("BNTS,BSNH->BTNH", att, v).reshape(b, t, N * H)
            x = x + nn.Dense(D, use_bias=False, name="attn_out")(o)
            h = nn.RMSNorm(name="pre_ffw_norm")(x)
            gu = nn.Dense(2 * F, use_bias=False, name="gating")(h).reshape(b, t, 2, F)
            x = x + nn.Dense(D, use_bias=False, name="linear")(jax.nn.gelu(gu[..., 0, :]) * gu[..., 1, :])
            return x, None

    class DenseDecoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(DenseBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
            return nn.RMSNorm(name="final_norm")(stack(name="layers")(x, None)[0])

    def as_dense(p):
        lay = dict(p["layers"])
        lay["q_einsum"] = {"kernel": lay["q_einsum"]["kernel"].transpose(0, 2, 1, 3).reshape(L, D, N * H)}
        lay["k_einsum"] = {"kernel": lay["k_einsum"]["kernel"].transpose(0, 2, 1, 3).reshape(L, D, N * H)}
        lay["v_proj"] = {"kernel": lay["v_proj"]["kernel"].reshape(L, D, N * H)}
        lay["attn_out"] = {"kernel": lay["attn_out"]["kernel"].reshape(L, N * H, D)}
        lay["gating"] = {"kernel": lay["gating"]["kernel"].transpose(0, 2, 1, 3).reshape(L, D, 2 * F)}
        return {**p, "layers": lay}

    x, pre, fts = ns["x"], as_dense(ns["pretrained"]), [as_dense(f) for f in ns["finetuned"]]
    stats = [cm.capture_stats(DenseDecoder(), ft, x) for ft in fts]
    want = cm.cat_merge(pre, fts, stats, alpha=0.3, c=2)
    got = as_dense(ns["merged"])
    for (path, w), (_, g), (_, w0) in zip(cm.leaves_with_paths(want), cm.leaves_with_paths(got),
                                          cm.leaves_with_paths(pre)):
        step = np.linalg.norm(np.asarray(w) - np.asarray(w0))
        assert np.linalg.norm(np.asarray(g) - np.asarray(w)) <= 1e-4 * step, path
    assert ns["roles"]["layers/v_proj/kernel"].in_axes == 1 and ns["roles"]["layers/gating/kernel"].axes == (1, 0, 2)


def test_a_vocabulary_sized_head_never_gets_an_out_by_out_conflict_matrix():
    """The head is captured as rows (n tokens × d); with rows, a layer wider than MAX_EXPLICIT_OUT is solved by the
    matrix-free or exact low-rank plan even where building G_k (vocab × vocab) would cost fewer flops."""
    from catmerge_jax.conflict import MAX_EXPLICIT_OUT, plan_linear

    for vocab in (32000, 128256, 256000):
        for rows in (512, 20000):
            assert plan_linear(4, 1024, vocab, 3, rows=rows).strategy in ("matrix_free", "low_rank"), (vocab, rows)
    assert plan_linear(4, 1024, MAX_EXPLICIT_OUT, 3, rows=20000).strategy == "explicit"   # narrower: by cost


def test_a_vocabulary_sized_head_with_gram_statistics_is_solved_from_square_root_rows(monkeypatch, x64):
    """With at least as many exemplar tokens as inputs, a head's statistics arrive as Grams; a layer wider than
    MAX_EXPLICIT_OUT must still never get an (out, out) G_k. The Grams go to the rows plans as their exact square-root
    rows (RᵀR = A), so the merge equals the float64 reference of the paper. The width limit is lowered here so the
    check runs on a small layer; before the fix this leaf was solved through explicit (out, out) matrices."""
    import jax.numpy as jnp

    import catmerge_jax as cm
    from catmerge_jax import cat, conflict
    from tests import reference as ref
    from tests import tree_reference as tr

    monkeypatch.setattr(conflict, "MAX_EXPLICIT_OUT", 24)
    rng = np.random.default_rng(3)
    fan_in, fan_out, K, n, lam, c, alpha = 6, 40, 3, 9, 2.0, 2, 0.5
    w0 = {"head": {"kernel": rng.normal(size=(fan_in, fan_out))}}
    finetuned = [{"head": {"kernel": w0["head"]["kernel"] + 0.3 * rng.normal(size=(fan_in, fan_out))}}
                 for _ in range(K)]
    xs = [rng.normal(size=(n, fan_in)) for _ in range(K)]          # n ≥ fan_in: the statistics are Grams
    stats = [cm.stats_from_arrays(w0, {"head/kernel": cm.linear_stats(x)}) for x in xs]

    leaf = cat.LeafInput("head/kernel", cm.LeafSpec(cm.Role.LINEAR),
                         jnp.stack([f["head"]["kernel"] - w0["head"]["kernel"] for f in finetuned]),
                         [s["head"]["kernel"] for s in stats])
    form, rows = cat.linear_inputs(leaf)
    assert form == "rows" and rows.shape == (K, 1, fan_in, fan_in)
    grams = [tr.gram64(cm.linear_stats(x)) for x in xs]   # the Grams as stored (float32), in float64
    for k in range(K):   # the square-root rows reproduce each task's Gram (R is not unique; RᵀR is)
        np.testing.assert_allclose(np.asarray(rows[k, 0]).T @ np.asarray(rows[k, 0]), grams[k],
                                   rtol=1e-10, atol=1e-10 * np.abs(grams[k]).max())

    merged = cm.cat_merge(w0, finetuned, stats, alpha=alpha, lam=lam, c=c)
    T = [np.asarray(f["head"]["kernel"] - w0["head"]["kernel"]) for f in finetuned]
    B = ref.linear_bases(T, grams, lam, c, positive=True)
    expected = w0["head"]["kernel"] + alpha * sum(ref.apply_linear_sequential(T, B))
    update = expected - w0["head"]["kernel"]
    err = np.abs(np.asarray(merged["head"]["kernel"]) - expected).max() / np.abs(update).max()
    assert err < 1e-6, err
