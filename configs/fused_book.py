"""CLCLMRec on TALLRec book: stage 1 text-only LoRA, stage 2 fused soft tokens + contrastive losses."""

from ml_collections import ConfigDict

from configs import base
from configs.fused_movie import fused_overrides


def get_config() -> ConfigDict:
  c = fused_overrides(base.get_config())
  c.name = "fused_book"
  c.data.domain = "book"
  return c
