"""A tiny random Llama on a small slice of the book data: the whole train + eval runs in seconds."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "tiny"
  c.model.source, c.model.preset, c.model.tokenizer = "", "tiny", "bytes"
  c.lora.r, c.lora.alpha = 4, 8.0
  c.data.shots, c.data.valid_size, c.data.test_size = 16, 32, 64
  c.data.cutoff_len, c.data.pad_multiple = 1024, 256  # bytes: few padded shapes, few compiles
  c.data.eval_widths = 1
  c.train.batch_size, c.train.micro_batch_size, c.train.eval_batch_size = 4, 2, 32
  c.train.num_epochs, c.train.eval_every, c.train.patience, c.train.checkpoint_every = 2, 4, 10, 2
  c.instruct.num_examples, c.instruct.batch_size, c.instruct.max_steps = 16, 8, 2
  c.optim.lr = 1e-3
  return c
