"""The ``catmerge`` command line on tiny Hugging Face folders made in the test (BERT and CLIP vision)."""

from __future__ import annotations

from tests.fixtures.tiny_bert import save_tiny_bert  # noqa: E402

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from catmerge_jax.cli import main  # noqa: E402
from catmerge_jax.methods.registry import available_methods, get_method  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a movie film was good bad great terrible i love hate it this is what why how sports game team "
         "code computer ? .").split()
EXEMPLARS = ["i love this movie .\nthe film was great\n", "what is this ?\n\nwhy is it bad ?\nhow is the team\n"]


def _save_bert(folder, *, seed, base=None, scale=0.05, hidden=16):
    return save_tiny_bert(folder, seed=seed, words=WORDS, base=base, scale=scale, hidden=hidden)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    base = _save_bert(str(root / "base"), seed=0)
    tasks = [_save_bert(str(root / f"task{k}"), seed=k + 1, base=base) for k in range(2)]
    exemplars = []
    for k, text in enumerate(EXEMPLARS):
        path = root / f"ex{k}.txt"
        path.write_text(text, encoding="utf-8")
        exemplars.append(str(path))
    wide = _save_bert(str(root / "wide"), seed=9, hidden=32)
    return {"root": root, "base": base, "tasks": tasks, "exemplars": exemplars, "wide": wide}


def _merge_args(env, method, out, *extra, exemplars=True):
    args = ["merge", "--method", method, "--base", env["base"]]
    for t in env["tasks"]:
        args += ["--task", t]
    if exemplars:
        for e in env["exemplars"]:
            args += ["--exemplars", e]
    return args + ["--quiet", "--out", str(out), *extra]


def _tensors(folder):
    return safetensors_numpy.load_file(os.path.join(folder, "model.safetensors"))


def _run(capsys, args):
    capsys.readouterr()                     # drop what the test itself printed (e.g. transformers' loading bars)
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _cli_unsupported(method):
    from catmerge_jax.pipeline import EXTRA_PROVIDERS

    return [e for e in get_method(method).extras if e not in EXTRA_PROVIDERS]


def _mergekit_refuses(method, tasks):
    """A MergeKit method whose input contract excludes this many tasks (slerp takes one) or that needs a
    parameter without a default (slerp's t): a one-line error instead of a folder."""
    if not method.startswith("mergekit."):
        return False
    from catmerge_jax.mergekit.methods import METHODS, REQUIRED

    m = METHODS[method.removeprefix("mergekit.")]
    n = tasks + int(m.base != "ignored")
    bad_count = (n < m.min_inputs or (m.max_inputs is not None and n > m.max_inputs) or tasks < m.min_non_base
                 or (m.max_non_base is not None and tasks > m.max_non_base))
    return bad_count or any(p.default is REQUIRED and p.name != "weight" for p in m.params)


# MergeKit's 20 methods are tested against references and MergeKit itself in tests/test_mergekit.py; here three of
# them stand for the rest (a per-tensor task-arithmetic one, one that ignores the base, one that refuses 3 tasks)
CLI_METHODS = [m for m in available_methods() if not m.startswith("mergekit.")] + [
    "mergekit.ties", "mergekit.linear", "mergekit.slerp"]


