"""Quick encoder pretraining on MovieLens-100K (943 users; minutes on a CPU)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "ml100k"
  c.seed = 0
  c.max_len = 50
  c.buckets = (50,)  # ML-100K users have >= 20 ratings: every batch is full width
  c.hidden, c.num_layers, c.num_heads = 64, 2, 2
  c.dropout, c.attn_dropout = 0.2, 0.2
  c.pooling = "last"
  c.batch_size, c.eval_batch_size = 128, 1024
  c.lr = 1e-3
  c.num_epochs = 200
  c.eval_every = 5
  c.patience = 8
  c.time_budget_min = 5.0
  c.cl_weight = 0.1
  c.temperature = 1.0
  c.similarity = "dot"
  c.exclude_history = False
  c.augment = ml_collections.ConfigDict(dict(
      crop_eta=0.6, mask_gamma=0.3, reorder_beta=0.6, insert_rate=0.4, substitute_rate=0.1,
      short_threshold=4, corr_top_k=1))
  return c
