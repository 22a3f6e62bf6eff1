"""``catmerge merge --method mergekit.<name> --base DIR --task DIR ...``: MergeKit's methods on folders of any
architecture, streamed tensor by tensor (a stream plan of :mod:`catmerge_jax.folder_methods` for each).

``--base`` is MergeKit's ``base_model`` and the ``--task`` folders its ``models``, in order (methods that ignore the
base merge the task folders only); ``--hparam NAME=VALUE`` sets a parameter for every model (per-model values and
layer gradients need a recipe: ``catmerge merge --config``). ``seed`` and ``dtype`` are taken as in
:func:`catmerge_jax.mergekit.pytree.mergekit_merge`; DARE/DELLA draw tensor ``name``'s masks from
``fold_in(key(seed), crc32(name))``, as recipes do. Entries tied at a magnitude cut are kept as MergeKit keeps
them (``--hparam tie_order=stable``: to the lower index; :mod:`catmerge_jax.mergekit.tie_order`).

>>> from catmerge_jax.folder_methods import STREAM_PLANS
>>> "mergekit.ties" in STREAM_PLANS and "mergekit.slerp" in STREAM_PLANS
True
"""

from __future__ import annotations

import zlib

import numpy as np

from catmerge_jax.errors import HyperparameterError
from catmerge_jax.folder_methods import StreamInputs, register_stream_plan
from catmerge_jax.mergekit.methods import METHODS, check_inputs, merge_weight
from catmerge_jax.mergekit.pytree import method_name, resolve_params
from catmerge_jax.mergekit.tie_order import check_tie_order

__all__ = ["mergekit_stream_plan"]


def mergekit_stream_plan(name: str):
    """The stream plan of MergeKit's method ``name``."""
    method = METHODS[name]

    def plan(inputs: StreamInputs, hparams: dict):
        import jax
        import jax.numpy as jnp

        from converters.safetensors_io import DTYPES
        from catmerge_jax.methods.dare import as_key

        hp = dict(hparams)
        seed, dtype, tie_order = hp.pop("seed", 0), hp.pop("dtype", None), hp.pop("tie_order", "pytorch")
        check_tie_order(tie_order)
        uses_base = method.base != "ignored"
        check_inputs(method, len(inputs.tasks) + int(uses_base), uses_base, f"--method {method_name(name)}")
        resolved = resolve_params(name, hp, len(inputs.tasks))
        key = as_key(seed) if method.random else None
        try:
            work = None if dtype is None else np.dtype(dtype)
        except TypeError:
            raise HyperparameterError(f"--hparam dtype: {dtype!r} is not a dtype (bfloat16, float16, float32)") from None

        def merge(tensor: str, arrays: list[np.ndarray]) -> np.ndarray:
            xs = arrays if uses_base else arrays[1:]
            work_dtype = work or DTYPES[inputs.base.tensors[tensor].dtype]
            if work is not None:
                xs = [np.asarray(x).astype(work) for x in xs]
            k = None if key is None else jax.random.fold_in(key, zlib.crc32(tensor.encode()) & 0x7FFFFFFF)
            out = merge_weight(name, [jnp.asarray(x) for x in xs], 0 if uses_base else None, resolved, key=k,
                               work_dtype=work_dtype, tie_order=tie_order)
            return np.asarray(out, np.float32)

        return merge

    plan.__name__ = f"mergekit_stream_plan[{name}]"
    return plan


for _name in METHODS:
    register_stream_plan(method_name(_name), mergekit_stream_plan(_name))
