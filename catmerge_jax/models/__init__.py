"""Flax linen models whose parameter trees mirror their PyTorch checkpoints (see each module)."""

from catmerge_jax.models.bert import BertConfig, BertModel, BertOutput, roberta_position_ids
from catmerge_jax.models.clip_vit import ClipVisionConfig, ClipVisionModel, ClipVisionOutput
from catmerge_jax.models.blip import (BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering,
                                      BlipTextConfig, BlipVisionConfig)

__all__ = ["BertConfig", "BertModel", "BertOutput", "roberta_position_ids",
           "ClipVisionConfig", "ClipVisionModel", "ClipVisionOutput",
           "BlipConfig", "BlipVisionConfig", "BlipTextConfig", "BlipForQuestionAnswering", "BlipForConditionalGeneration"]
