"""catmerge-jax: training-free model merging in JAX, built around CAT Merging (ICML 2025).

>>> import catmerge_jax as cm
>>> "cat" in cm.available_methods()
True
"""

from catmerge_jax.adamerging import (
    AdaMerging,
    AdaMergingResult,
    adamerging,
    adamerging_rule,
    prediction_entropy,
)
from catmerge_jax.capture import DEFAULT_RULES, Capture, Captured, CaptureError, capture_stats, make_capture
from catmerge_jax.cat import (
    LeafInput,
    Trimmer,
    apply_cat_linear,
    apply_cat_linear_joint,
    apply_cat_masks,
    cat_linear_bases,
    cat_linear_bases_from_rows,
    cat_merge,
    cat_scale_masks,
    cat_trim,
    check_scalar,
    combine,
    params_view,
    positive_directions,
    UnresolvedGapWarning,
    tree_inputs,
    trim_with_trimmers,
    cat_shift_masks,
    cat_trimmers,
    identity_trimmer,
    linear_projection,
    merge_with_trimmers,
    norm_rescaled,
    restricted,
    scale_masking,
    shift_masking,
    validate_inputs,
)
from catmerge_jax.errors import (
    CatMergeError,
    HyperparameterError,
    MissingStatisticsError,
    NonFiniteError,
    TreeMismatchError,
)
from catmerge_jax.methods import (
    MergeMethod,
    available_methods,
    consensus_merge,
    dare_merge,
    diagonal_fisher,
    fisher_merge,
    get_method,
    pcb_merge,
    regmean_merge,
    register,
    task_arithmetic,
    iso_c_merge,
    iso_cts_merge,
    lot_merge,
    tatr_merge,
    ties_merge,
    ties_trim,
    tsv_merge,
    wudi_merge,
    unlabeled_fisher,
    weight_average,
)
from catmerge_jax.modules import ModuleParams, split_params, stacked_spec
from catmerge_jax.roles import LeafSpec, leaves_by_role as _leaves_by_role, Role, classify, default_spec, leaves_by_role, print_roles, role_table
from catmerge_jax.stats import (
    LeafStats,
    accumulate,
    count_stats,
    empty_stats,
    linear_stats,
    load_stats,
    save_stats,
    scale_stats,
    stats_add,
    stats_from_arrays,
)
from catmerge_jax.tree import (
    check_finite,
    check_same_structure,
    is_concrete,
    is_tracer,
    leaves_with_paths,
    map_with_path,
    path_str,
    task_vectors,
    tree_add,
    tree_allclose,
    tree_max_abs_diff,
    tree_mean,
    tree_ones_like,
    tree_scale,
    tree_stack,
    tree_sub,
    tree_sum,
    tree_unstack,
    tree_zeros_like,
)

__version__ = "0.1.0"
