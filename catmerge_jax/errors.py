"""Errors raised by catmerge-jax.

Every error that concerns one leaf names that leaf's path (``encoder/layer_0/query/kernel``) and says
what was expected, so a user can find the offending tensor in a large checkpoint.
"""

from __future__ import annotations


class CatMergeError(ValueError):
    """Base class of every error catmerge-jax raises on bad input."""


class TreeMismatchError(CatMergeError):
    """Two trees that must match differ in structure, shape or dtype."""


class NonFiniteError(CatMergeError):
    """A weight or a statistic holds NaN or Inf."""


class MissingStatisticsError(CatMergeError):
    """A leaf whose role needs exemplar statistics has none (or an empty one)."""


class HyperparameterError(CatMergeError):
    """A hyperparameter is out of range (c < 0, c larger than the dimension, K < 1, ...)."""


class RoleConflictError(CatMergeError):
    """A leaf's role is declared twice, differently: an explicit ``roles=`` against the spec its model declares, or
    two declarations (params, statistics) against each other."""
