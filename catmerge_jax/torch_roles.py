"""Leaf roles of any Hugging Face (PyTorch) checkpoint, from tensor names, shapes and ``config.json`` alone.

No model class is built: the rules are PyTorch's storage conventions, so they hold for every architecture.

====================================  =============================================================
tensor                                role (:class:`~catmerge_jax.roles.LeafSpec`)
====================================  =============================================================
2-D ``*.weight`` (``nn.Linear``)      ``LINEAR``, stored ``(out, in)``: ``out_first=True``
GPT-2-style ``Conv1D`` ``*.weight``   ``LINEAR``, stored ``(in, out)`` (:data:`CONV1D_MODULES` by ``model_type``)
≥3-D ``*.weight`` (``nn.ConvNd``)     ``LINEAR``, ``(out, in, *window)``: the map on unfolded patches
1-D ``*.weight``, ``gamma``           ``SCALE`` (norm γ, layer scales: ``y = x̂ ∘ γ``)
1-D ``*.bias``, ``beta``              ``SHIFT``
untied ``lm_head.weight``             ``LINEAR`` ``(vocab, dim)`` = ``(out, in)``: a ``Linear`` of its own
tied ``lm_head.weight``, embeddings   ``OTHER`` (plain task arithmetic)
classifier heads, the rest            ``OTHER``
====================================  =============================================================

Embedding tables are recognised by their module name (``embed``, ``wte``, ``wpe``, ``embedding``, ...). A
projection to the vocabulary (``lm_head``/``embed_out``/``output``: :data:`VOCAB_HEADS`) stored as a tensor of
its own is a ``Linear`` unless the config ties it (``tie_word_embeddings``, absent: the family's default,
:data:`TIED_BY_DEFAULT`): a tied head is the embedding table, so it stays ``OTHER`` and is merged exactly as the
table. This is the layer-by-layer exemplar merge's rule too (:mod:`catmerge_jax.llm`), so ``catmerge roles``
shows what it does. Either way the 2-D weight is ``(vocab, dim)``, PyTorch's ``(out, in)``, which is how the
matrix methods (TSV, Iso, WUDI, with ``matrices="all_2d"``) read it as ``LINEAR`` or as an ``OTHER`` table. ``nn.ConvTranspose`` stores ``(in, out, *window)`` and
cannot be told from a convolution by name: override it (``linear_in_out``) if it matters.

Overrides map ``fnmatch`` patterns of tensor names (first match wins, exact names first) to a role name:
``linear`` (PyTorch ``(out, in)``), ``linear_in_out`` (``(in, out)``, as ``Conv1D``), ``scale``, ``shift``,
``other``, or to a :class:`~catmerge_jax.roles.LeafSpec`.

>>> spec = tensor_spec("model.layers.0.self_attn.q_proj.weight", (8, 4), {"model_type": "llama"})
>>> spec.role.value, spec.out_first, spec.matrix_shape((8, 4))
('linear', True, (4, 8))
>>> tensor_spec("h.0.attn.c_attn.weight", (4, 12), {"model_type": "gpt2"}).matrix_shape((4, 12))
(4, 12)
>>> tensor_spec("model.norm.weight", (4,), {}).role.value, tensor_spec("lm_head.weight", (9, 4), {}).role.value
('scale', 'linear')
>>> tensor_spec("lm_head.weight", (9, 4), {"tie_word_embeddings": True}).role.value
'other'
>>> tensor_spec("x.proj.weight", (4, 8), {}, {"x.*": "linear_in_out"}).matrix_shape((4, 8))
(4, 8)
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Mapping, Sequence, Union

from catmerge_jax.errors import CatMergeError
from catmerge_jax.roles import LeafSpec, Role, check_spec

__all__ = ["tensor_spec", "folder_specs", "role_rows", "format_role_table", "parse_role_override",
           "RoleOverrides", "ROLE_NAMES", "CONV1D_MODULES", "EMBEDDING_MODULES", "OUTPUT_HEADS", "VOCAB_HEADS",
           "TIED_BY_DEFAULT", "is_tied", "RoleError"]


class RoleError(CatMergeError):
    """A role override is malformed or cannot apply to the tensor it matches."""


CONV1D_MODULES: Mapping[str, frozenset[str]] = {
    # transformers' Conv1D (pytorch_utils.Conv1D) stores its weight (in, out); these families use it
    "gpt2": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "decision_transformer": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "imagegpt": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "clvp_decoder": frozenset({"c_fc", "c_proj"}),
}
"""``model_type`` → names of the modules whose 2-D ``weight`` is a ``Conv1D`` ``(in, out)``."""

EMBEDDING_MODULES = ("embed", "wte", "wpe", "embedding", "word_embeddings", "position_embeddings",
                     "token_type_embeddings", "shared", "tok_embeddings")
"""A 2-D ``weight`` whose module name equals one of these or contains ``embed`` is a lookup table (``OTHER``)."""

OUTPUT_HEADS = ("lm_head", "embed_out", "output", "logits", "score")
"""Module names of output projections to the vocabulary / label set (``OTHER``, except an untied vocabulary
head: :data:`VOCAB_HEADS`)."""

VOCAB_HEADS = ("lm_head", "embed_out", "output")
"""Output heads that a config may tie to the input embedding: ``LINEAR`` when untied, ``OTHER`` when tied."""

TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neo", "opt", "bloom", "t5"})
"""``model_type`` whose ``transformers`` config ties the head when ``config.json`` omits ``tie_word_embeddings``
(every other type here counts as untied then, as Llama, Mistral and Qwen do)."""

ROLE_NAMES: Mapping[str, LeafSpec | None] = {
    "linear": None,          # PyTorch (out, in): built per shape (in_axes = ndim - 1)
    "linear_in_out": None,   # (in, out), as Conv1D
    "scale": LeafSpec(Role.SCALE),
    "shift": LeafSpec(Role.SHIFT),
    "other": LeafSpec(Role.OTHER),
}
"""Role names accepted in overrides (``--role PATTERN=NAME``)."""

RoleOverrides = Union[Mapping[str, Union[str, LeafSpec]], Sequence[tuple[str, Union[str, LeafSpec]]], None]


def _linear(shape: Sequence[int], out_first: bool) -> LeafSpec:
    return LeafSpec(Role.LINEAR, in_axes=max(len(shape) - 1, 1) if out_first else 1, out_first=out_first)


def _named(value: str | LeafSpec, shape: Sequence[int], name: str) -> LeafSpec:
    if isinstance(value, LeafSpec):
        return value
    key = str(value).strip().lower()
    if key not in ROLE_NAMES:
        raise RoleError(f"role {value!r} for tensor {name!r} is unknown; expected one of {', '.join(ROLE_NAMES)}")
    if key == "linear":
        return _linear(shape, out_first=True)
    if key == "linear_in_out":
        if len(shape) != 2:
            raise RoleError(f"role linear_in_out for tensor {name!r} needs a 2-D weight, got shape {tuple(shape)}")
        return _linear(shape, out_first=False)
    return ROLE_NAMES[key]


def _override(overrides: RoleOverrides, name: str) -> str | LeafSpec | None:
    if not overrides:
        return None
    pairs = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    for pattern, value in pairs:
        if pattern == name:
            return value
    for pattern, value in pairs:
        if fnmatch.fnmatchcase(name, pattern):
            return value
    return None


def _is_embedding(module: str) -> bool:
    return module in EMBEDDING_MODULES or "embed" in module


def is_tied(config: Mapping[str, Any] | None) -> bool:
    """Whether ``config`` ties the output head to the input embedding (``tie_word_embeddings``, else the default of
    its ``model_type``: :data:`TIED_BY_DEFAULT`)."""
    config = config or {}
    return bool(config.get("tie_word_embeddings", str(config.get("model_type", "")) in TIED_BY_DEFAULT))


def default_tensor_spec(name: str, shape: Sequence[int], config: Mapping[str, Any] | None = None) -> LeafSpec:
    """The role of one tensor by the module docstring's table (no overrides)."""
    parts = name.split(".")
    leaf = parts[-1]
    module = parts[-2] if len(parts) > 1 else ""
    ndim = len(shape)
    model_type = str((config or {}).get("model_type", ""))
    if leaf in ("weight", "gamma") and ndim == 1:
        return LeafSpec(Role.SCALE)
    if leaf in ("bias", "beta") and ndim >= 1:
        return LeafSpec(Role.SHIFT)
    if leaf == "weight" and ndim == 2 and module in VOCAB_HEADS and not is_tied(config):
        return _linear(shape, out_first=True)   # an untied head is a Linear of its own (a tied one is the table)
    if leaf != "weight" or ndim < 2 or _is_embedding(module) or module in OUTPUT_HEADS:
        return LeafSpec(Role.OTHER)
    if ndim == 2 and module in CONV1D_MODULES.get(model_type, ()):
        return _linear(shape, out_first=False)
    return _linear(shape, out_first=True)


