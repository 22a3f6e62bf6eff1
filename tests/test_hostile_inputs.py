"""Issue 13: the CLI and the loaders under hostile and careless input.

Every test reproduces one defect of the issue (numbered in its docstring): no data loss (``--out`` overlapping the
inputs, a folder appearing at ``--out`` during the run, symlinks), strict readers (safetensors like the reference
implementation, bounded pickle loaders), one-line errors, clean-up after SIGTERM and of stale temporary folders,
and permissions that follow the umask. Fixtures: a 2-layer BERT folder made with transformers, hand-written files.
"""

from __future__ import annotations

from tests.fixtures.tiny_bert import save_tiny_bert  # noqa: E402

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from catmerge_jax import atomic, pipeline  # noqa: E402
from catmerge_jax.cli import main  # noqa: E402
from converters import safetensors_io as st  # noqa: E402
from converters.hf import load_hf_folder  # noqa: E402
from converters.pickled_checkpoints import (CheckpointFormatError, load_pickled_object,  # noqa: E402
                                            load_task_vectors_checkpoint)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a movie film was good bad great i love hate it this is what why how team code ? .".split()
TOKENIZER_NAMES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _save_bert(folder, *, seed, base=None, vocab=None, vocab_size=None, dtype=None):
    return save_tiny_bert(folder, seed=seed, words=WORDS, base=base, layers=2, vocab=vocab, vocab_size=vocab_size,
                          dtype=dtype)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base = _save_bert(str(root / "base"), seed=0)
    tasks = [_save_bert(str(root / f"task{k}"), seed=k + 1, base=base) for k in range(2)]
    text = root / "ex.txt"
    text.write_text("i love this movie .\nthe film was great\n", encoding="utf-8")
    return {"root": root, "base": base, "tasks": tasks, "text": str(text)}


