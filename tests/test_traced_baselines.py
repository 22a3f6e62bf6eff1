"""Every registered baseline's ``merge`` under ``jax.jit``, ``jax.vmap`` and ``jax.grad`` (issue 10, item 1).

For fisher, regmean, tatr (gradient mode and zero-shot), pcb, consensus and dare, with the params, the per-task
inputs (statistics, Fishers, gradients, TALL λ, DARE's rate and key) and the varied hyperparameter traced:

* ``jit(merge)`` equals the eager call, and a second call with other values of every traced input reuses the
  compiled function (``_cache_size()`` unchanged) and equals the eager call at those values;
* ``vmap`` over three values of the hyperparameter equals three eager calls;
* ``grad`` of ``Σ w · merge`` (fixed random weights ``w``) equals an independent float64 NumPy derivative: for
  the task-arithmetic-like methods ``Σ w · τ`` with ``τ = merge(α = 1) − W0`` from an eager call (the masks are
  piecewise constant in α); for RegMean (α = off-diagonal shrinkage) the derivative of the least-squares
  solution; for Fisher merging (no α) the derivative with respect to the model coefficients ``λ_k``;
* concrete NaN inputs raise the one-line :class:`NonFiniteError`, traced ones trace and run.

Float64 comparisons run in x64 with rtol 1e-10; float32 ones use rtol 1e-5, atol 1e-6 on O(1) weights: the jitted
program fuses the same float32 operations in another order (a few ulps, ~1e-7 relative).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catmerge_jax import stats as st
from catmerge_jax.errors import HyperparameterError, NonFiniteError
from catmerge_jax.methods import consensus, fisher, pcb, tatr
from catmerge_jax.methods.registry import get_method
from catmerge_jax.roles import Role, classify, is_spec
from catmerge_jax.tree import leaves_with_paths

pytestmark = pytest.mark.usefixtures("strict_numerics")

# Few leaves and shapes (each shape compiles every kernel again), but a 3-axis kernel that RegMean reads as (4, 6)
# and leaves of every role.
SHAPES = {"dense": {"kernel": (4, 3), "bias": (3,)}, "attn": {"query": {"kernel": (4, 2, 3)}}, "ln": {"scale": (3,)}}
K = 3


def make_models(dtype, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    pre = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))
    fts = [jax.tree.map(lambda w: jnp.asarray(np.asarray(w) + 0.1 * rng.normal(size=w.shape), dtype), pre)
           for _ in range(K)]
    return pre, fts


def positive_trees(pre, seed):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda w: jnp.asarray(rng.exponential(size=w.shape) + 0.05, w.dtype), pre) for _ in range(K)]


def make_stats(pre, seed):
    """Per task: input rows of every LINEAR leaf (row form for 2 rows, Gram form for 7 and 9)."""
    rng = np.random.default_rng(seed)
    specs = dict(leaves_with_paths(classify(pre), is_leaf=is_spec))
    out = []
    for t, n in enumerate((7, 2, 9)):
        by_path = {}
        for path, leaf in leaves_with_paths(pre):
            if specs[path].role is Role.LINEAR:
                by_path[path] = st.linear_stats(rng.normal(size=(n, specs[path].matrix_shape(leaf.shape)[0])))
            else:
                by_path[path] = st.count_stats(n)
        out.append(st.stats_from_arrays(pre, by_path))
    return out


def flat64(tree):
    return {p: np.asarray(x, np.float64) for p, x in leaves_with_paths(tree)}


def assert_close(got, want, *, rtol, atol):
    got, want = flat64(got), flat64(want)
    assert set(got) == set(want)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=rtol, atol=atol, err_msg=p)


def weighted_sum(tree, weights):
    return sum(jnp.sum(x * w) for x, w in zip(jax.tree.leaves(tree), jax.tree.leaves(weights)))


# --------------------------------------------------------------------------------------------------------------
# The cases: traced per-task inputs, static hyperparameters, the varied hyperparameter ("knob") and its
# independent float64 derivative.
# --------------------------------------------------------------------------------------------------------------


class Case(NamedTuple):
    name: str
    knob: str                                   # the hyperparameter varied, traced, vmapped and differentiated
    values: tuple                               # knob values: first call, second call, vmap (3), derivative point
    extras: Callable[[Any, int], dict]          # (pretrained, seed) -> traced per-task inputs
    static: dict                                # static hyperparameters
    derivative: str = "scale"                   # "scale" (d/dα of W0 + α τ), "regmean", "fisher"
    shapes: Any = SHAPES                        # DARE: one leaf (every leaf shape compiles a threefry draw;
                                                # the per-leaf streams are tested in tests/test_methods_extra.py)


def _fisher_extras(pre, seed):
    epsilon = jnp.asarray(1e-3 * (seed + 1), jax.tree.leaves(pre)[0].dtype)
    return {"fishers": positive_trees(pre, seed), "epsilon": epsilon}


def _dare_extras(pre, seed):
    return {"p": jnp.asarray(0.3 + 0.1 * seed, jax.tree.leaves(pre)[0].dtype), "seed": jax.random.key(seed)}


def _consensus_extras(pre, seed):
    lams = [0.2, 0.4, 0.6]
    return {"lam": jnp.asarray(lams[seed:] + lams[:seed], jax.tree.leaves(pre)[0].dtype)}   # one λ_t per task


CASES = {c.name: c for c in [
    Case("fisher", "coefficients", ([1.0, 2.0, 0.5], [0.5, 1.0, 3.0], [[1.0, 1.0, 1.0], [0.2, 1.0, 2.0],
                                                                       [3.0, 0.1, 1.0]], [1.0, 2.0, 0.5]),
         _fisher_extras, {}, "fisher"),
    Case("regmean", "alpha", (0.9, 0.5, (0.1, 0.5, 0.95), 0.7), lambda pre, seed: {"stats": make_stats(pre, seed)},
         {"normalize": True}, "regmean"),
    Case("tatr", "alpha", (0.3, 0.8, (0.1, 0.5, 1.3), 0.4),
         lambda pre, seed: {"grads": positive_trees(pre, 10 + seed)}, {"quantile": 0.7}),
    Case("tatr_zero_shot", "alpha", (0.3, 0.8, (0.1, 0.5, 1.3), 0.4), lambda pre, seed: {}, {"quantile": 0.7}),
    Case("pcb", "alpha", (1.0, 0.6, (0.1, 0.5, 1.3), 1.2), lambda pre, seed: {},
         {"keep_ratio": 0.3, "clip_ratio": 0.02}),
    Case("consensus", "alpha", (0.3, 0.8, (0.1, 0.5, 1.3), 0.7), _consensus_extras, {"k": 2}),
    Case("dare", "alpha", (0.3, 0.8, (0.1, 0.5, 1.3), 0.7), _dare_extras, {}, shapes={"dense": {"kernel": (4, 3)}}),
]}


def merge_fn(case: Case):
    method = get_method(case.name)

    def merge(pre, fts, extras, knob):
        return method.merge(pre, fts, **extras, **case.static, **{case.knob: knob})

    return merge


def as_knob(value, dtype):
    return jnp.asarray(value, dtype)


_JITTED: dict[str, Any] = {}


def jitted_merge(case: Case):
    """One ``jax.jit`` per case for the whole module, so tests with the same shapes and dtypes share a compile."""
    return _JITTED.setdefault(case.name, jax.jit(merge_fn(case)))


# --------------------------------------------------------------------------------------------------------------
# Independent float64 derivatives
# --------------------------------------------------------------------------------------------------------------


def scale_derivative(case, pre, fts, extras, weights):
    """``d/dα Σ w · (W0 + α τ) = Σ w · τ`` with τ from an eager merge at α = 1 (masks do not depend on α)."""
    at_one = merge_fn(case)(pre, fts, extras, 1.0)
    p0, m1, w = flat64(pre), flat64(at_one), flat64(weights)
    return sum(np.sum(w[p] * (m1[p] - p0[p])) for p in p0)


def regmean_derivative(pre, fts, stats, alpha, weights):
    """``W' = A⁻¹ (Σ_k O_k W_k − O W)`` with ``A = Σ_k G̃_k``, ``O_k`` = off-diagonal part of ``G_k / n_k``."""
    specs = dict(leaves_with_paths(classify(pre), is_leaf=is_spec))
    per_task = [dict(leaves_with_paths(s, is_leaf=st.is_leaf_stats)) for s in stats]
    ws = [flat64(ft) for ft in fts]
    w = flat64(weights)
    total = 0.0
    for path, leaf in leaves_with_paths(pre):
        if specs[path].role is not Role.LINEAR:
            continue                                   # plain mean: independent of α
        mats = [x[path].reshape(specs[path].matrix_shape(leaf.shape)) for x in ws]
        grams = []
        for s in per_task:
            ls = s[path]
            g = np.asarray(ls.gram, np.float64) if ls.gram is not None else \
                np.asarray(ls.rows, np.float64).T @ np.asarray(ls.rows, np.float64)
            grams.append(g / float(ls.count))
        offs = [g - np.diag(np.diag(g)) for g in grams]
        a = sum(np.diag(np.diag(g)) + alpha * o for g, o in zip(grams, offs))
        solution = np.linalg.solve(a, sum((np.diag(np.diag(g)) + alpha * o) @ m for g, o, m in zip(grams, offs, mats)))
        d = np.linalg.solve(a, sum(o @ m for o, m in zip(offs, mats)) - sum(offs) @ solution)
        total += np.sum(w[path].reshape(d.shape) * d)
    return total


