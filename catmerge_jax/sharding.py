"""CAT Merging spread over a device mesh: same-shape linear layers are sharded along a mesh axis.

:func:`cat_merge_sharded` is :func:`catmerge_jax.batched.cat_merge_batched` with every stacked group array
``(L, K, ...)`` placed with ``NamedSharding(mesh, P(axis))``: each device solves its own layers (the per-layer
computation is independent, so XLA partitions the vmapped layer axis without communication) and the result
equals the single-device one. Chunks are zero-padded to a multiple of the axis size; padded layers are
dropped and never reach the eigh fallback.

Running it
----------
* **One host, several GPUs**: ``cat_merge_sharded(pre, fts, stats, mesh=layer_mesh())``; the default mesh holds
  every device.
* **Many processes (TPU pod slice, multi-host GPU)**: every process calls ``jax.distributed.initialize()`` (on
  Cloud TPU it needs no arguments), loads the SAME inputs, builds the same global mesh (:func:`layer_mesh`: the
  devices of all processes) and calls :func:`cat_merge_sharded`. Each process puts only its own devices' layers
  on its devices (no cross-process copy of the inputs), every device solves its layers, the per-layer updates are
  gathered to every process, and every process returns the same merged tree, equal to the one-process merge.
  ``experiments/pod_merge.py`` is that program; ``tests/test_multiprocess.py`` runs it as 2 processes × 4 CPU
  devices on localhost (gloo CPU collectives) and compares both results with the one-process merge.
* **CPU testing**: ``jax.config.update("jax_num_cpu_devices", 8)`` (or
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``) before jax is first used simulates 8 devices (see
  ``tests/test_sharding.py``).

On many processes the solver defaults to ``"eigh"``: the block Krylov solver's vmapped loops are partitioned by
XLA with collectives inside every iteration, which over CPU gloo made it ~10× slower than eigh even on tiny layers
(the solves would have to run under ``shard_map`` to stay local). Pass ``solver="iterative"`` to override.

Meshes are used with ``AxisType.Auto`` axes: the merge relies on XLA propagating the layer sharding through its
vmapped solves (``jax.make_mesh`` makes ``Explicit`` axes by default in the jax this is tested with, 0.10, and
several of those operations have no sharding rule there), so an ``Explicit`` mesh passed in is re-labelled
``Auto`` with the same devices.

>>> import jax, jax.numpy as jnp
>>> import catmerge_jax as cm
>>> from catmerge_jax.sharding import cat_merge_sharded, layer_mesh
>>> w0 = {"a": {"kernel": jnp.zeros((6, 5))}}
>>> fts = [jax.tree.map(lambda x, s=s: x + jax.random.normal(jax.random.key(s), x.shape), w0) for s in range(2)]
>>> st = [cm.stats_from_arrays(w0, {"a/kernel": cm.linear_stats(jnp.ones((4, 6)))})] * 2
>>> cat_merge_sharded(w0, fts, st, mesh=layer_mesh(), c=1)["a"]["kernel"].shape
(6, 5)
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from catmerge_jax.cat import cat_merge_batched
from catmerge_jax.tree import PyTree

__all__ = ["layer_mesh", "layer_placement", "cat_merge_sharded"]


def layer_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "layers") -> Mesh:
    """A 1-D ``Auto`` mesh over ``devices`` (default: all devices of all processes) named ``axis``."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (axis,), devices=devices, axis_types=(AxisType.Auto,))


def _auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis ``Auto`` (same devices, same names); see the module docstring for why."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def layer_placement(mesh: Mesh, axis: str = "layers") -> Callable[[jax.Array], jax.Array]:
    """``x (L, ...) -> x`` sharded along its leading (layer) axis over ``mesh`` axis ``axis``.

    ``x`` must be the same on every process. When ``mesh`` spans several processes, each process transfers only
    the slices its own devices hold (``jax.device_put`` would first all-gather ``x`` from every process to check
    that it is the same everywhere: P copies of every group through the network).
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}, no axis named {axis!r}")
    mesh = _auto_mesh(mesh)

    def place(x: jax.Array) -> jax.Array:
        sharding = NamedSharding(mesh, PartitionSpec(axis, *([None] * (x.ndim - 1))))
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return place


def cat_merge_sharded(pretrained: PyTree, finetuned: Sequence[PyTree], stats: Sequence[PyTree], *, mesh: Mesh,
                      axis: str = "layers", **kwargs) -> PyTree:
    """CAT merge with same-shape linear layers spread over ``mesh`` along ``axis``.

    Args:
      mesh: a ``jax.sharding.Mesh`` (see :func:`layer_mesh`); on many processes, the global mesh (the same on
        every process), with the same inputs on every process.
      axis: the mesh axis the layers are split over.
      **kwargs: everything :func:`catmerge_jax.batched.cat_merge_batched` takes (alpha, lam, c, joint, ...).
        When ``mesh`` spans several processes, ``solver`` defaults to ``"eigh"`` (see the module docstring).
    Returns:
      The merged params, equal to the single-device result, as arrays local to each process (every process
      receives the whole tree).
    """
    size = mesh.shape[axis] if axis in mesh.axis_names else None
    if size is None:
        raise ValueError(f"mesh has axes {mesh.axis_names}, no axis named {axis!r}")
    # Iterative solves must be vmapped (a sequential lax.map over a sharded axis would gather it).
    kwargs.setdefault("batch_mode", "vmap")
    if len({d.process_index for d in mesh.devices.flat}) > 1:
        # XLA partitions the vmapped Krylov loops with collectives inside them: over gloo, 8 top-2 solves of
        # 40 × 40 took 28 s against 2.6 s for eigh (compile included, 2 processes × 4 CPU devices, loaded 2-core
        # machine), and a whole 5-layer group did not finish in 150 s. eigh stays local to each device.
        kwargs.setdefault("solver", "eigh")
    return cat_merge_batched(pretrained, finetuned, stats, place=layer_placement(mesh, axis), layer_multiple=size,
                             **kwargs)
