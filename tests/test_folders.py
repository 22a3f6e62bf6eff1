"""Data-free merges of Hugging Face folders of any architecture, streamed tensor by tensor (issue 24).

Tiny random transformers models (Llama, Qwen2, Mistral, Gemma, GPT-2, ViT; f32/f16/bf16; single file and sharded;
tied embeddings) are merged through the CLI and compared with float64 NumPy task arithmetic on their state dicts.
The methods that read a statistic of the whole model (TIES, PCB, TATR, Consensus-TIES) and DARE's per-leaf keys are
checked for EQUALITY with the in-memory method on the whole state dict; the roles of GPT-2's Conv1D against the same
weights stored as Linear; hub IDs against a cache folder built here; and what a failed run leaves (nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc

import numpy as np
import pytest

from catmerge_jax.cli import main
from catmerge_jax.errors import NonFiniteError, TreeMismatchError
from catmerge_jax.folder_methods import merge_folders_streamed, streamed_order_statistics
from catmerge_jax.folders import open_folder, stream_merge
from catmerge_jax.methods.registry import get_method
from catmerge_jax.torch_roles import folder_specs
from converters.safetensors_io import save_file
from tests import reference

ALPHA = 0.4
# ulp / |x| at most, per stored dtype (explicit mantissa bits m: 2^-m)
REL_ULP = {"BF16": 2.0 ** -7, "F16": 2.0 ** -10, "F32": 2.0 ** -23}
TINY = {"BF16": 2.0 ** -133, "F16": 2.0 ** -24, "F32": 2.0 ** -149}   # ulp of the subnormals


def _tiny_models(transformers):
    """``name -> (model factory, torch dtype name, save kwargs, Auto class)``: six architectures, three dtypes."""
    llama = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32)
    return {
        "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama)), "bfloat16",
                  {"max_shard_size": "4KB"}, "AutoModelForCausalLM"),
        "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama)), "float16", {},
                  "AutoModelForCausalLM"),
        "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**llama)), "float32", {},
                    "AutoModelForCausalLM"),
        "gemma": (lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**llama, head_dim=4)), "bfloat16",
                  {}, "AutoModelForCausalLM"),
        "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=48, n_embd=16, n_layer=2, n_head=2, n_positions=32)), "float32", {"max_shard_size": "8KB"},
                 "AutoModelForCausalLM"),
        "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, image_size=8,
            patch_size=4)), "float32", {}, "AutoModel"),
    }


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Base + two fine-tunes (the base plus seeded noise) of each tiny architecture."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, (make, dtype, save, auto)) in enumerate(_tiny_models(transformers).items()):
        torch.manual_seed(i)
        model = make().to(getattr(torch, dtype))
        folders = []
        for k in range(3):
            if k:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.05 * torch.randn_like(p))
            folder = str(root / f"{name}-{k}")
            model.save_pretrained(folder, **save)
            folders.append(folder)
        out[name] = {"base": folders[0], "tasks": folders[1:], "auto": auto}
    return out


def _state(folder):
    f = open_folder(folder)
    return {n: np.array(f.read(n)) for n in f.tensors}, f


def _hashes(folders):
    digest = {}
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as fh:
                digest[os.path.join(folder, name)] = hashlib.sha256(fh.read()).hexdigest()
    return digest


def _run(capsys, args):
    capsys.readouterr()
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "gpt2", "vit"])
def test_cli_task_arithmetic_any_architecture(hf, arch, tmp_path, capsys):
    """Keys, dtypes, shapes, shard files and index of the base; loads in transformers; equals float64 NumPy."""
    import transformers

    m = hf[arch]
    before = _hashes([m["base"], *m["tasks"]])
    out = str(tmp_path / "merged")
    rc, _, err = _run(capsys, ["merge", "--method", "task_arithmetic", "--alpha", str(ALPHA), "--base", m["base"],
                               "--task", *m["tasks"], "--out", out, "--quiet"])
    assert rc == 0, err
    assert _hashes([m["base"], *m["tasks"]]) == before                    # inputs untouched
    assert sorted(os.listdir(out)) == sorted(os.listdir(m["base"]))       # same shards, index, config files
    base, base_folder = _state(m["base"])
    merged, merged_folder = _state(out)
    assert [(i.name, i.dtype, i.shape, i.file) for i in merged_folder.tensors.values()] == \
        [(i.name, i.dtype, i.shape, i.file) for i in base_folder.tensors.values()]
    if base_folder.index is not None:
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            assert json.load(f)["weight_map"] == base_folder.index["weight_map"]
    tasks = [_state(t)[0] for t in m["tasks"]]
    for name, w0 in base.items():
        b = w0.astype(np.float64)
        ts = [t[name].astype(np.float64) for t in tasks]
        ref = b + ALPHA * sum(t - b for t in ts)
        # f32 arithmetic (a few roundings of terms up to `scale`) then one rounding to the stored dtype
        scale = np.abs(b) + ALPHA * sum(np.abs(t) + np.abs(b) for t in ts)
        dtype = base_folder.tensors[name].dtype
        tol = REL_ULP[dtype] * np.abs(ref) + TINY[dtype] + 8 * 2.0 ** -24 * scale
        err = np.abs(merged[name].astype(np.float64) - ref)
        assert np.all(err <= tol), (name, float((err - tol).max()))
    model = getattr(transformers, m["auto"]).from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0


def _synthetic(root, name, seed, *, dtype=np.float32, shards=2, shape=(8, 8), extra=None):
    """A sharded folder of two 'layers' (weights, biases, a norm) and an int64 buffer."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(0)
    tensors = {}
    for layer in range(2):
        for t in ("q_proj", "o_proj"):
            tensors[f"layers.{layer}.{t}.weight"] = base.standard_normal(shape) + 0.1 * rng.standard_normal(shape)
            tensors[f"layers.{layer}.{t}.bias"] = base.standard_normal(shape[0]) + 0.1 * rng.standard_normal(shape[0])
        tensors[f"layers.{layer}.norm.weight"] = 1 + 0.1 * rng.standard_normal(shape[1])
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    tensors["position_ids"] = np.arange(5, dtype=np.int64)
    tensors.update(extra or {})
    folder = os.path.join(root, name)
    os.makedirs(folder)
    names = list(tensors)
    parts = np.array_split(np.arange(len(names)), shards)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for file, idx in zip(files, parts):
        save_file({names[i]: tensors[names[i]] for i in idx}, os.path.join(folder, file), metadata={"format": "pt"})
    weight_map = {names[i]: file for file, idx in zip(files, parts) for i in idx}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "toy"}, f)
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy"))
    # float32, so the in-memory reference reuses the streamed merge's compiled programs (bf16 outputs are checked by
    # the CLI tests above)
    return {"root": root, "base": _synthetic(root, "base", 0), "tasks": [_synthetic(root, f"t{k}", k + 1)
                                                                         for k in range(3)]}


