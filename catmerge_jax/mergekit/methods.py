"""MergeKit 0.1.5's 20 merge methods as data: each one's parameters (name, scope, type, default, range), its
inputs contract (base required / optional / ignored, how many models) and the JAX function over one weight.

:func:`merge_weight` runs a method on the tensors of one weight given in MergeKit's input order, with parameters
already resolved for that weight (per-input ones as lists); the recipe runner (:mod:`catmerge_jax.recipes`) and
the pytree methods (:mod:`catmerge_jax.mergekit.pytree`) are both thin loops around it.

Scopes are MergeKit's: ``shared`` (one value per weight), ``input`` (one per input model, the base included) and
``non_base`` (one per model other than the base).

>>> import jax.numpy as jnp
>>> w0, w1, w2 = jnp.zeros(3), jnp.array([1.0, -1.0, 2.0]), jnp.array([3.0, 1.0, -2.0])
>>> merge_weight("linear", [w1, w2], None, {"weight": [1.0, 1.0], "normalize": True}).tolist()
[2.0, 0.0, 0.0]
>>> merge_weight("task_arithmetic", [w0, w1, w2], 0, {"weight": [1.0, 0.5], "lambda": 1.0}).tolist()
[2.5, -0.5, 1.0]
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.errors import HyperparameterError
from catmerge_jax.mergekit import interpolation as ip
from catmerge_jax.mergekit import selective as sel
from catmerge_jax.mergekit.precision import widen
from catmerge_jax.mergekit.task_arithmetic import VARIANTS, generalized_task_arithmetic
from catmerge_jax.mergekit.tie_order import ascending_keys, check_tie_order, topk_mask
from catmerge_jax.tree import is_tracer

__all__ = ["REQUIRED", "Param", "Method", "METHODS", "merge_weight", "check_value", "check_inputs"]

REQUIRED = object()
"""Default of a parameter MergeKit requires (``weight`` of the task-arithmetic family, ``t`` of SLERP, ...)."""


class Param(NamedTuple):
    """One parameter of a method: ``low``/``high`` bound numeric values (inclusive unless ``open_low``)."""

    name: str
    scope: str                        # "shared" | "input" | "non_base"
    kind: type                        # float | int | bool
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    optional: bool = False            # None is a valid value (passthrough's scale)


class Method(NamedTuple):
    """A MergeKit method: parameters, inputs contract, and ``apply(base, models, params, key, work_dtype,
    tie_order)``."""

    name: str
    params: tuple[Param, ...]
    base: str                         # "required" | "optional" | "ignored"
    apply: Callable[..., jax.Array]
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    random: bool = False
    description: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _gta_params(variant) -> tuple[Param, ...]:
    params = [Param("int8_mask", "shared", bool, False), Param("normalize", "shared", bool, variant.normalize),
              Param("rescale", "shared", bool, variant.rescale), Param("lambda", "shared", float, 1.0),
              Param("weight", "non_base", float), Param("density", "non_base", float, 1.0, 0.0, 1.0)]
    if variant.sparsification == "magnitude_outliers":
        params.append(Param("gamma", "non_base", float, 0.01, 0.0, 1.0))
    if variant.sparsification == "della_magprune":
        params.append(Param("epsilon", "non_base", float, 0.15, 0.0, 1.0))
    return tuple(params)


def _gta_apply(variant):
    def apply(base, models, p, key, work_dtype, tie_order):
        return generalized_task_arithmetic(
            base, models, weight=p["weight"], density=p["density"], gamma=p.get("gamma", 0.01),
            epsilon=p.get("epsilon", 0.15), normalize=p["normalize"], rescale=p["rescale"], lam=p["lambda"],
            sparsification=variant.sparsification, consensus=variant.consensus, key=key, work_dtype=work_dtype,
            tie_order=tie_order)

    return apply


_STATIC = ("normalize", "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights", "max_iter", "filter_wise",
           "work_dtype", "has_scale")


@functools.partial(jax.jit, static_argnames=("name",) + _STATIC)
def _jitted(name, base, models, floats, keep=None, **static):
    """Every non-task-arithmetic kernel under one ``jit`` (floats traced, switches static)."""
    work = static["work_dtype"]
    models = jnp.stack([widen(m) for m in models])      # inside the jit: no separate copy
    base = None if base is None else widen(base)
    if name == "linear":
        return ip.linear(models, weight=floats["weight"], normalize=static["normalize"], work_dtype=work)
    if name == "slerp":
        return ip.slerp(base, models[0], t=floats["t"], work_dtype=work)
    if name == "nuslerp":
        return ip.nuslerp(base, models, weight=floats["weight"], nuslerp_row_wise=static["nuslerp_row_wise"],
                          nuslerp_flatten=static["nuslerp_flatten"], work_dtype=work)
    if name == "multislerp":
        return ip.multislerp(base, models, weight=floats["weight"], normalize_weights=static["normalize_weights"],
                             eps=floats["eps"], work_dtype=work)
    if name == "karcher":
        return ip.karcher(models, max_iter=static["max_iter"], tol=floats["tol"], work_dtype=work)
    if name == "model_stock":
        return ip.model_stock(base, models, filter_wise=static["filter_wise"], work_dtype=work)
    if name == "nearswap":
        return ip.nearswap(base, models[0], t=floats["t"], work_dtype=work)
    if name == "passthrough":
        return ip.passthrough(models[0], scale=floats["scale"][0] if static["has_scale"] else None, work_dtype=work)
    if name == "sce":
        return sel.sce(base, models, select_topk=floats["select_topk"], work_dtype=work, keep=keep)
    if name == "ram":
        return sel.ram(base, models, epsilon=floats["epsilon"], work_dtype=work)
    if name == "ramplus_tl":
        return sel.ramplus_tl(base, models, r=floats["r"], alpha=floats["alpha"], epsilon=floats["epsilon"],
                              work_dtype=work)
    if name == "arcee_fusion":
        return sel.arcee_fusion(base, models[0], work_dtype=work)
    raise KeyError(name)


def _sce_keep_host(base, models, select_topk, work_dtype, tie_order):
    """SCE's selection made on the host in ``tie_order`` (None: the kernel's in-graph one, ties to the lower
    index). MergeKit: ``torch.topk(var.abs().view(-1), int(count_nonzero(var) * select_topk))``."""
    if tie_order == "stable":
        return None
    if any(is_tracer(x) for x in (base, *models, select_topk)):
        raise HyperparameterError("tie_order='pytorch' needs concrete arrays (it selects on the host), not traced "
                                  "ones; use tie_order='stable' inside jit")
    select_topk = float(select_topk)
    if not 0 < select_topk < 1:
        return None
    var = np.asarray(sel.sce_variance(base, tuple(models), np.dtype(work_dtype).name))
    count = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk))   # MergeKit's int64 · float → float32
    return topk_mask(ascending_keys(np.abs(var), descending=True), count, tie_order).reshape(var.shape)


def _kernel_apply(name: str):
    def apply(base, models, p, key, work_dtype, tie_order):
        del key
        keep = None if name != "sce" else _sce_keep_host(base, models, p["select_topk"], work_dtype, tie_order)
        floats, static = {}, {k: False for k in _STATIC}
        static.update(work_dtype=np.dtype(work_dtype).name, max_iter=10, has_scale=False)
        for k, v in p.items():
            if k in _STATIC:
                static[k] = int(v) if k == "max_iter" else bool(v)
            elif k == "scale":
                static["has_scale"] = v is not None and not (isinstance(v, list) and v[0] is None)
                floats[k] = jnp.asarray([0.0 if x is None else x for x in (v if isinstance(v, list) else [v])],
                                        jnp.float32)
            elif k != "int8_mask":
                floats[k] = jnp.asarray(v, jnp.float32)
        return _jitted(name, base, models, floats, keep, **static)

    return apply


def _m(name, params, base, **kw):
    return Method(name, tuple(params), base, _kernel_apply(name), **kw)


_UNIT = dict(low=0.0, high=1.0)
METHODS: dict[str, Method] = {
    "linear": _m("linear", [Param("weight", "input", float), Param("normalize", "shared", bool, True)], "ignored",
                 description="weighted average of all inputs"),
    "slerp": _m("slerp", [Param("t", "shared", float, **_UNIT)], "required", min_inputs=2, max_inputs=2,
                description="spherical interpolation from the base (t=0) to the other model"),
    "nuslerp": _m("nuslerp", [Param("weight", "non_base", float), Param("nuslerp_row_wise", "shared", bool, False),
                              Param("nuslerp_flatten", "shared", bool, True)], "optional", min_non_base=2,
                  max_non_base=2, description="SLERP of two models (of their task vectors with a base)"),
    "multislerp": _m("multislerp", [Param("weight", "non_base", float),
                                    Param("normalize_weights", "shared", bool, True),
                                    Param("eps", "shared", float, 1e-8, 0.0, open_low=True)], "optional",
                     min_non_base=1, description="barycentric interpolation on the hypersphere"),
    "karcher": _m("karcher", [Param("max_iter", "shared", int, 10, 1.0), Param("tol", "shared", float, 1e-5, 0.0,
                                                                               open_low=True)], "ignored",
                  description="Karcher mean of the inputs' directions, scaled by their mean norm"),
    "model_stock": _m("model_stock", [Param("filter_wise", "shared", bool, False)], "required", min_inputs=3,
                      description="Model Stock: interpolate base and model average by the task vectors' angle"),
    "sce": _m("sce", [Param("int8_mask", "shared", bool, False), Param("select_topk", "shared", float, 1.0, **_UNIT)],
              "required", description="select by variance, weight by energy, erase sign conflicts"),
    "nearswap": _m("nearswap", [Param("t", "shared", float, low=0.0)], "required", min_inputs=2, max_inputs=2,
                   description="take the model's values near the base's, interpolate beyond distance t"),
    "passthrough": _m("passthrough", [Param("scale", "input", float, None, optional=True)], "ignored", max_inputs=1,
                      description="one input copied (times scale); with slices: layer stacking"),
    "arcee_fusion": _m("arcee_fusion", [], "required", min_inputs=2, max_inputs=2,
                       description="base, with the model's entries of outstanding KL-weighted change"),
    "ram": _m("ram", [Param("epsilon", "shared", float, 1e-5, 0.0)], "required",
              description="unique task-vector entries kept, shared ones averaged"),
    "ramplus_tl": _m("ramplus_tl", [Param("r", "shared", float, 0.1, 0.0), Param("alpha", "shared", float, 0.2, 0.0),
                                    Param("epsilon", "shared", float, 1e-5, 0.0)], "required",
                     description="RAM with unique entries scaled up by the shared/unique ratio"),
}
for _name, _variant in VARIANTS.items():
    METHODS[_name] = Method(_name, _gta_params(_variant), "required", _gta_apply(_variant),
                            random=_variant.sparsification in ("random", "della_magprune"),
                            description=f"generalized task arithmetic: sparsification {_variant.sparsification}, "
                                        f"consensus {_variant.consensus}")
METHODS = {name: METHODS[name] for name in sorted(METHODS)}


def check_value(method: Method, param: Param, value: Any, where: str) -> Any:
    """``value`` checked against ``param`` (type, finiteness, range); a one-line :class:`HyperparameterError`
    naming ``where`` otherwise. Returns the value converted to the parameter's type."""
    if value is None and param.optional:
        return None
    if param.kind is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise HyperparameterError(f"{where}: {method.name} parameter '{param.name}' must be true or false, "
                                      f"got {value!r}")
        return bool(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise HyperparameterError(f"{where}: {method.name} parameter '{param.name}' must be a number, got {value!r}")
    if param.kind is int and float(value) != int(value):
        raise HyperparameterError(f"{where}: {method.name} parameter '{param.name}' must be an integer, got {value}")
    value = int(value) if param.kind is int else float(value)
    if not math.isfinite(value):
        raise HyperparameterError(f"{where}: {method.name} parameter '{param.name}' must be finite, got {value}")
    low_bad = param.low is not None and (value <= param.low if param.open_low else value < param.low)
    high_bad = param.high is not None and value > param.high
    if low_bad or high_bad:
        lo = "-inf" if param.low is None else param.low
        hi = "inf" if param.high is None else param.high
        bracket = "(" if param.open_low else "["
        raise HyperparameterError(f"{where}: {method.name} parameter '{param.name}' must be in {bracket}{lo}, {hi}], "
                                  f"got {value}")
    return value


def check_inputs(method: Method, n_inputs: int, has_base: bool, where: str) -> None:
    """MergeKit's input contract: a base where required (none where ignored), and the counts of inputs."""
    if method.base == "required" and not has_base:
        raise HyperparameterError(f"{where}: merge_method {method.name} needs a base_model")
    non_base = n_inputs - int(has_base and method.base != "ignored")
    if n_inputs < method.min_inputs or (method.max_inputs is not None and n_inputs > method.max_inputs):
        want = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs else
                f"at most {method.max_inputs}" if method.max_inputs is not None else f"at least {method.min_inputs}")
        raise HyperparameterError(f"{where}: merge_method {method.name} takes {want} input model(s) (the base "
                                  f"included), got {n_inputs}")
    if non_base < method.min_non_base or (method.max_non_base is not None and non_base > method.max_non_base):
        want = (f"exactly {method.min_non_base}" if method.min_non_base == method.max_non_base else
                f"at least {method.min_non_base}")
        raise HyperparameterError(f"{where}: merge_method {method.name} takes {want} model(s) besides the base, "
                                  f"got {non_base}")


