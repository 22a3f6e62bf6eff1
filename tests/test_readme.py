"""The README's Python example runs as written, and its two set-up commands are the ones CI uses."""

from __future__ import annotations

import pathlib

import jax

from tests import tree_reference
from tests.doc_blocks import page_blocks, run_page

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_example_runs_and_merges():
    blocks = [b for b in page_blocks((ROOT / "README.md").read_text(encoding="utf-8")) if b.lang == "python"]
    assert blocks, "README has no python example"
    assert len(blocks[0].code.strip().splitlines()) <= 16
    # every python block of the README in order, printed output checked where it is shown (the docs tests'
    # runner: tests/test_docs.py leaves the README to this test)
    namespace = run_page("README.md")
    merged, baseline, pretrained = namespace["merged"], namespace["baseline"], namespace["pretrained"]
    assert jax.tree.structure(merged) == jax.tree.structure(pretrained)
    # The float64 CAT merge of the example's own models and statistics (alpha 0.3, λ 5, c 3 as written there). The
    # example's conflict matrices have relative eigengaps ≥ 9e-3 at c, so float32 bases are within ~1e-5; measured
    # 1e-6 of the merged update.
    want = tree_reference.reference_cat_merge(pretrained, namespace["finetuned"], namespace["stats"], alpha=0.3,
                                              lam=5.0, c=3)
    assert tree_reference.compare(merged, want, pretrained)[1] < 1e-4
    assert tree_reference.compare(baseline, want, pretrained)[1] > 0.1     # CAT trimmed what task arithmetic kept


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q tests" in readme and "python -m pytest -q tests" in ci
    assert "catmerge example" in readme
