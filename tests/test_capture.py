"""Generic feature capture: a toy linen model against a float64 NumPy reference, padding, rules, errors, and our
BERT against PyTorch forward hooks on Hugging Face's BertModel."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catmerge_jax.capture import (Captured, CaptureError, capture_stats, conv_patches, make_capture)
from catmerge_jax.roles import LeafSpec, Role
from catmerge_jax.stats import LeafStats
from catmerge_jax.tree import leaves_with_paths

B, S, D, V = 3, 5, 8, 11
RTOL, ATOL = 2e-5, 2e-5  # float32 forward + float32 sums vs float64 reference


class Toy(nn.Module):
    """Every capture rule at once: embedding, norms, a shared Dense, DenseGeneral both ways, a pooler on the
    first token (rows (B,) — never masked), a strided conv and a group norm on an image."""

    @nn.compact
    def __call__(self, ids, img):
        e = nn.Embed(V, D, name="embed")(ids)
        h = nn.LayerNorm(epsilon=1e-5, name="ln")(e)
        shared = nn.Dense(D, name="shared")
        h1 = shared(h)
        h2 = shared(jnp.tanh(h1))
        q = nn.DenseGeneral((2, 4), name="query")(h2)
        o = nn.DenseGeneral(6, axis=(-2, -1), name="out")(q)
        r = nn.RMSNorm(epsilon=1e-6, name="rms")(o)
        pooled = nn.Dense(5, name="pool")(r[:, 0])
        c = nn.Conv(4, (3, 3), strides=2, padding="SAME", name="conv")(img)
        g = nn.GroupNorm(num_groups=2, epsilon=1e-5, name="gn")(c)
        return pooled, g


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, S))
    img = rng.normal(size=(B, 7, 7, 3)).astype(np.float32)
    lengths = np.array([5, 3, 2])
    mask = np.arange(S)[None, :] < lengths[:, None]
    return ids, img, mask


@pytest.fixture(scope="module")
def toy():
    ids, img, mask = _inputs()
    model = Toy()
    params = jax.jit(model.init)(jax.random.key(1), jnp.asarray(ids), jnp.asarray(img))["params"]
    # non-trivial norm parameters so the reference would notice a mix-up of x̂ and the affine output
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), params)
    return model, params


def _np(params):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), params)


def _gram(rows):
    rows = np.asarray(rows, np.float64)
    return rows.T @ rows


def _reference(params, ids, img, mask):
    """The inputs of every layer, recomputed in float64 NumPy; returns {leaf path: (count, gram|None, sq|None)}."""
    p = _np(params)
    real = mask.reshape(-1)
    ref = {}

    def add(path, count, gram=None, sq=None):
        ref[path] = (count, gram, sq)

    n_tok = float(real.sum())
    e = p["embed"]["embedding"][ids]
    add("embed/embedding", n_tok)
    mu = e.mean(-1, keepdims=True)
    var = (e * e).mean(-1, keepdims=True) - mu * mu
    xhat = (e - mu) / np.sqrt(var + 1e-5)
    flat = xhat.reshape(-1, D)[real]
    add("ln/scale", n_tok, sq=(flat ** 2).sum(0))
    add("ln/bias", n_tok)
    h = xhat * p["ln"]["scale"] + p["ln"]["bias"]
    h1 = h @ p["shared"]["kernel"] + p["shared"]["bias"]
    t = np.tanh(h1)
    h2 = t @ p["shared"]["kernel"] + p["shared"]["bias"]
    shared_rows = np.concatenate([h.reshape(-1, D)[real], t.reshape(-1, D)[real]])
    add("shared/kernel", 2 * n_tok, gram=_gram(shared_rows))
    add("shared/bias", 2 * n_tok)
    q = np.einsum("bsi,ihd->bshd", h2, p["query"]["kernel"]) + p["query"]["bias"]
    add("query/kernel", n_tok, gram=_gram(h2.reshape(-1, D)[real]))
    add("query/bias", n_tok)
    qf = q.reshape(B, S, 8)
    o = qf @ p["out"]["kernel"].reshape(8, 6) + p["out"]["bias"]
    add("out/kernel", n_tok, gram=_gram(qf.reshape(-1, 8)[real]))
    add("out/bias", n_tok)
    rhat = o / np.sqrt((o * o).mean(-1, keepdims=True) + 1e-6)
    add("rms/scale", n_tok, sq=(rhat.reshape(-1, 6)[real] ** 2).sum(0))
    r = rhat * p["rms"]["scale"]
    add("pool/kernel", float(B), gram=_gram(r[:, 0]))
    add("pool/bias", float(B))
    # SAME padding, stride 2, window 3 on 7x7: 4x4 outputs, one zero row/column of padding each side.
    xp = np.pad(img.astype(np.float64), [(0, 0), (1, 1), (1, 1), (0, 0)])
    patches = np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :].reshape(B, -1) for j in range(4)], 1)
                        for i in range(4)], 1)                       # (B, 4, 4, 3*3*3), window-major
    conv_rows = patches.reshape(-1, 27)
    add("conv/kernel", float(conv_rows.shape[0]), gram=_gram(conv_rows))
    add("conv/bias", float(conv_rows.shape[0]))
    c = patches @ p["conv"]["kernel"].reshape(27, 4) + p["conv"]["bias"]
    cg = c.reshape(B, 4, 4, 2, 2)
    gm = cg.mean((1, 2, 4), keepdims=True)
    gv = (cg * cg).mean((1, 2, 4), keepdims=True) - gm * gm
    ghat = ((cg - gm) / np.sqrt(gv + 1e-5)).reshape(-1, 4)
    add("gn/scale", float(B * 16), sq=(ghat ** 2).sum(0))
    add("gn/bias", float(B * 16))
    return ref


def _assert_matches(stats, ref):
    got = dict(leaves_with_paths(stats, is_leaf=lambda x: isinstance(x, LeafStats)))
    assert set(got) == set(ref)
    for path, (count, gram, sq) in ref.items():
        s = got[path]
        assert float(s.count) == count, path
        if gram is not None:
            np.testing.assert_allclose(np.asarray(s.gram_matrix(), np.float64), gram, rtol=RTOL, atol=ATOL,
                                       err_msg=path)
        else:
            assert not s.has_linear, path
        if sq is not None:
            np.testing.assert_allclose(np.asarray(s.sq_sum, np.float64), sq, rtol=RTOL, atol=ATOL, err_msg=path)
        else:
            assert s.sq_sum is None, path


@pytest.mark.parametrize("form,batch_size", [("auto", 32), ("gram", 2), ("rows", 1), ("auto", 2)])
def test_toy_matches_numpy_reference(toy, form, batch_size):
    model, params = toy
    ids, img, mask = _inputs()
    stats = capture_stats(model, params, ids, img, token_mask=mask, form=form, batch_size=batch_size)
    _assert_matches(stats, _reference(params, ids, img, mask))


def test_forms(toy):
    model, params = toy
    ids, img, mask = _inputs()
    auto = capture_stats(model, params, ids, img, token_mask=mask)
    assert auto["pool"]["kernel"].rows is not None and auto["pool"]["kernel"].rows.shape == (B, 6)  # 3 rows < 6 in
    assert auto["shared"]["kernel"].gram is not None                                                # 20 rows > 8 in
    rows = capture_stats(model, params, ids, img, token_mask=mask, form="rows")
    assert rows["query"]["kernel"].rows.shape == (int(mask.sum()), D)                 # padding rows dropped
    gram = capture_stats(model, params, ids, img, token_mask=mask, form="gram")
    assert gram["pool"]["kernel"].gram.shape == (6, 6) and gram["pool"]["kernel"].rows is None


def test_padding_never_counts(toy):
    model, params = toy
    ids, img, mask = _inputs()
    other = np.where(mask, ids, (ids + 3) % V)                # different tokens at every padded position
    a = capture_stats(model, params, ids, img, token_mask=mask, form="gram")
    b = capture_stats(model, params, other, img, token_mask=mask, form="gram")
    for (p, x), (_, y) in zip(leaves_with_paths(a), leaves_with_paths(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6, err_msg=p)
    # without a mask every position counts
    c = capture_stats(model, params, ids, img)
    assert float(c["shared"]["kernel"].count) == 2 * B * S


def test_reusable_capture_and_batches_agree(toy):
    model, params = toy
    ids, img, mask = _inputs()
    cap = make_capture(model)
    one = capture_stats(cap, params, ids, img, token_mask=mask, batch_size=None, form="gram")
    two = capture_stats(cap, params, ids, img, token_mask=mask, batch_size=2, form="gram")
    for (p, x), (_, y) in zip(leaves_with_paths(one), leaves_with_paths(two)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=p)


class Proj(nn.Module):
    """A DenseGeneral named 'proj', not one of Flax's attention projection names."""

    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral((2, 4), name="proj")(x)


