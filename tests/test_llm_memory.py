"""Memory regressions of the layer-by-layer LLM merge (catmerge_jax/llm.py, docs/llm.md "Peak memory"): the
vocabulary-wide LM head's solves must not form anything of K × (a layer's output width) beyond their inputs.

Checked on the programs themselves (every intermediate array of the traced jaxpr, sub-jaxprs of loops and
conditionals included), not by timing or RSS, so the tests are deterministic and need no large model: the
matrix-free CAT solve of a wide head once formed all K² products ``X_k T_i`` (K²·n·out floats: 4 GiB for
4 tasks, 512 exemplar tokens and a 32 000 vocabulary), RegMean the (K, in, out) difference ``W_k − W̄``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax import conflict
from catmerge_jax.methods import regmean


def _largest_intermediate(closed) -> int:
    """Elements of the largest array any equation of ``closed`` (recursively) outputs."""
    largest = 0

    def walk(jaxpr):
        nonlocal largest
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                largest = max(largest, int(np.prod(shape, dtype=np.int64)))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(closed.jaxpr)
    return largest


def test_matrix_free_head_solve_forms_no_task_output_blocks():
    k, fan_in, n, out, c = 4, 32, 128, 2048, 3
    plan = conflict.plan_linear(k, fan_in, out, c, rows=n, strategy="matrix_free")
    tvs = jax.ShapeDtypeStruct((1, k, fan_in, out), jnp.float32)
    rows = jax.ShapeDtypeStruct((1, k, n, fan_in), jnp.float32)
    closed = jax.make_jaxpr(lambda t, x: conflict._group_bases(t, x, 5.0, c=c, plan=plan))(tvs, rows)
    config = conflict.krylov_config(c, out)
    krylov_basis = out * config.block * (config.steps + 1)
    # the largest arrays are the Krylov basis (out × its columns) and the (K, in, out) task vectors; one task's
    # output rows X_k T_i (K·n·out) would be larger than both
    assert _largest_intermediate(closed) <= max(krylov_basis, k * fan_in * out) < k * n * out


def test_regmean_linear_forms_no_stack_of_differences():
    k, fan_in, out = 4, 32, 2048
    kernels = jax.ShapeDtypeStruct((k, fan_in, out), jnp.float32)
    grams = jax.ShapeDtypeStruct((k, fan_in, fan_in), jnp.float32)
    closed = jax.make_jaxpr(lambda w, g: regmean.regmean_linear(w, g, 0.9))(kernels, grams)
    assert _largest_intermediate(closed) == fan_in * out   # one (in, out) at a time, never (K, in, out)
