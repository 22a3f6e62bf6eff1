"""Issue 23: a run killed at ANY step of making, filling and publishing its temporary folder leaves, once the next
run into the same parent has cleaned up, either the complete new output or what was there before — never a partial
output, never a marker in the output, and no ``.catmerge-tmp-``/``.catmerge-old-`` entry.

Before the fix the marker was unlinked before the rename: a SIGKILL between the two left the whole merged model in
``.catmerge-tmp-out-<hex>/`` without a marker, and no later run removed it. The kill is deterministic: a child
process (``tests/fixtures/publish_child.py``) counts its file-system changes and ``os._exit``\\ s after change K,
for every K of the run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from catmerge_jax import atomic
from tests.fixtures.publish_child import KILLED, MODEL, OLD

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "publish_child.py")
NEW = {name: "".join(chunks) for name, chunks in MODEL.items()}


@pytest.mark.parametrize("mode, before", [("fresh", None), ("overwrite", OLD), ("accept", {}),
                                          ("overwrite-fallback", OLD), ("fresh-fallback", None)])
def test_kill_at_every_step_then_clean_up(tmp_path, mode, before):
    proc = subprocess.run([sys.executable, CHILD, str(tmp_path), mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    *killed, survived = results
    assert survived["status"] == 0 and survived["left"] == {"out": NEW}, survived    # the whole run, not killed
    assert len(killed) >= 10, len(killed)           # marker, mkdir, 2 files, publish: the run was really counted
    seen = set()
    for result in killed:
        where = f"killed after change {result['k']} of {len(killed)} ({mode}): left {sorted(result['left'])}"
        assert result["status"] == KILLED, where
        left = result["left"]
        if not left:
            assert before is None, where
            seen.add("before")
            continue
        assert list(left) == ["out"], where         # no temporary folder, marker or set-aside folder
        if left["out"] == NEW:
            seen.add("new")
        elif before is not None and left["out"] == before:
            seen.add("before")
        else:
            # Without RENAME_NOREPLACE the mkdir claim may stay as an empty folder (the next run accepts it).
            assert mode == "fresh-fallback" and left["out"] == {}, f"{where}: partial output {sorted(left['out'])}"
            seen.add("claim")
    assert {"before", "new"} <= seen, seen          # the kills covered both sides of the publishing rename


def _contents(folder):
    return {name: open(os.path.join(folder, name)).read() for name in os.listdir(folder)}


def test_leftovers_of_dead_runs_are_finished_or_undone(tmp_path):
    """Planted states of a dead run (its marker beside its folder): set aside but not yet replaced -> the old folder
    goes back; replaced but the old one not yet deleted -> the old one goes; a live run's or another host's folder,
    a folder without a marker and a non-empty foreign file named like a marker are left alone."""
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)

    def plant(parent, name, marker, *, folder=True, old=None):
        parent.mkdir(exist_ok=True)
        tmp = parent / (atomic.TEMP_PREFIX + name)
        if folder:
            tmp.mkdir()
            (tmp / "model.safetensors").write_bytes(b"whole merged model")
        if marker is not None:
            (parent / (tmp.name + atomic.MARKER)).write_text(json.dumps(marker))
        if old is not None:
            (parent / old).mkdir()
            (parent / old / "keep.txt").write_text(OLD["keep.txt"])
        return tmp

    gone = {"tool": "catmerge", "pid": dead_pid, "start": None, "host": host}
    undo = tmp_path / "undo"        # killed after renaming out aside, before renaming the new folder in
    plant(undo, "out-1", {**gone, "out": "out", "old": ".catmerge-old-out-1"}, old=".catmerge-old-out-1")
    finish = tmp_path / "finish"    # killed after renaming the new folder in, before deleting the old one
    plant(finish, "out-2", {**gone, "out": "out", "old": ".catmerge-old-out-2"}, folder=False,
          old=".catmerge-old-out-2")
    (finish / "out").mkdir()
    (finish / "out" / "model.safetensors").write_bytes(b"whole merged model")
    hostile = tmp_path / "hostile"  # a marker naming a folder outside the prefix or the parent is not followed
    plant(hostile, "out-3", {**gone, "out": "out", "old": "precious"}, old="precious")
    keep = tmp_path / "keep"
    live = plant(keep, "out-live", {**gone, "pid": os.getpid(), "start": atomic._start_time(os.getpid())})
    elsewhere = plant(keep, "out-elsewhere", {**gone, "host": host + "-other"})
    unmarked = plant(keep, "out-unmarked", None)
    foreign = keep / (atomic.TEMP_PREFIX + "x" + atomic.MARKER)
    foreign.write_text("not ours")
    legacy = plant(keep, "out-legacy", None)        # an earlier version's folder: marker inside, dead process
    (legacy / atomic.MARKER).write_text(json.dumps(gone))

    for parent in (undo, finish, hostile, keep):
        atomic.clean_stale_temp_dirs(str(parent))
    assert os.listdir(undo) == ["out"] and _contents(undo / "out") == OLD
    assert os.listdir(finish) == ["out"] and _contents(finish / "out") == {"model.safetensors": "whole merged model"}
    assert sorted(os.listdir(hostile)) == ["precious"]
    assert live.exists() and elsewhere.exists() and unmarked.exists() and foreign.exists()
    assert not legacy.exists()