@pytest.mark.parametrize("method", CLI_METHODS)
def test_every_method_writes_a_loadable_folder(bert, capsys, method):
    out = bert["root"] / f"out_{method}"
    rc, stdout, err = _run(capsys, _merge_args(bert, method, out))
    if _cli_unsupported(method):  # e.g. gradient-based methods need labelled data
        assert rc == 2 and err.count("\n") == 1 and "cannot be computed" in err
        assert not out.exists()
        return
    if _mergekit_refuses(method, len(bert["tasks"])):
        assert rc == 2 and err.count("\n") == 1 and "mergekit." in err, err
        assert not out.exists()
        return
    assert rc == 0, err
    base = _tensors(bert["base"])
    merged = _tensors(str(out))
    assert list(merged) == list(base)                                     # same key names, same order
    assert all(merged[k].dtype == base[k].dtype and merged[k].shape == base[k].shape for k in base)
    assert all(np.isfinite(v).all() for v in merged.values())
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        assert os.path.exists(out / name)
    model = transformers.BertModel.from_pretrained(str(out))
    np.testing.assert_array_equal(model.state_dict()["encoder.layer.0.attention.self.query.weight"].numpy(),
                                  merged["encoder.layer.0.attention.self.query.weight"])
    if method == "task_arithmetic":                                       # default alpha 0.3
        tasks = [_tensors(t) for t in bert["tasks"]]
        for k in base:
            expected = base[k] + 0.3 * sum(t[k].astype(np.float64) - base[k] for t in tasks)
            np.testing.assert_allclose(merged[k], expected, rtol=1e-5, atol=1e-6, err_msg=k)
    if method == "average":
        tasks = [_tensors(t) for t in bert["tasks"]]
        for k in base:
            np.testing.assert_allclose(merged[k], (tasks[0][k] + tasks[1][k]) / 2, rtol=1e-5, atol=1e-6)
    if method == "cat":  # the float64 CAT merge of the same folders and exemplar files (default alpha, lam, c)
        from tests import tree_reference

        want = tree_reference.reference_folder_merge(bert["base"], bert["tasks"], bert["exemplars"], alpha=0.3,
                                                     lam=5.0, c=3)
        assert tree_reference.compare({k: merged[k] for k in want}, want, base)[1] < 1e-4   # of the merged update
        tasks = [_tensors(t) for t in bert["tasks"]]
        ta = {k: base[k] + 0.3 * sum(t[k].astype(np.float64) - base[k] for t in tasks) for k in want}
        assert tree_reference.compare(ta, want, base)[1] > 1e-2                # CAT is not task arithmetic here


def test_defaults_and_hyperparameter_flags(bert, capsys):
    rc, stdout, err = _run(capsys, ["merge", "--method", "ties", "--base", bert["base"], "--task", *bert["tasks"],
                                    "--alpha", "0.5", "--lam", "2", "--out", str(bert["root"] / "ties")])
    assert rc == 0, err
    assert "(k=0.2, alpha=0.5)" in stdout                     # TIES keeps its k, takes --alpha
    assert "takes no --lam" in err                             # and says it ignored --lam
    base, merged = _tensors(bert["base"]), _tensors(str(bert["root"] / "ties"))
    key = "encoder.layer.0.output.dense.weight"
    # ties with alpha 0.5 moves at most half as far as the largest single task vector entry
    tasks = [_tensors(t) for t in bert["tasks"]]
    bound = 0.5 * np.maximum(*[np.abs(t[key] - base[key]) for t in tasks])
    assert np.all(np.abs(merged[key] - base[key]) <= bound + 1e-6)
    rc, _, err = _run(capsys, ["merge", "--method", "ties", "--base", bert["base"], "--task", *bert["tasks"],
                               "--hparam", "k=1.0", "--quiet", "--out", str(bert["root"] / "ties_k1")])
    assert rc == 0, err