def tensor_spec(name: str, shape: Sequence[int], config: Mapping[str, Any] | None = None,
                overrides: RoleOverrides = None) -> LeafSpec:
    """The :class:`LeafSpec` of tensor ``name`` of ``shape``: an override if one matches, else the defaults."""
    shape = tuple(int(d) for d in shape)
    chosen = _override(overrides, name)
    spec = default_tensor_spec(name, shape, config) if chosen is None else _named(chosen, shape, name)
    try:
        check_spec(name, shape, spec)
    except ValueError as e:
        raise RoleError(str(e)) from None
    return spec


def folder_specs(shapes: Mapping[str, Sequence[int]], config: Mapping[str, Any] | None = None,
                 overrides: RoleOverrides = None) -> dict[str, LeafSpec]:
    """``{name: LeafSpec}`` for ``{name: shape}``; an override pattern that matches no name is an error (a typo
    would otherwise change nothing silently)."""
    specs = {name: tensor_spec(name, shape, config, overrides) for name, shape in shapes.items()}
    if overrides:
        pairs = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
        for pattern, _ in pairs:
            if pattern not in specs and not any(fnmatch.fnmatchcase(n, pattern) for n in specs):
                example = next(iter(specs), "")
                raise RoleError(f"role pattern {pattern!r} matches no tensor (names look like {example!r})")
    return specs


