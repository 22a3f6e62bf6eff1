"""nnx and equinox models: capture against a float64 NumPy reference (and against linen on the same weights),
roles from module types, the bridges, clear errors, and the same merge whichever framework holds the network."""

from __future__ import annotations

import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import catmerge_jax as cm
from catmerge_jax.capture import CaptureError, capture_stats
from catmerge_jax.modules import split_params, stacked_spec
from catmerge_jax.roles import LeafSpec, Role
from catmerge_jax.stats import LeafStats, is_leaf_stats
from catmerge_jax.tree import leaves_with_paths

B, S, V, D, H, O = 4, 5, 11, 6, 8, 5
LN_EPS, RMS_EPS = 1e-5, 1e-6


def _weights(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    g = lambda *shape, s=0.5: (s * rng.normal(size=shape)).astype(dtype)
    return {"embed": g(V, D, s=1.0), "w1": g(D, H), "b1": g(H, s=0.1), "ln_s": 1 + g(H, s=0.1), "ln_b": g(H, s=0.1),
            "w2": g(H, O), "b2": g(O, s=0.1), "rms_s": 1 + g(O, s=0.1)}


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embed")(ids)
        h = nn.relu(nn.Dense(H, name="fc1")(x))
        h = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name="ln")(h)
        return nn.RMSNorm(epsilon=RMS_EPS, name="rms")(nn.Dense(O, name="fc2")(h))


def linen_params(w):
    return {"embed": {"embedding": w["embed"]}, "fc1": {"kernel": w["w1"], "bias": w["b1"]},
            "ln": {"scale": w["ln_s"], "bias": w["ln_b"]}, "fc2": {"kernel": w["w2"], "bias": w["b2"]},
            "rms": {"scale": w["rms_s"]}}


class NnxNet(nnx.Module):
    def __init__(self, w):
        rngs = nnx.Rngs(0)
        dt = w["w1"].dtype
        self.embed = nnx.Embed(V, D, rngs=rngs, param_dtype=dt)
        self.fc1 = nnx.Linear(D, H, rngs=rngs, param_dtype=dt)
        self.ln = nnx.LayerNorm(H, epsilon=LN_EPS, use_fast_variance=False, rngs=rngs, param_dtype=dt)
        self.fc2 = nnx.Linear(H, O, rngs=rngs, param_dtype=dt)
        self.rms = nnx.RMSNorm(O, epsilon=RMS_EPS, rngs=rngs, param_dtype=dt)

    @classmethod
    def of(cls, w):
        """Built abstractly (no random initialisation to run), then given the weights ``w``."""
        net = nnx.eval_shape(lambda: cls(w))
        net.load(w)
        return net

    def load(self, w):
        for mod, name, key in [(self.embed, "embedding", "embed"), (self.fc1, "kernel", "w1"), (self.fc1, "bias", "b1"),
                               (self.ln, "scale", "ln_s"), (self.ln, "bias", "ln_b"), (self.fc2, "kernel", "w2"),
                               (self.fc2, "bias", "b2"), (self.rms, "scale", "rms_s")]:
            setattr(mod, name, nnx.Param(jnp.asarray(w[key])))

    def __call__(self, ids):
        h = self.ln(jax.nn.relu(self.fc1(self.embed(ids))))
        return self.rms(self.fc2(h))


class EqxNet(eqx.Module):
    """The same network, equinox style: one example ``(S,)`` at a time, layers vmapped over tokens."""

    embed: eqx.nn.Embedding
    fc1: eqx.nn.Linear
    ln: eqx.nn.LayerNorm
    fc2: eqx.nn.Linear
    rms: eqx.nn.RMSNorm

    def __init__(self, w):
        k = jax.random.split(jax.random.key(0), 3)
        a = eqx.filter_eval_shape  # layers built abstractly (no random initialisation to run), then given w
        self.embed = eqx.nn.Embedding(weight=jnp.asarray(w["embed"]))
        self.fc1 = eqx.tree_at(lambda m: (m.weight, m.bias), a(eqx.nn.Linear, D, H, key=k[0]),
                               (jnp.asarray(w["w1"].T), jnp.asarray(w["b1"])))
        self.ln = eqx.tree_at(lambda m: (m.weight, m.bias), a(eqx.nn.LayerNorm, H, eps=LN_EPS),
                              (jnp.asarray(w["ln_s"]), jnp.asarray(w["ln_b"])))
        self.fc2 = eqx.tree_at(lambda m: (m.weight, m.bias), a(eqx.nn.Linear, H, O, key=k[1]),
                               (jnp.asarray(w["w2"].T), jnp.asarray(w["b2"])))
        self.rms = eqx.tree_at(lambda m: m.weight, a(eqx.nn.RMSNorm, O, eps=RMS_EPS, use_bias=False),
                               jnp.asarray(w["rms_s"]))

    def __call__(self, ids):
        h = jax.vmap(self.ln)(jax.nn.relu(jax.vmap(self.fc1)(jax.vmap(self.embed)(ids))))
        return jax.vmap(self.rms)(jax.vmap(self.fc2)(h))


