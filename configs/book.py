"""TALLRec book (Book-Crossing) rec tuning, 64-shot, sized to finish on a 2-core CPU in an hour."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "book"
  c.data.domain = "book"
  return c
