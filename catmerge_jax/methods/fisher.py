"""Fisher merging (Matena & Raffel, 2022): a per-parameter weighted average with diagonal Fisher weights.

For K fine-tuned models with diagonal Fishers ``F_k`` (same tree as the params) and model coefficients ``λ_k``::

    W = Σ_k λ_k F̂_k ∘ W_k / Σ_k λ_k F̂_k,      F̂_k = max(F_k, ε)

The floor ``ε`` (Matena & Raffel's ``fisher_floor``) keeps the division defined; where every Fisher is zero
(and ``ε = 0``) the parameter falls back to the λ-weighted plain average. Fisher merging averages whole weights,
so the pretrained model only fixes the tree structure and dtypes.

Fishers come from per-example gradients, computed with one ``jax.vmap(jax.grad(loss))`` over a chunk of examples
(never a Python loop over examples):

* :func:`diagonal_fisher` — ``F = mean_n (∇θ ℓ(θ, x_n))²`` for any per-example loss (with labels: the empirical
  Fisher; with labels sampled from the model: the true Fisher).
* :func:`unlabeled_fisher` — no labels: the expected Fisher of a unit-variance Gaussian output model, see its
  docstring.
* :func:`per_example_gradient_mean` — the shared engine (``mean_n h(∇ℓ_n)`` for an elementwise ``h``); TATR uses it
  with ``h = |·|``.

>>> import jax.numpy as jnp
>>> import catmerge_jax.methods.fisher as fm
>>> w0 = {"w": jnp.zeros(3)}
>>> fts = [{"w": jnp.array([1.0, 1.0, 1.0])}, {"w": jnp.array([3.0, 3.0, 3.0])}]
>>> fishers = [{"w": jnp.array([1.0, 0.0, 0.0])}, {"w": jnp.array([1.0, 1.0, 0.0])}]
>>> fm.fisher_merge(w0, fts, fishers, epsilon=0.0)["w"].tolist()
[2.0, 3.0, 2.0]
>>> loss = lambda p, x: jnp.sum(p["w"] * x) ** 2 / 2          # per-example loss
>>> fm.diagonal_fisher(loss, {"w": jnp.ones(3)}, jnp.eye(3))["w"].tolist()
[0.3333333432674408, 0.3333333432674408, 0.3333333432674408]

:func:`fisher_merge` runs under ``jax.jit``/``vmap``/``grad`` with params, Fishers, ``epsilon`` and the model
coefficients ``λ_k`` traced (Fisher merging has no α: it averages whole weights). The checks on values (NaN/Inf,
negative Fishers, ``ε >= 0``, ``λ_k >= 0`` not all zero) run only on concrete inputs; under tracing only the tree
structure, shapes and the number of coefficients are checked. The estimators (:func:`diagonal_fisher`,
:func:`unlabeled_fisher`) walk the examples in Python-side chunks whose number is fixed by the (static) example
count and ``batch_size``, so they trace too, with params, examples and the seed (an int array or a key) traced.

>>> import jax
>>> jax.jit(fm.fisher_merge)(w0, fts, fishers, epsilon=0.0, coefficients=jnp.array([1.0, 3.0]))["w"].tolist()
[2.5, 3.0, 2.5]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.cat import check_scalar
from catmerge_jax.errors import HyperparameterError, MissingStatisticsError, TreeMismatchError
from catmerge_jax.methods.dare import as_key
from catmerge_jax.methods.pcb import merge_inputs, per_task_trees
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.tree import PyTree, check_finite, check_same_structure, is_concrete, is_tracer, leaves_with_paths


def _compute_dtype(x: Any) -> np.dtype:
    """float32 for narrower floats (bf16/f16 are computed in float32), else the leaf's own float dtype."""
    dt = np.dtype(jnp.result_type(x))
    return dt if jnp.issubdtype(dt, jnp.floating) and dt.itemsize >= 4 else np.dtype(np.float32)


def _num_examples(examples: PyTree) -> int:
    leaves = leaves_with_paths(examples)
    if not leaves:
        raise HyperparameterError("examples is an empty pytree; need at least one array with a leading example axis")
    sizes = {p: int(np.shape(x)[0]) if np.ndim(x) else None for p, x in leaves}
    if any(s is None for s in sizes.values()):
        bad = next(p for p, s in sizes.items() if s is None)
        raise TreeMismatchError(f"examples leaf '{bad or '<root>'}' is a scalar; every leaf needs a leading example "
                                "axis")
    if len(set(sizes.values())) != 1:
        raise TreeMismatchError(f"examples leaves disagree on the number of examples: {sizes}")
    n = next(iter(sizes.values()))
    if n < 1:
        raise HyperparameterError("need at least one example, got 0")
    return n


