"""TALLRec-style text-only LoRA rec tuning on movie (MovieLens-100K), 64-shot: the baseline the recipe
(configs/movie.py) is measured against."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "tallrec_movie"
  c.data.domain = "movie"
  return c
