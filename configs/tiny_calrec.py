"""CALRec end to end in seconds: a tiny random Llama with the byte tokenizer on a few users of MovieLens-100K and
Beauty (both stages, dense and generation+BM25 evaluation). Tests and smoke runs; its metrics mean nothing."""

from configs import calrec_ml100k


def get_config(name: str = ""):
  """`configs/tiny_calrec.py:aux`: every auxiliary task beside CALRec's rows, at equal ratios."""
  if name not in ("", "aux"):
    raise ValueError(f"configs/tiny_calrec.py:{name}: use no variant or 'aux'")
  c = calrec_ml100k.get_config()
  c.name = "tiny_calrec"
  c.model.source, c.model.preset, c.model.tokenizer = "", "tiny", "bytes"
  c.lora.r, c.lora.alpha = 4, 8.0
  c.data.max_users = 24
  c.data.max_history, c.data.max_prompt_tokens, c.data.max_item_tokens = 4, 256, 64  # bytes: short prompts
  c.data.pad_multiple = 128  # widths 256 and 384 only
  c.data.valid_size, c.data.test_size = 16, 16
  c.calrec.mixture.steps, c.calrec.target.steps = 3, 3
  c.calrec.mixture.max_prefixes = c.calrec.target.max_prefixes = 2
  c.train.batch_size, c.train.micro_batch_size, c.train.eval_batch_size = 4, 2, 32
  c.train.eval_every, c.train.patience, c.train.checkpoint_every = 0, 0, 2  # validated after each stage's last step
  c.optim.lr, c.optim.warmup_steps = 1e-3, 1
  c.eval.num_samples, c.eval.temperature, c.eval.top_p = 2, 1.0, 1.0
  if name == "aux":
    c = calrec_ml100k.with_tasks(c, {"rec": 1.0, "mim": 1.0, "bpr": 1.0, "mlm": 1.0})
    c.name = "tiny_calrec_aux"
    c.tasks.mlm_max_words = 4
    c.data.max_item_tokens = 20  # bytes: BPR's 6 item lines at this cut and its template fit 256 tokens (236)
  return c
