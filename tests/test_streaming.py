"""Streaming merge from safetensors equals the in-memory merge; layer-wise capture equals a full forward."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import catmerge_jax as cm
from catmerge_jax.batched import cat_merge_batched
from catmerge_jax.streaming import layerwise_capture, merge_safetensors, stats_by_path
from converters.safetensors_io import list_tensors, load_file, load_tensor, save_file

K, BLOCKS, WIDTH, MLP, ROWS = 2, 3, 16, 40, 6
BF16 = ml_dtypes.bfloat16


def _block_names():
    return {"ln/scale": (WIDTH,), "ln/bias": (WIDTH,), "fc1/kernel": (WIDTH, MLP), "fc1/bias": (MLP,),
            "fc2/kernel": (MLP, WIDTH), "fc2/bias": (WIDTH,)}


def _block_stats(p, h):
    mean = h.mean(-1, keepdims=True)
    xhat = (h - mean) / jnp.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    x = xhat * p["ln"]["scale"] + p["ln"]["bias"]
    f = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    out = h + f @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    n = h.shape[0]
    return out, {"ln/scale": cm.scale_stats(xhat), "ln/bias": cm.count_stats(n), "fc1/kernel": cm.linear_stats(x),
                 "fc1/bias": cm.count_stats(n), "fc2/kernel": cm.linear_stats(f), "fc2/bias": cm.count_stats(n)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(0)
    base = {f"blocks/{b}/{n}": rng.standard_normal(s) / np.sqrt(s[0]) for b in range(BLOCKS)
            for n, s in _block_names().items()}
    files = {"base": os.path.join(d, "base.safetensors")}
    save_file({k: v.astype(BF16) for k, v in base.items()}, files["base"])
    for k in range(K):
        files[k] = os.path.join(d, f"task{k}.safetensors")
        save_file({n: (v + 0.1 * rng.standard_normal(v.shape)).astype(BF16) for n, v in base.items()}, files[k])
    inputs = [jnp.asarray(rng.standard_normal((ROWS, WIDTH)), jnp.float32) for _ in range(K)]
    return d, files, inputs


def _nest(flat):
    tree = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _load_block(path, b):
    return _nest({n: jnp.asarray(load_tensor(path, f"blocks/{b}/{n}"), jnp.float32) for n in _block_names()})


def _capture(files, inputs):
    return [layerwise_capture(lambda b, k=k: _load_block(files[k], b), _block_stats, BLOCKS, inputs[k])
            for k in range(K)]


def test_layerwise_capture_equals_full_forward(checkpoints):
    _, files, inputs = checkpoints
    captured = _capture(files, inputs)
    # Full forward with every block in memory at once.
    h = inputs[0]
    for b in range(BLOCKS):
        h, expected = _block_stats(_load_block(files[0], b), h)
        for rel, s in expected.items():
            got = captured[0][f"blocks/{b}/{rel}"]
            for field in ("count", "rows", "gram", "sq_sum"):
                if getattr(s, field) is not None:
                    np.testing.assert_allclose(np.asarray(getattr(got, field)), np.asarray(getattr(s, field)),
                                               rtol=1e-6, atol=1e-6)


def test_streaming_merge_equals_in_memory(checkpoints, tmp_path):
    _, files, inputs = checkpoints
    captured = _capture(files, inputs)
    out = str(tmp_path / "merged")
    merge_safetensors(files["base"], [files[k] for k in range(K)], {p: [cap[p] for cap in captured] for p in captured[0]},
                      out, c=2, lam=3.0, alpha=0.5, max_shard_bytes=4000)
    info = list_tensors(out)
    assert len({i.file for i in info.values()}) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    streamed = {n: load_tensor(i.file, n) for n, i in info.items()}
    assert all(v.dtype == BF16 for v in streamed.values())

    base_tree = _nest(load_file(files["base"]))
    task_trees = [_nest(load_file(files[k])) for k in range(K)]
    stats = [cm.stats_from_arrays(base_tree, cap) for cap in captured]
    for merged in (cat_merge_batched(base_tree, task_trees, stats, c=2, lam=3.0, alpha=0.5),
                   cm.cat_merge(base_tree, task_trees, stats, c=2, lam=3.0, alpha=0.5)):
        exact = total = 0
        for path, value in cm.leaves_with_paths(merged):
            got, want = streamed[path].astype(np.float32), np.asarray(value).astype(np.float32)
            # Same float32 math in a different batching order can flip a bf16 rounding: allow one bf16 step.
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=2.0 ** -7)
            exact += int(np.sum(got == want))
            total += got.size
        assert exact >= 0.99 * total
    assert sorted(stats_by_path(stats)) == sorted(streamed)


def test_failures_leave_no_output(checkpoints, tmp_path):
    d, files, inputs = checkpoints
    out = str(tmp_path / "merged")
    with pytest.raises(cm.MissingStatisticsError, match="needs exemplar statistics"):
        merge_safetensors(files["base"], [files[k] for k in range(K)], {}, out, c=2)
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".tmp-merge-", ".catmerge-tmp-"))]
    bad = os.path.join(d, "bad.safetensors")
    save_file({"blocks/0/ln/scale": np.zeros(3, BF16)}, bad)
    with pytest.raises(cm.TreeMismatchError, match="bad.safetensors"):
        merge_safetensors(files["base"], [bad], {}, out, c=2)
    os.makedirs(out)
    with pytest.raises(FileExistsError):
        merge_safetensors(files["base"], [files[0]], {}, out, c=0)
