"""MergeKit's methods (catmerge_jax.mergekit) against float64 references written from MergeKit's definitions
(tests/mergekit_reference.py), DARE/DELLA statistics, the pytree methods under jit, and recipes end to end.

Tolerances: inputs are float32 and the kernels compute in float32; each result is a handful of float32 operations
(sums of K ≤ 4 terms, a norm, a division) on values of order 1, so it is within ~10 ulp of the exact value: we allow
1e-5 relative + 1e-5 absolute (≈ 80 float32 ulp at 1), far below any semantic difference (a dropped or rescaled
entry changes the result by ~0.1).
"""

from __future__ import annotations

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import catmerge_jax as cm
from catmerge_jax.mergekit.methods import METHODS, merge_weight
from catmerge_jax.recipes import RecipeError, parse_recipe, run_recipe
from tests import mergekit_reference as ref

TOL = dict(rtol=1e-5, atol=1e-5)
SHAPE = (12, 20)


def _inputs(k, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(SHAPE).astype(np.float32)
    return base, [base + scale * rng.standard_normal(SHAPE).astype(np.float32) for _ in range(k)]


def _f64(xs):
    return [np.asarray(x, np.float64) for x in xs]


W3 = [0.3, 0.5, 0.7]
CASES = {
    "linear": (lambda b, ms: ref.linear(ms, [0.2, 0.5, 0.3]), dict(weight=[0.2, 0.5, 0.3]), False),
    "task_arithmetic": (lambda b, ms: ref.gta(b, ms, W3, lam=0.8), dict(weight=W3, **{"lambda": 0.8}), True),
    "ties": (lambda b, ms: ref.gta(b, ms, W3, sparsify="magnitude", consensus="sum", normalize=True,
                                   density=[0.2, 0.5, 0.9]), dict(weight=W3, density=[0.2, 0.5, 0.9]), True),
    "ties_rescaled": (lambda b, ms: ref.gta(b, ms, [1.0] * 3, sparsify="magnitude", consensus="sum",
                                            normalize=True, rescale=True, density=[0.3] * 3),
                      dict(weight=1.0, density=0.3, rescale=True), True),
    "breadcrumbs": (lambda b, ms: ref.gta(b, ms, W3, sparsify="magnitude_outliers", density=[0.6] * 3,
                                          gamma=[0.05] * 3), dict(weight=W3, density=0.6, gamma=0.05), True),
    "breadcrumbs_ties": (lambda b, ms: ref.gta(b, ms, W3, sparsify="magnitude_outliers", consensus="sum",
                                               density=[0.6] * 3, gamma=[0.05] * 3),
                         dict(weight=W3, density=0.6, gamma=0.05), True),
    "nuslerp": (lambda b, ms: ref.nuslerp(b, ms[:2], [0.3, 0.7]), dict(weight=[0.3, 0.7]), True),
    "multislerp": (lambda b, ms: ref.multislerp(b, ms, [0.2, 0.3, 0.5]), dict(weight=[0.2, 0.3, 0.5]), True),
    "karcher": (lambda b, ms: ref.karcher(ms), {}, False),
    "model_stock": (lambda b, ms: ref.model_stock(b, ms), {}, True),
    "model_stock_filter_wise": (lambda b, ms: ref.model_stock(b, ms, True), dict(filter_wise=True), True),
    "sce": (lambda b, ms: ref.sce(b, ms, 0.5), dict(select_topk=0.5), True),
    "nearswap": (lambda b, ms: ref.nearswap(b, ms[0], 0.05), dict(t=0.05), True),
    "passthrough": (lambda b, ms: 0.5 * ms[0], dict(scale=[0.5]), False),
    "arcee_fusion": (lambda b, ms: ref.arcee_fusion(b, ms[0]), {}, True),
    "ram": (lambda b, ms: ref.ram(b, ms, 0.1), dict(epsilon=0.1), True),
    "ramplus_tl": (lambda b, ms: ref.ram(b, ms, 0.1, plus=True), dict(epsilon=0.1), True),
    "slerp": (lambda b, ms: ref.slerp(b, ms[0], 0.3), dict(t=0.3), True),
}
_TAKES = {"nuslerp": 2, "nearswap": 1, "passthrough": 1, "arcee_fusion": 1, "slerp": 1}


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_matches_float64_reference(case):
    reference, params, uses_base = CASES[case]
    name = case.replace("_rescaled", "").replace("_filter_wise", "")
    base, models = _inputs(3, seed=len(case))
    models = models[:_TAKES.get(name, 3)]
    if name == "slerp":
        models = [np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)]   # far apart: spherical
    want = reference(*[np.asarray(base, np.float64)], _f64(models))
    inputs = [base, *models] if uses_base else models
    got = np.asarray(merge_weight(name, inputs, 0 if uses_base else None, params))
    np.testing.assert_allclose(got, want, **TOL)
    # traced: the selections (TIES, Breadcrumbs, SCE) are then found in the graph, not with NumPy
    jitted = jax.jit(lambda xs: merge_weight(name, xs, 0 if uses_base else None, params))(inputs)
    np.testing.assert_allclose(np.asarray(jitted), want, **TOL)


RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
TRACED = sorted({c.replace("_rescaled", "").replace("_filter_wise", "") for c in CASES} | set(RANDOM))
"""MergeKit methods run under ``jax.jit`` here (tests/test_jax_native.py checks every registered method has one)."""


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_under_jit_draw_as_eager(name):
    base, models = _inputs(2, seed=7)
    merge = cm.get_method(f"mergekit.{name}").merge
    kw = dict(weight=[0.6, 0.4], density=0.5, seed=4)
    eager = merge({"w": base}, [{"w": m} for m in models], **kw)["w"]
    jitted = jax.jit(lambda b, f: merge(b, f, **kw))({"w": base}, [{"w": m} for m in models])["w"]
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), **TOL)
    assert 0.2 < np.mean(np.asarray(eager) != base) < 0.95       # some entries dropped, some kept


def test_registered_with_prefix_and_kept_apart_from_fusionbench_ties():
    names = cm.available_methods()
    assert all(f"mergekit.{m}" in names for m in METHODS) and len(METHODS) == 20
    assert TRACED == sorted(METHODS)
    assert "ties" in names and cm.get_method("ties") is not cm.get_method("mergekit.ties")


def test_dare_keep_rate_and_l1_rescale_reproducible():
    n, density = 40_000, 0.3
    base = np.zeros(n, np.float32)
    model = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    run = lambda seed: np.asarray(cm.get_method("mergekit.dare_linear").merge(  # noqa: E731
        {"w": base}, [{"w": model}], density=density, seed=seed)["w"])
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    kept = np.count_nonzero(a) / n
    assert abs(kept - density) < 4 * np.sqrt(density * (1 - density) / n)      # 4 sigma of a binomial
    # MergeKit's rescale keeps the L1 norm (not 1/density): every kept entry scaled by the same factor
    np.testing.assert_allclose(np.abs(a).sum(), np.abs(model).sum(), rtol=1e-5)
    ratio = a[a != 0] / model[a != 0]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)


def test_della_keep_probability_rises_with_magnitude():
    rows, cols, density, eps = 200, 100, 0.5, 0.2
    model = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)
    out = np.asarray(cm.get_method("mergekit.della_linear").merge(
        {"w": np.zeros_like(model)}, [{"w": model}], density=density, epsilon=eps, rescale=False, seed=0)["w"])
    rank = np.argsort(np.argsort(np.abs(model), axis=1), axis=1)
    kept = out != 0
    low, high = kept[rank < 10].mean(), kept[rank >= cols - 10].mean()
    sigma = np.sqrt(0.25 / (rows * 10))
    assert abs(low - (density - eps + 2 * eps * 4.5 / 99)) < 4 * sigma
    assert abs(high - (density + eps - 2 * eps * 4.5 / 99)) < 4 * sigma
    with pytest.raises(cm.CatMergeError, match="density"):
        cm.get_method("mergekit.della").merge({"w": model}, [{"w": model}], density=0.9, epsilon=0.2)


