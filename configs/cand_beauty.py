"""LLaRA's candidate ranking task on Amazon Beauty: as configs/cand_ml100k.py, with longer title cuts (median 20
tokens, 90% under 32) and Cao et al.'s three auxiliary tasks mixed in, scored on 2,000 seeded test users."""

from configs import cand_ml100k


def get_config():
  c = cand_ml100k.get_config()
  c.name = "cand_beauty"
  c.data.dataset = "beauty"
  c.data.max_item_tokens, c.data.max_prompt_tokens = 32, 1152
  c.data.max_prefixes = 2  # 22k users: 2 prefixes each are more examples than the steps read
  c.data.test_size = 2000
  c.tasks.ratios.update({"rec": 1.0, "mim": 0.2, "bpr": 0.2, "mlm": 0.2})
  c.unified.encoder_config = "pretrain_beauty"  # Beauty's item ids (with --config.unified.enabled=True)
  return c
