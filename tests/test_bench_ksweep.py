"""The K sweep's driver (experiments/bench_ksweep.py) and bench_merge's memory log, without running a merge: the
table and fit from hand-made run records, a child process's exit status and peak memory, and per-stage peaks."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from experiments import bench_ksweep, bench_merge

SHAPES = [(768, 3072), (3072, 768)]
STAGES = ["capture (features → stats)", "bases + masks", "merge total (steady)"]


def _run(k: int, seconds: float, peak_mib: float) -> dict:
    """A bench_merge JSON record as the driver reads it (only the fields it uses)."""
    return {"settings": {"tasks": k},
            "table": [{"stage": s, "jax_s": seconds * (i + 1)} for i, s in enumerate(STAGES)],
            "jax": {"groups": [{"shape": list(sh), "bases_seconds": seconds / (j + 1), "strategy": "explicit",
                                "solver": "iterative", "fallbacks": 0, "floor_seconds": 0.1} for j, sh in
                               enumerate(SHAPES)]},
            "floor": {"seconds": 0.5 * k ** 3, "matmul_gflops": 150.0},
            "memory": {"peak_rss_mib": peak_mib, "stages": {"merge (steady)": {"rss_mib": 1, "peak_mib": peak_mib}}},
            "machine": {"load_average_1_5_15": [1.0, 1.0, 1.0]}}


def test_summary_fits_the_power_law_and_shows_peak_memory():
    ks = [4, 8, 14]
    runs = [_run(k, 0.3 * k ** 2.0, 1024.0 * k) for k in ks]  # seconds ∝ K², floor ∝ K³
    failed = [{"K": 20, "exit_status": -9, "peak_rss_mib": 20480.0}]
    lines, table, exponents, local = bench_ksweep.summary(runs, failed)
    assert exponents["bases + masks"] == pytest.approx(2.0, abs=1e-9)
    assert exponents["floor"] == pytest.approx(3.0, abs=1e-9)
    assert exponents["bases 3072x768"] == pytest.approx(2.0, abs=1e-9)
    assert list(local) == ["4→8", "8→14"] and local["8→14"]["floor"] == pytest.approx(3.0, abs=1e-9)
    assert [row["K"] for row in table] == ks and [row["peak_rss_mib"] for row in table] == [4096.0, 8192.0, 14336.0]
    header = lines[0].strip().split(" | ")
    assert header[-2] == "peak RSS (GiB)"
    row_8 = next(line for line in lines if line.startswith("| 8 |")).strip("| ").split(" | ")
    assert len(row_8) == len(header) and row_8[-2] == "8.0"                  # 8192 MiB
    assert f"{0.3 * 64 * 2:.2f}" == row_8[2]                                 # bases + masks of K = 8
    assert "| 20 | failed: exit status -9, peak RSS since its last stage 20.0 GiB |" in lines
    assert bench_ksweep.summary(runs[:1], [])[2] == {}                        # one K: no fit


def test_run_child_passes_lines_status_and_peak_memory():
    code = "import numpy as np; a = np.ones(40 * 2**20 // 8); a[::512] = 2; print('one'); print('two'); exit(3)"
    seen = []
    status, peak = bench_ksweep.run_child([sys.executable, "-c", code], None, seen.append)
    assert status == 3 and seen == ["one", "two"]
    assert peak >= 40                                                        # the 40 MiB array was resident


def test_memory_log_gives_each_stage_its_own_peak():
    log = bench_merge.MemoryLog()
    log.mark("before")
    big = np.ones(64 * 2**20 // 8)                                          # 64 MiB, touched
    del big
    log.mark("allocated and freed")
    log.mark("idle")
    if not log.stages:
        pytest.skip("no /proc/self/status here")
    busy, idle = log.stages["allocated and freed"], log.stages["idle"]
    assert busy["peak_mib"] - busy["rss_mib"] >= 60                         # the freed 64 MiB count in its peak
    assert idle["peak_mib"] - idle["rss_mib"] < 8                            # ... and not in the next stage's
    assert log.as_dict()["peak_rss_mib"] >= busy["peak_mib"]
