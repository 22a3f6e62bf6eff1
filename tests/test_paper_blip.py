"""The BLIP protocol (experiments/paper_blip.py) end to end on tiny random stand-ins, and its metrics
(experiments/vl_metrics.py) against hand-computed float64 values."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from experiments.vl_metrics import cider_d, normalize_answer, ptb_tokenize, vqa_accuracy

# ------------------------------------------------------------------------------------------------ metrics


def test_vqa_accuracy_hand_computed():
    # 3 of 10 humans said "2": leaving out one of them leaves 2 matches (2/3), any other leaves 3 (1).
    assert vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10, abs=1e-15)
    # one "yes" among ten: 0 when it is left out, 1/3 otherwise
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(9 * (1 / 3) / 10, abs=1e-15)
    # contraction restored ("dont" -> "don't"), 2 of 10
    assert vqa_accuracy("dont know", ["don't know"] * 2 + ["no"] * 8) == pytest.approx(
        (2 * (1 / 3) + 8 * (2 / 3)) / 10, abs=1e-15)
    # article and final period removed, number word to digit
    assert vqa_accuracy("the dog.", ["dog"] * 10) == 1.0
    assert normalize_answer("The  three, cats!") == "3 cats"
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    # a single reference answer (ScienceQA): exact match after normalisation
    assert vqa_accuracy("Mercury.", ["mercury"]) == 1.0 and vqa_accuracy("venus", ["mercury"]) == 0.0


def test_ptb_tokenization():
    assert ptb_tokenize("A man's dog, running!") == ["a", "man", "'s", "dog", "running"]
    assert ptb_tokenize("Don't stop (now)...") == ["do", "n't", "stop", "now"]
    assert ptb_tokenize('A "well-known" place.') == ["a", "well-known", "place"]


def test_cider_d_hand_computed():
    ln2 = math.log(2.0)
    assert ln2 > 0
    # Item A: the candidate equals one of two references; "a" and "dog" occur in both items' references (idf 0).
    # Unigram and bigram cosines with "a cat" are 1, with "a dog" 0: (1 + 1 + 0 + 0)/4/2 refs x 10 = 2.5.
    score, per = cider_d(["a cat", "a dog"], [["a cat", "a dog"], ["a dog"]])
    np.testing.assert_allclose(per, [2.5, 0.0], rtol=0, atol=1e-12)
    assert score == pytest.approx(1.25, abs=1e-12)
    # Clipping and the length penalty: "a cat a cat" vs "a cat" has unigram weights cat 2ln2 (clipped to ln2),
    # bigrams "a cat" 2ln2 / "cat a" ln2: cosines 1/2 and 1/sqrt(5); lengths (bigram counts) 3 vs 1: exp(-4/72).
    # "dog" vs "a dog": unigram cosine 1, no bigrams; lengths 0 vs 1: exp(-1/72).
    score, per = cider_d(["a cat a cat", "dog"], [["a cat"], ["a dog"]])
    expected = [10 * (0.5 + 1 / math.sqrt(5)) / 4 * math.exp(-4 / 72), 10 * 1.0 / 4 * math.exp(-1 / 72)]
    np.testing.assert_allclose(per, expected, rtol=1e-13)
    assert score == pytest.approx(np.mean(expected), rel=1e-13)
    # tokenization: case and punctuation do not matter
    np.testing.assert_allclose(cider_d(["A cat.", "a dog"], [["a cat", "A dog!"], ["a dog"]])[1], [2.5, 0.0])


# ------------------------------------------------------------------------------------------------ protocol

TASKS = ("coco_caption", "flickr30k", "textcaps", "okvqa", "textvqa", "scienceqa")


def _setup(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    import jax

    from converters.hf import load_hf_folder, save_hf_folder
    from tests.fixtures import blip_tiny as T

    base = T.save_folder(T.make_hf("vqa", seed=0, eos_bias=3.0), str(tmp_path / "base"))
    _, _, params, meta = load_hf_folder(base)
    folders = {}
    for k, t in enumerate(TASKS):
        rng = np.random.default_rng(100 + k)
        ft = jax.tree.map(lambda w: (w + 0.03 * rng.standard_normal(w.shape)).astype(np.float32), params)
        folders[t] = save_hf_folder(str(tmp_path / t), ft, meta, base)
    data = tmp_path / "data"
    images = T.write_images(str(data / "images"), 3, seed=5)
    words = T.VOCAB_WORDS
    rng = np.random.default_rng(0)
    for t in TASKS:
        (data / t).mkdir(parents=True)
        with open(data / t / "annotations.jsonl", "w") as f:
            for i in range(2):
                row = {"image": f"../images/{images[i]}"}
                if t in TASKS[:3]:
                    row.update(prompt="a picture of", captions=[" ".join(rng.choice(words, 4)) for _ in range(3)])
                else:
                    row.update(question="what is the color", answers=[str(rng.choice(words)) for _ in range(10)])
                f.write(json.dumps(row) + "\n")
        with open(data / t / "exemplars.jsonl", "w") as f:
            for i in range(2):
                f.write(json.dumps({"image": f"../images/{images[2 - i]}", "text": "how many cats"}) + "\n")
    return torch, base, folders, data


def test_blip_protocol_end_to_end(tmp_path, capsys):
    from experiments import paper_blip
    from experiments.benchmark.evaluate import load_all_methods
    from tests.fixtures import blip_tiny as T

    torch, base, folders, data = _setup(tmp_path)
    # Independent check of one cell: the pretrained model's okvqa answers generated by transformers (PyTorch); three
    # of the ten human answers are set to them, so the protocol's score is nonzero only if its generation agrees.
    import transformers
    from PIL import Image

    hf = transformers.BlipForQuestionAnswering.from_pretrained(base).eval()
    tok = transformers.AutoTokenizer.from_pretrained(base)
    proc = transformers.models.blip.image_processing_pil_blip.BlipImageProcessorPil(size={"height": 32, "width": 32})
    path = data / "okvqa" / "annotations.jsonl"
    rows = [json.loads(line) for line in open(path)]
    for row in rows:
        px = proc(Image.open(data / "okvqa" / row["image"]), return_tensors="pt")["pixel_values"]
        enc = tok([row["question"]], return_tensors="pt")
        out = hf.generate(input_ids=enc["input_ids"], pixel_values=px, attention_mask=enc["attention_mask"],
                          max_length=6)
        answer = tok.decode(out[0, 1:], skip_special_tokens=True).strip()
        row["answers"] = [answer] * 3 + row["answers"][:7]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = float(np.mean([vqa_accuracy(r["answers"][0], r["answers"]) for r in rows]))
    assert expected > 0.5
    # The script merges with every registered method by default; here three (exemplar statistics, none, sign/top-k)
    # keep the test short (CAT's merge alone costs more than the rest of this test on the tiny model; the merging
    # methods are tested in their own files, CAT on BLIP folders in tests/test_blip.py).
    methods = ["regmean", "task_arithmetic", "ties"]
    assert set(methods) <= set(load_all_methods())
    res = paper_blip.run(base, folders, str(data), exemplars=2, num_beams=1, max_length=6, batch_size=2, quiet=True,
                         methods=methods)
    assert res["tasks"] == list(TASKS) and not res["selected_on_validation"]
    assert res["metrics"] == {t: ("cider" if t in TASKS[:3] else "vqa") for t in TASKS}
    assert list(res["rows"]) == ["individual", "pretrained", *methods]
    for m, row in res["rows"].items():
        assert set(row) == set(TASKS) and all(np.isfinite(v) and v >= 0 for v in row.values()), m
    assert res["rows"]["pretrained"]["okvqa"] == pytest.approx(expected, abs=1e-12)
    printed = paper_blip.table(res["rows"], res["tasks"])
    assert "regmean" in printed and "coco_cap" in printed
    # the command line: a missing folder is a one-line error
    code = paper_blip.main(["--pretrained", base, "--task", f"okvqa={tmp_path / 'missing'}", "--data", str(data),
                            "--quiet"])
    assert code == 2 and "missing" in capsys.readouterr().err
    assert T.SEP == 3