@functools.partial(jax.jit, static_argnames=("fn",))
def _chunk_sum(fn: Callable[..., PyTree], params: PyTree, examples: PyTree, consts: Any) -> PyTree:
    return jax.tree.map(lambda v: jnp.sum(v, axis=0), jax.vmap(fn, in_axes=(None, 0, None))(params, examples, consts))


def _mean_over_examples(fn: Callable[..., PyTree], params: PyTree, examples: PyTree, consts: Any = None, *,
                        batch_size: int | None, progress: bool, desc: str) -> PyTree:
    """``(1/N) Σ_n fn(params, example_n, consts)``: ``vmap`` over chunks of ``batch_size`` examples.

    ``fn`` is a static (hashable) argument of one jitted function, so repeated calls with the same ``fn`` — one per
    task, say — compile once per chunk shape.
    """
    n = _num_examples(examples)
    chunk = n if batch_size is None else int(batch_size)
    if chunk < 1:
        raise HyperparameterError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="chunk")
    total = None
    for s in starts:
        part = _chunk_sum(fn, params, jax.tree.map(lambda x: x[s: s + chunk], examples), consts)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return jax.tree.map(lambda t: t / n, total)


@dataclasses.dataclass(frozen=True)
class _TransformedGradient:
    """``transform(∇θ loss_fn(θ, example))`` — a value (hashable by its fields) so jit caches across calls."""

    loss_fn: Callable[[PyTree, Any], jax.Array]
    transform: Callable[[jax.Array], jax.Array]

    def __call__(self, params: PyTree, example: Any, consts: Any) -> PyTree:
        grads = jax.grad(self.loss_fn)(params, example)
        return jax.tree.map(lambda g: self.transform(g.astype(_compute_dtype(g))), grads)


@dataclasses.dataclass(frozen=True)
class _GaussianOutputSquaredGradient:
    """Per example: ``mean_s (∇θ ½‖f(x) − y_s‖²)²`` with ``y_s = stop_gradient(f(x)) + ε_s``, ``ε_s ~ N(0, I)``."""

    apply_fn: Callable[[PyTree, Any], Any]
    num_samples: int
    add_batch_axis: bool

    def sample_losses(self, params: PyTree, example: Any, key: jax.Array) -> jax.Array:
        """``(S,)`` losses, one per Gaussian draw; example ``n`` draws from ``fold_in(key, n)``."""
        x, index = example
        x = jax.tree.map(lambda a: a[None], x) if self.add_batch_axis else x
        outputs = jax.tree.leaves(self.apply_fn(params, x))
        keys = jax.random.split(jax.random.fold_in(key, index), len(outputs))
        total = 0.0
        for out, k in zip(outputs, keys):
            eps = jax.random.normal(k, (self.num_samples, *out.shape), _compute_dtype(out.dtype))
            target = jax.lax.stop_gradient(out)[None] + eps
            total = total + 0.5 * jnp.sum((out[None] - target) ** 2, axis=tuple(range(1, eps.ndim)))
        return total

    def __call__(self, params: PyTree, example: Any, key: jax.Array) -> PyTree:
        # One gradient per sample (a Jacobian of the S losses: one forward pass, S backward), squared, then
        # averaged: the square of a summed gradient would add cross terms between samples.
        jac = jax.jacrev(self.sample_losses)(params, example, key)
        return jax.tree.map(lambda g: jnp.mean(jnp.square(g.astype(_compute_dtype(g))), axis=0), jac)


def per_example_gradient_mean(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, examples: PyTree, *,
                              transform: Callable[[jax.Array], jax.Array] = jnp.square,
                              batch_size: int | None = None, progress: bool = False) -> PyTree:
    """``mean_n transform(∇θ loss_fn(θ, example_n))`` with per-example gradients from ``vmap(grad)``.

    Args:
      loss_fn: ``(params, example) -> scalar``; ``example`` is one slice of ``examples`` (no example axis).
      params: the point θ where gradients are taken (any pytree of float arrays).
      examples: a pytree whose leaves share a leading example axis of size N.
      transform: elementwise map applied to each per-example gradient before averaging (``jnp.square`` for the
        diagonal Fisher, ``jnp.abs`` for a mean absolute gradient).
      batch_size: examples per vmapped chunk (bounds memory at ``batch_size × |params|``); all at once if None.
      progress: a tqdm bar over chunks.
    Returns:
      A tree like ``params`` (float32 or wider) holding the average over the N examples. Calls with the same
      ``loss_fn`` and ``transform`` objects reuse one compilation.
    """
    return _mean_over_examples(_TransformedGradient(loss_fn, transform), params, examples, batch_size=batch_size,
                               progress=progress, desc="per-example gradients")


