"""Layout roles reach every method without the caller passing them (issue 23).

The same random CLIP vision weights in Hugging Face's layout (separate q/k/v, a ``visual_projection`` Dense) and in
open_clip's (a fused ``in_proj`` holding q|k|v, a bare ``proj``) are one function, so every method that reads leaf
roles must merge them to the same weights. The open_clip side goes through the natural path, ``open_clip_to_flax``
→ ``ClipVisionModel(layout="open_clip")`` → ``capture_stats`` → merge, with no ``roles=`` anywhere: the statistics
carry the model's declared specs. Data-free merges get them from ``open_clip_to_flax(..., with_roles=True)``.
Everything runs in float64 (the statistics are float32 in both layouts), so the layouts agree to rounding.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import catmerge_jax as cm
from catmerge_jax.methods.registry import available_methods, get_method
from catmerge_jax.models.clip_vit import (ClipVisionConfig, ClipVisionModel, hf_to_open_clip_params,
                                          open_clip_to_hf_params)
from catmerge_jax.roles import LeafSpec, Role
from catmerge_jax.stats import stats_specs
from converters.open_clip import flax_to_open_clip, open_clip_to_flax

K = 3
# Methods whose result depends on leaf roles (checked below against the registry: every other method ignores
# roles=), with small hyperparameters. They are all deterministic and act layer by layer.
ROLE_METHODS = {"cat": {"alpha": 0.5, "lam": 5.0, "c": 2}, "lot": {"alpha": 0.8}, "regmean": {"alpha": 0.9},
                "tsv": {"alpha": 1.0}, "iso_c": {"alpha": 1.0}, "iso_cts": {"alpha": 1.0, "common_fraction": 0.5},
                "wudi": {"alpha": 1.0, "steps": 5, "lr": 1e-2}}
DATA_FREE = ("tsv", "iso_c", "iso_cts", "wudi")
# Per leaf, |merged update (open_clip) − merged update (HF)| ≤ TOL · max |merged update (HF)|. The layouts differ
# only in how float64 sums are ordered (fused vs separate projections) and then in float32 rounding of the statistics;
# eigen/SVD bases amplify that by at most a condition number, far below this on these well-separated spectra.
TOL = 1e-5


def _open_clip_state(params) -> dict[str, np.ndarray]:
    """open_clip-layout Flax params → open_clip's PyTorch state dict (keys ``visual.*``), written from open_clip's
    naming: Linear ``weight (out, in)``, Conv2d ``(out, in, p, p)``, LayerNorm ``weight``, fused
    ``attn.in_proj_weight (3d, d)``, bare ``proj (d, out)``."""
    state = {}
    for path, w in cm.leaves_with_paths(params):
        w = np.asarray(w)
        *mods, name = path.split("/")
        if mods[-2:] == ["attn", "in_proj"]:
            key, w = ".".join(mods[:-1]) + (".in_proj_weight" if name == "kernel" else ".in_proj_bias"), \
                w.T if name == "kernel" else w
        elif name == "kernel":
            key, w = ".".join(mods) + ".weight", w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T
        elif name == "scale":
            key = ".".join(mods) + ".weight"
        else:
            key = path.replace("/", ".")
        state["visual." + key] = w
    return state


def _clip_problem() -> dict:
    """Base and K task weights in both layouts, exemplars, and each layout's captured statistics (float64)."""
    cfg = ClipVisionConfig(image_size=32, patch_size=16, width=32, layers=1, heads=2, mlp_dim=64, output_dim=16,
                           dtype=jnp.float64)
    hf = ClipVisionModel(cfg, layout="hf")
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(4, 32, 32, 3)) for _ in range(K)]
    init = hf.init(jax.random.key(0), jnp.asarray(images[0]))["params"]
    base = jax.tree.map(lambda w: np.asarray(w, np.float64), init)
    tasks = [jax.tree.map(lambda w: w + 0.05 * rng.normal(size=w.shape), base) for _ in range(K)]
    hf_stats = [cm.capture_stats(hf, t, x) for t, x in zip(tasks, images)]

    # The natural open_clip path: a state dict → open_clip_to_flax → the model it names → capture, no roles=.
    states = [_open_clip_state(hf_to_open_clip_params(p)) for p in [base, *tasks]]
    converted = [open_clip_to_flax(s, heads=2, dtype=np.float64) for s in states]
    oc_cfg = dataclasses.replace(converted[0][0], dtype=jnp.float64)
    assert dataclasses.replace(oc_cfg, dtype=cfg.dtype) == cfg
    oc = ClipVisionModel(oc_cfg, layout="open_clip")
    oc_base, oc_tasks = converted[0][1], [c[1] for c in converted[1:]]
    oc_stats = [cm.capture_stats(oc, t, x) for t, x in zip(oc_tasks, images)]
    wrapped = [open_clip_to_flax(s, heads=2, dtype=np.float64, with_roles=True)[1] for s in states]
    return dict(base=base, tasks=tasks, hf_stats=hf_stats, oc=oc, oc_base=oc_base, oc_tasks=oc_tasks,
                oc_stats=oc_stats, wrapped=wrapped, meta=converted[0][2])


