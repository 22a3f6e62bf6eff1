"""Documentation that runs: every python block of the README and of docs/*.md executes, in order, with its printed
output checked where the page shows it (conventions: tests/doc_blocks.py, docs/contributing.md); every module's
docstring examples run as doctests; the README's figures are the committed results files'.

One test per page, found when the tests are collected, so pages added later are run without editing this file.
The README and docs/jax.md are run by their own tests (tests/test_readme.py, tests/test_readme_jax.py), which also
check what the blocks compute against float64 references; this module checks that they do.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import pkgutil
import re

import pytest

from catmerge_jax.methods import registry
from tests.doc_blocks import ROOT, documentation_pages, page_blocks, run_page

RUN_ELSEWHERE = {"README.md": "tests/test_readme.py", "docs/jax.md": "tests/test_readme_jax.py",
                 "docs/llm.md": "tests/test_llm_merge.py"}
PAGES = [p for p in documentation_pages() if p not in RUN_ELSEWHERE]
README_MAX_LINES = 200


@pytest.fixture
def page_sandbox(tmp_path, monkeypatch):
    """A page runs in a temporary working directory, with no compilation cache written to the user's cache folder,
    and leaves the method registry as it found it (a page may register an example method)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CATMERGE_COMPILATION_CACHE", "0")
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.mark.parametrize("page", PAGES)
def test_page_code_runs_and_prints_what_the_page_shows(page, page_sandbox):
    run_page(page)


def test_pages_run_elsewhere_are_run_there():
    for page, test_file in RUN_ELSEWHERE.items():
        assert (ROOT / page).exists(), page
        assert re.search(r"run_page\(\s*(PAGE|\"%s\")" % re.escape(page), (ROOT / test_file).read_text()), \
            f"{test_file} does not run {page}"


def test_skip_markers_are_few_and_give_a_reason():
    skipped = {}
    for page in documentation_pages():
        for block in page_blocks((ROOT / page).read_text(encoding="utf-8")):
            if block.lang in {"python", "py", "pycon"} and block.skip is not None:
                skipped.setdefault(page, []).append(block.skip)
    # the pod recipe (several processes); raise this only for code CI cannot run (a pod, a GPU)
    assert sum(map(len, skipped.values())) <= 3, skipped


def test_the_runner_checks_output_and_doctests(tmp_path):
    """The conventions of tests/doc_blocks.py: a wrong printed output, a failing doctest or a malformed skip marker
    fails; a marked block is not run; blocks share one namespace."""
    ok = tmp_path / "ok.md"
    ok.write_text("```python\nx = 2\nprint(x + 1)\n```\n\n```text\n# output\n3\n```\n\n"
                  "<!-- docs-test: skip (would fail) -->\n```python\nraise RuntimeError\n```\n\n"
                  "```python\n>>> x * 5\n10\n```\n")
    assert run_page(ok)["x"] == 2
    wrong = tmp_path / "wrong.md"
    wrong.write_text("```python\nprint(1 + 1)\n```\n\n```text\n# output\n3\n```\n")
    with pytest.raises(AssertionError, match="wrong.md:2: printed output differs"):
        run_page(wrong)
    bad_doctest = tmp_path / "doctest.md"
    bad_doctest.write_text("```pycon\n>>> 1 + 1\n3\n```\n")
    with pytest.raises(AssertionError, match="doctest failed"):
        run_page(bad_doctest)
    with pytest.raises(ValueError, match="malformed docs-test marker"):
        page_blocks("<!-- docs-test: skip -->\n```python\nx = 1\n```\n")


def test_every_page_is_in_the_site_navigation():
    """``mkdocs build --strict`` (run by .ci/run) fails on a page outside the nav; this says which, in the suite."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r"([\w./-]+\.md)\s*$", nav, flags=re.M))
    pages = {os.path.relpath(p, "docs") for p in documentation_pages() if p.startswith("docs/")}
    assert pages - listed == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - listed)}"
    assert listed - pages == set(), f"mkdocs.yml's nav names missing pages: {sorted(listed - pages)}"


def test_site_extensions_render_doctests_as_code():
    """The site's docstring rewriting (docs/_griffe_rest.py) and API index (docs/_hooks.py): their doctests."""
    for name in ("_griffe_rest", "_hooks"):
        if name == "_griffe_rest":
            pytest.importorskip("griffe")           # the [docs] extra
        spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, name