# leaf names per framework, in the linen spelling
NAMES = {
    "linen": {p: p for p in ["embed/embedding", "fc1/kernel", "fc1/bias", "ln/scale", "ln/bias", "fc2/kernel",
                             "fc2/bias", "rms/scale"]},
    "nnx": {p: p for p in ["embed/embedding", "fc1/kernel", "fc1/bias", "ln/scale", "ln/bias", "fc2/kernel",
                           "fc2/bias", "rms/scale"]},
    "eqx": {"embed/embedding": "embed/weight", "fc1/kernel": "fc1/weight", "fc1/bias": "fc1/bias",
            "ln/scale": "ln/weight", "ln/bias": "ln/bias", "fc2/kernel": "fc2/weight", "fc2/bias": "fc2/bias",
            "rms/scale": "rms/weight"},
}


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, S))
    mask = np.arange(S)[None, :] < np.array([5, 3, 1, 4])[:, None]
    return ids, mask


def _reference(w, ids, mask):
    """Every layer's input statistics in float64 NumPy: ``{linen path: (count, gram | None, sq_sum | None)}``."""
    m = mask.reshape(-1)
    n = float(m.sum())
    x = w["embed"][ids].reshape(-1, D)
    h = np.maximum(x @ w["w1"] + w["b1"], 0)
    xhat = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + LN_EPS)
    hn = xhat * w["ln_s"] + w["ln_b"]
    y = hn @ w["w2"] + w["b2"]
    rhat = y / np.sqrt((y * y).mean(-1, keepdims=True) + RMS_EPS)
    gram = lambda r: r[m].T @ r[m]
    sq = lambda r: (r[m] ** 2).sum(0)
    return {"embed/embedding": (n, None, None), "fc1/kernel": (n, gram(x), None), "fc1/bias": (n, None, None),
            "ln/scale": (n, None, sq(xhat)), "ln/bias": (n, None, None), "fc2/kernel": (n, gram(hn), None),
            "fc2/bias": (n, None, None), "rms/scale": (n, None, sq(rhat))}


def _by_path(stats):
    return dict(leaves_with_paths(stats, is_leaf=is_leaf_stats))


def _capture(kind, w, ids, mask, **kw):
    if kind == "linen":
        return capture_stats(LinenNet(), linen_params(w), ids, token_mask=mask, **kw)
    if kind == "nnx":
        return capture_stats(NnxNet.of(w), ids, token_mask=mask, **kw)
    return capture_stats(EqxNet(w), ids, token_mask=mask, **kw)


@pytest.mark.parametrize("kind,form", [("linen", "gram"), ("nnx", "gram"), ("nnx", "rows"), ("eqx", "gram"),
                                       ("eqx", "rows")])