def _updates(merged, base):
    return {p: np.asarray(m, np.float64) - np.asarray(b, np.float64)
            for (p, m), b in zip(cm.leaves_with_paths(merged), jax.tree.leaves(base))}


def _worst(hf_merged, oc_merged, base):
    """max over leaves of |Δ_open_clip − Δ_hf| / max|Δ_hf|, the open_clip merge mapped into HF's layout."""
    a, b = _updates(hf_merged, base), _updates(open_clip_to_hf_params(oc_merged), base)
    assert a.keys() == b.keys()
    return max((float(np.max(np.abs(a[p] - b[p])) / max(np.max(np.abs(a[p])), 1e-300)), p) for p in a)


def test_open_clip_natural_path_merges_like_hf_layout_for_every_role_method(x64):
    """Captured statistics carry the open_clip model's specs and every role-reading method uses them unasked;
    data-free methods get them from open_clip_to_flax(with_roles=True). One test, so that the CLIP problem is
    built once (xdist would build a shared fixture once per worker)."""
    clip = _clip_problem()
    assert stats_specs(clip["oc_stats"][0])["transformer/resblocks/0/attn/in_proj/kernel"].out_blocks == 3
    hf_merged = {name: get_method(name).merge(clip["base"], clip["tasks"], stats=clip["hf_stats"], **hp)
                 for name, hp in ROLE_METHODS.items()}
    worst = {}
    for name, hp in ROLE_METHODS.items():
        merged = get_method(name).merge(clip["oc_base"], clip["oc_tasks"], stats=clip["oc_stats"], **hp)
        worst[name] = _worst(hf_merged[name], merged, clip["base"])
    wrapped = clip["wrapped"]
    for name in DATA_FREE:  # no statistics: the params carry the specs, and the merge returns the same kind
        merged = get_method(name).merge(wrapped[0], wrapped[1:], **ROLE_METHODS[name])
        assert isinstance(merged, cm.ParamsWithRoles) and merged.roles == wrapped[0].roles, name
        worst[f"{name} (with_roles)"] = _worst(hf_merged[name], merged, clip["base"])
    assert flax_to_open_clip(merged, clip["meta"])["visual.proj"].shape == (32, 16)  # writes back like plain params
    assert all(w <= TOL for w, _ in worst.values()), worst

    # The check can fail: stripped of the specs (the behaviour before), CAT's open_clip merge is off by a sizeable
    # fraction of the merged update (q/k/v trimmed with one basis, proj by task arithmetic).
    bare = [jax.tree.map(lambda s: dataclasses.replace(s, spec=None), st, is_leaf=_is_stats) for st in clip["oc_stats"]]
    assert not stats_specs(bare[0])
    stripped = cm.cat_merge(clip["oc_base"], clip["oc_tasks"], bare, **ROLE_METHODS["cat"])
    assert _worst(hf_merged["cat"], stripped, clip["base"])[0] > 0.05


# ---------------------------------------------------------------------------------------------------------------
# Overrides, conflicts and the carriers of declared specs, on a tiny model that declares a fused q|k|v kernel.


