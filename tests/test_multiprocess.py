"""The sharded CAT merge on 2 processes × 4 CPU devices equals the one-process merge.

``experiments/pod_merge.py`` (the pod recipe of docs/pods.md) is started twice on localhost with
``jax.distributed.initialize`` (gloo CPU collectives): the 10 linear layers of its model are spread over the 8
devices of both processes, and each process writes the merged tree it ends with. Both must hold the same tree,
equal to ``cm.cat_merge`` computed here in one process on one device.
"""

import os
import re
import runpy
import socket
import subprocess
import sys
import textwrap

import numpy as np

import catmerge_jax as cm
from catmerge_jax.tree import leaves_with_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "pod_merge.py")
README = os.path.join(ROOT, "docs", "pods.md")   # the pod recipe's page
PROCESSES, DEVICES_PER_PROCESS = 2, 4
TIMEOUT_S = 240

# float32: the one-process reference solves each layer's top-c eigenproblems leaf by leaf, the sharded run solves
# them batched (and the up layers through the exact low-rank path), so the bases differ by float32 rounding
# (eps = 1.2e-7) amplified by the eigengaps of G_k; the merged leaves are O(1) and were measured to differ by at
# most 3.6e-7–4.8e-7 (block1/up/kernel, over revisions of batched.py). 1e-5 leaves a 20× margin and is still four orders below the effect of the
# trimming itself (the merged kernels differ from task arithmetic by 0.13), which the last assertion checks.
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_processes(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    outs = [str(tmp_path / f"merged_{i}.npz") for i in range(PROCESSES)]
    procs = [subprocess.Popen([sys.executable, SCRIPT, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", str(PROCESSES), "--process-id", str(i),
                               "--cpu-devices", str(DEVICES_PER_PROCESS), "--out", outs[i]],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(PROCESSES)]
    return procs, outs


def _finish_processes(procs, outs):
    """Each process's merged tree; a process that fails or hangs fails the test with every process's stderr."""
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=TIMEOUT_S))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                logs.append(p.communicate())
                raise AssertionError(f"process {len(logs) - 1} did not finish in {TIMEOUT_S} s; stderr:\n"
                                     + "\n".join(err[-3000:] for _, err in logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}; stderr:\n{err[-4000:]}"
        expected = (f"process {i} of {PROCESSES}: {DEVICES_PER_PROCESS} of {PROCESSES * DEVICES_PER_PROCESS} "
                    "devices")
        assert expected in out, f"process {i} did not run distributed; stdout:\n{out}\nstderr:\n{err[-3000:]}"
    return [dict(np.load(o)) for o in outs]


def test_two_processes_equal_one_process_merge(tmp_path):
    procs, outs = _start_processes(tmp_path)
    try:  # the one-process reference is computed while the two processes run
        recipe = runpy.run_path(SCRIPT)  # not as __main__: only the definitions
        pretrained, finetuned, stats = recipe["load_inputs"]()
        reference = dict(leaves_with_paths(cm.cat_merge(pretrained, finetuned, stats, alpha=0.3, lam=5.0, c=2)))
        arithmetic = dict(leaves_with_paths(cm.task_arithmetic(pretrained, finetuned, alpha=0.3)))
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    results = _finish_processes(procs, outs)

    assert sorted(results[0]) == sorted(reference), (sorted(results[0]), sorted(reference))
    # every process ends with the same gathered tree, bit for bit
    for path in reference:
        np.testing.assert_array_equal(results[1][path], results[0][path], err_msg=path)
    diffs = {path: float(np.abs(results[0][path] - np.asarray(reference[path])).max()) for path in reference}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= ATOL, f"largest difference {diffs[worst]:.3g} at {worst}"
    # the trimming happened: the linear layers differ from plain task arithmetic by far more than ATOL
    trimmed = max(float(np.abs(results[0][p] - np.asarray(arithmetic[p])).max()) for p in reference if "kernel" in p)
    assert trimmed > 100 * ATOL, trimmed


def test_readme_pod_recipe_is_the_tested_script():
    """docs/pods.md's many-process recipe is, line for line, the recipe block of experiments/pod_merge.py."""
    source = open(SCRIPT).read()
    block = re.search(r"# --- the pod recipe.*?---\n(.*?)\n\s*# --- end of the recipe ---", source, re.S).group(1)
    recipe = textwrap.dedent(block).strip()
    readme = open(README).read()
    section = readme[readme.index("On many processes"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert recipe in code, f"docs/pods.md's pod recipe differs from {SCRIPT}'s:\n{recipe}"
