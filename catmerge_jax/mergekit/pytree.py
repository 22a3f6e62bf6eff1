"""MergeKit's 20 methods as registered methods of the Python API: pytree in, pytree out, jittable.

Each is registered as ``mergekit.<name>`` (``mergekit.ties``, ``mergekit.slerp``, ...) beside this library's own
methods, some of which share a bare name with other semantics (``ties`` is the TIES paper's model-wide top-k with a
disjoint mean, FusionBench's; ``mergekit.ties`` is MergeKit's per-tensor density with weights and ``normalize``)::

    merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, seed=0, dtype=None, **params)

``pretrained`` is the base (MergeKit's ``base_model``), ``finetuned`` the K other models. Parameters are MergeKit's
(see :data:`catmerge_jax.mergekit.methods.METHODS`): a per-model one (``weight``, ``density``, ``gamma``,
``epsilon``, ``scale``) is a scalar for every model or a list of K; ``lambda`` may also be spelled ``lam``. Where
MergeKit requires ``weight`` it defaults to 1.0 here. Methods that ignore the base (``linear``, ``karcher``,
``passthrough``) merge the ``finetuned`` models only (pass the base among them to include it, as a recipe's
``base_model`` does). ``dtype`` is the working dtype MergeKit computes in (default: each leaf's own dtype); as in MergeKit, the inputs
are cast to it first.
DARE and DELLA draw leaf ``j``'s masks from ``fold_in(key(seed), j)``; ``seed`` may be a key. Non-float leaves are
the base's.

>>> import jax, jax.numpy as jnp
>>> import catmerge_jax as cm
>>> w0 = {"w": jnp.zeros(4)}
>>> fts = [{"w": jnp.array([1.0, -2.0, 0.5, 0.0])}, {"w": jnp.array([1.0, 1.0, -0.1, 0.0])}]
>>> cm.get_method("mergekit.ties").merge(w0, fts, density=0.5)["w"].tolist()
[1.0, -2.0, 0.0, 0.0]
>>> linear = jax.jit(lambda a, b: cm.get_method("mergekit.linear").merge(a, b, weight=[1.0, 3.0]))
>>> [round(v, 4) for v in linear(w0, fts)["w"].tolist()]
[1.0, 0.25, 0.05, 0.0]
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.errors import HyperparameterError
from catmerge_jax.mergekit.methods import METHODS, REQUIRED, check_inputs, check_value, merge_weight
from catmerge_jax.methods.registry import MergeMethod, register
from catmerge_jax.tree import PyTree, is_tracer

__all__ = ["PREFIX", "mergekit_merge", "method_name", "resolve_params"]

PREFIX = "mergekit."


def method_name(name: str) -> str:
    """The registry name of MergeKit's method ``name`` (``"ties"`` → ``"mergekit.ties"``)."""
    return PREFIX + name


def _per_model(method, param, value, k: int):
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise HyperparameterError(f"{method.name} parameter '{param.name}': {len(value)} values for {k} models")
        values = list(value)
    else:
        values = [value] * k
    return [v if is_tracer(v) else check_value(method, param, v, f"mergekit.{method.name}") for v in values]


def _leaf_inputs(leaf):
    dt = np.dtype(leaf.dtype)
    compute = np.float64 if dt == np.float64 else np.float32
    return jnp.asarray(leaf).astype(compute)


def resolve_params(name: str, params: dict, k: int) -> dict:
    """``params`` of MergeKit method ``name`` for K models, checked (concrete values) and completed with defaults:
    shared ones as values, per-model ones as lists of K."""
    method = METHODS[name]
    params = dict(params)
    if "lam" in params:
        if "lambda" in params:
            raise HyperparameterError("give lambda once (lam is its other spelling)")
        params["lambda"] = params.pop("lam")
    known = {p.name for p in method.params}
    unknown = sorted(set(params) - known)
    if unknown:
        raise HyperparameterError(f"mergekit.{name} takes no parameter '{unknown[0]}'; its parameters: "
                                  f"{', '.join(sorted(known)) or 'none'}")
    resolved = {}
    for p in method.params:
        value = params.get(p.name, p.default)
        if value is REQUIRED:
            if p.name != "weight":
                raise HyperparameterError(f"mergekit.{name} needs parameter '{p.name}'")
            value = 1.0
        if p.scope == "shared":
            resolved[p.name] = value if is_tracer(value) else check_value(method, p, value, f"mergekit.{name}")
        else:
            resolved[p.name] = _per_model(method, p, value, k)
    if method.name in ("della", "della_linear"):
        for d, e in zip(resolved["density"], resolved["epsilon"]):
            if not (is_tracer(d) or is_tracer(e)) and 0 < d < 1 and not (0 < d - e and d + e < 1):
                raise HyperparameterError(f"mergekit.{name}: density ± epsilon must lie in (0, 1), got density {d}, "
                                          f"epsilon {e}")
    return resolved