def _is_stats(x):
    return isinstance(x, cm.LeafStats)


class FusedQKV(nn.Module):
    """A fused ``q|k|v`` projection (like open_clip's ``in_proj``) that declares its three blocks."""

    @nn.compact
    def __call__(self, x):
        q, k, v = jnp.split(nn.Dense(12, name="qkv")(x), 3, axis=-1)
        return nn.Dense(4, name="out")(q * k + v)

    def param_roles(self):
        return {"qkv/kernel": LeafSpec(Role.LINEAR, out_blocks=3), "qkv/bias": LeafSpec(Role.SHIFT, out_blocks=3)}


@pytest.fixture(scope="module")
def fused():
    model = FusedQKV()
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(8, 4)).astype(np.float32) for _ in range(K)]
    base = model.init(jax.random.key(0), xs[0])["params"]
    tasks = [jax.tree.map(lambda w: w + 0.1 * rng.normal(size=w.shape).astype(np.float32), base) for _ in range(K)]
    stats = [cm.capture_stats(model, t, x) for t, x in zip(tasks, xs)]
    return model, base, tasks, stats, xs


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_explicit_roles_agree_refine_or_conflict(fused):
    model, base, tasks, stats, xs = fused
    assert stats_specs(stats[0]) == model.param_roles()
    merged = cm.cat_merge(base, tasks, stats, c=2)
    # Agreeing: the model's own roles (what callers used to pass), a bare role for a declared leaf (the declared
    # spec with its blocks is kept). Refining: a leaf the model declares nothing for.
    assert _same(cm.cat_merge(base, tasks, stats, c=2, roles=model.param_roles()), merged)
    assert _same(cm.cat_merge(base, tasks, stats, c=2, roles={"qkv/*": "linear", "qkv/bias": "shift"}), merged)
    refined = cm.cat_merge(base, tasks, stats, c=2, alpha=0.5, roles={"out/bias": "other"})
    want = base["out"]["bias"] + 0.5 * sum(t["out"]["bias"] - base["out"]["bias"] for t in tasks)  # task arithmetic
    np.testing.assert_allclose(refined["out"]["bias"], want, rtol=1e-6)
    assert not np.allclose(merged["out"]["bias"], want, rtol=1e-3)  # CAT masked it without the refinement
    # The declared blocks matter: reading the kernel as one matrix (no declaration at all) merges differently.
    plain_stats = [jax.tree.map(lambda s: dataclasses.replace(s, spec=None), s, is_leaf=_is_stats) for s in stats]
    assert not np.allclose(cm.cat_merge(base, tasks, plain_stats, c=2)["qkv"]["kernel"], merged["qkv"]["kernel"])
    # Conflicts: one line naming the leaf, on the stats path, the data-free path and at capture.
    with pytest.raises(cm.RoleConflictError, match=r"^roles= gives leaf 'qkv/kernel' the role other, but its model "
                                                   r"declares linear \(out_blocks=3\)"):
        cm.cat_merge(base, tasks, stats, c=2, roles={"qkv/kernel": "other"})
    wrapped = cm.with_roles(base, model.param_roles())
    with pytest.raises(cm.RoleConflictError, match=r"leaf 'qkv/kernel' the spec linear, but"):
        cm.tsv_merge(wrapped, tasks, roles={"qkv/kernel": LeafSpec(Role.LINEAR)})
    with pytest.raises(cm.RoleConflictError, match="leaf 'qkv/bias'"):
        cm.capture_stats(model, tasks[0], xs[0], roles={"qkv/bias": "other"})
    # Two declarations that disagree: tasks' statistics from different layouts, or params against statistics.
    other = [stats[0], stats[1], jax.tree.map(lambda s: dataclasses.replace(s, spec=LeafSpec(Role.OTHER))
                                              if s.spec else s, stats[2], is_leaf=_is_stats)]
    with pytest.raises(cm.RoleConflictError, match=r"leaf 'qkv/.*' is declared .* by stats\[0\] but other by "
                                                   r"stats\[2\]"):
        cm.cat_merge(base, tasks, other, c=2)
    with pytest.raises(cm.RoleConflictError, match=r"by the params but .* by stats\[0\]"):
        cm.lot_merge(cm.with_roles(base, {"qkv/kernel": "linear"}), tasks, stats)


