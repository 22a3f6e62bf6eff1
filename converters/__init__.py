"""Checkpoint converters: Hugging Face folders, open_clip state dicts and task-vectors pickles ↔ Flax params.

Nothing here imports torch. Submodules: :mod:`converters.safetensors_io`, :mod:`converters.hf` (HF folders, any
family), :mod:`converters.families` (``model_type`` → family module: :mod:`converters.bert_clip`,
:mod:`converters.blip`, :mod:`converters.decoder`), :mod:`converters.keys` and :mod:`converters.config_fields` (what
every family shares), :mod:`converters.open_clip`, :mod:`converters.pickled_checkpoints`.
"""