def diagonal_fisher(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, examples: PyTree, *,
                    batch_size: int | None = None, progress: bool = False) -> PyTree:
    """Diagonal Fisher ``F = (1/N) Σ_n (∇θ ℓ(θ, x_n))²`` from per-example gradients (one ``vmap(grad)``).

    ``loss_fn(params, example)`` is the per-example negative log-likelihood: with the true labels this is the
    empirical Fisher; with labels drawn from the model's own predictive distribution it is the (sampled) Fisher
    that Matena & Raffel use.

    Args:
      loss_fn: ``(params, example) -> scalar``.
      params: θ (a pytree).
      examples: pytree with a leading example axis ``(N, ...)`` on every leaf (inputs and labels together).
      batch_size: examples per vmapped chunk (None: all at once).
      progress: tqdm bar over chunks.
    Returns:
      A tree like ``params``: the diagonal Fisher, float32 or wider.
    """
    return per_example_gradient_mean(loss_fn, params, examples, transform=jnp.square, batch_size=batch_size,
                                     progress=progress)


def unlabeled_fisher(apply_fn: Callable[[PyTree, Any], Any], params: PyTree, inputs: PyTree, *, seed: Any = 0,
                     num_samples: int = 1, batch_size: int | None = None, add_batch_axis: bool = True,
                     progress: bool = False) -> PyTree:
    """A label-free diagonal Fisher: the expected Fisher of a Gaussian output model, by seeded Monte Carlo.

    The model's output ``f(x)`` (any pytree of arrays, e.g. logits or an embedding) is read as the mean of
    ``p(y | x) = N(f(x), I)``. The Fisher of that model is ``E_x E_{y~p(y|x)} [(∇θ log p(y|x))²]`` and
    ``∇θ log p(y|x) = J(x)ᵀ (y − f(x)) = J(x)ᵀ ε`` with ``ε ~ N(0, I)`` — so the per-sample gradient is the gradient
    of ``½‖f(x) − y‖²`` with ``y = stop_gradient(f(x)) + ε`` drawn around the model's own (detached) output. Its
    exact expectation is ``diag(JᵀJ)`` summed over outputs: the sensitivity of every output to every weight, with
    no labels and no choice of loss. It is estimated with ``num_samples`` draws per example; example ``n`` uses the
    key ``fold_in(key(seed), n)``, so the result is deterministic and independent of ``batch_size``. Calls with the
    same ``apply_fn`` object (one per task, say) reuse one compilation.

    Args:
      apply_fn: ``(params, x) -> output pytree``; e.g. ``model.apply`` wrapped to take the params tree.
      params: θ.
      inputs: pytree with a leading example axis ``(N, ...)``.
      seed: int or ``jax.random`` key.
      num_samples: Gaussian draws per example (≥ 1).
      batch_size: examples per vmapped chunk (None: all at once).
      add_batch_axis: call ``apply_fn`` on ``x[None]`` (a batch of one), as Flax modules expect; False passes
        the bare example.
      progress: tqdm bar over chunks.
    Returns:
      A tree like ``params``: the estimated diagonal Fisher.
    """
    if int(num_samples) < 1:
        raise HyperparameterError(f"num_samples must be >= 1, got {num_samples}")
    n = _num_examples(inputs)
    fn = _GaussianOutputSquaredGradient(apply_fn, int(num_samples), bool(add_batch_axis))
    return _mean_over_examples(fn, params, (inputs, jnp.arange(n)), as_key(seed), batch_size=batch_size,
                               progress=progress, desc="unlabeled Fisher")


@jax.jit
def _fisher_leaf(base: jax.Array, weights: Sequence[jax.Array], fishers: Sequence[jax.Array],
                 coefficients: jax.Array, epsilon: float | jax.Array) -> jax.Array:
    """K weights and Fishers of one leaf → their Fisher-weighted average, in ``base``'s dtype."""
    dt = _compute_dtype(base)
    w = jnp.stack([x.astype(dt) for x in weights])
    lam = coefficients.astype(dt).reshape((-1,) + (1,) * (w.ndim - 1))
    f = lam * jnp.maximum(jnp.stack([x.astype(dt) for x in fishers]), jnp.asarray(epsilon).astype(dt))
    den = f.sum(0)
    plain = (lam * w).sum(0) / lam.sum()
    return jnp.where(den > 0, (f * w).sum(0) / jnp.where(den > 0, den, 1), plain).astype(base.dtype)