def fisher_derivative(fts, fishers, epsilon, lam, weights):
    """``dW/dλ_j = F̂_j (W_j − W) / Σ_k λ_k F̂_k`` with ``F̂ = max(F, ε)`` (every Σ is positive here)."""
    ws = [flat64(ft) for ft in fts]
    fs = [{p: np.maximum(v, epsilon) for p, v in flat64(f).items()} for f in fishers]
    w = flat64(weights)
    grad = np.zeros(len(fts))
    for p in w:
        den = sum(lam[k] * fs[k][p] for k in range(len(fts)))
        merged = sum(lam[k] * fs[k][p] * ws[k][p] for k in range(len(fts))) / den
        for j in range(len(fts)):
            grad[j] += np.sum(w[p] * fs[j][p] * (ws[j][p] - merged) / den)
    return grad


def reference_derivative(case, pre, fts, extras, knob, weights):
    if case.derivative == "regmean":
        return regmean_derivative(pre, fts, extras["stats"], knob, weights)
    if case.derivative == "fisher":
        return fisher_derivative(fts, extras["fishers"], float(extras["epsilon"]), np.asarray(knob, np.float64),
                                 weights)
    return scale_derivative(case, pre, fts, extras, weights)


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["float32", "x64"])
def precision(request):
    """``(dtype, rtol, atol)``; the x64 variant switches float64 on through conftest's ``x64`` fixture."""
    if request.param == "x64":
        request.getfixturevalue("x64")
        return np.float64, 1e-10, 1e-12
    return np.float32, 1e-5, 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_jit_equals_eager_without_retracing(name, precision):
    dtype, rtol, atol = precision
    case = CASES[name]
    merge, jitted = merge_fn(case), jitted_merge(case)
    compiled = []
    for seed, value in enumerate(case.values[:2]):
        pre, fts = make_models(dtype, seed, case.shapes)
        extras = case.extras(pre, seed)
        knob = as_knob(value, dtype)
        got = jitted(pre, fts, extras, knob)
        assert_close(got, merge(pre, fts, extras, knob), rtol=rtol, atol=atol)
        compiled.append(jitted._cache_size())
    assert compiled[1] == compiled[0]          # the second call (other values of every input) reused the first


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_and_grad_float64(name, x64):
    case = CASES[name]
    merge = merge_fn(case)
    pre, fts = make_models(np.float64, 0, case.shapes)
    extras = case.extras(pre, 0)
    knobs = as_knob(case.values[2], np.float64)
    batched = jax.vmap(merge, in_axes=(None, None, None, 0))(pre, fts, extras, knobs)
    for i in range(knobs.shape[0]):
        assert_close(jax.tree.map(lambda x: x[i], batched), merge(pre, fts, extras, knobs[i]),
                     rtol=1e-10, atol=1e-12)
    rng = np.random.default_rng(42)
    weights = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), pre)
    point = as_knob(case.values[3], np.float64)
    grad = jax.jit(jax.grad(lambda p, f, e, k: weighted_sum(merge(p, f, e, k), weights), argnums=3))(
        pre, fts, extras, point)
    want = reference_derivative(case, pre, fts, extras, case.values[3], weights)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.max(np.abs(np.asarray(want))) > 1e-3        # a derivative that can tell right from wrong
    np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_nan_raises_when_concrete_and_traces_when_traced(name):
    case = CASES[name]
    pre, fts = make_models(np.float32, 0, case.shapes)
    extras = case.extras(pre, 0)
    leaves, treedef = jax.tree.flatten(fts[2])
    bad = fts[:2] + [jax.tree.unflatten(treedef, leaves[:-1] + [leaves[-1].at[(1,) * leaves[-1].ndim].set(jnp.nan)])]
    last = leaves_with_paths(pre)[-1][0]
    knob = as_knob(case.values[0], np.float32)
    with pytest.raises(NonFiniteError, match=rf"finetuned\[2\]: leaf '{last}' holds 1 NaN") as info:
        merge_fn(case)(pre, bad, extras, knob)
    assert "\n" not in str(info.value)
    out = jitted_merge(case)(pre, bad, extras, knob)          # traced: no value check, no crash
    for (p, got), (_, want) in zip(leaves_with_paths(out), leaves_with_paths(pre)):
        assert got.shape == want.shape and got.dtype == want.dtype, p


