"""CLCLMRec on TALLRec book: stage 1 text-only LoRA, stage 2 fused soft tokens + contrastive losses."""

from ml_collections import ConfigDict

from configs import base
from configs.fused_movie import fused_overrides


def get_config() -> ConfigDict:
  c = fused_overrides(base.get_config())
  c.name = "fused_book"
  c.data.domain = "book"
  # Book-Crossing items are rarely seen twice: hide most ids in pretraining so likes are read from context.
  c.fusion.encoder_dropout = 0.5
  c.fusion.pretrain.item_mask_rate = 0.8
  return c
