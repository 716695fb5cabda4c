"""The candidate task end to end in seconds: a tiny random Llama with the byte tokenizer on a few MovieLens-100K
users, every auxiliary task mixed in. Tests and smoke runs; its metrics mean nothing."""

from configs import cand_ml100k


def get_config(variant: str = ""):
  """`configs/tiny_cand.py:unified`: the unified prompts' two stages (a tiny ID encoder pretrained for one epoch)."""
  if variant not in ("", "unified"):
    raise ValueError(f"configs/tiny_cand.py:{variant}: use no variant or 'unified'")
  c = cand_ml100k.get_config()
  c.name = "tiny_cand"
  c.model.source, c.model.preset, c.model.tokenizer = "", "tiny", "bytes"
  c.lora.r, c.lora.alpha = 4, 8.0
  c.data.max_users, c.data.max_prefixes = 16, 2
  c.data.max_history, c.data.num_candidates = 3, 5
  c.data.max_item_tokens, c.data.max_prompt_tokens = 24, 384  # bytes: short cuts
  c.data.pad_multiple = 512  # one row width for training, scoring and generation: one compile each
  c.data.valid_size, c.data.test_size = 8, 8
  c.tasks.ratios.update({"rec": 1.0, "mim": 0.5, "bpr": 0.5, "mlm": 0.5})
  c.candidates.steps = 3
  c.train.batch_size, c.train.micro_batch_size, c.train.eval_batch_size = 4, 2, 4
  c.train.eval_every, c.train.patience, c.train.checkpoint_every = 0, 0, 2
  c.optim.lr, c.optim.warmup_steps = 1e-3, 1
  if variant == "unified":
    c.name = "tiny_cand_unified"
    u = c.unified
    u.enabled, u.placeholder = True, "\u0100"  # the byte tokenizer's NUL byte: no title holds it
    u.encoder_overrides = {"hidden": 8, "num_layers": 1, "num_heads": 1, "max_len": 20, "buckets": (20,),
                           "num_epochs": 1, "batch_size": 64, "eval_batch_size": 512, "eval_every": 1,
                           "ce_negatives": 0}
    u.projector_hidden, u.steps = 16, 3
  return c
