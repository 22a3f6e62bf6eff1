"""Decoder families (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2) against transformers' PyTorch models.

Tiny random models of each family are made with transformers (every weight perturbed, so Gemma's norm weights
are not all zero and ``1 + w`` is tested), saved as Hugging Face folders and read back by our converter. Checked:
logits on a right-padded batch at the real tokens (float32, ≤ 1e-4 relative to the largest logit), greedy
generation from a left-padded batch token for token, RoPE inverse frequencies (Llama 3 scaling), bit-identical
round trips of the state dict (bf16, sharded, a tied head that a file still carries) and one-line config errors.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from catmerge_jax.models.decoder import DecoderConfig, generate, rope_inv_freq
from converters import safetensors_io as st
from converters.hf import ConversionError, build_flax_model, load_hf_folder, save_hf_folder

TOL32 = 1e-4
SMALL = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# Each family with the settings that exercise its switches: Llama 3 RoPE scaling (head_dim 8 puts one frequency in
# each of the three bands), a 3-slot sliding window over 7 tokens (Mistral, Gemma 2's even layers), Qwen2's q/k/v
# biases, Qwen3's q/k norms with a tied head, Gemma's x̂(1 + w), √d embeddings and tied head, Gemma 2's soft-caps
# (low caps so they bite) and query_pre_attn_scalar.
FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, attention_bias=True)),
    "mistral": ("MistralConfig", dict(sliding_window=3)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", dict(sliding_window=3, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=3.0)),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny random ``*ForCausalLM`` of ``family`` (eager attention), every parameter perturbed by N(0, 0.1²)."""
    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**SMALL, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for family in FAMILIES:
        model = make_hf_model(family)
        model.save_pretrained(root / family)
        out[family] = (model, str(root / family))
    return out


IDS = np.random.default_rng(0).integers(3, 100, (2, 7))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_generation_match_transformers(folders, family):
    hf, folder = folders[family]
    kind, config, params, meta = load_hf_folder(folder)
    assert kind == family
    model = build_flax_model(kind, config, meta)
    mask = np.ones_like(IDS)
    mask[1, 5:] = 0                                                   # right padding: two pad tokens
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, IDS, mask).logits)
    real = mask.astype(bool)
    err = np.abs(got - want)[real].max() / np.abs(want[real]).max()
    assert err <= TOL32, err

    prompt = IDS[:, :4]
    prompt_mask = np.ones_like(prompt)
    prompt_mask[1, :2] = 0                                            # left padding, as HF generates from
    with torch.no_grad():
        want_ids = hf.generate(input_ids=torch.tensor(prompt), attention_mask=torch.tensor(prompt_mask),
                               do_sample=False, max_new_tokens=5).numpy()
    got_ids = generate(model, params, prompt, prompt_mask, max_new_tokens=5)
    assert got_ids.shape == want_ids.shape and (got_ids == want_ids).all(), (got_ids, want_ids)


def test_rope_inverse_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope in (LLAMA3_ROPE, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}):
        hf_config = transformers.LlamaConfig(**{**SMALL, "head_dim": 64}, rope_parameters=dict(rope))
        want, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config)
        config = DecoderConfig.from_hf_config(hf_config.to_dict())
        np.testing.assert_allclose(rope_inv_freq(config), want.numpy(), rtol=2e-7, atol=0)
        assert scaling == 1.0


def _tensors(folder):
    infos = st.list_tensors(folder)
    return {name: st.load_tensor(info.file, name) for name, info in infos.items()}


def test_round_trip_is_bit_identical_bf16_sharded(tmp_path):
    hf = make_hf_model("qwen2", seed=1).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "in", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "in" / st.INDEX_NAME)
    before = _tensors(tmp_path / "in")
    for dtype in (None, np.float32):                                  # native bf16 leaves, and float32 leaves
        kind, config, params, meta = load_hf_folder(str(tmp_path / "in"), dtype=dtype)
        out = save_hf_folder(str(tmp_path / f"out_{dtype is None}"), params, meta, str(tmp_path / "in"))
        after = _tensors(out)
        assert list(after) == list(before)
        for name, value in before.items():
            assert after[name].dtype == value.dtype and after[name].tobytes() == value.tobytes(), name
        index = json.loads((tmp_path / "in" / st.INDEX_NAME).read_text())["weight_map"]
        assert json.loads(open(os.path.join(out, st.INDEX_NAME)).read())["weight_map"] == index
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16


def test_a_tied_head_a_file_carries_stays_tied(tmp_path):
    hf = make_hf_model("gemma", seed=2)
    hf.save_pretrained(tmp_path / "in")
    state = _tensors(tmp_path / "in")
    assert "lm_head.weight" not in state                              # transformers leaves the tied copy out
    state["lm_head.weight"] = state["model.embed_tokens.weight"].copy()   # older files carried it
    st.save_file(state, str(tmp_path / "in" / "model.safetensors"), metadata={"format": "pt"})
    kind, config, params, meta = load_hf_folder(str(tmp_path / "in"))
    assert "lm_head" not in params and meta.ties == {"lm_head.weight": "model.embed_tokens.weight"}
    params["model"]["embed_tokens"]["embedding"] = params["model"]["embed_tokens"]["embedding"] + 1.0
    out = _tensors(save_hf_folder(str(tmp_path / "out"), params, meta, str(tmp_path / "in")))
    np.testing.assert_array_equal(out["lm_head.weight"], state["model.embed_tokens.weight"] + 1.0)
    np.testing.assert_array_equal(out["lm_head.weight"], out["model.embed_tokens.weight"])


def test_bad_configs_are_one_line_errors(tmp_path):
    hf = make_hf_model("llama", seed=3)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, words in [({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
                           ["rope_type 'yarn'"]),
                          ({"num_hidden_layers": 3}, ["num_hidden_layers=3", "2 layer(s)"]),
                          ({"num_key_value_heads": 3}, ["num_attention_heads 4", "num_key_value_heads 3"])]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConversionError) as info:
            load_hf_folder(str(tmp_path))
        message = str(info.value)
        assert "\n" not in message and all(w in message for w in words), message
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = _tensors(tmp_path)
    del state["lm_head.weight"]                                       # an untied head that is missing
    st.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="lacks key 'lm_head.weight'.*tie_word_embeddings=false"):
        load_hf_folder(str(tmp_path))
