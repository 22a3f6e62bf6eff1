"""The paper-protocol scripts (8-task CLIP, RoBERTa GLUE) on tiny random stand-in checkpoints and data."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest

from experiments import paper_clip8, paper_glue

# Two alphas (so selection really chooses), one TIES k, two CAT (λ, c) points: the selection paths run, cheaply.
SMALL_GRID = dict(alphas=(0.5, 1.0), ties_k=(0.2,), cat_points=({"lam": 5.0, "c": 1}, {"lam": 0.0, "c": 2}))


# ----------------------------------------------------------------------------------------------- metrics

def test_glue_metrics_match_numpy_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.where(rng.random(200) < 0.8, y, 1 - y)
    assert paper_glue.accuracy(p, y) == pytest.approx(np.mean(p == y), abs=1e-12)
    tp, tn = np.sum((p == 1) & (y == 1)), np.sum((p == 0) & (y == 0))
    fp, fn = np.sum((p == 1) & (y == 0)), np.sum((p == 0) & (y == 1))
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert paper_glue.matthews_corr(p, y) == pytest.approx(mcc, abs=1e-12)
    assert paper_glue.matthews_corr(np.ones(5, int), np.array([0, 1, 1, 0, 1])) == 0.0  # undefined → 0 (sklearn)
    # Multi-class MCC (the general formula) against the binary one on two classes, and perfect = 1.
    assert paper_glue.matthews_corr(y, y) == pytest.approx(1.0)
    s, t = rng.normal(size=100), rng.normal(size=100)
    t = s + 0.5 * t
    ref = 0.5 * (stats.pearsonr(s, t)[0] + stats.spearmanr(s, t)[0])
    assert paper_glue.pearson_spearman(s, t) == pytest.approx(ref, abs=1e-10)
    ties = np.array([1.0, 1.0, 2.0, 3.0, 3.0, 3.0]), np.array([0.5, 0.7, 0.7, 2.0, 1.0, 3.0])
    ref = 0.5 * (stats.pearsonr(*ties)[0] + stats.spearmanr(*ties)[0])
    assert paper_glue.pearson_spearman(*ties) == pytest.approx(ref, abs=1e-10)


# ----------------------------------------------------------------------------------------------- CLIP 8 tasks

def _write_clip8(root, tasks, torch):
    """Task-vectors-style checkpoints: torch.save of WHOLE modules whose classes cannot be imported later."""
    from tests.fixtures import torch_open_clip as toc

    name = "task_vectors_stand_in.modeling"

    class ImageEncoder(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(0)
            visual = toc.VisionTransformer(16, 8, 32, 1, 2, 48, 8)  # same W0 for every task ...
            self.model = toc.CLIPLike(toc.perturb_(visual, scale=0.05, seed=seed))  # ... then a task's own edit

    class ClassificationHead(torch.nn.Linear):
        def __init__(self, normalize, weights):
            super().__init__(weights.shape[1], weights.shape[0])
            self.normalize = normalize
            self.weight = torch.nn.Parameter(weights.clone())
            self.bias = torch.nn.Parameter(torch.zeros(weights.shape[0]))

    fake, parent = types.ModuleType(name), types.ModuleType(name.split(".")[0])
    for cls in (ImageEncoder, ClassificationHead):
        cls.__module__, cls.__qualname__ = name, cls.__name__
        setattr(fake, cls.__name__, cls)
    for cls in (toc.QuickGELU, toc.ResidualAttentionBlock, toc.Transformer, toc.VisionTransformer, toc.CLIPLike):
        setattr(fake, cls.__name__, cls)
    sys.modules[name], sys.modules[parent.__name__] = fake, parent
    try:
        ckpt, data = root / "ckpt", root / "data"
        ckpt.mkdir()
        torch.manual_seed(0)
        zero = ImageEncoder(seed=0)
        with torch.no_grad():  # the zero-shot model is the unperturbed tower
            torch.manual_seed(0)
            zero.model = toc.CLIPLike(toc.VisionTransformer(16, 8, 32, 1, 2, 48, 8))
        torch.save(zero, ckpt / "zeroshot.pt")
        rng = np.random.default_rng(0)
        for i, t in enumerate(tasks):
            (ckpt / t).mkdir()
            torch.save(ImageEncoder(seed=i + 1), ckpt / t / "finetuned.pt")
            torch.save(ClassificationHead(True, torch.randn(3, 8)), ckpt / f"head_{t}.pt")
            (data / t).mkdir(parents=True)
            for split, n in (("val", 6), ("test", 6)):
                np.save(data / t / f"{split}_images.npy", rng.normal(size=(n, 16, 16, 3)).astype(np.float32))
                np.save(data / t / f"{split}_labels.npy", rng.integers(0, 3, n))
    finally:
        del sys.modules[name], sys.modules[parent.__name__]
    return str(ckpt), str(data)


def test_clip8_protocol_prints_table_for_every_method_and_task(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    # three of the eight tasks: every method and the selection still run, at 3/8 of the cost
    tasks = ["SVHN", "MNIST", "DTD"]
    assert set(tasks) <= set(paper_clip8.TASKS)
    ckpt, data = _write_clip8(tmp_path, tasks, torch)
    from experiments.benchmark.evaluate import load_all_methods

    res = paper_clip8.run(ckpt, data, tasks=tasks, quiet=True, **SMALL_GRID)
    methods = load_all_methods()
    assert res["selected_on_validation"]
    for m in methods:
        d = res["details"][m]
        if "skipped" in d:  # only methods needing labelled extras (Fisher, TATR's gradient mode)
            assert get_extras(m)
            continue
        assert set(res["rows"][m]) == set(tasks)
        # 6 test images per task: every accuracy is a count over 6
        assert all(abs(6 * a - round(6 * a)) < 1e-9 for a in res["rows"][m].values()), m
        assert not d["alpha_is_scale"] or d["hparams"]["alpha"] in SMALL_GRID["alphas"], m
    assert "cat (λ, c on val)" in res["rows"]
    # The reported scores are those of the method's own front door at the reported hyperparameters, merged and
    # classified again here (the protocol evaluates W0 + α·delta read off one merge; this is a separate path).
    import jax.numpy as jnp

    from catmerge_jax.capture import capture_stats
    from catmerge_jax.methods.registry import get_method
    from catmerge_jax.models.clip_vit import ClipVisionModel

    cfg0, w0 = paper_clip8.load_encoder(os.path.join(ckpt, "zeroshot.pt"))
    clip = ClipVisionModel(cfg0, layout="open_clip", with_projection=True)
    fts = [paper_clip8.load_encoder(os.path.join(ckpt, t, "finetuned.pt"), cfg0)[1] for t in tasks]
    stats = [capture_stats(clip, ft, jnp.asarray(np.load(os.path.join(data, t, "val_images.npy"))[:2]), batch_size=8)
             for t, ft in zip(tasks, fts)]
    for m in ("tsv", "iso_cts", "lot", "cat (λ, c on val)"):
        hp = dict(res["details"][m]["hparams"])
        merged = get_method(m.split(" ")[0]).merge(w0, fts, stats=stats, roles=clip.param_roles(), **hp)
        for t in tasks:
            head = paper_clip8.load_head(os.path.join(ckpt, f"head_{t}.pt"))
            x, y = (np.load(os.path.join(data, t, f"test_{k}.npy")) for k in ("images", "labels"))
            assert res["rows"][m][t] == pytest.approx(np.mean(paper_clip8.classify(clip, merged, head, x) == y)), (m, t)
    printed = paper_clip8.table(res["rows"], tasks)
    for m in ["individual", "pretrained", *methods]:
        assert any(line.startswith(m + " ") for line in printed.splitlines()), m
    header = printed.splitlines()[1]
    assert all(t[:8] in header for t in tasks) and "Avg" in header
    # The individual model on its own task uses the very weights of the checkpoint: rerun by hand to compare.
    from catmerge_jax.models.clip_vit import ClipVisionModel

    cfg, params = paper_clip8.load_encoder(os.path.join(ckpt, "SVHN", "finetuned.pt"))
    model = ClipVisionModel(cfg, layout="open_clip", with_projection=True)
    head = paper_clip8.load_head(os.path.join(ckpt, "head_SVHN.pt"))
    x, y = np.load(os.path.join(data, "SVHN", "test_images.npy")), np.load(os.path.join(data, "SVHN", "test_labels.npy"))
    assert res["rows"]["individual"]["SVHN"] == pytest.approx(np.mean(paper_clip8.classify(model, params, head, x) == y))

    # The command line: exit 0 and the table (its default, full grids: one cheap method, and the tasks of the
    # run above so its compiled programs are reused); a missing checkpoint is a one-line error with exit code 2.
    out = tmp_path / "r.json"
    assert paper_clip8.main(["--checkpoints", ckpt, "--data", data, "--tasks", *tasks, "--methods",
                             "task_arithmetic", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Table 1 layout" in text and "task_arithmetic" in text and "SVHN" in text
    written = json.loads(out.read_text())["rows"]
    assert set(written) == {"individual", "pretrained", "task_arithmetic"}
    assert written["individual"] == res["rows"]["individual"] and written["pretrained"] == res["rows"]["pretrained"]
    assert paper_clip8.main(["--checkpoints", str(tmp_path / "nope"), "--data", data, "--quiet"]) == 2
    assert "missing checkpoint" in capsys.readouterr().err


def get_extras(name):
    from catmerge_jax.methods.registry import get_method

    return get_method(name).extras


# ----------------------------------------------------------------------------------------------- GLUE

def _tiny_roberta_folders(root, tasks, transformers, torch):
    """A pretrained tiny RoBERTa HF folder and one RobertaForSequenceClassification folder per task."""
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    words = "the a cat dog good bad movie is was not very fun sad happy red blue one two".split()
    for w in words:
        vocab[w] = len(vocab)
        vocab["Ġ" + w] = len(vocab)
    kw = dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=32, max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2)

    def tokenizer_files(folder):
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")

    torch.manual_seed(0)
    base = RobertaModel(RobertaConfig(**kw), add_pooling_layer=False)
    pre = root / "pretrained"
    base.save_pretrained(pre, safe_serialization=True)
    tokenizer_files(pre)
    folders = {}
    for i, (t, labels) in enumerate(tasks.items()):
        torch.manual_seed(i + 1)
        model = RobertaForSequenceClassification(RobertaConfig(**kw, num_labels=labels))
        with torch.no_grad():
            for (name, p), (_, p0) in zip(model.roberta.named_parameters(), base.named_parameters()):
                p.copy_(p0 + 0.05 * torch.randn_like(p0))
        folders[t] = root / t
        model.save_pretrained(folders[t], safe_serialization=True)
        tokenizer_files(folders[t])
    return str(pre), {t: str(f) for t, f in folders.items()}


def test_glue_protocol_on_tiny_roberta(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tasks = {"cola": 2, "sst2": 2, "stsb": 1}  # one task per metric kind (MCC, accuracy, Pearson/Spearman)
    pre, folders = _tiny_roberta_folders(tmp_path / "ckpt", tasks, transformers, torch)
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    words = "the a cat dog good bad movie is was not very fun".split()
    for t, labels in tasks.items():
        (data / t).mkdir(parents=True)
        for split in ("validation", "test"):
            with open(data / t / f"{split}.jsonl", "w") as f:
                for _ in range(10):
                    row = {"sentence1": " ".join(rng.choice(words, 5)), "sentence2": " ".join(rng.choice(words, 4)),
                           "label": float(rng.uniform(0, 5)) if labels == 1 else int(rng.integers(0, labels))}
                    f.write(json.dumps(row) + "\n")
    res = paper_glue.run(pre, {t: folders[t] for t in tasks}, str(data), quiet=True, **SMALL_GRID)
    from experiments.benchmark.evaluate import load_all_methods

    methods = load_all_methods()
    assert res["metrics"] == {"cola": "matthews", "sst2": "accuracy", "stsb": "pearson_spearman"}
    for m in methods:
        if "skipped" in res["details"][m]:
            assert get_extras(m)
            continue
        assert set(res["rows"][m]) == set(tasks), m
        # 10 test rows per task: accuracies are counts over 10
        assert all(abs(10 * res["rows"][m][t] - round(10 * res["rows"][m][t])) < 1e-9 for t in ("sst2",)), m
    # Reported scores = the method's front door at the reported hyperparameters, scored again by hand (sst2).
    from catmerge_jax.methods.registry import get_method

    _, enc_model, w0 = paper_glue.load_task_model(pre)
    fts = [paper_glue.load_task_model(folders[t])[2] for t in tasks]
    sst2_head = paper_glue.load_task_model(folders["sst2"])[0]
    tok0 = __import__("transformers").AutoTokenizer.from_pretrained(folders["sst2"], local_files_only=True)
    test_rows = paper_glue.read_jsonl(os.path.join(data, "sst2", "test.jsonl"))
    labels = np.asarray([r["label"] for r in test_rows])
    for m in ("iso_c", "wudi"):
        merged = get_method(m).merge(w0, fts, **res["details"][m]["hparams"])
        logits = paper_glue.predict_logits(enc_model, merged, sst2_head, tok0, test_rows, max_len=128)
        assert res["rows"][m]["sst2"] == pytest.approx(np.mean(logits.argmax(-1) == labels)), m
    printed = paper_glue.table(res["rows"], list(tasks))
    for m in ["individual", "pretrained", *methods]:
        assert any(line.startswith(m + " ") for line in printed.splitlines()), m
    # The individual model reproduces transformers' own classifier on a test sentence pair.
    from transformers import AutoTokenizer, RobertaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(folders["sst2"], local_files_only=True)
    hf = RobertaForSequenceClassification.from_pretrained(folders["sst2"]).eval()
    rows = paper_glue.read_jsonl(os.path.join(data, "sst2", "test.jsonl"))
    enc = tok([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**enc).logits.numpy()
    head, model, params = paper_glue.load_task_model(folders["sst2"])
    ours = paper_glue.predict_logits(model, params, head, tok, rows, max_len=128)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    assert paper_glue.main(["--pretrained", pre, "--task", f"sst2={folders['sst2']}", "--task",
                            f"stsb={folders['stsb']}", "--data", str(data), "--methods", "task_arithmetic",
                            "--quiet"]) == 0
    assert "Table 3 layout" in capsys.readouterr().out
    assert paper_glue.main(["--pretrained", pre, "--task", f"sst2={tmp_path / 'missing'}", "--data", str(data),
                            "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err
