"""BLIP (issue 14): parity with transformers' PyTorch BLIP, converters, capture, exemplars, CLI.

Tiny random configs (hidden 32, 2 layers, 32x32 images in 8x8 patches, vocab 64) built from ``BlipConfig``; weights
redrawn at a larger scale (tests/fixtures/blip_tiny.py) so every layer matters. Tolerances: float32 forward passes
of this size agree to ~1e-6; 1e-4 absolute (the issue's bound) leaves room for summation order. Generated ids must be
identical.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

from converters import safetensors_io as st  # noqa: E402
from converters.hf import build_flax_model, load_hf_folder, save_hf_folder  # noqa: E402
from catmerge_jax.models import blip as B  # noqa: E402
from tests.fixtures import blip_tiny as T  # noqa: E402

TOL = 1e-4


def _nhwc(px):
    return np.ascontiguousarray(px.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    hf = T.make_hf("vqa", seed=0, eos_bias=3.0)
    folder = T.save_folder(hf, str(tmp_path_factory.mktemp("blip") / "vqa"))
    kind, config, params, meta = load_hf_folder(folder)
    return hf, folder, kind, params, meta, build_flax_model(kind, config, meta)


@pytest.fixture(scope="module")
def caption(tmp_path_factory):
    hf = T.make_hf("caption", seed=1, eos_bias=4.5)
    folder = T.save_folder(hf, str(tmp_path_factory.mktemp("blip") / "cap"))
    kind, config, params, meta = load_hf_folder(folder)
    return hf, folder, kind, params, meta, build_flax_model(kind, config, meta)


def _batch(seed=0, seq=6):
    rng = np.random.default_rng(seed)
    px = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    ids = np.zeros((3, seq), np.int64)
    for i, n in enumerate((seq, 4, seq - 1)):
        ids[i, :n] = [T.CLS] + list(rng.integers(6, 36, n - 2)) + [T.SEP]
    return px, ids, (ids != T.PAD).astype(np.int64)


# ------------------------------------------------------------------------------------------------ parity

def test_vqa_forward_parity(vqa):
    hf, _, kind, params, _, model = vqa
    assert kind == "blip_vqa"
    px, ids, mask = _batch()
    dids = np.array([[T.DEC, 20, 21, 22], [T.DEC, 23, T.SEP, 0], [T.DEC, 24, 25, T.SEP]])
    dmask = (dids != 0).astype(np.int64)
    with torch.no_grad():
        v = hf.vision_model(pixel_values=torch.tensor(px))
        q = hf.text_encoder(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            encoder_hidden_states=v.last_hidden_state)
        d = hf.text_decoder(input_ids=torch.tensor(dids), attention_mask=torch.tensor(dmask),
                            encoder_hidden_states=q.last_hidden_state, encoder_attention_mask=torch.tensor(mask))
    out = model.apply({"params": params}, _nhwc(px), ids, mask, dids, dmask)
    diffs = {"image_embeds": np.abs(np.asarray(out.image_embeds) - v.last_hidden_state.numpy()).max(),
             "pooler": np.abs(np.asarray(out.vision.pooler_output) - v.pooler_output.numpy()).max(),
             "question": np.abs(np.asarray(out.question_embeds) - q.last_hidden_state.numpy()).max(),
             "logits": np.abs(np.asarray(out.logits) - d.logits.numpy()).max()}
    print("vqa parity max abs diffs:", {k: f"{x:.2e}" for k, x in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs
    # The outputs are not trivially small: a wrong layer would show.
    assert np.abs(d.logits.numpy()).max() > 1.0


def test_vqa_generate_matches_transformers(vqa):
    hf, _, _, params, _, model = vqa
    px, ids, mask = _batch(seed=3)
    seen_eos = False
    for beams in (1, 3):
        with torch.no_grad():
            ref = hf.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                              attention_mask=torch.tensor(mask), max_length=10, num_beams=beams).numpy()
        ours = B.generate(model, params, _nhwc(px), ids, mask, max_length=10, num_beams=beams)
        assert ours.shape == ref.shape and (ours == ref).all(), (beams, ref.tolist(), ours.tolist())
        seen_eos |= bool((ref[:, 1:] == T.SEP).any())
    assert seen_eos  # the end token and what follows it are exercised


def test_caption_forward_and_generate_match_transformers(caption):
    hf, _, kind, params, _, model = caption
    assert kind == "blip_caption"
    px, ids, mask = _batch(seed=5)
    dids, dmask = B.decoder_inputs_from_text(ids, mask, T.DEC)
    dids, dmask = np.asarray(dids), np.asarray(dmask)
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(px), input_ids=torch.tensor(dids), attention_mask=torch.tensor(dmask))
    out = model.apply({"params": params}, _nhwc(px), dids, dmask)
    diff = np.abs(np.asarray(out.logits) - ref.logits.numpy()).max()
    print(f"caption logits max abs diff: {diff:.2e}")
    assert diff <= TOL
    prompt = np.array([[T.CLS, 7, 8, 9, T.SEP]] * 3)  # "a picture of"-style prompt, same for the batch
    for kwargs, beams in (({}, 1), ({"input_ids": prompt}, 2)):
        with torch.no_grad():
            tkw = {k: torch.tensor(v) for k, v in kwargs.items()}
            r = hf.generate(pixel_values=torch.tensor(px), max_length=9, num_beams=beams, **tkw).numpy()
        o = B.generate(model, params, _nhwc(px), kwargs.get("input_ids"), max_length=9, num_beams=beams)
        assert o.shape == r.shape and (o == r).all(), (kwargs, beams, r.tolist(), o.tolist())


# ------------------------------------------------------------------------------------------------ converters

def _tensors(folder):
    infos = st.list_tensors(folder)
    out = {}
    for name, info in infos.items():
        out[name] = st.load_tensor(info.file, name)
    return out


def test_round_trip_is_bit_identical(vqa, tmp_path):
    _, folder, _, params, meta, _ = vqa
    out = save_hf_folder(str(tmp_path / "rt"), params, meta, folder)
    a, b = _tensors(folder), _tensors(out)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert st.read_metadata(os.path.join(out, "model.safetensors")) == st.read_metadata(
        os.path.join(folder, "model.safetensors"))


def test_sharded_half_precision_with_tied_copies(vqa, tmp_path):
    """An older-style checkpoint: float16, two shards, the tied LM-head copies saved. Round trip is bit-identical,
    and after an edit of the embeddings the tied copy is written from its source."""
    hf, folder, _, _, _, _ = vqa
    state = {k: v.detach().numpy().astype(np.float16) for k, v in hf.state_dict().items()}
    assert "text_decoder.cls.predictions.decoder.weight" in state
    src = tmp_path / "sharded"
    src.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "preprocessor_config.json"):
        if os.path.exists(os.path.join(folder, name)):
            (src / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        st.save_file({k: state[k] for k in names}, str(src / shard), metadata={"format": "pt"})
    (src / st.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": {k: s for s, ns in shards.items()
                                                                                  for k in ns}}))
    kind, _, params, meta = load_hf_folder(str(src), dtype=None)
    assert kind == "blip_vqa" and meta.ties
    out = save_hf_folder(str(tmp_path / "out"), params, meta, str(src))
    a, b = _tensors(str(src)), _tensors(out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float16 and a[k].tobytes() == b[k].tobytes(), k
    emb = params["text_decoder"]["bert"]["embeddings"]["word_embeddings"]
    emb["embedding"] = (emb["embedding"].astype(np.float32) + 1.0).astype(np.float16)
    params["text_decoder"]["cls"]["predictions"]["bias"] = params["text_decoder"]["cls"]["predictions"]["bias"] * 0
    edited = _tensors(save_hf_folder(str(tmp_path / "edited"), params, meta, str(src)))
    np.testing.assert_array_equal(edited["text_decoder.cls.predictions.decoder.weight"],
                                  edited["text_decoder.bert.embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(edited["text_decoder.cls.predictions.decoder.bias"], 0)


def test_unsupported_blip_architecture_is_a_clear_error(vqa, tmp_path):
    from converters.hf import ConversionError

    _, folder, _, _, _, _ = vqa
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["architectures"] = ["BlipForImageTextRetrieval"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes(open(os.path.join(folder, "model.safetensors"), "rb").read())
    with pytest.raises(ConversionError, match="BlipForImageTextRetrieval"):
        load_hf_folder(str(bad))


# ------------------------------------------------------------------------------------------------ capture

# Modules whose inputs are image tokens (all rows count); every other hooked module reads text (padding dropped).
_IMAGE_INPUT = ("vision_model.", "text_encoder.encoder.layer.0.crossattention.self.key",
                "text_encoder.encoder.layer.1.crossattention.self.value")
_HOOKED = ["vision_model.encoder.layers.0.self_attn.qkv", "vision_model.encoder.layers.1.mlp.fc2",
           "vision_model.encoder.layers.0.layer_norm1", "vision_model.post_layernorm",
           "text_encoder.encoder.layer.0.crossattention.self.key",
           "text_encoder.encoder.layer.1.crossattention.self.value",
           "text_encoder.encoder.layer.1.attention.self.query", "text_encoder.embeddings.LayerNorm",
           "text_decoder.bert.encoder.layer.0.crossattention.self.value",
           "text_decoder.bert.encoder.layer.1.crossattention.output.LayerNorm",
           "text_decoder.bert.encoder.layer.1.output.dense", "text_decoder.cls.predictions.transform.dense"]


def _torch_reference(hf, px, ids, mask, dids):
    """Per hooked module, float64 sums from PyTorch forward hooks: ``(count, gram or Σx̂²)``."""
    calls: dict[str, list] = {n: [] for n in _HOOKED}
    modules = dict(hf.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: calls[n].append(i[0].detach().double().numpy()))
               for n in _HOOKED]
    with torch.no_grad():
        hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), attention_mask=torch.tensor(mask),
           decoder_input_ids=torch.tensor(dids), decoder_attention_mask=torch.tensor(mask))
    for h in handles:
        h.remove()
    ref = {}
    for name, xs in calls.items():
        image = name.startswith(_IMAGE_INPUT)
        rows = []
        for x in xs:
            keep = np.ones(x.shape[:-1], bool) if image else mask.astype(bool)
            rows.append(x[keep])
        x = np.concatenate(rows)
        if isinstance(modules[name], torch.nn.LayerNorm):
            xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + modules[name].eps)
            ref[name] = (len(x), (xhat ** 2).sum(0))
        else:
            ref[name] = (len(x), x.T @ x)
    return ref


def test_capture_equals_torch_hook_statistics(vqa):
    """Text padded to 17 tokens = the number of image tokens, so a mask applied by shape alone would wrongly drop
    image rows; the image-side rules keep them all."""
    from catmerge_jax.capture import capture_stats
    from catmerge_jax.tree import leaves_with_paths
    from catmerge_jax.stats import LeafStats

    hf, _, _, params, _, model = vqa
    px, ids, mask = _batch(seed=7, seq=17)
    dids = ids.copy()
    dids[:, 0] = T.DEC
    stats = capture_stats(B.blip_capture(model), params, _nhwc(px), ids, mask, token_mask=mask.astype(bool),
                          form="gram", batch_size=None)
    flat = dict(leaves_with_paths(stats, is_leaf=lambda x: isinstance(x, LeafStats)))
    ref = _torch_reference(hf, px, ids, mask, dids)
    for name, (count, value) in ref.items():
        path = name.replace(".", "/")
        leaf = "scale" if isinstance(dict(hf.named_modules())[name], torch.nn.LayerNorm) else "kernel"
        s = flat[f"{path}/{leaf}"]
        assert float(s.count) == count, name
        got = np.asarray(s.sq_sum if leaf == "scale" else s.gram, np.float64)
        np.testing.assert_allclose(got, value, rtol=1e-4, atol=1e-4 * np.abs(value).max(), err_msg=name)
        assert float(flat[f"{path}/bias"].count) == count
    # image tokens: 3 exemplars x 17 tokens; text rows: the real tokens only
    assert float(flat["text_encoder/encoder/layer/0/crossattention/self/key/kernel"].count) == 3 * 17
    assert float(flat["text_decoder/cls/predictions/bias"].count) == mask.sum()
    assert float(flat["vision_model/embeddings/patch_embedding/kernel"].count) == 3 * 16


# ------------------------------------------------------------------------------------------------ images, CLI

def test_image_preprocessing_matches_transformers_pil_processor(tmp_path):
    from PIL import Image
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from converters.blip import image_settings, load_image

    names = T.write_images(str(tmp_path), 3, seed=2)
    T.write_preprocessor(str(tmp_path), 32)
    settings = image_settings(str(tmp_path), 32)
    proc = BlipImageProcessorPil(size={"height": 32, "width": 32})
    for name in names:
        ours = load_image(str(tmp_path / name), settings)
        ref = np.asarray(proc(Image.open(tmp_path / name), return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def _write_exemplars(folder, names, texts, npy=None):
    lines = [json.dumps({"image": n, "text": t}) for n, t in zip(names, texts)]
    if npy is not None:
        lines.append(json.dumps({"image": npy, "text": "how many dogs"}))
    path = os.path.join(folder, "exemplars.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _perturbed_task(base_folder, out, seed):
    from converters.hf import load_hf_folder as load

    _, _, params, meta = load(base_folder)
    rng = np.random.default_rng(seed)
    import jax

    params = jax.tree.map(lambda w: (w + 0.02 * rng.standard_normal(w.shape)).astype(np.float32), params)
    return save_hf_folder(out, params, meta, base_folder)


def test_cli_roles_and_merge_every_method(vqa, tmp_path, capsys):
    from catmerge_jax.cli import main
    from catmerge_jax.pipeline import load_tasks, read_exemplars

    _, base, _, params, _, _ = vqa
    assert main(["roles", "--base", base]) == 0
    table = capsys.readouterr().out
    for path, role in (("text_decoder/bert/encoder/layer/1/crossattention/self/key/kernel", "linear"),
                       ("vision_model/encoder/layers/0/self_attn/qkv/kernel", "linear"),
                       ("vision_model/embeddings/patch_embedding/kernel", "linear"),
                       ("text_encoder/encoder/layer/0/output/LayerNorm/scale", "scale"),
                       ("text_decoder/cls/predictions/bias", "shift"),
                       ("vision_model/embeddings/class_embedding", "other")):
        assert any(line.split()[:2] == [path, role] for line in table.splitlines()), path
    tasks = [_perturbed_task(base, str(tmp_path / f"task{k}"), seed=10 + k) for k in range(2)]
    exemplar_files = []
    for k in range(2):
        d = tmp_path / f"ex{k}"
        names = T.write_images(str(d), 3, seed=20 + k)
        np.save(d / "pre.npy", np.random.default_rng(k).normal(size=(32, 32, 3)).astype(np.float32))
        exemplar_files.append(_write_exemplars(str(d), names, ["what is the color of the cat", "how many",
                                                             "is the sky blue"], npy="pre.npy"))
    w0 = params["text_encoder"]["encoder"]["layer"]["0"]["crossattention"]["self"]["key"]["kernel"]
    ts = [load_hf_folder(t)[2]["text_encoder"]["encoder"]["layer"]["0"]["crossattention"]["self"]["key"]["kernel"]
          - w0 for t in tasks]
    # Through the command line (folders in, folder out), one method per pipeline branch: statistics from capture
    # (CAT), Fishers from the forward pass (fisher), neither (task arithmetic, checked against W0 + a·ΣT), and no
    # exemplars at all (TIES, below). The other registered methods are pure pytree functions of the same inputs
    # (tested in their own files); running each on BLIP would add minutes and no BLIP code path.
    for method in ("cat", "fisher", "task_arithmetic"):
        out = str(tmp_path / f"merged_{method}")
        argv = ["merge", "--method", method, "--base", base, "--task", *tasks, "--exemplars", *exemplar_files,
                "--quiet", "--out", out]
        assert main(argv) == 0, (method, capsys.readouterr().err)
        kind, _, merged, _ = load_hf_folder(out)
        assert kind == "blip_vqa" and list(_tensors(out)) == list(_tensors(base))
        k = merged["text_encoder"]["encoder"]["layer"]["0"]["crossattention"]["self"]["key"]["kernel"]
        if method == "task_arithmetic":
            np.testing.assert_allclose(k, w0 + 0.3 * (ts[0] + ts[1]), atol=1e-6)
        if method == "cat":  # CAT trims the task vectors: not task arithmetic
            assert np.abs(k - (w0 + 0.3 * (ts[0] + ts[1]))).max() > 1e-6
    # the exemplar reader: 3 images + 1 .npy per task, text padded to a multiple of 16
    base_ckpt, _ = load_tasks(base, tasks)
    ex = read_exemplars(exemplar_files[0], base_ckpt)
    assert ex.inputs[0].shape == (4, 32, 32, 3) and ex.token_mask.shape == (4, 16)
    # methods that need no exemplars run without them
    out = str(tmp_path / "ta_noex")
    assert main(["merge", "--method", "ties", "--base", base, "--task", *tasks, "--quiet", "--out", out]) == 0
    # the merged folder loads in transformers and generates
    merged_hf = transformers.BlipForQuestionAnswering.from_pretrained(str(tmp_path / "merged_cat")).eval()
    assert merged_hf.generate(input_ids=torch.tensor([[T.CLS, 7, T.SEP]]),
                              pixel_values=torch.zeros(1, 3, 32, 32), max_length=5).shape[0] == 1


def test_bad_exemplar_line_is_one_line_error(vqa, tmp_path, capsys):
    from catmerge_jax.cli import main

    _, base, _, _, _, _ = vqa
    ex = tmp_path / "bad.jsonl"
    ex.write_text('{"image": "missing.png", "text": "what"}\n')
    code = main(["merge", "--method", "cat", "--base", base, "--task", base, "--exemplars", str(ex), "--quiet",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.png" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")