def _coefficients(coefficients: Sequence[float] | jax.Array | None, num_tasks: int) -> jax.Array:
    """``(K,)`` model coefficients λ_k (uniform if None); values checked when concrete, shape always."""
    expected = f"coefficients must be {num_tasks} finite values >= 0, not all zero; got {coefficients!r}"
    if coefficients is None:
        return jnp.ones(num_tasks)
    try:
        lam = jnp.stack([jnp.asarray(c) for c in coefficients]) if isinstance(coefficients, (list, tuple)) \
            else jnp.asarray(coefficients)
    except (TypeError, ValueError):
        raise HyperparameterError(expected) from None
    if lam.shape != (num_tasks,) or not (jnp.issubdtype(lam.dtype, jnp.floating) or
                                         jnp.issubdtype(lam.dtype, jnp.integer)) or lam.dtype == jnp.bool_:
        raise HyperparameterError(expected)
    if not is_tracer(lam):
        host = np.asarray(lam, np.float64)
        if np.any(host < 0) or not np.all(np.isfinite(host)) or host.sum() <= 0:
            raise HyperparameterError(expected)
    return lam


def fisher_merge(pretrained: PyTree, finetuned: Sequence[PyTree], fishers: Sequence[PyTree], *,
                 epsilon: float = 1e-6, coefficients: Sequence[float] | None = None,
                 progress: bool = False) -> PyTree:
    """``W = Σ_k λ_k max(F_k, ε) W_k / Σ_k λ_k max(F_k, ε)`` leaf by leaf (Matena & Raffel, 2022).

    Args:
      pretrained: W0 — fixes the structure, shapes and output dtypes (Fisher merging averages whole weights).
        A params pytree, an ``nnx.Module`` or an ``equinox.Module`` (the result is then the same kind).
      finetuned: K trees ``W_k`` of the same kind.
      fishers: K trees of diagonal Fishers (same structure and shapes as the params; any float dtype), e.g.
        from :func:`diagonal_fisher` or :func:`unlabeled_fisher` at each ``W_k``. For module inputs: modules
        holding the Fishers in place of the weights, or their params trees (``nnx.state(m, nnx.Param)``,
        ``eqx.filter(m, eqx.is_inexact_array)``).
      epsilon: Fisher floor ε ≥ 0 (Matena & Raffel's ``fisher_floor``, 1e-6). Where ``Σ_k λ_k F̂_k = 0`` the
        result is the λ-weighted plain average. May be traced.
      coefficients: model weights ``λ_k ≥ 0`` (uniform if None), not all zero; a list or a ``(K,)`` array, may
        be traced (``jit``/``vmap``/``grad``).
      progress: tqdm bar over leaves.
    Returns:
      The merged params, same structure and dtypes as ``pretrained`` (a module for a module).
    """
    view, fts = merge_inputs(pretrained, finetuned)
    fishers = per_task_trees(fishers, "fishers", len(fts), "Fisher tree")
    for k, f in enumerate(fishers):
        check_same_structure(view.params, f, what=f"fishers[{k}]", check_dtype=False)
        check_finite(f, what=f"fishers[{k}]")
        negative = [p for p, x in leaves_with_paths(f) if is_concrete(x) and np.any(np.asarray(x) < 0)]
        if negative:
            raise HyperparameterError(f"fishers[{k}]: leaf '{negative[0]}' holds negative values; a diagonal "
                                      "Fisher is non-negative")
    check_scalar("epsilon (Fisher floor)", epsilon, minimum=0.0)
    lam = _coefficients(coefficients, len(fts))

    base_leaves, treedef = jax.tree.flatten(view.params)
    columns = list(zip(*[jax.tree.leaves(t) for t in fts]))
    fisher_columns = list(zip(*[jax.tree.leaves(f) for f in fishers]))
    indices = range(len(base_leaves))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="Fisher merge", unit="leaf")
    merged = [_fisher_leaf(jnp.asarray(base_leaves[j]), columns[j], fisher_columns[j], lam, epsilon)
              for j in indices]
    return view.rebuild(jax.tree.unflatten(treedef, merged))


def _merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, fishers=None, **hparams):
    """Registry adapter: ``fishers=[F_1, ..., F_K]`` is required (``extras=("fishers",)``)."""
    if fishers is None:
        raise MissingStatisticsError("fisher merging needs fishers=[F_1, ..., F_K] (diagonal Fisher trees, e.g. from "
                                     "catmerge_jax.methods.fisher.unlabeled_fisher)")
    return fisher_merge(pretrained, finetuned, fishers, progress=progress, **hparams)


register(MergeMethod("fisher", _merge, {"epsilon": 1e-6}, extras=("fishers",),
                     description="Fisher merging (Matena & Raffel, 2022): diagonal-Fisher-weighted average"))

__all__ = ["fisher_merge", "diagonal_fisher", "unlabeled_fisher", "per_example_gradient_mean"]
