"""The table of merging methods: every method is a value, looked up by name by the CLI and the benchmarks.

A method's ``merge`` has one signature so methods can be swapped in a loop::

    merge(pretrained, finetuned, *, stats=None, roles=None, progress=False, **hparams) -> params pytree

``stats`` is a list of K exemplar-statistics trees (one per task) for methods that need them
(``needs_stats``); ``extras`` names any other per-task input the method needs (e.g. ``"fishers"``), passed
as a keyword argument of the same name. ``scale_name`` declares which keyword scales the merged task vector
(``W0 + scale * tau``), the one the CLI's ``--alpha`` sets: ``"alpha"`` for task arithmetic, TIES, CAT and most
others, ``"lambda"`` for MergeKit's task-arithmetic family, ``None`` (the default) for a method without one. A
keyword's name alone says nothing: RegMean's ``alpha`` is its Gram shrinkage and MergeKit RAM+'s a clipping bound.

>>> import catmerge_jax as cm
>>> m = cm.get_method("task_arithmetic")
>>> sorted(m.defaults), merge_scale_name(m)
(['alpha'], 'alpha')
>>> merge_scale_name(cm.get_method("regmean")) is None      # its alpha shrinks Gram off-diagonals
True
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple


class MergeMethod(NamedTuple):
    """One registered method. ``defaults``: every keyword it takes with its default; ``scale_name``: the keyword
    of ``defaults`` that scales the merged task vector (``None``: the method has no merge scale, or does not say)."""

    name: str
    merge: Callable[..., Any]
    defaults: Mapping[str, Any]
    needs_stats: bool = False
    extras: tuple[str, ...] = ()
    description: str = ""
    scale_name: str | None = None


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to the table (replacing one of the same name) and return it."""
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def available_methods() -> list[str]:
    """Names of every registered method, in registration order."""
    return list(_REGISTRY)


def merge_scale_name(method: MergeMethod) -> str | None:
    """The keyword that scales ``method``'s merged task vector, or ``None`` when it declares none: its
    ``scale_name``, if the method takes that keyword."""
    name = method.scale_name
    return name if name is not None and name in method.defaults else None