def test_declared_specs_survive_stats_operations(fused, tmp_path):
    """Specs are static pytree data of LeafStats: jit, tree.map, stats_add and save/load keep them."""
    model, base, _, stats, _ = fused
    want = model.param_roles()
    s = stats[0]
    assert stats_specs(jax.jit(lambda t: jax.tree.map(lambda x: 2 * x, t))(s)) == want
    assert stats_specs(jax.vmap(lambda t: t)(jax.tree.map(lambda x: np.stack([x, x]), s))) == want
    assert stats_specs(cm.stats_add(s, cm.stats_from_arrays(base, {}))) == want
    assert stats_specs(cm.accumulate([cm.stats_from_arrays(base, {}), s])) == want
    cm.save_stats(tmp_path / "stats.npz", s)
    loaded = cm.load_stats(tmp_path / "stats.npz", base)
    assert stats_specs(loaded) == want
    for (p, a), b in zip(cm.leaves_with_paths(s), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b, err_msg=p)
    with pytest.raises(cm.RoleConflictError, match="different model layouts"):
        cm.stats_add(s, jax.tree.map(lambda t: dataclasses.replace(t, spec=LeafSpec(Role.OTHER)) if t.spec else t,
                                     s, is_leaf=_is_stats))


def test_params_with_roles_is_a_params_dict(fused):
    """The wrapper applies like plain params, keeps its roles through tree ops and jit, shows them in role_table,
    and a data-free merge of it equals the merge of plain params with the same roles passed explicitly."""
    model, base, tasks, _, xs = fused
    wrapped = cm.with_roles(base, model.param_roles())
    assert isinstance(wrapped, dict) and wrapped.roles == model.param_roles()
    np.testing.assert_array_equal(model.apply({"params": wrapped}, xs[0]), model.apply({"params": base}, xs[0]))
    for moved in (jax.tree.map(lambda w: 2 * w, wrapped), jax.jit(lambda p: p)(wrapped)):
        assert isinstance(moved, cm.ParamsWithRoles) and moved.roles == wrapped.roles
    assert [p for p, _ in cm.leaves_with_paths(wrapped)] == [p for p, _ in cm.leaves_with_paths(base)]
    assert cm.role_table(wrapped) == cm.role_table(base, model.param_roles())
    merged = cm.tsv_merge(wrapped, tasks)
    assert isinstance(merged, cm.ParamsWithRoles)
    assert _same(merged, cm.tsv_merge(base, tasks, roles=model.param_roles()))
    assert not _same(merged, cm.tsv_merge(base, tasks))


class _Consulted(Exception):
    pass


def _spy_roles(path, leaf):
    raise _Consulted(path)


def test_every_role_reading_method_is_covered():
    """A method reads roles iff it consults roles= (here a function that raises); all of those are in
    ROLE_METHODS, so the layout test above covers every one. A tiny tree keeps the other methods cheap; one that
    rejects these inputs before any role is read (a method needing exactly one task, say) cannot be a reader."""
    rng = np.random.default_rng(1)
    base = {"d": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)}}
    tasks = [jax.tree.map(lambda w: w + rng.normal(size=w.shape).astype(np.float32), base) for _ in range(2)]
    stats = [cm.stats_from_arrays(base, {"d/kernel": cm.linear_stats(rng.normal(size=(6, 4)))}) for _ in range(2)]
    readers = set()
    for name in available_methods():
        m = get_method(name)
        if m.extras or name.startswith("mergekit."):
            # Fisher / TATR-gradient need per-task extras and are elementwise; MergeKit's methods are elementwise
            # by design and their one adapter (catmerge_jax/mergekit/pytree.py) drops roles=.
            continue
        try:
            m.merge(base, tasks, stats=stats, roles=_spy_roles)
        except _Consulted:
            readers.add(name)
        except cm.CatMergeError:
            pass
    assert readers == set(ROLE_METHODS)
