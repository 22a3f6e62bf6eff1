"""docs/jax.md, "Using it from JAX code": its recipes run as written (after the README's 15-line example, which the
page repeats) and do what they say. This test runs that page for the documentation tests (tests/test_docs.py)."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import pytest

import catmerge_jax as cm
from tests.doc_blocks import page_blocks, run_page
from tests.test_cat_one_answer import _reference_positive_merge

ROOT = pathlib.Path(__file__).resolve().parents[1]


PAGE = "docs/jax.md"


@pytest.fixture(scope="module")
def recipes():
    blocks = [b for b in page_blocks((ROOT / PAGE).read_text(encoding="utf-8")) if b.lang == "python"]
    readme = [b for b in page_blocks((ROOT / "README.md").read_text(encoding="utf-8")) if b.lang == "python"]
    assert blocks[0].code == readme[0].code, f"{PAGE}'s first block is not the README's 15-line example"
    assert len(blocks) >= 8, "expected the example, jit/vmap/grad, cat_trim, AdaMerging, nnx, equinox, scan, orbax"
    return run_page(PAGE)             # every block in order, printed output checked where the page shows it


def _first_layer_reference(w0_in_out, task_kernels_in_out, exemplars, alpha):
    """Float64 CAT of a first layer, whose inputs are the exemplars themselves (λ = 5, c = 3)."""
    w0 = np.asarray(w0_in_out, np.float64)
    T = [np.asarray(t, np.float64) - w0 for t in task_kernels_in_out]
    X = [np.asarray(e, np.float64) for e in exemplars]
    return _reference_positive_merge(w0, T, X, lam=5.0, c=3, alpha=alpha)


def test_jit_vmap_grad_recipe(recipes):
    ns = recipes
    merged, merged_jit = ns["merged"], ns["merged_jit"]
    for a, b in zip(jax.tree.leaves(merged_jit), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # the first Dense sees the exemplars themselves: its merged kernel against the float64 reference
    expected = _first_layer_reference(ns["pretrained"]["layers_0"]["kernel"],
                                      [f["layers_0"]["kernel"] for f in ns["finetuned"]], ns["exemplars"], 0.3)
    np.testing.assert_allclose(np.asarray(merged["layers_0"]["kernel"]), expected, rtol=1e-4, atol=1e-5)
    for i, a in enumerate(np.linspace(0.1, 1.0, 4)):
        one = cm.cat_merge(ns["pretrained"], ns["finetuned"], ns["stats"], alpha=float(a))
        for s, o in zip(jax.tree.leaves(ns["sweep"]), jax.tree.leaves(one)):
            np.testing.assert_allclose(np.asarray(s[i]), np.asarray(o), rtol=1e-5, atol=1e-6)
    # d loss / dα = <∇_W loss at W(α), ΣT̃>, with ΣT̃ = merge(α = 1) − W0
    w = cm.cat_merge(ns["pretrained"], ns["finetuned"], ns["stats"], alpha=0.3)
    direction = jax.tree.map(lambda m, b: m - b, cm.cat_merge(ns["pretrained"], ns["finetuned"], ns["stats"],
                                                              alpha=1.0), ns["pretrained"])
    grad_w = jax.grad(ns["loss"])(w)
    expected_grad = sum(float(np.sum(np.asarray(g, np.float64) * np.asarray(d, np.float64)))
                        for g, d in zip(jax.tree.leaves(grad_w), jax.tree.leaves(direction)))
    assert abs(float(ns["dloss_dalpha"]) - expected_grad) <= 1e-3 * abs(expected_grad) + 1e-7


def test_cat_trim_and_adamerging_recipes(recipes):
    ns = recipes
    trimmed, per_leaf = ns["trimmed"], ns["per_leaf"]
    coefs = [0.3, 0.2, 0.4]
    for path, leaf in cm.leaves_with_paths(ns["merged_per_leaf"]):
        parts = path.split("/")
        get = lambda t: t[parts[0]][parts[1]]  # noqa: E731
        expected = np.asarray(get(ns["pretrained"]), np.float64) + sum(
            c * np.asarray(get(t), np.float64) for c, t in zip(coefs, trimmed))
        np.testing.assert_allclose(np.asarray(leaf), expected, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(ns["coefficient_grads"]) == jax.tree.structure(per_leaf)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(ns["coefficient_grads"]))
    ada = ns["ada"]
    assert ada.losses.shape == (20,) and ada.losses[-1] < ada.losses[0]
    head = np.asarray(ns["pretrained"]["layers_3"]["kernel"], np.float64) + sum(
        float(ada.coefficients["layers_3"]["kernel"][k]) * np.asarray(trimmed[k]["layers_3"]["kernel"], np.float64)
        for k in range(3))
    np.testing.assert_allclose(np.asarray(ns["merged_ada"]["layers_3"]["kernel"]), head, rtol=1e-5, atol=1e-6)


def test_nnx_and_equinox_recipes_return_modules_merged_like_the_reference(recipes):
    ns = recipes
    from flax import nnx

    assert type(ns["nnx_merged"]).__name__ == "MLP"
    expected = _first_layer_reference(ns["nnx_base"].up.kernel[...], [t.up.kernel[...] for t in ns["nnx_tasks"]],
                                      ns["exemplars"], 0.3)
    np.testing.assert_allclose(np.asarray(ns["nnx_merged"].up.kernel[...]), expected, rtol=1e-4, atol=1e-5)
    assert isinstance(nnx.state(ns["nnx_merged"], nnx.Param), nnx.State)

    merged = ns["eqx_merged"]
    assert type(merged).__name__ == "Sequential"
    expected = _first_layer_reference(np.asarray(ns["eqx_base"].layers[0].weight).T,
                                      [np.asarray(t.layers[0].weight).T for t in ns["eqx_tasks"]],
                                      ns["exemplars"], 0.3)
    np.testing.assert_allclose(np.asarray(merged.layers[0].weight).T, expected, rtol=1e-4, atol=1e-5)


def test_scanned_recipe_equals_merging_each_layer_on_its_own(recipes):
    ns = recipes
    base, tasks, stats, merged = ns["deep_base"], ns["deep_tasks"], ns["deep_stats"], ns["deep_merged"]
    counts = [s for p, s in cm.leaves_with_paths(stats[0], is_leaf=lambda x: isinstance(x, cm.LeafStats))]
    assert all(np.shape(s.count) == (4,) for s in counts)
    for layer in range(4):
        pick = lambda t, layer=layer: jax.tree.map(lambda w: w[layer], t)  # noqa: E731
        pick_stats = lambda s, layer=layer: jax.tree.map(  # noqa: E731
            lambda st: cm.LeafStats(**{f: (None if v is None else np.asarray(v)[layer])
                                       for f, v in vars(st).items()}),
            s, is_leaf=lambda x: isinstance(x, cm.LeafStats))
        alone = cm.cat_merge(pick(base), [pick(t) for t in tasks], [pick_stats(s) for s in stats], alpha=0.3)
        for a, b in zip(jax.tree.leaves(pick(merged)), jax.tree.leaves(alone)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_orbax_recipe_restores_the_merged_params_exactly(recipes):
    for a, b in zip(jax.tree.leaves(recipes["restored"]), jax.tree.leaves(recipes["merged"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