def test_capture_matches_numpy_reference(x64, kind, form):
    """Counts, Grams (both forms) and Σx̂² of every layer equal the float64 reference (padding never counts);
    so nnx and equinox capture the same statistics as linen on the same weights. The stats mirror the params:
    ``nnx.state(module, nnx.Param)`` / ``eqx.filter(module, eqx.is_inexact_array)``, same leaf paths."""
    w = _weights()
    ids, mask = _inputs()
    ref = _reference(w, ids, mask)
    stats = _capture(kind, w, ids, mask, form=form, batch_size=2 if form == "gram" else None)
    got = _by_path(stats)
    if kind == "nnx":
        assert list(got) == [p for p, _ in leaves_with_paths(nnx.state(NnxNet.of(w), nnx.Param))]
    if kind == "eqx":
        assert isinstance(stats, EqxNet)
        assert list(got) == [p for p, _ in leaves_with_paths(eqx.filter(EqxNet(w), eqx.is_inexact_array))]
    assert sorted(got) == sorted(NAMES[kind].values())
    for path, (count, gram, sq) in ref.items():
        s = got[NAMES[kind][path]]
        assert float(s.count) == count, (kind, path)
        if gram is not None:
            if form == "rows":
                assert s.rows is not None and s.rows.shape == (count, gram.shape[0])
            np.testing.assert_allclose(np.asarray(s.gram_matrix(), np.float64), gram, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{kind} {path}")
        if sq is not None:
            np.testing.assert_allclose(np.asarray(s.sq_sum, np.float64), sq, rtol=1e-5, err_msg=f"{kind} {path}")


def test_eqx_conv_and_attention_match_reference(x64):
    """An equinox Conv2d (weight (out, in, kh, kw), channel-first input) and MultiheadAttention's projections."""
    rng = np.random.default_rng(3)
    k = jax.random.split(jax.random.key(1), 2)

    class Net(eqx.Module):
        conv: eqx.nn.Conv2d
        attn: eqx.nn.MultiheadAttention

        def __call__(self, img, seq):
            return self.conv(img), self.attn(seq, seq, seq)

    net = Net(eqx.nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1, key=k[0], dtype=jnp.float64),
              eqx.nn.MultiheadAttention(2, 4, key=k[1], dtype=jnp.float64))
    img = rng.normal(size=(2, 3, 6, 5))
    seq = rng.normal(size=(2, 3, 4))
    stats = capture_stats(net, img, seq, form="gram")
    # reference patches: for every output position, the (in, kh, kw) window of the zero-padded input
    pad = np.pad(img, ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = [pad[n, :, i * 2:i * 2 + 3, j:j + 2].reshape(-1) for n in range(2) for i in range(3) for j in range(6)]
    rows = np.stack(rows)
    assert stats.conv.weight.count == rows.shape[0]
    np.testing.assert_allclose(stats.conv.weight.gram, rows.T @ rows, rtol=1e-5, atol=1e-5)
    # the convolution is that linear map on those patches, with the role's matrix view
    spec = split_params(net).roles["conv/weight"]
    y = np.asarray(jax.vmap(net.conv)(img)).transpose(0, 2, 3, 1).reshape(-1, 4)
    m = np.asarray(spec.matrices(net.conv.weight))[0]
    np.testing.assert_allclose(rows @ m + np.asarray(net.conv.bias).reshape(-1), y, rtol=1e-10, atol=1e-10)
    flat = seq.reshape(-1, 4)
    for name in ("query_proj", "key_proj", "value_proj"):
        np.testing.assert_allclose(getattr(stats.attn, name).weight.gram, flat.T @ flat, rtol=1e-5, atol=1e-6)
    assert stats.attn.output_proj.weight.count == 6


def test_default_roles_from_module_types():
    w = _weights(dtype=np.float32)
    expected = {"fc1/kernel": LeafSpec(Role.LINEAR, in_axes=1), "fc1/bias": LeafSpec(Role.SHIFT),
                "ln/scale": LeafSpec(Role.SCALE), "ln/bias": LeafSpec(Role.SHIFT),
                "embed/embedding": LeafSpec(Role.OTHER), "rms/scale": LeafSpec(Role.SCALE)}
    roles = split_params(NnxNet.of(w)).roles
    for path, spec in expected.items():
        assert roles[path] == spec, path
    roles = split_params(eqx.filter_eval_shape(EqxNet, w)).roles
    eqx_expected = {"fc1/weight": LeafSpec(Role.LINEAR, in_axes=1, out_first=True), "fc1/bias": LeafSpec(Role.SHIFT),
                    "ln/weight": LeafSpec(Role.SCALE), "ln/bias": LeafSpec(Role.SHIFT),
                    "embed/weight": LeafSpec(Role.OTHER), "rms/weight": LeafSpec(Role.SCALE)}
    for path, spec in eqx_expected.items():
        assert roles[path] == spec, path
    k = jax.random.key(0)
    n, e = nnx.eval_shape, eqx.filter_eval_shape
    table = [
        (n(lambda: nnx.LinearGeneral((2, 4), 6, axis=(-2, -1), rngs=nnx.Rngs(0))), "kernel",
         LeafSpec(Role.LINEAR, in_axes=2)),
        (n(lambda: nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))), "kernel", LeafSpec(Role.LINEAR, in_axes=1)),
        (n(lambda: nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))), "kernel", LeafSpec(Role.LINEAR, in_axes=3)),
        (n(lambda: nnx.BatchNorm(4, rngs=nnx.Rngs(0))), "scale", LeafSpec(Role.SCALE)),
        (e(eqx.nn.Conv2d, 3, 4, 3, key=k), "weight", LeafSpec(Role.LINEAR, in_axes=3, out_first=True)),
        (e(eqx.nn.Conv2d, 3, 4, 3, key=k), "bias", LeafSpec(Role.SHIFT)),
        (e(eqx.nn.Conv1d, 3, 4, 3, key=k), "weight", LeafSpec(Role.LINEAR, in_axes=2, out_first=True)),
        (e(eqx.filter_vmap(lambda kk: eqx.nn.Linear(3, 4, key=kk)), jax.random.split(k, 5)), "weight",
         LeafSpec(Role.LINEAR, in_axes=1, stack_axes=1, out_first=True)),
        (e(eqx.filter_vmap(lambda kk: eqx.nn.LayerNorm(4)), jax.random.split(k, 5)), "weight",
         LeafSpec(Role.SCALE, stack_axes=1)),
    ]
    for module, name, spec in table:
        assert split_params(module).roles[name] == spec, (type(module).__name__, name)
    # an eqx Linear's matrix view is the transposed weight: x @ matrix == module(x)
    lin = eqx.nn.Linear(3, 4, key=k)
    spec = split_params(lin).roles["weight"]
    x = np.arange(3.0, dtype=np.float32)
    # two float32 sums of 3 terms in any order: each within 3·u·Σ|terms| ≤ 3·u·3.6·|y| here (u = 2⁻²⁴)
    np.testing.assert_allclose(x @ np.asarray(spec.matrices(lin.weight))[0] + lin.bias, lin(x), rtol=1e-5)


