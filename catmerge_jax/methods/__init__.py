"""Merging methods; importing this package registers every method in :mod:`catmerge_jax.methods.registry`."""

from catmerge_jax.methods import consensus, dare, fisher, iso, lot, pcb, regmean, tatr, tsv, wudi  # noqa: F401 — registration
from catmerge_jax.methods.basic import task_arithmetic, ties_disjoint_merge, ties_merge, ties_trim, weight_average
from catmerge_jax.methods.consensus import consensus_merge, tall_masks
from catmerge_jax.methods.dare import dare_merge, dare_sparsify
from catmerge_jax.methods.iso import iso_c_merge, iso_cts_merge
from catmerge_jax.methods.lot import lot_merge
from catmerge_jax.methods.fisher import diagonal_fisher, fisher_merge, unlabeled_fisher
from catmerge_jax.methods.pcb import pcb_merge
from catmerge_jax.methods.regmean import regmean_merge
from catmerge_jax.methods.registry import MergeMethod, available_methods, get_method, register
from catmerge_jax.methods.tatr import mean_abs_gradient, tatr_merge
from catmerge_jax.methods.tsv import tsv_merge
from catmerge_jax.methods.wudi import wudi_merge

__all__ = ["MergeMethod", "available_methods", "get_method", "register", "task_arithmetic", "ties_merge", "ties_trim",
           "ties_disjoint_merge", "weight_average", "consensus_merge", "tall_masks", "dare_merge", "dare_sparsify",
           "diagonal_fisher", "fisher_merge", "unlabeled_fisher", "pcb_merge", "regmean_merge", "mean_abs_gradient",
           "tatr_merge", "tsv_merge", "iso_c_merge", "iso_cts_merge", "wudi_merge", "lot_merge"]

# MergeKit's 20 methods, registered as "mergekit.<name>" (last: they build on the registry above)
import catmerge_jax.mergekit  # noqa: E402,F401 — registration