def test_value_checks_skip_tracers_but_static_hyperparameters_must_be_static():
    pre, fts = make_models(np.float32)
    # out-of-range values are only knowable when concrete: eager raises, traced runs
    with pytest.raises(HyperparameterError, match="alpha"):
        get_method("regmean").merge(pre, fts, stats=make_stats(pre, 0), alpha=1.5)
    jax.jit(lambda a: get_method("regmean").merge(pre, fts, stats=make_stats(pre, 0), alpha=a))(jnp.float32(1.5))
    negative = [jax.tree.map(lambda f: -f, f) for f in positive_trees(pre, 0)]
    with pytest.raises(HyperparameterError, match="negative"):
        get_method("fisher").merge(pre, fts, fishers=negative)
    jax.jit(lambda f: get_method("fisher").merge(pre, fts, fishers=f))(negative)
    with pytest.raises(HyperparameterError, match="drop rate"):
        get_method("dare").merge(pre, fts, p=1.0)
    with pytest.raises(HyperparameterError, match="coefficients"):
        get_method("fisher").merge(pre, fts, fishers=positive_trees(pre, 0), coefficients=jnp.ones(2))
    with pytest.raises(HyperparameterError, match="seed must be"):
        get_method("dare").merge(pre, fts, seed="0")
    with pytest.raises(HyperparameterError, match="TALL-mask lam"):
        get_method("consensus").merge(pre, fts, lam="0.4")
    # a traced value where a static count is needed: a one-line error that says what to do
    for fn in (lambda q: tatr.tatr_merge(pre, fts, quantile=q), lambda r: pcb.pcb_merge(pre, fts, keep_ratio=r),
               lambda t: consensus.consensus_merge(pre, fts, base="ties", ties_k=t)):
        with pytest.raises(HyperparameterError, match="static Python number"):
            jax.jit(fn)(jnp.float32(0.5))
    with pytest.raises(HyperparameterError, match="static Python integer"):
        jax.jit(lambda k: consensus.consensus_merge(pre, fts, k=k))(2)


def test_fisher_estimators_trace_with_params_examples_and_key(x64):
    """The estimators loop over a static number of chunks, so they jit with params, examples and key traced.

    (Their eager values are checked against per-example loops and the exact Gaussian Fisher in
    tests/test_methods_extra.py; here the jitted call must equal the eager one.)
    """
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=2))}
    inputs = jnp.asarray(rng.normal(size=(5, 3)))

    def apply(p, x):
        return jnp.tanh(x @ p["w"] + p["b"][None])

    eager = fisher.unlabeled_fisher(apply, params, inputs, seed=jax.random.key(4), batch_size=2)
    traced = jax.jit(lambda p, x, key: fisher.unlabeled_fisher(apply, p, x, seed=key, batch_size=2))(
        params, inputs, jax.random.key(4))
    assert_close(traced, eager, rtol=1e-10, atol=1e-14)