def test_pytree_methods_jit_and_match_eager():
    base, models = _inputs(2, seed=5)
    tree = lambda x: {"a": {"kernel": jnp.asarray(x)}, "ids": jnp.arange(3)}  # noqa: E731
    merge = cm.get_method("mergekit.ties").merge
    eager = merge(tree(base), [tree(m) for m in models], weight=W3[:2], density=0.4)
    jitted = jax.jit(lambda p, f: merge(p, f, weight=W3[:2], density=0.4))(tree(base), [tree(m) for m in models])
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
    want = ref.gta(*_f64([base]), _f64(models), W3[:2], sparsify="magnitude", consensus="sum", normalize=True,
                   density=[0.4] * 2)
    np.testing.assert_allclose(np.asarray(jitted["a"]["kernel"]), want, **TOL)
    np.testing.assert_array_equal(np.asarray(jitted["ids"]), np.arange(3))


# ----------------------------------------------------------------------------------------------- tie order

def _members(mask):
    return set(np.flatnonzero(mask).tolist())


@pytest.mark.parametrize("n", [40, 5000])
def test_pytorch_tie_order_is_torchs_cpu_order(n):
    """MergeKit's selections, ``argsort(w, descending=True)[:m]``, ``sort(w).indices[:m]`` and ``topk(v, m)``, on
    bf16 magnitudes with many exact ties: the "pytorch" order keeps the very entries torch keeps; "stable" does
    not."""
    torch = pytest.importorskip("torch")
    from catmerge_jax.mergekit.tie_order import ascending_keys, head_mask, topk_mask

    g = torch.Generator().manual_seed(n)
    # bf16 magnitudes (~300 distinct values: every cut is a tie), or six values for a short vector
    v = (0.05 * torch.randn(n, generator=g) if n > 100 else torch.randint(0, 6, (n,), generator=g) / 4).bfloat16().abs()
    w = v.float()
    down, up = ascending_keys(w.numpy(), descending=True), ascending_keys(w.numpy(), descending=False)
    stable_differs = False
    for m in sorted({1, n // 10, n // 2, n - 3}):
        want = set(torch.argsort(w, descending=True)[:m].tolist())
        assert _members(head_mask(down, m)) == want
        assert _members(head_mask(up, m)) == set(torch.sort(w).indices[:m].tolist())
        assert _members(topk_mask(down, m)) == set(torch.topk(v, m).indices.tolist())
        stable_differs |= _members(head_mask(down, m, "stable")) != want
    assert stable_differs


def test_pytorch_tie_order_needs_no_torch_but_for_partial_sort(monkeypatch):
    """The introsort/introselect paths are NumPy only; ``topk`` of under 1/64 of the entries (PyTorch's
    ``std::partial_sort``) needs PyTorch and, without it, keeps ties to the lower index with a warning."""
    import sys

    from catmerge_jax.mergekit.tie_order import ascending_keys, head_mask, topk_mask

    monkeypatch.setitem(sys.modules, "torch", None)              # import torch now raises ImportError
    keys = ascending_keys(np.array([1, 2, 2, 2, 0, 2, 3, 2] * 40, np.float32), descending=True)
    assert np.flatnonzero(head_mask(keys[:32], 6)).tolist() == [1, 6, 14, 22, 30, 31]   # torch.argsort's, as a set
    with pytest.warns(RuntimeWarning, match="lower index"):
        mask = topk_mask(keys, 5)                                # 64·5 ≤ 320 entries
    assert np.flatnonzero(mask).tolist() == [6, 14, 22, 30, 38]


def _torch_order(v, descending):
    torch = pytest.importorskip("torch")
    return torch.argsort(torch.from_numpy(np.asarray(v, np.float32).reshape(-1)), descending=descending).numpy()


def _torch_topk(v, k):
    torch = pytest.importorskip("torch")
    return torch.topk(torch.from_numpy(np.asarray(v, np.float32).reshape(-1)), k).indices.numpy()


TIED = {
    "ties": (lambda b, ms, o: ref.gta(b, ms, [0.5, 0.5], sparsify="magnitude", consensus="sum", normalize=True,
                                      density=[0.5, 0.3], order=o), dict(weight=0.5, density=[0.5, 0.3])),
    "breadcrumbs": (lambda b, ms, o: ref.gta(b, ms, [0.5, 0.5], sparsify="magnitude_outliers", density=[0.6] * 2,
                                             gamma=[0.05] * 2, order=o), dict(weight=0.5, density=0.6, gamma=0.05)),
    "sce": (lambda b, ms, o: ref.sce(b, ms, 0.5, topk=None if o is ref.stable_order else _torch_topk),
            dict(select_topk=0.5)),
}


@pytest.mark.parametrize("name", sorted(TIED))
def test_pytorch_tie_order_keeps_mergekits_tied_entries(name):
    """Task vectors on a grid of eighths (exact in float32, ~9 distinct magnitudes): nearly every kept entry is
    tied with a dropped one. With tie_order="pytorch" the merge keeps MergeKit's (the float64 reference choosing
    by torch's sort/topk); the reference choosing by index gives another result, so the test can fail."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    base = np.zeros((30, 40), np.float32)
    models = [rng.integers(-4, 5, base.shape).astype(np.float32) / 8 for _ in range(2)]
    reference, params = TIED[name]
    want = reference(base.astype(np.float64), _f64(models), _torch_order)
    got = np.asarray(merge_weight(name, [base, *models], 0, params, tie_order="pytorch"))
    np.testing.assert_allclose(got, want, **TOL)
    assert not np.allclose(reference(base.astype(np.float64), _f64(models), ref.stable_order), want, **TOL)
    with pytest.raises(cm.CatMergeError, match="tie_order='pytorch' needs concrete"):
        jax.jit(lambda xs: merge_weight(name, xs, 0, params, tie_order="pytorch"))([base, *models])


def test_karcher_in_bf16_rounds_as_pytorch():
    """bf16 Karcher against MergeKit's op sequence run in PyTorch (tests/mergekit_reference.py): within 2 bf16
    ulp everywhere. Rounding a 0-dim float32 factor on the left of a product (``cos(θ)·mean``) as PyTorch does is
    what makes it agree: without it ~1% of entries drift apart."""
    torch = pytest.importorskip("torch")
    import ml_dtypes

    torch.manual_seed(0)
    far = 0
    for _ in range(4):
        base = 0.02 * torch.randn(40, 16)
        inputs = [x.bfloat16() for x in [base] + [base + 0.05 * torch.randn(40, 16) for _ in range(2)]]
        want = ref.karcher_torch(inputs).float().numpy()
        got = np.asarray(merge_weight("karcher", [x.float().numpy() for x in inputs], None, {},
                                      work_dtype=ml_dtypes.bfloat16))
        far += int(np.count_nonzero(np.abs(got - want) > 2 * np.spacing(np.abs(want)) * 65536))
    assert far == 0


# ----------------------------------------------------------------------------------------------- recipes

def _recipe(**kw):
    data = {"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1.0}}],
            "parameters": {"density": 0.5}}
    data.update(kw)
    return data


@pytest.mark.parametrize("change, match", [
    (dict(merge_method="frankenmerge"), "merge_method 'frankenmerge'"),
    (dict(base_model=None), "needs a base_model"),
    (dict(foo=1), "unknown key 'foo'"),
    (dict(parameters={"density": 1.5}), r"parameters.density.*\[0.0, 1.0\], got 1.5"),
    (dict(parameters={"densty": 0.5}), "takes no parameter 'densty'"),
    (dict(slices=[]), "'slices' is not supported"),
    (dict(merge_method="slerp", models=["x"], parameters={"t": 2.0}), "slerp parameter 't' must be in"),
    (dict(dtype="int8"), "dtype 'int8'"),
])
def test_bad_recipes_are_one_line_errors_naming_the_field(change, match):
    with pytest.raises(RecipeError, match=match) as info:
        from catmerge_jax.recipes import resolve

        resolve(parse_recipe(_recipe(**change)), "model.layers.0.mlp.up_proj.weight")
    assert "\n" not in str(info.value)


def test_gradients_and_filters_resolve_as_mergekit():
    from catmerge_jax.recipes import layer_position, resolve

    recipe = parse_recipe(_recipe(parameters={"density": [0.2, 0.6], "normalize": [{"filter": "mlp", "value": False},
                                                                                  {"value": True}]}))
    t = layer_position("model.layers.2.mlp.up_proj.weight", 5)
    got = resolve(recipe, "model.layers.2.mlp.up_proj.weight", t)
    assert got["density"] == [pytest.approx(0.4)] and got["normalize"] is False
    assert resolve(recipe, "model.norm.weight", layer_position("model.norm.weight", 5))["normalize"] is True
    assert resolve(recipe, "model.norm.weight", 0.0)["density"] == [pytest.approx(0.2)]


def _tiny_llama(path, seed, base=None):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    # every projection (16, 16): three tensor shapes in all, so few compilations
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=40, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    if base is not None:
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
                p.copy_(q + 0.05 * torch.randn_like(q))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    base = _tiny_llama(str(root / "base"), 0)
    for k in range(2):
        _tiny_llama(str(root / f"t{k}"), k + 1, base=base)
    return root


def _write(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_config_end_to_end_matches_reference(llama_folders, tmp_path):
    from catmerge_jax.cli import main
    from catmerge_jax.folders import open_folder

    root = llama_folders
    recipe = _write(tmp_path / "r.yaml", {
        "merge_method": "ties", "base_model": str(root / "base"),
        "models": [{"model": str(root / "t0"), "parameters": {"weight": 0.7, "density": [0.3, 0.9]}},
                   {"model": str(root / "t1"), "parameters": {"weight": 0.4}}],
        "parameters": {"density": 0.5}})
    out = tmp_path / "out"
    assert main(["merge", "--config", recipe, "--out", str(out), "--quiet"]) == 0
    base, t0, t1, merged = (open_folder(str(p)) for p in (root / "base", root / "t0", root / "t1", out))
    assert set(merged.tensors) == set(base.tensors)
    for name in base.tensors:
        layer = 1.0 if ".layers.1." in name else 0.0
        want = ref.gta(*_f64([base.read_float32(name)]), _f64([t0.read_float32(name), t1.read_float32(name)]),
                       [0.7, 0.4], sparsify="magnitude", consensus="sum", normalize=True,
                       density=[0.3 + 0.6 * layer, 0.5])
        np.testing.assert_allclose(merged.read_float32(name), want, **TOL)
    assert json.load(open(out / "config.json"))["model_type"] == "llama"


def test_cli_bad_recipe_exits_2_and_writes_nothing(llama_folders, tmp_path, capsys):
    from catmerge_jax.cli import main

    root = llama_folders
    recipe = _write(tmp_path / "r.yaml", {"merge_method": "ties", "base_model": str(root / "base"),
                                          "models": [{"model": str(root / "t0"), "parameters": {"weight": 1,
                                                                                               "density": -0.1}}]})
    out = tmp_path / "out"
    assert main(["merge", "--config", recipe, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "models[0].parameters.density" in err
    assert not out.exists()
    assert main(["merge", "--config", recipe, "--method", "ties", "--out", str(out)]) == 2


# ----------------------------------------------------------------------------------------------- MergeKit itself

MERGEKIT_PYTHON = os.environ.get("CATMERGE_MERGEKIT_PYTHON")


DETERMINISTIC = [
    ("task_arithmetic", {"weight": 0.5}), ("linear", {"weight": 0.5}), ("ties", {"weight": 0.5, "density": 0.5}),
    ("ties", {"weight": 0.5, "density": 0.3, "rescale": True}), ("slerp", {"t": 0.3}), ("model_stock", {}),
    ("model_stock", {"filter_wise": True}), ("breadcrumbs", {"weight": 0.5, "density": 0.6}),
    ("breadcrumbs_ties", {"weight": 0.5, "density": 0.6}), ("nuslerp", {"weight": 0.5}),
    ("multislerp", {"weight": 0.5}), ("karcher", {}), ("sce", {"select_topk": 0.5}), ("ram", {}),
    ("ramplus_tl", {}), ("nearswap", {"t": 0.01}), ("arcee_fusion", {}), ("passthrough", {"scale": 0.7}),
]
"""Every deterministic method of MergeKit's registry (all but DARE and DELLA, whose masks are random)."""


def test_the_optional_comparison_covers_every_deterministic_method():
    assert {m for m, _ in DETERMINISTIC} == set(METHODS) - set(RANDOM)


@pytest.mark.skipif(not MERGEKIT_PYTHON, reason="set CATMERGE_MERGEKIT_PYTHON to a Python with mergekit==0.1.5")
@pytest.mark.parametrize("method, params", DETERMINISTIC)
def test_matches_mergekit_within_2_bf16_ulp(llama_folders, tmp_path, method, params):
    """Our output and MergeKit's (``mergekit-yaml``) on the same bf16 recipe: at most 2 bf16 ulp per entry, every
    entry, every deterministic method: ties at a magnitude cut kept as PyTorch's CPU sort keeps them (the recipe
    default ``tie_order="pytorch"``), Karcher's bf16 iterations rounded op by op as PyTorch rounds them."""
    from catmerge_jax.folders import open_folder

    root = llama_folders
    two = method in ("slerp", "nearswap", "arcee_fusion")
    models = [str(root / "t0")] if two else [str(root / "t0"), str(root / "t1")]
    data = {"merge_method": method, "base_model": str(root / "base"), "dtype": "bfloat16",
            "models": [{"model": m} for m in models], "parameters": params}
    if method in ("linear", "karcher"):
        data["models"].insert(0, {"model": str(root / "base")})
    if method == "passthrough":
        data = {"merge_method": method, "dtype": "bfloat16", "models": [{"model": str(root / "t0")}],
                "parameters": params}
    recipe = _write(tmp_path / "r.yaml", data)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    run_recipe(recipe, str(ours), progress=False)
    cli = os.path.join(os.path.dirname(MERGEKIT_PYTHON), "mergekit-yaml")
    subprocess.run([cli, recipe, str(theirs)], check=True, capture_output=True)
    a, b = open_folder(str(ours)), open_folder(str(theirs))
    far = total = 0
    for name in a.tensors:
        x, y = a.read_float32(name), b.read_float32(name)
        ulp = np.spacing(np.abs(y)) * 65536
        far += int(np.count_nonzero(np.abs(x - y) > 2 * ulp))
        total += x.size
    assert far == 0, f"{far} of {total} entries differ by more than 2 bf16 ulp"


_SHARDED = r"""
import json, jax, jax.numpy as jnp, numpy as np
import catmerge_jax as cm
from catmerge_jax.mergekit.sharded import mergekit_merge_sharded
from catmerge_jax.sharding import layer_mesh
rng = np.random.default_rng(0)
base = {f"l{i}": {"w": rng.standard_normal((6, 5)).astype(np.float32), "n": np.ones(5, np.float32)} for i in range(5)}
fts = [jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), base) for _ in range(3)]
out = {}
for name, kw in [("ties", dict(weight=[0.3, 0.5, 0.7], density=0.4)), ("dare_ties", dict(weight=0.5, density=0.5, seed=3))]:
    f = fts
    one = cm.get_method("mergekit." + name).merge(base, f, **kw)
    many = mergekit_merge_sharded(name, base, f, mesh=layer_mesh(), **kw)
    out[name] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)))
out["devices"] = jax.device_count()
print(json.dumps(out))
"""


def test_sharded_over_four_devices_equals_one_device():
    """Layers spread over 4 simulated CPU devices (a fresh process: the device count is fixed at jax start)."""
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _SHARDED], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got.pop("devices") == 4
    for name, diff in got.items():
        assert diff <= 1e-6, (name, diff)


def test_cli_method_flag_streams_mergekit_methods(llama_folders, tmp_path):
    """``catmerge merge --method mergekit.ties --base --task ...``: the same per-tensor merge as the recipe."""
    from catmerge_jax.cli import main
    from catmerge_jax.folders import open_folder

    root = llama_folders
    out = tmp_path / "out"
    assert main(["merge", "--method", "mergekit.ties", "--base", str(root / "base"), "--task", str(root / "t0"),
                 str(root / "t1"), "--hparam", "density=0.4", "--hparam", "weight=0.5", "--out", str(out),
                 "--quiet"]) == 0
    base, t0, t1, merged = (open_folder(str(p)) for p in (root / "base", root / "t0", root / "t1", out))
    for name in base.tensors:
        want = ref.gta(*_f64([base.read_float32(name)]), _f64([t0.read_float32(name), t1.read_float32(name)]),
                       [0.5, 0.5], sparsify="magnitude", consensus="sum", normalize=True, density=[0.4, 0.4])
        np.testing.assert_allclose(merged.read_float32(name), want, **TOL)
