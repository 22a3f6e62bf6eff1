"""Start-up work: what ``import catmerge_jax`` and ``catmerge --help`` load, the persistent compilation cache the
CLI turns on (and its off switch), and the closing line of stage times. No timing assertions: what is checked is
which modules get imported, which files appear, and what is printed."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import catmerge_jax as cm
from catmerge_jax import compilation_cache
from catmerge_jax.stagetimes import StageTimes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("jax", "flax", "optax", "transformers", "torch", "tokenizers", "scipy")


def _python(code: str, env: dict | None = None) -> str:
    full = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    full = {k: v for k, v in full.items() if v is not None}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_and_help_load_no_heavy_package():
    out = _python(f"""
        import contextlib, io, sys
        import catmerge_jax, catmerge_jax.cli
        help_text = io.StringIO()
        with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
            catmerge_jax.cli.main(["--help"])
        assert "merge" in help_text.getvalue()
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """)
    assert out.strip() == "[]"


def test_every_name_is_still_there():
    for name in cm.__all__:
        assert getattr(cm, name) is not None, name
    import catmerge_jax.adamerging  # noqa: F401 — a submodule whose name is also an exported function's
    from catmerge_jax.adamerging import adamerging

    assert cm.adamerging is adamerging
    assert cm.pipeline.__name__ == "catmerge_jax.pipeline"  # submodules as attributes
    with pytest.raises(AttributeError):
        cm.no_such_name  # noqa: B018


CACHED_RUN = """
    import jax, jax.numpy as jnp
    from catmerge_jax.compilation_cache import enable_compilation_cache
    hits = []
    jax.monitoring.register_event_listener(lambda e, **k: hits.append(e) if e.endswith("cache_hits") else None)
    folder = enable_compilation_cache()
    print(folder)
    print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).sum()))
    print(len(hits))
"""


def test_compilation_cache_in_the_users_cache_folder(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "CATMERGE_COMPILATION_CACHE": None, "JAX_COMPILATION_CACHE_DIR": None}
    folder, value, hits = _python(CACHED_RUN, env).split()
    assert folder.startswith(str(tmp_path / "xdg" / "catmerge_jax" / "xla" / f"jax-{jax.__version__}-"))
    assert stat.S_IMODE(os.stat(folder).st_mode) & 0o077 == 0  # the owner's only: JAX runs what it reads there
    assert any(name.endswith("-cache") for name in os.listdir(folder)) and int(hits) == 0
    again_folder, again_value, again_hits = _python(CACHED_RUN, env).split()
    assert (again_folder, again_value) == (folder, value) and int(again_hits) >= 1  # loaded, not compiled


def test_compilation_cache_off_switch_and_explicit_folder(tmp_path, monkeypatch):
    for off in ("0", "off", "False"):
        monkeypatch.setenv("CATMERGE_COMPILATION_CACHE", off)
        assert compilation_cache.enable_compilation_cache(str(tmp_path / "never")) is None
    assert not (tmp_path / "never").exists()
    monkeypatch.setenv("CATMERGE_COMPILATION_CACHE", str(tmp_path / "mine"))
    assert compilation_cache.default_cache_dir().startswith(str(tmp_path / "mine"))


def test_stage_times_split_out_compile_time():
    clock = StageTimes()
    fn = jax.jit(lambda x: jnp.cos(x) * 3.0 + 1.0)
    with clock.stage("solve"):
        jax.block_until_ready(fn(jnp.arange(7.0)))  # traced and compiled here
    assert clock.seconds["compile"] > 0
    compiled = clock.seconds["compile"]
    with clock.stage("write"):
        jax.block_until_ready(fn(jnp.arange(7.0)))  # compiled already
    assert clock.seconds["compile"] == compiled and clock.seconds["write"] >= 0
    assert re.fullmatch(r"time: solve [\d.]+ s, compile [\d.]+ s, write [\d.]+ s \(total [\d.]+ s\)",
                        StageTimes.line(clock, order=("solve", "compile", "write")))


def test_merge_prints_one_line_of_stage_times(tmp_path, capsys):
    from catmerge_jax.cli import main
    from tests.fixtures.tiny_bert import save_tiny_bert

    pytest.importorskip("torch")
    words = "the a cat sat on mat good bad".split()
    base = save_tiny_bert(str(tmp_path / "base"), seed=0, words=words)
    task = save_tiny_bert(str(tmp_path / "task"), seed=1, words=words, base=base)
    args = ["merge", "--method", "task_arithmetic", "--base", base, "--task", task]
    assert main(args + ["--out", str(tmp_path / "loud")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"time: load [\d.]+ s, statistics [\d.]+ s, compile [\d.]+ s, solve [\d.]+ s, "
                        r"write [\d.]+ s \(total [\d.]+ s\)", lines[-1]), lines
    assert main(args + ["--quiet", "--out", str(tmp_path / "quiet")]) == 0
    assert capsys.readouterr().out == ""
    with open(os.path.join(tmp_path / "quiet", "config.json")) as f:
        assert json.load(f)["model_type"] == "bert"
