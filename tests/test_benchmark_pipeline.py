"""The offline benchmark's pipeline end to end on a tiny random BERT and synthetic keyword tasks (fast)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from catmerge_jax.models.bert import BertConfig, BertModel  # noqa: E402
from experiments.benchmark import analyses, evaluate, finetune, run, tasks  # noqa: E402


@pytest.fixture(scope="module")
def tiny_backbone():
    from transformers import AutoTokenizer

    folder = finetune.minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    model = BertModel(cfg, add_pooler=False)
    ids = jnp.ones((1, 8), jnp.int32)
    params = model.init(jax.random.key(0), ids, ids)["params"]
    return finetune.Backbone(model, params, tokenizer, "tiny-random-bert")


CFG = dataclasses.replace(
    run.QUICK, tasks=("synthetic_0", "synthetic_1", "synthetic_2"),
    sizes=tasks.Sizes(train=48, val=16, test=16),
    finetune=finetune.FinetuneConfig(steps=60, batch_size=8, max_len=32, learning_rate=3e-3, head_learning_rate=1e-2),
    exemplars=2, c=2, c_sweep=(2,), exemplar_sweep=(1, 2), lam_sweep=(0.0, 5.0), alphas=(0.3, 1.0),
    ties_k=(0.2,), curve_alphas=(0.3, 1.0), conflict_grid=(0.0, 1.0), fisher_examples=4, variants=("gated",),
    # A subset that still covers every code path: alpha as a scale or not, exemplar statistics, both extras.
    methods=("task_arithmetic", "ties", "cat", "regmean", "fisher", "tatr", "iso_cts"),
    cat_trim_combos=("tsv",), adamerging_steps=2, adamerging_batch=4)


def _accuracy_by_hand(backbone, task, params, head, max_len):
    """Test accuracy of one task written out: tokenize, encode, mean-pool the real tokens, apply the head."""
    enc = backbone.tokenizer(list(task.test.texts), padding="max_length", truncation=True, max_length=max_len,
                             return_tensors="np")
    ids, mask = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
    hidden = np.asarray(backbone.model.apply({"params": params}, ids, mask).last_hidden_state, np.float64)
    pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    logits = pooled @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
    return float(np.mean(logits.argmax(-1) == np.asarray(task.test.labels)))


def test_pipeline_end_to_end_and_cache(tiny_backbone, tmp_path):
    task_list = tasks.synthetic_tasks(3, sizes=CFG.sizes)
    out, cache = str(tmp_path / "results"), str(tmp_path / "cache")
    res = run.run_benchmark(tiny_backbone, task_list, CFG, out_dir=out, cache_dir=cache, quiet=True)

    methods = CFG.methods
    assert set(res["main"]) == set(methods) | {"cat (λ, c on val)", "cat_trim+tsv", "AdaMerging", "CAT + AdaMerging"}
    ind = res["individual"]["test"]
    for name, r in res["main"].items():
        assert "skipped" not in r, (name, r)
        assert set(r["test"]) == {t.name for t in task_list}
        # the summary numbers are those of the per-task accuracies (paper Table 10's definitions)
        acc = np.array([r["test"][t.name] for t in task_list])
        base = np.array([ind[t.name] for t in task_list])
        assert r["summary"]["normalized"] == pytest.approx(np.mean(acc / base), abs=1e-12)
        assert r["summary"]["drop_std"] == pytest.approx(np.std(100 * (base - acc)), abs=1e-9)
        if r["alpha_is_scale"]:
            assert r["hparams"]["alpha"] in CFG.alphas
            # the same alpha grid for every method, times its own knob points
            knobs = {"ties": len(CFG.ties_k), "iso_cts": 2, "cat (λ, c on val)": 2}.get(name, 1)
            assert len(r["val_grid"]) == knobs * len(CFG.alphas), name
            assert np.mean(list(r["val"].values())) == pytest.approx(max(g["mean"] for g in r["val_grid"]))
    # The reported test accuracy of task arithmetic is that of W0 + α Σ_k T_k at the chosen α, recomputed here
    # from the cached checkpoints with a forward pass written out by hand.
    from experiments.benchmark.finetune import load_task_checkpoint

    loaded = [load_task_checkpoint(os.path.join(cache, res["tasks"][t.name]["checkpoint"])) for t in task_list]
    alpha = res["main"]["task_arithmetic"]["hparams"]["alpha"]
    merged = jax.tree.map(lambda w, *ws: (np.asarray(w, np.float64) + alpha * sum(np.asarray(x, np.float64)
                                                                                   - np.asarray(w, np.float64)
                                                                                   for x in ws)).astype(np.float32),
                          tiny_backbone.params, *[bb for bb, _ in loaded])
    for t, (_, head) in zip(task_list, loaded):
        assert res["main"]["task_arithmetic"]["test"][t.name] == pytest.approx(
            _accuracy_by_hand(tiny_backbone, t, merged, head, CFG.finetune.max_len), abs=1e-12), t.name
    ada = res["main"]["AdaMerging"]
    assert ada["hparams"]["steps"] == 2 and "unlabeled validation inputs" in ada["data"]
    # Alpha is a merge scale for task arithmetic, TIES and CAT; RegMean's alpha is not (checked numerically).
    assert res["main"]["task_arithmetic"]["alpha_is_scale"] and res["main"]["cat"]["alpha_is_scale"]
    assert not res["main"]["regmean"]["alpha_is_scale"]
    # Fine-tuning learned the keyword tasks (3 classes: chance is 1/3).
    assert np.mean(list(res["individual"]["test"].values())) > 0.6

    an = res["analyses"]
    assert [r["exemplars"] for r in an["exemplars"]] == list(CFG.exemplar_sweep)
    assert [r["lam"] for r in an["lambda"]] == list(CFG.lam_sweep)
    assert [r["setting"]["off"] for r in an["ablation"]] == ["linear", "scale", "shift"]
    assert np.shape(an["conflict"]["cat"]) == (2, 2) and np.shape(an["conflict"]["task_arithmetic"]) == (2, 2)
    # At alpha = (0, 0) nothing is added: no conflict.
    assert an["conflict"]["task_arithmetic"][0][0] == pytest.approx(0.0, abs=1e-6)
    # The validation-selected CAT row: λ, c and alpha chosen together over the full alpha grid.
    chosen = res["main"]["cat (λ, c on val)"]
    assert chosen["hparams"]["lam"] in CFG.lam_sweep and chosen["hparams"]["c"] in (CFG.c, *CFG.c_sweep)
    assert [r["name"] for r in an["layers"]] == [label for label, _ in CFG.layer_groups]
    assert set(an["directions"]) == {f"{lam:g}" for lam in CFG.lam_sweep}
    for lam, per in an["directions"].items():
        for d in per.values():
            if lam == "0":  # λ = 0: G_k is PSD and every per-pair term is ≥ 0
                assert d["negative_pair_terms"] == 0.0
    energy = an["removed_energy"]["synthetic_0"]
    assert 0.0 < energy["linear"] < 1.0 and energy["other"] == pytest.approx(0.0, abs=1e-6)

    for f in ("results.json", "RESULTS.md", "alpha.png", "conflict.png", "methods.png", "lambda.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    md = open(os.path.join(out, "RESULTS.md"), encoding="utf-8").read()
    for name in methods:
        assert f"| {name} |" in md
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        assert json.load(f)["main"]["cat"]["hparams"] == res["main"]["cat"]["hparams"]

    # A second run reuses the cached checkpoints (and so reproduces the individual accuracies exactly).
    cfg2 = dataclasses.replace(CFG, methods=("task_arithmetic",), cat_trim_combos=(), adamerging=False)
    res2 = run.run_benchmark(tiny_backbone, task_list, cfg2, out_dir=str(tmp_path / "r2"), cache_dir=cache,
                             quiet=True, analyses_on=False)
    assert all(t["cached"] for t in res2["tasks"].values())
    assert res2["individual"] == res["individual"]
    with open(os.path.join(cache, "finetuned", "manifest.json"), encoding="utf-8") as f:
        assert set(json.load(f)["tasks"]) == {t.name for t in task_list}


@pytest.mark.parametrize("batch_size, bucket", [(32, 8), (5, 3), (64, 32)])
def test_evaluator_features_do_not_depend_on_batching(tiny_backbone, batch_size, bucket):
    """Each sequence's pooled features equal those of the sequence encoded alone at its exact length, in float64
    after the model (float32 inside: rtol 1e-5 covers the summation order that padding widths change)."""
    task = tasks.synthetic_tasks(2, sizes=tasks.Sizes(train=8, val=9, test=7))
    tok = {t.name: finetune.tokenize(tiny_backbone.tokenizer, t.val.texts, t.val.labels, 32) for t in task}
    ev = evaluate.Evaluator(tiny_backbone.model, {}, {"val": tok}, batch_size=batch_size, bucket=bucket)
    got = ev.features(tiny_backbone.params, "val")
    for name, t in tok.items():
        for i, length in enumerate(t.lengths):
            ids, mask = t.ids[i:i + 1, :length], t.mask[i:i + 1, :length]
            hidden = np.asarray(tiny_backbone.model.apply({"params": tiny_backbone.params}, ids, mask)
                                .last_hidden_state, np.float64)
            np.testing.assert_allclose(got[name][i], hidden[0].mean(0), rtol=1e-5, atol=1e-6)


def test_summary_numbers_match_numpy():
    merged = {"a": 0.70, "b": 0.50, "c": 0.90}
    ind = {"a": 0.80, "b": 0.75, "c": 0.90}
    s = evaluate.summarize(merged, ind)
    acc, base = np.array([0.70, 0.50, 0.90]), np.array([0.80, 0.75, 0.90])
    assert s["average"] == pytest.approx(acc.mean(), abs=1e-12)
    assert s["normalized"] == pytest.approx(np.mean(acc / base), abs=1e-12)
    assert s["drop_std"] == pytest.approx(np.std(100 * (base - acc)), abs=1e-9)


def test_scaled_merge_detects_non_scale_alpha():
    w0 = {"w": jnp.zeros(3)}
    linear = lambda w, alpha=1.0: {"w": w["w"] + alpha * jnp.array([1.0, 2.0, 3.0])}  # noqa: E731
    curved = lambda w, alpha=1.0: {"w": w["w"] + alpha ** 2 * jnp.ones(3)}  # noqa: E731
    sm = evaluate.scaled_merge(linear, w0, has_alpha=True)
    assert sm.alpha_is_scale and np.allclose(sm.at(w0, 0.3)["w"], [0.3, 0.6, 0.9])
    assert not evaluate.scaled_merge(curved, w0, has_alpha=True).alpha_is_scale


def test_tasks_splits_are_disjoint_and_deduplicated():
    texts = ["a b", "a  b", "c d", "e f", "g h", "i j", "k l", "m n", "x y", "x y"]
    labels = ["p", "p", "q", "p", "q", "p", "q", "p", "p", "q"]  # "x y" has two labels: dropped
    t = tasks.make_task("t", texts, labels, sizes=tasks.Sizes(train=10, val=2, test=2), seed=1)
    allx = t.train.texts + t.val.texts + t.test.texts
    assert len(allx) == len(set(allx)) == 7 and "x y" not in allx
    assert t.classes == ("p", "q")
    train = [t.classes[y] for y in t.train.labels]
    major = max(t.classes, key=lambda c: (train.count(c), -t.classes.index(c)))   # argmax keeps the first on ties
    assert t.majority_baseline() == pytest.approx(np.mean([t.classes[y] == major for y in t.test.labels]))
    with pytest.raises(ValueError, match="distinct examples"):
        tasks.make_task("t", texts[:4], labels[:4], sizes=tasks.Sizes(train=1, val=2, test=2))


def test_pad_rows_keeps_gram():
    from catmerge_jax import stats as S

    params = {"d": {"kernel": np.zeros((4, 2))}}
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    s = S.stats_from_arrays(params, {"d/kernel": S.linear_stats(x, form="rows")})
    padded = run.pad_rows(s, 3 + 0)["d"]["kernel"]
    assert padded.rows.shape == (3, 4)
    gram = run.pad_rows(s, 8)["d"]["kernel"]  # 8 >= width 4: stored as the Gram
    assert gram.rows is None
    np.testing.assert_allclose(gram.gram_matrix(), x.astype(np.float64).T @ x, rtol=1e-5, atol=1e-5)
    s2 = S.stats_from_arrays({"d": {"kernel": np.zeros((8, 2))}},
                             {"d/kernel": S.linear_stats(np.ones((3, 8), np.float32), form="rows")})
    assert run.pad_rows(s2, 5)["d"]["kernel"].rows.shape == (5, 8)


def test_gated_projection_against_numpy():
    from catmerge_jax.cat import LeafInput, apply_cat_linear
    from catmerge_jax.roles import LeafSpec, Role
    from catmerge_jax import stats as S

    rng = np.random.default_rng(0)
    k, n_in, n_out, c = 3, 6, 5, 2
    t = rng.standard_normal((k, n_in, n_out)).astype(np.float32)
    rows = [rng.standard_normal((4 + i, n_in)).astype(np.float32) for i in range(k)]
    leaf = LeafInput("d/kernel", LeafSpec(Role.LINEAR), jnp.asarray(t), [S.linear_stats(r, form="rows") for r in rows])
    for lam in (0.0, 5.0):
        trimmer = analyses.gated_linear_projection(lam, c)
        bases = trimmer.init(leaf)
        got = np.asarray(trimmer.apply(leaf, bases))
        b64, t64 = np.asarray(bases, np.float64), t.astype(np.float64)
        grams = [r.astype(np.float64).T @ r for r in rows]
        ref = []
        for i in range(k):
            ti = t64[i].copy()
            for kk in range(k):
                if kk == i:
                    continue
                b = b64[kk] * np.array([(t64[i] @ b64[kk][:, j]) @ (grams[kk] - lam * grams[i])
                                        @ (t64[i] @ b64[kk][:, j]) > 0 for j in range(c)])[None, :]
                ti = ti - ti @ b @ b.T
            ref.append(ti)
        np.testing.assert_allclose(got, np.stack(ref), rtol=1e-4, atol=1e-4)
        if lam == 0.0:  # every term is a PSD quadratic form: nothing is gated, the paper's projection results
            np.testing.assert_allclose(got, np.asarray(apply_cat_linear(jnp.asarray(t), bases)), rtol=1e-4, atol=1e-4)


def test_seed_aggregation_matches_numpy():
    """Mean ± sample std over seeds and the paired difference to CAT, against NumPy on made-up results."""
    def fake(seed, ta, cat):
        tests = {"task_arithmetic": ta, "cat": cat}
        main = {m: {"test": acc, "val": {t: a + 0.05 * seed for t, a in acc.items()},
                    "summary": evaluate.summarize(acc, {"a": 0.9, "b": 0.8}), "hparams": {"alpha": 0.3},
                    "merge_seconds": 1.0 + seed} for m, acc in tests.items()}
        return {"tasks": {"a": {}, "b": {}}, "config": {}, "main": main, "individual": {"test": {"a": 0.9, "b": 0.8}},
                "individual_summary": evaluate.summarize({"a": 0.9, "b": 0.8}, {"a": 0.9, "b": 0.8}),
                "pretrained_test": {"a": 0.5, "b": 0.5},
                "pretrained_summary": evaluate.summarize({"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.8}), "timing": {}}

    runs = [fake(0, {"a": 0.70, "b": 0.60}, {"a": 0.72, "b": 0.66}),
            fake(1, {"a": 0.74, "b": 0.58}, {"a": 0.70, "b": 0.60}),
            fake(2, {"a": 0.66, "b": 0.62}, {"a": 0.75, "b": 0.61})]
    agg = run.aggregate_seeds(runs, [0, 1, 2])
    ta_avg = np.array([0.65, 0.66, 0.64])
    cat_avg = np.array([0.69, 0.65, 0.68])
    row = agg["rows"]["task_arithmetic"]
    assert row["average"]["mean"] == pytest.approx(ta_avg.mean(), abs=1e-12)
    assert row["average"]["std"] == pytest.approx(ta_avg.std(ddof=1), abs=1e-12)
    assert row["per_task"]["a"]["std"] == pytest.approx(np.std([0.70, 0.74, 0.66], ddof=1), abs=1e-12)
    assert row["minus_cat"]["mean"] == pytest.approx((ta_avg - cat_avg).mean(), abs=1e-12)
    assert row["minus_cat"]["std"] == pytest.approx((ta_avg - cat_avg).std(ddof=1), abs=1e-12)
    assert row["merge_seconds"]["mean"] == pytest.approx(2.0)
    ta_val = ta_avg + 0.05 * np.arange(3)
    assert row["val_average"]["mean"] == pytest.approx(ta_val.mean(), abs=1e-12)
    assert row["val_average"]["std"] == pytest.approx(ta_val.std(ddof=1), abs=1e-12)
    table = run.seeds_table(agg)
    assert f"| {100 * ta_val.mean():.1f} ± {100 * ta_val.std(ddof=1):.1f} |" in table
    assert f"**{100 * ta_avg.mean():.1f} ± {100 * ta_avg.std(ddof=1):.1f}**" in table