def _digest(folder):
    """Names and contents of every file under ``folder`` (to prove an input was not touched)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def _run(capsys, args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _merge(env, out, *extra, method="task_arithmetic", base=None, tasks=None):
    args = ["merge", "--method", method, "--base", base or env["base"]]
    for t in tasks or env["tasks"]:
        args += ["--task", t]
    return args + ["--quiet", *extra, "--out", out]


def _one_line(rc, err, *needles, absent=()):
    assert rc == 2, err
    assert err.startswith("catmerge: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    for needle in absent:
        assert needle not in err, err


def _temps(folder):
    return [n for n in os.listdir(folder) if n.startswith((".catmerge-tmp-", ".tmp-", ".catmerge-old-"))]


# ---------------------------------------------------------------------------------------------- 1. --out vs inputs

@pytest.mark.parametrize("overwrite", [False, True])
def test_out_overlapping_an_input_is_refused(env, capsys, tmp_path, overwrite):
    """1. --out equal to, containing or inside an input folder (also through a symlinked parent) is refused, and
    with --overwrite nothing is deleted."""
    root = env["root"]
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    before = {f: _digest(f) for f in [env["base"], *env["tasks"]]}
    flag = ["--overwrite"] if overwrite else []
    cases = [(env["base"], "is the input folder"), (env["tasks"][1], "is the input folder"),
             (str(root), "contains the input folder"), (os.path.join(env["base"], "merged"), "is inside"),
             (str(alias / "task0"), "is the input folder")]
    for out, needle in cases:
        rc, _, err = _run(capsys, _merge(env, out, *flag))
        _one_line(rc, err, needle)
    assert {f: _digest(f) for f in before} == before
    assert not os.path.exists(os.path.join(env["base"], "merged"))
    assert not _temps(root)


# ---------------------------------------------------------------------------------------------- 2. --out appearing

def _appear_during_merge(monkeypatch, action):
    """Run ``action`` after the merge is computed and before it is written (what a user or a second run does)."""
    monkeypatch.undo()
    original = pipeline.merge_checkpoints

    def hooked(*args, **kwargs):
        merged = original(*args, **kwargs)
        action()
        return merged

    monkeypatch.setattr(pipeline, "merge_checkpoints", hooked)


def test_folder_appearing_at_out_is_never_replaced(env, capsys, tmp_path, monkeypatch):
    """2. A folder created at --out while the merge runs (with a file, or empty) is left untouched: exit 2, and the
    result is kept in the folder the message names."""
    out = tmp_path / "out"

    def user_folder():
        out.mkdir()
        (out / "mine.txt").write_text("precious")

    _appear_during_merge(monkeypatch, user_folder)
    rc, _, err = _run(capsys, _merge(env, out))
    _one_line(rc, err, "appeared while merging", "left untouched", "kept in")
    assert os.listdir(out) == ["mine.txt"] and (out / "mine.txt").read_text() == "precious"
    kept = err.strip().split("kept in ")[1]
    assert os.path.dirname(kept) == str(tmp_path) and ".catmerge-result-" in kept
    assert load_hf_folder(kept)[0] == "bert"                      # the merged model is whole there
    assert not _temps(tmp_path)

    # An empty folder the user creates counts too (os.rename would silently replace it).
    empty = tmp_path / "empty_out"
    _appear_during_merge(monkeypatch, lambda: empty.mkdir())
    rc, _, err = _run(capsys, _merge(env, empty))
    _one_line(rc, err, "appeared while merging")
    assert empty.is_dir() and os.listdir(empty) == []

    # With --overwrite the user asked for it: replaced.
    monkeypatch.undo()
    rc, _, err = _run(capsys, _merge(env, out, "--overwrite"))
    assert rc == 0, err
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()
    assert not _temps(tmp_path)


def test_two_merges_into_the_same_out_one_wins(env, capsys, tmp_path, monkeypatch):
    """2. Two concurrent merges into one --out: the one that finishes first wins, the other exits 2 and does not
    replace it (here the second run happens inside the first, between its merge and its rename)."""
    out = tmp_path / "out"
    results = []
    original = pipeline.merge_checkpoints

    def second_run(*args, **kwargs):
        merged = original(*args, **kwargs)
        if not results:
            monkeypatch.setattr(pipeline, "merge_checkpoints", original)
            results.append(main([str(a) for a in _merge(env, out, method="average")]))
        return merged

    monkeypatch.setattr(pipeline, "merge_checkpoints", second_run)
    rc, _, err = _run(capsys, _merge(env, out))                   # task_arithmetic, finishing second
    assert results == [0]
    _one_line(rc, err, "appeared while merging")
    merged = st.load_file(str(out / "model.safetensors"))
    tasks = [st.load_file(os.path.join(t, "model.safetensors")) for t in env["tasks"]]
    key = "encoder.layer.1.output.dense.weight"
    np.testing.assert_allclose(merged[key], (tasks[0][key] + tasks[1][key]) / 2, rtol=1e-6)  # the average won


def test_publish_dir_without_overwrite_never_replaces(tmp_path):
    """2. The rename primitive itself: a second publish into the same place fails; an accepted empty folder is
    filled; an empty folder that is not the accepted one is refused."""
    first, second = atomic.make_temp_dir(str(tmp_path), "o"), atomic.make_temp_dir(str(tmp_path), "o")
    (open(os.path.join(first, "a"), "w")).write("1")
    (open(os.path.join(second, "b"), "w")).write("2")
    out = str(tmp_path / "o")
    atomic.publish_dir(first, out)
    with pytest.raises(atomic.PublishConflict):
        atomic.publish_dir(second, out)
    assert os.listdir(out) == ["a"] and os.listdir(second) == ["b"]
    empty = tmp_path / "e"
    empty.mkdir()
    ident = atomic.dir_identity(str(empty))
    atomic.publish_dir(second, str(empty), accept=ident)
    assert os.listdir(empty) == ["b"]
    third = atomic.make_temp_dir(str(tmp_path), "f")
    (tmp_path / "f").mkdir()
    with pytest.raises(atomic.PublishConflict):
        atomic.publish_dir(third, str(tmp_path / "f"), accept=None)


# ---------------------------------------------------------------------------------------------- 3. tokenizer

def test_text_exemplars_need_a_matching_tokenizer(env, capsys, tmp_path):
    """3. A base without tokenizer files is refused for text exemplars (it would map every word to [UNK]); a
    tokenizer larger than the model's vocabulary is an error naming both sizes."""
    bare = tmp_path / "bare"
    shutil.copytree(env["base"], bare)
    for name in TOKENIZER_NAMES:
        if (bare / name).exists():
            (bare / name).unlink()
    rc, _, err = _run(capsys, _merge(env, tmp_path / "o", "--exemplars", env["text"], env["text"], base=bare))
    _one_line(rc, err, "no tokenizer files", str(bare))

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    small = _save_bert(str(tmp_path / "small"), seed=0, vocab=vocab, vocab_size=8)
    rc, _, err = _run(capsys, _merge(env, tmp_path / "o", "--exemplars", env["text"], base=small, tasks=[small]))
    _one_line(rc, err, f"has {len(vocab)} tokens", "vocab_size is 8")
    assert not (tmp_path / "o").exists() and not _temps(tmp_path)


def test_text_exemplars_all_unknown_are_refused(env, tmp_path):
    """3. Exemplars of which every word is [UNK] to the tokenizer (a vocabulary that does not fit) are refused."""
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("zebra xylophone\nquartz\n", encoding="utf-8")
    with pytest.raises(pipeline.InputError, match="every token .* is unknown"):
        pipeline.read_text_exemplars(unknown, env["base"], vocab_size=len(WORDS) + 5)


# ---------------------------------------------------------------------------------------------- 4. non-finite output

