"""Exemplar merges (CAT, RegMean, LOT, ...) of decoder LLM folders, layer by layer and out of core.

:func:`merge_folders_layerwise` is what ``catmerge merge --method cat|regmean|lot ...`` runs on a Llama, Mistral,
Qwen2, Qwen3, Gemma or Gemma 2 folder (:mod:`catmerge_jax.models.decoder`). It never holds a whole model. Task
k's statistics of block l come from running task k's own model (``W0 + s·T_k``, ``s = 1``: the paper) on its
exemplars, so each task's hidden states are carried forward block by block:

1. **Embeddings.** Read the embedding table of the base and of every task (memory-mapped safetensors), embed each
   task's exemplars with its own table, merge the table (task arithmetic for CAT: role ``other``) and write it.
2. **Block l = 0 .. L − 1.** Read block l of the base and of every task; for each task, capture the statistics of
   the block's leaves on its hidden states (:func:`catmerge_jax.capture.capture_stats` on one
   :class:`~catmerge_jax.models.decoder.DecoderLayer`) and run the block to get the next hidden states; merge the
   block with the registered method (one call per block, so same-shaped layers of the block are solved together)
   and write it. Block l's weights are freed before block l + 1 is read.
3. **Head.** The final norm and an untied ``lm_head`` likewise. The head's inputs are captured as rows (``n``
   real tokens × ``d``), so CAT solves the ``(d, vocab)`` head with the rows plans of
   :func:`catmerge_jax.conflict.plan_linear` (exact low-rank or matrix-free: a layer wider than
   ``conflict.MAX_EXPLICIT_OUT`` with rows statistics never gets an explicit ``G_k``), never a ``(vocab, vocab)``
   matrix; RegMean and LOT only ever form ``(d, d)``. A tied head is the embedding (merged in step 1).

Tensors are written as they are merged (block order, shards cut at the base's largest shard size) into a temporary
folder beside ``--out`` that is renamed into place at the end (:mod:`catmerge_jax.atomic`); a failure or a
non-finite merged tensor leaves nothing behind. Padding never counts: exemplars are padded on the right and the
token mask drops pad rows from every statistic.

**Memory.** With K tasks whose weights are stored in ``s`` bytes (2 for bf16), a stage of ``P`` parameters (the
embedding table and an untied head ``P_e = vocab·d`` each, a block ``P_b``), ``N_k`` exemplars of ``S_k`` tokens
each, the peak is about::

    max(stage(P_e), stage(P_b)) + Σ_k 4·N_k·S_k·d + the process
    stage(P) = (4 + s·K + 4·K + 4·w)·P + stats

    4·P       the base's stage in float32            s·K·P   the K fine-tuned stages as stored (merged from there:
    4·K·P     the K float32 task vectors                     every method widens W_k exactly)
    4·w·P     the method's own stage-sized arrays at its peak: w ≈ 3 for CAT (Σ_k T̃_k, the merged stage, one
              transient; its vocabulary-wide solve adds only (vocab × Krylov columns) blocks), w ≈ 4 for RegMean
              (W̄, one W_k − W̄ and its G̃_k product, the running sum); nothing K-wide
    stats     each task's statistics of the stage (a Gram in² or rows n·in per linear leaf)
    Σ_k ...   each task's hidden states;  the process: JAX, compiled programs, the allocator's retained pages

Nothing in it grows with the number of layers, and no term is ``K²`` or ``K·vocab·n``: the CAT solve of a head
applies ``G_k`` through the task vectors (:func:`catmerge_jax.conflict.linear_group_bases`, matrix-free plan),
never forming the K² products ``X_k T_i`` (measured in ``experiments/results/bench_llm_exemplars.log`` and
``docs/llm.md``, checked on the programs by ``tests/test_llm_memory.py``). After each stage the C heap's freed pages
are handed back (``malloc_trim``) so the next stage starts from the process's floor.

Methods that need exemplar-derived inputs of the whole model (``fisher``: gradients of the logits) run in memory
through :func:`catmerge_jax.pipeline.merge_checkpoints` instead.

>>> from catmerge_jax.llm import merge_folders_layerwise                                        # doctest: +SKIP
>>> merge_folders_layerwise("cat", "llama-base", ["llama-math", "llama-code"], ["math.txt", "code.txt"],
...                         "merged", hparams={"alpha": 0.5})                                 # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from catmerge_jax.errors import CatMergeError, HyperparameterError, NonFiniteError, TreeMismatchError
from catmerge_jax.roles import Overrides, lookup_override, warn_unmatched
from catmerge_jax.tree import leaves_with_paths, nest_paths

__all__ = ["is_decoder_folder", "runs_layerwise", "merge_folders_layerwise", "read_decoder_exemplars",
           "LayerwiseError", "Stage", "stages"]


class LayerwiseError(CatMergeError):
    """A layer-by-layer merge cannot run on these folders (not a decoder family, or a method it cannot stream)."""


# ---------------------------------------------------------------------------------------------------------------
# What goes where: stages of parameters, each a small params tree with full paths, and the checkpoint keys.


class Stage(NamedTuple):
    """One unit of the layer-by-layer walk: ``name`` (``"embed"``, ``"layer 3"``, ``"head"``), ``leaves``,
    ``{Flax path: (checkpoint key, transform)}`` of its parameters (``transform``: ``"transpose"`` or ``"none"``),
    and their Flax ``shapes``."""

    name: str
    leaves: dict[str, tuple[str, str]]
    shapes: dict[str, tuple[int, ...]]

    @property
    def has_linear(self) -> bool:
        return any(path.endswith("/kernel") for path in self.leaves)


def _stage(name: str, paths: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> Stage:
    from converters.hf import hf_key

    leaves = {}
    for path in paths:
        key, transform, _ = hf_key(path)
        leaves[path] = (key, "transpose" if transform == "kernel" else "none")
    return Stage(name, leaves, {p: shapes[p] for p in paths})


def stages(config) -> list[Stage]:
    """The embedding, every block and the head of a :class:`~catmerge_jax.models.decoder.DecoderConfig`, in the order
    the layer-by-layer merge walks them (shapes traced with ``jax.eval_shape``, nothing computed)."""
    from catmerge_jax.models.decoder import DecoderForCausalLM, layer_path

    model = DecoderForCausalLM(config)
    traced = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.ones((1, 1), jnp.int32)))["params"]
    shapes = {p: tuple(s.shape) for p, s in leaves_with_paths(traced)}
    paths = list(shapes)
    out = [_stage("embed", [p for p in paths if p.startswith("model/embed_tokens/")], shapes)]
    for i in range(config.num_hidden_layers):
        prefix = layer_path(i) + "/"
        out.append(_stage(f"layer {i}", [p for p in paths if p.startswith(prefix)], shapes))
    out.append(_stage("head", [p for p in paths if p.startswith("model/norm/") or p.startswith("lm_head/")], shapes))
    covered = {p for s in out for p in s.leaves}
    assert covered == set(paths), sorted(set(paths) - covered)
    return out


def _subtree(tree: Mapping, prefix: str) -> Any:
    for name in prefix.split("/"):
        tree = tree[name]
    return tree


# ---------------------------------------------------------------------------------------------------------------
# Folders


def is_decoder_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a ``config.json`` of a decoder family
    (:data:`~catmerge_jax.models.decoder.FAMILIES`)."""
    import json

    from catmerge_jax.models.decoder import FAMILIES

    path = os.path.join(os.fspath(folder), "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") in FAMILIES


