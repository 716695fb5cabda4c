"""The soft-token CLCLMRec recipe (configs/book_soft_tokens.py) on a tiny random Llama (SmolLM2 vocabulary) and a
small slice of the book data."""

from configs import book_soft_tokens


def get_config():
  c = book_soft_tokens.get_config()
  c.name = "tiny_fused"
  c.model.source, c.model.preset, c.model.tokenizer = "", "tiny", "smollm2"  # the placeholder token needs SmolLM2's vocabulary
  c.lora.r, c.lora.alpha = 4, 8.0
  c.data.shots, c.data.valid_size, c.data.test_size = 16, 16, 16
  c.data.eval_widths = 1  # one scoring program per split: compiles cost more than padding here
  c.train.batch_size = c.train.micro_batch_size = 4
  c.train.eval_batch_size = 8
  c.fusion.pretrain.epochs = 1
  c.stage1.steps = c.stage2.steps = 2
  return c