def test_non_finite_merged_weights_are_not_written(env, capsys, tmp_path):
    """4. --alpha 1e39 (inf in float32) and an fp16 base with a large alpha (overflows on the cast back) stop
    before anything is written, naming the leaf; --hparam values get the flags' checks."""
    out = tmp_path / "o"
    rc, _, err = _run(capsys, _merge(env, out, "--alpha", "1e39"))
    _one_line(rc, err, "merged leaf", "non-finite", "checkpoint key")
    half = [_save_bert(str(tmp_path / f"h{k}"), seed=k, base=env["base"] if k else None, dtype=torch.float16)
            for k in range(3)]
    rc, _, err = _run(capsys, _merge(env, out, "--alpha", "1e7", base=half[0], tasks=half[1:]))
    _one_line(rc, err, "merged leaf", "float16")
    for hparam, needle in (("alpha=1e400", "finite"), ("lam=-1", ">= 0"), ("c=1.5", "integer"), ("c=-2", ">= 0"),
                           ("alpha=nan", "finite")):
        rc, _, err = _run(capsys, _merge(env, out, "--exemplars", env["text"], env["text"], "--hparam", hparam,
                                         method="cat"))
        _one_line(rc, err, "--hparam " + hparam.split("=")[0], needle)
    assert not out.exists() and not _temps(tmp_path)


# ---------------------------------------------------------------------------------------------- 5. safetensors

def _raw_safetensors(path, header, data=b"", pad=True):
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


