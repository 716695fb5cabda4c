"""TALLRec-style text-only LoRA rec tuning on book (Book-Crossing), 64-shot: the baseline the recipe
(configs/book.py) is measured against."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "tallrec_book"
  c.data.domain = "book"
  return c