def test_roles_check_catches_misread_kernels():
    """The kernel (8, 2, 4) defaults to in_axes=2 (a (16, 4) matrix) but its layer receives 8 features."""
    x = np.random.default_rng(6).normal(size=(2, 3, D)).astype(np.float32)
    params = Proj().init(jax.random.key(0), x)["params"]
    with pytest.raises(CaptureError, match="proj/kernel.*in_axes=2"):
        capture_stats(Proj(), params, x)
    stats = capture_stats(Proj(), params, x, roles={"proj/kernel": LeafSpec(Role.LINEAR, in_axes=1)})
    np.testing.assert_allclose(stats["proj"]["kernel"].gram_matrix(), _gram(x.reshape(-1, D)), rtol=1e-5, atol=1e-5)


def test_conv_patches_reproduce_the_convolution():
    rng = np.random.default_rng(3)
    cases = [
        (nn.Conv(5, (3, 2), strides=(2, 1), padding="SAME"), (2, 6, 5, 3)),
        (nn.Conv(4, (3, 3), padding="VALID", kernel_dilation=2), (1, 9, 8, 2)),
        (nn.Conv(4, (3, 3), padding="CIRCULAR", strides=2), (2, 5, 5, 2)),
        (nn.Conv(3, (2, 2), padding=((1, 0), (0, 1)), input_dilation=2), (1, 4, 4, 2)),
        (nn.Conv(3, (3,), padding="CAUSAL"), (2, 7, 4)),
        (nn.Conv(3, (4, 4), strides=4, padding="VALID", use_bias=False), (2, 8, 8, 3)),  # a ViT patch embedding
    ]
    for conv, shape in cases:
        x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
        variables = jax.jit(conv.init)(jax.random.key(0), x)
        y = jax.jit(conv.apply)(variables, x)
        pat = jax.jit(lambda v: conv_patches(conv, v))(x)
        k = variables["params"]["kernel"]
        out = np.asarray(pat, np.float64) @ np.asarray(k, np.float64).reshape(-1, k.shape[-1])
        if "bias" in variables["params"]:
            out = out + np.asarray(variables["params"]["bias"], np.float64)
        np.testing.assert_allclose(out, np.asarray(y, np.float64), rtol=1e-4, atol=1e-4, err_msg=str(conv))


