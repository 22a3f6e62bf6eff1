"""Run the code blocks of a Markdown page the way a reader would: in order, in one namespace.

The conventions a page follows (also stated in docs/contributing.md):

* Every fenced ```` ```python ```` block runs, top to bottom, in one namespace per page (a fresh module).
* A block whose first line starts with ``>>>`` (or a ```` ```pycon ```` block) is a doctest: each example's
  printed output is checked against the lines under it.
* A ```` ```text ```` block whose first line starts with ``# output`` and that is the next fenced block after a
  python block is that block's expected standard output (compared like a doctest: ``...`` matches anything,
  runs of whitespace are equal).
* ``<!-- docs-test: skip (reason) -->`` as the last non-blank line before a block skips it; the reason is required.

Other blocks (bash, text, yaml) are shown, not run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import io
import pathlib
import re
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNNABLE = {"python", "py", "pycon"}
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
OUTPUT_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclasses.dataclass
class Block:
    """One fenced block: its language, its text (indentation of the fence removed), the 1-based line of its first
    code line, the skip reason if it is marked, and the expected output that follows it (``None``: not checked)."""

    lang: str
    code: str
    line: int
    skip: str | None = None
    output: str | None = None

    @property
    def runs(self) -> bool:
        return self.lang in RUNNABLE and self.skip is None

    @property
    def is_doctest(self) -> bool:
        return self.lang == "pycon" or self.code.lstrip().startswith(">>>")


def page_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with skip markers and expected outputs attached.

    >>> bs = page_blocks("<!-- docs-test: skip (needs a pod) -->\\n```python\\nx = 1\\n```\\n")
    >>> [(b.lang, b.code, b.line, b.skip) for b in bs]
    [('python', 'x = 1\\n', 3, 'needs a pod')]
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    previous = ""                       # the last non-blank line outside a block
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        lang = (m["info"].split() or [""])[0].lower()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"unclosed code fence opened at line {start}")
        i += 1
        skip = SKIP.match(previous)
        if previous.startswith("<!-- docs-test") and skip is None:
            raise ValueError(f"malformed docs-test marker before line {start}: {previous!r}; expected "
                             "'<!-- docs-test: skip (reason) -->'")
        block = Block(lang, "\n".join(body) + "\n", start + 1, skip["reason"] if skip else None)
        if (lang == "text" and body and body[0].startswith("# output") and blocks
                and blocks[-1].lang in RUNNABLE and not blocks[-1].is_doctest):
            blocks[-1].output = "\n".join(body[1:]) + "\n"
        blocks.append(block)
        previous = ""
    return blocks


def run_page(relative_path: str | pathlib.Path) -> dict:
    """Run every runnable block of the page at ``ROOT / relative_path`` (or an absolute path) in order; return
    the page's namespace.

    Fails (``AssertionError``) naming the page and line of the first block whose printed output differs from the
    page's, or whose doctest fails; an exception in a block propagates with the page's line numbers in its
    traceback.
    """
    path = ROOT / relative_path         # an absolute path stays itself
    relative_path = str(relative_path)
    text = path.read_text(encoding="utf-8")
    name = "docs_" + re.sub(r"\W", "_", relative_path)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module          # dataclasses, pickling and typing look the page's classes up here
    namespace = module.__dict__
    try:
        for block in page_blocks(text):
            if not block.runs:
                continue
            where = f"{relative_path}:{block.line}"
            if block.is_doctest:
                _run_doctest(block, namespace, relative_path, where)
                continue
            code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                exec(code, namespace)
            if block.output is not None:
                got = captured.getvalue()
                checker = doctest.OutputChecker()
                if not checker.check_output(block.output, got, OUTPUT_FLAGS):
                    example = doctest.Example("", block.output)
                    raise AssertionError(f"{where}: printed output differs from the page's\n"
                                         + checker.output_difference(example, got, OUTPUT_FLAGS))
    finally:
        sys.modules.pop(name, None)
    return namespace


def _run_doctest(block: Block, namespace: dict, relative_path: str, where: str) -> None:
    test = doctest.DocTestParser().get_doctest(block.code, namespace, where, str(ROOT / relative_path),
                                               block.line - 1)
    test.globs = namespace              # DocTest copies its globals; the page's next blocks must see these names
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=OUTPUT_FLAGS)
    result = runner.run(test, out=out.write, clear_globs=False)
    if result.failed:
        raise AssertionError(f"{where}: doctest failed\n{out.getvalue()}")


def documentation_pages() -> list[str]:
    """README.md and every Markdown page under docs/, relative to the repository root, sorted."""
    pages = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))
    return pages