GLOBAL_METHODS = [("ties", {"k": 0.3, "alpha": 0.7}), ("pcb", {"keep_ratio": 0.2, "clip_ratio": 0.01}),
                  ("tatr_zero_shot", {"quantile": 0.8, "alpha": 0.5}),
                  ("consensus", {"base": "ties", "ties_k": 0.4, "k": 2, "alpha": 0.5}),
                  ("dare", {"p": 0.5, "alpha": 0.5, "seed": 3})]


@pytest.mark.parametrize("method,hparams", GLOBAL_METHODS, ids=[m for m, _ in GLOBAL_METHODS])
def test_global_statistics_equal_the_in_memory_method(toy, method, hparams, tmp_path):
    """First streaming passes give the same model-wide thresholds (and DARE the same keys): bit-equal outputs."""
    out = merge_folders_streamed(method, toy["base"], toy["tasks"], str(tmp_path / "out"), hparams=hparams)
    base, folder = _state(toy["base"])
    floats = {n: v for n, v in base.items() if folder.tensors[n].dtype == "F32"}
    tasks = [{n: _state(t)[0][n] for n in floats} for t in toy["tasks"]]
    specs = folder_specs({n: v.shape for n, v in floats.items()}, folder.config)
    expected = get_method(method).merge(floats, tasks, roles=specs, **hparams)
    merged, _ = _state(out)
    for name in floats:
        assert merged[name].dtype == np.float32
        np.testing.assert_array_equal(merged[name], np.asarray(expected[name]), err_msg=name)
    np.testing.assert_array_equal(merged["position_ids"], base["position_ids"])   # buffers copied