class BNNet(nn.Module):
    train: bool = False

    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=not self.train, epsilon=1e-3, name="bn")(nn.Dense(4, name="d")(x))


def test_batchnorm_inference_and_training_error():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    variables = BNNet().init(jax.random.key(0), x)
    params = variables["params"]
    mean, var = rng.normal(size=4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    stats = capture_stats(BNNet(), params, x, extra_variables={"batch_stats": {"bn": {"mean": mean, "var": var}}})
    h = x.astype(np.float64) @ np.asarray(params["d"]["kernel"], np.float64) + np.asarray(params["d"]["bias"])
    xhat = (h - mean) / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(stats["bn"]["scale"].sq_sum, (xhat ** 2).sum(0), rtol=1e-5)
    assert float(stats["bn"]["bias"].count) == 6
    with pytest.raises(CaptureError, match="bn.*inference mode"):
        capture_stats(BNNet(train=True), params, x, extra_variables={"batch_stats": variables["batch_stats"]})


class Custom(nn.Module):
    """A user's layer that makes its own kernel with self.param: no built-in rule knows it."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], 2))
        return x @ w


def test_custom_rule_and_unseen_leaves():
    x = np.random.default_rng(5).normal(size=(4, 3, 6)).astype(np.float32)
    params = Custom().init(jax.random.key(0), x)["params"]
    plain = capture_stats(Custom(), params, x)
    assert float(plain["w"].count) == 0 and not plain["w"].has_linear

    def rule(module, args, kwargs):
        return Captured(rows_shape=args[0].shape[:-1], linear={"w": args[0]})

    stats = capture_stats(Custom(), params, x, rules={Custom: rule}, form="gram")
    np.testing.assert_allclose(stats["w"].gram, _gram(x.reshape(-1, 6)), rtol=1e-5, atol=1e-5)
    assert float(stats["w"].count) == 12


def test_lifted_transform_is_captured():
    """Modules inside a lifted transform (here nn.remat) are captured (tests/test_capture_scan.py covers scan/vmap)."""
    class Remat(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.remat(nn.Dense)(3, name="d")(x)

    x = np.random.default_rng(7).normal(size=(4, 3)).astype(np.float32)
    params = Remat().init(jax.random.key(0), x)["params"]
    stats = capture_stats(Remat(), params, x, form="gram")
    np.testing.assert_allclose(stats["d"]["kernel"].gram, _gram(x), rtol=1e-5, atol=1e-5)
    assert float(stats["d"]["kernel"].count) == 4


def test_bad_inputs():
    x = np.ones((2, 3), np.float32)
    model = nn.Dense(2)
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(CaptureError, match="leading exemplar axis"):
        capture_stats(model, params, x, token_mask=np.ones((3,), bool))
    with pytest.raises(CaptureError, match="zero exemplars"):
        capture_stats(model, params, np.ones((0, 3), np.float32))
    with pytest.raises(ValueError, match="form"):
        capture_stats(model, params, x, form="dense")


def test_bert_matches_pytorch_hooks():
    """Our BERT's captured stats equal those from forward hooks on transformers' BertModel (same weights)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from converters.hf import build_flax_model, hf_state_to_flax

    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm affines
        for name, p in hf.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    kind, params, meta = hf_state_to_flax(state, cfg.to_dict())
    model = build_flax_model(kind, cfg.to_dict(), meta)

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 40, (3, 9))
    mask = (np.arange(9)[None] < np.array([[9], [6], [3]])).astype(np.int64)
    ids[:, 0] = 2
    ids = np.where(mask > 0, ids, 0)
    types = np.zeros_like(ids)

    real = torch.tensor(mask.reshape(-1) > 0)
    ref: dict[str, dict] = {}

    def rows_of(x):
        x = x.detach().double()
        if x.dim() == 3:                      # token-level input: drop padding
            return x.reshape(-1, x.shape[-1])[real]
        return x                              # pooler: one row per sequence

    def linear_hook(name):
        def hook(module, args):
            x = rows_of(args[0])
            r = ref.setdefault(name + "/kernel", {"gram": 0, "count": 0})
            r["gram"] = r["gram"] + (x.T @ x).numpy()
            r["count"] += x.shape[0]
        return hook

    def norm_hook(name, eps):
        def hook(module, args):
            x = args[0].detach().double()
            xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
            xhat = rows_of(xhat)
            ref[name + "/scale"] = {"sq": (xhat ** 2).sum(0).numpy(), "count": xhat.shape[0]}
        return hook

    for name, module in hf.named_modules():
        path = name.replace(".", "/")
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(linear_hook(path))
        elif isinstance(module, torch.nn.LayerNorm):
            module.register_forward_pre_hook(norm_hook(path, module.eps))
    with torch.no_grad():
        hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))

    stats = capture_stats(model, params, ids, mask, types, token_mask=mask.astype(bool), form="gram", batch_size=2)
    got = dict(leaves_with_paths(stats, is_leaf=lambda x: isinstance(x, LeafStats)))
    assert len(ref) == 2 * 6 + 1 + 2 * 2 + 1    # 12 encoder Linear + pooler, 4 encoder LayerNorm + embeddings
    for path, r in ref.items():
        s = got[path]
        assert float(s.count) == r["count"], path
        if "gram" in r:
            np.testing.assert_allclose(s.gram, r["gram"], rtol=1e-4, atol=1e-4 * np.abs(r["gram"]).max(),
                                       err_msg=path)
        else:
            np.testing.assert_allclose(s.sq_sum, r["sq"], rtol=1e-4, atol=1e-4, err_msg=path)
    assert float(got["encoder/layer/0/attention/self/query/bias"].count) == mask.sum()
    assert float(got["pooler/dense/bias"].count) == 3
    assert float(got["embeddings/word_embeddings/embedding"].count) == mask.sum()