def test_split_and_rebuild_round_trip():
    w = _weights(dtype=np.float32)
    ids, _ = _inputs()
    for model in (NnxNet.of(w), EqxNet(w)):
        mp = split_params(model)
        rebuilt = mp.rebuild(jax.tree.map(lambda x: 2 * x, mp.params))
        assert type(rebuilt) is type(model)
        again = split_params(rebuilt).params
        for (p, a), (_, b) in zip(leaves_with_paths(mp.params), leaves_with_paths(again)):
            np.testing.assert_array_equal(2 * np.asarray(a), np.asarray(b), err_msg=p)
    tree = linen_params(w)
    mp = split_params(tree)
    assert mp.params is tree and mp.roles is None and mp.rebuild(tree) is tree


def test_stacked_spec_from_statistics():
    stacked = LeafStats(count=np.ones(3, np.float32), gram=np.zeros((3, 8, 8), np.float32))
    assert stacked_spec(LeafSpec(Role.LINEAR, in_axes=2), stacked, (3, 8, 16)) == LeafSpec(Role.LINEAR, 1, 1)
    # a DenseGeneral "out" kernel (heads, head_dim, out) stacked: the captured width says two input axes
    out = LeafStats(count=np.ones(3, np.float32), gram=np.zeros((3, 8, 8), np.float32))
    assert stacked_spec(LeafSpec(Role.LINEAR, in_axes=3), out, (3, 2, 4, 6)) == LeafSpec(Role.LINEAR, 2, 1)
    assert stacked_spec(LeafSpec(Role.SCALE), LeafStats(count=np.ones((2, 3))), (2, 3, 5)) == \
        LeafSpec(Role.SCALE, stack_axes=2)
    unstacked = LeafStats(count=np.float32(4), gram=np.zeros((8, 8), np.float32))
    assert stacked_spec(LeafSpec(Role.LINEAR, in_axes=1), unstacked, (8, 16)) == LeafSpec(Role.LINEAR, 1)


