"""The on-disk cache of model parameter shapes (``converters.keys.remember_template_shapes``): a new process reads
a model's shapes instead of tracing its ``init``; an entry never serves another model, an edited definition or a
damaged file. The reference is the traced ``init`` itself (``_template_shapes``)."""

import json
import os

import numpy as np
import pytest

from catmerge_jax import compilation_cache
from catmerge_jax.models.bert import BertConfig, BertModel
from converters import keys

ARGS = (np.ones((1, 1), np.int32), np.ones((1, 1), np.int32))


def _model(hidden=16, pooler=True):
    return BertModel(BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16), add_pooler=pooler)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty in-memory cache, the disk cache in ``tmp_path``, and a count of the traces."""
    traced = []
    original = keys._template_shapes
    monkeypatch.setattr(keys, "_TEMPLATE_SHAPES", {})
    monkeypatch.setattr(keys, "_TEMPLATE_FOLDER", [None])
    monkeypatch.setattr(keys, "_template_shapes", lambda *a: traced.append(a[0]) or original(*a))
    keys.remember_template_shapes(tmp_path / "shapes")
    return tmp_path / "shapes", traced, original


def _forget_in_memory(monkeypatch):
    monkeypatch.setattr(keys, "_TEMPLATE_SHAPES", {})  # as a new process starts


def test_a_new_process_reads_the_shapes_instead_of_tracing(fresh, monkeypatch):
    folder, traced, original = fresh
    model = _model()
    want = original(model, *ARGS)
    assert keys.template_shapes(model, *ARGS) == want and len(traced) == 1
    assert len(os.listdir(folder)) == 1
    _forget_in_memory(monkeypatch)
    assert keys.template_shapes(model, *ARGS) == want
    assert len(traced) == 1  # read from disk, not traced again


def test_another_model_or_argument_shape_never_reads_the_entry(fresh, monkeypatch):
    folder, traced, original = fresh
    keys.template_shapes(_model(), *ARGS)
    for model, args in ((_model(hidden=32), ARGS), (_model(pooler=False), ARGS),
                        (_model(), (np.ones((1, 2), np.int32), np.ones((1, 2), np.int32)))):
        _forget_in_memory(monkeypatch)
        before = len(traced)
        assert keys.template_shapes(model, *args) == original(model, *args)
        assert len(traced) == before + 1
    assert len(os.listdir(folder)) == 4


def test_an_edited_model_definition_is_traced_again(fresh, monkeypatch):
    folder, traced, _ = fresh
    keys.template_shapes(_model(), *ARGS)
    _forget_in_memory(monkeypatch)
    monkeypatch.setattr(keys, "_sources_digest", lambda: b"another version of the sources")
    keys.template_shapes(_model(), *ARGS)
    assert len(traced) == 2


@pytest.mark.parametrize("damage", ["not json", '{"shapes": {"a": ["x"]}}', '{"other": 1}', ""])
def test_a_damaged_entry_is_traced_again_and_rewritten(fresh, monkeypatch, damage):
    folder, traced, original = fresh
    model = _model()
    keys.template_shapes(model, *ARGS)
    (entry,) = os.listdir(folder)
    (folder / entry).write_text(damage, encoding="utf-8")
    _forget_in_memory(monkeypatch)
    assert keys.template_shapes(model, *ARGS) == original(model, *ARGS)
    assert len(traced) == 2
    stored = json.loads((folder / entry).read_text(encoding="utf-8"))["shapes"]
    assert {p: tuple(s) for p, s in stored.items()} == original(model, *ARGS)


def test_in_memory_only_by_default_and_when_the_caches_are_off(monkeypatch, tmp_path):
    monkeypatch.setattr(keys, "_TEMPLATE_SHAPES", {})
    monkeypatch.setattr(keys, "_TEMPLATE_FOLDER", [None])
    keys.template_shapes(_model(), *ARGS)
    assert keys._TEMPLATE_FOLDER == [None]
    assert compilation_cache.shapes_cache_dir({compilation_cache.ENV: "0"}) is None
    chosen = compilation_cache.shapes_cache_dir({compilation_cache.ENV: str(tmp_path)})
    assert os.path.dirname(chosen) == str(tmp_path)
    assert os.path.basename(chosen) == "shapes-" + os.path.basename(
        compilation_cache.default_cache_dir({compilation_cache.ENV: str(tmp_path)}))