@pytest.mark.parametrize("name,header,data", [
    ("negative_offset", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8),
    ("overlap", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    ("gap", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
    ("trailing_bytes", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 12),
    ("float_shape", {"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8),
    ("bool_shape", {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
    ("negative_shape", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
    ("reversed_offsets", {"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4),
    ("wrong_size", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    ("past_end", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
])
def test_safetensors_reader_is_as_strict_as_the_reference(tmp_path, name, header, data):
    """5. Files the `safetensors` package refuses are refused here too (before: header bytes read as weights)."""
    reference = pytest.importorskip("safetensors.numpy")
    path = _raw_safetensors(tmp_path / f"{name}.safetensors", header, data)
    with pytest.raises(Exception):
        reference.load_file(path)
    with pytest.raises(st.SafetensorsError):
        st.load_file(path)
    with pytest.raises(st.SafetensorsError):
        st.read_header(path)


def test_safetensors_header_length_beyond_the_file(tmp_path):
    """5. A header length pointing past the end of the file (the reference: InvalidHeaderLength)."""
    reference = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 20) + b'{"a": 1}')
    with pytest.raises(Exception):
        reference.load_file(str(path))
    with pytest.raises(st.SafetensorsError, match="past the end"):
        st.read_header(str(path))
    # A well-formed file still reads, like the reference reads it.
    good = _raw_safetensors(tmp_path / "good.safetensors",
                            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "z": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}},
                            np.array([1.5, -2.0], np.float32).tobytes())
    np.testing.assert_array_equal(st.load_file(good)["a"], reference.load_file(good)["a"])


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                   "link.safetensors"])
def test_sharded_index_cannot_point_outside_its_folder(tmp_path, shard):
    """5. A sharded index naming a file outside the folder (.., absolute, a symlink out) is refused."""
    folder = tmp_path / "model"
    other = tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    _raw_safetensors(other / "model.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                     b"\0" * 4)
    (folder / "link.safetensors").symlink_to(other / "model.safetensors")
    (folder / st.INDEX_NAME).write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(st.SafetensorsError, match="outside|inside the folder"):
        st.list_tensors(str(folder))


# ---------------------------------------------------------------------------------------------- 6. pickles

def _g(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(text):
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _i(n):
    return b"I" + str(n).encode() + b"\n"


def _tup(*items):
    return b"(" + b"".join(items) + b"t"


def _storage(key, numel, dtype="FloatStorage"):
    return _tup(_s("storage"), _g("torch", dtype), _s(key), _s("cpu"), _i(numel)) + b"Q"  # BINPERSID


def _tensor(storage, offset, size, stride):
    return (_g("torch._utils", "_rebuild_tensor_v2")
            + _tup(storage, _i(offset), _tup(*map(_i, size)), _tup(*map(_i, stride)), b"I00\n",
                   _g("collections", "OrderedDict") + b")R") + b"R")


def _zip(path, pickle_body, storages=(), compress=False):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02" + pickle_body + b".")
        for key, data in storages:
            zf.writestr(f"archive/data/{key}", data)
    return str(path)


def _state(tensor):
    return b"}" + _s("w") + tensor + b"s"  # {"w": tensor}


@pytest.mark.parametrize("size,stride,numel,data,match", [
    ((1 << 16, 1 << 13), (0, 0), 1, b"\0" * 4, "needs more than"),            # 512 MiB from 4 bytes, stride 0
    ((4, 2), (1, 1), 8, b"\0" * 32, "aliasing"),                              # overlapping strides
    ((2, 2), (0, 1), 4, b"\0" * 16, "aliasing"),                              # stride 0 with size > 1
    ((-1, 4), (4, 1), 4, b"\0" * 16, "negative"),
    ((2,), (1,), 1 << 30, b"\0" * 8, "holds 8 bytes, expected"),              # storage larger than the bytes present
    ((2,), (1,), -4, b"\0" * 8, "non-negative"),
])
def test_pickled_tensor_shapes_are_bounded(tmp_path, size, stride, numel, data, match):
    """6. Storage sizes are bounded by the bytes present; aliasing strides and negative sizes are refused."""
    path = _zip(tmp_path / "t.pt", _state(_tensor(_storage("0", numel), 0, size, stride)), [("0", data)])
    with pytest.raises(CheckpointFormatError, match=match):
        load_task_vectors_checkpoint(path)


def test_pickled_real_views_still_load(tmp_path):
    """6. What torch really writes (a transposed view at an offset) still loads, bit-exactly."""
    values = np.arange(10, dtype=np.float32)
    path = _zip(tmp_path / "t.pt", _state(_tensor(_storage("0", 10), 2, (2, 3), (1, 2))), [("0", values.tobytes())])
    np.testing.assert_array_equal(load_task_vectors_checkpoint(path)["w"], values[2:8].reshape(3, 2).T)


def test_zip_bomb_is_capped(tmp_path):
    """6. A small deflated archive whose storage expands far beyond its size is refused after a bounded read."""
    n = 16 << 20
    path = _zip(tmp_path / "bomb.pt", _state(_tensor(_storage("0", n // 4), 0, (n // 4,), (1,))),
                [("0", bytes(n))], compress=True)
    assert os.path.getsize(path) < 100_000
    with pytest.raises(CheckpointFormatError, match="zip bomb"):
        load_task_vectors_checkpoint(path)


_MOD = _g("torch.nn.modules.module", "Module") + b")\x81"  # NEWOBJ of a placeholder module class


def _module(children=b""):
    """A module object with empty _parameters and the given _modules items (pickle opcodes), BUILD applied."""
    return (_MOD + b"}(" + _s("_parameters") + b"}" + _s("_modules") + b"}(" + children + b"u" + b"u" + b"b")


def test_module_dag_with_shared_subtrees_is_refused_fast(tmp_path):
    """6. 2 KB describing a 24-level DAG (2**24 paths) used to take minutes and gigabytes: shared submodules are
    detected at the first repeat."""
    body = _module() + b"q\x00" + b"0"                             # leaf -> memo 0
    for level in range(1, 25):
        children = _s("a") + b"h" + bytes([level - 1]) + _s("b") + b"h" + bytes([level - 1])
        body += _module(children) + b"q" + bytes([level]) + b"0"
    body += b"h" + bytes([24])
    path = _zip(tmp_path / "dag.pt", body)
    assert os.path.getsize(path) < 4096
    with pytest.raises(CheckpointFormatError, match="same object"):
        load_task_vectors_checkpoint(path)


def test_module_cycles_and_deep_nesting_are_format_errors(tmp_path):
    """6. A module containing itself and a 5000-deep module chain raise CheckpointFormatError (not RecursionError)."""
    cyclic = _MOD + b"q\x00" + b"}(" + _s("_parameters") + b"}" + _s("_modules") + b"}(" + _s("me") + b"h\x00uub"
    with pytest.raises(CheckpointFormatError, match="contains itself"):
        load_task_vectors_checkpoint(_zip(tmp_path / "cycle.pt", cyclic))
    depth = 5000
    head = _MOD + b"}(" + _s("_parameters") + b"}" + _s("_modules") + b"}(" + _s("c")
    deep = head * depth + _module() + b"uub" * depth
    with pytest.raises(CheckpointFormatError, match="deeper than"):
        load_task_vectors_checkpoint(_zip(tmp_path / "deep.pt", deep))


@pytest.mark.parametrize("payload", [
    _g("__builtin__", "set") + b")R}" + _s("x") + _i(1) + b"sb",             # BUILD on set()
    _g("torch", "Size") + _tup(_tup(_i(1))) + b"R}" + _s("x") + _i(1) + b"sb",   # BUILD on a torch.Size tuple
    _g("__builtin__", "slice") + _tup(_i(1)) + b"R}" + _s("x") + _i(1) + b"sb",  # BUILD on slice
])
def test_build_on_allowed_values_is_a_format_error(tmp_path, payload):
    """6. BUILD on allow-listed values raised AttributeError; it is a CheckpointFormatError now."""
    with pytest.raises(CheckpointFormatError):
        load_pickled_object(_zip(tmp_path / "b.pt", payload))


def _legacy(path, body, tail):
    import pickle

    magic = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    head = magic + pickle.dumps(1001, protocol=2) + pickle.dumps({"little_endian": True}, protocol=2)
    with open(path, "wb") as f:
        f.write(head + b"\x80\x02" + body + b"." + tail)
    return str(path)


def test_legacy_checkpoint_sizes_and_nesting_are_bounded(tmp_path):
    """6. Legacy format: a storage claiming 2**40 elements after 8 bytes, and a 100000-deep list, are format errors
    (before: a huge read, a RecursionError)."""
    import pickle

    storage = (_tup(_s("storage"), _g("torch", "FloatStorage"), _s("0"), _s("cpu"), _i(1 << 40), b"N") + b"Q")
    body = _state(_g("torch._utils", "_rebuild_tensor_v2") + _tup(storage, _i(0), _tup(_i(2)), _tup(_i(1)), b"I00\n",
                                                                 _g("collections", "OrderedDict") + b")R") + b"R")
    tail = pickle.dumps(["0"], protocol=2) + struct.pack("<q", 1 << 40) + b"\0" * 8
    with pytest.raises(CheckpointFormatError, match="remain"):
        load_task_vectors_checkpoint(_legacy(tmp_path / "big.pt", body, tail))
    deep = b"]" * 100_000 + b"a" * 99_999
    with pytest.raises(CheckpointFormatError, match="deeper than|nested"):
        load_pickled_object(_legacy(tmp_path / "deep.pt", deep, pickle.dumps([], protocol=2)))


# ---------------------------------------------------------------------------------------------- 7. + 9. messages

@pytest.fixture(scope="module")
def clip_base(tmp_path_factory):
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8, projection_dim=12)
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("clip") / "base")
    transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def test_bad_exemplar_files_are_one_line_errors(env, clip_base, capsys, tmp_path):
    """7. + 9. An .npz named .npy, a text file named .npy (no allow_pickle hint), a folder and /dev/null as
    exemplar files: each a one-line error saying what is wrong."""
    out = tmp_path / "o"
    npz = tmp_path / "pixels.npy"
    with open(npz, "wb") as f:
        np.savez(f, x=np.zeros((2, 16, 16, 3), np.float32))
    text = tmp_path / "text.npy"
    text.write_text("not pixels\n")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    clip = dict(env, base=clip_base)
    for path, needles, absent in ((npz, [".npz archive"], []), (text, ["not a valid .npy"], ["allow_pickle"]),
                                  (folder, ["is a folder"], ["does not exist"]),
                                  ("/dev/null", ["not a regular file"], ["does not exist"])):
        rc, _, err = _run(capsys, _merge(clip, out, "--exemplars", path, method="average", tasks=[clip_base]))
        _one_line(rc, err, str(path), *needles, absent=absent)
    truncated = tmp_path / "short.npy"
    np.save(truncated, np.zeros((4, 16, 16, 3), np.float32))
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) - 100)
    rc, _, err = _run(capsys, _merge(clip, out, "--exemplars", truncated, method="average", tasks=[clip_base]))
    _one_line(rc, err, "truncated")
    assert not out.exists()


def test_reserved_and_malformed_hparams_are_one_line_errors(env, capsys, tmp_path):
    """7. --hparam lam=foo, roles=x, progress=1 (reserved) give one line, no traceback."""
    out = tmp_path / "o"
    for hparam, needle in (("lam=foo", "must be a number"), ("roles=x", "reserved"), ("progress=1", "reserved"),
                           ("stats=1", "reserved"), ("alpha=" + "[" * 5000, "must be a number")):
        rc, _, err = _run(capsys, _merge(env, out, "--exemplars", env["text"], env["text"], "--hparam", hparam,
                                         method="cat"))
        _one_line(rc, err, "--hparam " + hparam.split("=")[0], needle)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- 8. config vs keys

def test_config_claiming_more_layers_than_the_weights_fails_fast(env, capsys, tmp_path):
    """8. A config claiming 100000 layers over 2 layers of weights is refused from the keys, before any model is
    built (it used to trace for minutes)."""
    liar = tmp_path / "liar"
    shutil.copytree(env["base"], liar)
    config = json.loads((liar / "config.json").read_text())
    config["num_hidden_layers"] = 100000
    (liar / "config.json").write_text(json.dumps(config))

    def too_slow(signum, frame):
        raise TimeoutError("the layer-count check did not run before the model was built")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)  # a guard so a regression fails instead of hanging the suite; the check takes milliseconds
    try:
        rc, _, err = _run(capsys, ["roles", "--base", liar])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    _one_line(rc, err, "num_hidden_layers=100000", "2 layer(s)")


# ---------------------------------------------------------------------------------------------- 9. messages

def test_misleading_messages_are_fixed(env, capsys, tmp_path):
    """9. roles --base FILE; malformed config.json and index JSON name the file and the position."""
    rc, _, err = _run(capsys, ["roles", "--base", os.path.join(env["base"], "config.json")])
    _one_line(rc, err, "is a file", absent=["does not exist"])

    broken = tmp_path / "broken"
    shutil.copytree(env["base"], broken)
    (broken / "config.json").write_text('{"model_type": "bert",\n "hidden_size": 16,,}')
    rc, _, err = _run(capsys, ["roles", "--base", broken])
    _one_line(rc, err, str(broken / "config.json"), "line 2 column")

    sharded = tmp_path / "sharded"
    shutil.copytree(env["base"], sharded)
    (sharded / st.INDEX_NAME).write_text('{"weight_map": {"a": "model.safetensors"\n\n')
    rc, _, err = _run(capsys, ["roles", "--base", sharded])
    _one_line(rc, err, str(sharded / st.INDEX_NAME), "line 3 column")


def test_symlinked_out_is_refused_truthfully(env, capsys, tmp_path):
    """9. A symlinked --out (with or without --overwrite) is refused before any work: the link and its target are
    left as they were (before: the target was written and the run reported failure)."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    for flags in ([], ["--overwrite"]):
        rc, _, err = _run(capsys, _merge(env, link, *flags))
        _one_line(rc, err, "symbolic link")
    assert link.is_symlink() and os.listdir(target) == ["keep.txt"]
    assert not _temps(tmp_path)


# ---------------------------------------------------------------------------------------------- 10. leftovers

def _child_env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


def test_sigterm_removes_the_temporary_folder(env, tmp_path):
    """10. SIGTERM is handled like SIGINT: the run's temporary folder is removed and the exit status is 143."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "catmerge_jax.cli", *_merge(env, out, "--exemplars", env["text"], env["text"],
                                                             method="cat")]
    proc = subprocess.Popen([str(a) for a in args], env=_child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not [n for n in os.listdir(tmp_path) if n.startswith(atomic.TEMP_PREFIX)]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the temporary folder never appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "catmerge: terminated" in err
    assert os.listdir(tmp_path) == []                               # neither temp folder nor --out


@pytest.fixture
def interpreter_signal_handlers():
    """The handlers a fresh ``catmerge`` process has (Python's ``default_int_handler`` for SIGINT, the system
    default for SIGTERM), restored afterwards. A test that raises signals in-process must not depend on what the
    test runner or an earlier test in the same worker left installed: one CI run found SIGINT not raising
    ``KeyboardInterrupt`` in an xdist worker (its handler had been replaced), and the test failed for that alone."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)


@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 128 + signal.SIGTERM, "terminated")])
def test_signal_right_after_mkdir_leaves_no_temporary_folder(env, capsys, tmp_path, monkeypatch, signum, status,
                                                              word, interpreter_signal_handlers):
    """10. A signal delivered the instant ``mkdir`` has made the temporary folder (before any code could take
    charge of removing it) still ends with the folder removed: creation runs with the signals deferred."""
    real_mkdir = os.mkdir

    def mkdir_then_signal(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        if os.path.basename(path).startswith(atomic.TEMP_PREFIX):
            signal.raise_signal(signum)   # the Python handler runs at the very next bytecode

    monkeypatch.setattr(os, "mkdir", mkdir_then_signal)
    rc, _, err = _run(capsys, _merge(env, tmp_path / "out"))
    assert rc == status and f"catmerge: {word}" in err
    assert os.listdir(tmp_path) == []
    # The folder helper on its own: the KeyboardInterrupt reaches the caller and the folder is gone.
    signum = signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        with atomic.temp_dir(str(tmp_path), "alone"):
            raise AssertionError("the block must not run: the signal came first")
    assert os.listdir(tmp_path) == []
    # The single-file helper: a signal the instant its temporary file is opened.
    real_open = os.open

    def open_then_signal(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if os.path.basename(path).startswith(".tmp-"):
            signal.raise_signal(signum)
        return fd

    monkeypatch.setattr(os, "open", open_then_signal)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_file(tmp_path / "one.txt", "w") as f:
            f.write("never")
    assert os.listdir(tmp_path) == []


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_folders_are_cleared(env, capsys, tmp_path):
    """10. At the next run into the same parent, temporary folders of dead runs (name prefix + marker with a dead
    PID) are removed; look-alikes without a marker, of a live process, or of another host are kept."""
    def plant(name, marker):
        path = tmp_path / name
        (path / "partial").mkdir(parents=True)
        (path / "partial" / "model.safetensors").write_bytes(b"half")
        if marker is not None:
            (path / atomic.MARKER).write_text(json.dumps(marker))
        return path

    host = socket.gethostname()
    dead = plant(atomic.TEMP_PREFIX + "out-dead", {"tool": "catmerge", "pid": _dead_pid(), "start": "0",
                                                   "host": host})
    # This very PID, but a different process start time: the PID was reused, the writer is gone.
    reused = plant(atomic.TEMP_PREFIX + "out-reused", {"tool": "catmerge", "pid": os.getpid(), "start": "0",
                                                       "host": host})
    unmarked = plant(atomic.TEMP_PREFIX + "out-unmarked", None)
    live = plant(atomic.TEMP_PREFIX + "out-live", {"tool": "catmerge", "pid": os.getpid(),
                                                   "start": atomic._start_time(os.getpid()), "host": host})
    elsewhere = plant(atomic.TEMP_PREFIX + "out-elsewhere", {"tool": "catmerge", "pid": _dead_pid(), "start": None,
                                                             "host": host + "-other"})
    other_name = plant(".tmp-out-dead", {"tool": "catmerge", "pid": _dead_pid(), "start": None, "host": host})
    # Issue 23: today's scheme keeps the marker BESIDE the folder (killed with the whole model written).
    beside = plant(atomic.TEMP_PREFIX + "out-beside", None)
    (tmp_path / (beside.name + atomic.MARKER)).write_text(json.dumps({"tool": "catmerge", "pid": _dead_pid(),
                                                                      "start": None, "host": host}))
    rc, _, err = _run(capsys, _merge(env, tmp_path / "out"))
    assert rc == 0, err
    assert not dead.exists()
    assert not beside.exists() and not (tmp_path / (beside.name + atomic.MARKER)).exists()
    assert not reused.exists() or atomic._start_time(os.getpid()) is None  # start times need /proc
    assert unmarked.exists() and live.exists() and elsewhere.exists() and other_name.exists()
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not (tmp_path / "out" / atomic.MARKER).exists()


# ---------------------------------------------------------------------------------------------- 11. umask

def test_output_permissions_follow_the_umask(env, tmp_path):
    """11. With umask 027 the output folder is 0750 and its files 0640 (before: 0700 and 0600 whatever the umask)."""
    out = tmp_path / "out"
    code = ("import os, sys; os.umask(0o027); from catmerge_jax.cli import main; "
            f"sys.exit(main({[str(a) for a in _merge(env, out)]!r}))")
    proc = subprocess.run([sys.executable, "-c", code], env=_child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o750
    for name in ("model.safetensors", "config.json", "vocab.txt"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o640, name


def test_failed_run_removes_the_parents_it_created(env, capsys, tmp_path):
    """2. + 10. A run that fails after its temporary folder was made leaves nothing, not even the parent folders it
    created for --out; a successful one creates them."""
    out = tmp_path / "a" / "b" / "out"
    rc, _, err = _run(capsys, _merge(env, out, tasks=[env["tasks"][0], str(tmp_path / "missing_task")]))
    _one_line(rc, err, "missing_task", "does not exist")
    assert os.listdir(tmp_path) == []
    rc, _, err = _run(capsys, _merge(env, out))
    assert rc == 0, err
    assert sorted(os.listdir(out.parent)) == ["out"]


def test_a_sigterm_swallowed_inside_a_gc_callback_still_stops_the_run():
    """A signal handled while Python runs a gc callback (jax installs one) raises inside it, where the exception is
    only reported as "ignored": without a second delivery the merge ran on and exited 0 (seen in CI)."""
    import gc
    import time as _time

    from catmerge_jax import cli

    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs between these bytecodes, inside the callback
                pass

    gc.callbacks.append(callback)
    try:
        with pytest.raises(cli.Terminated):
            with cli._sigterm_as_interrupt():
                gc.collect()
                deadline = _time.monotonic() + 10
                while _time.monotonic() < deadline:
                    sum(range(100))
    finally:
        gc.callbacks.remove(callback)
    assert fired and signal.getsignal(signal.SIGTERM) is not cli._on_sigterm   # handler and hook restored
    assert sys.unraisablehook is not None and "redeliver" not in getattr(sys.unraisablehook, "__qualname__", "")


# ---------------------------------------------------------------------------------------------- issue 23: fuzzed CLI

def _with_config(env, tmp_path, name, **changes):
    """A copy of the base folder whose config.json has ``changes`` (``None`` values written as JSON null)."""
    folder = tmp_path / name
    shutil.copytree(env["base"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("field, value, shown, expected", [
    ("hidden_size", "16", '"16" (a string)', "a positive integer"),     # before: "not all arguments converted ..."
    ("hidden_size", [16], "[16] (a list)", "a positive integer"),
    ("num_attention_heads", None, "null", "a positive integer"),       # before: a shape mismatch against 768
    ("intermediate_size", -4, "-4", "a positive integer"),             # before: a JAX broadcasting error
    ("vocab_size", True, "true (a boolean)", "a positive integer"),    # before: a shape mismatch against 1
    ("num_hidden_layers", 2.0, "2.0", "a non-negative integer"),
    ("layer_norm_eps", "1e-12", '"1e-12" (a string)', "a positive number"),  # before: a tracer + str TypeError
    ("hidden_act", {}, "{} (an object)", "a string"),
    ("pad_token_id", -1, "-1", "a non-negative integer or null"),
])
def test_config_fields_of_the_wrong_type_are_named(env, capsys, tmp_path, field, value, shown, expected):
    """Issue 23: every config.json field the loaders read is checked before a model is built; the one-line error
    names the file, the field, what it holds and what was expected."""
    folder = _with_config(env, tmp_path, "bad", **{field: value})
    rc, _, err = _run(capsys, ["roles", "--base", folder])
    _one_line(rc, err, f"{folder / 'config.json'}: {field} is {shown}; expected {expected}")


def test_nested_config_fields_are_named_with_their_section(env, capsys, tmp_path):
    """Issue 23: CLIP's vision_config and BLIP's text_config fields are named ``section.field``; a section that is no
    object is named itself."""
    cases = [({"model_type": "clip", "vision_config": {"patch_size": "32"}},
              'vision_config.patch_size is "32" (a string); expected a positive integer (or a list of two)'),
             ({"model_type": "clip", "vision_config": [1]}, "vision_config is [1] (a list); expected an object"),
             ({"model_type": "clip_vision_model", "image_size": [224, -224]},
              "image_size is [224, -224] (a list); expected a positive integer (or a list of two)"),
             ({"model_type": "blip", "architectures": ["BlipForQuestionAnswering"],
               "text_config": {"vocab_size": None}}, "text_config.vocab_size is null; expected a positive integer")]
    for k, (changes, needle) in enumerate(cases):
        folder = _with_config(env, tmp_path, f"bad{k}", **changes)
        rc, _, err = _run(capsys, ["roles", "--base", folder])
        _one_line(rc, err, f"{folder / 'config.json'}: {needle}")


def _with_index(env, tmp_path, name, weight_map):
    """A copy of the base folder with a shard index whose first entry maps to ``weight_map`` (a dict: as given)."""
    folder = tmp_path / name
    shutil.copytree(env["base"], folder)
    if not isinstance(weight_map, dict):
        names = list(st.read_header(str(folder / "model.safetensors")))
        weight_map = {n: (weight_map if i == 0 else "model.safetensors") for i, n in enumerate(names)}
    (folder / st.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_shard_index_entries_are_named(env, capsys, tmp_path):
    """Issue 23: a shard index entry naming a folder (before: "[Errno 21] Is a directory: '.../.'"), a missing file
    or a path out of the folder is reported by its entry, with what it must be."""
    first = list(st.read_header(os.path.join(env["base"], "model.safetensors")))[0]
    for k, (shard, needle) in enumerate([(".", "which is a folder; each entry must name a .safetensors file"),
                                         ("nope.safetensors", "which is missing from"),
                                         ("../x.safetensors", "which is not a file name inside the folder")]):
        folder = _with_index(env, tmp_path, f"index{k}", shard)
        rc, _, err = _run(capsys, ["roles", "--base", folder])
        _one_line(rc, err, f"{folder / st.INDEX_NAME}: weight_map entry {first!r} names {shard!r}, {needle}",
                  absent=["Errno"])
    folder = _with_index(env, tmp_path, "index_list", {})
    (folder / st.INDEX_NAME).write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    rc, _, err = _run(capsys, ["roles", "--base", folder])
    _one_line(rc, err, f"{folder / st.INDEX_NAME}: weight_map is a JSON list; expected an object of tensor name")
    (folder / st.INDEX_NAME).unlink()
    (folder / st.INDEX_NAME).mkdir()
    rc, _, err = _run(capsys, ["roles", "--base", folder])
    _one_line(rc, err, f"{folder / st.INDEX_NAME} is a folder; expected the JSON shard index file", absent=["Errno"])


def test_alpha_flag_is_the_merge_scale_only(env, capsys, tmp_path):
    """Issue 23: ``--alpha`` is the merge scale. RegMean's ``alpha`` is its Gram shrinkage, so ``--alpha`` is refused
    for it (pointing to ``--hparam alpha=``), as for a method with no alpha at all; nothing is read or written."""
    out = tmp_path / "out"
    rc, _, err = _run(capsys, _merge(env, out, "--exemplars", env["text"], env["text"], "--alpha", "1.0",
                                     method="regmean"))
    _one_line(rc, err, "--alpha is the merge scale and method 'regmean' has none", "--hparam alpha=")
    rc, _, err = _run(capsys, _merge(env, out, "--alpha", "0.5", method="average"))
    _one_line(rc, err, "--alpha is the merge scale and method 'average' has none", absent=["--hparam"])
    assert not out.exists() and not _temps(tmp_path)
    # --hparam alpha= still reaches RegMean's own alpha; a method's scale given twice is refused.
    from catmerge_jax.cli import check_hparams
    from catmerge_jax.methods.registry import get_method

    given = {"alpha": None, "lam": None, "c": None}
    assert check_hparams(get_method("regmean"), given, [("alpha", 0.5)]) == {"alpha": 0.5}
    rc, _, err = _run(capsys, _merge(env, out, "--alpha", "0.5", "--hparam", "lambda=0.2",
                                     method="mergekit.task_arithmetic"))
    _one_line(rc, err, "--hparam lambda repeats --alpha")
    # MergeKit's task arithmetic scales by its `lambda` (tests/test_merge_scale.py): --alpha sets that.
    assert pipeline.resolve_hparams(get_method("mergekit.task_arithmetic"), {**given, "alpha": 0.5}) == (
        {"lambda": 0.5}, [])
    assert pipeline.resolve_hparams(get_method("ties"), {"alpha": 0.5, "lam": 2.0, "c": None}) == (
        {"alpha": 0.5}, ["lam"])