def test_ties_matches_numpy_reference(tmp_path):
    """Model-wide TIES over a float32 sharded folder against tests/reference.py's float64 TIES."""
    root = str(tmp_path)
    base = _synthetic(root, "base", 0)
    tasks = [_synthetic(root, f"t{k}", k + 1) for k in range(2)]
    out = merge_folders_streamed("ties", base, tasks, os.path.join(root, "out"), hparams={"k": 0.25, "alpha": 1.0})
    b, folder = _state(base)
    names = [n for n in b if folder.tensors[n].dtype == "F32"]
    tvs = [[(_state(t)[0][n] - b[n]).astype(np.float64) for n in names] for t in tasks]   # f32 differences, exact
    merged, _ = _state(out)
    for name, tau in zip(names, reference.ties(tvs, 0.25)):
        np.testing.assert_allclose(merged[name], b[name] + tau, rtol=1e-6, atol=1e-6, err_msg=name)


def test_streamed_order_statistics_are_exact():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 3001)).astype(np.float32)
    x[:, ::7] = 0.0
    x[0, ::11] = -0.0
    x[1, :50] = x[1, 50:100]               # duplicates
    x[2, 5] = np.float32(1e-42)            # a subnormal
    positions = [0, 1, 700, 1500, 2999, 3000]
    got = streamed_order_statistics(lambda: iter(np.array_split(x, 5, axis=1)), positions, rows=3)
    np.testing.assert_array_equal(got, np.sort(x, axis=1)[:, positions])


def _transposed_gpt2(src, dst):
    """The same GPT-2 weights with each Conv1D stored as a Linear (out, in), under a model_type without Conv1D."""
    base, folder = _state(src)
    os.makedirs(dst)
    conv = {n for n in base if n.split(".")[-2] in ("c_attn", "c_proj", "c_fc") and base[n].ndim == 2}
    save_file({n: (v.T.copy() if n in conv else v) for n, v in base.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**folder.config, "model_type": "gpt2_as_linear"}, f)
    return conv


def test_conv1d_is_read_in_its_true_orientation(hf, tmp_path):
    """WUDI is not transpose-invariant (nor Iso-CTS; TSV is): GPT-2's Conv1D (in, out) and the same weights stored as
    Linear (out, in) merge to the same weights (transposed), and reading Conv1D the Linear way would not. (The roles
    reach every matrix method the same way: the tensor's LeafSpec.)"""
    method, hparams = "wudi", {"steps": 3, "lr": 1e-3, "matrices": "linear"}
    m = hf["gpt2"]
    folders = [m["base"], *m["tasks"]]
    linear = [str(tmp_path / f"linear{k}") for k in range(3)]
    conv = [_transposed_gpt2(s, d) for s, d in zip(folders, linear)][0]
    got = _state(merge_folders_streamed(method, folders[0], folders[1:], str(tmp_path / "a"), hparams=hparams))[0]
    want = _state(merge_folders_streamed(method, linear[0], linear[1:], str(tmp_path / "b"), hparams=hparams))[0]
    assert conv
    for name, value in got.items():
        np.testing.assert_allclose(value.T if name in conv else value, want[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    wrong = _state(merge_folders_streamed(method, folders[0], folders[1:], str(tmp_path / "c"), hparams=hparams,
                                          roles={"*.c_fc.weight": "linear"}))[0]
    name = next(n for n in conv if ".c_fc." in n)
    assert not np.allclose(wrong[name], got[name], rtol=1e-4, atol=1e-5)


def test_roles_table_for_any_folder(hf, capsys):
    rc, out, err = _run(capsys, ["roles", "--base", hf["gpt2"]["base"], "--role", "*.wpe.weight=linear"])
    assert rc == 0, err
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:-1]}
    assert rows["transformer.h.0.attn.c_attn.weight"] == "linear" and "(16, 48)" in out   # Conv1D: (in, out) as stored
    assert rows["transformer.h.0.ln_1.weight"] == "scale" and rows["transformer.h.0.ln_1.bias"] == "shift"
    assert rows["transformer.wte.weight"] == "other" and rows["transformer.wpe.weight"] == "linear"
    rc, _, err = _run(capsys, ["roles", "--base", hf["gpt2"]["base"], "--role", "*nothing*=scale"])
    assert rc == 2 and "matches no tensor" in err and len(err.strip().splitlines()) == 1