# ------------------------------------------------------------------------------------------------------------------
# Docstrings: each public function's runnable example (the API reference shows them) runs as written

OPTIONAL = {"torch", "transformers", "safetensors", "tokenizers", "PIL", "equinox"}


def _modules() -> list[str]:
    import catmerge_jax
    import converters

    return sorted(m.name for pkg in (catmerge_jax, converters)
                  for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))


@pytest.mark.parametrize("name", _modules())
def test_module_doctests(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:            # an optional extra ([torch], [equinox]) is not installed
        if e.name and e.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {e.name}")
        raise
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False,
                             report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples of {name} failed (above)"


# ------------------------------------------------------------------------------------------------------------------
# The README: short, and every figure from a committed results file


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_short():
    assert len(_readme().splitlines()) <= README_MAX_LINES


def _result(name: str) -> dict:
    """experiments/results/<name>, a benchmark's JSON."""
    import json

    return json.loads((ROOT / "experiments" / "results" / name).read_text(encoding="utf-8"))


def _results_rows(name: str) -> dict[str, list[str]]:
    """The main table of experiments/results/<name>: ``{method: [cells]}``."""
    text = (ROOT / "experiments" / "results" / name).read_text(encoding="utf-8")
    table = text.split("## Main table", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 2 and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells
    return rows


def test_readme_methods_table_quotes_the_committed_results():
    """Each method's benchmark figure in the README equals its row's average in RESULTS_SEEDS.md (3 seeds) or, where
    marked ², in RESULTS.md (one seed)."""
    text = _readme()
    table = text[text.index("| method (`cm.` function)"):].split("\n\n", 1)[0]
    seeds, one_seed = _results_rows("RESULTS_SEEDS.md"), _results_rows("RESULTS.md")
    seeds_avg = {m: cells[7].strip("*") for m, cells in seeds.items()}
    one_avg = {m: cells[7] for m, cells in one_seed.items()}
    checked = 0
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[1])
        figures = re.findall(r"\d+\.\d(?: ± \d+\.\d)?²?", cells[4])
        assert len(figures) in (0, len(names)), line
        for name, figure in zip(names, figures):
            source = one_avg if figure.endswith("²") else seeds_avg
            assert source.get(name) == figure.rstrip("²"), (name, figure, source.get(name))
            checked += 1
    assert checked >= 14
    # the CAT row's second figure (λ, c chosen on validation) and the summary line under the table
    assert f"λ, c on validation: {seeds_avg['cat (λ, c on val)']}" in table
    assert f"fine-tuned models score {seeds_avg['individual']}" in text
    assert f"pretrained backbone {seeds_avg['pretrained backbone']}" in text


def test_readme_merge_times_and_example_figures_are_the_committed_ones():
    text = " ".join(_readme().split())
    seeds = _results_rows("RESULTS_SEEDS.md")
    for method, label in [("task_arithmetic", "task arithmetic"), ("iso_c", "Iso-C"), ("tsv", "TSV-Merge"),
                          ("cat", "CAT"), ("wudi", "WUDI")]:
        assert f"{seeds[method][-1]} s ({label})" in text, method
    log = (ROOT / "experiments" / "results" / "example.log").read_text(encoding="utf-8")
    rows: dict[str, list[str]] = {}
    for line in log.splitlines():
        if line[:1].isdigit() or line.startswith("mean "):
            rows.setdefault(line.split()[0], line.split()[1:])      # the accuracy table's mean row comes first
    pretrained, individual = rows["mean"][0], rows["mean"][1]
    alpha_one = rows["1.0"]                                           # alpha, TA accuracy, CAT accuracy, ...
    assert f"backbone scores {pretrained} mean held-out accuracy, each fine-tuned one {individual}" in text
    assert f"at alpha 1.0 task arithmetic keeps {alpha_one[0]} where CAT keeps {alpha_one[1]}" in text


def test_readme_speed_figures_are_the_committed_ones():
    text = " ".join(_readme().split())
    bench = _result("bench_b32.json")
    row = next(r for r in bench["table"] if r["stage"] == "merge total (steady)")
    cores = bench["machine"]["cpus"]
    assert f"takes {row['jax_s']:.1f} s on {cores} CPU cores, against {row['torch_s']:.1f} s" in text
    assert f"in the same run: {row['ratio']:.1f}×" in text and f"written by `{bench['command']}`" in text


def test_readme_whole_command_and_vit_l14_figures_are_the_committed_ones():
    """The README's whole-command table and ViT-L/14 sentence quote experiments/results/bench_cli.json and
    bench_l14_blocks1.json, and name the commands that wrote them."""
    text = _readme()
    flat = " ".join(text.split())
    cli = _result("bench_cli.json")
    names = {"cat": "CAT", "tsv": "TSV-Merge", "ties": "TIES"}
    assert set(cli["methods"]) == set(names)
    for method, row in cli["methods"].items():
        line = (f"| {names[method]} | {min(row['jax_first_s']):.2f} s ({row['ratio_first']:.2f}×) | "
                f"{min(row['jax_repeated_s']):.2f} s ({row['ratio_repeated']:.2f}×) | {min(row['torch_s']):.2f} s |")
        assert line in text, line
    assert f"written by `{cli['command']}`" in flat
    l14 = _result("bench_l14_blocks1.json")
    row = next(r for r in l14["table"] if r["stage"] == "merge total (steady)")
    assert f"one ViT-L/14 block takes {row['jax_s']:.1f} s against {row['torch_s']:.1f} s: {row['ratio']:.1f}×" in flat
    assert f"written by `{l14['command']}`" in flat


def test_vit_stage_tables_and_k_sweep_are_the_committed_ones():
    """docs/performance_tables.md's ViT-B/32 and ViT-L/14 stage tables, docs/big_layers.md's K-sweep table and the
    README's K-sweep sentence quote bench_b32.json, bench_l14_blocks1.json and bench_b32_ksweep.json, row by row."""
    tables = (ROOT / "docs" / "performance_tables.md").read_text(encoding="utf-8")
    for name, heading in (("bench_b32.json", "## ViT-B/32, K = 8"), ("bench_l14_blocks1.json", "## ViT-L/14, one block")):
        section = tables[tables.index(heading):]
        section = section[:section.index("\n## ", 1)]
        for row in _result(name)["table"]:
            line = f"| {row['stage']} | {row['jax_s']:.2f} | {row['torch_s']:.2f} | {row['ratio']:.1f}× |"
            assert line in section, (name, line)
    sweep = _result("bench_b32_ksweep.json")
    assert sweep["complete"] and not sweep["failed"] and [t["K"] for t in sweep["table"]] == [4, 8, 14, 20]
    big = (ROOT / "docs" / "big_layers.md").read_text(encoding="utf-8")
    stages = ["capture (features → stats)", "bases + masks", "apply", "merge total (steady)"]
    for t in sweep["table"]:
        line = (f"| {t['K']} | " + " | ".join(f"{t['stages'][s]:.1f}" for s in stages)
                + f" | {t['floor_seconds']:.1f} | {t['stages']['bases + masks'] / t['floor_seconds']:.1f}× | "
                + f"{t['peak_rss_mib'] / 1024:.1f} |")
        assert line in big, line
    assert f"K^{sweep['exponents']['bases + masks']:.2f}" in big
    flat = " ".join(_readme().split())
    last = sweep["table"][-1]
    assert f"grow as K^{sweep['exponents']['bases + masks']:.2f}" in flat
    assert f"peak memory {last['peak_rss_mib'] / 1024:.1f} GiB at K = {last['K']}" in flat
    assert f"written by `{sweep['command']}`" in flat
