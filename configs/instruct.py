"""Two stages: Alpaca instruction tuning, then book rec tuning from that LoRA."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "instruct"
  c.stages = ("instruct", "rec")
  return c
