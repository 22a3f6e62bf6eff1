"""catmerge-jax: training-free model merging in JAX, built around CAT Merging (ICML 2025).

>>> import catmerge_jax as cm
>>> "cat" in cm.available_methods()
True

Every public name is imported on first use (``cm.cat_merge`` imports :mod:`catmerge_jax.cat`, and JAX with it), so
``import catmerge_jax`` and the ``catmerge`` command start without loading JAX, Flax or any method they do not use;
submodules are reachable as attributes too (``cm.pipeline``). A new public name is one entry of ``_EXPORTS``.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

__version__ = "0.1.0"

# submodule -> the names it exports here, space-separated ("alias=name" exports `name` as `alias`)
_EXPORTS = {
    "adamerging": "AdaMerging adamerging adamerging_rule AdaMergingResult prediction_entropy",
    "capture": "Capture capture_stats Captured CaptureError DEFAULT_RULES make_capture",
    "cat": (
        "apply_cat_linear apply_cat_linear_joint apply_cat_masks cat_linear_bases "
        "cat_linear_bases_from_rows cat_merge cat_scale_masks cat_shift_masks cat_trim cat_trimmers "
        "check_scalar combine identity_trimmer LeafInput linear_projection merge_with_trimmers "
        "norm_rescaled params_view positive_directions restricted scale_masking shift_masking "
        "tree_inputs trim_with_trimmers Trimmer UnresolvedGapWarning validate_inputs"
    ),
    "compilation_cache": "enable_compilation_cache",
    "errors": (
        "CatMergeError HyperparameterError MissingStatisticsError NonFiniteError RoleConflictError "
        "TreeMismatchError"
    ),
    "linalg": "accelerator_paths accelerator_paths_enabled",
    "methods": (
        "available_methods consensus_merge dare_merge diagonal_fisher fisher_merge get_method "
        "iso_c_merge iso_cts_merge lot_merge MergeMethod pcb_merge register regmean_merge "
        "task_arithmetic tatr_merge ties_merge ties_trim tsv_merge unlabeled_fisher weight_average "
        "wudi_merge"
    ),
    "modules": "ModuleParams split_params stacked_spec",
    "roles": (
        "_leaves_by_role=leaves_by_role classify default_spec LeafSpec leaves_by_role ParamsWithRoles "
        "print_roles Role role_table with_roles"
    ),
    "stats": (
        "accumulate count_stats empty_stats LeafStats linear_stats load_stats save_stats scale_stats "
        "stats_add stats_from_arrays"
    ),
    "tree": (
        "check_finite check_same_structure is_concrete is_tracer leaves_with_paths map_with_path "
        "path_str task_vectors tree_add tree_allclose tree_max_abs_diff tree_mean tree_ones_like "
        "tree_scale tree_stack tree_sub tree_sum tree_unstack tree_zeros_like"
    ),
}

_WHERE: dict[str, tuple[str, str]] = {}
for _module, _names in _EXPORTS.items():
    for _entry in _names.split():
        _alias, _, _name = _entry.partition("=")
        _WHERE[_alias] = (_module, _name or _alias)
del _module, _names, _entry, _alias, _name

__all__ = sorted(name for name in _WHERE if not name.startswith("_"))


def _load(name: str) -> Any:
    module, attr = _WHERE[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = _load(name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(_WHERE) | {"__version__"} | {n for n, v in globals().items() if isinstance(v, types.ModuleType)
                                                   and v.__name__.startswith(__name__ + ".")})


def _exported(name: str) -> property:
    # Importing a submodule sets the package attribute of its name; an exported name that is also a submodule's
    # name (``adamerging``) stays the exported object, as it was when this package imported everything eagerly.
    return property(lambda self: _load(name), lambda self, value: None)


_SUBMODULE_NAMES = [n for n in _WHERE
                    if os.path.exists(os.path.join(os.path.dirname(__file__), n + ".py"))
                    or os.path.isdir(os.path.join(os.path.dirname(__file__), n))]
if _SUBMODULE_NAMES:
    sys.modules[__name__].__class__ = type("CatmergePackage", (types.ModuleType,),
                                           {n: _exported(n) for n in _SUBMODULE_NAMES})