def test_untied_lm_head_is_linear_tied_is_the_table(hf, capsys):
    """As the layer-by-layer exemplar merge reads it (issue 25): an untied head is a Linear (out, in) = (vocab, d);
    a head the config ties (its stored copy, or a family tied by default) is the embedding table: OTHER."""
    rc, out, err = _run(capsys, ["roles", "--base", hf["llama"]["base"]])
    assert rc == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert rows["lm_head.weight"].split()[1] == "linear" and "(in, out) = (16, 48)" in rows["lm_head.weight"]
    assert rows["model.embed_tokens.weight"].split()[1] == "other"
    config = open_folder(hf["llama"]["base"]).config
    assert config.get("tie_word_embeddings") is False
    shapes = {"model.embed_tokens.weight": (48, 16), "lm_head.weight": (48, 16)}
    tied = folder_specs(shapes, {**config, "tie_word_embeddings": True})
    assert tied["lm_head.weight"].role.value == "other"
    no_key = {k: v for k, v in config.items() if k != "tie_word_embeddings"}
    assert folder_specs(shapes, {**no_key, "model_type": "gemma"})["lm_head.weight"].role.value == "other"
    assert folder_specs(shapes, no_key)["lm_head.weight"].role.value == "linear"   # llama: untied by default


def _cache(root, repo_id, folder):
    """The hub cache layout for one repo: blobs, a snapshot of symlinks, refs/main."""
    repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(snap)
    os.makedirs(os.path.join(repo, "blobs"))
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)


def test_hub_ids_from_the_local_cache(hf, tmp_path, monkeypatch, capsys):
    """Sharded snapshots whose files are links into the repository's blobs, as huggingface_hub stores them."""
    m = hf["llama"]
    cache = str(tmp_path / "hub")
    for repo_id, folder in zip(["org/tiny", "org/tiny-a", "org/tiny-b"], [m["base"], *m["tasks"]]):
        _cache(cache, repo_id, folder)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["merge", "--method", "task_arithmetic", "--quiet"]
    rc, _, err = _run(capsys, [*args, "--base", "org/tiny", "--task", "org/tiny-a", "org/tiny-b", "--out",
                               str(tmp_path / "from_hub")])
    assert rc == 0, err
    rc, _, err = _run(capsys, [*args, "--base", m["base"], "--task", *m["tasks"], "--out", str(tmp_path / "local")])
    assert rc == 0, err
    a, b = _state(str(tmp_path / "from_hub"))[0], _state(str(tmp_path / "local"))[0]
    assert all(np.array_equal(a[n], b[n]) for n in b)
    assert not os.path.islink(os.path.join(tmp_path, "from_hub", "config.json"))   # copies, not links to the cache
    commit = hashlib.sha1(b"org/tiny").hexdigest()
    assert open_folder("org/tiny", revision=commit).path == open_folder("org/tiny").path
    rc, _, err = _run(capsys, [*args, "--base", "org/tiny", "--task", "org/not-cached", "--out", str(tmp_path / "x")])
    assert rc == 2 and "'org/not-cached'" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")


def _leftovers(parent):
    return [n for n in os.listdir(parent) if n.startswith(".")]


def test_mismatching_task_is_one_line_and_writes_nothing(toy, tmp_path, capsys):
    odd = _synthetic(str(tmp_path), "odd", 9, shape=(8, 9))
    out = tmp_path / "out" / "nested"
    rc, _, err = _run(capsys, ["merge", "--method", "ties", "--base", toy["base"], "--task", toy["tasks"][0], odd,
                               "--out", str(out), "--quiet"])
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "layers.0.q_proj.weight" in err and odd in err
    assert not os.path.exists(tmp_path / "out") and _leftovers(tmp_path) == []