def runs_layerwise(method: Any, base_dir: str | os.PathLike) -> bool:
    """Whether ``catmerge merge`` merges ``base_dir``'s family layer by layer with ``method``: a decoder folder and a
    method whose only exemplar-derived input is per-leaf statistics (``needs_stats``, no ``extras``)."""
    from catmerge_jax.methods.registry import get_method

    m = get_method(method) if isinstance(method, str) else method
    return bool(m.needs_stats) and not m.extras and is_decoder_folder(base_dir)


class _Model(NamedTuple):
    folder: Any                   # catmerge_jax.folders.Folder
    label: str


def _open(path: str | os.PathLike):
    from catmerge_jax.folders import open_folder

    return open_folder(path)


def _check_layout(base, tasks, expected: Mapping[str, tuple[str, str]], shapes: Mapping[str, tuple]) -> list[str]:
    """Every leaf's key in every folder with the base's shape and dtype; returns the base's other keys (kept aside
    and copied: RoPE buffers, a tied head's copy)."""
    from converters.decoder import NAMES, TIED
    from catmerge_jax.folders import check_sources

    keys = {key for key, _ in expected.values()}
    missing = sorted(keys - set(base.folder.tensors))
    if missing:
        raise TreeMismatchError(f"{base.label}: no tensor {missing[0]!r} (the {base.folder.model_type} model needs "
                                f"{len(keys)} tensors; {len(missing)} missing)")
    for path, (key, transform) in expected.items():
        shape = tuple(base.folder.tensors[key].shape)
        want = tuple(shapes[path])[::-1] if transform == "transpose" else tuple(shapes[path])
        if shape != want:
            raise TreeMismatchError(f"{base.label}: tensor {key!r} has shape {list(shape)}; the config makes it "
                                    f"{list(want)}")
    aside = [k for k in base.folder.tensors if k not in keys]
    patterns = NAMES[base.folder.model_type]["aside"]
    unknown = [k for k in aside if k not in TIED and not any(p.search(k) for p in patterns)]
    if unknown:
        raise TreeMismatchError(f"{base.label}: unknown tensor {unknown[0]!r}: not a parameter of the "
                                f"{base.folder.model_type} model")
    check_sources(base.folder, [t.folder for t in tasks], sorted(keys))
    return aside