def test_nnx_bridge_to_nnx_is_captured(x64):
    """A linen module wrapped with nnx.bridge.ToNNX is captured through the linen interceptor, at its nnx path."""
    from flax.nnx import bridge

    class Lin(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="d")(nn.LayerNorm(name="ln")(x))

    class Outer(nnx.Module):
        def __init__(self, x):
            self.inner = bridge.ToNNX(Lin(), rngs=nnx.Rngs(0))
            bridge.lazy_init(self.inner, x)
            self.head = nnx.Linear(3, 2, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.head(self.inner(x))

    x = np.random.default_rng(4).normal(size=(6, 5))
    model = Outer(jnp.asarray(x))
    stats = _by_path(capture_stats(model, x, form="gram"))
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(stats["inner/ln/scale"].sq_sum, (xhat ** 2).sum(0), rtol=1e-5)
    params = nnx.state(model, nnx.Param)
    p = {k: np.asarray(v) for k, v in leaves_with_paths(params)}
    h = xhat * p["inner/ln/scale"] + p["inner/ln/bias"]
    # the model runs in float32: rows off by δ relative move Gram entry ij by ≤ 2δ‖h_i‖‖h_j‖ (Cauchy–Schwarz), so
    # entries are compared on that scale, not their own (an entry near 0 has no relative accuracy)
    def assert_gram_close(got, want):
        scale = np.sqrt(np.outer(np.diag(want), np.diag(want)))
        np.testing.assert_allclose(np.asarray(got) / scale, want / scale, rtol=0, atol=1e-5)

    assert_gram_close(stats["inner/d/kernel"].gram, h.T @ h)
    y = h @ p["inner/d/kernel"] + p["inner/d/bias"]
    assert_gram_close(stats["head/kernel"].gram, y.T @ y)


def test_nothing_captured_warns():
    class Custom(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((3, 2)))

        def __call__(self, x):
            return x @ self.w[...]

    with pytest.warns(UserWarning, match="ran no module this capture knows"):
        capture_stats(Custom(), np.ones((2, 3), np.float32))


@pytest.mark.parametrize("kind", ["linen", "nnx", "eqx"])
def test_wrong_exemplar_width_names_the_layer(kind):
    x = np.ones((3, 7), np.float32)
    if kind == "linen":
        model = nn.Sequential([nn.Dense(4, name="first"), nn.Dense(2)])
        args = (model, model.init(jax.random.key(0), np.ones((1, 6)))["params"], x)
        layer = "layers_0"
    elif kind == "nnx":
        args = (nnx.Sequential(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1))), x)
        layer = "layers/0"
    else:
        args = (eqx.nn.Sequential([eqx.nn.Linear(6, 4, key=jax.random.key(0)),
                                   eqx.nn.Linear(4, 2, key=jax.random.key(1))]), x)
        layer = "layers/0"
    with pytest.raises(CaptureError, match=f"layer '{layer}': expects inputs of width 6 .* got width 7"):
        capture_stats(*args)


def test_unmatched_roles_pattern_warns():
    params = linen_params(_weights(dtype=np.float32))
    with pytest.warns(UserWarning, match="roles pattern 'encoder/\\*' matches no leaf"):
        cm.classify(params, {"encoder/*": "other", "ln/*": "other"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm.classify(params, {"ln/*": "other", "fc1/kernel": "linear"})


# ---------------------------------------------------------------------------------------------------------------
# End to end: the same network with the same weights, merged as linen, nnx or equinox, gives the same weights.


def _to_linen_layout(kind, merged):
    """A merged model of any kind → ``{linen path: array}`` (equinox Linear weights transposed back)."""
    if kind == "linen":
        return {p: np.asarray(v, np.float64) for p, v in leaves_with_paths(merged)}
    if kind == "nnx":
        assert isinstance(merged, NnxNet)
        flat = dict(leaves_with_paths(nnx.state(merged, nnx.Param)))
        return {p: np.asarray(flat[p], np.float64) for p in NAMES["nnx"]}
    assert isinstance(merged, EqxNet)
    flat = dict(leaves_with_paths(eqx.filter(merged, eqx.is_inexact_array)))
    out = {}
    for p, q in NAMES["eqx"].items():
        v = np.asarray(flat[q], np.float64)
        out[p] = v.T if p.endswith("kernel") else v
    return out


def _model(kind, w):
    return {"linen": lambda: linen_params(w), "nnx": lambda: NnxNet.of(w), "eqx": lambda: EqxNet(w)}[kind]()


def test_same_merge_in_linen_nnx_and_equinox(x64):
    w0 = _weights(seed=0)
    rng = np.random.default_rng(9)
    tasks = [{k: v + 0.05 * rng.normal(size=v.shape) for k, v in w0.items()} for _ in range(3)]
    exemplars = [_inputs(seed=20 + k) for k in range(3)]
    merged = {}
    for kind in ("linen", "nnx", "eqx"):
        stats = [_capture(kind, wk, ids, mask) for wk, (ids, mask) in zip(tasks, exemplars)]
        pre, fts = _model(kind, w0), [_model(kind, wk) for wk in tasks]
        merged[kind] = _to_linen_layout(kind, cm.cat_merge(pre, fts, stats, alpha=0.3, lam=5.0, c=2))
        ta = cm.task_arithmetic(pre, fts, alpha=0.3)
        assert type(ta) is type(pre)
    # CAT must have changed the linear leaves relative to task arithmetic, or the test would prove little
    ta = {p: w + 0.3 * sum(linen_params(t)[p.split("/")[0]][p.split("/")[1]] - w for t in tasks)
          for p, w in ((p, np.asarray(leaf)) for p, leaf in leaves_with_paths(linen_params(w0)))}
    assert np.abs(merged["linen"]["fc1/kernel"] - ta["fc1/kernel"]).max() > 1e-3
    for kind in ("nnx", "eqx"):
        for path, ref in merged["linen"].items():
            err = np.abs(merged[kind][path] - ref).max() / np.abs(ref).max()
            assert err <= 1e-4, (kind, path, err)