def test_failed_run_leaves_nothing(toy, tmp_path):
    base = open_folder(toy["base"])
    tasks = [open_folder(t) for t in toy["tasks"]]
    calls = []

    def interrupted(name, arrays):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return arrays[0]

    with pytest.raises(KeyboardInterrupt):
        stream_merge(base, [base, *tasks], str(tmp_path / "out"), interrupted, progress=False)
    with pytest.raises(NonFiniteError, match="layers.0.q_proj.weight"):
        stream_merge(base, [base, *tasks], str(tmp_path / "out"), lambda n, xs: np.full_like(xs[0], np.inf),
                     progress=False)
    with pytest.raises(TreeMismatchError, match="shape"):
        stream_merge(base, [base], str(tmp_path / "out"), lambda n, xs: xs[0][:1], progress=False)
    assert os.listdir(tmp_path) == []


def test_folder_appearing_at_out_keeps_the_merged_model_beside_it(toy, tmp_path):
    """A folder the user creates at --out while a streamed merge runs is left untouched, and the merged model is
    kept beside it (named in the one-line error), not thrown away; no temporary entry is left."""
    from catmerge_jax.pipeline import InputError

    base = open_folder(toy["base"])
    out = tmp_path / "out"

    def appear(name, arrays):
        if not out.exists():
            out.mkdir()
            (out / "mine.txt").write_text("precious")
        return arrays[1]

    with pytest.raises(InputError, match="appeared while merging") as e:
        stream_merge(base, [base, open_folder(toy["tasks"][0])], str(out), appear, progress=False)
    assert os.listdir(out) == ["mine.txt"]
    kept = str(e.value).split("kept in ")[1]
    assert os.path.dirname(kept) == str(tmp_path) and ".catmerge-result-" in os.path.basename(kept)
    merged, expected = _state(kept)[0], _state(toy["tasks"][0])[0]
    assert merged.keys() == expected.keys()                   # the whole merged model (here: task 0's tensors)
    for name in expected:
        np.testing.assert_array_equal(merged[name], expected[name], err_msg=name)
    assert _leftovers(tmp_path) == []


def _layers_folder(root, name, layers, width, seed):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, name)
    os.makedirs(folder)
    save_file({f"layers.{i}.mlp.weight": rng.standard_normal((width, width)).astype(np.float32)
               for i in range(layers)}, os.path.join(folder, "model.safetensors"))
    return folder


def test_peak_memory_does_not_grow_with_layers(tmp_path):
    """Python-allocated peak (every NumPy array) of a streamed merge: bounded by a few tensors, for 4 and 16 layers
    alike (experiments/bench_folders_memory.py measures the process's peak RSS the same way)."""
    width = 128
    layer_bytes = width * width * 4
    peaks = {}
    for layers in (2, 4, 16):        # the first run imports what a merge needs (its allocations are not the merge's)
        folders = [open_folder(_layers_folder(str(tmp_path), f"{layers}-{k}", layers, width, k)) for k in range(3)]
        tracemalloc.start()
        stream_merge(folders[0], folders, str(tmp_path / f"out{layers}"), lambda n, xs: (xs[1] + xs[2]) / 2,
                     progress=False)
        peaks[layers] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # At most this tensor and the next one (read ahead in a thread, so the exact peak depends on timing) of each of
    # the 3 models, plus the merged tensor and one temporary: 8 layers' bytes, for 4 layers as for 16 (whose three
    # models hold 48 layers' bytes).
    assert max(peaks[4], peaks[16]) < 9 * layer_bytes, peaks


def test_unknown_or_exemplar_method_refused_in_one_line(toy, tmp_path, capsys):
    rc, _, err = _run(capsys, ["merge", "--method", "regmean", "--base", toy["base"], "--task", toy["tasks"][0],
                               "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")


def test_copy_files_and_out_dtype(toy, tmp_path):
    import ml_dtypes

    base = open_folder(toy["base"])
    out = stream_merge(base, [base], str(tmp_path / "out"), lambda n, xs: xs[0], out_dtype="bfloat16", progress=False)
    merged = open_folder(out)
    assert {i.dtype for n, i in merged.tensors.items() if n != "position_ids"} == {"BF16"}
    assert merged.tensors["position_ids"].dtype == "I64" and merged.config == base.config
    name = "layers.1.o_proj.weight"
    np.testing.assert_array_equal(merged.read(name), base.read(name).astype(ml_dtypes.bfloat16))
    assert merged.index["metadata"]["total_size"] == sum(
        int(np.prod(i.shape)) * (8 if i.dtype == "I64" else 2) for i in merged.tensors.values())
