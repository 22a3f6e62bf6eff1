"""MergeKit's merge methods and recipes, in JAX (see docs/mergekit.md).

* :mod:`~catmerge_jax.mergekit.methods`: the 20 methods of MergeKit 0.1.5's registry as data (parameters, inputs
  contract) and :func:`merge_weight` over the tensors of one weight.
* :mod:`~catmerge_jax.mergekit.task_arithmetic`: the generalized task arithmetic behind nine of them;
  :mod:`~catmerge_jax.mergekit.sparsify`, :mod:`~catmerge_jax.mergekit.interpolation`,
  :mod:`~catmerge_jax.mergekit.selective`: the rest, one jittable function each.
* :mod:`~catmerge_jax.mergekit.pytree`: each also a registered method ``mergekit.<name>`` of the Python API
  (importing this package registers them; :mod:`catmerge_jax.methods` imports it).

>>> import catmerge_jax as cm
>>> "mergekit.ties" in cm.available_methods() and "mergekit.slerp" in cm.available_methods()
True
"""

from catmerge_jax.mergekit import pytree  # noqa: F401 — registration
from catmerge_jax.mergekit.methods import METHODS, Method, Param, merge_weight
from catmerge_jax.mergekit.pytree import PREFIX, mergekit_merge, method_name
from catmerge_jax.mergekit.task_arithmetic import VARIANTS, generalized_task_arithmetic

__all__ = ["METHODS", "Method", "Param", "merge_weight", "PREFIX", "mergekit_merge", "method_name", "VARIANTS",
           "generalized_task_arithmetic"]