class Odd(nn.Module):
    """A DenseGeneral contracting a middle axis, and a LayerNorm without scale."""

    @nn.compact
    def __call__(self, x):                                      # x: (b, 4, s, 3)
        y = nn.DenseGeneral(5, axis=1, name="mid")(x)            # contracts the 4-axis -> (b, s, 3, 5)
        return nn.LayerNorm(use_scale=False, name="ln")(y)


def test_middle_axis_dense_general_and_scaleless_norm():
    x = np.random.default_rng(7).normal(size=(2, 4, 3, 3)).astype(np.float32)
    params = Odd().init(jax.random.key(0), x)["params"]
    mask = np.array([[True, True, False], [True, False, False]])   # (b, s): rows (b, s, 3) start with it
    stats = capture_stats(Odd(), params, x, token_mask=mask, form="gram")
    rows = np.moveaxis(x, 1, -1)                                 # (b, s, 3, 4): features last
    keep = np.broadcast_to(mask[:, :, None], rows.shape[:-1])
    np.testing.assert_allclose(stats["mid"]["kernel"].gram, _gram(rows[keep]), rtol=1e-5, atol=1e-5)
    assert float(stats["mid"]["kernel"].count) == keep.sum() == 9
    assert set(stats["ln"]) == {"bias"} and float(stats["ln"]["bias"].count) == 9