class PreparedInputs(NamedTuple):
    """What both pytree entry points (here and :mod:`catmerge_jax.mergekit.sharded`) start from: the method, the
    base's view (``rebuild`` restores a module/wrapper), whether the base is one of the merge's inputs, the resolved
    parameters, the flattened base and task leaves and the base's treedef."""

    method: Any
    view: Any
    uses_base: bool
    resolved: dict
    base_leaves: list
    ft_leaves: list
    treedef: Any


def prepare_inputs(name: str, pretrained: PyTree, finetuned: Sequence[PyTree], params: dict) -> PreparedInputs:
    """Check the trees and the parameters of MergeKit method ``name`` once, for either entry point."""
    from catmerge_jax.cat import finetuned_list, params_view, validate_inputs

    method = METHODS[name]
    view = params_view(pretrained)
    fts = [params_view(f).params for f in finetuned_list(finetuned)]
    validate_inputs(view.params, fts)
    uses_base = method.base != "ignored"
    check_inputs(method, len(fts) + int(uses_base), uses_base, f"mergekit.{name}")
    resolved = resolve_params(name, params, len(fts))
    base_leaves, treedef = jax.tree.flatten(view.params)
    return PreparedInputs(method, view, uses_base, resolved, base_leaves, [jax.tree.leaves(f) for f in fts], treedef)


def mergekit_merge(name: str, pretrained: PyTree, finetuned: Sequence[PyTree], *, seed: Any = 0, dtype: Any = None,
                   **params) -> PyTree:
    """MergeKit method ``name`` over every leaf of ``pretrained``/``finetuned`` (see the module docstring)."""
    from catmerge_jax.methods.dare import as_key

    method, view, uses_base, resolved, base_leaves, ft_leaves, treedef = prepare_inputs(name, pretrained, finetuned,
                                                                                        params)
    key = as_key(seed) if method.random else None
    work = None if dtype is None else np.dtype(dtype)
    out = []
    for j, leaf in enumerate(base_leaves):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            out.append(leaf)
            continue
        models = [_leaf_inputs(f[j]) for f in ft_leaves]
        inputs = [_leaf_inputs(leaf), *models] if uses_base else models
        if work is not None:        # as MergeKit loads its inputs: cast to the working dtype
            inputs = [x.astype(work).astype(x.dtype) for x in inputs]
        merged = merge_weight(name, inputs, 0 if uses_base else None, resolved,
                              key=None if key is None else jax.random.fold_in(key, j),
                              work_dtype=np.dtype(leaf.dtype) if work is None else work)
        out.append(merged.astype(leaf.dtype))
    return view.rebuild(jax.tree.unflatten(treedef, out))


def _adapter(name: str):
    def merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, **params):
        del stats, roles, progress
        return mergekit_merge(name, pretrained, finetuned, **params)

    merge.__name__ = f"mergekit_{name}"
    merge.__doc__ = f"MergeKit's ``{name}``: {METHODS[name].description} (see catmerge_jax.mergekit.pytree)."
    return merge


def _defaults(method) -> dict:
    out = {p.name: (1.0 if p.name == "weight" else p.default) for p in method.params
           if p.default is not REQUIRED or p.name == "weight"}
    if method.random:
        out["seed"] = 0
    return out


for _name, _method in METHODS.items():
    # MergeKit's ``lambda`` scales the merged task vector (base + lambda * delta): the CLI's --alpha sets it.
    register(MergeMethod(method_name(_name), _adapter(_name), _defaults(_method),
                         description=f"MergeKit {_name}: {_method.description}",
                         scale_name="lambda" if any(p.name == "lambda" for p in _method.params) else None))