def _assert_one_line_error(rc, err, *needles):
    assert rc == 2
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("catmerge: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_error_cases_exit_2_with_one_line(bert, capsys, tmp_path):
    root = bert["root"]
    out = tmp_path / "never"
    base, tasks, ex = bert["base"], bert["tasks"], bert["exemplars"]

    # an architecture that differs
    rc, _, err = _run(capsys, ["merge", "--method", "task_arithmetic", "--base", base, "--task", tasks[0],
                               "--task", bert["wide"], "--quiet", "--out", str(out)])
    _assert_one_line_error(rc, err, "wide")

    # keys that differ: a task whose checkpoint renamed a tensor
    renamed = root / "renamed"
    if not renamed.exists():
        import shutil

        shutil.copytree(tasks[0], renamed)
        state = _tensors(str(renamed))
        state["encoder.layer.0.intermediate.dense.weight_renamed"] = state.pop("encoder.layer.0.intermediate.dense.weight")
        safetensors_numpy.save_file(state, str(renamed / "model.safetensors"), metadata={"format": "pt"})
    rc, _, err = _run(capsys, ["merge", "--method", "average", "--base", base, "--task", tasks[0],
                               "--task", str(renamed), "--quiet", "--out", str(out)])
    _assert_one_line_error(rc, err, "renamed", "intermediate.dense.weight")

    # a missing exemplar file
    rc, _, err = _run(capsys, ["merge", "--method", "cat", "--base", base, "--task", *tasks, "--exemplars", ex[0],
                               str(root / "nope.txt"), "--quiet", "--out", str(out)])
    _assert_one_line_error(rc, err, "nope.txt", "does not exist")

    # an exemplar count that differs from the task count
    rc, _, err = _run(capsys, ["merge", "--method", "cat", "--base", base, "--task", *tasks, "--exemplars", ex[0],
                               "--quiet", "--out", str(out)])
    _assert_one_line_error(rc, err, "1 exemplar file(s) for 2 task(s)")

    # no exemplars for a method that needs them
    rc, _, err = _run(capsys, ["merge", "--method", "cat", "--base", base, "--task", *tasks, "--quiet",
                               "--out", str(out)])
    _assert_one_line_error(rc, err, "needs --exemplars")

    # an empty exemplar file (blank lines only)
    empty = root / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    rc, _, err = _run(capsys, ["merge", "--method", "cat", "--base", base, "--task", *tasks, "--exemplars", ex[0],
                               str(empty), "--quiet", "--out", str(out)])
    _assert_one_line_error(rc, err, "empty.txt", "empty")

    # unreadable checkpoints: garbage weights, a folder that does not exist
    broken = root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text(open(os.path.join(base, "config.json")).read())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    rc, _, err = _run(capsys, ["merge", "--method", "average", "--base", base, "--task", str(broken), "--quiet",
                               "--out", str(out)])
    _assert_one_line_error(rc, err, "broken")
    rc, _, err = _run(capsys, ["merge", "--method", "average", "--base", str(root / "missing_dir"), "--task",
                               tasks[0], "--quiet", "--out", str(out)])
    _assert_one_line_error(rc, err, "missing_dir")

    # bad hyperparameters: caught by the CLI, by the method, and unknown names
    for flags, needle in ((["--c", "-1"], "--c"), (["--lam", "-2"], "--lam"), (["--alpha", "nan"], "--alpha")):
        rc, _, err = _run(capsys, _merge_args(bert, "cat", out, *flags))
        _assert_one_line_error(rc, err, needle)
    rc, _, err = _run(capsys, ["merge", "--method", "ties", "--base", base, "--task", *tasks, "--hparam", "k=2",
                               "--quiet", "--out", str(out)])
    _assert_one_line_error(rc, err, "k")
    rc, _, err = _run(capsys, _merge_args(bert, "cat", out, "--hparam", "gamma=1"))
    _assert_one_line_error(rc, err, "gamma")

    # a non-empty output folder is not replaced silently
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    rc, _, err = _run(capsys, ["merge", "--method", "average", "--base", base, "--task", *tasks, "--quiet",
                               "--out", str(occupied)])
    _assert_one_line_error(rc, err, "not empty")
    assert (occupied / "keep.txt").exists()

    assert not out.exists()                                    # no failure left anything behind
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".tmp", ".catmerge-"))]