def role_rows(shapes: Mapping[str, Sequence[int]], specs: Mapping[str, LeafSpec],
              dtypes: Mapping[str, str] | None = None) -> list[tuple[str, str, str, str]]:
    """``(name, role, shape, note)`` rows: the note gives the ``(in, out)`` matrix of LINEAR tensors and the dtype."""
    rows = []
    for name, shape in shapes.items():
        spec = specs.get(name)
        if spec is None:  # not merged (integer buffers): shown so the table lists every tensor
            rows.append((name, "-", str(tuple(shape)), (dtypes or {}).get(name, "")))
            continue
        notes = []
        if spec.role is Role.LINEAR:
            notes.append(f"(in, out) = {spec.matrix_shape(tuple(shape))}")
        if dtypes and name in dtypes:
            notes.append(dtypes[name])
        rows.append((name, spec.role.value, str(tuple(shape)), " ".join(notes)))
    return rows


def format_role_table(rows: Iterable[tuple[str, str, str, str]]) -> str:
    """Rows of :func:`role_rows` as aligned text with a total line (as :func:`catmerge_jax.roles.role_table`)."""
    rows = list(rows)
    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'name':<{width}}  {'role':<6}  shape"]
    lines += [f"{n:<{width}}  {r:<6}  {s} {e}".rstrip() for n, r, s, e in rows]
    counts = {role.value: sum(1 for r in rows if r[1] == role.value) for role in Role}
    passed = sum(1 for r in rows if r[1] == "-")
    lines.append("total: " + ", ".join(f"{n} {name}" for name, n in counts.items())
                 + (f", {passed} copied (not float)" if passed else ""))
    return "\n".join(lines)


def parse_role_override(text: str) -> tuple[str, str]:
    """``"PATTERN=ROLE"`` → ``(pattern, role)``; the role must be one of :data:`ROLE_NAMES`."""
    pattern, sep, role = text.rpartition("=")
    pattern, role = pattern.strip(), role.strip().lower()
    if not sep or not pattern:
        raise RoleError(f"--role expects PATTERN=ROLE, got {text!r}")
    if role not in ROLE_NAMES:
        raise RoleError(f"--role {text!r}: role {role!r} is unknown; expected one of {', '.join(ROLE_NAMES)}")
    return pattern, role
