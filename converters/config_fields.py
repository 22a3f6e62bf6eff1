"""What a ``config.json`` field must hold: field types, shared field tables and the check that names a bad field.

A family module (see :data:`converters.families.FAMILY_MODULES`) declares, per ``model_type``, every field its
loader reads and its :class:`FieldType` (``a.b``: field ``b`` of the object ``a``); :func:`check_fields` checks a
config against such a table before any model is built. A field that is absent takes the model's default, as in
``transformers``.

>>> check_fields({"hidden_size": 0}, {"hidden_size": POSITIVE_INT}, "m/config.json")
Traceback (most recent call last):
converters.config_fields.ConfigFieldError: m/config.json: hidden_size is 0; expected a positive integer
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Mapping

from catmerge_jax.errors import CatMergeError
from converters.keys import ConversionError

__all__ = ["ConfigFieldError", "FieldType", "POSITIVE_INT", "COUNT", "TOKEN_ID", "POSITIVE_NUMBER", "NAME", "FLAG",
           "SECTION", "NAMES", "SIDE", "VISION_FIELDS", "section", "check_fields"]


class ConfigFieldError(ConversionError, CatMergeError):
    """A ``config.json`` field the loaders read has the wrong type or value; the message names the file, the field
    and what was expected."""


@dataclasses.dataclass(frozen=True)
class FieldType:
    """What a config field must hold: ``expected`` (words for the message) and ``accepts(value) -> bool``."""

    expected: str
    accepts: Callable[[Any], bool]


def _int_from(low: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and v >= low  # not bool, not float: JSON true or 16.0 is no size


POSITIVE_INT = FieldType("a positive integer", _int_from(1))
COUNT = FieldType("a non-negative integer", _int_from(0))
TOKEN_ID = FieldType("a non-negative integer or null", lambda v: v is None or _int_from(0)(v))
POSITIVE_NUMBER = FieldType("a positive number", lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0)
NAME = FieldType("a string", lambda v: isinstance(v, str))
FLAG = FieldType("true or false", lambda v: type(v) is bool)
SECTION = FieldType("an object (or null)", lambda v: v is None or isinstance(v, dict))
NAMES = FieldType("a list of strings",
                  lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)))
SIDE = FieldType("a positive integer (or a list of two)",
                 lambda v: _int_from(1)(v) or (isinstance(v, list) and len(v) == 2 and all(map(_int_from(1), v))))

# The vision tower's fields, shared by CLIP and BLIP.
VISION_FIELDS = {"image_size": SIDE, "patch_size": SIDE, "hidden_size": POSITIVE_INT, "num_hidden_layers": COUNT,
                 "num_attention_heads": POSITIVE_INT, "intermediate_size": POSITIVE_INT, "hidden_act": NAME,
                 "layer_norm_eps": POSITIVE_NUMBER, "num_channels": POSITIVE_INT}


def section(name: str, fields: Mapping[str, FieldType]) -> dict[str, FieldType]:
    """The fields of the object ``name`` (itself an object or null) as dotted entries of a field table.

    >>> sorted(section("vision_config", {"image_size": SIDE}))
    ['vision_config', 'vision_config.image_size']
    """
    return {name: SECTION, **{f"{name}.{field}": kind for field, kind in fields.items()}}


def _shown(value: Any) -> str:
    """A config value as it reads in the JSON file, with its JSON type when that is not a number."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    if value is None or type(value) in (int, float):
        return text
    kind = ("a boolean" if isinstance(value, bool) else "a string" if isinstance(value, str)
            else "a list" if isinstance(value, (list, tuple)) else "an object" if isinstance(value, Mapping)
            else type(value).__name__)
    return f"{text} ({kind})"



def check_fields(config: Mapping[str, Any], fields: Mapping[str, FieldType], where: str = "config.json") -> None:
    """Raise :class:`ConfigFieldError` ``"<where>: <field> is <value> (<its type>); expected <type>"`` for the first
    field of ``fields`` that ``config`` holds with something else (see the module docstring for an example)."""
    for dotted, kind in fields.items():
        *sections, name = dotted.split(".")
        node: Any = config
        for part in sections:
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and name in node and not kind.accepts(node[name]):
            raise ConfigFieldError(f"{where}: {dotted} is {_shown(node[name])}; expected {kind.expected}")