def _load_stage(model: _Model, stage: Stage, *, widen: bool = True) -> dict[str, np.ndarray]:
    """``{Flax path: array}`` of one stage of one model (memory-mapped reads, kernels transposed), in float32 or,
    with ``widen=False``, in the stored dtype: a fine-tuned model's copy held through the merge then takes half the
    bytes of a float32 one for bf16 weights (every method widens ``W_k`` exactly to the base's float32 before
    subtracting ``W0``, so the merge is the same)."""
    out = {}
    for path, (key, transform) in stage.leaves.items():
        value = model.folder.read(key)
        value = value.T if transform == "transpose" else value
        out[path] = np.array(value, dtype=np.float32 if widen else value.dtype, order="C")
    return out


def _feature(base: Mapping[str, np.ndarray], task: Mapping[str, np.ndarray], scale: float) -> dict:
    """Task k's model for its statistics, in float32: ``W0 + s·(W_k − W0)`` (``s = 1``: ``W_k`` itself)."""
    if scale == 1.0:
        return {p: np.asarray(v, np.float32) for p, v in task.items()}
    return {p: (base[p] + np.float32(scale) * (task[p].astype(np.float32) - base[p])).astype(np.float32)
            for p in base}


def _aliased(flat: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """JAX arrays over the same memory as ``flat``'s NumPy arrays where the device allows it (CPU), else copies
    (the arrays are this module's own reads and are never written to)."""
    try:
        return {p: jax.device_put(v, may_alias=True) for p, v in flat.items()}
    except TypeError:  # a JAX before device_put's may_alias (0.4.36)
        return {p: jax.device_put(v) for p, v in flat.items()}


def _release_freed_memory() -> None:
    """Hand the C heap's freed pages back to the system (glibc ``malloc_trim``; nothing elsewhere). XLA:CPU's
    buffers below glibc's mmap threshold come from the heap, and the pages a stage freed would otherwise stay in the
    process's resident set while the next stage maps new ones."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ---------------------------------------------------------------------------------------------------------------
# Exemplars


def read_decoder_exemplars(path: str | os.PathLike, folder: str | os.PathLike, *, vocab_size: int | None = None):
    """A task's text exemplars for a decoder: one per line, tokenized with ``folder``'s tokenizer and its special
    tokens, padded on the right (a tokenizer without a pad token pads with its EOS; padding never counts).
    Returns :class:`~catmerge_jax.pipeline.Exemplars` with inputs ``(input_ids, attention_mask)``."""
    from catmerge_jax.pipeline import Exemplars, read_text_exemplars

    ex = read_text_exemplars(path, folder, vocab_size=vocab_size)
    ids, mask = ex.inputs[0], ex.inputs[1]
    return Exemplars((ids, mask), mask.astype(bool))


def _padded(ids: np.ndarray, mask: np.ndarray, n: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """``ids``/``mask`` padded to ``(n, s)`` with masked entries (id 0), so every task shares compiled shapes."""
    out_ids = np.zeros((n, s), np.int32)
    out_mask = np.zeros((n, s), np.int32)
    out_ids[: ids.shape[0], : ids.shape[1]] = ids
    out_mask[: mask.shape[0], : mask.shape[1]] = mask
    return out_ids, out_mask


# ---------------------------------------------------------------------------------------------------------------
# The walk


def _capture(module, params: dict, inputs: tuple, mask: np.ndarray, *, batch_size: int, form: str) -> dict:
    """``{relative path: LeafStats}`` of one stage module on one task's inputs."""
    from catmerge_jax.capture import capture_stats
    from catmerge_jax.stats import is_leaf_stats

    stats = capture_stats(module, params, *inputs, token_mask=mask.astype(bool), batch_size=batch_size, form=form)
    return dict(leaves_with_paths(stats, is_leaf=is_leaf_stats))


def _make_runners(config):
    """Jitted forward functions of the embedding and of a block (compiled once per shape and layer kind)."""
    from catmerge_jax.models.decoder import DecoderLayer, embed

    @jax.jit
    def run_embed(table, ids):
        return embed(config, table, ids)

    layers = {sliding: DecoderLayer(config, sliding) for sliding in set(config.sliding_layers)}

    def _run_layer(sliding, params, h, positions, mask):
        return layers[sliding].apply({"params": params}, h, positions, mask)[0]

    run_layer = jax.jit(_run_layer, static_argnums=0)
    return run_embed, layers, run_layer


def merge_folders_layerwise(method: Any, base_dir: str | os.PathLike, task_dirs: Sequence[str | os.PathLike],
                            exemplar_files: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                            hparams: Mapping[str, Any] | None = None, feature_scale: float = 1.0,
                            roles: Overrides = None, batch_size: int = 16, overwrite: bool = False,
                            progress: bool = False, max_shard_bytes: int | None = None) -> str:
    """Merge decoder folders with an exemplar method, layer by layer (see the module docstring). Returns ``out_dir``.

    Args:
      method: a registered name or :class:`~catmerge_jax.methods.registry.MergeMethod` with ``needs_stats`` and no
        ``extras`` (``cat``, ``regmean``, ``lot``, ...).
      base_dir, task_dirs: the pretrained folder and K fine-tuned folders of the same family and shapes.
      exemplar_files: one text file per task (one exemplar per line), tokenized with the base's tokenizer.
      out_dir: the merged folder (the base's tensor names, dtypes and non-weight files; shards cut at the base's
        largest shard, or ``max_shard_bytes``).
      hparams: the method's hyperparameters over its defaults. ``feature_scale``: statistics from ``W0 + s·T_k``.
      roles: role overrides by full leaf path (``model/layers/*/mlp/down_proj/kernel``) or pattern.
      batch_size: exemplars per forward pass.
    """
    from tqdm.auto import tqdm

    from catmerge_jax import atomic
    from catmerge_jax.methods.registry import get_method
    from catmerge_jax.models.decoder import DecoderHead, position_ids_from_mask
    from catmerge_jax.pipeline import (_make_parents, _remove_empty, check_exemplar_path, check_method_inputs,
                                       prepare_output, publish_merged)
    from catmerge_jax.stats import count_stats, stats_from_arrays
    from catmerge_jax.streaming import ShardWriter
    from converters.decoder import TIED, decoder_config
    from converters.hf import _copy_non_weights
    from converters.safetensors_io import DTYPES

    m = get_method(method) if isinstance(method, str) else method
    if not m.needs_stats or m.extras:
        raise LayerwiseError(f"method '{m.name}' does not merge from per-leaf exemplar statistics alone; the "
                             "layer-by-layer merge runs cat, regmean, lot and other such methods")
    if batch_size < 1:
        raise HyperparameterError(f"batch_size must be >= 1, got {batch_size}")
    if not np.isfinite(feature_scale):
        raise HyperparameterError(f"feature_scale must be finite, got {feature_scale}")
    task_dirs = [os.fspath(t) for t in task_dirs]
    exemplar_files = [os.fspath(f) for f in exemplar_files or []]
    if not task_dirs:
        raise HyperparameterError("merging needs at least one task folder")
    check_method_inputs(m, len(task_dirs), len(exemplar_files) if exemplar_files else None)
    for f in exemplar_files:
        check_exemplar_path(f)
    out = prepare_output(out_dir, overwrite=overwrite, inputs=[base_dir, *task_dirs], exemplars=exemplar_files)
    accept = atomic.dir_identity(out) if os.path.isdir(out) and not os.listdir(out) else None

    base = _Model(_open(base_dir), os.fspath(base_dir))
    if base.folder.model_type not in _families():
        raise LayerwiseError(f"{base.label} is a {base.folder.model_type or 'unknown'} model; the layer-by-layer merge "
                             f"takes {', '.join(_families())}")
    tasks = [_Model(_open(t), t) for t in task_dirs]
    for t in tasks:
        if t.folder.model_type != base.folder.model_type:
            raise TreeMismatchError(f"{t.label} is a {t.folder.model_type or 'unknown'} model but the base "
                                    f"{base.label} is a {base.folder.model_type}")
    config = decoder_config(base.folder.config)
    plan = stages(config)
    aside = _check_layout(base, tasks, {p: kt for s in plan for p, kt in s.leaves.items()},
                          {p: shape for s in plan for p, shape in s.shapes.items()})

    exemplars = [read_decoder_exemplars(f, base.folder.path, vocab_size=config.vocab_size) for f in exemplar_files]
    n_max = max(e.inputs[0].shape[0] for e in exemplars)
    s_max = max(e.inputs[0].shape[1] for e in exemplars)
    batch = min(int(batch_size), n_max)
    n_pad = -(-n_max // batch) * batch
    inputs = [_padded(e.inputs[0], e.inputs[1], n_pad, s_max) for e in exemplars]
    positions = [np.asarray(position_ids_from_mask(mask)) for _, mask in inputs]   # 0, 1, ... on real tokens

    # Written in the walk's order: buffers kept aside, the embedding (and a tied head's copy), blocks, head.
    tied_copy = [k for k in aside if k in TIED]
    embed_path = next(iter(plan[0].leaves))
    order = [k for k in aside if k not in TIED] + [key for key, _ in plan[0].leaves.values()] + tied_copy
    order += [key for s in plan[1:] for key, _ in s.leaves.values()]
    entries = [(k, base.folder.tensors[k].dtype, tuple(base.folder.tensors[k].shape)) for k in order]
    if max_shard_bytes is None:
        max_shard_bytes = _largest_shard(base.folder) if base.folder.index is not None else 1 << 62
    hp = dict(hparams or {})
    if isinstance(roles, Mapping):
        # checked once against the whole model; each stage then looks its leaves up without warning about the
        # patterns that name other stages' leaves
        warn_unmatched(roles, [p for s in plan for p in s.leaves])
        roles = functools.partial(lookup_override, roles)
    run_embed, layers, run_layer = _make_runners(config)
    head = DecoderHead(config)
    parent, name = os.path.dirname(out), os.path.basename(out)
    created = _make_parents(parent)
    try:
        atomic.clean_stale_temp_dirs(parent)
        with atomic.temp_dir(parent, name) as tmp:
            writer = ShardWriter(tmp, entries, max_shard_bytes, metadata=base.folder.metadata or None)

            def write(flat: Mapping[str, Any], stage: Stage) -> None:
                for path, (key, transform) in stage.leaves.items():
                    value = np.asarray(flat[path])
                    value = value.T if transform == "transpose" else value
                    writer.write(key, _finite(value, DTYPES[base.folder.tensors[key].dtype], path, key))

            def merge(stage: Stage, w0: dict, fts: list[dict], stats: list[dict]) -> dict:
                # the method's inputs alias the arrays just read (no copy of K + 1 vocabulary-wide tables)
                w0, fts = _aliased(w0), [_aliased(f) for f in fts]
                tree0 = nest_paths(w0)
                stats_trees = [stats_from_arrays(tree0, s) for s in stats]
                try:
                    with warnings.catch_warnings():
                        if not stage.has_linear:  # the embedding (and a tied head's norm): no linear leaf, by design
                            warnings.filterwarnings("ignore", message="CAT merge: no leaf has the role 'linear'")
                        merged = m.merge(tree0, [nest_paths(f) for f in fts], stats=stats_trees, roles=roles,
                                         progress=False, **hp)
                except TypeError as e:
                    if "unexpected keyword argument" not in str(e):
                        raise
                    raise HyperparameterError(f"method '{m.name}' does not take that hyperparameter ({e})") from None
                return dict(leaves_with_paths(jax.device_get(merged)))

            for key in aside:
                if key not in TIED:
                    writer.write(key, base.folder.read(key))
            bar = tqdm(plan, desc=f"{m.name} (layer by layer)", unit="stage", disable=not progress)
            hidden = []
            for stage in bar:
                w0 = _load_stage(base, stage)
                fts, stats = [], []
                for k, task in enumerate(tasks):
                    ft = _load_stage(task, stage, widen=False)
                    feature = _feature(w0, ft, feature_scale)
                    ids, mask = inputs[k]
                    if stage.name == "embed":
                        hidden.append(run_embed(feature[embed_path], ids))
                        stats.append({embed_path: count_stats(float(mask.sum()))})
                    elif stage.name == "head":
                        params = {"norm": _subtree(nest_paths(feature), "model/norm")}
                        if not config.tie_word_embeddings:
                            params["lm_head"] = _subtree(nest_paths(feature), "lm_head")
                        # rows, not a Gram, for the head: a vocabulary-wide head then takes a rows plan and CAT
                        # never forms a (vocab, vocab) matrix (conflict.MAX_EXPLICIT_OUT)
                        rel = _capture(head, params, (hidden[k],), mask, batch_size=batch, form="rows")
                        stats.append({("model/" + p if p.startswith("norm/") else p): s for p, s in rel.items()})
                    else:
                        i = int(stage.name.split()[1])
                        params = _subtree(nest_paths(feature), f"model/layers/{i}")
                        sliding = config.sliding_layers[i]
                        rel = _capture(layers[sliding], params, (hidden[k], positions[k], mask), mask,
                                       batch_size=batch, form="auto")
                        stats.append({f"model/layers/{i}/{p}": s for p, s in rel.items()})
                        hidden[k] = run_layer(sliding, params, hidden[k], positions[k], mask)
                    fts.append(ft)
                    feature = params = None   # task k's float32 copy goes before task k + 1's is made
                merged = merge(stage, w0, fts, stats)
                write(merged, stage)
                if stage.name == "embed":   # a tied head's copy, written from the merged table: it stays tied
                    for key in tied_copy:
                        writer.write(key, _finite(np.asarray(merged[embed_path]),
                                                  DTYPES[base.folder.tensors[key].dtype], embed_path, key))
                del w0, fts, stats, merged
                _release_freed_memory()
            bar.close()
            writer.close()
            _copy_non_weights(base.folder.path, tmp)
            publish_merged(tmp, out, overwrite=overwrite, accept=accept)
    except BaseException:
        _remove_empty(created)
        raise
    return out


def _families() -> list[str]:
    from catmerge_jax.models.decoder import FAMILIES

    return list(FAMILIES)


def _largest_shard(folder) -> int:
    from catmerge_jax.folders import _itemsize

    sizes: dict[str, int] = {}
    for info in folder.tensors.values():
        sizes[info.file] = sizes.get(info.file, 0) + int(np.prod(info.shape, dtype=np.int64)) * _itemsize(info.dtype)
    return max(sizes.values())


def _finite(value: np.ndarray, dtype: np.dtype, path: str, key: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.ascontiguousarray(value.astype(dtype, copy=False))
    finite = np.isfinite(cast.astype(np.float32) if cast.dtype.itemsize < 4 else cast)
    if not finite.all():
        raise NonFiniteError(f"merged leaf {path} (checkpoint key {key}) holds {int(finite.size - finite.sum())} "
                             f"non-finite value(s) as {cast.dtype}; nothing was written (hyperparameters too large?)")
    return cast
