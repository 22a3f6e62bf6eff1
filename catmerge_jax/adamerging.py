"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation on unlabeled inputs.

The merged model is ``W0 + Σ_k λ_k ⊙ τ_k`` (:func:`catmerge_jax.cat.combine`), with one coefficient per task
(``granularity="task"``) or one per task and parameter leaf (``"layer"``). The coefficients minimise the Shannon
entropy of the merged model's predictions on unlabeled test-time inputs, with any optax optimizer. The task
vectors can be anything of the params' shape: plain (``cm.task_vectors``), TIES-trimmed (``cm.ties_trim``,
AdaMerging++) or CAT-trimmed (``cm.cat_trim``).

The update is one jitted function of ``(coefficients, optimizer state, W0, task vectors, batch)``, so it compiles
once and runs for every step; the pieces are values (:class:`AdaMerging`, an init/step pair, optax-style), and
:func:`adamerging` is the loop around them.

>>> import jax, jax.numpy as jnp
>>> import catmerge_jax as cm
>>> w0 = {"w": jnp.zeros((2, 2))}
>>> tvs = [{"w": jnp.array([[4.0, 0.0], [0.0, 0.0]])}, {"w": jnp.array([[0.0, 0.0], [0.0, -4.0]])}]
>>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
>>> result = cm.adamerging(w0, tvs, lambda p, b: b @ p["w"], x, granularity="task", steps=50,
...                        learning_rate=0.05)
>>> bool(result.losses[-1] < result.losses[0])
True
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from catmerge_jax.cat import check_scalar, combine, finetuned_list, params_view
from catmerge_jax.errors import HyperparameterError
from catmerge_jax.tree import PyTree, check_same_structure

LogitsFn = Callable[[PyTree, Any], Any]


