"""Capture inside lifted transforms (nn.scan / nn.remat / nn.vmap, nnx.scan / nnx.remat / nnx.vmap, a jax.lax.scan
over stacked equinox layers): per-layer statistics equal the unrolled twin's and a float64 NumPy reference; stacked
statistics add and save; a scanned model and its unrolled twin give the same CAT merge."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import catmerge_jax as cm
from catmerge_jax.capture import capture_stats
from catmerge_jax.modules import split_params
from catmerge_jax.stats import LeafStats, load_stats, save_stats, stats_add
from catmerge_jax.tree import leaves_with_paths

L, B, S, D = 3, 4, 3, 5
EPS = 1e-5


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, S, D))
    mask = np.arange(S)[None, :] < np.array([3, 2, 1, 3])[:, None]
    return x, mask


def _layers(seed=1, dtype=np.float64):
    """Per-layer weights of ``x -> LayerNorm(tanh(x @ W + b))``: a list of L dicts."""
    rng = np.random.default_rng(seed)
    return [{"w": (0.6 * rng.normal(size=(D, D))).astype(dtype), "b": (0.1 * rng.normal(size=D)).astype(dtype),
             "s": (1 + 0.1 * rng.normal(size=D)).astype(dtype), "c": (0.1 * rng.normal(size=D)).astype(dtype)}
            for _ in range(L)]


def _reference(layers, x, mask):
    """Per layer: (count, Gram of the Dense input, Σ x̂² of the LayerNorm input) over real tokens, float64."""
    m = mask.reshape(-1)
    h = x.reshape(-1, D)
    out = []
    for p in layers:
        g = h[m].T @ h[m]
        z = np.tanh(h @ p["w"] + p["b"])
        zhat = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + EPS)
        out.append((float(m.sum()), g, (zhat[m] ** 2).sum(0)))
        h = zhat * p["s"] + p["c"]
    return out


def _check(stats_fc, stats_ln, ref, layer=None, rtol=1e-5):
    """Compare one layer (``layer`` index into stacked stats, or unstacked stats) with the reference."""
    pick = (lambda a: np.asarray(a)[layer]) if layer is not None else np.asarray
    count, g, sq = ref
    assert float(pick(stats_fc.count)) == count
    fc_gram = stats_fc.gram if stats_fc.gram is not None else np.swapaxes(stats_fc.rows, -1, -2) @ stats_fc.rows
    np.testing.assert_allclose(pick(fc_gram), g, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(pick(stats_ln.sq_sum), sq, rtol=rtol)


# ---------------------------------------------------------------------------------------------------------------
# linen


class Block(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, h, _):
        dense = (nn.remat(nn.Dense) if self.remat else nn.Dense)(D, name="fc")
        return nn.LayerNorm(epsilon=EPS, use_fast_variance=False, name="ln")(jnp.tanh(dense(h))), None


class Scanned(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, h):
        block = nn.scan(nn.remat(Block) if self.remat else Block, variable_axes={"params": 0},
                        split_rngs={"params": True}, length=L)
        return block(remat=self.remat, name="layers")(h, None)[0]


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, h):
        for i in range(L):
            h = Block(name=f"l{i}")(h, None)[0]
        return h


def linen_scanned_params(layers):
    stack = lambda k: np.stack([p[k] for p in layers])
    return {"layers": {"fc": {"kernel": stack("w"), "bias": stack("b")}, "ln": {"scale": stack("s"), "bias": stack("c")}}}


def linen_unrolled_params(layers):
    return {f"l{i}": {"fc": {"kernel": p["w"], "bias": p["b"]}, "ln": {"scale": p["s"], "bias": p["c"]}}
            for i, p in enumerate(layers)}


@pytest.mark.parametrize("remat", [False, True])
def test_linen_scan_and_remat_match_unrolled_and_reference(x64, remat):
    layers = _layers()
    x, mask = _inputs()
    ref = _reference(layers, x, mask)
    scanned = capture_stats(Scanned(remat=remat), linen_scanned_params(layers), x, token_mask=mask, batch_size=2,
                            form="gram")
    unrolled = capture_stats(Unrolled(), linen_unrolled_params(layers), x, token_mask=mask, batch_size=2, form="gram")
    fc, ln = scanned["layers"]["fc"], scanned["layers"]["ln"]
    assert fc["kernel"].count.shape == (L,) and fc["kernel"].gram.shape == (L, D, D) and ln["scale"].sq_sum.shape == (L, D)
    assert fc["bias"].count.shape == (L,) and ln["bias"].count.shape == (L,)
    for i in range(L):
        _check(fc["kernel"], ln["scale"], ref[i], layer=i)
        _check(unrolled[f"l{i}"]["fc"]["kernel"], unrolled[f"l{i}"]["ln"]["scale"], ref[i])


def test_linen_scan_rows_form_and_stacked_accumulation(x64):
    """Row form while a batch has fewer rows than inputs: rows (L, n, in) per layer; adding batches switches to
    the Gram once the rows outnumber the inputs, layer by layer."""
    layers = _layers()
    x, mask = _inputs()
    ref = _reference(layers, x, mask)
    stats = capture_stats(Scanned(), linen_scanned_params(layers), x, token_mask=mask, batch_size=1)
    fc = stats["layers"]["fc"]["kernel"]
    assert fc.gram is not None  # 9 real rows over four batches >= 5 inputs
    for i in range(L):
        _check(fc, stats["layers"]["ln"]["scale"], ref[i], layer=i)
    one = capture_stats(Scanned(), linen_scanned_params(layers), x[:1], token_mask=mask[:1])
    rows = one["layers"]["fc"]["kernel"]
    assert rows.rows is not None and rows.rows.shape == (L, 3, D) and rows.count.shape == (L,)
    two = stats_add(one, one)
    summed = two["layers"]["fc"]["kernel"]
    assert summed.gram is not None and summed.gram.shape == (L, D, D)
    np.testing.assert_allclose(summed.gram, 2 * np.swapaxes(rows.rows, -1, -2) @ rows.rows, rtol=1e-5)
    np.testing.assert_array_equal(summed.count, 2 * rows.count)


def test_stacked_stats_save_and_load(tmp_path):
    params = {"k": np.zeros((2, 3, 4), np.float32), "s": np.zeros((2, 4), np.float32)}
    stats = {"k": LeafStats(count=np.array([3.0, 4.0], np.float32), rows=np.arange(18, dtype=np.float32).reshape(2, 3, 3)),
             "s": LeafStats(count=np.array([1.0, 2.0], np.float32), sq_sum=np.ones((2, 4), np.float32))}
    save_stats(tmp_path / "s.npz", stats)
    back = load_stats(tmp_path / "s.npz", params)
    for (p, a), (_, b) in zip(leaves_with_paths(stats), leaves_with_paths(back)):
        np.testing.assert_array_equal(a, b, err_msg=p)
    g = back["k"].to_gram().gram
    r = stats["k"].rows.astype(np.float64)
    np.testing.assert_allclose(g, np.swapaxes(r, -1, -2) @ r, rtol=1e-6)


def test_linen_vmap_ensemble_gets_per_member_statistics(x64):
    """nn.vmap over stacked params (an ensemble of heads on the same input) and over the data axis."""

    class Heads(nn.Module):
        @nn.compact
        def __call__(self, h):
            heads = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                            axis_size=2)(3, name="heads")
            per_token = nn.vmap(nn.Dense, variable_axes={"params": None}, split_rngs={"params": False}, in_axes=0)
            return heads(h), per_token(4, name="shared")(h)

    x, mask = _inputs()
    shapes = jax.eval_shape(Heads().init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape), shapes)
    stats = capture_stats(Heads(), params, x, token_mask=mask, form="gram")
    real = x.reshape(-1, D)[mask.reshape(-1)]
    heads = stats["heads"]["kernel"]
    assert heads.gram.shape == (2, D, D)
    np.testing.assert_array_equal(heads.count, [9.0, 9.0])
    for i in range(2):
        np.testing.assert_allclose(heads.gram[i], real.T @ real, rtol=1e-5)
    # vmapped over the batch axis with shared params: one layer, every example's rows; the mask applies to
    # the leading (batch, seq) axes the vmapped calls make up together
    shared = stats["shared"]["kernel"]
    assert shared.count.shape == () and float(shared.count) == 9.0
    np.testing.assert_allclose(shared.gram, real.T @ real, rtol=1e-5)


def test_scanned_and_unrolled_linen_give_the_same_cat_merge(x64):
    base = _layers(seed=1)
    rng = np.random.default_rng(5)
    tasks = [[{k: v + 0.1 * rng.normal(size=v.shape) for k, v in layer.items()} for layer in base] for _ in range(3)]
    exemplars = [_inputs(seed=30 + k) for k in range(3)]
    merged = {}
    for name, model, to_params in (("scanned", Scanned(), linen_scanned_params),
                                   ("unrolled", Unrolled(), linen_unrolled_params)):
        stats = [capture_stats(model, to_params(t), x, token_mask=m) for t, (x, m) in zip(tasks, exemplars)]
        merged[name] = cm.cat_merge(to_params(base), [to_params(t) for t in tasks], stats, alpha=0.3, lam=5.0, c=2)
    ta = cm.task_arithmetic(linen_unrolled_params(base), [linen_unrolled_params(t) for t in tasks], alpha=0.3)
    assert np.abs(np.asarray(merged["unrolled"]["l1"]["fc"]["kernel"]) - np.asarray(ta["l1"]["fc"]["kernel"])).max() > 1e-3
    for i in range(L):
        for module, leaf in (("fc", "kernel"), ("fc", "bias"), ("ln", "scale"), ("ln", "bias")):
            a = np.asarray(merged["scanned"]["layers"][module][leaf])[i]
            b = np.asarray(merged["unrolled"][f"l{i}"][module][leaf])
            assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), (i, module, leaf)


# ---------------------------------------------------------------------------------------------------------------
# nnx


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs, param_dtype=jnp.float64)
        self.ln = nnx.LayerNorm(D, epsilon=EPS, use_fast_variance=False, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, h):
        return self.ln(jnp.tanh(self.fc(h)))


def _set(block, p):
    block.fc.kernel = nnx.Param(jnp.asarray(p["w"]))
    block.fc.bias = nnx.Param(jnp.asarray(p["b"]))
    block.ln.scale = nnx.Param(jnp.asarray(p["s"]))
    block.ln.bias = nnx.Param(jnp.asarray(p["c"]))


class NnxScanned(nnx.Module):
    def __init__(self, layers, remat=False):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxBlock(rngs)

        self.blocks = make(nnx.Rngs(0))
        _set(self.blocks, {k: np.stack([p[k] for p in layers]) for k in layers[0]})
        self.remat = remat

    @classmethod
    def of(cls, layers, remat=False):
        """Built abstractly (no random initialisation to run), then given the weights."""
        net = nnx.eval_shape(lambda: cls(layers, remat))
        _set(net.blocks, {k: np.stack([p[k] for p in layers]) for k in layers[0]})
        return net

    def __call__(self, h):
        def step(h, block):
            return (nnx.remat(lambda b, h: b(h))(block, h) if self.remat else block(h))

        return nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(h, self.blocks)


class NnxUnrolled(nnx.Module):
    def __init__(self, layers):
        self.blocks = nnx.List([NnxBlock(nnx.Rngs(i)) for i in range(L)])
        for block, p in zip(self.blocks, layers):
            _set(block, p)

    @classmethod
    def of(cls, layers):
        net = nnx.eval_shape(lambda: cls(layers))
        for block, p in zip(net.blocks, layers):
            _set(block, p)
        return net

    def __call__(self, h):
        for block in self.blocks:
            h = block(h)
        return h


@pytest.mark.parametrize("remat", [False, True])
def test_nnx_scan_and_remat_match_unrolled_and_reference(x64, remat):
    layers = _layers()
    x, mask = _inputs()
    ref = _reference(layers, x, mask)
    scanned = capture_stats(NnxScanned.of(layers, remat=remat), x, token_mask=mask, form="gram")
    unrolled = capture_stats(NnxUnrolled.of(layers), x, token_mask=mask, form="gram")
    for i in range(L):
        _check(scanned["blocks"]["fc"]["kernel"], scanned["blocks"]["ln"]["scale"], ref[i], layer=i)
        _check(unrolled["blocks"][i]["fc"]["kernel"], unrolled["blocks"][i]["ln"]["scale"], ref[i])
    roles = split_params(NnxScanned.of(layers)).roles
    assert roles["blocks/fc/kernel"] == cm.LeafSpec(cm.Role.LINEAR, in_axes=1, stack_axes=1)


def test_nnx_vmap_ensemble(x64):
    class Ens(nnx.Module):
        def __init__(self):
            @nnx.split_rngs(splits=2)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return nnx.Linear(D, 3, rngs=rngs, param_dtype=jnp.float64)

            self.heads = make(nnx.Rngs(0))

        def __call__(self, h):
            return nnx.vmap(lambda m, h: m(h), in_axes=(0, None))(self.heads, h)

    x, mask = _inputs()
    ens = nnx.eval_shape(Ens)  # abstract, then given weights: no random initialisation to run
    rng = np.random.default_rng(2)
    ens.heads.kernel = nnx.Param(jnp.asarray(rng.normal(size=(2, D, 3))))
    ens.heads.bias = nnx.Param(jnp.asarray(rng.normal(size=(2, 3))))
    stats = capture_stats(ens, x, token_mask=mask, form="gram")
    real = x.reshape(-1, D)[mask.reshape(-1)]
    k = stats["heads"]["kernel"]
    assert k.gram.shape == (2, D, D)
    np.testing.assert_array_equal(k.count, [9.0, 9.0])
    np.testing.assert_allclose(k.gram[1], real.T @ real, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# equinox: layers stacked with filter_vmap, run with jax.lax.scan over the partitioned stack


class EqxBlock(eqx.Module):
    fc: eqx.nn.Linear
    ln: eqx.nn.LayerNorm

    def __call__(self, h):  # h: (S, D), one example
        return jax.vmap(self.ln)(jnp.tanh(jax.vmap(self.fc)(h)))


def _eqx_block(p):
    a = eqx.filter_eval_shape  # built abstractly (no random initialisation to run), then given the weights
    fc = eqx.tree_at(lambda m: (m.weight, m.bias), a(eqx.nn.Linear, D, D, key=jax.random.key(0), dtype=jnp.float64),
                     (jnp.asarray(p["w"].T), jnp.asarray(p["b"])))
    ln = eqx.tree_at(lambda m: (m.weight, m.bias), a(eqx.nn.LayerNorm, D, eps=EPS, dtype=jnp.float64),
                     (jnp.asarray(p["s"]), jnp.asarray(p["c"])))
    return EqxBlock(fc, ln)


class EqxScanned(eqx.Module):
    blocks: EqxBlock

    def __call__(self, h):
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)

        def step(h, d):
            return eqx.combine(d, static)(h), None

        return jax.lax.scan(step, h, dynamic)[0]


class EqxUnrolled(eqx.Module):
    blocks: list

    def __call__(self, h):
        for block in self.blocks:
            h = block(h)
        return h


def test_eqx_scan_matches_unrolled_and_reference(x64):
    layers = _layers()
    x, mask = _inputs()
    ref = _reference(layers, x, mask)
    blocks = [_eqx_block(p) for p in layers]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    scanned = capture_stats(EqxScanned(stacked), x, token_mask=mask, form="gram")
    unrolled = capture_stats(EqxUnrolled(blocks), x, token_mask=mask, form="gram")
    for i in range(L):
        _check(scanned.blocks.fc.weight, scanned.blocks.ln.weight, ref[i], layer=i)
        _check(unrolled.blocks[i].fc.weight, unrolled.blocks[i].ln.weight, ref[i])
    roles = split_params(EqxScanned(stacked)).roles
    assert roles["blocks/fc/weight"] == cm.LeafSpec(cm.Role.LINEAR, in_axes=1, stack_axes=1, out_first=True)
    assert roles["blocks/ln/weight"] == cm.LeafSpec(cm.Role.SCALE, stack_axes=1)
