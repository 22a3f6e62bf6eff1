"""MkDocs hooks (``mkdocs.yml``: ``hooks: [docs/_hooks.py]``).

The API reference's front page lists every public name of ``import catmerge_jax as cm``, grouped by the module
that defines it, each a cross-reference to its entry on that module's page. The list is made from the package
at build time, so it cannot fall behind the code; and since ``mkdocs build --strict`` fails on a reference it
cannot resolve, a top-level name whose module has no page, or which has no docstring (mkdocstrings then shows no
entry for it), fails the build.
"""

from __future__ import annotations

import importlib
import inspect
import re

MARKER = "<!-- api: top-level names -->"
_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj|const):`~?([^`]+)`")


def _first_paragraph(obj) -> str:
    text = (inspect.getdoc(obj) or "").split("\n\n", 1)[0].replace("\n", " ")
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", text).replace("|", "\\|")


def top_level_names(package: str = "catmerge_jax") -> dict[str, list[tuple[str, str]]]:
    """``{defining module: [(name, "module.qualname"), ...]}`` for the public callables and classes of ``package``.

    Names bound to a module, or to a value that is not a function or class (constants), are left out: the
    former are pages of their own, the latter are documented on their module's page.

    >>> groups = top_level_names()
    >>> ("cat_merge", "catmerge_jax.cat.cat_merge") in groups["catmerge_jax.cat"]
    True
    """
    pkg = importlib.import_module(package)
    groups: dict[str, list[tuple[str, str]]] = {}
    for name in sorted(getattr(pkg, "__all__", None) or vars(pkg)):     # the curated front when there is one
        obj = getattr(pkg, name)
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        module = getattr(obj, "__module__", "") or ""
        if not module.startswith(package):
            continue
        groups.setdefault(module, []).append((name, f"{module}.{obj.__qualname__}"))
    return dict(sorted(groups.items()))


def index_markdown(package: str = "catmerge_jax") -> str:
    """The generated list: one short table per defining module (name, its docstring's first line)."""
    pkg = importlib.import_module(package)
    parts = []
    for module, names in top_level_names(package).items():
        mod = importlib.import_module(module)
        summary = _first_paragraph(mod)
        parts += [f"### `{module}`", "", summary, "", "| name | what it is |", "|---|---|"]
        for name, target in names:
            parts.append(f"| [`cm.{name}`][{target}] | {_first_paragraph(getattr(pkg, name))} |")
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files, **kwargs):
    if MARKER in markdown:
        return markdown.replace(MARKER, index_markdown())
    return markdown