def test_roles_command(bert, capsys):
    rc, stdout, err = _run(capsys, ["roles", "--base", bert["base"]])
    assert rc == 0, err
    lines = {line.split()[0]: line.split()[1] for line in stdout.splitlines()[1:-1]}
    assert lines["pooler/dense/kernel"] == "linear"
    assert lines["encoder/layer/0/attention/self/query/kernel"] == "linear"
    assert lines["encoder/layer/0/attention/output/LayerNorm/scale"] == "scale"
    assert lines["encoder/layer/0/attention/output/LayerNorm/bias"] == "shift"
    assert lines["encoder/layer/0/intermediate/dense/bias"] == "shift"
    assert lines["embeddings/word_embeddings/embedding"] == "other"
    assert lines["embeddings/position_embeddings/embedding"] == "other"
    assert stdout.splitlines()[-1].startswith("total: 7 linear, 3 scale, 10 shift, 3 other")


def test_module_entry_point_runs_as_a_process(bert, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "catmerge_jax.cli", "merge", "--method", "cat", "--base",
                           bert["base"], "--task", *bert["tasks"], "--exemplars", bert["exemplars"][0],
                           str(tmp_path / "absent.txt"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"catmerge: error: exemplar file {tmp_path / 'absent.txt'} does not exist"]


def _save_clip(folder, *, seed, base=None, scale=0.05):
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8, projection_dim=12)
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(cfg)
    if base is not None:
        model.load_state_dict(transformers.CLIPVisionModelWithProjection.from_pretrained(base).state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_clip_vision_with_npy_exemplars(tmp_path, capsys):
    base = _save_clip(str(tmp_path / "base"), seed=0)
    tasks = [_save_clip(str(tmp_path / f"t{k}"), seed=k + 1, base=base) for k in range(2)]
    rng = np.random.default_rng(0)
    exemplars = []
    for k in range(2):
        path = tmp_path / f"ex{k}.npy"
        np.save(path, rng.normal(size=(3, 16, 16, 3)).astype(np.float32))
        exemplars.append(str(path))
    out = tmp_path / "merged"
    rc, _, err = _run(capsys, ["merge", "--method", "cat", "--base", base, "--task", *tasks, "--exemplars",
                               *exemplars, "--c", "2", "--quiet", "--out", str(out)])
    assert rc == 0, err
    model = transformers.CLIPVisionModelWithProjection.from_pretrained(str(out))
    merged = _tensors(str(out))
    assert set(merged) == set(_tensors(base))
    key = "vision_model.embeddings.patch_embedding.weight"
    np.testing.assert_array_equal(model.state_dict()[key].numpy(), merged[key])
    with open(out / "config.json") as f:
        assert json.load(f)["model_type"] == "clip_vision_model"

    # what CAT saw: every 8x8 patch of the 3 images is a row of the patch embedding, the post-LN sees class tokens
    from catmerge_jax import pipeline
    from catmerge_jax.capture import make_capture

    b = pipeline.load_checkpoint(base)
    stats = pipeline.task_statistics(make_capture(b.model()), b.params, pipeline.read_exemplars(exemplars[0], b))
    vm = stats["vision_model"]
    assert vm["embeddings"]["patch_embedding"]["kernel"].gram_matrix().shape == (8 * 8 * 3, 8 * 8 * 3)
    assert float(vm["embeddings"]["patch_embedding"]["kernel"].count) == 3 * 4
    assert float(vm["encoder"]["layers"]["0"]["mlp"]["fc1"]["kernel"].count) == 3 * 5        # 4 patches + class
    assert float(vm["post_layernorm"]["scale"].count) == 3
    assert float(stats["visual_projection"]["kernel"].count) == 3

    # images of the wrong size are a one-line error
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 8, 8, 3), np.float32))
    rc, _, err = _run(capsys, ["merge", "--method", "cat", "--base", base, "--task", *tasks, "--exemplars",
                               exemplars[0], str(bad), "--quiet", "--out", str(tmp_path / "o2")])
    _assert_one_line_error(rc, err, "bad.npy", "16x16")
