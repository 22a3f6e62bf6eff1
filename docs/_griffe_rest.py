"""A griffe extension for the API reference: our docstrings are written for ``help()`` and doctest (reST-flavoured
prose with ``>>>`` examples), and mkdocstrings renders Markdown. Before a docstring is parsed, this

* fences every doctest example (a run of lines from a ``>>>`` line to the next blank line) as a ``pycon`` block,
  so ``x["a"]["b"]`` in an example is code, not a Markdown reference link;
* turns Sphinx roles (``:func:`~a.b`` ``) into code spans;
* turns a reST literal-block marker (a line ending in ``::``) into a plain colon (the block under it is indented,
  which Markdown already renders as code).

Loaded by ``mkdocs.yml`` (``extensions: [docs/_griffe_rest.py]``); it changes only what the site shows, never the
docstrings the doctests run.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj|const):`~?([^`]+)`")


def markdown_docstring(text: str) -> str:
    """The docstring ``text`` with its doctest examples fenced and its reST roles turned into code spans.

    >>> markdown_docstring("Sum.\\n\\n>>> 1 + 1\\n2\\n\\nSee :func:`~catmerge_jax.tree.tree_sum`::").splitlines()
    ['Sum.', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'See `catmerge_jax.tree.tree_sum`:']
    """
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += [indent + "```pycon", *block, indent + "```"]
            continue
        line = _ROLE.sub(lambda m: f"`{m.group(1)}`", line)
        if line.rstrip().endswith("::") and not line.rstrip().endswith(":::"):
            line = line.rstrip()[:-1]
        out.append(line)
        i += 1
    return "\n".join(out)


class RestToMarkdown(griffe.Extension):
    """Rewrites every loaded object's docstring with :func:`markdown_docstring`."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