def prediction_entropy(logits: Any) -> jax.Array:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over all rows; a list of logit arrays gives the sum of
    their means (one term per task head, as AdaMerging sums over tasks).

    Args:
      logits: ``(..., classes)`` or a list/tuple of such arrays.
    """
    if isinstance(logits, (list, tuple)):
        return sum(prediction_entropy(x) for x in logits)
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.promote_types(jnp.asarray(logits).dtype, jnp.float32)), -1)
    return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, axis=-1))


def initial_coefficients(pretrained: PyTree, num_tasks: int, *, granularity: str = "layer",
                         init: float | Any = 0.3) -> Any:
    """Starting coefficients: ``(K,)`` for ``"task"``, a params-shaped tree of ``(K,)`` for ``"layer"``."""
    if granularity not in ("task", "layer"):
        raise HyperparameterError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    start = jnp.broadcast_to(jnp.asarray(init, jnp.float32), (num_tasks,))
    if granularity == "task":
        return start
    return jax.tree.map(lambda _: start, params_view(pretrained).params)


class AdaMerging(NamedTuple):
    """The learning rule as a value: ``init(pretrained, num_tasks) -> (coefficients, opt_state)`` and
    ``step(coefficients, opt_state, pretrained, task_vectors, batch) -> (coefficients, opt_state, loss)`` (jitted).
    """

    init: Callable[..., tuple[Any, Any]]
    step: Callable[..., tuple[Any, Any, jax.Array]]


def adamerging_rule(logits_fn: LogitsFn, *, granularity: str = "layer", init: float = 0.3,
                    optimizer: optax.GradientTransformation | None = None, learning_rate: float = 1e-3,
                    bounds: tuple[float, float] | None = (0.0, 1.0)) -> AdaMerging:
    """An :class:`AdaMerging` rule.

    Args:
      logits_fn: ``logits_fn(params, batch)`` → logits ``(..., classes)`` or a list of them (one per task head).
      granularity: ``"task"`` (one λ per task) or ``"layer"`` (one λ per task and leaf).
      init: starting coefficient (the paper: 0.3).
      optimizer: any optax transformation (default ``optax.adam(learning_rate)``, as the paper).
      bounds: coefficients are clipped to this interval after every step (the authors' code clamps to [0, 1]);
        ``None`` leaves them free.
    """
    if optimizer is None:
        check_scalar("learning_rate", learning_rate, minimum=0.0)
        optimizer = optax.adam(learning_rate)
    if bounds is not None and not bounds[0] <= bounds[1]:
        raise HyperparameterError(f"bounds must be (low, high) with low <= high, got {bounds}")

    def loss(coefficients, pretrained, task_vectors, batch):
        return prediction_entropy(logits_fn(combine(pretrained, task_vectors, coefficients), batch))

    @jax.jit
    def step(coefficients, opt_state, pretrained, task_vectors, batch):
        value, grads = jax.value_and_grad(loss)(coefficients, pretrained, task_vectors, batch)
        updates, opt_state = optimizer.update(grads, opt_state, coefficients)
        coefficients = optax.apply_updates(coefficients, updates)
        if bounds is not None:
            coefficients = jax.tree.map(lambda c: jnp.clip(c, bounds[0], bounds[1]), coefficients)
        return coefficients, opt_state, value

    def init_fn(pretrained, num_tasks):
        coefficients = initial_coefficients(pretrained, num_tasks, granularity=granularity, init=init)
        return coefficients, optimizer.init(coefficients)

    return AdaMerging(init_fn, step)


class AdaMergingResult(NamedTuple):
    """What :func:`adamerging` returns: the merged params, the learned coefficients and the loss history."""

    params: Any            # the merged model with the learned coefficients
    coefficients: Any      # (K,) or a params-shaped tree of (K,)
    losses: np.ndarray     # entropy before each step, (steps,)


def adamerging(pretrained: Any, task_vectors: Sequence[PyTree], logits_fn: LogitsFn, data: Any, *,
               granularity: str = "layer", init: float = 0.3, steps: int = 100, learning_rate: float = 1e-3,
               optimizer: optax.GradientTransformation | None = None,
               bounds: tuple[float, float] | None = (0.0, 1.0), progress: bool = False) -> AdaMergingResult:
    """Learn AdaMerging coefficients and return the merged model.

    Args:
      pretrained: ``W0`` (params pytree, nnx or equinox module).
      task_vectors: K task-vector trees: ``cm.task_vectors(W0, finetuned)`` (AdaMerging), ``cm.ties_trim(...)``
        (AdaMerging++) or ``cm.cat_trim(...)`` (CAT + AdaMerging).
      logits_fn: ``logits_fn(params, batch)`` → logits or a list of logits (e.g. each task's inputs through the
        merged backbone and that task's own head).
      data: unlabeled inputs: a fixed pytree batch used at every step, or a function ``step -> batch`` (every
        batch the same shapes, so the step compiles once).
      granularity, init, learning_rate, optimizer, bounds: see :func:`adamerging_rule`.
      steps: optimisation steps (static).
      progress: tqdm bar over steps.
    Returns:
      :class:`AdaMergingResult` with the merged params, the coefficients and the entropy at every step.
    """
    tvs = finetuned_list(task_vectors)
    if not tvs:
        raise HyperparameterError("adamerging needs at least one task vector (K >= 1)")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise HyperparameterError(f"steps must be an int >= 0, got {steps!r}")
    view = params_view(pretrained)
    for k, t in enumerate(tvs):
        check_same_structure(view.params, t, what=f"task_vectors[{k}]", check_dtype=False)
    rule = adamerging_rule(logits_fn, granularity=granularity, init=init, optimizer=optimizer,
                           learning_rate=learning_rate, bounds=bounds)
    coefficients, opt_state = rule.init(view.params, len(tvs))
    batch_of = data if callable(data) else (lambda _step: data)
    from tqdm.auto import tqdm

    losses = []
    for i in tqdm(range(steps), desc="AdaMerging", unit="step", disable=not progress, leave=False):
        coefficients, opt_state, loss = rule.step(coefficients, opt_state, view.params, tvs, batch_of(i))
        losses.append(loss)
    merged = combine(pretrained, tvs, coefficients)
    return AdaMergingResult(merged, coefficients, np.asarray(jax.device_get(losses), np.float64))


__all__ = ["AdaMerging", "AdaMergingResult", "adamerging", "adamerging_rule", "initial_coefficients",
           "prediction_entropy"]
