"""TALLRec movie (MovieLens-100K) rec tuning, 64-shot."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "movie"
  c.data.domain = "movie"
  return c