def merge_weight(name: str, inputs: Sequence[jax.Array], base_index: int | None, params: dict, *,
                 key: jax.Array | None = None, work_dtype: Any = None, tie_order: str = "stable") -> jax.Array:
    """MergeKit method ``name`` on one weight.

    Args:
      inputs: the weight of every input model (any float dtype; bf16/f16 are widened to float32 inside the jitted
        kernel), in MergeKit's order (the recipe's
        ``models``, then the base if it is not among them).
      base_index: which input is the base (None: no base). Methods that ignore the base merge every input.
      params: resolved parameters for this weight: shared ones as values, per-input ones as lists in input order
        (``non_base`` ones without the base's entry). Missing ones take the method's defaults.
      key: ``jax.random`` key for the randomized methods (DARE, DELLA).
      work_dtype: the dtype MergeKit would compute in (default: the inputs' dtype).
      tie_order: which of entries tied at a magnitude cut (TIES, Breadcrumbs, SCE) are kept
        (:mod:`~catmerge_jax.mergekit.tie_order`): "stable", the lower index (jittable), or "pytorch", MergeKit's
        choice (PyTorch's CPU sort order, reproduced on the host; concrete inputs only).
    Returns:
      the merged weight (the inputs' compute dtype, rounded to ``work_dtype``).
    """
    method = METHODS[name]
    check_tie_order(tie_order)
    work_dtype = np.dtype(inputs[0].dtype if work_dtype is None else work_dtype)
    p = {q.name: q.default for q in method.params if q.default is not REQUIRED}
    p.update(params)
    missing = [q.name for q in method.params if q.name not in p]
    if missing:
        raise HyperparameterError(f"{name}: missing required parameter '{missing[0]}'")
    inputs = [jnp.asarray(x) for x in inputs]
    if method.base == "ignored" or base_index is None:
        base, models = None, inputs
    else:
        base = inputs[base_index]
        models = [x for i, x in enumerate(inputs) if i != base_index]
    if method.base != "ignored" and not models:
        return base
    if method.random and key is None:
        key = jax.random.key(0)
    return method.apply(base, tuple(models), p, key, work_dtype, tie_order)
